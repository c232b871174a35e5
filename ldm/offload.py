"""Low-VRAM inference: a model's blocks stay on the offload device and are copied to the compute device
one at a time, just before each runs, and dropped right after; only the small embedding and output
layers stay resident. Peak weight memory on the card becomes the largest block, not the model.

Which modules are blocks (`block_plan`): a UNet's (or ControlNet's) `input_blocks`, `middle_block` and
`output_blocks`. Any other model's are the elements of its `nn.ModuleList`s, wherever they sit in the
module tree (a denoiser wrapper's `.model`, a Stable Audio model's `.dit.transformer.layers`):
Flux's `double_blocks` and `single_blocks`, SD3's `joint_blocks`, Wan's `blocks`, LTX-Video's and
Qwen-Image's `transformer_blocks`, Lumina 2's `layers`, a VAE level's `block`... An element is a block
when it runs itself: it defines `forward` and holds modules of its own. A wrapper holding a single
module and no tensors (HiDream's `.block.` level, which its model calls past) stands for that module;
an element without a `forward` (a VAE's level, whose parent runs its parts) is searched in turn; a
bare layer (a `Linear` in a list) stays resident, as its weight may be read outside a call.
`streamable` tells whether the blocks hold at least half of a model's bytes.

Each block's parameters keep their *home* tensor (on the offload device, pinned when the compute
device is CUDA so copies are asynchronous); a forward pre-hook swaps in a device copy and a forward
hook swaps the home tensor back, so the module is never half-moved between calls. Tensors keep
their dtype: fp8 weights (`ldm.quant`) travel as fp8 with their scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

UNET_CONTAINERS = ("input_blocks", "middle_block", "output_blocks")
STREAMED_SHARE = 0.5  # `streamable`: the least share of a model's bytes its blocks must hold


@dataclass
class BlockPlan:
    """Where a model's tensors go when it is streamed."""

    blocks: list[nn.Module] = field(default_factory=list)  # streamed one at a time
    resident: list[nn.Module] = field(default_factory=list)  # subtrees without blocks: on the device whole
    ancestors: list[nn.Module] = field(default_factory=list)  # the model and the modules down to its blocks:
    # their own parameters and buffers on the device, their children placed by the lists above


@dataclass
class BlockStreamer:
    device: torch.device
    blocks: list[nn.Module]
    home: dict[int, torch.Tensor] = field(default_factory=dict)  # id(tensor holder) -> home tensor
    handles: list = field(default_factory=list)
    loads: int = 0  # blocks copied to the device so far
    active: bool = True

    def load(self, block: nn.Module, args: tuple) -> None:
        non_blocking = self.device.type == "cuda"
        for tensor in _tensors(block):
            # A LoRA copy of the model shares these hooks and brings its own patched tensors: their
            # home is where they are when first seen.
            home = self.home.setdefault(id(tensor), tensor.data)
            tensor.data = home.to(self.device, non_blocking=non_blocking)
        self.loads += 1

    def unload(self, block: nn.Module, args: tuple, output: object) -> None:
        for tensor in _tensors(block):
            tensor.data = self.home[id(tensor)]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def block_plan(model: nn.Module) -> BlockPlan:
    """`model`'s blocks, resident parts and the modules between (see the module docstring for the rule)."""
    plan = BlockPlan(ancestors=[model])
    if hasattr(model, "input_blocks"):  # a UNet or a ControlNet (which has no output blocks)
        for name, child in model.named_children():
            if name not in UNET_CONTAINERS:
                plan.resident.append(child)
            else:
                plan.blocks.extend(child if isinstance(child, nn.ModuleList) else [child])
        return plan
    _search(model, plan)
    return plan


def _search(module: nn.Module, plan: BlockPlan) -> None:
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            for element in child:
                _element(element, plan)
        elif _holds_list(child):
            plan.ancestors.append(child)
            _search(child, plan)
        else:
            plan.resident.append(child)


