"""Tiny random-weight Qwen-Image files in the layouts ComfyUI users have, for tests and for trying its workflows here:
the transformer, the Qwen2.5-VL text encoder, the VAE (Wan 2.1's architecture, as Qwen-Image's is), InstantX's union
ControlNet and DiffSynth's blockwise (canny) ControlNet model patch; Qwen-Image-Layered's transformer and RGBA
VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.controlnet_diffsynth import write_tiny_diffsynth_controlnet
from ldm.controlnet_qwen_image import write_tiny_qwen_image_controlnet
from ldm.qwen_image_files import TINY_QWEN_IMAGE_LAYERED, write_tiny_qwen_image
from ldm.qwen_text import write_tiny_qwen25vl
from ldm.wan_vae_files import write_tiny_wan_vae


def make_qwen_image_files(models_dir: str | Path, seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Write tiny random Qwen-Image files into the model folders under `models_dir`, named like Comfy-Org's with
    `-tiny`; returns each file's path by part ("unet", "qwen25vl", "vae", "controlnet", "diffsynth", and Qwen-Image-
    Layered's "layered_unet" and "layered_vae"). The pictures they make are noise."""
    models_dir = Path(models_dir)
    paths = {"unet": models_dir / "diffusion_models" / "qwen_image-tiny.safetensors",
             "qwen25vl": models_dir / "text_encoders" / "qwen_2.5_vl_7b-tiny.safetensors",
             "vae": models_dir / "vae" / "qwen_image_vae-tiny.safetensors",
             "controlnet": models_dir / "controlnet" / "Qwen-Image-InstantX-ControlNet-Union-tiny.safetensors",
             "diffsynth": models_dir / "model_patches" / "qwen_image_canny_diffsynth_controlnet-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_qwen_image(paths["unet"], seed=seed, dtype=dtype)
    write_tiny_qwen25vl(paths["qwen25vl"], seed=seed + 1, dtype=dtype)
    write_tiny_wan_vae(paths["vae"], version="2.1", seed=seed + 2)
    write_tiny_qwen_image_controlnet(paths["controlnet"], seed=seed + 3, dtype=dtype)
    write_tiny_diffsynth_controlnet(paths["diffsynth"], seed=seed + 4, dtype=dtype)
    layered = make_qwen_image_layered_files(models_dir, seed=seed + 5, dtype=dtype)
    return {**paths, "layered_unet": layered["unet"], "layered_vae": layered["vae"]}


def make_qwen_image_layered_files(models_dir: str | Path, seed: int = 0,
                                  dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Write tiny random Qwen-Image-Layered files (the transformer and its RGBA VAE; the text encoder is
    Qwen-Image's, `make_qwen_image_files`) named like Comfy-Org's with `-tiny`; returns their paths by part ("unet",
    "vae")."""
    models_dir = Path(models_dir)
    paths = {"unet": models_dir / "diffusion_models" / "qwen_image_layered-tiny.safetensors",
             "vae": models_dir / "vae" / "qwen_image_layered_vae-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_qwen_image(paths["unet"], seed=seed, dtype=dtype, config=TINY_QWEN_IMAGE_LAYERED)
    write_tiny_wan_vae(paths["vae"], version="qwen-layered", seed=seed + 1)
    return paths


def make_qwen_image21_files(models_dir: str | Path, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Write tiny random Qwen-Image 2.1 files (the transformer, Qwen3-VL-8B's stand-in with its vision tower, the
    RGBA VAE) named like Comfy-Org's with `-tiny`; returns their paths by part ("unet", "qwen3vl", "vae")."""
    from ldm.qwen3vl_text import write_tiny_qwen3vl
    from ldm.qwen_image21 import write_tiny_qwen_image21
    from ldm.qwen_image21_vae import write_tiny_qwen_image21_vae

    models_dir = Path(models_dir)
    paths = {"unet": models_dir / "diffusion_models" / "qwen_image_2.1-tiny.safetensors",
             "qwen3vl": models_dir / "text_encoders" / "qwen3vl_8b-tiny.safetensors",
             "vae": models_dir / "vae" / "qwen_image_2.1_vae-tiny.safetensors"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_qwen_image21(paths["unet"], seed=seed, dtype=dtype)
    write_tiny_qwen3vl(paths["qwen3vl"], seed=seed + 1, dtype=dtype)
    write_tiny_qwen_image21_vae(paths["vae"], seed=seed + 2)
    return paths
