"""Qwen-Image-Layered's latent: EmptyQwenImageLayeredLatentImage, under ComfyUI's name and inputs.

Qwen-Image-Layered samples a picture and its layers together: a LATENT [B, 16, layers + 1, H/8, W/8] whose first
frame is the whole picture and the rest its layers (RGBA), the frames axis a video latent's. The model is Qwen-Image's
with a layer-aware position embedding (`ldm.qwen_image`, loaded by UNETLoader from qwen_image_layered_*.safetensors),
the VAE Wan 2.1's with four channels (`ldm.wan_vae`, qwen_image_layered_vae.safetensors); ComfyUI's template cuts
the frames into a batch (LatentCutToBatch, dim t) and decodes each to an RGBA picture. To split a given picture into
layers, its latent (VAEEncode with that VAE) goes to both prompts through ReferenceLatent.
"""

from __future__ import annotations

import torch

from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION
from nodes.spec import Int, Output

LATENT_CHANNELS = 16  # Wan 2.1's latent space, which Qwen-Image's VAEs share


class EmptyQwenImageLayeredLatentImage(Node):
    """Noise-to-be for Qwen-Image-Layered: a `width` x `height` picture and `layers` layers of it, as frames of one
    latent (the picture first)."""

    category = "latent/qwen"
    width = Int(640, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(640, min=16, max=MAX_RESOLUTION, step=16)
    layers = Int(3, min=0, max=MAX_RESOLUTION, step=1, tooltip="how many layers beside the whole picture")
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, layers: int, batch_size: int) -> tuple[dict]:
        return ({"samples": torch.zeros(batch_size, LATENT_CHANNELS, layers + 1, height // 8, width // 8)},)


NODES = [EmptyQwenImageLayeredLatentImage]
