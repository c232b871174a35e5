"""HunyuanVideo 1.5's 1080p latent upsampler: a causal 3-D convolutional network that refines a raw 32-channel
video latent [B, 32, T, h, w] already resized to the target grid, keeping its shape (it has no resampling layer of
its own; ComfyUI's HunyuanVideo15LatentUpscaleWithModel resizes first, Tencent's SRTo1080pUpsampler resizes
bilinearly inside when given a target shape).

Weights: Comfy-Org's split_files/latent_upscale_models/hunyuanvideo15_latent_upsampler_1080p.safetensors keeps
Tencent's keys (upsampler/1080p_sr_distilled in tencent/HunyuanVideo-1.5), no prefix; module names here are the
file's, so it loads as it is:

    conv_in.conv.weight                     [C0, 32, 3, 3, 3]   (+ .bias)
    up.{i}.block.{j}.norm1.gamma            [C_in, 1, 1, 1]     (conv1.conv, norm2.gamma, conv2.conv as well)
    up.{i}.block.0.nin_shortcut.weight      [C_i, C_in, 1, 1, 1] (+ .bias) where the stage changes the width
    norm_out.gamma, conv_out.conv.weight    [32, C_last, 3, 3, 3]

with `num_res_blocks + 1` = 3 blocks (j = 0..2) in each stage i. ComfyUI's loader reads z_channels, out_channels and
the stage widths from those shapes (and renames `nin_shortcut` to `nin_shortcut.conv` for its own wrapper, a name
accepted here too). The widths are not in the file's metadata; the default (256, 512) is inferred from the file's
size (about 201 MB = 50.35M float32 parameters, which that config gives exactly), not read from its header.

The network (Tencent's hyvideo/models/transformers/modules/upsample.py SRTo1080pUpsampler; ComfyUI's
comfy/ldm/hunyuan_video/upsampler.py Upsampler, the same): x = conv_in(z) + z repeated channel-wise (each latent
channel C0/32 times in a row); then the stages' resnet blocks (RMS norm, SiLU, causal 3x3x3 conv, twice, plus the
input, through a 1x1x1 conv where the width changes); out = conv_out(SiLU(norm_out(x))), with no global residual
(Tencent's config flag `is_residual` is stored but never used). The layers are those of HunyuanVideo 1.5's VAE
(ldm.hunyuan_video15_vae): every 3x3x3 conv is causal, padded by repeating the first frame twice in front and the
edge pixels around; the norms scale L2-normalised channels by sqrt(channels) and a gain `gamma`. Every layer being
causal in time, an output frame depends only on that frame and the earlier ones.

No diffusers or transformers class implements it; tests/ldm/test_hunyuan_video15_upsampler.py checks it against a
forward written from torch.nn.functional calls alone and against diffusers' HunyuanVideo 1.5 VAE building blocks
assembled in Tencent's order.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.hunyuan_video15_vae import CausalConv3d
from ldm.wan_vae import RMSNorm
from ldm.wan_vae_files import randomized_

# ComfyUI's LatentUpscaleModelLoader tells these files by the first key; the others rule out look-alikes.
_MARKERS = ("up.0.block.0.conv1.conv.weight", "conv_in.conv.weight", "norm_out.gamma", "conv_out.conv.weight")


@dataclass(frozen=True)
class HunyuanVideo15UpsamplerConfig:
    """Sizes of the upsampler; the defaults are the released 1080p file's (widths inferred from its size)."""

    block_out_channels: tuple[int, ...] = (256, 512)  # one stage per width
    num_res_blocks: int = 2  # a stage holds one more block than this, as Tencent's and ComfyUI's count
    z_channels: int = 32
    out_channels: int = 32

    def __post_init__(self) -> None:
        widths = self.block_out_channels
        if not widths or min(widths) < 1 or self.num_res_blocks < 0 or self.z_channels < 1 or self.out_channels < 1:
            raise ValueError(f"invalid HunyuanVideo 1.5 upsampler sizes: {self}")
        if widths[0] % self.z_channels:
            raise ValueError(f"the first width {widths[0]} must be a multiple of the latent channels "
                             f"({self.z_channels}): the input is added repeated channel-wise")


HUNYUAN_VIDEO15_UPSAMPLER_CONFIG = HunyuanVideo15UpsamplerConfig()


def tiny_config() -> HunyuanVideo15UpsamplerConfig:
    """Two stages at a few channels (the second changing the width), 32 latent channels: tests and examples."""
    return HunyuanVideo15UpsamplerConfig(block_out_channels=(64, 96))


class ResnetBlock(nn.Module):
    """RMS norm, SiLU, causal conv, twice, plus the input (through `nin_shortcut`, a 1x1x1 conv, when the width
    changes). The VAE's blocks never change width, hence this one."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim)
        self.nin_shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class Stage(nn.Module):
    """One width's run of resnet blocks (`block`, as the file nests them); the first takes the previous width."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x


