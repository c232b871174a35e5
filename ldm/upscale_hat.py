"""HAT upscale models (Chen et al. 2023, "Activating More Pixels in Image Super-Resolution Transformer": HAT-S, HAT
and HAT-L, e.g. 4x_HAT and the community HAT files), built from their state dicts.

HAT is SwinIR's body with two additions: each Swin layer adds a small convolutional branch with channel attention
(CAB, scaled by 0.01) beside its window attention, and each residual group ends with overlapping cross-attention
(OCAB: the queries of each window attend to the keys and values of a larger window around it). Reconstruction is
SwinIR's classical pixel shuffle. Inputs are padded by reflection to a multiple of the window and the result
cropped, as the reference does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.upscale_swin import (
    DERIVED,
    RGB_MEAN,
    Mlp,
    WindowAttention,
    count,
    image,
    nested,
    pad_to_multiple,
    pixel_shuffle_upsample,
    relative_position_index,
    shifted_window_attention,
    shifted_window_mask,
    shuffle_factors,
    tokens,
    window_merge,
    window_of,
    window_partition,
)

CONV_SCALE = 0.01  # the convolution branch's weight against the attention (not in the files)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: `attention` is (pool, 1x1 down, ReLU, 1x1 up, sigmoid) as in the files."""

    def __init__(self, dim: int, squeezed: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, squeezed, 1), nn.ReLU(),
                                       nn.Conv2d(squeezed, dim, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    def __init__(self, dim: int, compressed: int, squeezed: int) -> None:
        super().__init__()
        self.cab = nn.Sequential(nn.Conv2d(dim, compressed, 3, 1, 1), nn.GELU(), nn.Conv2d(compressed, dim, 3, 1, 1),
                                 ChannelAttention(dim, squeezed))

    def forward(self, x: Tensor) -> Tensor:
        return self.cab(x)


class HAB(nn.Module):
    """Hybrid attention block: a Swin layer whose attention is joined by the CAB branch."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int, compressed: int, squeezed: int,
                 qkv_bias: bool) -> None:
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, qkv_bias)
        self.conv_block = CAB(dim, compressed, squeezed)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor, size: tuple[int, int], index: Tensor, mask: Tensor) -> Tensor:
        b, n, c = x.shape
        y = self.norm1(x).view(b, *size, c)
        conv = tokens(self.conv_block(y.permute(0, 3, 1, 2)))
        y = shifted_window_attention(self.attn, y, self.shift, index, mask)
        x = x + y.reshape(b, n, c) + conv * CONV_SCALE
        return x + self.mlp(self.norm2(x))


class OCAB(nn.Module):
    """Overlapping cross-attention: each window's queries attend to the keys and values of the `overlap`-pixel
    window centred on it (zero outside the image)."""

    def __init__(self, dim: int, heads: int, window: int, overlap: int, hidden: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.window, self.overlap = heads, window, overlap
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((window + overlap - 1) ** 2, heads))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor, size: tuple[int, int], index: Tensor) -> Tensor:
        (h, w), window, overlap = size, self.window, self.overlap
        b, _, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, h, w, 3, c).unbind(3)
        q = window_partition(q, window)
        kv = torch.cat([k, v], -1).permute(0, 3, 1, 2)  # [B, 2C, H, W]
        kv = F.unfold(kv, overlap, padding=(overlap - window) // 2, stride=window)  # [B, 2C * overlap², windows]
        k, v = kv.view(b, 2, c, overlap * overlap, -1).permute(1, 0, 4, 3, 2).reshape(2, -1, overlap * overlap, c)
        q, k, v = (t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        bias = self.relative_position_bias_table[index.view(-1)].view(window * window, overlap * overlap, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.permute(2, 0, 1).to(q.dtype))
        out = window_merge(out.transpose(1, 2).reshape(-1, window * window, c), window, h, w)
        x = x + self.proj(out.reshape(b, h * w, c))
        return x + self.mlp(self.norm2(x))


def overlap_position_index(window: int, overlap: int) -> Tensor:
    """[window², overlap²]: the bias table row ((window + overlap - 1)² offsets) of each query-key pair of OCAB."""
    def grid(n: int) -> Tensor:
        return torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")).flatten(1)

    offset = grid(overlap)[:, None, :] - grid(window)[:, :, None] + window - overlap + 1
    return offset[0] * (window + overlap - 1) + offset[1]


class RHAG(nn.Module):
    """Residual hybrid attention group: HABs, then OCAB, then `conv` (absent in "identity" files), plus the input."""

    def __init__(self, group: nn.Module, dim: int, conv: bool) -> None:
        super().__init__()
        self.residual_group = group
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1) if conv else nn.Identity()

    def forward(self, x: Tensor, size: tuple[int, int], indices: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y, size, indices[0], mask)
        y = self.residual_group.overlap_attn(y, size, indices[1])
        return x + tokens(self.conv(image(y, size)))


class HAT(nn.Module):
    """HAT in its files' layer names."""

    supports_half = False  # attention logits overflow fp16, as the reference warns

    def __init__(self, in_nc: int, dim: int, depths: list[int], heads: list[int], window: int, overlap: int,
                 hidden: int, compressed: int, squeezed: int, factors: list[int], feat: int = 64,
                 qkv_bias: bool = True, patch_norm: bool = True, convs: bool = True) -> None:
        super().__init__()
        self.in_channels, self.window, self.scale = in_nc, window, math.prod(factors)
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("index_sa", relative_position_index(window), persistent=False)
        self.register_buffer("index_oca", overlap_position_index(window, overlap), persistent=False)
        self.conv_first = nn.Conv2d(in_nc, dim, 3, 1, 1)
        self.patch_embed = nested(norm=nn.LayerNorm(dim) if patch_norm else nn.Identity())
        self.layers = nn.ModuleList(
            RHAG(nested(blocks=nn.ModuleList(HAB(dim, h, window, window // 2 if i % 2 else 0, hidden, compressed,
                                                 squeezed, qkv_bias) for i in range(d)),
                        overlap_attn=OCAB(dim, h, window, overlap, hidden, qkv_bias)), dim, convs)
            for d, h in zip(depths, heads, strict=True))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1) if convs else nn.Identity()
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU(0.01))
        self.upsample = pixel_shuffle_upsample(feat, factors)
        self.conv_last = nn.Conv2d(feat, in_nc, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        first = self.conv_first(pad_to_multiple(x, self.window) - self.mean)
        size = (first.shape[2], first.shape[3])
        mask = shifted_window_mask(*size, self.window, self.window // 2).to(x.device)
        y = self.patch_embed.norm(tokens(first))
        for layer in self.layers:
            y = layer(y, size, (self.index_sa, self.index_oca), mask)
        feat = self.conv_after_body(image(self.norm(y), size)) + first
        out = self.conv_last(self.upsample(self.conv_before_upsample(feat))) + self.mean
        return out[..., :height * self.scale, :width * self.scale]


_BLOCK = "layers.0.residual_group.blocks.0."


def is_hat(sd: dict[str, Tensor]) -> bool:
    return "layers.0.residual_group.overlap_attn.qkv.weight" in sd and f"{_BLOCK}conv_block.cab.0.weight" in sd


def hat_from_state_dict(sd: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor]]:
    """The HAT a state dict holds (any size), and its weights in the module's names."""
    sd = {k: v for k, v in sd.items() if not k.endswith(DERIVED)}
    dim = sd["conv_first.weight"].shape[0]
    layers = count(sd, "layers.")
    depths = [count(sd, f"layers.{i}.residual_group.blocks.") for i in range(layers)]
    heads = [sd[f"layers.{i}.residual_group.overlap_attn.relative_position_bias_table"].shape[1]
             for i in range(layers)]
    window = window_of(sd[f"{_BLOCK}attn.relative_position_bias_table"])
    # OCAB's table covers (window + overlap - 1)² offsets.
    overlap = math.isqrt(sd["layers.0.residual_group.overlap_attn.relative_position_bias_table"].shape[0]) - window + 1
    if (overlap - window) % 2:
        raise ValueError(f"an overlapping window of {overlap} pixels around a {window}-pixel window")
    model = HAT(sd["conv_first.weight"].shape[1], dim, depths, heads, window, overlap,
                sd[f"{_BLOCK}mlp.fc1.weight"].shape[0], sd[f"{_BLOCK}conv_block.cab.0.weight"].shape[0],
                sd[f"{_BLOCK}conv_block.cab.3.attention.1.weight"].shape[0], shuffle_factors(sd, "upsample"),
                sd["conv_last.weight"].shape[1], f"{_BLOCK}attn.qkv.bias" in sd, "patch_embed.norm.weight" in sd,
                "conv_after_body.weight" in sd)
    return model, sd
