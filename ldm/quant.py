"""Smaller weights: fp8 (e4m3) storage for Linear and Conv2d layers, upcast per layer at run time.

`quantize_fp8_(model, compute_dtype)` halves the weight memory of an fp16/bf16 model (a quarter of
fp32): each layer keeps its weight as `torch.float8_e4m3fn` divided by a per-output-channel scale
(so every row uses fp8's whole range), and its forward multiplies it back in the compute dtype just
before the matmul or convolution. Only one layer's full-precision weight exists at a time.

Kept in full precision, because they are small and the output is sensitive to them: the timestep
and class embeddings and the UNet's first and last convolutions (names in `FP8_SKIP`), the UNet's
blocks at full latent resolution (`fp8_skip`; 16 MiB more for SDXL, raising the PSNR against
bf16 images from 31.5 to 33.3 dB on an H100), norms, embeddings and biases.

The engine quantizes the UNet and the text encoders separately (`--weights-dtype`,
`--te-weights-dtype`): on SDXL an fp8 text encoder moved images more than the whole fp8 UNet
(28.3 dB with both, 31.5 with the UNet alone), so it is a choice of its own.

`quantize_int8_(model)` is torchao's int8 weight-only quantization, when torchao is installed.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# The T5 family's feed-forward output (`DenseReluDense.wo`) too: transformers keeps it in full precision and casts
# the layer's input to its weight's dtype, which would be fp8.
# LTX-2's text encoder's feature projection and Gemma 3's vision tower: transformers and Loom cast their inputs to
# their weights' dtype.
FP8_SKIP = re.compile(r"(^|\.)(time_embed|time_embed_r|label_emb)(\.|$)|^input_blocks\.0\.|^out\.|"
                      r"(^|\.)DenseReluDense\.wo$|^(text_embedding_projection|vision)(\.|$)")


class QuantizationUnavailable(RuntimeError):
    """The requested quantization needs a package or dtype this installation lacks."""


class _Fp8Weight:
    """Shared by the fp8 layers: the weight in the compute dtype, rebuilt for each call."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.weight_scale.dtype
        if self.weight.dtype != FP8:  # patched since (e.g. a LoRA): a plain full-precision weight
            return self.weight.to(dtype)
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)


class Fp8Linear(_Fp8Weight, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias(x.dtype))


class Fp8Conv2d(_Fp8Weight, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.dequantized_weight(x.dtype), self._bias(x.dtype))


_FP8_CLASSES: dict[type, type] = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}


def _quantize_layer(layer: nn.Module) -> None:
    weight = layer.weight.detach()
    rows = weight.float().reshape(weight.shape[0], -1)
    scale = (rows.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    scale = scale.reshape(-1, *([1] * (weight.ndim - 1)))
    quantized = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    layer.__class__ = _FP8_CLASSES[type(layer)]
    layer.weight = nn.Parameter(quantized, requires_grad=False)
    # The scale is kept in the weight's former dtype: that is the compute dtype the layer runs in.
    layer.register_buffer("weight_scale", scale.to(weight.dtype))


def fp8_skip(model: nn.Module) -> re.Pattern[str]:
    """`FP8_SKIP`, and for a UNet also its first level's blocks (those at full latent resolution): the
    input blocks before the first downsample (that included) and the output blocks after the last upsample."""
    kept = getattr(model, "fp8_keep", None)  # a model's own layers to keep (LTX-2's outside its blocks)
    if kept is not None:
        return re.compile(FP8_SKIP.pattern + "|" + kept)
    config = getattr(model, "config", None)
    if not (hasattr(model, "input_blocks") and hasattr(model, "output_blocks") and hasattr(config, "num_res_blocks")):
        return FP8_SKIP
    per_level = config.num_res_blocks + 1
    inputs = "|".join(str(i) for i in range(1, 1 + per_level))
    outputs = "|".join(str(i) for i in range(len(model.output_blocks) - per_level, len(model.output_blocks)))
    return re.compile(FP8_SKIP.pattern + rf"|^input_blocks\.({inputs})\.|^output_blocks\.({outputs})\.")


def quantize_fp8_(model: nn.Module, skip: re.Pattern[str] | None = None) -> nn.Module:
    """Store every Linear and Conv2d weight of `model` in fp8 (in place; returns `model`), except the
    layers whose names `skip` finds (default: `fp8_skip(model)`).

    The compute dtype stays the weights' current dtype: quantize after casting to fp16/bf16.
    """
    skip = fp8_skip(model) if skip is None else skip
    for name, layer in list(model.named_modules()):
        if type(layer) in _FP8_CLASSES and not skip.search(name):
            _quantize_layer(layer)
    return model


def is_fp8(layer: nn.Module) -> bool:
    return isinstance(layer, _Fp8Weight) and layer.weight.dtype == FP8


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight in full precision (its own weight unless it is stored in fp8)."""
    return layer.dequantized_weight() if isinstance(layer, _Fp8Weight) else layer.weight


def quantize_int8_(model: nn.Module) -> nn.Module:
    """torchao's int8 weight-only quantization of the Linear layers (in place; returns `model`)."""
    try:
        from torchao.quantization import quantize_
    except ImportError as e:
        raise QuantizationUnavailable("int8 weights need torchao (pip install torchao)") from e
    try:
        from torchao.quantization import Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig()
    except ImportError:  # torchao before 0.10 names it as a function
        from torchao.quantization import int8_weight_only

        config = int8_weight_only()
    quantize_(model, config)
    return model


def quantize_(model: nn.Module, weights_dtype: str) -> nn.Module:
    """Apply a `--weights-dtype` choice: "default" (nothing), "fp8" or "int8"."""
    if weights_dtype == "fp8":
        return quantize_fp8_(model)
    if weights_dtype == "int8":
        return quantize_int8_(model)
    if weights_dtype != "default":
        raise ValueError(f"unknown weights dtype {weights_dtype!r}: default, fp8 or int8")
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (fp8 weights and their scales included)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
