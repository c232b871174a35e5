"""Wan VAE files (wan_2.1_vae.safetensors, wan2.2_vae.safetensors, the original .pth): telling them, their config
from the weights' shapes, loading, and tiny random-weight ones for tests.

The files hold the original Wan keys, unprefixed: `encoder.conv1`, `encoder.downsamples.N...`, `encoder.middle`,
`encoder.head`, `conv1` / `conv2` (the 1x1x1 convolutions around the latent), `decoder.*`. Wan 2.2's levels are
nested (`encoder.downsamples.N.downsamples.M...`, `decoder.upsamples.N.upsamples.M...`); Wan 2.1's are one flat list.
Qwen-Image-Layered's RGBA VAE (qwen_image_layered_vae.safetensors) is Wan 2.1's layout with 4 image channels
(`encoder.conv1` takes 4, `decoder.head.2` makes 4); `peek_wan_vae` calls it "wan21", its config's image_channels
tell it apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.wan_vae import WanVAE, WanVAEConfig

# Tiny widths (the real latent channels, so latents fit Wan's per-channel normalisation): tests and examples.
TINY_WAN21 = WanVAEConfig(base_dim=8, decoder_base_dim=8)
TINY_WAN22 = WanVAEConfig(z_dim=48, base_dim=8, decoder_base_dim=12, residual=True, patch_size=2)
TINY_QWEN_LAYERED_VAE = WanVAEConfig(base_dim=8, decoder_base_dim=8, image_channels=4)
_MARKERS = ("encoder.conv1.weight", "decoder.middle.0.residual.0.gamma", "conv2.weight")
_NESTED = "decoder.upsamples.0.upsamples.0.residual.2.weight"  # Wan 2.2's nested levels


def is_wan_vae(keys: Collection[str]) -> bool:
    """Whether a state dict's keys are a Wan VAE's in the original layout."""
    return all(k in keys for k in _MARKERS)


def _indices(keys: Collection[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := regex.match(k))})


def _levels(sd: StateDict) -> tuple[list[list[int]], list[bool]]:
    """The encoder's levels as the output widths of their residual blocks, and whether each level's downsample
    (all but the last level's) is temporal too."""
    widths: list[list[int]] = []
    temporal: list[bool] = []
    nested = _NESTED in sd
    if nested:
        for level in _indices(sd, r"encoder\.downsamples\.(\d+)\."):
            prefix = f"encoder.downsamples.{level}.downsamples."
            layers = _indices(sd, re.escape(prefix) + r"(\d+)\.")
            widths.append([sd[f"{prefix}{j}.residual.2.weight"].shape[0] for j in layers
                           if f"{prefix}{j}.residual.2.weight" in sd])
            resamples = [j for j in layers if f"{prefix}{j}.resample.1.weight" in sd]
            if resamples:
                temporal.append(f"{prefix}{resamples[0]}.time_conv.weight" in sd)
        return widths, temporal
    current: list[int] = []
    for n in _indices(sd, r"encoder\.downsamples\.(\d+)\."):
        prefix = f"encoder.downsamples.{n}."
        if prefix + "residual.2.weight" in sd:
            current.append(sd[prefix + "residual.2.weight"].shape[0])
        elif prefix + "resample.1.weight" in sd:
            widths.append(current)
            temporal.append(prefix + "time_conv.weight" in sd)
            current = []
    return widths + [current], temporal


def wan_vae_config_from_state_dict(sd: StateDict) -> WanVAEConfig:
    """The config of a Wan VAE (2.1 or 2.2, any widths) from its weights' shapes; ValueError if they do not fit."""
    if not is_wan_vae(sd):
        raise ValueError("not a Wan VAE (no encoder.conv1 / decoder.middle / conv2 weights in Wan's layout)")
    in_channels, base_dim = sd["encoder.conv1.weight"].shape[1], sd["encoder.conv1.weight"].shape[0]
    image_channels, patch_size = _pixel_layout(in_channels)
    out_channels = sd["decoder.head.2.weight"].shape[0]
    if out_channels != in_channels:
        raise ValueError(f"the encoder takes {in_channels} channels but the decoder makes {out_channels}")
    widths, temporal = _levels(sd)
    blocks = {len(level) for level in widths}
    if len(blocks) != 1 or 0 in blocks or any(w % base_dim for level in widths for w in level):
        raise ValueError(f"the encoder's levels do not have a Wan layout (residual block widths {widths})")
    return WanVAEConfig(z_dim=sd["conv2.weight"].shape[0], base_dim=base_dim,
                        decoder_base_dim=sd["decoder.head.2.weight"].shape[1],
                        dim_mult=tuple(level[0] // base_dim for level in widths), num_res_blocks=blocks.pop(),
                        temporal_downsample=tuple(temporal), residual=_NESTED in sd, patch_size=patch_size,
                        image_channels=image_channels)


def _pixel_layout(in_channels: int) -> tuple[int, int]:
    """(image channels, patch size) of an encoder taking `in_channels`: RGB or RGBA, each pixel or 2x2 patches."""
    for image_channels in (3, 4):
        patch_size = math.isqrt(in_channels // image_channels)
        if image_channels * patch_size ** 2 == in_channels:
            return image_channels, patch_size
    raise ValueError(f"the encoder takes {in_channels} channels, not 3 (RGB) or 4 (RGBA) times a square patch")


def peek_wan_vae(path: str | Path) -> str | None:
    """"wan21" or "wan22" for a Wan VAE .safetensors file, from its header alone; None for anything else."""
    try:
        shapes = ckpt.read_shapes(path)
    except (CheckpointError, OSError, ValueError):
        return None
    if shapes is None or not is_wan_vae(shapes):
        return None
    return "wan22" if _NESTED in shapes else "wan21"


def load_wan_vae(path_or_state_dict: str | Path | StateDict, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> WanVAE:
    """A Wan VAE from its file (or its tensors), on `device` in `dtype`, frozen; CheckpointError naming the problem
    for a file that is not one, lacks weights, or holds weights the detected layout has no place for."""
    if isinstance(path_or_state_dict, dict):
        sd, path = path_or_state_dict, Path("state dict")
    else:
        path = Path(path_or_state_dict)
        sd = ckpt.load_state_dict(path)
    if not is_wan_vae(sd):
        raise CheckpointError(f"{path.name}: not a Wan VAE (no encoder.conv1 / decoder.middle / conv2 weights in "
                              "Wan's original layout)")
    try:
        config = wan_vae_config_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    vae = ckpt._materialize(lambda: WanVAE(config), sd, "Wan VAE", path, device, dtype)
    unused = sorted(set(sd) - set(vae.state_dict()))
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise CheckpointError(f"{path.name}: {len(unused)} weights have no place in a Wan VAE: {shown}")
    return vae


def random_wan_vae(config: WanVAEConfig, seed: int = 0) -> WanVAE:
    """A WanVAE with seeded random weights that keep activations in range (norm gains near 1, small biases)."""
    return randomized_(WanVAE(config), seed)


def randomized_(model: nn.Module, seed: int) -> nn.Module:
    """A Wan-style VAE (`gamma` norm gains) given seeded random weights that keep activations in range (gains near
    1, small biases, weights at 1/sqrt(fan-in)); frozen, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.02 * noise)
            else:
                param.copy_(noise * param[0].numel() ** -0.5)
    return model.eval().requires_grad_(False)


def write_tiny_wan_vae(path: str | Path, version: str = "2.1", seed: int = 0) -> Path:
    """A tiny Wan VAE file ("2.1": 16 latent channels, "2.2": 48 and 2x2 patches, "qwen-layered": Wan 2.1's with
    RGBA pixels) with random weights in the original key layout, as ComfyUI users' files have them."""
    configs = {"2.1": TINY_WAN21, "2.2": TINY_WAN22, "qwen-layered": TINY_QWEN_LAYERED_VAE}
    if version not in configs:
        raise ValueError(f"version must be one of {sorted(configs)}, not {version!r}")
    ckpt.write_safetensors(random_wan_vae(configs[version], seed).state_dict(), path, {})
    return Path(path)
