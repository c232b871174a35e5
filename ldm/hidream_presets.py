"""Tiny random-weight HiDream-I1 files in the layouts ComfyUI users have, for tests and for trying its workflows here:
the transformer (UNETLoader), the four text encoders QuadrupleCLIPLoader takes (CLIP-L and CLIP-G with their
projections, T5-XXL, Llama 3.1 in scaled fp8 as Comfy-Org ships it) and Flux's VAE (VAELoader), named like
Comfy-Org's files with `-tiny`."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.checkpoint import write_safetensors
from ldm.flux_presets import TINY_FLUX_VAE
from ldm.hidream_files import TINY_HIDREAM, write_tiny_hidream
from ldm.llama_text import write_tiny_llama
from ldm.presets import randomize_
from ldm.sd3_presets import random_clip, random_t5
from ldm.vae import AutoencoderKL

# The tiny transformer reads Llama layers up to this one (TINY_HIDREAM.llama_layers): the tiny Llama has as many.
TINY_LLAMA_LAYERS = max(TINY_HIDREAM.llama_layers) + 1


def make_hidream_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Write a tiny HiDream transformer, its four text encoders and a tiny Flux VAE into the model folders under
    `models_dir`; returns each file's path by part ("unet", "clip_l", "clip_g", "t5xxl", "llama", "vae"). The
    pictures they make are noise."""
    models_dir = Path(models_dir)
    paths = {"unet": models_dir / "diffusion_models" / "hidream_i1_dev-tiny.safetensors",
             "clip_l": models_dir / "text_encoders" / "clip_l_hidream-tiny.safetensors",
             "clip_g": models_dir / "text_encoders" / "clip_g_hidream-tiny.safetensors",
             "t5xxl": models_dir / "text_encoders" / "t5xxl_hidream-tiny.safetensors",
             "llama": models_dir / "text_encoders" / "llama_3.1_8b_instruct_fp8_scaled-tiny.safetensors",
             "vae": models_dir / "vae" / "ae-hidream-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_hidream(paths["unet"], seed=seed, dtype=dtype)
    for offset, kind in enumerate(("clip_l", "clip_g"), start=1):  # the tiny widths are not the released ones:
        write_safetensors(random_clip(kind, seed + offset).state_dict(), paths[kind],  # the metadata says which
                          {"loom.text_encoder": kind}, dtype)
    t5 = {k: v for k, v in random_t5(seed + 3).state_dict().items() if k != "encoder.embed_tokens.weight"}
    write_safetensors(t5, paths["t5xxl"], {}, dtype)
    write_tiny_llama(paths["llama"], seed=seed + 4, dtype=dtype, hidden=TINY_HIDREAM.llama_dim,
                     layers=TINY_LLAMA_LAYERS, fp8=True)
    vae = randomize_(AutoencoderKL(TINY_FLUX_VAE), torch.Generator().manual_seed(seed + 5))
    write_safetensors(vae.state_dict(), paths["vae"], {}, dtype)
    return paths
