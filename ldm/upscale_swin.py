"""SwinIR upscale models (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer": the classical,
lightweight and real-world SR files, and the denoising/JPEG ones), and the shifted-window attention pieces HAT
(ldm/upscale_hat.py) shares with it.

SwinIR: a 3x3 convolution, residual Swin transformer blocks (RSTB: Swin layers that attend within windows of
`window` pixels, every second one over windows shifted by half a window, then a convolution, plus the block's
input), a LayerNorm and convolution plus the first features, then one of four reconstructions: pixel shuffle
after a 64-channel convolution (classical), one direct pixel shuffle (lightweight), nearest-neighbour x2 steps
(real-world), or none (restoration at x1, adding the image back). Inputs are padded by reflection to a multiple
of the window and the result cropped, as the reference does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's mean colour, which the training pipelines subtract
MASKED = -100.0  # the references' value for pairs of pixels that a shifted window joins across the image edge


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """`x` padded right and bottom by reflection to a multiple of `multiple` (replicated where the image is
    too small to reflect)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def tokens(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H W, C]."""
    return x.flatten(2).transpose(1, 2)


def image(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, H W, C] -> [B, C, H, W]."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, *size)


def nested(**children: nn.Module) -> nn.Module:
    """A module that only holds `children`: the files nest some layers a level deeper than the code needs
    (`patch_embed.norm`, `residual_group.blocks`)."""
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder


def window_partition(x: Tensor, window: int | tuple[int, int]) -> Tensor:
    """[B, H, W, C] -> [B * windows, window height * width, C], windows in row-major order."""
    (wh, ww), (b, h, w, c) = _pair(window), x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_merge(windows: Tensor, window: int | tuple[int, int], height: int, width: int) -> Tensor:
    """The inverse of `window_partition`: [B * windows, window height * width, C] -> [B, H, W, C]."""
    (wh, ww), c = _pair(window), windows.shape[-1]
    x = windows.view(-1, height // wh, width // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


def _pair(n: int | tuple[int, int]) -> tuple[int, int]:
    return (n, n) if isinstance(n, int) else n


def relative_position_index(window: int | tuple[int, int]) -> Tensor:
    """[window pixels, window pixels]: for each pair of pixels in a window, the row of the relative position bias
    table ((2 height - 1) (2 width - 1) offsets, row-major) that holds their offset's bias."""
    wh, ww = _pair(window)
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    offset = coords[:, :, None] - coords[:, None, :]
    return (offset[0] + wh - 1) * (2 * ww - 1) + offset[1] + ww - 1


