"""The hint of Alimama's inpainting ControlNets (FLUX.1-dev-Controlnet-Inpainting, SD3-Controlnet-Inpainting).

Such a ControlNet sees the picture with the part to repaint blacked out, VAE-encoded as its other ControlNets'
hints are (`ldm.controlnet_flux.encode_hint`, `ldm.controlnet_sd3.encode_hint`), and one more channel after the
latent's: the mask of what to keep (1 - the inpainting mask) at the latent's size. Its hint embedding is that much
wider: Flux's `controlnet_x_embedder` takes (16 + 1) x 2 x 2 = 68 values a token instead of 64, SD3's
`pos_embed_input` 17 channels instead of 16 (`mask_channels`). As in ComfyUI, the picture is blacked out where the
keep mask, resized bilinearly to the picture, rounds to 0, and the keep mask goes to the latent's size as the hint
does (centre crop, nearest-exact), unrounded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.controlnet import prepare_hint


def _batched(image: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    if image.shape[0] != keep.shape[0] and 1 not in (image.shape[0], keep.shape[0]):
        raise ValueError(f"the inpainting ControlNet's picture has a batch of {image.shape[0]} and its mask of "
                         f"{keep.shape[0]}: give one mask, or one per picture")
    batch = max(image.shape[0], keep.shape[0])
    return image.expand(batch, *image.shape[1:]), keep.expand(batch, *keep.shape[1:])


def masked_picture(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(the picture [B, C, H, W] in 0..1 blacked out where `mask` [B, h, w] (1: repaint) is at least half,
    the keep mask [B, 1, h, w], 1 - mask)."""
    keep = 1.0 - mask.reshape(-1, 1, *mask.shape[-2:]).float()
    image, keep = _batched(image.float(), keep)
    # round(0.5) is 0 in torch: a pixel masked by half is repainted, as in ComfyUI.
    at_picture = prepare_hint(keep, *image.shape[-2:], mode="bilinear").round()
    return image * at_picture, keep


def append_keep_mask(latents: Tensor, keep: Tensor) -> Tensor:
    """The hint latents [B, C, h, w] with the keep mask at their size as one more channel (cycled over the batch)."""
    mask = prepare_hint(keep.to(latents.device, latents.dtype), *latents.shape[-2:])
    mask = mask[torch.arange(latents.shape[0], device=mask.device) % mask.shape[0]]
    return torch.cat([latents, mask], dim=1)
