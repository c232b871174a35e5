"""Tiny random-weight Z-Image files in the layouts ComfyUI users have, for tests and for trying its workflow here:
the transformer (Comfy-Org's single-file layout), the Qwen3-4B text encoder (`ldm.qwen3_text`'s tiny one, as wide as
the transformer's prompt input), the VAE (Flux's ae, as Z-Image's is) and alibaba-pai's Fun ControlNet Union (1.0)."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.checkpoint import write_safetensors
from ldm.controlnet_z_image import write_tiny_z_image_fun_controlnet
from ldm.flux_presets import TINY_FLUX_VAE
from ldm.presets import randomize_
from ldm.qwen3_text import write_tiny_qwen3
from ldm.vae import AutoencoderKL
from ldm.z_image_files import TINY_Z_IMAGE, write_tiny_z_image


def make_z_image_files(models_dir: str | Path, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Write a tiny random Z-Image transformer, Qwen3 text encoder (CLIPLoader type lumina2) and Flux VAE into
    the model folders under `models_dir`, named like Comfy-Org's with `-tiny`; returns each file's path by part
    ("unet", "qwen3", "vae", "fun_controlnet"). The pictures they make are noise."""
    models_dir = Path(models_dir)
    paths = {"unet": models_dir / "diffusion_models" / "z_image_turbo-tiny.safetensors",
             "qwen3": models_dir / "text_encoders" / "qwen_3_4b-tiny.safetensors",
             "vae": models_dir / "vae" / "ae-z_image-tiny.safetensors",
             "fun_controlnet": models_dir / "model_patches" / "Z-Image-Turbo-Fun-Controlnet-Union-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_z_image(paths["unet"], seed=seed, dtype=dtype)
    write_tiny_qwen3(paths["qwen3"], seed=seed + 1, dtype=dtype, hidden=TINY_Z_IMAGE.cap_feat_dim)
    vae = randomize_(AutoencoderKL(TINY_FLUX_VAE), torch.Generator().manual_seed(seed + 2))
    write_safetensors(vae.state_dict(), paths["vae"], {"loom.seed": str(seed)}, torch.float32)
    write_tiny_z_image_fun_controlnet(paths["fun_controlnet"], TINY_Z_IMAGE, seed=seed + 3, dtype=dtype)
    return paths
