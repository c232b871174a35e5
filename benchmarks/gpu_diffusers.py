"""diffusers' SD1.5 and SDXL pipelines holding the weights of our in-memory modules, built without a file.

For `benchmarks.gpu`: the modules are made on the meta device and adopt the converted tensors
(`assign=True`), so a 2.6-billion-parameter SDXL UNet is never initialised at random first.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ldm.unet import UNetConfig
from ldm.vae import VAEConfig
from tests.ldm.diffusers_reference import _original_config

VOCAB = Path(__file__).resolve().parent.parent / "ldm" / "data"


def _adopt(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"diffusers {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers {what}: tensors never loaded: {left[:5]}")
    return model.eval().requires_grad_(False)


def diffusers_unet(config: UNetConfig, ldm_state: dict[str, torch.Tensor]) -> Any:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dconf = create_unet_diffusers_config_from_ldm(_original_config(config, VAEConfig()), {}, image_size=64)
    if config.adm_in_channels:
        dconf.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=config.adm_in_channels)
    with torch.device("meta"):
        model = UNet2DConditionModel(**dconf)
    full = {f"model.diffusion_model.{k}": v for k, v in ldm_state.items()}
    return _adopt(model, convert_ldm_unet_checkpoint(full, dconf), "UNet")


def diffusers_vae(config: VAEConfig, ldm_state: dict[str, torch.Tensor]) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dconf = create_vae_diffusers_config_from_ldm(_original_config(None, config), {}, image_size=64,
                                                     scaling_factor=config.scaling_factor)
    with torch.device("meta"):
        model = AutoencoderKL(**dconf)
    full = {f"first_stage_model.{k}": v for k, v in ldm_state.items()}
    return _adopt(model, convert_ldm_vae_checkpoint(full, dconf), "VAE")


def _clip(encoder: Any, state: dict[str, torch.Tensor], with_projection: bool) -> Any:
    """transformers' CLIPTextModel(WithProjection) holding one of our ClipTextTransformers' weights."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(encoder.text_model.config)
    names = set(model.state_dict())
    wrapped = any(name.startswith("text_model.") for name in names)
    converted = {}
    for key, value in state.items():
        if key.startswith("text_model."):
            bare = key.removeprefix("text_model.")
            converted[f"text_model.{bare}" if wrapped else bare] = value
        elif key == "text_projection.weight" and with_projection:
            converted[key] = value
    converted = {k: v for k, v in converted.items() if k in names}
    model.load_state_dict(converted, strict=False, assign=True)
    embeddings = getattr(model, "text_model", model).embeddings
    if embeddings.position_ids.is_meta:  # a non-persistent buffer: rebuilt, as our loader does
        positions = torch.arange(embeddings.position_embedding.num_embeddings, device=next(iter(state.values())).device)
        embeddings.register_buffer("position_ids", positions.expand((1, -1)), persistent=False)
    return _adopt(model, converted, "text encoder")


def diffusers_pipeline(family: str, prediction: str, unet_config: UNetConfig, vae_config: VAEConfig,
                       text_encoder: Any, states: dict[str, dict[str, torch.Tensor]]) -> Any:
    """StableDiffusionPipeline (sd1) or StableDiffusionXLPipeline (sdxl) with an Euler scheduler equal to
    our `euler` + `normal`. `states` holds our state dicts by part: unet, vae and each text encoder by name."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="linspace",
                                       steps_offset=1,  # unused by "linspace"; silences a deprecation notice
                                       prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    unet = diffusers_unet(unet_config, states["unet"])
    vae = diffusers_vae(vae_config, states["vae"])
    tokenizer = CLIPTokenizer.from_pretrained(VOCAB, local_files_only=True, model_max_length=77)
    encoders = text_encoder.encoders
    if family == "sdxl":
        # OpenCLIP pads with token 0, which is "!" in the CLIP vocabulary (diffusers' SDXL tokenizer_2).
        tokenizer_2 = CLIPTokenizer.from_pretrained(VOCAB, local_files_only=True, model_max_length=77, pad_token="!")
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=_clip(encoders["clip_l"], states["clip_l"], False),
            text_encoder_2=_clip(encoders["clip_g"], states["clip_g"], True),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=_clip(encoders["clip_l"], states["clip_l"], False), tokenizer=tokenizer,
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
