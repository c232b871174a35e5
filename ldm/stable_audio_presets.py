"""Tiny random-weight Stable Audio Open files in the layouts ComfyUI users have, for tests and for trying its workflow
here: the single checkpoint (the transformer, its seconds conditioners and the Oobleck VAE under
`pretransform.model.`, Stability's names) and T5-base (transformers' layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.oobleck import SAO_PREFIX, tiny_oobleck_weights
from ldm.stable_audio import StableAudioConfig, write_tiny_stable_audio
from ldm.stable_audio_text import TINY_T5_BASE_WIDTH, write_tiny_t5_base

# A few channels a layer, with the released 64 latent channels (those of ldm.oobleck.TINY_OOBLECK's latents) and a
# prompt input as wide as the tiny T5-base.
TINY_STABLE_AUDIO_MODEL = StableAudioConfig(io_channels=64, embed_dim=128, depth=2, cond_token_dim=TINY_T5_BASE_WIDTH,
                                            global_cond_dim=2 * TINY_T5_BASE_WIDTH,
                                            number_embed_dim=TINY_T5_BASE_WIDTH)


def make_stable_audio_files(models_dir: str | Path, seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write tiny random Stable Audio Open files into the model folders under `models_dir`, named like the released
    ones with `-tiny`; returns each file's path by part ("checkpoint", "t5base"). Their audio is noise."""
    models_dir = Path(models_dir)
    paths = {"checkpoint": models_dir / "checkpoints" / "stable-audio-open-1.0-tiny.safetensors",
             "t5base": models_dir / "text_encoders" / "t5_base-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_stable_audio(paths["checkpoint"], seed=seed, dtype=dtype, config=TINY_STABLE_AUDIO_MODEL,
                            extra=tiny_oobleck_weights(SAO_PREFIX, seed + 1))
    write_tiny_t5_base(paths["t5base"], seed=seed + 2, dtype=dtype)
    return paths
