"""HunyuanVideo 1.5's causal video VAE: pixels [B, 3, F, H, W] in -1..1 <-> 32-channel latents
[B, 32, 1 + (F-1)/4, H/16, W/16] (16x spatial, 4x temporal compression; F = 1 + 4k, F = 1 for a still image).

Weights: Comfy-Org's split_files/vae/hunyuanvideo15_vae_fp16.safetensors keeps Tencent's original keys (the file
diffusers' convert_hunyuan_video1_5_to_diffusers.py reads; ComfyUI's comfy/ldm/hunyuan_video/vae_refiner.py runs it),
no prefix, 218 tensors; module names and shapes here are that file's, so it loads as it is:

    encoder.conv_in.conv.weight                      [128, 3, 3, 3, 3]
    encoder.down.{0..4}.block.{0,1}.norm1.gamma      [C, 1, 1, 1]   (conv1.conv, norm2.gamma, conv2.conv)
    encoder.down.{0..3}.downsample.conv.conv.weight  [C_next / 4 or C_next / 8, C, 3, 3, 3]
    encoder.mid.block_1 / mid.attn_1 (norm.gamma, q, k, v, proj_out: 1x1x1 Conv3d) / mid.block_2
    encoder.norm_out.gamma, encoder.conv_out.conv.weight  [64, 1024, 3, 3, 3]
    decoder.conv_in.conv.weight                      [1024, 32, 3, 3, 3]
    decoder.mid.*, decoder.up.{0..4}.block.{0,1,2}.*, decoder.up.{0..3}.upsample.conv.conv.weight
    decoder.norm_out.gamma, decoder.conv_out.conv.weight  [3, 128, 3, 3, 3]

diffusers' AutoencoderKLHunyuanVideo15 names the same tensors `down_blocks.N.resnets.M`, `downsamplers.0`,
`up_blocks.N.resnets.M`, `upsamplers.0`, `mid_block.resnets.{0,1}` and `mid_block.attentions.0.to_{q,k,v}`
(`file_from_diffusers` / `diffusers_from_file`). diffusers' AutoencoderKLHunyuanImageRefiner (HunyuanImage 2.1's
refiner VAE) has the very same keys and shapes, so a state dict does not tell the two apart; Comfy-Org's refiner
file is in another layout (`decoder.conv_in.weight`, GroupNorm weights) and is not taken for this one.

The network (Tencent's hunyuanvideo_15_vae.py): every 3x3x3 convolution is causal, padded by repeating the first frame
twice in front and the edge pixels around (replicate); norms are channel RMS norms with a gain (`gamma`).
Resampling folds 2x2 pixels (and 2 frames, for the temporal levels) into channels and back around a convolution,
plus a parameter-free shortcut (channel-group means going down, channel repeats going up); a video's first frame is
resampled in space only. The encoder's last two downsamples and the decoder's first two upsamples are temporal. The
middle holds one attention over all pixels of all frames, causal across frames. The encoder's output adds the
channel-group mean of its input; the decoder's input adds the latent repeated over channels.

Frames go through the resolution levels in chunks, as ComfyUI does: the first frame alone, then 4 frames at a time
(encode) or one latent frame at a time (decode), each causal convolution carrying the last two frames it saw (the
`cache`); memory follows the chunk, not the video. The middle and the output layers see the whole latent. Since every
layer is causal, the chunks give what the whole video at once gives (diffusers' way), to float rounding.

Latents are raw: the model family multiplies them by SCALING_FACTOR (no per-channel mean or std). Checked against
diffusers 0.42's AutoencoderKLHunyuanVideo15 with the same weights (tests/ldm/test_hunyuan_video15_vae.py).
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
from ldm.vae import DiagonalGaussianDistribution
from ldm.wan_vae import RMSNorm
from ldm.wan_vae_files import randomized_

# The latent scale: diffusers' AutoencoderKLHunyuanVideo15 config `scaling_factor` (its pipelines multiply encoded
# latents by it and divide by it before decoding) and ComfyUI's latent_formats.HunyuanVideo15.scale_factor agree.
# Neither applies a per-channel mean or std.
SCALING_FACTOR = 1.03682

# What each layer keeps between the chunks of one pass over a video: a convolution its last input frames, a
# resampler whether it has seen the first frame.
Cache = dict[nn.Module, object]


@dataclass(frozen=True)
class HunyuanVideo15VAEConfig:
    """Sizes of the VAE; the defaults are the released one's. The decoder mirrors the encoder's widths."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 1024, 1024)
    layers_per_block: int = 2  # encoder; the decoder's levels hold one more
    latent_channels: int = 32
    in_channels: int = 3
    out_channels: int = 3
    spatial_compression: int = 16
    temporal_compression: int = 4

    def __post_init__(self) -> None:
        widths, z = self.block_out_channels, self.latent_channels
        if self.downsamples >= len(widths) or self.temporal_levels > self.downsamples:
            raise ValueError(f"{len(widths)} levels cannot compress {self.spatial_compression}x in space and "
                             f"{self.temporal_compression}x in time")
        if 2 ** self.downsamples != self.spatial_compression or 2 ** self.temporal_levels != self.temporal_compression:
            raise ValueError("the compressions must be powers of two")
        if widths[-1] % (2 * z):
            raise ValueError(f"the last width {widths[-1]} must be a multiple of twice the latent channels ({2 * z})")

    @property
    def downsamples(self) -> int:
        return self.spatial_compression.bit_length() - 1

    @property
    def temporal_levels(self) -> int:
        return self.temporal_compression.bit_length() - 1

    def temporal_down(self, level: int) -> bool:
        """Whether the encoder's `level` halves time too (the last downsamples do)."""
        return self.downsamples - self.temporal_levels <= level < self.downsamples

    def temporal_up(self, level: int) -> bool:
        """Whether the decoder's `level` doubles time too (the first upsamples do)."""
        return level < self.temporal_levels


