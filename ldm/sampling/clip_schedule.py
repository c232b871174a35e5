"""A scheduled CLIP (ComfyUI's SetClipHooks with schedule_clip): the text encoder runs once per range of the
hooks' keyframes, with each hook's clip strength times its keyframe's there, and each range's encoding acts in
that part of the run only (the guider reads the range from the entry's `clip_start_percent`/`clip_end_percent`).

The ranges follow ComfyUI's clip schedule: a hook's keyframe holds until the next keyframe that starts later
with another strength (of keyframes with one start, the last added), the last one to the end of the run;
before its first keyframe a hook runs at its full clip strength (multiplier 1; on the UNet the first keyframe
holds from the start instead), as does a hook without keyframes. The ranges of all hooks are cut at every
hook's bounds. Guarantee steps play no part: the ranges are fixed before sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from ldm.sampling.hooks import HookKeyframes, Hooks, patched_copy

T = TypeVar("T")


@dataclass(frozen=True)
class ClipRange:
    """A part of the run (0 = pure noise, 1 = the end) and each hook's clip strength in it."""

    start_percent: float
    end_percent: float
    strengths: tuple[float, ...]


def keyframe_spans(keyframes: HookKeyframes) -> list[tuple[float, float, float]]:
    """One hook's (start, end, multiplier) spans, in order; a hook without keyframes has one over the run."""
    if not keyframes.keyframes:
        return [(0.0, 1.0, 1.0)]
    spans = []
    current = keyframes.keyframes[0]
    for keyframe in keyframes.keyframes[1:]:
        if keyframe.start_percent == current.start_percent:
            current = keyframe  # the one added last of those starting together
        elif not math.isclose(keyframe.strength, current.strength):
            spans.append((current.start_percent, keyframe.start_percent, current.strength))
            current = keyframe
    if not math.isclose(current.start_percent, 1.0):
        spans.append((current.start_percent, 1.0, current.strength))
    return spans


def clip_ranges(hooks: Hooks) -> list[ClipRange]:
    """The ranges a scheduled CLIP encodes for, in order, with each hook's strength_clip times its multiplier
    there (1 where none of its spans reaches); none when every keyframe starts at the end of the run."""
    spans = [keyframe_spans(hook.keyframes) for hook in hooks.hooks]
    bounds = sorted({0.0, *(bound for hook_spans in spans for span in hook_spans for bound in span[:2])})
    ranges = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        strengths = tuple(hook.strength_clip * next((mult for a, b, mult in hook_spans if a < end and b > start), 1.0)
                          for hook, hook_spans in zip(hooks.hooks, spans, strict=True))
        ranges.append(ClipRange(start, end, strengths))
    return ranges


def encode_scheduled(encoder: nn.Module, hooks: Hooks, encode: Callable[[nn.Module], T]) -> list[tuple[ClipRange, T]]:
    """`encode(copy)` for each range, `copy` being `encoder` with the hooks applied at the range's strengths.
    The copies are made one at a time and dropped after use (`encoder` stays as it is); ranges with the same
    strengths share one encoding."""
    done: dict[tuple[float, ...], T] = {}
    out = []
    for clip_range in clip_ranges(hooks):
        if clip_range.strengths not in done:
            done[clip_range.strengths] = encode(patched_copy(encoder, zip(hooks.hooks, clip_range.strengths,
                                                                           strict=True), clip=True))
        out.append((clip_range, done[clip_range.strengths]))
    return out
