"""Tiny random-weight FLUX.2 files in the layouts ComfyUI users have, for tests and for trying its workflows here:
the klein and dev transformers (Comfy-Org's single-file layout), their text encoders (Qwen3 for klein, Mistral Small 3
with its tekken tokenizer for dev, each as wide as the transformers' prompt input) and the VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.flux2_files import TINY_FLUX2, TINY_FLUX2_KLEIN, write_tiny_flux2
from ldm.flux2_text import write_tiny_flux2_klein, write_tiny_flux2_mistral
from ldm.flux2_vae import write_tiny_flux2_vae

# The tiny text encoders' width: their states are three layers' stacked, as wide as the transformers take.
TEXT_HIDDEN = TINY_FLUX2.context_dim // 3


def make_flux2_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Write tiny random FLUX.2 [klein] and [dev] transformers, their text encoders (CLIPLoader type flux2) and the
    VAE into the model folders under `models_dir`, named like Comfy-Org's with `-tiny`; returns each file's path by
    part ("klein", "qwen3", "dev", "mistral", "vae"). The pictures they make are noise."""
    models_dir = Path(models_dir)
    paths = {"klein": models_dir / "diffusion_models" / "flux-2-klein-4b-tiny.safetensors",
             "qwen3": models_dir / "text_encoders" / "qwen_3_4b-klein-tiny.safetensors",
             "dev": models_dir / "diffusion_models" / "flux2_dev-tiny.safetensors",
             "mistral": models_dir / "text_encoders" / "mistral_3_small_flux2-tiny.safetensors",
             "vae": models_dir / "vae" / "flux2-vae-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_flux2(paths["klein"], seed=seed, dtype=dtype, config=TINY_FLUX2_KLEIN)
    write_tiny_flux2_klein(paths["qwen3"], seed=seed + 1, dtype=dtype, hidden=TEXT_HIDDEN)
    write_tiny_flux2(paths["dev"], seed=seed + 2, dtype=dtype, config=TINY_FLUX2)
    write_tiny_flux2_mistral(paths["mistral"], seed=seed + 3, dtype=dtype, hidden=TEXT_HIDDEN)
    write_tiny_flux2_vae(paths["vae"], seed=seed + 4, dtype=torch.float32)
    return paths
