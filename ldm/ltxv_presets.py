"""Tiny random-weight LTX-Video 0.9.1 files in the real layouts, for tests and trying workflows without downloads.

`make_ltxv_files(models_dir)` writes what a ComfyUI user's LTX-Video setup holds, tiny: the all-in-one checkpoint
(models/checkpoints: the transformer under `model.diffusion_model.`, a 0.9.1 causal video VAE, with latent statistics
that are neither zeros nor ones, under `vae.`) and T5-XXL in transformers' layout (models/text_encoders), as wide as
the transformer's caption input. The videos are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.checkpoint import write_safetensors
from ldm.flux_presets import TINY_T5, distinct_random_
from ldm.ltxv_files import TINY_LTXV, write_tiny_ltxv
from ldm.ltxv_vae import TINY_LTXV_VAES, random_ltxv_vae
from ldm.t5 import build_t5

CHECKPOINT = "ltx-video-2b-v0.9.1-tiny.safetensors"
T5XXL = "t5xxl-ltxv-tiny.safetensors"
_T5_NORMS = ("layer_norm.weight", "final_layer_norm.weight")


def random_ltxv_t5(seed: int = 0) -> torch.nn.Module:
    """transformers' T5EncoderModel of Flux's tiny T5 shape (as wide as TINY_LTXV's captions), every weight seeded
    and distinct, its norm scales too."""
    return distinct_random_(build_t5(TINY_T5).model.eval(), seed, norm_scales=_T5_NORMS)


def make_ltxv_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write tiny LTX-Video files into the model folders under `models_dir`; returns each file's path by part:
    "checkpoint" (checkpoints/ltx-video-2b-v0.9.1-tiny.safetensors) and "t5xxl"
    (text_encoders/t5xxl-ltxv-tiny.safetensors). Weights are stored in `dtype` (fp16 unless said)."""
    models_dir = Path(models_dir)
    paths = {"checkpoint": models_dir / "checkpoints" / CHECKPOINT, "t5xxl": models_dir / "text_encoders" / T5XXL}
    vae = random_ltxv_vae(TINY_LTXV_VAES["0.9.1"], seed + 1)
    write_tiny_ltxv(paths["checkpoint"], seed, dtype, TINY_LTXV, vae)
    state = {k: v for k, v in random_ltxv_t5(seed + 2).state_dict().items() if k != "encoder.embed_tokens.weight"}
    write_safetensors(state, paths["t5xxl"], {"loom.seed": str(seed + 2)}, dtype)
    return paths
