"""Qwen-Image-Edit's prompt nodes, TextEncodeQwenImageEdit(Plus): edit instructions encoded with their pictures."""

from __future__ import annotations

import math
from typing import Any

import torch

from nodes.node import Node
from nodes.sd.conditioning import _encoded
from nodes.sd.image import resize_image
from nodes.sd.models import Clip, Vae, clip_family_facts, family_refusal
from nodes.sd.vae import encode
from nodes.spec import Output, Socket, String

# Pixels of the pictures as ComfyUI scales them (keeping their aspect): the reference latents' (and the single
# image's for the vision tower too), and TextEncodeQwenImageEditPlus' for the vision tower.
REFERENCE_AREA = 1024 * 1024
PLUS_VISION_AREA = 384 * 384

_CLIP_NEEDS = ("TextEncodeQwenImageEdit(Plus) needs Qwen-Image's text encoder, Qwen2.5-VL-7B (CLIPLoader type "
               "qwen_image); {source} is {family}")


def scaled(image: torch.Tensor, area: int, multiple: int = 1) -> torch.Tensor:
    """IMAGE [B, H, W, C] resized ("area", as ComfyUI's common_upscale) to about `area` pixels, its aspect kept, each
    side rounded to a multiple of `multiple`."""
    height, width = image.shape[1:3]
    scale = math.sqrt(area / (width * height))
    return resize_image(image, round(width * scale / multiple) * multiple, round(height * scale / multiple) * multiple,
                        "area")


def _check(clip: Clip, pictures: bool) -> None:
    """Refuses a CLIP that is not Qwen-Image's and, for `pictures`, one without a vision tower."""
    refusal = family_refusal(clip.family_name, "qwen_image", clip.source, _CLIP_NEEDS)
    if refusal:
        raise ValueError(refusal)
    if pictures and getattr(clip.encoder, "visual", None) is None:
        raise ValueError(f"{clip.source} has no vision tower (visual.*), which TextEncodeQwenImageEdit(Plus) needs to "
                         "read its images: load Comfy-Org's qwen_2.5_vl_7b.safetensors or "
                         "qwen_2.5_vl_7b_fp8_scaled.safetensors")


def _facts(linked: dict[str, dict[str, Any]], images: tuple[str, ...]) -> dict[int, dict[str, Any]]:
    """The CLIP's family and, with a VAE and an image linked, that the prompts carry reference latents."""
    facts = dict(clip_family_facts(linked).get(0, {}))
    if "vae" in linked and any(name in linked for name in images):
        facts["reference_latents"] = True  # checked against the model by the KSampler (nodes.sd.edit_validation)
    return {0: facts} if facts else {}


def _encode(node: Node, clip: Clip, prompt: str, pictures: list[torch.Tensor], references: list[torch.Tensor],
            template: str | None) -> list:
    """The CONDITIONING of `prompt` with `pictures` ([H, W, 3]) seen through the vision tower, in `template` (None:
    ldm.qwen_text's default choice) and carrying the `references` latents, if any."""
    extra = {"reference_latents": references} if references else {}
    return _encoded(node, clip, prompt, lambda encoding: dict(extra), images=pictures, template=template)


class TextEncodeQwenImageEdit(Node):
    """Encodes an edit instruction for Qwen-Image-Edit with the picture to edit: the picture, scaled to about a
    megapixel, is read by Qwen2.5-VL's vision tower into the prompt and, with a VAE, added as a reference latent."""

    display_name = "Text Encode Qwen Image Edit"
    category = "advanced/conditioning"
    clip = Socket("CLIP")
    prompt = String("", multiline=True, tooltip="the edit instruction")
    vae = Socket("VAE", optional=True, tooltip="encodes the picture into the reference latent the model edits")
    image = Socket("IMAGE", optional=True, tooltip="the picture to edit (the first of a batch is read)")
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("clip", {}).get("family"), "qwen_image", "the CLIP linked", _CLIP_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return _facts(linked, ("image",))

    def execute(self, clip: Clip, prompt: str, vae: Vae | None = None,
                image: torch.Tensor | None = None) -> tuple[list]:
        _check(clip, image is not None)
        if image is None:  # ComfyUI: the plain Qwen-Image template
            return (_encode(self, clip, prompt, [], [], None),)
        picture = scaled(image[..., :3], REFERENCE_AREA)
        references = [] if vae is None else [encode(self, vae, picture)]
        return (_encode(self, clip, prompt, [picture[0]], references, None),)


class TextEncodeQwenImageEditPlus(Node):
    """Encodes an edit instruction for Qwen-Image-Edit-2509 and later with up to three pictures, each named in the
    prompt as `Picture N:` (N its input's number), read by the vision tower at about 384x384 and, with a VAE, added
    as a reference latent at about a megapixel (sides multiples of 8)."""

    display_name = "Text Encode Qwen Image Edit Plus"
    category = "advanced/conditioning"
    clip = Socket("CLIP")
    prompt = String("", multiline=True, tooltip="the edit instruction; refer to the pictures as Picture 1, 2, 3")
    vae = Socket("VAE", optional=True, tooltip="encodes the pictures into the reference latents the model sees")
    image1 = Socket("IMAGE", optional=True)
    image2 = Socket("IMAGE", optional=True)
    image3 = Socket("IMAGE", optional=True)
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("clip", {}).get("family"), "qwen_image", "the CLIP linked", _CLIP_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return _facts(linked, ("image1", "image2", "image3"))

    def execute(self, clip: Clip, prompt: str, vae: Vae | None = None, image1: torch.Tensor | None = None,
                image2: torch.Tensor | None = None, image3: torch.Tensor | None = None) -> tuple[list]:
        from ldm.qwen_vl import EDIT_PLUS_TEMPLATE, PICTURE

        given = [(n, image[..., :3]) for n, image in enumerate((image1, image2, image3), 1) if image is not None]
        _check(clip, bool(given))
        pictures = [scaled(image, PLUS_VISION_AREA)[0] for _, image in given]
        references = [] if vae is None else [encode(self, vae, scaled(image, REFERENCE_AREA, 8)) for _, image in given]
        labels = "".join(PICTURE.format(n) for n, _ in given)
        return (_encode(self, clip, labels + prompt, pictures, references, EDIT_PLUS_TEMPLATE),)


NODES: list[Any] = [TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus]