class HunyuanVideo15Upsampler(nn.Module):
    """Raw HunyuanVideo 1.5 latents [B, z_channels, T, h, w], already resized to the target grid -> refined raw
    latents [B, out_channels, T, h, w]."""

    def __init__(self, config: HunyuanVideo15UpsamplerConfig = HUNYUAN_VIDEO15_UPSAMPLER_CONFIG):
        super().__init__()
        self.config = config
        widths = config.block_out_channels
        self.conv_in = CausalConv3d(config.z_channels, widths[0])
        self.up = nn.ModuleList(Stage(widths[max(i - 1, 0)], width, config.num_res_blocks + 1)
                                for i, width in enumerate(widths))
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.conv.weight.device

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        if z.ndim != 5 or z.shape[1] != c.z_channels:
            raise ValueError(f"the HunyuanVideo 1.5 latent upsampler takes latents [B, {c.z_channels}, T, h, w], "
                             f"got {list(z.shape)}")
        x = self.conv_in(z) + z.repeat_interleave(c.block_out_channels[0] // c.z_channels, dim=1)
        for stage in self.up:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(x)))

    @torch.no_grad()
    def resample_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """ComfyUI's HunyuanVideo15SRModel.resample_latent: the network on a raw latent [B, 32, T, h, w] already
        resized to the target grid, run on the upsampler's device in its dtype; returned in the input's dtype on
        the input's device, same shape."""
        return self(latent.to(self.device, self.dtype)).to(latent.device, latent.dtype)


# --- files -----------------------------------------------------------------------------------------------------


def is_hunyuan_video15_upsampler(sd: Collection[str]) -> bool:
    """Whether a state dict (or its keys, or `ckpt.read_shapes`' meta tensors) is HunyuanVideo 1.5's 1080p latent
    upsampler: top-level `conv_in.conv` / `up.N.block.M` / `norm_out.gamma` / `conv_out.conv`. Lightricks' latent
    upsamplers (`initial_conv`, `res_blocks`), HunyuanVideo 1.5's VAE (all under `encoder.` / `decoder.`) and its
    720p SR upsampler (`in_conv`, `blocks`) lack these keys."""
    return all(k in sd for k in _MARKERS)


def _indices(keys: Collection[str], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m[1]) for k in keys if (m := pattern.match(k))})


def _file_names(sd: StateDict) -> StateDict:
    """ComfyUI's in-memory names (`nin_shortcut.conv.*`, its conv wrapper's) back to the file's."""
    return {k.replace(".nin_shortcut.conv.", ".nin_shortcut."): v for k, v in sd.items()}


def config_from_state_dict(sd: StateDict) -> HunyuanVideo15UpsamplerConfig:
    """The sizes of a HunyuanVideo 1.5 latent upsampler in the file's layout, read from its shapes (tensors or meta
    tensors); ValueError when it is not one or its shapes are not those of the config they imply."""
    if not is_hunyuan_video15_upsampler(sd):
        raise ValueError("no HunyuanVideo 1.5 latent upsampler weights (conv_in.conv, up.0.block.0.conv1.conv, "
                         "norm_out.gamma, conv_out.conv)")
    stages = _indices(sd, "up.")
    blocks = _indices(sd, "up.0.block.")
    if stages != list(range(len(stages))) or blocks != list(range(len(blocks))):
        raise ValueError("the upsampler's stages and blocks are not numbered 0..n")
    config = HunyuanVideo15UpsamplerConfig(
        block_out_channels=tuple(sd[f"up.{i}.block.0.conv1.conv.weight"].shape[0] for i in stages),
        num_res_blocks=len(blocks) - 1, z_channels=sd["conv_in.conv.weight"].shape[1],
        out_channels=sd["conv_out.conv.weight"].shape[0])
    ckpt.check_fit(lambda: HunyuanVideo15Upsampler(config), sd, config)
    return config


def peek_hunyuan_video15_upsampler(path: str | Path) -> bool:
    """Whether a .safetensors file is HunyuanVideo 1.5's latent upsampler, from its header alone."""
    try:
        shapes = ckpt.read_shapes(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return shapes is not None and is_hunyuan_video15_upsampler(shapes)


def load_hunyuan_video15_upsampler(path_or_state_dict: str | Path | StateDict, device: torch.device | str = "cpu",
                                   dtype: torch.dtype = torch.float32) -> HunyuanVideo15Upsampler:
    """HunyuanVideo 1.5's latent upsampler from its file (or its tensors), on `device` in `dtype`, frozen;
    CheckpointError naming the problem for anything else (other models, missing, leftover or misshapen weights)."""
    if isinstance(path_or_state_dict, dict):
        sd, path = path_or_state_dict, Path("state dict")
    else:
        path = Path(path_or_state_dict)
        sd = ckpt.load_state_dict(path)
    sd = _file_names(sd)
    try:
        config = config_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{path.name}: not HunyuanVideo 1.5's latent upsampler: {e}") from None
    return ckpt._materialize(lambda: HunyuanVideo15Upsampler(config), sd, "HunyuanVideo 1.5 latent upsampler", path,
                             device, dtype)


def tiny_state_dict(seed: int = 0) -> StateDict:
    """Seeded random weights of `tiny_config()` in the file's layout (norm gains near 1, small biases, weights at
    1/sqrt(fan-in), so activations stay in range)."""
    return randomized_(HunyuanVideo15Upsampler(tiny_config()), seed).state_dict()
