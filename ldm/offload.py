"""Low-VRAM inference: a UNet's blocks stay on the offload device and are copied to the compute device
one at a time, just before each runs, and dropped right after; only the small embedding and output
layers stay resident. Peak weight memory on the card becomes the largest block, not the model.

Each block's parameters keep their *home* tensor (on the offload device, pinned when the compute
device is CUDA so copies are asynchronous); a forward pre-hook swaps in a device copy and a forward
hook swaps the home tensor back, so the module is never half-moved between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

BLOCK_CONTAINERS = ("input_blocks", "middle_block", "output_blocks")


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
            # A LoRA copy of the UNet shares these hooks and brings its own patched tensors: their
            # home is where they are when first seen.
            home = self.home.setdefault(id(tensor), tensor.data)
            tensor.data = home.to(self.device, non_blocking=non_blocking)
        self.loads += 1

    def unload(self, block: nn.Module, args: tuple, output: torch.Tensor) -> None:
        for tensor in _tensors(block):
            tensor.data = self.home[id(tensor)]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _blocks(unet: nn.Module) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for name in BLOCK_CONTAINERS:
        container = getattr(unet, name, None)  # a ControlNet has no output blocks
        if container is None:
            continue
        blocks.extend(container if isinstance(container, nn.ModuleList) else [container])
    return blocks


def _resident_parts(unet: nn.Module) -> list[nn.Module]:
    return [child for name, child in unet.named_children() if name not in BLOCK_CONTAINERS]


def stream_blocks(unet: nn.Module, device: torch.device | str, offload: torch.device | str = "cpu") -> int:
    """Stream `unet`'s blocks to `device` on demand from now on; returns the bytes kept on `device`.

    Idempotent: calling it again re-places the resident parts (e.g. after another model's eviction).
    """
    device = torch.device(device)
    streamer: BlockStreamer | None = getattr(unet, "_loom_streamer", None)
    if streamer is None or streamer.device != device or not streamer.active:
        if streamer is not None and streamer.active:
            unstream_blocks(unet)
        streamer = BlockStreamer(device, _blocks(unet))
        pin = device.type == "cuda"
        for block in streamer.blocks:
            for tensor in _tensors(block):
                home = tensor.data.to(offload)
                tensor.data = home.pin_memory() if pin else home
                streamer.home[id(tensor)] = tensor.data
            streamer.handles.append(block.register_forward_pre_hook(streamer.load))
            streamer.handles.append(block.register_forward_hook(streamer.unload))
        unet._loom_streamer = streamer
    resident = 0
    for part in _resident_parts(unet):
        part.to(device)
        resident += sum(t.numel() * t.element_size() for t in _tensors(part))
    return resident


def unstream_blocks(unet: nn.Module) -> None:
    """Back to a plain module: hooks removed, every weight at its home tensor."""
    streamer: BlockStreamer | None = getattr(unet, "_loom_streamer", None)
    if streamer is None:
        return
    if streamer.active:  # a LoRA copy shares the streamer (and the hooks) of its base model
        for handle in streamer.handles:
            handle.remove()
        for block in streamer.blocks:
            for tensor in _tensors(block):
                tensor.data = streamer.home[id(tensor)]
        streamer.active = False
    del unet._loom_streamer


def streamer_of(unet: nn.Module) -> BlockStreamer | None:
    return getattr(unet, "_loom_streamer", None)
