"""Random-weight checkpoint presets (tiny models for tests, full SD1.5 size for benchmarks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ldm.unet import UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)

# (family, prediction, UNet config, VAE config). Context and pooled widths of the tiny models are
# replaced by those of the text encoder built for the preset, so the three always fit together.
PRESETS: dict[str, tuple[str, str, UNetConfig, VAEConfig]] = {
    "tiny-sd1": ("sd1", "eps", UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
        num_heads=4, context_dim=32), _TINY_VAE),
    "tiny-sd2": ("sd2", "v", UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
        num_head_channels=16, context_dim=64, use_linear_in_transformer=True), _TINY_VAE),
    "tiny-sdxl": ("sdxl", "eps", UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 2),
        transformer_depth_middle=2, num_head_channels=16, context_dim=96,
        use_linear_in_transformer=True, adm_in_channels=64 + 6 * 256),
        dataclasses.replace(_TINY_VAE, scaling_factor=0.13025)),
    "sd15": ("sd1", "eps", UNetConfig(), VAEConfig()),
}


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> nn.Module:
    """Seeded small-std normal weights, unit norm scales and zero biases: finite, non-degenerate outputs.

    Output projections feeding a residual get a smaller std so deep stacks do not blow up.
    """
    for name, param in module.named_parameters():
        if isinstance(_owner(module, name), nn.GroupNorm | nn.LayerNorm):
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            fan_in = param[0].numel() if param.ndim > 1 else 1
            scale = min(std, fan_in ** -0.5)
            if any(part in name for part in ("out_layers.3", "proj_out", "to_out", "conv2", "net.2")):
                scale *= 0.5
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return module


def _owner(module: nn.Module, param_name: str) -> nn.Module:
    return module.get_submodule(param_name.rpartition(".")[0])


def _text_encoder_widths(preset: str, te_state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Context (and pooled) widths the UNet needs, read off the text encoder's LDM keys."""
    def width(key: str) -> int:
        return te_state[key].shape[0]

    if preset.endswith("sdxl"):
        clip_l = width("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight")
        big_g = width("conditioner.embedders.1.model.ln_final.weight")
        pooled = te_state["conditioner.embedders.1.model.text_projection"].shape[1]
        return {"context_dim": clip_l + big_g, "adm_in_channels": pooled + 6 * 256}
    if preset.endswith("sd2"):
        return {"context_dim": width("cond_stage_model.model.ln_final.weight")}
    return {"context_dim": width("cond_stage_model.transformer.text_model.final_layer_norm.weight")}


def build_preset(preset: str, seed: int = 0, text_encoder: bool = True):
    """(family, prediction, unet, vae, text_encoder or None) with seeded random weights."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    family, prediction, unet_config, vae_config = PRESETS[preset]
    generator = torch.Generator().manual_seed(seed)
    te = None
    if text_encoder:
        from ldm.text_encoders import build_text_encoder, random_text_encoder_config

        te = randomize_(build_text_encoder(random_text_encoder_config(preset)), generator)
        unet_config = dataclasses.replace(unet_config, **_text_encoder_widths(preset, te.ldm_state_dict()))
    unet = randomize_(UNetModel(unet_config), generator)
    vae = randomize_(AutoencoderKL(vae_config), generator)
    return family, prediction, unet, vae, te


def make_checkpoint(preset: str, path: str | Path, seed: int = 0, text_encoder: bool = True,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a random-weight single-file LDM checkpoint for `preset` (sd15 is stored in fp16)."""
    from ldm.checkpoint import save_checkpoint

    family, prediction, unet, vae, te = build_preset(preset, seed, text_encoder)
    dtype = dtype or (torch.float16 if preset == "sd15" else torch.float32)
    metadata = {"loom.preset": preset, "loom.seed": str(seed), "loom.family": family,
                "loom.prediction": prediction,
                "loom.unet_config": json.dumps(dataclasses.asdict(unet.config))}
    return save_checkpoint(path, unet, vae, te, metadata, dtype=dtype)
