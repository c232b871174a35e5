"""Audio-video latents (LTX-2): a video latent and an audio latent sampled together, as one.

An LTX-2 LATENT holds its video part as `samples` [B, 128, F, h, w] and its audio part as `audio_samples`
[B, 8, T, 16] (LTXVConcatAVLatent), each with its own noise mask (`noise_mask`, `audio_noise_mask`), where ComfyUI
holds a NestedTensor of the two. The sampler packs them as ComfyUI's `pack_latents` does, every item's parts
flattened one after the other into one tensor [B, 1, Nv + Na], so that every sampling algorithm steps both as it
steps any latent; the model's wrapper (`PackedParts`) gives the model the parts back. The initial noise is drawn
part by part from one seeded generator, the video's first (ComfyUI's `prepare_noise` of a nested latent); a
sampler's own step noise is drawn over the packed tensor, as ComfyUI draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

AUDIO_SAMPLES, AUDIO_MASK = "audio_samples", "audio_noise_mask"
Shapes = tuple[tuple[int, ...], ...]  # each part's shape without the batch


def is_av(latent: dict) -> bool:
    return latent.get(AUDIO_SAMPLES) is not None


def parts_of(latent: dict) -> list[Tensor]:
    return [latent["samples"], latent[AUDIO_SAMPLES]]


def shapes_of(parts: Sequence[Tensor]) -> Shapes:
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"the video and audio latents' batches differ ({', '.join(str(p.shape[0]) for p in parts)})"
                         ": make both with the same batch size")
    return tuple(tuple(p.shape[1:]) for p in parts)


def pack(parts: Sequence[Tensor]) -> Tensor:
    """[B, 1, N1 + N2 + ...]: each item's parts flattened, one after the other."""
    return torch.cat([p.reshape(p.shape[0], 1, -1) for p in parts], dim=-1)


def unpack(x: Tensor, shapes: Shapes) -> list[Tensor]:
    sizes = [math.prod(shape) for shape in shapes]
    return [part.reshape(x.shape[0], *shape) for part, shape in zip(x.split(sizes, dim=-1), shapes, strict=True)]


def packed_mask(latent: dict) -> Tensor | None:
    """The parts' noise masks at their latents' full size (1 where a part has none), packed; None without masks."""
    from ldm.sampling.ksampler import latent_mask

    masks = (latent.get("noise_mask"), latent.get(AUDIO_MASK))
    if all(m is None for m in masks):
        return None
    return pack([torch.ones_like(part) if m is None else latent_mask(m, part).expand_as(part)  # a picture's mask:
                 for part, m in zip(parts_of(latent), masks, strict=True)])               # every frame's


class PackedParts:
    """A model of several latents (`unet(parts, timesteps, context, denoise_masks=..., **kwargs) -> parts`) called
    as the sampler calls any model, on packed latents. With a packed noise mask (a family whose model takes the mask
    as per-token noise levels, `ksampler.sample(clean_kept=True)`) every call also passes each part's mask."""

    def __init__(self, unet: Callable[..., Sequence[Tensor]], shapes: Shapes, mask: Tensor | None = None) -> None:
        self.unet, self.shapes, self.mask = unet, shapes, mask

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, **kwargs: Any) -> Tensor:
        masks = None
        if self.mask is not None:
            if (self.mask.device, self.mask.dtype) != (x.device, x.dtype):
                self.mask = self.mask.to(x.device, x.dtype)  # once per run
            mask = self.mask.repeat(x.shape[0] // self.mask.shape[0], 1, 1)  # the prompts' rows share it
            masks = unpack(mask, self.shapes)
        return pack(self.unet(unpack(x, self.shapes), timesteps, context, denoise_masks=masks, **kwargs))

    def over(self, unet: Callable[..., Sequence[Tensor]]) -> PackedParts:
        """The same packing around another model of the parts (a guidance pass's patched copy)."""
        return PackedParts(unet, self.shapes, self.mask)
