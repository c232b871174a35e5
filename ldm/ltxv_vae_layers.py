"""The building blocks of LTX-Video's causal video VAE (ldm.ltxv_vae): causal 3-D convolutions, pixel-norm res blocks
with optional timestep scale/shift and spatial noise, space-to-depth down- and depth-to-space upsamplers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.unet import timestep_embedding


def pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


def space_to_depth(x: torch.Tensor, s: tuple[int, int, int]) -> torch.Tensor:
    """[b, c, d*s0, h*s1, w*s2] -> [b, c*s0*s1*s2, d, h, w], channel-major."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // s[0], s[0], h // s[1], s[1], w // s[2], s[2])
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * math.prod(s), d // s[0], h // s[1], w // s[2])


def depth_to_space(x: torch.Tensor, s: tuple[int, int, int]) -> torch.Tensor:
    b, c, d, h, w = x.shape
    x = x.reshape(b, c // math.prod(s), *s, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, -1, d * s[0], h * s[1], w * s[2])


class CausalConv3d(nn.Module):
    """A 3-D convolution padded along the frames by repeating the first frame (causal) or the first and the last
    (non-causal, the decoder's), and spatially by `padding_mode`."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int | tuple[int, ...] = 1,
                 causal: bool = True, padding_mode: str = "zeros"):
        super().__init__()
        self.causal = causal
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2),
                              padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.conv.kernel_size[0] - 1
        if self.causal:
            x = torch.cat([x[:, :, :1].expand(-1, -1, pad, -1, -1), x], dim=2)
        else:
            x = torch.cat([x[:, :, :1].expand(-1, -1, pad // 2, -1, -1), x,
                           x[:, :, -1:].expand(-1, -1, pad // 2, -1, -1)], dim=2)
        return self.conv(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of [B, C, T, H, W] (the original's `norm3.norm`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class TimestepEmbedder(nn.Module):
    """PixArt-alpha's timestep embedding (256 sinusoids, cosines first; two linears), as diffusers'
    PixArtAlphaCombinedTimestepSizeEmbeddings without size conditioning."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1 = nn.Linear(256, dim)
        self.timestep_embedder.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        e = self.timestep_embedder
        h = e.linear_1(timestep_embedding(t, 256).to(dtype))
        return e.linear_2(F.silu(h))[:, :, None, None, None]


def _spatial_noise(h: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Adds one [H, W] noise image, scaled per channel (the same for every frame and batch item, as the original)."""
    device = generator.device if generator is not None else h.device
    noise = torch.randn(h.shape[-2:], generator=generator, device=device, dtype=h.dtype).to(h.device)
    return h + (noise[None] * scale)[None, :, None]


class ResnetBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, causal: bool, padding: str, inject_noise: bool = False,
                 timestep_conditioning: bool = False):
        super().__init__()
        self.conv1 = CausalConv3d(cin, cout, causal=causal, padding_mode=padding)
        self.conv2 = CausalConv3d(cout, cout, causal=causal, padding_mode=padding)
        if inject_noise:
            self.per_channel_scale1 = nn.Parameter(torch.zeros(cin, 1, 1))
            self.per_channel_scale2 = nn.Parameter(torch.zeros(cin, 1, 1))
        if cin != cout:
            self.norm3 = ChannelLayerNorm(cin)
            self.conv_shortcut = nn.Conv3d(cin, cout, 1)
        if timestep_conditioning:
            self.scale_shift_table = nn.Parameter(torch.zeros(4, cin))

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        h = pixel_norm(x)
        ada = hasattr(self, "scale_shift_table")
        if ada:
            shift1, scale1, shift2, scale2 = (temb.unflatten(1, (4, -1))
                                              + self.scale_shift_table[None, :, :, None, None, None]).unbind(1)
            h = h * (1 + scale1) + shift1
        h = self.conv1(F.silu(h))
        if hasattr(self, "per_channel_scale1"):
            h = _spatial_noise(h, self.per_channel_scale1, generator)
        h = pixel_norm(h)
        if ada:
            h = h * (1 + scale2) + shift2
        h = self.conv2(F.silu(h))
        if hasattr(self, "per_channel_scale2"):
            h = _spatial_noise(h, self.per_channel_scale2, generator)
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(self.norm3(x))
        return x + h


class ResBlocks(nn.Module):
    """A stack of same-width res blocks (the original's UNetMidBlock3D, "res_x"), with its own timestep embedder
    when the decoder is timestep-conditioned."""

    def __init__(self, channels: int, layers: int, causal: bool, padding: str, inject_noise: bool = False,
                 timestep_conditioning: bool = False):
        super().__init__()
        if timestep_conditioning:
            self.time_embedder = TimestepEmbedder(4 * channels)
        self.res_blocks = nn.ModuleList(
            ResnetBlock3D(channels, channels, causal, padding, inject_noise, timestep_conditioning)
            for _ in range(layers))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        temb = self.time_embedder(t, x.dtype) if hasattr(self, "time_embedder") else None
        for block in self.res_blocks:
            x = block(x, temb, generator)
        return x


class SpaceToDepthDownsample(nn.Module):
    """0.9.5's downsampler: a convolution to 1/stride of the output width, folded into channels, plus the input
    folded the same way and averaged down to the output width."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int, int], padding: str):
        super().__init__()
        self.stride = stride
        self.group_size = cin * math.prod(stride) // cout
        self.conv = CausalConv3d(cin, cout // math.prod(stride), padding_mode=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 2:
            x = torch.cat([x[:, :, :1], x], dim=2)
        skip = space_to_depth(x, self.stride).unflatten(1, (-1, self.group_size)).mean(2)
        return space_to_depth(self.conv(x), self.stride) + skip


class DepthToSpaceUpsample(nn.Module):
    """2x2x2 upsampling: a convolution to 8/`reduction` times the width, unfolded into space and time; the first
    frame of the result is dropped (it stands for the causal padding). `residual` adds the input unfolded the same
    way, its channels repeated to the output width."""

    def __init__(self, cin: int, reduction: int, residual: bool, padding: str):
        super().__init__()
        self.reduction, self.residual = reduction, residual
        self.conv = CausalConv3d(cin, 8 * cin // reduction, causal=False, padding_mode=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = depth_to_space(self.conv(x), (2, 2, 2))[:, :, 1:]
        if self.residual:
            out = out + depth_to_space(x, (2, 2, 2)).repeat(1, 8 // self.reduction, 1, 1, 1)[:, :, 1:]
        return out