HUNYUAN_VIDEO15_VAE_CONFIG = HunyuanVideo15VAEConfig()


def tiny_config() -> HunyuanVideo15VAEConfig:
    """The real levels, compressions and 32 latent channels at a few channels a level: tests and examples."""
    return HunyuanVideo15VAEConfig(block_out_channels=(8, 16, 32, 64, 64))


class CausalConv3d(nn.Module):
    """A 3-D convolution (`conv`, as the file nests it) padded by replicating edges, in time only in front. With a
    cache, the frames it saw last chunk come first instead of that padding, so chunk by chunk it computes what it
    would over the whole video."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size)
        self.time_pad = kernel_size - 1
        self.space_pad = kernel_size // 2

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        carried = 0
        if cache is not None:
            previous = cache.get(self)
            if previous is not None:
                x = torch.cat([previous, x], dim=2)
                carried = previous.shape[2]
            cache[self] = x[:, :, -self.time_pad:].clone()  # a copy: the cache must not hold the whole chunk
        s = self.space_pad
        return self.conv(F.pad(x, (s, s, s, s, self.time_pad - carried, 0), mode="replicate"))


class ResnetBlock(nn.Module):
    """Norm, SiLU, causal conv, twice, plus the input (input and output widths are always equal here)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.conv1 = CausalConv3d(dim, dim)
        self.norm2 = RMSNorm(dim)
        self.conv2 = CausalConv3d(dim, dim)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        return x + self.conv2(F.silu(self.norm2(h)), cache)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of all frames, each frame's pixels seeing their own frame's and the
    earlier frames'; computed one query frame at a time (the same result, without the full mask)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.q = nn.Conv3d(dim, dim, 1)
        self.k = nn.Conv3d(dim, dim, 1)
        self.v = nn.Conv3d(dim, dim, 1)
        self.proj_out = nn.Conv3d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        n = self.norm(x)
        q, k, v = (layer(n).flatten(2).transpose(1, 2) for layer in (self.q, self.k, self.v))  # [B, T*H*W, C]
        step = h * w
        out = torch.cat([F.scaled_dot_product_attention(q[:, i * step:(i + 1) * step], k[:, :(i + 1) * step],
                                                        v[:, :(i + 1) * step]) for i in range(t)], dim=1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, t, h, w))


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block_1 = ResnetBlock(dim)
        self.attn_1 = AttnBlock(dim)
        self.block_2 = ResnetBlock(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _fold(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, C, frames*F, 2H, 2W] -> [B, frames*2*2*C, F, H, W], channels ordered (frame, row, column, channel)."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // frames, frames, h // 2, 2, w // 2, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(b, frames * 4 * c, f // frames, h // 2, w // 2)


def _unfold(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The inverse of `_fold`."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, frames, 2, 2, c // (frames * 4), f, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(b, c // (frames * 4), f * frames, h * 2, w * 2)


def _group_mean(x: torch.Tensor, group: int) -> torch.Tensor:
    """Means of consecutive groups of `group` channels."""
    b, c, f, h, w = x.shape
    return x.reshape(b, c // group, group, f, h, w).mean(dim=2)


def _first_chunk(module: nn.Module, cache: Cache | None) -> bool:
    """Whether `module` sees a video's first frame now (always without a cache); marks it seen."""
    if cache is None:
        return True
    first = module not in cache
    cache[module] = True
    return first


class Downsample(nn.Module):
    """2x2 (2x2x2 when temporal) to channels around a causal conv to out_dim / 4 (/ 8) channels, plus the input's
    fold averaged over channel groups. The first frame folds in space only; its conv half is doubled."""

    def __init__(self, in_dim: int, out_dim: int, temporal: bool):
        super().__init__()
        self.frames = 2 if temporal else 1
        self.conv = CausalConv3d(in_dim, out_dim // (4 * self.frames))
        self.group = 4 * self.frames * in_dim // out_dim

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        h = self.conv(x, cache)
        parts = []
        if self.frames == 2 and _first_chunk(self, cache):
            first = _fold(h[:, :, :1], 1)
            parts.append(torch.cat([first, first], dim=1) + _group_mean(_fold(x[:, :, :1], 1), self.group // 2))
            h, x = h[:, :, 1:], x[:, :, 1:]
        if h.shape[2]:
            parts.append(_fold(h, self.frames) + _group_mean(_fold(x, self.frames), self.group))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class Upsample(nn.Module):
    """A causal conv to out_dim * 4 (* 8 when temporal) channels unfolded to 2x2 (2x2x2) positions, plus the input's
    channels repeated and unfolded alike. The first frame unfolds in space only, keeping its conv's first half."""

    def __init__(self, in_dim: int, out_dim: int, temporal: bool):
        super().__init__()
        self.frames = 2 if temporal else 1
        self.conv = CausalConv3d(in_dim, out_dim * 4 * self.frames)
        self.repeats = 4 * self.frames * out_dim // in_dim

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        h = self.conv(x, cache)
        if self.frames == 1:
            return _unfold(h, 1) + _unfold(x.repeat_interleave(self.repeats, dim=1), 1)
        parts = []
        if _first_chunk(self, cache):
            first = _unfold(h[:, :, :1], 1)
            shortcut = _unfold(x[:, :, :1], 1).repeat_interleave(self.repeats // 2, dim=1)
            parts.append(first[:, :first.shape[1] // 2] + shortcut)
            h, x = h[:, :, 1:], x[:, :, 1:]
        if h.shape[2]:
            parts.append(_unfold(h, 2) + _unfold(x, 2).repeat_interleave(self.repeats, dim=1))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class Level(nn.Module):
    """One resolution level: `block` (resnet blocks), then `downsample` or `upsample` where it has one."""

    def __init__(self, dim: int, blocks: int, resample: Downsample | Upsample | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(dim) for _ in range(blocks))
        self.resample_name = name
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        for block in self.block:
            x = block(x, cache)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x, cache)


class Encoder(nn.Module):
    def __init__(self, c: HunyuanVideo15VAEConfig):
        super().__init__()
        widths = c.block_out_channels
        self.conv_in = CausalConv3d(c.in_channels, widths[0])
        self.down = nn.ModuleList(
            Level(width, c.layers_per_block,
                  Downsample(width, widths[i + 1], c.temporal_down(i)) if i < c.downsamples else None, "downsample")
            for i, width in enumerate(widths))
        self.mid = MidBlock(widths[-1])
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], 2 * c.latent_channels)

    def levels(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """The resolution levels on one chunk of frames."""
        x = self.conv_in(x, cache)
        for level in self.down:
            x = level(x, cache)
        return x

    def out(self, x: torch.Tensor) -> torch.Tensor:
        """The middle and the output layers on all latent frames: [B, 2 * latent_channels, ...] (mean, log-var)."""
        x = self.mid(x)
        shortcut = _group_mean(x, x.shape[1] // self.conv_out.conv.out_channels)
        return self.conv_out(F.silu(self.norm_out(x))) + shortcut


class Decoder(nn.Module):
    def __init__(self, c: HunyuanVideo15VAEConfig):
        super().__init__()
        widths = c.block_out_channels[::-1]
        self.conv_in = CausalConv3d(c.latent_channels, widths[0])
        self.mid = MidBlock(widths[0])
        self.up = nn.ModuleList(
            Level(width, c.layers_per_block + 1,
                  Upsample(width, widths[i + 1], c.temporal_up(i)) if i < c.downsamples else None, "upsample")
            for i, width in enumerate(widths))
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], c.out_channels)

    def into(self, z: torch.Tensor) -> torch.Tensor:
        """The input layer and the middle on all latent frames."""
        repeats = self.conv_in.conv.out_channels // z.shape[1]
        return self.mid(self.conv_in(z) + z.repeat_interleave(repeats, dim=1))

    def levels(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        """The resolution levels and the output layers on one latent frame's chunk."""
        for level in self.up:
            x = level(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class HunyuanVideo15VAE(nn.Module):
    """Video [B, 3, 1 + 4k, H, W] in -1..1 (H, W multiples of 16; one frame is a still image) <-> raw latents
    [B, 32, 1 + k, H/16, W/16]. `encode` gives the posterior mean; `decode` gives pixels clamped to -1..1."""

    scaling_factor = SCALING_FACTOR  # what the model family multiplies raw latents by

    def __init__(self, config: HunyuanVideo15VAEConfig = HUNYUAN_VIDEO15_VAE_CONFIG):
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.spatial_compression = config.spatial_compression
        self.temporal_compression = config.temporal_compression
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    def encode(self, video: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior over latents [B, latent_channels, 1 + (F-1)//4, H/16, W/16] of `video` [B, 3, F, H, W]
        (`.mode()`, its mean, is the latent to use); frames past the last whole group of 4 are left out."""
        s, t, channels = self.spatial_compression, self.temporal_compression, self.config.in_channels
        if video.ndim != 5 or video.shape[1] != channels or video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"the HunyuanVideo 1.5 VAE encodes videos [B, {channels}, F, H, W] with sides "
                             f"multiples of {s}, got {list(video.shape)}")
        x = video[:, :, :(video.shape[2] - 1) // t * t + 1].to(self.dtype)
        cache: Cache = {}
        chunks = [x[:, :, :1], *(x[:, :, 1:].split(t, dim=2) if x.shape[2] > 1 else ())]
        return DiagonalGaussianDistribution(
            self.encoder.out(torch.cat([self.encoder.levels(chunk, cache) for chunk in chunks], dim=2)))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, 1 + 4(f-1), 16h, 16w] in -1..1 from raw latents [B, latent_channels, f, h, w]."""
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"expected HunyuanVideo 1.5 latents [B, {self.latent_channels}, f, h, w], "
                             f"got {list(latent.shape)}")
        x = self.decoder.into(latent.to(self.dtype))
        cache: Cache = {}
        frames = [self.decoder.levels(x[:, :, i:i + 1], cache) for i in range(x.shape[2])]
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0)


# --- files -----------------------------------------------------------------------------------------------------

_MARKERS = ("encoder.conv_in.conv.weight", "encoder.norm_out.gamma", "decoder.conv_in.conv.weight",
            "decoder.mid.attn_1.norm.gamma", "decoder.norm_out.gamma")
_DIFFUSERS_MARKERS = ("encoder.conv_in.conv.weight", "encoder.mid_block.attentions.0.norm.gamma",
                      "decoder.conv_in.conv.weight", "decoder.mid_block.attentions.0.norm.gamma")
# (file key prefix, diffusers' prefix), first match wins, either way; every other key is the same in both. {n} is a
# block's number, {side} encoder or decoder, {qkv} q, k or v.
_NAMES = (
    ("encoder.down.{n}.block.", "encoder.down_blocks.{n}.resnets."),
    ("encoder.down.{n}.downsample.", "encoder.down_blocks.{n}.downsamplers.0."),
    ("decoder.up.{n}.block.", "decoder.up_blocks.{n}.resnets."),
    ("decoder.up.{n}.upsample.", "decoder.up_blocks.{n}.upsamplers.0."),
    ("{side}.mid.block_1.", "{side}.mid_block.resnets.0."),
    ("{side}.mid.block_2.", "{side}.mid_block.resnets.1."),
    ("{side}.mid.attn_1.{qkv}.", "{side}.mid_block.attentions.0.to_{qkv}."),
    ("{side}.mid.attn_1.", "{side}.mid_block.attentions.0."),
)
_FIELDS = {"n": r"\d+", "side": "encoder|decoder", "qkv": "[qkv]"}


def _rule(source: str, target: str) -> tuple[re.Pattern, str]:
    """A prefix template's pattern (anchored at the key's start) and the other template as its replacement."""
    pattern = "".join(f"(?P<{part[1:-1]}>{_FIELDS[part[1:-1]]})" if part.startswith("{") else re.escape(part)
                      for part in re.split(r"(\{\w+\})", source) if part)
    return re.compile(f"^{pattern}"), re.sub(r"\{(\w+)\}", r"\\g<\1>", target)


_RENAMES = tuple(_rule(file, diffusers) for file, diffusers in _NAMES)
_DIFFUSERS_RENAMES = tuple(_rule(diffusers, file) for file, diffusers in _NAMES)


def _rename(sd: StateDict, rules: tuple[tuple[re.Pattern, str], ...]) -> StateDict:
    out = {}
    for key, value in sd.items():
        for pattern, replacement in rules:
            renamed, count = pattern.subn(replacement, key)
            if count:
                key = renamed
                break
        out[key] = value
    return out


def diffusers_from_file(sd: StateDict) -> StateDict:
    """The file's tensors under AutoencoderKLHunyuanVideo15's names."""
    return _rename(sd, _RENAMES)


def file_from_diffusers(sd: StateDict) -> StateDict:
    """AutoencoderKLHunyuanVideo15's tensors under the file's (Tencent's original) names."""
    return _rename(sd, _DIFFUSERS_RENAMES)


def is_hunyuan_video15_vae(sd: Collection[str]) -> bool:
    """Whether a state dict (or its keys, or `ckpt.read_shapes`' meta tensors) is HunyuanVideo 1.5's VAE in the
    file's layout: causal convolutions nested as `.conv` and RMS gains `gamma` on an LDM-style `down` / `mid` / `up`
    tree. Wan's VAEs (`encoder.conv1`, `decoder.middle`), LTX-Video's (`decoder.up_blocks`), the LDM image VAEs
    and HunyuanVideo 1.0's (GroupNorm `norm.weight`, `conv_in.weight` or no `gamma`) and Comfy-Org's HunyuanImage
    2.1 VAEs (`decoder.conv_in.weight`) lack these keys."""
    return all(k in sd for k in _MARKERS)


def _is_diffusers_layout(sd: Collection[str]) -> bool:
    return all(k in sd for k in _DIFFUSERS_MARKERS)


def _indices(keys: Collection[str], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m[1]) for k in keys if (m := pattern.match(k))})


def config_from_state_dict(sd: StateDict) -> HunyuanVideo15VAEConfig:
    """The sizes of a HunyuanVideo 1.5 VAE in the file's layout, read from its shapes (tensors or meta tensors);
    ValueError when it is not one or its shapes are not those of the config they imply."""
    if not is_hunyuan_video15_vae(sd):
        raise ValueError("no HunyuanVideo 1.5 VAE weights (encoder.conv_in.conv, decoder.mid.attn_1.norm.gamma, ...)")
    levels = _indices(sd, "encoder.down.")
    widths = tuple(sd[f"encoder.down.{i}.block.0.conv1.conv.weight"].shape[0] for i in levels)
    down = [i for i in levels if f"encoder.down.{i}.downsample.conv.conv.weight" in sd]
    if levels != list(range(len(levels))) or down != list(range(len(down))) or len(down) >= len(levels):
        raise ValueError("the encoder's levels are not numbered 0..n with downsamples on all but the last")
    folds = [widths[i + 1] // sd[f"encoder.down.{i}.downsample.conv.conv.weight"].shape[0] for i in down]
    if any(f not in (4, 8) for f in folds):
        raise ValueError(f"downsamples fold {folds} positions into channels; expected 4 (space) or 8 (space, time)")
    shape = {k: sd[k].shape for k in ("encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight",
                                      "decoder.conv_out.conv.weight")}
    config = HunyuanVideo15VAEConfig(
        widths, layers_per_block=len(_indices(sd, "encoder.down.0.block.")),
        latent_channels=shape["decoder.conv_in.conv.weight"][1], in_channels=shape["encoder.conv_in.conv.weight"][1],
        out_channels=shape["decoder.conv_out.conv.weight"][0], spatial_compression=2 ** len(down),
        temporal_compression=2 ** folds.count(8))
    ckpt.check_fit(lambda: HunyuanVideo15VAE(config), sd, config)
    return config


def peek_hunyuan_video15_vae(path: str | Path) -> bool:
    """Whether a .safetensors file is HunyuanVideo 1.5's VAE (the file's layout or diffusers'), from its header."""
    try:
        shapes = ckpt.read_shapes(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return shapes is not None and (is_hunyuan_video15_vae(shapes) or _is_diffusers_layout(shapes))


def load_hunyuan_video15_vae(path_or_state_dict: str | Path | StateDict, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32) -> HunyuanVideo15VAE:
    """HunyuanVideo 1.5's VAE from its file (or its tensors; the file's layout or diffusers'), on `device` in
    `dtype`, frozen; CheckpointError naming the problem for anything else."""
    if isinstance(path_or_state_dict, dict):
        sd, path = path_or_state_dict, Path("state dict")
    else:
        path = Path(path_or_state_dict)
        sd = ckpt.load_state_dict(path)
    if _is_diffusers_layout(sd):
        sd = file_from_diffusers(sd)
    if not is_hunyuan_video15_vae(sd):
        raise CheckpointError(f"{path.name}: not HunyuanVideo 1.5's VAE (no encoder.conv_in.conv / "
                              "decoder.mid.attn_1.norm.gamma weights, nor diffusers' names for them)")
    try:
        config = config_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    return ckpt._materialize(lambda: HunyuanVideo15VAE(config), sd, "HunyuanVideo 1.5 VAE", path, device, dtype)


def tiny_state_dict(seed: int = 0) -> StateDict:
    """Seeded random weights of `tiny_config()` in the file's layout (norm gains near 1, small biases, weights at
    1/sqrt(fan-in), so activations stay in range)."""
    return randomized_(HunyuanVideo15VAE(tiny_config()), seed).state_dict()
