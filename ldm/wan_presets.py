"""Tiny random-weight Wan files in the layouts ComfyUI users have, for tests and for trying the workflows here:
text-to-video, image-to-video and VACE transformers, UMT5-XXL, Wan 2.1's VAE and a CLIP vision tower for image
prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.checkpoint import write_safetensors
from ldm.umt5 import write_tiny_umt5
from ldm.wan_files import tiny_wan_config, write_tiny_wan
from ldm.wan_vae_files import write_tiny_wan_vae

# The tiny image-to-video transformer's CLIP width (its img_emb input): the tiny vision tower's hidden size.
TINY_CLIP_VISION_WIDTH = tiny_wan_config("i2v").clip_dim


def write_tiny_clip_vision(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A tiny CLIP ViT in transformers' layout (as clip_vision_h.safetensors holds the real ViT-H/14), whose
    penultimate states are TINY_CLIP_VISION_WIDTH wide, as the tiny i2v transformer takes them."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=TINY_CLIP_VISION_WIDTH, intermediate_size=40, num_hidden_layers=3,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16,
                              hidden_act="gelu")
    model = CLIPVisionModelWithProjection(config).eval()
    write_safetensors(dict(model.state_dict()), Path(path), {"loom.seed": str(seed)}, dtype)
    return Path(path)


def make_wan_files(models_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write tiny random Wan 2.1 files into the model folders under `models_dir`, named like ComfyUI's repackaged
    ones with `-tiny`; returns each file's path by part. The videos they make are noise."""
    models_dir = Path(models_dir)
    paths = {"t2v": models_dir / "diffusion_models" / "wan2.1_t2v-tiny.safetensors",
             "i2v": models_dir / "diffusion_models" / "wan2.1_i2v-tiny.safetensors",
             "vace": models_dir / "diffusion_models" / "wan2.1_vace-tiny.safetensors",
             "camera": models_dir / "diffusion_models" / "wan2.1_fun_camera-tiny.safetensors",
             "umt5xxl": models_dir / "text_encoders" / "umt5_xxl-tiny.safetensors",
             "vae": models_dir / "vae" / "wan_2.1_vae-tiny.safetensors",
             "clip_vision": models_dir / "clip_vision" / "clip_vision_h-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_wan(paths["t2v"], "t2v", seed=seed, dtype=dtype)
    write_tiny_wan(paths["i2v"], "i2v", seed=seed + 1, dtype=dtype)
    write_tiny_wan(paths["vace"], "vace", seed=seed + 3, dtype=dtype)
    write_tiny_wan(paths["camera"], "camera", seed=seed + 4, dtype=dtype)
    write_tiny_umt5(paths["umt5xxl"], seed=seed, dtype=dtype)
    write_tiny_wan_vae(paths["vae"], version="2.1", seed=seed)
    write_tiny_clip_vision(paths["clip_vision"], seed=seed, dtype=dtype)
    return paths
