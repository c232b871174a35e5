"""The LDM AutoencoderKL; attribute names follow the `first_stage_model.` checkpoint keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.attention import attention


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    scaling_factor: float = 0.18215
    # LDM's 1x1 convolutions around the latent; Black Forest Labs' Flux autoencoder has none.
    use_quant_conv: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class DiagonalGaussianDistribution:
    """The encoder's posterior: a Gaussian per latent element, from [B, 2*z, h, w] moments."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, per batch item (the VAE training term)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=[1, 2, 3])


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, with 1x1 conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))
        self.query_chunk: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Tokens first, then the 1x1 convs as linear layers: q, k and v come out contiguous for SDPA.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (F.linear(tokens, p.weight.flatten(1), p.bias) for p in (self.q, self.k, self.v))
        out = attention(q, k, v, 1, self.query_chunk)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LDM pads right and bottom only, so the output grid is aligned with the input's top-left.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (a list of ResnetBlocks), then `downsample` or `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, name, resample)


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c.ch
        for level, mult in enumerate(c.ch_mult):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(ch, c.ch * mult))
                ch = c.ch * mult
            last = level == len(c.ch_mult) - 1
            self.down.append(_Level(blocks, None if last else Downsample(ch), "downsample"))
        self.mid = _Mid(ch)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = _Mid(ch)
        levels: list[_Level] = []
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, c.ch * mult))
                ch = c.ch * mult
            levels.insert(0, _Level(blocks, Upsample(ch) if level else None, "upsample"))
        # Stored lowest level first (the checkpoint's `up.0` is the full-resolution level).
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Pixels in -1..1 <-> latents.

    `encode` and `decode` work on *unscaled* latents: multiply a sample by `scaling_factor` before
    handing it to the UNet, and divide by it before `decode` (the caller's job, as in LDM).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        z, conv = config.z_channels, config.use_quant_conv
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(z, z, 1) if conv else nn.Identity()

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(pixels.to(self.dtype)))

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self._moments(pixels))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def encode_tiled(self, pixels: torch.Tensor, tile_size: int = 512, overlap: int = 64
                     ) -> DiagonalGaussianDistribution:
        """`encode` in pixel tiles of `tile_size` overlapping by `overlap`, blended; for large images."""
        f = self.config.downscale
        moments = tiled_apply(self._moments, pixels, tile_size, overlap, 1.0 / f, 2 * self.config.z_channels)
        return DiagonalGaussianDistribution(moments)

    def decode_tiled(self, z: torch.Tensor, tile_size: int = 64, overlap: int = 16) -> torch.Tensor:
        """`decode` in latent tiles of `tile_size` overlapping by `overlap`, blended; for large images."""
        scale = float(self.config.downscale)
        return tiled_apply(self.decode, z, tile_size, overlap, scale, self.config.out_ch)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool, device: torch.device) -> torch.Tensor:
    """Blend weights along one axis: rising over the overlap on edges shared with a neighbour tile."""
    w = torch.ones(length, device=device)
    n = min(overlap, length // 2)
    if n > 0:
        ramp = (torch.arange(n, device=device, dtype=torch.float32) + 1) / (n + 1)
        if not at_start:
            w[:n] = ramp
        if not at_end:
            w[-n:] = ramp.flip(0)
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
           scale: float, out_channels: int) -> torch.Tensor:
    """Run `fn` (which resizes its last two dimensions by `scale`) over overlapping tiles of `x`'s height and width
    and blend the results linearly. A video's frames ([B, C, T, H, W]) go whole into each tile; `fn` may change
    their count (a video VAE does)."""
    if overlap >= tile:
        raise ValueError("overlap must be smaller than the tile size")
    h, w = x.shape[-2:]
    out_h, out_w = round(h * scale), round(w * scale)
    out = None
    weight = torch.zeros(1, 1, out_h, out_w, device=x.device)
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    for y in ys:
        for x0 in xs:
            piece = fn(x[..., y:y + tile, x0:x0 + tile])
            out_dtype = piece.dtype
            oy, ox = round(y * scale), round(x0 * scale)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, round(overlap * scale), y == ys[0], y == ys[-1], x.device)
            wx = _ramp(pw, round(overlap * scale), x0 == xs[0], x0 == xs[-1], x.device)
            mask = wy[:, None] * wx[None, :]
            if out is None:
                out = torch.zeros(x.shape[0], out_channels, *piece.shape[2:-2], out_h, out_w, device=x.device)
            out[..., oy:oy + ph, ox:ox + pw] += piece.float() * mask
            weight[..., oy:oy + ph, ox:ox + pw] += mask
    return (out / weight).to(out_dtype)
