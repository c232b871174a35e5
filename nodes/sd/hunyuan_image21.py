"""HunyuanImage 2.1's nodes, as ComfyUI's (comfy_extras/nodes_hunyuan.py), and what the sampler feeds the model.

Latents: the VAE's 64 channels at 1/32 of the picture (EmptyHunyuanImageLatent; an EmptyLatentImage's is refitted by
the sampler). Prompts: CLIPTextEncode with DualCLIPLoader type hunyuan_image. The distilled model takes a guidance
strength: the prompt's own (FluxGuidance sets it), else ComfyUI's default 6; the base model takes none.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.hunyuan_image21_files import DEFAULT_GUIDANCE, LATENT_CHANNELS, LATENT_DOWNSCALE
from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION
from nodes.sd.models import DiffusionModel
from nodes.spec import Int, Output


class EmptyHunyuanImageLatent(Node):
    """An empty (zero) HunyuanImage 2.1 latent: 64 channels at 1/32 of the picture."""

    display_name = "Empty HunyuanImage Latent"
    category = "latent"
    width = Int(2048, min=64, max=MAX_RESOLUTION, step=32)
    height = Int(2048, min=64, max=MAX_RESOLUTION, step=32)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        shape = (batch_size, LATENT_CHANNELS, height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE)
        return ({"samples": torch.zeros(shape), "downscale_ratio_spacial": LATENT_DOWNSCALE},)


def check_latent(model: DiffusionModel, samples: torch.Tensor) -> None:
    """Refuse a latent of another model's VAE (a video latent, or other channels) by name."""
    if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"{model.source} is HunyuanImage 2.1, which samples its VAE's {LATENT_CHANNELS}-channel "
                         f"picture latents; the latent {tuple(samples.shape)} is another model's: make it with "
                         "EmptyHunyuanImageLatent or HunyuanImage 2.1's VAE")


def hunyuan_image21_conditioning(conditioning: list, model: DiffusionModel) -> list:
    """Each entry with the distilled model's `y` [B, 1]: its guidance strength (FluxGuidance's, else 6); unchanged
    for the base model."""
    if not model.family.unet_config.guidance_embed:
        return conditioning
    out = []
    for embedding, options in conditioning:
        guidance = options.get("guidance")
        strength = DEFAULT_GUIDANCE if guidance is None else float(guidance)
        out.append((embedding, {**options, "y": torch.full((embedding.shape[0], 1), strength)}))
    return out


NODES: list[Any] = [EmptyHunyuanImageLatent]
