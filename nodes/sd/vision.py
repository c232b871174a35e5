"""Image prompts under ComfyUI's names: CLIP vision models, unCLIP conditioning and T2I-Adapter style models.

CLIP_VISION is a loaded image encoder (`ldm.clip_vision`); CLIP_VISION_OUTPUT its encoding of an image, with
the attributes of ComfyUI's (so IP-Adapter-style plugins read it); STYLE_MODEL a T2I-Adapter style model
(`ldm.style_model`). unCLIP Conditioning puts each image prompt into the conditioning entries' options under
`unclip_conditioning`, as ComfyUI does; the sampler makes an unCLIP model's `y` from them (`unclip_y`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ldm.clip_vision import ClipVisionOutput
from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.loaders import (
    CheckpointLoaderSimple,
    engine_weight_dtypes,
    load_checkpoint_outputs,
    model_file,
    model_path,
    shared_file_model,
)
from nodes.sd.models import (
    HANDLE_SIZE,
    Clip,
    DiffusionModel,
    Vae,
    file_fingerprint,
    on_device,
)
from nodes.spec import Combo, Float, Output, Socket

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ClipVision:
    """CLIP_VISION: a loaded image encoder (ldm.clip_vision.ClipVisionModel); its weights are the model cache's."""

    model: torch.nn.Module
    source: str

    def cache_size(self) -> int:
        return HANDLE_SIZE

    def encode_image(self, image: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
        """ComfyUI's ClipVisionModel.encode_image, for plugins that call it: on the device the model is on."""
        return _encode(self.model, image, crop)


def _encode(model: torch.nn.Module, image: torch.Tensor, crop: bool) -> ClipVisionOutput:
    out = model.encode(image, crop=crop)
    return ClipVisionOutput(out.last_hidden_state.float().cpu(), out.image_embeds.float().cpu(),
                            out.penultimate_hidden_states.float().cpu())


@dataclass(frozen=True, eq=False)
class StyleModel:
    """STYLE_MODEL: a loaded T2I-Adapter style model (ldm.style_model.StyleAdapter) or Flux Redux model
    (ldm.flux_redux.ReduxImageEncoder)."""

    model: torch.nn.Module
    source: str

    def cache_size(self) -> int:
        return HANDLE_SIZE


def _load_clip_vision(node: Node, path: Any, name: str) -> ClipVision:
    from ldm.clip_vision import load_clip_vision

    return ClipVision(shared_file_model(node, "clip_vision", path, load_clip_vision), name)


class CLIPVisionLoader(Node):
    """Loads a CLIP image encoder from models/clip_vision: transformers' layout (OpenAI's ViT-L/14, the LAION
    ViT-H/14 and ViT-bigG/14 files IP-Adapters use) or open_clip's; or a SigLIP one (sigclip_vision_patch14_384,
    for Flux Redux: ldm.siglip)."""

    display_name = "Load CLIP Vision"
    category = "loaders"
    clip_name = model_file("clip_vision")
    outputs = (Output("CLIP_VISION"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("clip_vision", str(inputs.get("clip_name", ""))))

    def execute(self, clip_name: str) -> tuple[ClipVision]:
        return (_load_clip_vision(self, model_path("clip_vision", clip_name), clip_name),)


class CLIPVisionEncode(Node):
    """Encodes an image with a CLIP vision model: its shortest side resized to the model's size and the centre
    cropped (crop "none": the whole image squashed to a square), as CLIP's own preprocessing does."""

    display_name = "CLIP Vision Encode"
    category = "conditioning"
    clip_vision = Socket("CLIP_VISION")
    image = Socket("IMAGE")
    crop = Combo(["center", "none"], tooltip="center: crop the middle square; none: squash the whole image")
    outputs = (Output("CLIP_VISION_OUTPUT"),)

    def execute(self, clip_vision: ClipVision, image: torch.Tensor, crop: str) -> tuple[ClipVisionOutput]:
        return (_encode(on_device(self.ctx, clip_vision.model), image, crop == "center"),)


class unCLIPConditioning(Node):  # noqa: N801 (ComfyUI's name)
    """Adds an image prompt to each conditioning entry, for SD 2.1 unCLIP models; several add up. Other models
    ignore it (a warning says so when they sample)."""

    category = "conditioning"  # no display name: ComfyUI shows the class name
    conditioning = Socket("CONDITIONING")
    clip_vision_output = Socket("CLIP_VISION_OUTPUT")
    strength = Float(1.0, min=-10.0, max=10.0, step=0.01)
    noise_augmentation = Float(0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="how much the image embedding is noised: higher keeps less of the image")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, clip_vision_output: ClipVisionOutput, strength: float,
                noise_augmentation: float) -> tuple[list]:
        if strength == 0:
            return (conditioning,)
        prompt = {"clip_vision_output": clip_vision_output, "strength": strength,
                  "noise_augmentation": noise_augmentation}
        return ([(embedding, {**options, "unclip_conditioning": [*options.get("unclip_conditioning", []), prompt]})
                 for embedding, options in conditioning],)


class unCLIPCheckpointLoader(Node):  # noqa: N801 (ComfyUI's name)
    """Loads an SD 2.1 unCLIP checkpoint: its UNet, text encoder and VAE, and the CLIP image encoder inside it."""

    category = "loaders"
    ckpt_name = model_file("checkpoints")
    outputs = (Output("MODEL"), Output("CLIP"), Output("VAE"), Output("CLIP_VISION"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return CheckpointLoaderSimple.fingerprint(inputs)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return CheckpointLoaderSimple.output_facts(inputs, linked)

    def execute(self, ckpt_name: str) -> tuple[DiffusionModel, Clip, Vae, ClipVision]:
        model, clip, vae = load_checkpoint_outputs(self, ckpt_name, *engine_weight_dtypes(self))
        if not model.family.unclip:
            raise ValueError(f"{ckpt_name} is not an unCLIP checkpoint and holds no CLIP vision encoder: load it "
                             "with Load Checkpoint, and an image encoder with Load CLIP Vision")
        return model, clip, vae, _load_clip_vision(self, model_path("checkpoints", ckpt_name), ckpt_name)


class StyleModelLoader(Node):
    """Loads a style model from models/style_models: a T2I-Adapter's (t2iadapter_style_sd14v1, coadapter-style)
    or Flux Redux (flux1-redux-dev, with a SigLIP vision model: sigclip_vision_patch14_384)."""

    display_name = "Load Style Model"
    category = "loaders"
    style_model_name = model_file("style_models")
    outputs = (Output("STYLE_MODEL"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("style_models", str(inputs.get("style_model_name", ""))))

    def execute(self, style_model_name: str) -> tuple[StyleModel]:
        from ldm.style_model import load_style_model

        path = model_path("style_models", style_model_name)
        return (StyleModel(shared_file_model(self, "style_model", path, load_style_model), style_model_name),)


class StyleModelApply(Node):
    """Appends a style model's tokens, made from an image's CLIP vision output, to each prompt's embedding (Flux
    Redux's to Flux's T5 tokens)."""

    display_name = "Apply Style Model"
    category = "conditioning/style_model"
    conditioning = Socket("CONDITIONING")
    style_model = Socket("STYLE_MODEL")
    clip_vision_output = Socket("CLIP_VISION_OUTPUT")
    strength = Float(1.0, min=0.0, max=10.0, step=0.001)
    strength_type = Combo(["multiply", "attn_bias"],
                          tooltip="multiply: scale the style tokens; attn_bias: weigh them by log(strength) in "
                                  "Flux's attention (Redux); an SD UNet has none, so the tokens go in unscaled, as "
                                  "in ComfyUI")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, style_model: StyleModel, clip_vision_output: ClipVisionOutput,
                strength: float, strength_type: str) -> tuple[list]:
        adapter = on_device(self.ctx, style_model.model)
        with torch.no_grad():
            hidden = clip_vision_output.last_hidden_state.to(next(adapter.parameters()).device)
            tokens = adapter(hidden).float().cpu()
        tokens = tokens.reshape(1, -1, tokens.shape[-1])  # a batch of images: all their tokens, one after another
        redux = hasattr(adapter, "redux_up")  # Flux's: its joint attention takes the bias (ldm.flux_redux)
        if strength_type == "multiply":
            tokens = tokens * strength
        elif strength != 1.0 and not redux:
            log.warning("Apply Style Model: strength_type attn_bias weighs the style tokens in attention masks, which "
                        "the SD UNet has none of, as in ComfyUI: the tokens go in unscaled (multiply scales them)")
        bias = strength if strength_type == "attn_bias" else 1.0
        out = []
        for embedding, options in conditioning:
            if embedding.shape[-1] != tokens.shape[-1]:
                raise ValueError(f"the style model {style_model.source} makes {tokens.shape[-1]}-wide tokens and the "
                                 f"prompt is {embedding.shape[-1]} wide: it is for another model family (the T2I "
                                 "style models are SD1.x's, Flux Redux is Flux.1's)")
            style = tokens.to(embedding).expand(embedding.shape[0], -1, -1)
            options = dict(options)
            if redux and ("attention_mask" in options or bias != 1.0):  # an earlier mask grows round the tokens
                from ldm.flux_redux import style_attention_mask

                options["attention_mask"] = style_attention_mask(options.get("attention_mask"), embedding.shape[1],
                                                                 style.shape[1], bias, embedding.shape[0])
            out.append((torch.cat([embedding, style], dim=1), options))
        return (out,)


# --- at sampling time ------------------------------------------------------------------------------------

@functools.cache
def _standard_augmentor(embed_dim: int) -> Any:
    from ldm.unclip import NoiseAugmentor

    return NoiseAugmentor(embed_dim)


def unclip_y(model: DiffusionModel, options: dict, seed: int) -> torch.Tensor:
    """An unCLIP model's `y` for one conditioning entry: from its image prompts (unCLIP Conditioning's), noised
    from the sampler's `seed`; an entry without one gets zeros, as in ComfyUI (the negative prompt, usually)."""
    from ldm.unclip import unclip_adm

    adm = model.family.unet_config.adm_in_channels
    prompts = options.get("unclip_conditioning")
    if not prompts:
        return torch.zeros(1, adm)
    augmentor = model.noise_augmentor or _standard_augmentor(adm // 2)
    images = [(p["clip_vision_output"].image_embeds.float().cpu(), p["strength"], p["noise_augmentation"])
              for p in prompts]
    return unclip_adm(images, augmentor, seed)


def warn_not_unclip(model: DiffusionModel) -> None:
    log.warning("%s is not an unCLIP model: the image prompts of unCLIP Conditioning are ignored, as ComfyUI ignores "
                "them (for an image prompt with it, use Apply Style Model or an IP-Adapter)", model.source)


NODES: list[Any] = [CLIPVisionLoader, CLIPVisionEncode, unCLIPConditioning, unCLIPCheckpointLoader,
                    StyleModelLoader, StyleModelApply]
