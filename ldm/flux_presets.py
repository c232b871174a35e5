"""Tiny random-weight Flux.1 files in the real layouts, for tests and trying workflows without downloads.

`make_flux_files(models_dir)` writes what a ComfyUI user's Flux setup holds, tiny: the diffusion model in BFL's
layout (models/diffusion_models), CLIP-L and T5 in transformers' layouts (models/text_encoders), the 16-channel
autoencoder in BFL's ae layout (models/vae), and the same parts as one all-in-one checkpoint in ComfyUI's layout
(models/checkpoints). Their widths fit together (T5's width is the transformer's context width, CLIP-L's its pooled
width), so workflows run end to end; the pictures are noise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ldm.checkpoint import UNET_PREFIX, VAE_PREFIX, write_safetensors
from ldm.flux import Flux, FluxConfig, config_metadata
from ldm.flux_files import FLUX_VAE
from ldm.flux_text import CLIP_PREFIX, T5_PREFIX
from ldm.presets import randomize_
from ldm.t5 import T5Config, build_t5
from ldm.text_encoders import build_text_encoder, random_text_encoder_config
from ldm.vae import AutoencoderKL

TINY_T5 = T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
TINY_CLIP = "tiny-sd1"  # SD1's tiny CLIP-L preset: 32 wide
TINY_FLUX = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_dim=TINY_T5.d_model, hidden_size=32,
                       num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))
TINY_FLUX_VAE = dataclasses.replace(FLUX_VAE, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)


def random_flux(config: FluxConfig = TINY_FLUX, seed: int = 0) -> Flux:
    """A Flux transformer with seeded random weights, each distinct: norm scales around 1, small biases, weights
    at 1/sqrt(fan-in), so that a tiny model's output is finite and depends on every weight."""
    return distinct_random_(Flux(config).eval(), seed)


def distinct_random_(model: torch.nn.Module, seed: int, norm_scales: tuple[str, ...] = (".scale",)) -> torch.nn.Module:
    """`model` with seeded random weights in place (see `random_flux`); parameters whose names end with one of
    `norm_scales` are norm scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(norm_scales):
                param.copy_(1 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.05 * noise)
            else:
                param.copy_(noise * param[0].numel() ** -0.5)
    return model


# The input width (img_in) of each variant: the edit models (ldm.flux_variants) take channels beside the latent's.
VARIANT_INPUTS = {"dev": 64, "schnell": 64, "kontext": 64, "fill": 384, "depth": 128, "canny": 128}


def tiny_flux_config(variant: str) -> FluxConfig:
    """The tiny transformer of a variant: "schnell" has no guidance embedding; "kontext" is dev's shape, "fill",
    "depth" and "canny" are dev with a wider input."""
    if variant not in VARIANT_INPUTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANT_INPUTS)}, not {variant!r}")
    return dataclasses.replace(TINY_FLUX, guidance_embed=variant != "schnell", in_channels=VARIANT_INPUTS[variant])


def tiny_flux_parts(variant: str = "dev", seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of tiny Flux parts in their files' layouts: "unet" (BFL), "clip_l" (transformers'
    CLIPTextModel), "t5xxl" (transformers' T5EncoderModel, without the tied embed_tokens copy), "vae" (BFL's ae)."""
    unet = random_flux(tiny_flux_config(variant), seed).state_dict()
    clip = build_text_encoder(random_text_encoder_config(TINY_CLIP))
    clip.init_random_weights(seed)
    with torch.random.fork_rng():  # transformers initialises T5 from the global generator
        torch.manual_seed(seed)
        t5 = build_t5(TINY_T5)
    vae = randomize_(AutoencoderKL(TINY_FLUX_VAE), torch.Generator().manual_seed(seed + 1))
    sd1 = "cond_stage_model.transformer."
    return {
        "unet": unet,
        "clip_l": {k[len(sd1):]: v for k, v in clip.ldm_state_dict().items()},
        "t5xxl": {k: v for k, v in t5.model.state_dict().items() if k != "encoder.embed_tokens.weight"},
        "vae": vae.state_dict(),
    }


def make_flux_files(models_dir: str | Path, variant: str = "dev", seed: int = 0,
                    dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write tiny Flux files into the model folders under `models_dir`; returns each file's path by part
    ("unet", "clip_l", "t5xxl", "vae", "checkpoint"). Weights are stored in `dtype` (fp16 unless said)."""
    models_dir = Path(models_dir)
    parts = tiny_flux_parts(variant, seed)
    metadata = {**config_metadata(tiny_flux_config(variant)), "loom.seed": str(seed)}
    paths = {"unet": models_dir / "diffusion_models" / f"flux1-tiny-{variant}.safetensors",
             "clip_l": models_dir / "text_encoders" / "clip_l-tiny.safetensors",
             "t5xxl": models_dir / "text_encoders" / "t5xxl-tiny.safetensors",
             "vae": models_dir / "vae" / "ae-tiny.safetensors",
             "checkpoint": models_dir / "checkpoints" / f"flux1-tiny-{variant}-checkpoint.safetensors"}
    for part in ("unet", "clip_l", "t5xxl", "vae"):
        write_safetensors(parts[part], paths[part], metadata if part == "unet" else {}, dtype)
    combined = {**{UNET_PREFIX + k: v for k, v in parts["unet"].items()},
                **{VAE_PREFIX + k: v for k, v in parts["vae"].items()},
                **{CLIP_PREFIX + k: v for k, v in parts["clip_l"].items()},
                **{T5_PREFIX + k: v for k, v in parts["t5xxl"].items()}}
    write_safetensors(combined, paths["checkpoint"], metadata, dtype)
    return paths
