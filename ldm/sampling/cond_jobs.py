"""How a CONDITIONING list becomes model calls (see `ldm.sampling.guidance` for the options an entry holds): each
entry's job over its area (mask weights with their feather, concat channels, hooks, GLIGEN grounding), the pairing
of area jobs across the two sides, and the batching of compatible jobs into one UNet call."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.flux_variants import References

# Embeddings of different lengths share a call, repeated to their least common multiple, up to this many times the
# shorter one.
MAX_CONTEXT_REPEAT = 4
# Conditioning options that are more of the model's own inputs, by the keyword its forward takes them by: HiDream's
# Llama hidden states [B, layers, L, D] beside the T5 states in the context; Stable Audio's seconds [B]
# (ConditioningStableAudio's, ldm.stable_audio_files); ACE-Step 1.5's lyrics embeddings, audio codes and timbre
# reference (ldm.ace_step15_files); Qwen-Image 2.1's image slots, where each picture's pads were in the prompt
# (ldm.qwen_image21_files); LTX-2's audio context and its keyframe guides' per-token guide numbers and weights
# (nodes.sd.ltx2.ltx2_conditioning), and its reference audio tokens (LTXVReferenceAudio's).
MODEL_INPUTS = {"conditioning_llama3": "llama", "seconds_start": "seconds_start", "seconds_total": "seconds_total",
                "conditioning_lyrics": "lyric_embed", "audio_codes": "audio_codes",
                "reference_audio_timbre_latents": "refer_audio", "image_slots": "image_slots",
                "ltx2_audio_context": "audio_context", "ltx2_guide_attention": "guide_attention",
                "ltx2_ref_audio": "ref_audio",
                "conditioning_byt5small": "byt5", "byt5_attention_mask": "byt5_mask"}
# Those of them that are prompt encodings, which ConditioningZeroOut zeroes with the prompt (not the seconds, nor
# ACE-Step's audio codes: ComfyUI's node zeroes the lyrics alone).
PROMPT_INPUTS = ("conditioning_llama3", "conditioning_lyrics")


@dataclass
class Job:
    """One entry's model input over its area, and its weight in the blend of its side."""

    side: int  # 0 = positive, 1 = negative
    context: Tensor
    y: Tensor | None
    rows: slice
    cols: slice
    weight: Tensor | float  # [B or 1, 1, h, w], or a scalar for a whole-image entry
    control: Any = None  # ldm.controlnet.Control
    area: bool = False  # the entry names an area (or its mask's bounds)
    source: tuple[int, int] = (0, 0)  # (side, index) of the entry whose timestep range this job follows
    concat: Tensor | None = None  # inpainting models' extra input channels, over the job's area
    hooks: Any = None  # ldm.sampling.hooks.Hooks: the LoRAs this job's UNet runs with
    gligen: Any = None  # the entry's ("position", ldm.gligen.Gligen, phrases)
    ref_latents: References | None = None  # Flux Kontext's reference latents, at the latent's batch, never cropped
    attn_mask: Tensor | None = None  # Apply Style Model's attn_bias: Flux's attention bias (ldm.flux.joint_bias)
    frames: slice | None = None  # a video latent's frames (its 3rd axis), None for an image latent
    inputs: dict[str, Tensor] | None = None  # MODEL_INPUTS' tensors by keyword, at the latent's batch
    control_context: Tensor | None = None  # CLIPTextEncodeControlnet's prompt, for the ControlNets alone

    @property
    def region(self) -> tuple:
        """The index of the job's box in a latent or prediction: `x[job.region]`."""
        return (..., self.rows, self.cols) if self.frames is None else (..., self.frames, self.rows, self.cols)

    def shape(self) -> tuple[int, ...]:
        """The box's size: (frames,) rows, columns."""
        spans = (self.rows, self.cols) if self.frames is None else (self.frames, self.rows, self.cols)
        return tuple(s.stop - s.start for s in spans)

    def spans_frames_and_rows(self, x: Tensor) -> bool:
        """Whether the box holds every frame and row of `x` (so that only its columns may be cut away)."""
        return self.shape()[:-1] == tuple(x.shape[2:-1])


def to_batch(t: Tensor, batch: int) -> Tensor:
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"conditioning batch {t.shape[0]} does not divide the latent batch {batch}")
    return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))


def feather_ramp(length: int, start_inside: bool, end_inside: bool, rr: int) -> Tensor:
    """Per-row (or column) weights ramping up over `rr` pixels from each edge inside the image (ComfyUI's area
    feather, also LatentComposite's)."""
    ramp = torch.ones(length)
    for t in range(min(rr, length) if rr else 0):
        if start_inside:
            ramp[t] *= (t + 1) / rr
        if end_inside:
            ramp[length - 1 - t] *= (t + 1) / rr
    return ramp


def resized_mask(mask: Tensor, x: Tensor) -> Tensor:
    mask = mask.to(x.device, x.dtype).reshape(-1, 1, *mask.shape[-2:])
    if mask.shape[-2:] != x.shape[-2:]:
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return mask


