"""ComfyUI's model compatibility nodes: ModelComputeDtype and ModelAttentionBackend (its nodes_model_advanced.py) and
wanBlockSwap (its nodes_nop.py), so that workflows holding them run, on Loom's own device handling."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from nodes.node import Node
from nodes.sd.models import DiffusionModel, new_bytes
from nodes.spec import Combo, Output, Socket

log = logging.getLogger(__name__)

# ComfyUI's node_helpers.string_to_torch_dtype; "default" (None): the dtype the model was loaded in.
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"default": None, "fp32": torch.float32, "fp16": torch.float16,
                                                 "bf16": torch.bfloat16}
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)
PYTORCH_ATTENTION = "pytorch attention"


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a model computes in: its own `dtype` where it tells (Loom's models read it from a weight that fp8
    storage leaves alone), else that of its first full-precision weight."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((t.dtype for t in module.state_dict().values() if t.dtype in _CASTABLE), None)


@torch.no_grad()
def cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A shallow copy of `module` whose full-precision weights and persistent buffers are in `dtype`, as a loader of
    that dtype makes them: fp8 weights stay fp8 (their scales, in the compute dtype, are cast, so the layers compute
    in `dtype`); non-persistent buffers (position tables kept in float32) and other dtypes are left alone."""
    from ldm.lora import shallow_copy

    copy = shallow_copy(module)
    for layer in copy.modules():
        for name, tensor in layer._parameters.items():
            if tensor is not None and tensor.dtype in _CASTABLE and tensor.dtype != dtype:
                layer._parameters[name] = nn.Parameter(tensor.to(dtype), requires_grad=tensor.requires_grad)
        for name, tensor in layer._buffers.items():
            if (tensor is not None and tensor.dtype in _CASTABLE and tensor.dtype != dtype
                    and name not in layer._non_persistent_buffers_set):
                layer._buffers[name] = tensor.to(dtype)
    return copy


class ModelComputeDtype(Node):
    """The MODEL computing in fp32, fp16 or bf16: its weights (fp8 ones but for their scales) cast to that dtype, in
    a copy ("default": the MODEL as it comes, in the dtype it was loaded in). ComfyUI casts each layer's weights as
    it runs; Loom's layers compute in their weights' dtype, so the copy holds the cast weights (the same numbers)."""

    category = "advanced/debug"
    model = Socket("MODEL")
    dtype = Combo(list(COMPUTE_DTYPES), extra={"advanced": True})
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, dtype: str) -> tuple[DiffusionModel]:
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"ModelComputeDtype: dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {dtype!r}")
        target, current = COMPUTE_DTYPES[dtype], compute_dtype(model.unet)
        if target is None or target == current:
            log.info("ModelComputeDtype: %s computes in %s, unchanged (dtype %s)", model.source, current, dtype)
            return (model,)
        quantized = [key for key, t in model.unet.state_dict().items() if type(t) not in (torch.Tensor, nn.Parameter)]
        if quantized:
            raise ValueError(f"ModelComputeDtype: {model.source} holds int8 (torchao) weights such as {quantized[0]}, "
                             f"whose compute dtype cannot be changed: load it without --weights-dtype int8 to run it "
                             f"in {dtype}")
        unet = cast_copy(model.unet, target)
        log.info("ModelComputeDtype: %s computes in %s (it came in %s)", model.source, target, current)
        return (replace(model, unet=unet, own_bytes=new_bytes(unet, model.unet)),)


class ModelAttentionBackend(Node):
    """Where ComfyUI chooses the attention kernels (PyTorch's, or its INT8 Comfy Kitchen ones), Loom's attention is
    PyTorch's scaled_dot_product_attention throughout: the MODEL passes through, and a choice Loom lacks is logged."""

    description = ("Selects the dense attention implementation for the model. When used with Block Sparse Attention, "
                   "this backend is used whenever sparse attention is inactive or unsupported.")
    display_name = "Model Attention Backend"
    category = "model/patch"
    model = Socket("MODEL", tooltip="The model to patch.")
    # ComfyUI offers "comfy kitchen attention" where its kernels are installed, and takes any saved choice (falling
    # back to PyTorch attention): so does Loom, whose check_inputs accepts every value.
    attention = Combo([PYTORCH_ATTENTION], checked_by_node=True, extra={"display_name": "backend"},
                      tooltip="The dense attention backend. Comfy Kitchen attention uses quantized INT8 attention and "
                              "is available only on Nvidia and AMD GPUs.")
    outputs = (Output("MODEL", "model", tooltip="The model with the selected attention backend."),)

    def execute(self, model: DiffusionModel, attention: Any) -> tuple[DiffusionModel]:
        if attention != PYTORCH_ATTENTION:
            log.warning("Attention backend %r is unavailable in Loom; using PyTorch attention.", attention)
        log.info("Attention backend enabled: using %s (torch scaled_dot_product_attention).", PYTORCH_ATTENTION)
        return (model,)


class wanBlockSwap(Node):
    """Intercept wanBlockSwap custom node that causes major instability and make it no-op."""

    category = ""
    model = Socket("MODEL")
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel) -> tuple[DiffusionModel]:
        log.info("wanBlockSwap: the MODEL passes through unchanged, as in ComfyUI (Loom's --lowvram streams a "
                 "transformer's blocks to the GPU itself)")
        return (model,)


NODES = [ModelComputeDtype, ModelAttentionBackend, wanBlockSwap]
