"""Latent nodes: empty latents, upscaling, batches, compositing, transforms, noise masks.

LATENT is {"samples": [B, 4, H/8, W/8], "noise_mask"?, "batch_index"?: list[int]}.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ldm.sampling.av_latent import AUDIO_MASK, AUDIO_SAMPLES
from nodes.node import Node
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket

LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROP_METHODS = ["disabled", "center"]


class EmptyLatentImage(Node):
    """A batch of empty (zero) latents for text-to-image."""

    display_name = "Empty Latent Image"
    category = "latent"
    width = Int(512, min=16, max=16384, step=8)
    height = Int(512, min=16, max=16384, step=8)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        bad = [k for k in ("width", "height") if isinstance(inputs.get(k), int) and inputs[k] % 8]
        return f"{' and '.join(bad)} must be a multiple of 8" if bad else None

    def execute(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        # marked with its pixels per latent pixel, which the sampler refits for a model of another (ComfyUI's key)
        return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8), "downscale_ratio_spacial": 8},)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of channel vectors (dim 1), keeping the interpolated norm linear."""
    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    unit_a, unit_b = a / norm_a.clamp_min(1e-8), b / norm_b.clamp_min(1e-8)
    cos = (unit_a * unit_b).sum(dim=1, keepdim=True).clamp(-1 + 1e-6, 1 - 1e-6)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * unit_a + torch.sin(t * omega) * unit_b) / sin
    # Where the vectors are (almost) parallel, slerp degenerates to lerp.
    direction = torch.where(sin.abs() < 1e-4, unit_a * (1 - t) + unit_b * t, direction)
    return direction * (norm_a * (1 - t) + norm_b * t)


def _bislerp_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    old = x.shape[dim]
    position = (torch.arange(size, dtype=torch.float32) + 0.5) * old / size - 0.5
    position = position.clamp(0, old - 1)
    low = position.floor().long()
    high = (low + 1).clamp(max=old - 1)
    t = (position - low).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = size
    return slerp(x.index_select(dim, low), x.index_select(dim, high), t.view(shape))


