"""Wan's causal 3-D video VAE (Wan 2.1's 16 channels, Wan 2.2's 48); attribute names follow the original file keys.

Every convolution along the frames is causal (it sees the frames before, never after), so a video is encoded and
decoded in chunks, as the original does: the first frame alone, then 4 frames at a time (encode) or one latent frame
at a time (decode). A `cache` dict, passed down through one pass over a video, holds what each layer keeps from the
chunks before (the last frames its convolution needs, whether its first chunk went by); memory stays bounded by the
chunk, not the video. Wan 2.2 folds 2x2 pixel patches into channels first and adds parameter-free shortcuts (channel
averages, channel duplication) around each level's resampling.

Qwen-Image-Layered's VAE (qwen_image_layered_vae, diffusers' AutoencoderKLQwenImage with input_channels=4) is Wan
2.1's with RGBA pixels: 4 image channels in and out (`image_channels`), alpha in -1..1 like the colours. RGB pixels
given to it get an opaque alpha (1.0), as ComfyUI pads them (its pad_channel_value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import attention
from ldm.vae import DiagonalGaussianDistribution

Cache = dict[nn.Module, object]


@dataclass(frozen=True)
class WanVAEConfig:
    z_dim: int = 16
    base_dim: int = 96
    decoder_base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per level with a downsample, encoder order
    residual: bool = False  # Wan 2.2: levels as blocks with resampling shortcuts, full-width decoder upsampling
    patch_size: int = 1  # Wan 2.2 folds 2x2 pixel patches into channels (12 in, 12 out)
    image_channels: int = 3  # 4: RGBA (Qwen-Image-Layered's VAE)

    @property
    def spatial_compression(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)


WAN21_CONFIG = WanVAEConfig()
WAN22_CONFIG = WanVAEConfig(z_dim=48, base_dim=160, decoder_base_dim=256, residual=True, patch_size=2)


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded only before the first frame along time; with a cache, the frames it saw last chunk stand
    in for that padding, so chunk by chunk it computes what it would over the whole video."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if cache is not None and self.time_pad:
            previous = cache.get(self)
            if previous is not None:
                x = torch.cat([previous, x], dim=2)
            # A copy, so the cache does not hold on to the whole chunk.
            cache[self] = x[:, :, -self.time_pad:].clone()
            missing = self.time_pad - (0 if previous is None else previous.shape[2])
        else:
            missing = self.time_pad
        return super().forward(F.pad(x, (*self.space_pad, missing, 0)))


class RMSNorm(nn.Module):
    """Channel-wise RMS norm (L2-normalised, times sqrt(channels) and a learnt gain), computed in fp32 for halves."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(wide, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """Norm, SiLU, causal conv, twice; `residual.N` indices are the original Sequential's."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
                                      RMSNorm(out_dim), nn.SiLU(), nn.Identity(),  # dropout in training
                                      CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x)), cache)
        h = r[6](F.silu(r[3](h)), cache)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over each frame's pixels."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        tokens = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)
        out = attention(*tokens.chunk(3, dim=-1), 1)
        out = self.proj(out.transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial down- or upsampling of each frame, with a 2x causal temporal one for the `3d` modes.

    Temporal downsampling leaves a chunk's frames alone the first time (the first frame is its own latent frame),
    then convolves each pair with the frame before (stride 2). Temporal upsampling also passes the first chunk
    through, then makes two frames of each, from a causal convolution over the frames after the first.
    """

    def __init__(self, dim: int, mode: str, upsample_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, upsample_dim or dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            if self in cache:
                b, c, t, h, w = x.shape
                # The conv's 2c channels are two frames: [c of frame 2i, c of frame 2i+1].
                x = self.time_conv(x, cache).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)
                x = x.reshape(b, c, 2 * t, h, w)
            cache[self] = True
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        if self.mode.startswith("upsample"):  # nearest in fp32, as the original, whatever the model's dtype
            frames = self.resample[1](self.resample[0](frames.float()).to(frames.dtype))
        else:
            frames = self.resample(frames)
        x = frames.reshape(b, t, *frames.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            previous = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if previous is not None:
                x = self.time_conv(torch.cat([previous, x], dim=2))
        return x


class AvgDown3D(nn.Module):
    """Wan 2.2's downsampling shortcut: space (and time) folded into channels, then channel groups averaged.
    A chunk short of whole time steps is zero-padded in front."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """Wan 2.2's upsampling shortcut: channels repeated, then unfolded into space (and time); the first chunk keeps
    only its last time step (the first latent frame is one frame)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).reshape(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        first = self not in cache
        cache[self] = True
        return x[:, :, ft - 1:] if first else x


class DownResidualBlock(nn.Module):
    """Wan 2.2 encoder level: residual blocks then the downsample (`downsamples`), plus an averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks)]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = layer(x, cache)
        return x + shortcut


class UpResidualBlock(nn.Module):
    """Wan 2.2 decoder level: residual blocks then the upsample (`upsamples`), plus a duplicating shortcut."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, up: bool):
        super().__init__()
        if up:
            self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2)
        layers: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks)]
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        shortcut = self.avg_shortcut(x, cache) if hasattr(self, "avg_shortcut") else None
        for layer in self.upsamples:
            x = layer(x, cache)
        return x if shortcut is None else x + shortcut


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _run(layers: nn.Sequential, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    for layer in layers:
        x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cache)
    return x


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    return head[2](F.silu(head[0](x)), cache)


