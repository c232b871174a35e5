"""Tiny random-weight ACE-Step 1.5 files in the layouts ComfyUI users have, for tests and for trying its workflow
here: the diffusion model (ACE-Step's names), the Qwen3-0.6B text encoder and the 5 Hz language model (transformers'
Qwen3 names, the language model's vocabulary with the 64,000 audio-code tokens), the 48 kHz Oobleck VAE, and the
all-in-one checkpoint of them all."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ldm.ace_step15 import write_tiny_ace_step15
from ldm.ace_step15_files import TEXT_PREFIXES, VAE_PREFIX
from ldm.ace_step15_text import write_tiny_ace_step15_encoder, write_tiny_ace_step15_lm
from ldm.checkpoint import UNET_PREFIX, load_state_dict, read_metadata, write_safetensors
from ldm.oobleck import ACE_STEP_OOBLECK, TINY_OOBLECK, write_tiny_oobleck

# ACE-Step 1.5's VAE levels and strides (1920 samples a latent frame at 48 kHz) at a few channels a level.
TINY_ACE_OOBLECK = replace(TINY_OOBLECK, downsampling_ratios=ACE_STEP_OOBLECK.downsampling_ratios,
                           sampling_rate=ACE_STEP_OOBLECK.sampling_rate)


def make_ace_step15_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write tiny random ACE-Step 1.5 files into the model folders under `models_dir`, named like Comfy-Org's with
    `-tiny`; returns each file's path by part ("diffusion_model", "text_encoder", "lm", "vae", "checkpoint": the
    all-in-one). Their music is noise."""
    models_dir = Path(models_dir)
    paths = {"diffusion_model": models_dir / "diffusion_models" / "acestep_v1.5_turbo-tiny.safetensors",
             "text_encoder": models_dir / "text_encoders" / "qwen_0.6b_ace15-tiny.safetensors",
             "lm": models_dir / "text_encoders" / "qwen_1.7b_ace15-tiny.safetensors",
             "vae": models_dir / "vae" / "ace_1.5_vae-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_ace_step15(paths["diffusion_model"], seed=seed)
    write_tiny_ace_step15_encoder(paths["text_encoder"], seed=seed + 1)
    write_tiny_ace_step15_lm(paths["lm"], seed=seed + 2)
    write_tiny_oobleck(paths["vae"], seed=seed + 3, dtype=dtype, config=TINY_ACE_OOBLECK)
    paths["checkpoint"] = write_tiny_ace_step15_checkpoint(
        models_dir / "checkpoints" / "ace_step_1.5_turbo_aio-tiny.safetensors", paths)
    return paths


def write_tiny_ace_step15_checkpoint(path: Path, parts: dict[str, Path]) -> Path:
    """The all-in-one checkpoint of the tiny parts, as Comfy-Org's ace_step_1.5_turbo_aio.safetensors lays them out
    (the model, the VAE, Qwen3-0.6B and the 1.7B language model each under ComfyUI's prefix)."""
    prefixes = {"diffusion_model": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIXES[0],
                "lm": TEXT_PREFIXES[1]}
    weights = {prefix + k: v for part, prefix in prefixes.items() for k, v in load_state_dict(parts[part]).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(weights, path, read_metadata(parts["diffusion_model"]))
    return path
