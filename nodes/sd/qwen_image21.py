"""Qwen-Image 2.1's nodes under ComfyUI's names and inputs: TextEncodeQwenImage21 (the prompt, its negative, and up to
sixteen pictures to edit or take after) and QwenImage21Cache.

Qwen-Image 2.1 reads its prompt through Qwen3-VL-8B (CLIPLoader type qwen_image, `ldm.qwen3vl_text`): each picture
is seen by the vision tower at its pad tokens and, given the VAE, also encoded by the RGBA VAE (`ldm.qwen_image21_vae`)
into a reference latent that the transformer (`ldm.qwen_image21`) splices in where the picture's pads were. The
LATENT is [B, 64, H/16, W/16]; the node's third output is an empty one the size of the first picture (or
`resolution` square without pictures).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from nodes.node import Node
from nodes.sd.conditioning import _encoded
from nodes.sd.image import resize_image
from nodes.sd.models import Clip, DiffusionModel, Vae, clip_family_facts, family_refusal
from nodes.sd.vae import encode
from nodes.spec import Combo, Int, Output, Socket, String

FAMILY = "qwen_image21"
MAX_IMAGES = 16  # ComfyUI's image_1 .. image_16
SIDE_MULTIPLE = 32  # one vision pad token covers 32 x 32 pixels, 2 x 2 latent pixels
LATENT_CHANNELS, LATENT_RATIO = 64, 16
_CLIP_NEEDS = ("TextEncodeQwenImage21 needs Qwen-Image 2.1's text encoder, Qwen3-VL-8B (CLIPLoader type qwen_image: "
               "qwen3vl_8b_bf16.safetensors); {source} is {family}")


def picture_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """ComfyUI's size for a picture: about `resolution` squared pixels at its aspect (each side a multiple of 32), or
    its own size to a multiple of 32 with resolution 0; at least 32 a side."""
    if resolution > 0:
        ratio = width / height
        width = round(math.sqrt(resolution * resolution * ratio) / SIDE_MULTIPLE) * SIDE_MULTIPLE
        height = round(math.sqrt(resolution * resolution / ratio) / SIDE_MULTIPLE) * SIDE_MULTIPLE
    else:
        width, height = (round(side / SIDE_MULTIPLE) * SIDE_MULTIPLE for side in (width, height))
    return max(width, SIDE_MULTIPLE), max(height, SIDE_MULTIPLE)


def _slot(name: str) -> int:
    return int(name.rsplit("_", 1)[-1])


class TextEncodeQwenImage21(Node):
    """The prompt and negative prompt for Qwen-Image 2.1, with pictures to edit or take after (image_1, image_2, ...:
    the first batch item of each, scaled to about `resolution` squared pixels). With the VAE, each picture is also
    a reference latent the model works from; without it, the model only reads what the vision tower saw."""

    category = "advanced/conditioning/edit_models"
    # ComfyUI's order; the editor shows the pictures' sockets one at a time (autogrow, as BatchImagesNode's)
    inputs = {"clip": Socket("CLIP"), "prompt": String("", multiline=True),
              "negative_prompt": String("", multiline=True), "vae": Socket("VAE", optional=True),
              "resolution": Int(1024, min=0, max=4096, step=32,
                                tooltip="the pictures' size (about this squared, aspect kept); 0: their own"),
              **{f"images.image_{slot}": Socket("IMAGE", optional=True, extra={"autogrow": True})
                 for slot in range(1, MAX_IMAGES + 1)}}
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"),
               Output("LATENT", name="latent"))

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("clip", {}).get("family"), FAMILY, "the CLIP linked", _CLIP_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        facts = clip_family_facts(linked)
        return {**facts, **({1: facts[0]} if facts else {})}

    def execute(self, clip: Clip, prompt: str, negative_prompt: str, resolution: int, vae: Vae | None = None,
                **images: torch.Tensor) -> tuple[list, list, dict]:
        refusal = family_refusal(clip.family_name, FAMILY, clip.source, _CLIP_NEEDS)
        if refusal:
            raise ValueError(refusal)
        pictures = []
        for name in sorted((n for n, v in images.items() if v is not None), key=_slot):
            picture = images[name][:1]
            width, height = picture_size(picture.shape[2], picture.shape[1], resolution)
            if (width, height) != (picture.shape[2], picture.shape[1]):
                picture = resize_image(picture, width, height, "lanczos")
            pictures.append(picture)
        references = [encode(self, vae, picture) for picture in pictures] if vae is not None else []
        options = {"images": pictures or None, "keep_vision": not references}
        extra = {"reference_latents": references} if references else {}
        positive, negative = (
            [(emb, {**opts, **extra}) for emb, opts in _encoded(self, clip, text or " ", lambda e: {}, **options)]
            for text in (prompt, negative_prompt))
        height, width = (pictures[0].shape[1:3] if pictures else (resolution or 1024,) * 2)
        latent = torch.zeros(1, LATENT_CHANNELS, height // LATENT_RATIO, width // LATENT_RATIO)
        return positive, negative, {"samples": latent}


class QwenImage21Cache(Node):
    """ComfyUI's switch for Qwen-Image 2.1's cache of the prompt's (and references') keys and values across a run's
    steps, which only the target picture's tokens change between: on by default, as in ComfyUI, on the compute
    device; `device` off recomputes them at every step (the same pictures, slower). int8 and int4 storage are
    ComfyUI's memory savers, which Loom does not use (the cache stays in the model's dtype)."""

    category = "advanced/model"
    model = Socket("MODEL")
    device = Combo(["auto", "gpu", "cpu", "off"], tooltip="where the cache lives; off: recompute every step")
    dtype = Combo(["default", "int8", "int4"], tooltip="accepted; Loom keeps the cache in the model's dtype")
    outputs = (Output("MODEL"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, device: str, dtype: str) -> tuple[DiffusionModel]:
        if model.family.name != FAMILY:
            raise ValueError(f"QwenImage21Cache is for Qwen-Image 2.1; {model.source} is "
                             f"{model.family.name.upper()}")
        if device != "off":
            return (model,)
        from ldm.qwen_image21_files import without_prefix_cache

        return (replace(model, unet=without_prefix_cache(model.unet), own_bytes=0),)


NODES = [TextEncodeQwenImage21, QwenImage21Cache]