def _element(element: nn.Module, plan: BlockPlan) -> None:
    unit = element
    while not _own_tensors(unit) and len(unit._modules) == 1:  # a wrapper: its module is what runs
        unit = next(iter(unit._modules.values()))
    if _runs_itself(unit):
        if all(unit is not block for block in plan.blocks):  # a module listed twice streams once
            plan.blocks.append(unit)
    elif isinstance(unit, nn.ModuleList):
        for inner in unit:
            _element(inner, plan)
    elif next(unit.children(), None) is not None:  # a holder its parent runs the parts of
        plan.ancestors.append(unit)
        _search(unit, plan)
    else:
        plan.resident.append(unit)


def _runs_itself(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward and next(module.children(), None) is not None


def _holds_list(module: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) for m in module.modules())


def streamable(model: nn.Module) -> bool:
    """Whether streaming `model` pays: a UNet, or a model whose blocks hold `STREAMED_SHARE` of its bytes."""
    if hasattr(model, "input_blocks"):
        return True
    total = _bytes(_tensors(model))
    return total > 0 and _bytes([t for b in block_plan(model).blocks for t in _tensors(b)]) >= STREAMED_SHARE * total


def resident_bytes(plan: BlockPlan) -> int:
    """Bytes a streamed model keeps on the compute device: everything but its blocks."""
    return (sum(_bytes(_tensors(part)) for part in plan.resident)
            + sum(_bytes(_own_tensors(module)) for module in plan.ancestors))


def stream_blocks(model: nn.Module, device: torch.device | str, offload: torch.device | str = "cpu",
                  pin_budget: int | None = None) -> int:
    """Stream `model`'s blocks to `device` on demand from now on; returns the bytes kept on `device`. The blocks'
    home tensors are pinned for asynchronous copies to a CUDA device, unless they hold more than `pin_budget` bytes
    (pinned memory cannot be paged out: a 17B model's would hold 34 GB of a small machine's RAM).

    Idempotent: calling it again re-places the resident parts (e.g. after another model's eviction).
    """
    device = torch.device(device)
    plan = block_plan(model)
    streamer: BlockStreamer | None = getattr(model, "_loom_streamer", None)
    if streamer is None or streamer.device != device or not streamer.active:
        if streamer is not None and streamer.active:
            unstream_blocks(model)
        streamer = BlockStreamer(device, plan.blocks)
        blocks = sum(_bytes(_tensors(block)) for block in plan.blocks)
        pin = device.type == "cuda" and (pin_budget is None or blocks <= pin_budget)
        for block in streamer.blocks:
            for tensor in _tensors(block):
                home = tensor.data.to(offload)
                tensor.data = home.pin_memory() if pin else home
                streamer.home[id(tensor)] = tensor.data
            streamer.handles.append(block.register_forward_pre_hook(streamer.load))
            streamer.handles.append(block.register_forward_hook(streamer.unload))
        model._loom_streamer = streamer
    for part in plan.resident:
        part.to(device)
    for module in plan.ancestors:
        _move_own(module, device)
    return resident_bytes(plan)


def _move_own(module: nn.Module, device: torch.device) -> None:
    """`module`'s own parameters and buffers to `device`, as `module.to` moves them, its children left."""
    for param in module._parameters.values():
        if param is not None:
            param.data = param.data.to(device)
    for name, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[name] = buffer.to(device)


def unstream_blocks(model: nn.Module) -> None:
    """Back to a plain module: hooks removed, every weight at its home tensor."""
    streamer: BlockStreamer | None = getattr(model, "_loom_streamer", None)
    if streamer is None:
        return
    if streamer.active:  # a LoRA copy shares the streamer (and the hooks) of its base model
        for handle in streamer.handles:
            handle.remove()
        for block in streamer.blocks:
            for tensor in _tensors(block):
                tensor.data = streamer.home[id(tensor)]
        streamer.active = False
    del model._loom_streamer


def streamer_of(model: nn.Module) -> BlockStreamer | None:
    return getattr(model, "_loom_streamer", None)
