"""Mask nodes: solid, invert, crop, composite, feather, grow/shrink, threshold. MASK is [B, H, W] floats in 0..1."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION, as_mask_batch
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket

MASK_OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


class SolidMask(Node):
    """A width x height mask of one value."""

    category = "mask"
    value = Float(1.0, min=0.0, max=1.0, step=0.01)
    width = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    height = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    outputs = (Output("MASK"),)

    def execute(self, value: float, width: int, height: int) -> tuple[torch.Tensor]:
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class InvertMask(Node):
    """1 - mask."""

    category = "mask"
    mask = Socket("MASK")
    outputs = (Output("MASK"),)

    def execute(self, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - as_mask_batch(mask),)


class CropMask(Node):
    """The width x height part of a mask from (x, y) (less where it reaches past the edge)."""

    category = "mask"
    mask = Socket("MASK")
    x = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    width = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    height = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    outputs = (Output("MASK"),)

    def execute(self, mask: torch.Tensor, x: int, y: int, width: int, height: int) -> tuple[torch.Tensor]:
        mask = as_mask_batch(mask)
        h, w = mask.shape[-2:]
        if x >= w or y >= h:
            raise ValueError(f"CropMask: the start ({x}, {y}) lies outside the {w}x{h} mask")
        return (mask[:, y:y + height, x:x + width].clone(),)


class MaskComposite(Node):
    """Combines `source` placed at (x, y) with `destination`, clamped to 0..1; and/or/xor round both first."""

    category = "mask"
    destination = Socket("MASK")
    source = Socket("MASK")
    x = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    operation = Combo(MASK_OPERATIONS)
    outputs = (Output("MASK"),)

    def execute(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
                operation: str) -> tuple[torch.Tensor]:
        output = as_mask_batch(destination).clone()
        source = as_mask_batch(source).to(output)
        if output.shape[0] != source.shape[0]:
            if 1 not in (output.shape[0], source.shape[0]):
                raise ValueError(f"MaskComposite: batches of {output.shape[0]} and {source.shape[0]} masks "
                                 "do not match (one of them must be a single mask)")
            output = output.expand(max(output.shape[0], source.shape[0]), -1, -1).clone()
        height, width = output.shape[-2:]
        bottom, right = min(y + source.shape[-2], height), min(x + source.shape[-1], width)
        if bottom > y and right > x:  # a source placed wholly outside changes nothing
            dest = output[:, y:bottom, x:right]
            src = source[:, :bottom - y, :right - x]
            if operation == "multiply":
                result = dest * src
            elif operation == "add":
                result = dest + src
            elif operation == "subtract":
                result = dest - src
            elif operation in ("and", "or", "xor"):
                a, b = dest.round().bool(), src.round().bool()
                result = {"and": a & b, "or": a | b, "xor": a ^ b}[operation].to(output.dtype)
            else:
                raise ValueError(f"MaskComposite: unknown operation {operation!r}; one of {MASK_OPERATIONS}")
            output[:, y:bottom, x:right] = result
        return (output.clamp(0.0, 1.0),)


def _edge_factors(size: int, near: int, far: int) -> torch.Tensor:
    """Per-row (or column) factors of FeatherMask, ramping over `near` from the start and `far` from the end.

    ComfyUI indexes the far edge as [-t] for t = 0..far-1, so its ramp starts on the first row/column and
    the last one gets 2/far; kept for identical results."""
    factors = torch.ones(size)
    if near:
        factors[:near] *= torch.arange(1, near + 1) / near
    if far:
        index = (-torch.arange(far)) % size
        factors[index] *= torch.arange(1, far + 1) / far
    return factors


class FeatherMask(Node):
    """Fades the mask linearly to 0 over the given number of pixels at each edge."""

    category = "mask"
    mask = Socket("MASK")
    left = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    top = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    right = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    bottom = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    outputs = (Output("MASK"),)

    def execute(self, mask: torch.Tensor, left: int, top: int, right: int, bottom: int) -> tuple[torch.Tensor]:
        mask = as_mask_batch(mask)
        h, w = mask.shape[-2:]
        cols = _edge_factors(w, min(left, w), min(right, w)).to(mask)
        rows = _edge_factors(h, min(top, h), min(bottom, h)).to(mask)
        return (mask * rows[:, None] * cols[None, :],)


def _dilate(mask: torch.Tensor, tapered: bool) -> torch.Tensor:
    """One step of grey dilation of [B, 1, H, W] by a 3x3 square, or by a plus shape when `tapered`."""
    if not tapered:
        return F.max_pool2d(mask, 3, stride=1, padding=1)
    vertical = F.max_pool2d(mask, (3, 1), stride=1, padding=(1, 0))
    horizontal = F.max_pool2d(mask, (1, 3), stride=1, padding=(0, 1))
    return torch.maximum(vertical, horizontal)


class GrowMask(Node):
    """Grows the mask by `expand` pixels (shrinks it when negative); tapered corners grow diagonals slower."""

    display_name = "Grow Mask"
    category = "mask"
    mask = Socket("MASK")
    expand = Int(0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1)
    tapered_corners = Boolean(True)
    outputs = (Output("MASK"),)

    def execute(self, mask: torch.Tensor, expand: int, tapered_corners: bool) -> tuple[torch.Tensor]:
        out = as_mask_batch(mask).float()[:, None]
        for _ in range(abs(expand)):
            # Erosion is the dilation of the complement; the image edge counts as neither (as scipy's reflect).
            out = _dilate(out, tapered_corners) if expand > 0 else -_dilate(-out, tapered_corners)
        return (out[:, 0],)


class ThresholdMask(Node):
    """1 where the mask is above `value`, else 0."""

    category = "mask"
    mask = Socket("MASK")
    value = Float(0.5, min=0.0, max=1.0, step=0.01)
    outputs = (Output("MASK"),)

    def execute(self, mask: torch.Tensor, value: float) -> tuple[torch.Tensor]:
        return ((as_mask_batch(mask) > value).float(),)


NODES: list[Any] = [SolidMask, InvertMask, CropMask, MaskComposite, FeatherMask, GrowMask, ThresholdMask]