def resized_concat(concat: Tensor, x: Tensor) -> Tensor:
    """An inpainting model's extra channels at `x`'s size: a sampler that resizes the latent as it goes
    (lcm_upscale) takes them along, bilinearly, as ComfyUI resizes them to a latent of another size."""
    if concat.shape[-2:] == x.shape[-2:]:
        return concat
    return F.interpolate(concat, size=x.shape[-2:], mode="bilinear", align_corners=False)


def mask_bounds(mask: Tensor) -> tuple[int, int, int, int]:
    """The (h, w, y, x) box around a resized mask's nonzero pixels (over the batch), 8 or more a side."""
    rows, cols = torch.nonzero(mask.abs().amax(dim=(0, 1)) > 0, as_tuple=True)
    if not len(rows):
        return 8, 8, 0, 0  # an empty mask weighs nothing anywhere: the smallest area does
    top, left = int(rows.min()), int(cols.min())
    return max(8, int(rows.max()) + 1 - top), max(8, int(cols.max()) + 1 - left), top, left


def frame_span(area: tuple | None, x: Tensor) -> tuple[int, int]:
    """The (count, first) frames of a video latent an area covers: all of them unless the area is a video one
    (ConditioningSetAreaPercentageVideo's ("percentage", temporal, height, width, z, y, x)); an image latent is
    one frame."""
    frames = x.shape[2] if x.ndim == 5 else 1
    if area is None or len(area) != 7:
        return frames, 0
    return max(1, round(area[1] * frames)), round(area[4] * frames)


