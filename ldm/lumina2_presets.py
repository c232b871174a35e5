"""Tiny random-weight Lumina Image 2.0 files in the layouts ComfyUI users have, for tests and for trying its workflow
here: the all-in-one checkpoint (lumina_2.safetensors' layout: transformer, Flux's VAE, Gemma-2 with its tokenizer),
and the split transformer and Gemma-2 files (UNETLoader, CLIPLoader type lumina2)."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.gemma_text import write_tiny_gemma
from ldm.lumina2_files import TINY_LUMINA2, write_tiny_lumina2, write_tiny_lumina2_checkpoint


def make_lumina2_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Write a tiny all-in-one Lumina 2 checkpoint and the split transformer and Gemma-2 files into the model
    folders under `models_dir`, named like Comfy-Org's with `-tiny`; returns each file's path by part
    ("checkpoint", "unet", "gemma"). The pictures they make are noise."""
    models_dir = Path(models_dir)
    paths = {"checkpoint": models_dir / "checkpoints" / "lumina_2-tiny.safetensors",
             "unet": models_dir / "diffusion_models" / "lumina_2_model-tiny.safetensors",
             "gemma": models_dir / "text_encoders" / "gemma_2_2b-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_lumina2_checkpoint(paths["checkpoint"], seed=seed, dtype=dtype)
    write_tiny_lumina2(paths["unet"], seed=seed + 3, dtype=dtype)
    write_tiny_gemma(paths["gemma"], seed=seed + 4, dtype=dtype, hidden=TINY_LUMINA2.cap_feat_dim)
    return paths
