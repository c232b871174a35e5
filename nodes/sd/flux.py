"""Flux.1 nodes: its text encoding, guidance, latent and model sampling."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from nodes.node import Node
from nodes.sd.conditioning import MAX_RESOLUTION, _encoded
from nodes.sd.models import Clip, DiffusionModel, family_refusal
from nodes.spec import Float, Int, Output, Socket, String

# The guidance a dev model is given where the prompt names none (ComfyUI's default, and FluxGuidance's).
DEFAULT_GUIDANCE = 3.5


def flux_y(conditioning: list, model: DiffusionModel) -> list:
    """Each entry with the `y` a Flux transformer takes (``ldm.flux``): its pooled CLIP-L prompt (zeros without
    one) and, for a model with a guidance embedding, the entry's guidance (3.5 unless said; None: unguided)."""
    config = model.family.unet_config
    out = []
    for embedding, options in conditioning:
        pooled = options.get("pooled_output")
        y = torch.zeros(embedding.shape[0], config.vec_in_dim) if pooled is None else pooled.float()
        guidance = options.get("guidance", DEFAULT_GUIDANCE)
        if config.guidance_embed and guidance is not None:
            y = torch.cat([y, torch.full((y.shape[0], 1), float(guidance))], dim=1)
        out.append((embedding, {**options, "y": y}))
    return out


def _with_guidance(conditioning: list, guidance: float | None) -> list:
    return [(embedding, {**options, "guidance": guidance}) for embedding, options in conditioning]


_CLIP_NEEDS = ("CLIPTextEncodeFlux needs Flux's text encoders (DualCLIPLoader with type flux, or a Flux checkpoint); "
               "{source} is {family} (use CLIP Text Encode)")
_MODEL_NEEDS = "ModelSamplingFlux is for Flux models; {source} is {family}"


class CLIPTextEncodeFlux(Node):
    """Encodes a prompt for Flux: `clip_l` for CLIP-L (its pooled vector), `t5xxl` for T5 (the text the
    transformer attends to), and the guidance strength a dev model is distilled to follow."""

    display_name = "CLIPTextEncodeFlux"
    category = "advanced/conditioning/flux"
    clip = Socket("CLIP")
    clip_l = String("", multiline=True, tooltip="the prompt for CLIP-L")
    t5xxl = String("", multiline=True, tooltip="the prompt for T5-XXL")
    guidance = Float(3.5, min=0.0, max=100.0, step=0.1, tooltip="Flux dev's distilled guidance (schnell ignores it)")
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("clip", {}).get("family"), "flux", "the CLIP linked", _CLIP_NEEDS)

    def execute(self, clip: Clip, clip_l: str, t5xxl: str, guidance: float) -> tuple[list]:
        refusal = family_refusal(clip.family_name, "flux", clip.source, _CLIP_NEEDS)
        if refusal:
            raise ValueError(refusal)
        return (_encoded(self, clip, t5xxl, lambda encoding: {"pooled_output": encoding.pooled.float().cpu(),
                                                              "guidance": guidance},
                         per_encoder={"clip_l": [clip_l]}),)


class FluxGuidance(Node):
    """Sets the guidance strength a Flux dev model is given with these prompts."""

    category = "advanced/conditioning/flux"
    conditioning = Socket("CONDITIONING")
    guidance = Float(3.5, min=0.0, max=100.0, step=0.1)
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("conditioning", {})}  # the prompts' facts (family, edit inputs) pass through

    def execute(self, conditioning: list, guidance: float) -> tuple[list]:
        return (_with_guidance(conditioning, guidance),)


class FluxDisableGuidance(Node):
    """Removes the guidance strength from these prompts: a dev model then runs without its guidance embedding."""

    category = "advanced/conditioning/flux"
    conditioning = Socket("CONDITIONING")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list) -> tuple[list]:
        return (_with_guidance(conditioning, None),)


class EmptySD3LatentImage(Node):
    """A batch of empty (zero) 16-channel latents, the latent space of Flux (and SD3)."""

    display_name = "EmptySD3LatentImage"
    category = "latent/sd3"
    width = Int(1024, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(1024, min=16, max=MAX_RESOLUTION, step=16)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        return ({"samples": torch.zeros(batch_size, 16, height // 8, width // 8)},)


class ModelSamplingFlux(Node):
    """Samples a Flux model with the time shift for an image of width x height: base_shift at 256x256 pixels,
    max_shift at 1024x1024, linear in the pixel count between and beyond (more noise steps for larger images)."""

    category = "advanced/model"
    model = Socket("MODEL")
    max_shift = Float(1.15, min=0.0, max=100.0, step=0.01)
    base_shift = Float(0.5, min=0.0, max=100.0, step=0.01)
    width = Int(1024, min=16, max=MAX_RESOLUTION, step=8)
    height = Int(1024, min=16, max=MAX_RESOLUTION, step=8)
    outputs = (Output("MODEL"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("model", {}).get("family"), "flux", "the MODEL linked", _MODEL_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, max_shift: float, base_shift: float, width: int,
                height: int) -> tuple[DiffusionModel]:
        from ldm.sampling.flow import FlowSchedule, resolution_shift

        refusal = family_refusal(model.family.name, "flux", model.source, _MODEL_NEEDS)
        if refusal:
            raise ValueError(refusal)
        shift = resolution_shift(width, height, max_shift, base_shift)
        return (replace(model, schedule=FlowSchedule(shift), prediction_type="flow"),)


NODES: list[Any] = [CLIPTextEncodeFlux, FluxGuidance, FluxDisableGuidance, EmptySD3LatentImage, ModelSamplingFlux]
