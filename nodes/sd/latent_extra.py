"""ComfyUI's smaller latent, batch and conditioning helpers: batching any number of latents or masks, joining latents
along width, height or frames, writing frames into a video latent, freezing a latent (LTX-Video), and scaling a
conditioning.

BatchLatentsNode and BatchMasksNode take ComfyUI's autogrow input, declared as BatchImagesNode's is (see
nodes/sd/utility_nodes.py): `latents.latent0` .. `latents.latent49` and `masks.mask0` .. `masks.mask49`, the first
required.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ldm.sampling.av_latent import is_av
from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION, as_mask_batch, repeat_to_batch, upscale_latent
from nodes.sd.utility_nodes import autogrow_sockets, in_slot_order, unknown_links
from nodes.spec import Combo, Float, Int, Output, Socket

log = logging.getLogger(__name__)


def _resize_planes(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, C, H, W], or every frame of [B, C, T, H, W], resized to height x width (bilinear, centre crop), as
    ComfyUI's common_upscale does."""
    if x.ndim == 5:
        batch, channels, frames = x.shape[:3]
        planes = x.movedim(2, 1).reshape(batch * frames, channels, *x.shape[-2:])
        planes = upscale_latent(planes, width, height, "bilinear", "center")
        return planes.reshape(batch, frames, channels, height, width).movedim(1, 2)
    return upscale_latent(x, width, height, "bilinear", "center")


# --- Batching -------------------------------------------------------------------------------------------------


def batch_latents(latents: list[dict]) -> dict:
    """One LATENT of several, in order: the first one's keys (its noise mask, ...), every batch resized (bilinear,
    centre crop) to the first's height and width, and the batch indices of all (each one's own, else 0, 1, ...)."""
    first = latents[0]["samples"]
    batched, indices = [], []
    for number, latent in enumerate(latents):
        if is_av(latent):
            raise ValueError(f"BatchLatentsNode: latent {number} is a joined audio-video latent; batch the video "
                             "and the audio latents apart (LTXVSeparateAVLatent), then join them again")
        samples = latent["samples"]
        same_kind = samples.ndim == first.ndim and samples.shape[1] == first.shape[1]
        if not same_kind or (samples.ndim == 5 and samples.shape[2] != first.shape[2]):
            raise ValueError(f"BatchLatentsNode: latent {number} has shape {tuple(samples.shape)} and latent 0 "
                             f"{tuple(first.shape)}; batch latents of one model family (the same channels, and the "
                             "same frames for videos)")
        if samples.shape[1:] != first.shape[1:]:
            if samples.ndim not in (4, 5):
                raise ValueError(f"BatchLatentsNode: latent {number} has shape {tuple(samples.shape)} and latent 0 "
                                 f"{tuple(first.shape)}; only image and video latents are resized to match")
            samples = _resize_planes(samples, first.shape[-1], first.shape[-2])
        batched.append(samples.to(first))
        indices.extend(latent.get("batch_index", range(samples.shape[0])))
    return {**latents[0], "samples": torch.cat(batched), "batch_index": list(indices)}


def batch_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """One MASK batch of several, in order, each resized (bilinear, centre crop) to the first one's size."""
    for number, mask in enumerate(masks):
        if mask.ndim not in (2, 3):
            raise ValueError(f"BatchMasksNode: mask {number} has shape {tuple(mask.shape)}; a MASK is [batch, "
                             "height, width] (or one [height, width])")
    masks = [as_mask_batch(mask) for mask in masks]
    first = masks[0]
    height, width = first.shape[-2:]
    batched = []
    for mask in masks:
        if mask.shape[-2:] != (height, width):
            mask = upscale_latent(mask[:, None], width, height, "bilinear", "center")[:, 0]
        batched.append(mask.to(first))
    return torch.cat(batched)


