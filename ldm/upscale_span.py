"""SPAN upscale models (Wan et al. 2024, "Swift Parameter-free Attention Network for Efficient Super-Resolution":
4x-ClearRealityV1 and the other 2x/4x SPAN community files), built from their state dicts.

SPAN: a re-parameterisable 3x3 convolution, six parameter-free attention blocks (three such convolutions with
SiLU between them; the block's output is (conv out + input) * (sigmoid(conv out) - 0.5)), a 1x1 convolution over
four of the intermediate features, and a pixel shuffle. Each "Conv3XC" trains as 1x1 -> 3x3 -> 1x1 plus a 1x1
skip and runs as the single 3x3 convolution those fold into; the reference folds them on every inference pass and
ignores the file's own `eval_conv`, so this module folds them once, when the file is read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K's mean colour, which the training pipeline subtracts


class FoldedConv(nn.Module):
    """A Conv3XC at inference: one 3x3 convolution, named `eval_conv` as in the files."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.eval_conv(x)


class SPAB(nn.Module):
    """Swift parameter-free attention block: returns its output and its first convolution's after the SiLU
    (which SPAN's last block hands to the concatenation: the reference's in-place SiLU changes that tensor)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1_r = FoldedConv(channels, channels)
        self.c2_r = FoldedConv(channels, channels)
        self.c3_r = FoldedConv(channels, channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out1 = F.silu(self.c1_r(x))
        out3 = self.c3_r(F.silu(self.c2_r(out1)))
        return (out3 + x) * (torch.sigmoid(out3) - 0.5), out1


class SPAN(nn.Module):
    """SPAN in its files' layer names. `norm`: subtract the mean colour and scale by 255 first (files that hold a
    `no_norm` marker skip it); the output is not scaled back, as in the reference."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, channels: int = 48, scale: int = 4, norm: bool = True) -> None:
        super().__init__()
        self.in_channels, self.scale, self.norm = in_nc, scale, norm
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_1 = FoldedConv(in_nc, channels)
        for i in range(1, 7):
            self.add_module(f"block_{i}", SPAB(channels))
        self.conv_cat = nn.Conv2d(channels * 4, channels, 1)
        self.conv_2 = FoldedConv(channels, channels)
        self.upsampler = nn.Sequential(nn.Conv2d(channels, out_nc * scale**2, 3, 1, 1), nn.PixelShuffle(scale))

    def forward(self, x: Tensor) -> Tensor:
        if self.norm:
            x = (x - self.mean) * 255.0
        first = self.conv_1(x)
        out, _ = self.block_1(first)
        after_1 = out
        for block in (self.block_2, self.block_3, self.block_4, self.block_5):
            out, _ = block(out)
        out, early_6 = self.block_6(out)
        return self.upsampler(self.conv_cat(torch.cat([first, self.conv_2(out), after_1, early_6], 1)))


def is_span(sd: dict[str, Tensor]) -> bool:
    return all(k in sd for k in ("conv_1.sk.weight", "block_1.c1_r.sk.weight", "conv_cat.weight",
                                 "upsampler.0.weight"))


def span_from_state_dict(sd: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor]]:
    """The SPAN a state dict holds, and the state dict with every Conv3XC folded into its `eval_conv`."""
    in_nc, channels = sd["conv_1.sk.weight"].shape[1], sd["conv_1.sk.weight"].shape[0]
    shuffled = sd["upsampler.0.weight"].shape[0]
    scale = round((shuffled / in_nc) ** 0.5)
    if in_nc * scale**2 != shuffled:
        raise ValueError(f"upsampler.0 gives {shuffled} channels, not {in_nc} times a square")
    model = SPAN(in_nc, in_nc, channels, scale, norm="no_norm" not in sd)
    return model, fold_conv3xc(sd)


def fold_conv3xc(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every Conv3XC's training branches (`P.conv.0/1/2`, `P.sk`) as the one 3x3 convolution `P.eval_conv`
    they compute; the file's stale `eval_conv` and the `no_norm` marker are dropped."""
    out = {k: v for k, v in sd.items() if k != "no_norm" and ".eval_conv." not in k}
    for prefix in [k.removesuffix(".sk.weight") for k in sd if k.endswith(".sk.weight")]:
        dtype = sd[f"{prefix}.sk.weight"].dtype
        # Fold in float64: the chain multiplies three layers' weights.
        w1, b1, w2, b2, w3, b3, skip_w, skip_b = (out.pop(f"{prefix}.{name}").double() for name in (
            "conv.0.weight", "conv.0.bias", "conv.1.weight", "conv.1.bias", "conv.2.weight", "conv.2.bias",
            "sk.weight", "sk.bias"))
        # 1x1 (n <- i), 3x3 (m <- n), 1x1 (o <- m): one 3x3 kernel o <- i; the 1x1 skip adds to its centre.
        weight = torch.einsum("om,mnyx,ni->oiyx", w3[:, :, 0, 0], w2, w1[:, :, 0, 0]) + F.pad(skip_w, (1, 1, 1, 1))
        bias = w3[:, :, 0, 0] @ (w2.sum((2, 3)) @ b1 + b2) + b3 + skip_b
        out[f"{prefix}.eval_conv.weight"], out[f"{prefix}.eval_conv.bias"] = weight.to(dtype), bias.to(dtype)
    return out
