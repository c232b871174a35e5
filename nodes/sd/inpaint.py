"""Inpainting models (UNets with 9 input channels, such as sd-v1-5-inpainting): the mask and masked-image latent
they take beside the noisy latent, and ComfyUI's InpaintModelConditioning node that prepares them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nodes.node import Node
from nodes.sd.latent import repeat_to_batch
from nodes.sd.models import DiffusionModel, Vae
from nodes.sd.vae import _crop_to_multiple_of_8, encode
from nodes.spec import Boolean, Output, Socket

# SD's VAE latent (scaled) of a mid-grey image: the masked image an inpainting model sees where nothing is
# masked, as in ComfyUI (which uses these values for every family).
GREY_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def _fit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] resized (bilinear) to `like`'s height and width, its batch cut or cycled to `like`'s."""
    if t.shape[-2:] != like.shape[-2:]:
        t = F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return repeat_to_batch(t, like.shape[0])


def inpaint_concat(model: DiffusionModel, samples: torch.Tensor, mask: torch.Tensor | None,
                   masked_latent: torch.Tensor | None = None) -> torch.Tensor:
    """The extra input of an inpainting model for unscaled latents `samples` [B, C, h, w]: the mask (any
    resolution, rounded to 0/1 at the latent's) then the scaled latent of the masked image (`masked_latent`,
    else `samples` itself, as VAEEncodeForInpaint's greyed encoding is); without a mask, all-ones and a grey
    image. Returned in the model's latent space, [B, 1 + C, h, w]."""
    channels = samples.shape[1]
    expected = model.family.unet_config.in_channels
    if expected <= channels:
        raise ValueError(f"the latent has {channels} channels and {model.source} takes {expected}: the latent comes "
                         "from another model family's VAE")
    if expected != 2 * channels + 1:
        raise ValueError(f"{model.source} takes {expected} input channels; Loom runs inpainting models, which take "
                         f"{2 * channels + 1} (a {channels}-channel latent, a mask and a masked image), but no other "
                         "kind with extra channels")
    samples = samples.float()
    if mask is None:
        mask = torch.ones_like(samples[:, :1])
        image = torch.tensor(GREY_LATENT[:channels]).reshape(1, -1, 1, 1).expand_as(samples)
    else:
        mask = _fit(mask.float().reshape(-1, 1, *mask.shape[-2:]), samples).round()
        image = (samples if masked_latent is None else _fit(masked_latent.float(), samples))
        image = model.latent_in(image)
    return torch.cat([mask, image], dim=1)


def with_inpaint_concat(model: DiffusionModel, latent: dict, conditioning: list) -> list:
    """Entries given their own mask and masked image (InpaintModelConditioning's `concat_mask` and
    `concat_latent_image`) get the model input they make, as `concat`."""
    out = []
    for embedding, options in conditioning:
        if "concat_latent_image" in options or "concat_mask" in options:
            mask = options.get("concat_mask", latent.get("noise_mask"))
            options = {**options, "concat": inpaint_concat(model, latent["samples"], mask,
                                                           options.get("concat_latent_image"))}
        out.append((embedding, options))
    return out


class InpaintModelConditioning(Node):
    """For inpainting models: the prompts carry the mask and the latent of the image with the masked part greyed
    out; the latent is the whole image's, with the mask as its noise mask (unless noise_mask is off)."""

    category = "conditioning/inpaint"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    pixels = Socket("IMAGE")
    mask = Socket("MASK")
    noise_mask = Boolean(True, tooltip="Add a noise mask to the latent so sampling will only happen within the "
                                       "mask. Might improve results or completely break things depending on the "
                                       "model.")
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        from nodes.sd.edit_validation import with_edit_inputs  # checked against the model by the KSampler

        return with_edit_inputs(linked, ("positive", "negative"), concat="inpaint")

    def execute(self, positive: list, negative: list, vae: Vae, pixels: torch.Tensor, mask: torch.Tensor,
                noise_mask: bool = True) -> tuple[list, list, dict]:
        height, width = pixels.shape[1:3]
        mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
        mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
        pixels = _crop_to_multiple_of_8(pixels, getattr(vae.vae, "spatial_compression", 8))
        top, left = (height - pixels.shape[1]) // 2, (width - pixels.shape[2]) // 2
        mask = mask[:, :, top:top + pixels.shape[1], left:left + pixels.shape[2]]
        keep = (1 - mask.round()).movedim(1, -1)
        masked = encode(self, vae, (pixels[..., :3] - 0.5) * keep + 0.5)
        latent: dict[str, Any] = {"samples": encode(self, vae, pixels)}
        if noise_mask:
            latent["noise_mask"] = mask
        extra = {"concat_latent_image": masked, "concat_mask": mask}
        return ([(e, {**o, **extra}) for e, o in positive], [(e, {**o, **extra}) for e, o in negative], latent)


NODES: list[Any] = [InpaintModelConditioning]
