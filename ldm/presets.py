"""Random-weight checkpoint presets (tiny models for tests, full SD1.5 and SDXL sizes for benchmarks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ldm.unet import ADM_NUMBERS, UNetConfig, UNetModel
from ldm.vae import AutoencoderKL, VAEConfig

_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)

# (family, prediction, UNet config, VAE config). The context and pooled widths written here are those
# of the preset text encoders; make_checkpoint takes them from the text encoder it builds all the same,
# so the parts always fit together.
PRESETS: dict[str, tuple[str, str, UNetConfig, VAEConfig]] = {
    "tiny-sd1": ("sd1", "eps", UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
        num_heads=4, context_dim=32), _TINY_VAE),
    "tiny-sd2": ("sd2", "v", UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
        num_head_channels=16, context_dim=32, use_linear_in_transformer=True), _TINY_VAE),
    "tiny-sdxl": ("sdxl", "eps", UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 2),
        transformer_depth_middle=2, num_head_channels=16, context_dim=32 + 48,
        use_linear_in_transformer=True, adm_in_channels=48 + 6 * 256),
        dataclasses.replace(_TINY_VAE, scaling_factor=0.13025)),
    "tiny-sdxl-refiner": ("sdxl_refiner", "eps", UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 1),
        transformer_depth_middle=1, num_head_channels=16, context_dim=48, use_linear_in_transformer=True,
        adm_in_channels=48 + 5 * 256), dataclasses.replace(_TINY_VAE, scaling_factor=0.13025)),
    "sd15": ("sd1", "eps", UNetConfig(), VAEConfig()),
    "sdxl": ("sdxl", "eps", UNetConfig(
        model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 2, 10),
        transformer_depth_middle=10, num_head_channels=64, context_dim=2048, use_linear_in_transformer=True,
        adm_in_channels=2816), VAEConfig(scaling_factor=0.13025)),
    "sdxl-refiner": ("sdxl_refiner", "eps", UNetConfig(
        model_channels=384, channel_mult=(1, 2, 4, 4), num_res_blocks=2, transformer_depth=(0, 4, 4, 0),
        transformer_depth_middle=4, num_head_channels=64, context_dim=1280, use_linear_in_transformer=True,
        adm_in_channels=2560), VAEConfig(scaling_factor=0.13025)),
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


def build_preset(preset: str, seed: int = 0, text_encoder: bool = True
                 ) -> tuple[str, str, UNetModel, AutoencoderKL, nn.Module | None]:
    """(family, prediction, unet, vae, text_encoder or None) with seeded random weights."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    family, prediction, unet_config, vae_config = PRESETS[preset]
    generator = torch.Generator().manual_seed(seed)
    te = None
    if text_encoder:
        from ldm.text_encoders import build_text_encoder, random_text_encoder_config

        te = build_text_encoder(random_text_encoder_config(preset))
        te.init_random_weights(seed)
        widths = {"context_dim": te.config.context_dim}
        if unet_config.adm_in_channels is not None:
            widths["adm_in_channels"] = te.config.pooled_dim + ADM_NUMBERS[family] * 256
        unet_config = dataclasses.replace(unet_config, **widths)
    unet = randomize_(UNetModel(unet_config), generator)
    vae = randomize_(AutoencoderKL(vae_config), generator)
    return family, prediction, unet, vae, te


def make_controlnet(preset: str, path: str | Path, seed: int = 0, dtype: torch.dtype | None = None,
                    union_types: int = 0) -> Path:
    """Write a random-weight LDM-layout ControlNet that fits `make_checkpoint(preset)`'s UNet (fp16 unless
    `dtype` says). Its zero convolutions are random too, so it visibly changes what the UNet makes.
    With `union_types`, a ControlNet Union (`ldm.controlnet_union`) with that many control types."""
    from ldm.controlnet import ControlNet, save_controlnet
    from ldm.controlnet_union import UnionControlNet

    _, _, unet, _, _ = build_preset(preset, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    controlnet = randomize_(UnionControlNet(unet.config, union_types) if union_types else ControlNet(unet.config),
                            generator)
    # He-scaled hint encoder and zero convolutions: randomize_'s small weights would shrink the hint
    # to nothing over its eight convolutions, and the hint is what a ControlNet is for.
    with torch.no_grad():
        for conv in [*controlnet.input_hint_block, *controlnet.zero_convs, *controlnet.middle_block_out]:
            if isinstance(conv, nn.Sequential):
                conv = conv[0]
            if isinstance(conv, nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
    return save_controlnet(path, controlnet, dtype or torch.float16)


def make_checkpoint(preset: str, path: str | Path, seed: int = 0, text_encoder: bool = True,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a random-weight single-file LDM checkpoint for `preset`, stored in fp16 unless `dtype` says.

    fp16 halves the files (the tiny ones are mostly CLIP's 49,408-token embedding table).
    """
    from ldm.checkpoint import save_checkpoint

    family, prediction, unet, vae, te = build_preset(preset, seed, text_encoder)
    dtype = dtype or torch.float16
    metadata = {"loom.preset": preset, "loom.seed": str(seed), "loom.family": family,
                "loom.prediction": prediction,
                "loom.unet_config": json.dumps(dataclasses.asdict(unet.config))}
    return save_checkpoint(path, unet, vae, te, metadata, dtype=dtype)