class Encoder3d(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        self.conv1 = CausalConv3d(c.image_channels * c.patch_size ** 2, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        last = len(c.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            temporal = i < last and c.temporal_downsample[i]
            if c.residual:
                layers.append(DownResidualBlock(in_dim, out_dim, c.num_res_blocks, temporal, i < last))
                continue
            layers += [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(c.num_res_blocks)]
            if i < last:
                layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * c.z_dim)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = _run(self.downsamples, self.conv1(x, cache), cache)
        return _run_head(self.head, _run(self.middle, x, cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        mults = c.dim_mult[::-1]
        dims = [c.decoder_base_dim * m for m in (mults[0], *mults)]
        temporal_up = c.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        last = len(c.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            temporal = i < last and temporal_up[i]
            if c.residual:
                layers.append(UpResidualBlock(in_dim, out_dim, c.num_res_blocks + 1, temporal, i < last))
                continue
            # Wan 2.1's upsampling halves the channels, so every level after the first starts at half width.
            in_dim = in_dim // 2 if i else in_dim
            layers += [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(c.num_res_blocks + 1)]
            if i < last:
                layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], c.image_channels * c.patch_size ** 2)

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = _run(self.middle, self.conv1(z, cache), cache)
        return _run_head(self.head, _run(self.upsamples, x, cache), cache)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p], channels ordered (c, column offset, row offset) as Wan 2.2."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, cp, t, h, w = x.shape
    x = x.reshape(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cp // (p * p), t, h * p, w * p)


class WanVAE(nn.Module):
    """Video pixels [B, 3, T, H, W] in -1..1 <-> raw latents [B, z, 1 + (T-1)//4, H/s, W/s] (s = 8, or 16 for 2.2);
    an RGBA VAE's pixels are [B, 4, T, H, W] (RGB ones are given an opaque alpha).

    The latents are not normalised: the model family applies Wan's per-channel mean and std (`scaling_factor` is
    1). Only the first 1 + 4k frames of a video are encoded (any frames after them are left out, as in the original,
    diffusers and ComfyUI); a single frame (T = 1) is a still image. `decode` gives 1 + 4(T'-1) frames.
    """

    scaling_factor = 1.0

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        self.config = config
        self.latent_channels = config.z_dim
        self.spatial_compression = config.spatial_compression
        self.temporal_compression = config.temporal_compression
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior over latents [B, z, 1 + (T-1)//4, H/s, W/s]; `.mode()` is the latent to use."""
        channels = self.config.image_channels
        if channels == 4 and pixels.ndim == 5 and pixels.shape[1] == 3:
            pixels = F.pad(pixels, (0, 0, 0, 0, 0, 0, 0, 1), value=1.0)  # opaque alpha, as ComfyUI pads RGB
        if pixels.ndim != 5 or pixels.shape[1] != channels or pixels.shape[2] < 1:
            raise ValueError(f"expected video pixels [B, {channels}, T>=1, H, W], got {list(pixels.shape)}")
        s = self.spatial_compression
        if pixels.shape[3] % s or pixels.shape[4] % s:
            raise ValueError(f"height and width must be multiples of {s}, got {pixels.shape[3]}x{pixels.shape[4]}")
        x = pixels.to(self.dtype)
        if self.config.patch_size > 1:
            x = patchify(x, self.config.patch_size)
        cache: Cache = {}
        k = self.temporal_compression
        chunks = [x[:, :, :1]] + [x[:, :, 1 + k * i:1 + k * (i + 1)] for i in range((x.shape[2] - 1) // k)]
        moments = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        return DiagonalGaussianDistribution(self.conv1(moments))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels [B, image_channels, 1 + 4(T'-1), H, W] in -1..1 from raw latents [B, z, T', h, w]."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected Wan latents [B, {self.latent_channels}, T, h, w], got {list(z.shape)}")
        x = self.conv2(z.to(self.dtype))
        cache: Cache = {}
        out = torch.cat([self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])], dim=2)
        if self.config.patch_size > 1:
            out = unpatchify(out, self.config.patch_size)
        return out.clamp(-1.0, 1.0)