class BatchLatentsNode(Node):
    """Joins up to fifty latent batches into one, in slot order; each is resized (bilinear, centre crop) to the
    first one's size, and their batch indices go with them (those of a latent without any: 0, 1, ...)."""

    display_name = "Batch Latents"
    category = "model/latent/batch"
    inputs = autogrow_sockets("latents", "latent", "LATENT", required=1)
    outputs = (Output("LATENT"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return unknown_links(cls, linked)

    def execute(self, **latents: dict) -> tuple[dict]:
        return (batch_latents(in_slot_order(latents)),)


class BatchMasksNode(Node):
    """Joins up to fifty mask batches into one, in slot order; each is resized (bilinear, centre crop) to the first
    one's size."""

    display_name = "Batch Masks"
    category = "image/mask"
    inputs = autogrow_sockets("masks", "mask", "MASK", required=1)
    outputs = (Output("MASK"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return unknown_links(cls, linked)

    def execute(self, **masks: torch.Tensor) -> tuple[torch.Tensor]:
        return (batch_masks(in_slot_order(masks)),)


# --- Joining and replacing frames -----------------------------------------------------------------------------


CONCAT_AXES = {"x": -1, "y": -2, "t": -3}  # width, height, frames of [B, C, (T,) H, W]


def _sizes_but(x: torch.Tensor, axis: int) -> list[int]:
    """The shape of `x` without its batch and `axis` (set to 0)."""
    sizes = list(x.shape)
    sizes[0] = sizes[axis] = 0
    return sizes


class LatentConcat(Node):
    """Joins samples2 to samples1 along the width (x), height (y) or frames (t): after it, or before it with a
    leading minus. samples2's batch is cycled or cut to samples1's; samples1's other keys are kept."""

    category = "model/latent/advanced"
    samples1 = Socket("LATENT")
    samples2 = Socket("LATENT")
    dim = Combo(["x", "-x", "y", "-y", "t", "-t"], tooltip="x: width, y: height, t: frames of a video latent; a "
                "minus puts samples2 first")
    outputs = (Output("LATENT"),)

    def execute(self, samples1: dict, samples2: dict, dim: str) -> tuple[dict]:
        first, second = samples1["samples"], samples2["samples"]
        axis = CONCAT_AXES[dim.removeprefix("-")]
        if dim.endswith("t") and first.ndim != 5:
            # ComfyUI would join the channels of an image latent here, which no model can take.
            raise ValueError(f"LatentConcat: dim {dim!r} joins the frames of video latents [batch, channels, frames, "
                             f"height, width]; samples1 has shape {tuple(first.shape)}")
        if second.ndim != first.ndim or _sizes_but(first, axis) != _sizes_but(second, axis):
            raise ValueError(f"LatentConcat: samples1 has shape {tuple(first.shape)} and samples2 "
                             f"{tuple(second.shape)}; along {dim!r} all their other sizes but the batch must agree "
                             "(resize one first)")
        second = repeat_to_batch(second.to(first), first.shape[0])
        pair = (second, first) if dim.startswith("-") else (first, second)
        return ({**samples1, "samples": torch.cat(pair, dim=axis)},)


class ReplaceVideoLatentFrames(Node):
    """Writes source's frames into destination from frame `index` on (negative: counted from the end). The result
    carries source's other keys (its noise mask, batch index), as ComfyUI's node does. Without a source destination
    passes through unchanged; so it does, with a warning, when the source's frames do not fit there (an index before
    the first frame, where ComfyUI's slicing would wrap around or fail, included)."""

    display_name = "Replace Video Latent Frames"
    category = "model/latent/batch"
    destination = Socket("LATENT", tooltip="the latent whose frames are replaced")
    source = Socket("LATENT", optional=True, tooltip="the frames to write; without it, destination passes through")
    index = Int(0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1,
                tooltip="the destination's frame the source's first frame goes to; negative counts from the end")
    outputs = (Output("LATENT"),)

    def execute(self, destination: dict, index: int, source: dict | None = None) -> tuple[dict]:
        if source is None:
            return (destination,)
        target, frames = destination["samples"], source["samples"]
        if target.ndim < 3 or frames.ndim != target.ndim or frames.shape[1] != target.shape[1] \
                or frames.shape[3:] != target.shape[3:] or frames.shape[0] not in (1, target.shape[0]):
            raise ValueError(f"ReplaceVideoLatentFrames: source has shape {tuple(frames.shape)} and destination "
                             f"{tuple(target.shape)}; the source needs the destination's channels and sizes after the "
                             "frames (height, width), and one batch item or as many")
        length = target.shape[2]
        start = index + length if index < 0 else index
        if start < 0 or start > length:
            log.warning("ReplaceVideoLatentFrames: index %d is out of bounds for a destination of %d frames", index,
                        length)
            return (destination,)
        if start + frames.shape[2] > length:
            log.warning("ReplaceVideoLatentFrames: the source's %d frames do not fit in the destination's %d from "
                        "frame %d", frames.shape[2], length, start)
            return (destination,)
        replaced = target.clone()
        replaced[:, :, start:start + frames.shape[2]] = frames.to(replaced)
        return ({**source, "samples": replaced},)


class LTXVFreezeLatent(Node):
    """Gives a video latent [B, C, T, H, W] or an audio latent [B, C, T, F] a noise mask of zeros, so the sampler
    keeps it as it is (e.g. a soundtrack that LTX-2 only attends to once joined to a video)."""

    display_name = "LTXV Freeze Latent"
    category = "model/latent/ltxv"
    latent = Socket("LATENT", tooltip="a video latent (5D) or an audio latent (4D) to keep as it is")
    outputs = (Output("LATENT", "latent"),)

    def execute(self, latent: dict) -> tuple[dict]:
        if is_av(latent):
            raise ValueError("LTXVFreezeLatent takes a video or an audio latent, not a joined audio-video one; "
                             "part it with LTXVSeparateAVLatent first")
        samples = latent["samples"]
        if samples.ndim not in (4, 5):
            raise ValueError(f"LTXVFreezeLatent takes a video latent [B, C, T, H, W] or an audio latent "
                             f"[B, C, T, F]; got shape {tuple(samples.shape)}")
        # One mask value per frame, spread over the rest when the sampler sizes the mask to the latent.
        shape = (samples.shape[0], 1, samples.shape[2], *([1] * (samples.ndim - 3)))
        return ({**latent, "noise_mask": torch.zeros(shape, dtype=torch.float32, device=samples.device)},)


# --- Conditioning ---------------------------------------------------------------------------------------------


class ConditioningMultiply(Node):
    """Multiplies every prompt's embedding, and its pooled output if it has one, by `multiplier`."""

    display_name = "Conditioning (Multiply)"
    category = "model/conditioning/transform"
    conditioning = Socket("CONDITIONING")
    multiplier = Float(1.0, min=-100.0, max=100.0, step=0.01)
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, multiplier: float) -> tuple[list]:
        scaled = []
        for embedding, options in conditioning:
            options = dict(options)
            if options.get("pooled_output") is not None:
                options["pooled_output"] = options["pooled_output"] * multiplier
            scaled.append((embedding * multiplier, options))
        return (scaled,)


NODES = [BatchLatentsNode, BatchMasksNode, LatentConcat, ReplaceVideoLatentFrames, LTXVFreezeLatent,
         ConditioningMultiply]
