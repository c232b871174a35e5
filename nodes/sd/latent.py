"""Latent nodes: empty latents, upscaling, noise masks. LATENT is {"samples": [B, 4, H/8, W/8], "noise_mask"?}."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nodes.node import Node
from nodes.spec import Combo, Float, Int, Output, Socket

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
        return ({"samples": torch.zeros(batch_size, 4, height // 8, width // 8)},)


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
    """Crop [B, C, H, W] around its centre to the aspect ratio of width x height."""
    h, w = samples.shape[-2:]
    old_aspect, new_aspect = w / h, width / height
    if old_aspect > new_aspect:
        keep = round(h * new_aspect)
        return samples[..., (w - keep) // 2:(w - keep) // 2 + keep]
    if old_aspect < new_aspect:
        keep = round(w / new_aspect)
        return samples[..., (h - keep) // 2:(h - keep) // 2 + keep, :]
    return samples


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


NODES = [EmptyLatentImage, LatentUpscale, LatentUpscaleBy, SetLatentNoiseMask]