def shifted_window_mask(height: int, width: int, window: int | tuple[int, int],
                        shift: int | tuple[int, int]) -> Tensor:
    """[windows, window pixels, window pixels]: MASKED between pixels that the cyclic shift brings from different
    regions of the image into one window, 0 elsewhere."""
    (wh, ww), (sh, sw) = _pair(window), _pair(shift)
    region = torch.zeros(1, height, width, 1)
    for i, rows in enumerate((slice(0, -wh), slice(-wh, -sh), slice(-sh, None))):
        for j, cols in enumerate((slice(0, -ww), slice(-ww, -sw), slice(-sw, None))):
            region[:, rows, cols, :] = i * 3 + j
    labels = window_partition(region, (wh, ww))[..., 0]
    return torch.where(labels[:, None, :] != labels[:, :, None], MASKED, 0.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a learned bias per relative offset."""

    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, index: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B * windows, window², C]; index: `relative_position_index`; mask: [windows, window², window²]."""
        n, tokens, c = x.shape
        q, k, v = self.qkv(x).view(n, tokens, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
        if mask is not None:  # per window: fold the windows out of the batch so the mask broadcasts over images
            windows = mask.shape[0]
            q, k, v = (t.view(n // windows, windows, *t.shape[1:]) for t in (q, k, v))
            bias = bias + mask[:, None].to(bias.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.reshape(n, self.heads, tokens, -1).transpose(1, 2).reshape(n, tokens, c))


def shifted_window_attention(attn: WindowAttention, x: Tensor, shift: int, index: Tensor, mask: Tensor) -> Tensor:
    """`attn` over the windows of `x` ([B, H, W, C]), cyclically shifted by `shift` pixels first (then `mask`
    keeps apart what the shift joined) and back after."""
    _, h, w, _ = x.shape
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    x = window_merge(attn(window_partition(x, attn.window), index, mask if shift else None), attn.window, h, w)
    return torch.roll(x, (shift, shift), (1, 2)) if shift else x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def residual_conv(dim: int, three: bool) -> nn.Module:
    """The convolution closing a residual group: one 3x3, or ("3conv") 3x3 to dim/4, 1x1, 3x3 back."""
    if not three:
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim // 4, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim, 3, 1, 1))


def pixel_shuffle_upsample(feat: int, factors: list[int]) -> nn.Sequential:
    """Convolution then pixel shuffle per factor (2, 2, ... or one 3), at indices 0, 2, ... as in the files."""
    layers: list[nn.Module] = []
    for f in factors:
        layers += [nn.Conv2d(feat, feat * f * f, 3, 1, 1), nn.PixelShuffle(f)]
    return nn.Sequential(*layers)


def shuffle_factors(sd: dict[str, Tensor], prefix: str) -> list[int]:
    """The pixel-shuffle factor of each convolution of a `pixel_shuffle_upsample` in a state dict."""
    shapes = [sd[f"{prefix}.{i}.weight"].shape for i in range(0, 20, 2) if f"{prefix}.{i}.weight" in sd]
    return [math.isqrt(s[0] // s[1]) for s in shapes]


def count(sd: dict[str, Tensor], prefix: str) -> int:
    """How many `prefix.N.` entries a state dict's sequence holds."""
    numbers = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(numbers) + 1 if numbers else 0


def window_of(table: Tensor) -> int:
    """The window size of a relative position bias table ((2 window - 1)² rows)."""
    return (math.isqrt(table.shape[0]) + 1) // 2


# --- SwinIR ------------------------------------------------------------------------------------------------------


class SwinLayer(nn.Module):
    """One Swin transformer layer: (shifted-)window attention and an MLP, each after a LayerNorm, each residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int) -> None:
        super().__init__()
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: Tensor, size: tuple[int, int], index: Tensor, mask: Tensor) -> Tensor:
        b, n, c = x.shape
        y = shifted_window_attention(self.attn, self.norm1(x).view(b, *size, c), self.shift, index, mask)
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class RSTB(nn.Module):
    """Residual Swin transformer block: `residual_group.blocks`, then `conv` on the image, plus the input."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, hidden: int, three_conv: bool) -> None:
        super().__init__()
        self.residual_group = nested(blocks=nn.ModuleList(
            SwinLayer(dim, heads, window, window // 2 if i % 2 else 0, hidden) for i in range(depth)))
        self.conv = residual_conv(dim, three_conv)

    def forward(self, x: Tensor, size: tuple[int, int], index: Tensor, mask: Tensor) -> Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y, size, index, mask)
        return x + tokens(self.conv(image(y, size)))


class SwinIR(nn.Module):
    """SwinIR in its files' layer names. `upsampler`: "pixelshuffle", "pixelshuffledirect", "nearest+conv" or
    "" (x1); `unshuffle` > 1 folds the image into channels first (`conv_first.1` in those files)."""

    supports_half = False  # attention logits overflow fp16, as the reference warns

    def __init__(self, in_nc: int, dim: int, depths: list[int], heads: list[int], window: int, hidden: int,
                 upsampler: str, factors: list[int], feat: int = 64, three_conv: bool = False,
                 img_range: float = 1.0, unshuffle: int = 1) -> None:
        super().__init__()
        self.in_channels, self.window, self.upsampler, self.img_range = in_nc, window, upsampler, img_range
        self.unshuffle = unshuffle
        self.scale = math.prod(factors) // unshuffle
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("index", relative_position_index(window), persistent=False)
        conv_first = nn.Conv2d(in_nc * unshuffle**2, dim, 3, 1, 1)
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(unshuffle), conv_first) if unshuffle > 1 else conv_first
        self.patch_embed = nested(norm=nn.LayerNorm(dim))
        self.layers = nn.ModuleList(RSTB(dim, d, h, window, hidden, three_conv) for d, h in zip(depths, heads,
                                                                                                strict=True))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = residual_conv(dim, three_conv)
        if upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(dim, in_nc * factors[0] ** 2, 3, 1, 1),
                                          nn.PixelShuffle(factors[0]))
            return
        if upsampler:
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU(0.01))
        if upsampler == "pixelshuffle":
            self.upsample = pixel_shuffle_upsample(feat, factors)
        elif upsampler == "nearest+conv":
            for i in range(len(factors)):
                self.add_module(f"conv_up{i + 1}", nn.Conv2d(feat, feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(feat if upsampler else dim, in_nc, 3, 1, 1)

    def forward_features(self, x: Tensor) -> Tensor:
        size = (x.shape[2], x.shape[3])
        shift_mask = shifted_window_mask(*size, self.window, self.window // 2).to(x.device)
        y = self.patch_embed.norm(tokens(x))
        for layer in self.layers:
            y = layer(y, size, self.index, shift_mask)
        return image(self.norm(y), size)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        # The unshuffled features must be a whole number of windows too.
        x = (pad_to_multiple(x, self.window * self.unshuffle) - self.mean) * self.img_range
        first = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(first)) + first
        if self.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        elif self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif self.upsampler == "nearest+conv":
            feat = self.conv_before_upsample(feat)
            for i in range(1, 4):
                if conv := getattr(self, f"conv_up{i}", None):
                    feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
            out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        else:
            out = x + self.conv_last(feat)
        out = out / self.img_range + self.mean
        return out[..., :height * self.scale, :width * self.scale]


_SWIN_BLOCK = "layers.0.residual_group.blocks.0."
# Buffers a file may hold that the modules derive from the window size and the image instead.
DERIVED = (".attn_mask", ".relative_position_index", "relative_position_index_SA", "relative_position_index_OCA")


def is_swinir(sd: dict[str, Tensor]) -> bool:
    return f"{_SWIN_BLOCK}attn.relative_position_bias_table" in sd and f"{_SWIN_BLOCK}mlp.fc1.weight" in sd


def swinir_from_state_dict(sd: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor]]:
    """The SwinIR a state dict holds (every size and reconstruction kind), and its weights in the module's names."""
    sd = {k: v for k, v in sd.items() if not k.endswith(DERIVED)}
    first = sd.get("conv_first.weight", sd.get("conv_first.1.weight"))
    if first is None:
        raise KeyError("conv_first.weight")
    dim, in_nc = first.shape[0], first.shape[1]
    unshuffle = math.isqrt(in_nc // 3) if "conv_first.1.weight" in sd else 1
    layers = count(sd, "layers.")
    depths = [count(sd, f"layers.{i}.residual_group.blocks.") for i in range(layers)]
    heads = [sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
             for i in range(layers)]
    window = window_of(sd[f"{_SWIN_BLOCK}attn.relative_position_bias_table"])
    hidden = sd[f"{_SWIN_BLOCK}mlp.fc1.weight"].shape[0]
    feat = sd["conv_before_upsample.0.weight"].shape[0] if "conv_before_upsample.0.weight" in sd else 64
    if "conv_before_upsample.0.weight" in sd and "conv_up1.weight" in sd:
        upsampler, factors = "nearest+conv", [2] * sum(1 for i in range(1, 4) if f"conv_up{i}.weight" in sd)
    elif "conv_before_upsample.0.weight" in sd:
        upsampler, factors = "pixelshuffle", shuffle_factors(sd, "upsample")
    elif "upsample.0.weight" in sd:
        out_nc = in_nc // unshuffle**2
        upsampler, factors = "pixelshuffledirect", [math.isqrt(sd["upsample.0.weight"].shape[0] // out_nc)]
    else:
        upsampler, factors = "", [1]
    # The JPEG-artifact models are the only ones with 7-pixel windows, and they work in 0-255 (as the reference
    # assumes too: nothing in the file says so).
    img_range = 255.0 if window == 7 else 1.0
    model = SwinIR(in_nc // unshuffle**2, dim, depths, heads, window, hidden, upsampler, factors, feat,
                   "conv_after_body.0.weight" in sd, img_range, unshuffle)
    return model, sd