def entry_job(side: int, embedding: Tensor, options: dict, x: Tensor, feather: int,
         concat: Tensor | None = None) -> Job | None:
    batch, height, width = x.shape[0], *x.shape[-2:]  # a video latent [B, C, T, H, W] has its frames between
    area = options.get("area")
    count, first = frame_span(area, x)
    if first >= (x.shape[2] if x.ndim == 5 else 1):
        return None  # a video area after the latent's last frame
    if area is not None and len(area) == 7:
        area = (area[0], *area[2:4], *area[5:7])  # its box within each of its frames
    mask = options.get("mask")
    if mask is not None:
        mask = resized_mask(mask, x)
        if options.get("set_area_to_bounds"):
            area = mask_bounds(mask)
    if area is None:
        h, w, top, left = height, width, 0, 0
    elif area[0] == "percentage":
        h, w = max(1, round(area[1] * height)), max(1, round(area[2] * width))
        top, left = round(area[3] * height), round(area[4] * width)
    else:
        h, w, top, left = (int(v) for v in area)
    rows, cols = slice(top, min(top + h, height)), slice(left, min(left + w, width))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return None  # an area wholly outside this latent (a prompt set for a larger image) adds nothing here
    strength = float(options.get("strength", 1.0))
    y = options.get("y")
    y = None if y is None else to_batch(y.to(x.device, x.dtype), batch)
    context = to_batch(embedding.to(x.device, x.dtype), batch)
    if mask is not None:
        mask = mask[:batch] if mask.shape[0] > batch else mask  # more masks than latents: the first ones (ComfyUI)
        weight = to_batch(mask, batch)[:, :, rows, cols] * (
            strength * float(options.get("mask_strength", 1.0))
        )
    elif area is None:
        weight = strength
    else:
        hh, ww = rows.stop - rows.start, cols.stop - cols.start
        wy = feather_ramp(hh, top != 0, top + h < height, feather)
        wx = feather_ramp(ww, left != 0, left + w < width, feather)
        weight = (strength * wy[:, None] * wx[None, :]).to(x.device, x.dtype).expand(1, 1, hh, ww)
    frames = None
    if x.ndim == 5:
        frames = slice(first, min(first + count, x.shape[2]))
    if x.ndim == 5 and isinstance(weight, Tensor):
        weight = weight.unsqueeze(2)  # one weight per pixel of every frame of a video latent
        length = frames.stop - frames.start
        if mask is None and length < x.shape[2]:
            # A video area also fades in and out over its first and last frames, over a quarter of its length
            # at most (up to the feather), as ComfyUI feathers each axis of a multi-dimensional area.
            ramp = feather_ramp(length, first != 0, frames.stop < x.shape[2], min(feather, length // 4))
            weight = weight * ramp.to(weight).reshape(1, 1, -1, 1, 1)
    concat = options.get("concat", concat)
    if concat is not None:
        concat = to_batch(resized_concat(concat.to(x.device, x.dtype), x), batch)
        concat = concat[..., rows, cols] if frames is None or concat.ndim == 4 else concat[..., frames, rows, cols]
    refs = options.get("ref_latents")
    if refs is not None:
        refs = References(tuple(to_batch(r.to(x.device, x.dtype), batch) for r in refs.latents), refs.method)
    attn_mask = options.get("attention_mask")
    attn_mask = None if attn_mask is None else to_batch(attn_mask.to(x.device), batch)
    inputs = {keyword: to_batch(options[key].to(x.device), batch) for key, keyword in MODEL_INPUTS.items()
              if options.get(key) is not None}
    control_context = options.get("cross_attn_controlnet")
    if control_context is not None:
        control_context = to_batch(control_context.to(x.device, x.dtype), batch)
    return Job(side, context, y, rows, cols, weight, options.get("control"), area is not None, concat=concat,
                hooks=options.get("hooks"), gligen=options.get("gligen"), ref_latents=refs, attn_mask=attn_mask,
                frames=frames, inputs=inputs or None, control_context=control_context)


def pair_areas(jobs: list[Job]) -> list[Job]:
    """ComfyUI's rule for area prompts under CFG: an area entry on one side with no entry of exactly its area
    on the other gets one there, predicted with the prompt of the other side's smallest entry enclosing it
    (a whole-image entry if no area entry encloses it), and with the area entry's own area, weight, control
    and timestep range. Without it, an area's guidance would compare against the whole-image prediction."""
    out = list(jobs)
    for side in (0, 1):
        for job in [j for j in out if j.side == side and j.area]:
            smallest = None
            for other in (j for j in out if j.side == 1 - side):
                if not other.area:
                    smallest = smallest or other
                elif (encloses(other, job)
                      and (smallest is None or not smallest.area or job_size(other) < job_size(smallest))):
                    smallest = other
            if smallest is None or (smallest.area and smallest.region == job.region):
                continue
            # The other side's prompt (all it carries to the model) over this entry's area, weight and control.
            out.append(replace(smallest, side=1 - side, rows=job.rows, cols=job.cols, weight=job.weight,
                               control=job.control, area=True, source=job.source, concat=job.concat,
                               frames=job.frames))
    return out


def encloses(outer: Job, inner: Job) -> bool:
    spans = [(outer.rows, inner.rows), (outer.cols, inner.cols)]
    if outer.frames is not None and inner.frames is not None:
        spans.append((outer.frames, inner.frames))
    return all(o.start <= i.start and o.stop >= i.stop for o, i in spans)


def job_size(job: Job) -> int:
    return math.prod(job.shape())


def batches_of(jobs: list[Job]) -> list[list[Job]]:
    """Group jobs that can share one model call: same area size, same kind of `y`, and context
    lengths whose least common multiple stays within MAX_CONTEXT_REPEAT of the shortest."""
    groups: list[list[Job]] = []
    for job in jobs:
        for group in groups:
            first = group[0]
            lengths = [j.context.shape[1] for j in group] + [job.context.shape[1]]
            if (
                first.shape() == job.shape()
                and (first.y is None) == (job.y is None)
                and (job.y is None or first.y.shape[1:] == job.y.shape[1:])
                and first.context.shape[2] == job.context.shape[2]
                and first.control is job.control
                and first.hooks == job.hooks
                and first.gligen is job.gligen
                and (first.concat is None) == (job.concat is None)
                and (job.ref_latents is None if first.ref_latents is None
                     else first.ref_latents.compatible(job.ref_latents))
                # masks fit their prompt's length: a call takes them all or none, at one length (no repeats)
                and (job.attn_mask is None if first.attn_mask is None
                     else job.attn_mask is not None and job.attn_mask.shape[1:] == first.attn_mask.shape[1:])
                and _same_input_shapes(first.inputs, job.inputs)
                and (job.control_context is None if first.control_context is None
                     else job.control_context is not None
                     and job.control_context.shape[1:] == first.control_context.shape[1:])
                and math.lcm(*lengths) <= MAX_CONTEXT_REPEAT * min(lengths)
            ):
                group.append(job)
                break
        else:
            groups.append([job])
    return groups


def batched_references(group: list[Job]) -> References | None:
    """The reference latents of one batched call (`batches_of` groups only jobs whose references match)."""
    return None if group[0].ref_latents is None else References.batched([j.ref_latents for j in group])


def _same_input_shapes(a: dict[str, Tensor] | None, b: dict[str, Tensor] | None) -> bool:
    """Whether two jobs' model inputs can be concatenated into one call: the same keywords, each of one shape."""
    return (a or {}).keys() == (b or {}).keys() and all(a[k].shape[1:] == b[k].shape[1:] for k in (a or {}))


def batched_inputs(group: list[Job]) -> dict[str, Tensor] | None:
    """The model inputs of one batched call (`batches_of` groups only jobs whose inputs concatenate)."""
    first = group[0].inputs
    return None if not first else {k: torch.cat([j.inputs[k] for j in group]) for k in first}


def batched_attention_masks(group: list[Job]) -> Tensor | None:
    """The attention masks of one batched call (`batches_of` groups only jobs with masks of one shape, or none)."""
    return None if group[0].attn_mask is None else torch.cat([j.attn_mask for j in group])
