"""DAT upscale models (Chen et al. 2023, "Dual Aggregation Transformer for Image Super-Resolution": DAT, DAT-S,
DAT-2 and DAT-light, e.g. 4x-NomosUniDAT), built from their state dicts.

DAT: a 3x3 convolution, residual groups of blocks that alternate spatial attention (half the channels attend
within split_size[0] x split_size[1] rectangles, the other half within the transposed ones, some blocks over
shifted rectangles; a position bias comes from a small MLP over the offsets) and channel attention (heads attend
across channels), each joined with a depth-wise convolution branch through channel and spatial gates, and each
followed by a spatially-gated feed-forward network; then SwinIR's reconstruction. The attention pads its features
with zeros to a multiple of the larger split size, as the reference does, so any image size works.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.upscale_swin import (
    RGB_MEAN,
    count,
    image,
    pixel_shuffle_upsample,
    relative_position_index,
    residual_conv,
    shifted_window_mask,
    shuffle_factors,
    tokens,
    window_merge,
    window_partition,
)


def mlp_step(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, out))


class DynamicPosBias(nn.Module):
    """The bias of each relative offset (dy, dx) per head: a small MLP over the offsets themselves."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(2, dim)
        self.pos1, self.pos2, self.pos3 = mlp_step(dim, dim), mlp_step(dim, dim), mlp_step(dim, heads)

    def forward(self, offsets: Tensor) -> Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class SpatialAttention(nn.Module):
    """Attention within `window` (height, width) rectangles of one half of the channels."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int]) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.pos = DynamicPosBias(dim // 4 // 4, heads)  # dim // 4 into DynamicPosBias, which takes a quarter
        wh, ww = window
        offsets = torch.meshgrid(torch.arange(1 - wh, wh), torch.arange(1 - ww, ww), indexing="ij")
        self.register_buffer("offsets", torch.stack(offsets).flatten(1).T.float(), persistent=False)
        self.register_buffer("index", relative_position_index(window), persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q, k, v: [B, H, W, C] (H, W multiples of the window); mask: [windows, pixels, pixels]. -> [B, H, W, C]."""
        b, h, w, c = q.shape
        q, k, v = (window_partition(t, self.window) for t in (q, k, v))
        n, pixels = q.shape[:2]
        q, k, v = (t.view(n, pixels, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        bias = self.pos(self.offsets)[self.index.view(-1)].view(pixels, pixels, -1).permute(2, 0, 1)
        if mask is not None:
            windows = mask.shape[0]
            q, k, v = (t.view(b, windows, *t.shape[1:]) for t in (q, k, v))
            bias = bias + mask[:, None].to(bias.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return window_merge(out.reshape(n, self.heads, pixels, -1).transpose(1, 2).reshape(n, pixels, c),
                            self.window, h, w)


def gates(dim: int) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """The convolution branch and the two gates of DAT's attention blocks, in the files' layout."""
    dwconv = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())
    channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // 8, 1), nn.BatchNorm2d(dim // 8),
                            nn.GELU(), nn.Conv2d(dim // 8, dim, 1))
    spatial = nn.Sequential(nn.Conv2d(dim, dim // 16, 1), nn.BatchNorm2d(dim // 16), nn.GELU(),
                            nn.Conv2d(dim // 16, 1, 1))
    return dwconv, channel, spatial


class AdaptiveSpatialAttention(nn.Module):
    """Spatial attention in two halves (split rectangles and their transposes), gated with a depth-wise
    convolution of the values: the convolution's channel map gates the attention, the attention's spatial map
    gates the convolution."""

    def __init__(self, dim: int, heads: int, split: tuple[int, int], shifted: bool, qkv_bias: bool) -> None:
        super().__init__()
        self.split, self.shifted = split, shifted
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attns = nn.ModuleList(SpatialAttention(dim // 2, heads // 2, s) for s in (split, split[::-1]))
        self.dwconv, self.channel_interaction, self.spatial_interaction = gates(dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        (h, w), (b, _, c) = size, x.shape
        qkv = self.qkv(x)
        values = image(qkv[..., 2 * c:], size)
        step = max(self.split)
        qkv = F.pad(qkv.view(b, h, w, 3 * c), (0, 0, 0, -w % step, 0, -h % step))  # zeros, as the reference
        q, k, v = qkv.chunk(3, -1)
        halves = []
        for half, attn in enumerate(self.attns):
            part = [t[..., half * c // 2:(half + 1) * c // 2] for t in (q, k, v)]
            mask, shift = None, (attn.window[0] // 2, attn.window[1] // 2)
            if self.shifted:
                part = [torch.roll(t, (-shift[0], -shift[1]), (1, 2)) for t in part]
                mask = shifted_window_mask(qkv.shape[1], qkv.shape[2], attn.window, shift).to(x.device)
            out = attn(*part, mask)
            if self.shifted:
                out = torch.roll(out, shift, (1, 2))
            halves.append(out[:, :h, :w].reshape(b, h * w, c // 2))
        attended = torch.cat(halves, -1)
        conv = self.dwconv(values)
        channel_map = self.channel_interaction(conv).view(b, 1, c)
        spatial_map = self.spatial_interaction(image(attended, size))
        return self.proj(attended * torch.sigmoid(channel_map) + tokens(conv * torch.sigmoid(spatial_map)))


class AdaptiveChannelAttention(nn.Module):
    """Attention across channels (per head: between the head's channels, over all pixels, cosine similarity
    scaled by a learned temperature), gated with a depth-wise convolution of the values: the attention's channel
    map gates the convolution, the convolution's spatial map gates the attention."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwconv, self.channel_interaction, self.spatial_interaction = gates(dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)  # [B, heads, d, N]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)
        attended = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        conv = self.dwconv(v.reshape(b, c, *size))
        channel_map = self.channel_interaction(image(attended, size))
        spatial_map = tokens(self.spatial_interaction(conv))
        return self.proj(attended * torch.sigmoid(spatial_map) + tokens(conv * torch.sigmoid(channel_map)))


class SpatialGate(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x1, x2 = x.chunk(2, -1)
        return x1 * tokens(self.conv(image(self.norm(x2), size)))


class SGFN(nn.Module):
    """Spatially-gated feed-forward network: half the hidden channels gate the other half after a depth-wise
    convolution."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.fc2(self.sg(F.gelu(self.fc1(x)), size))


class DATB(nn.Module):
    def __init__(self, attn: nn.Module, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2, self.ffn = nn.LayerNorm(dim), SGFN(dim, hidden)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = x + self.attn(self.norm1(x), size)
        return x + self.ffn(self.norm2(x), size)


class ResidualGroup(nn.Module):
    """Blocks alternating spatial (even) and channel (odd) attention, then `conv`, plus the input. The spatial
    blocks 2, 6, 10... of even groups and 0, 4, 8... of odd groups use shifted rectangles."""

    def __init__(self, index: int, depth: int, dim: int, heads: int, split: tuple[int, int], hidden: int,
                 qkv_bias: bool, three_conv: bool) -> None:
        super().__init__()

        def attention(i: int) -> nn.Module:
            if i % 2:
                return AdaptiveChannelAttention(dim, heads, qkv_bias)
            shifted = (i - 2) % 4 == 0 and i > 0 if index % 2 == 0 else i % 4 == 0
            return AdaptiveSpatialAttention(dim, heads, split, shifted, qkv_bias)

        self.blocks = nn.ModuleList(DATB(attention(i), dim, hidden) for i in range(depth))
        self.conv = residual_conv(dim, three_conv)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        y = x
        for block in self.blocks:
            y = block(y, size)
        return x + tokens(self.conv(image(y, size)))


class Tokens(nn.Module):
    """[B, C, H, W] -> [B, H W, C] (the reference's Rearrange at `before_RG.0`)."""

    def forward(self, x: Tensor) -> Tensor:
        return tokens(x)


class DAT(nn.Module):
    """DAT in its files' layer names. `factors`: the pixel-shuffle factors ("pixelshuffle") or the single factor
    of a direct pixel shuffle (`direct`, DAT-light)."""

    supports_half = False  # attention logits overflow fp16, as the reference warns

    def __init__(self, in_nc: int, dim: int, depths: list[int], heads: list[int], split: tuple[int, int],
                 hidden: int, factors: list[int], direct: bool = False, feat: int = 64, qkv_bias: bool = True,
                 three_conv: bool = False) -> None:
        super().__init__()
        self.in_channels, self.scale, self.direct = in_nc, math.prod(factors), direct
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(in_nc, dim, 3, 1, 1)
        self.before_RG = nn.Sequential(Tokens(), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(ResidualGroup(i, d, dim, h, split, hidden, qkv_bias, three_conv)
                                    for i, (d, h) in enumerate(zip(depths, heads, strict=True)))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, three_conv)
        if direct:
            self.upsample = nn.Sequential(nn.Conv2d(dim, in_nc * self.scale**2, 3, 1, 1), nn.PixelShuffle(self.scale))
        else:
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU(0.01))
            self.upsample = pixel_shuffle_upsample(feat, factors)
            self.conv_last = nn.Conv2d(feat, in_nc, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        first = self.conv_first(x - self.mean)
        size = (first.shape[2], first.shape[3])
        y = self.before_RG(first)
        for layer in self.layers:
            y = layer(y, size)
        feat = self.conv_after_body(image(self.norm(y), size)) + first
        if self.direct:
            return self.upsample(feat) + self.mean
        return self.conv_last(self.upsample(self.conv_before_upsample(feat))) + self.mean


_BLOCK = "layers.0.blocks.0."
# Buffers a file holds that the modules derive from the split size and the image instead.
_DERIVED = (".rpe_biases", ".relative_position_index", ".attn_mask_0", ".attn_mask_1")


def is_dat(sd: dict[str, Tensor]) -> bool:
    return "before_RG.1.weight" in sd and f"{_BLOCK}attn.attns.0.pos.pos_proj.weight" in sd


def dat_from_state_dict(sd: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor]]:
    """The DAT a state dict holds (any size), and its weights in the module's names."""
    # The split size is in no weight's shape: only the offsets the first spatial attention was built for say it.
    split = tuple(int(n) + 1 for n in sd[f"{_BLOCK}attn.attns.0.rpe_biases"][-1])
    sd = {k: v for k, v in sd.items() if not k.endswith(_DERIVED)}
    in_nc, dim = sd["conv_first.weight"].shape[1], sd["conv_first.weight"].shape[0]
    layers = count(sd, "layers.")
    depths = [count(sd, f"layers.{i}.blocks.") for i in range(layers)]
    # The channel attention's temperature has one entry per head; a one-block group has only the spatial
    # attention, whose two halves have half the heads each.
    heads = [sd[f"layers.{i}.blocks.1.attn.temperature"].shape[0] if depths[i] > 1
             else 2 * sd[f"layers.{i}.blocks.0.attn.attns.0.pos.pos3.2.weight"].shape[0] for i in range(layers)]
    direct = "conv_last.weight" not in sd
    if direct:
        factors = [math.isqrt(sd["upsample.0.weight"].shape[0] // in_nc)]
        feat = 64
    else:
        factors, feat = shuffle_factors(sd, "upsample"), sd["conv_last.weight"].shape[1]
    model = DAT(in_nc, dim, depths, heads, (split[0], split[1]), sd[f"{_BLOCK}ffn.fc1.weight"].shape[0], factors,
                direct, feat, f"{_BLOCK}attn.qkv.bias" in sd, "conv_after_body.0.weight" in sd)
    return model, sd
