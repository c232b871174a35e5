"""Classifier-free guidance over the graph's CONDITIONING lists, with area and mask composition.

A CONDITIONING is a list of `(embedding [1 or B, L, D], options)` pairs. Options read here:
- `area`: `(height, width, y, x)` in latent pixels (image pixels // 8), as ComfyUI's
  ConditioningSetArea stores it; or `("percentage", h, w, y, x)` as fractions of the latent size.
- `strength`: weight of this entry where entries overlap (default 1.0).
- `mask`: [1 or B, H, W] weights, any resolution (resized bilinearly to the latent), with
  `mask_strength` (default 1.0); cropped to `area` when both are given.
- `y`: the precomputed class/size embedding [1 or B, adm] for models that take one (SDXL). The
  caller builds it from `pooled_output` and the size options; this module never looks at those.

Each entry predicts x0 over its area; entries of one side (positive or negative) are blended by
their weights, with an 8-pixel linear feather on area edges that are inside the image and have
no mask (ComfyUI's area composition). Latent pixels no entry covers predict 0, as in ComfyUI.
All entries of both sides that share an area size go through ONE model call; embeddings of
different lengths (77 vs 154 tokens) are repeated to their least common multiple, which leaves
attention unchanged, or run in separate calls when that multiple would exceed 4x the shorter one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.sampling.denoiser import Conditioning, Denoiser

CondList = list[tuple[Tensor, dict]]

MAX_CONTEXT_REPEAT = 4


@dataclass
class _Job:
    side: int  # 0 = positive, 1 = negative
    context: Tensor
    y: Tensor | None
    rows: slice
    cols: slice
    weight: Tensor | float  # [B or 1, 1, h, w], or a scalar for a whole-image entry


def _to_batch(t: Tensor, batch: int) -> Tensor:
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"conditioning batch {t.shape[0]} does not divide the latent batch {batch}")
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


def _feather(length: int, start_inside: bool, end_inside: bool, rr: int) -> Tensor:
    """Per-row (or column) weights ramping up over `rr` pixels from each edge inside the image."""
    ramp = torch.ones(length)
    for t in range(min(rr, length) if rr else 0):
        if start_inside:
            ramp[t] *= (t + 1) / rr
        if end_inside:
            ramp[length - 1 - t] *= (t + 1) / rr
    return ramp


def _job(side: int, embedding: Tensor, options: dict, x: Tensor, feather: int) -> _Job:
    batch, _, height, width = x.shape
    area = options.get("area")
    if area is None:
        h, w, top, left = height, width, 0, 0
    elif area[0] == "percentage":
        h, w = max(1, round(area[1] * height)), max(1, round(area[2] * width))
        top, left = round(area[3] * height), round(area[4] * width)
    else:
        h, w, top, left = (int(v) for v in area)
    rows, cols = slice(top, min(top + h, height)), slice(left, min(left + w, width))
    strength = float(options.get("strength", 1.0))
    mask = options.get("mask")
    y = options.get("y")
    y = None if y is None else _to_batch(y.to(x.device, x.dtype), batch)
    context = _to_batch(embedding.to(x.device, x.dtype), batch)
    if mask is not None:
        mask = mask.to(x.device, x.dtype).reshape(-1, 1, *mask.shape[-2:])
        if mask.shape[-2:] != (height, width):
            mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        weight = _to_batch(mask, batch)[:, :, rows, cols] * (
            strength * float(options.get("mask_strength", 1.0))
        )
    elif area is None:
        weight = strength
    else:
        hh, ww = rows.stop - rows.start, cols.stop - cols.start
        wy = _feather(hh, top != 0, top + h < height, feather)
        wx = _feather(ww, left != 0, left + w < width, feather)
        weight = (strength * wy[:, None] * wx[None, :]).to(x.device, x.dtype).expand(1, 1, hh, ww)
    return _Job(side, context, y, rows, cols, weight)


def _batches(jobs: list[_Job]) -> list[list[_Job]]:
    """Group jobs that can share one model call: same area size, same kind of `y`, and context
    lengths whose least common multiple stays within MAX_CONTEXT_REPEAT of the shortest."""
    groups: list[list[_Job]] = []
    for job in jobs:
        for group in groups:
            first = group[0]
            lengths = [j.context.shape[1] for j in group] + [job.context.shape[1]]
            if (
                (first.rows.stop - first.rows.start, first.cols.stop - first.cols.start)
                == (job.rows.stop - job.rows.start, job.cols.stop - job.cols.start)
                and (first.y is None) == (job.y is None)
                and (job.y is None or first.y.shape[1:] == job.y.shape[1:])
                and first.context.shape[2] == job.context.shape[2]
                and math.lcm(*lengths) <= MAX_CONTEXT_REPEAT * min(lengths)
            ):
                group.append(job)
                break
        else:
            groups.append([job])
    return groups


class CFGGuider:
    """The guided denoiser `model(x, sigma) -> x0` that samplers call:
    `uncond + cfg * (cond - uncond)`, with the unconditional pass skipped when cfg == 1."""

    def __init__(
        self, denoiser: Denoiser, positive: CondList, negative: CondList, cfg: float, feather: int = 8
    ) -> None:
        if not positive:
            raise ValueError("positive conditioning is empty")
        self.denoiser = denoiser
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self.feather = feather

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        use_uncond = not math.isclose(self.cfg, 1.0) and bool(self.negative)
        sides = [self.positive, self.negative] if use_uncond else [self.positive]
        jobs = [
            _job(side, emb, opts, x, self.feather) for side, conds in enumerate(sides) for emb, opts in conds
        ]
        preds = self._predict(x, sigma, jobs, len(sides))
        if not use_uncond:
            return preds[0]
        return preds[1] + self.cfg * (preds[0] - preds[1])

    def _predict(self, x: Tensor, sigma: Tensor, jobs: list[_Job], n_sides: int) -> list[Tensor]:
        outputs: list[tuple[_Job, Tensor]] = []
        for group in _batches(jobs):
            length = math.lcm(*(j.context.shape[1] for j in group))
            context = torch.cat([j.context.repeat(1, length // j.context.shape[1], 1) for j in group])
            y = None if group[0].y is None else torch.cat([j.y for j in group])
            x_in = torch.cat([x[:, :, j.rows, j.cols] for j in group])
            x0 = self.denoiser(x_in, sigma.repeat(len(group)), Conditioning(context, y))
            outputs += zip(group, x0.chunk(len(group)), strict=True)
        preds = []
        for side in range(n_sides):
            mine = [(j, out) for j, out in outputs if j.side == side]
            if len(mine) == 1 and isinstance(mine[0][0].weight, float) and mine[0][1].shape == x.shape:
                preds.append(mine[0][1])  # one whole-image entry: its weight cancels out
                continue
            total = torch.zeros_like(x)
            counts = torch.full_like(x, 1e-37)
            for job, out in mine:
                total[:, :, job.rows, job.cols] += out * job.weight
                counts[:, :, job.rows, job.cols] += job.weight
            preds.append(total / counts)
        return preds