def center_crop(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Crop [..., H, W] around its centre to the aspect ratio of width x height, as ComfyUI's common_upscale does:
    the same number of rows (or columns) off each side, half the excess rounded (Python's round, half to even)."""
    h, w = samples.shape[-2:]
    old_aspect, new_aspect = w / h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((w - w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((h - h * (old_aspect / new_aspect)) / 2)
    return samples[..., y:h - y, x:w - x]


def upscale_latent(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """Resize [B, C, h, w] to (height, width); `center` crops to the new aspect ratio first."""
    if crop == "center":
        samples = center_crop(samples, width, height)
    if method == "bislerp":
        return _bislerp_axis(_bislerp_axis(samples, height, 2), width, 3)
    kwargs = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(samples, size=(height, width), mode=method, **kwargs)


class LatentUpscale(Node):
    display_name = "Upscale Latent"
    category = "latent"
    samples = Socket("LATENT")
    upscale_method = Combo(LATENT_UPSCALE_METHODS)
    width = Int(512, min=0, max=16384, step=8)
    height = Int(512, min=0, max=16384, step=8)
    crop = Combo(CROP_METHODS)
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, upscale_method: str, width: int, height: int, crop: str) -> tuple[dict]:
        x = samples["samples"]
        if width == 0 and height == 0:
            return (samples,)
        h, w = x.shape[-2:]
        width = width or round(w * 8 * height / (h * 8))
        height = height or round(h * 8 * width / (w * 8))
        out = dict(samples, samples=upscale_latent(x, max(1, width // 8), max(1, height // 8), upscale_method, crop))
        out.pop("noise_mask", None)
        return (out,)


class LatentUpscaleBy(Node):
    display_name = "Upscale Latent By"
    category = "latent"
    samples = Socket("LATENT")
    upscale_method = Combo(LATENT_UPSCALE_METHODS)
    scale_by = Float(1.5, min=0.01, max=8.0, step=0.01)
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, upscale_method: str, scale_by: float) -> tuple[dict]:
        x = samples["samples"]
        h, w = x.shape[-2:]
        out = dict(samples, samples=upscale_latent(x, max(1, round(w * scale_by)), max(1, round(h * scale_by)),
                                                    upscale_method, "disabled"))
        out.pop("noise_mask", None)
        return (out,)


class SetLatentNoiseMask(Node):
    """Marks where the sampler may change the latent (mask 1) for inpainting."""

    display_name = "Set Latent Noise Mask"
    category = "latent/inpaint"
    samples = Socket("LATENT")
    mask = Socket("MASK")
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, mask: torch.Tensor) -> tuple[dict]:
        return (dict(samples, noise_mask=mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()),)


# ComfyUI's MAX_RESOLUTION, the upper bound of its size and position widgets.
MAX_RESOLUTION = 16384


def repeat_to_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Cut or cycle the batch (dim 0) of `x` to `size` items."""
    if x.shape[0] == size:
        return x
    if x.shape[0] > size:
        return x[:size]
    return x.repeat(math.ceil(size / x.shape[0]), *([1] * (x.ndim - 1)))[:size]


def as_mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """A MASK as [B, H, W] (a single [H, W] mask becomes a batch of one)."""
    if mask.ndim < 2:
        raise ValueError(f"a MASK needs at least 2 dimensions (height, width), got shape {tuple(mask.shape)}")
    return mask.reshape(-1, mask.shape[-2], mask.shape[-1])


def _same_channels(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: the latents have {a.shape[1]} and {b.shape[1]} channels; "
                         "they come from different model families and cannot be combined")


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None,
              multiplier: int, resize_source: bool) -> torch.Tensor:
    """Paste [B, C, h, w] `source` into `destination` (changed in place) with its top-left corner at pixel
    (x, y), i.e. element (x // multiplier, y // multiplier); `mask` (resized to the source) blends the two.
    The part of the source past the destination's edges is dropped."""
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = repeat_to_batch(source.to(destination), destination.shape[0])
    height, width = destination.shape[-2:]
    left, top = min(x, width * multiplier) // multiplier, min(y, height * multiplier) // multiplier
    visible_h, visible_w = min(source.shape[-2], height - top), min(source.shape[-1], width - left)
    if mask is None:
        weight = torch.ones_like(source[:, :1])
    else:
        weight = F.interpolate(as_mask_batch(mask).to(destination)[:, None], size=source.shape[-2:], mode="bilinear")
        weight = repeat_to_batch(weight, source.shape[0])
    weight = weight[..., :visible_h, :visible_w]
    region = destination[..., top:top + visible_h, left:left + visible_w]
    destination[..., top:top + visible_h, left:left + visible_w] = (
        weight * source[..., :visible_h, :visible_w] + (1 - weight) * region)
    return destination


# A LATENT's batched tensors and their noise masks: the samples, and an audio-video latent's audio part.
_BATCHED = (("samples", "noise_mask"), (AUDIO_SAMPLES, AUDIO_MASK))


class RepeatLatentBatch(Node):
    """Repeats a latent batch `amount` times (noise masks and batch indices follow)."""

    display_name = "Repeat Latent Batch"
    category = "latent/batch"
    samples = Socket("LATENT")
    amount = Int(1, min=1, max=64)
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, amount: int) -> tuple[dict]:
        out = dict(samples)
        for key, mask_key in _BATCHED:  # an audio-video latent's audio part (LTX-2's) goes with its video
            x, mask = samples.get(key), samples.get(mask_key)
            if x is None:
                continue
            out[key] = x.repeat(amount, *([1] * (x.ndim - 1)))
            if mask is not None and mask.shape[0] > 1:
                mask = repeat_to_batch(mask, x.shape[0]) if mask.shape[0] < x.shape[0] else mask
                out[mask_key] = mask.repeat(amount, *([1] * (mask.ndim - 1)))
        if "batch_index" in samples:
            indices = list(samples["batch_index"])
            offset = max(indices) - min(indices) + 1
            out["batch_index"] = indices + [i + n * offset for n in range(1, amount) for i in indices]
        return (out,)


class LatentFromBatch(Node):
    """Takes `length` latents from `batch_index` on; each keeps its batch index (and so its noise)."""

    display_name = "Latent From Batch"
    category = "latent/batch"
    samples = Socket("LATENT")
    batch_index = Int(0, min=0, max=63)
    length = Int(1, min=1, max=64)
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, batch_index: int, length: int) -> tuple[dict]:
        x = samples["samples"]
        start = min(x.shape[0] - 1, batch_index)  # past the end: the last one, as ComfyUI
        length = min(x.shape[0] - start, length)
        out = dict(samples)
        for key, mask_key in _BATCHED:  # an audio-video latent's audio part (LTX-2's) goes with its video
            part, mask = samples.get(key), samples.get(mask_key)
            if part is None:
                continue
            out[key] = part[start:start + length].clone()
            if mask is not None:
                out[mask_key] = (mask.clone() if mask.shape[0] == 1
                                 else repeat_to_batch(mask, x.shape[0])[start:start + length].clone())
        if "batch_index" in samples:
            out["batch_index"] = list(samples["batch_index"])[start:start + length]
        else:
            out["batch_index"] = list(range(start, start + length))
        return (out,)


class LatentBatch(Node):
    """Joins two latent batches; the second is resized to the first's size if they differ."""

    category = "latent/batch"
    samples1 = Socket("LATENT")
    samples2 = Socket("LATENT")
    outputs = (Output("LATENT"),)

    def execute(self, samples1: dict, samples2: dict) -> tuple[dict]:
        s1, s2 = samples1["samples"], samples2["samples"]
        _same_channels(s1, s2, "LatentBatch")
        if s1.shape[1:] != s2.shape[1:]:
            s2 = upscale_latent(s2, s1.shape[-1], s1.shape[-2], "bilinear", "center")
        indices = (samples1.get("batch_index", list(range(s1.shape[0])))
                   + samples2.get("batch_index", list(range(s2.shape[0]))))
        return (dict(samples1, samples=torch.cat((s1, s2.to(s1)), dim=0), batch_index=indices),)


class LatentComposite(Node):
    """Pastes `samples_from` into `samples_to` at pixel (x, y); `feather` fades the inner edges."""

    display_name = "Latent Composite"
    category = "latent"
    samples_to = Socket("LATENT")
    samples_from = Socket("LATENT")
    x = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    feather = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    outputs = (Output("LATENT"),)

    def execute(self, samples_to: dict, samples_from: dict, x: int, y: int, feather: int) -> tuple[dict]:
        x, y, feather = x // 8, y // 8, feather // 8
        dest = samples_to["samples"].clone()
        source = samples_from["samples"]
        _same_channels(dest, source, "LatentComposite")
        height, width = dest.shape[-2:]
        if x >= width or y >= height:  # entirely outside: nothing to paste
            return (dict(samples_to, samples=dest),)
        source = repeat_to_batch(source.to(dest), dest.shape[0])[..., :height - y, :width - x]
        sh, sw = source.shape[-2:]
        region = dest[..., y:y + sh, x:x + sw]
        if feather == 0:
            region.copy_(source)
        else:
            from ldm.sampling.cond_jobs import feather_ramp

            # Fade each edge that lies inside the destination over `feather` rows/columns, as ComfyUI.
            rows = feather_ramp(sh, y != 0, y + sh < height, feather).to(dest.dtype)
            cols = feather_ramp(sw, x != 0, x + sw < width, feather).to(dest.dtype)
            weight = (rows[:, None] * cols[None, :]).to(dest.device)
            region.copy_(source * weight + region * (1 - weight))
        return (dict(samples_to, samples=dest),)


class LatentCompositeMasked(Node):
    """Pastes `source` into `destination` at pixel (x, y), through `mask` when one is given."""

    category = "latent"
    destination = Socket("LATENT")
    source = Socket("LATENT")
    x = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    resize_source = Boolean(False)
    mask = Socket("MASK", optional=True)
    outputs = (Output("LATENT"),)

    def execute(self, destination: dict, source: dict, x: int, y: int, resize_source: bool,
                mask: torch.Tensor | None = None) -> tuple[dict]:
        dest = destination["samples"].clone()
        _same_channels(dest, source["samples"], "LatentCompositeMasked")
        out = composite(dest, source["samples"], x, y, mask, 8, resize_source)
        return (dict(destination, samples=out),)


class LatentBlend(Node):
    """samples1 * blend_factor + samples2 * (1 - blend_factor); samples2 is resized to fit."""

    display_name = "Latent Blend"
    category = "_for_testing"
    samples1 = Socket("LATENT")
    samples2 = Socket("LATENT")
    blend_factor = Float(0.5, min=0, max=1, step=0.01)
    outputs = (Output("LATENT"),)

    def execute(self, samples1: dict, samples2: dict, blend_factor: float) -> tuple[dict]:
        s1, s2 = samples1["samples"], samples2["samples"]
        _same_channels(s1, s2, "LatentBlend")
        if s1.shape[-2:] != s2.shape[-2:]:
            s2 = upscale_latent(s2, s1.shape[-1], s1.shape[-2], "bicubic", "center")
        s2 = repeat_to_batch(s2.to(s1), s1.shape[0])
        return (dict(samples1, samples=s1 * blend_factor + s2 * (1 - blend_factor)),)


class LatentFlip(Node):
    """Mirrors latents: x-axis flips top to bottom, y-axis left to right."""

    display_name = "Flip Latent"
    category = "latent/transform"
    samples = Socket("LATENT")
    flip_method = Combo(["x-axis: vertically", "y-axis: horizontally"])
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, flip_method: str) -> tuple[dict]:
        dim = -2 if flip_method.startswith("x") else -1
        return (dict(samples, samples=torch.flip(samples["samples"], dims=[dim])),)


class LatentRotate(Node):
    """Rotates latents clockwise by a quarter turn, a half or three quarters."""

    display_name = "Rotate Latent"
    category = "latent/transform"
    samples = Socket("LATENT")
    rotation = Combo(["none", "90 degrees", "180 degrees", "270 degrees"])
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, rotation: str) -> tuple[dict]:
        turns = {"90": 1, "180": 2, "270": 3}.get(rotation.split(" ")[0], 0)
        return (dict(samples, samples=torch.rot90(samples["samples"], k=turns, dims=[-1, -2])),)


class LatentCrop(Node):
    """Crops latents to width x height pixels from pixel (x, y)."""

    display_name = "Crop Latent"
    category = "latent/transform"
    samples = Socket("LATENT")
    width = Int(512, min=64, max=MAX_RESOLUTION, step=8)
    height = Int(512, min=64, max=MAX_RESOLUTION, step=8)
    x = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, width: int, height: int, x: int, y: int) -> tuple[dict]:
        s = samples["samples"]
        h, w = s.shape[-2:]
        # ComfyUI moves a start past the last 8 latent pixels back so that at least 64 px remain.
        x, y = max(0, min(x // 8, w - 8)), max(0, min(y // 8, h - 8))
        return (dict(samples, samples=s[..., y:y + height // 8, x:x + width // 8]),)


NODES = [EmptyLatentImage, LatentUpscale, LatentUpscaleBy, SetLatentNoiseMask, RepeatLatentBatch, LatentFromBatch,
         LatentBatch, LatentComposite, LatentCompositeMasked, LatentBlend, LatentFlip, LatentRotate, LatentCrop]
