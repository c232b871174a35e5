"""Lightricks' latent upsampler (LTX-2's `ltx-2-spatial-upscaler-x2-1.0.safetensors`, and LTX-Video's
`ltxv-spatial-upscaler-*` files): a small convolutional network that doubles a video latent's width and height (or
its frames) in the VAE's raw latent space. Attribute names follow the files' keys, which ComfyUI's LatentUpsampler
and diffusers' LTX2LatentUpsamplerModel share:

    initial_conv, initial_norm                     conv 3x3(x3) in_channels -> mid_channels, GroupNorm(32)
    res_blocks.N.{conv1,norm1,conv2,norm2}         conv-norm-SiLU-conv-norm, SiLU after adding the input
    upsampler.0                                    (plain) conv to 4x (2-D, per frame; spatial), 8x (3-D; both) or 2x
                                                   (3-D; frames) the channels, then pixel-shuffled
    upsampler.conv, upsampler.blur_down.kernel     (rational) per-frame conv to num^2 x the channels, shuffled by num,
                                                   then a 5x5 binomial blur with stride den: a scale of num/den
    post_upsample_res_blocks.N.*, final_conv       as above, back to in_channels

The file's metadata `config` JSON names the layout (ComfyUI builds from it alone); here the shapes do, the metadata
only telling a rational resampler's scale where the shapes leave it open (0.75 and 1.5 both upsample by 3).
`upsample_latent` is ComfyUI's LTXVLatentUpsampler: the normalised latent un-normalised with the VAE's per-channel
statistics, upsampled, normalised again. Matched against diffusers' LTX2LatentUpsamplerModel.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict

# scale -> (upsampling factor, blur stride), as the original's rational resampler maps them.
RATIONAL_SCALES = {0.75: (3, 4), 1.5: (3, 2), 2.0: (2, 1), 4.0: (4, 1)}
_MARKER = "post_upsample_res_blocks.0.conv2.bias"  # ComfyUI's LatentUpscaleModelLoader tells these files by it


@dataclass(frozen=True)
class LatentUpsamplerConfig:
    in_channels: int = 128
    mid_channels: int = 1024
    blocks_per_stage: int = 4
    dims: int = 3  # 3: 3-D convolutions over (frames, height, width); 2: every frame on its own
    spatial: bool = True
    temporal: bool = False
    rational: bool = False  # spatial only: upsampler.conv + blur_down, by `spatial_scale`
    spatial_scale: float = 2.0


def _conv(dims: int, cin: int, cout: int) -> nn.Module:
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, cout, 3, padding=1)


def _per_frame(x: torch.Tensor, fn) -> torch.Tensor:
    """Applies a 2-D `fn` to every frame of [B, C, F, H, W]."""
    b, _, f, _, _ = x.shape
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, f)).transpose(1, 2)


def pixel_shuffle(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """[B, C * prod(factors), d1, .., dn] -> [B, C, d1 * f1, .., dn * fn], the channels split as (C, f1, .., fn)."""
    n, (b, c, *dims) = len(factors), x.shape
    x = x.reshape(b, c // math.prod(factors), *factors, *dims)
    x = x.permute(0, 1, *(i for k in range(n) for i in (2 + n + k, 2 + k)))  # (.., d1, f1, .., dn, fn)
    return x.reshape(b, c // math.prod(factors), *(d * f for d, f in zip(dims, factors, strict=True)))


class ResBlock(nn.Module):
    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.conv1 = _conv(dims, channels, channels)
        self.norm1 = nn.GroupNorm(32, channels)
        self.conv2 = _conv(dims, channels, channels)
        self.norm2 = nn.GroupNorm(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + x)


class BlurDownsample(nn.Module):
    """Anti-aliased downsampling of [N, C, H, W] by `stride`: a normalised 5x5 binomial kernel per channel."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        self.register_buffer("kernel", (torch.outer(k, k) / k.sum() ** 2)[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x
        weight = self.kernel.to(x).expand(x.shape[1], 1, -1, -1)
        return F.conv2d(x, weight, stride=self.stride, padding=2, groups=x.shape[1])


class RationalResampler(nn.Module):
    """Scales [N, C, H, W] by num/den: a convolution to num^2 times the channels, shuffled into space, then blurred
    down by den."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.num, den = RATIONAL_SCALES[scale]
        self.conv = nn.Conv2d(channels, self.num ** 2 * channels, 3, padding=1)
        self.blur_down = BlurDownsample(den)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blur_down(pixel_shuffle(self.conv(x), (self.num, self.num)))


class LatentUpsampler(nn.Module):
    """Raw video latents [B, C, F, h, w] -> [B, C, F, 2h, 2w] (spatial; num/den for a rational resampler),
    [B, C, 2F - 1, h, w] (temporal: the first frame of the doubled sequence dropped, as the causal VAE's frames
    go) or [B, C, 2F - 1, 2h, 2w] (both)."""

    def __init__(self, config: LatentUpsamplerConfig):
        super().__init__()
        c = config
        if not (c.spatial or c.temporal):
            raise ValueError("a latent upsampler upsamples space, frames or both")
        self.config = c
        mid = c.mid_channels
        self.initial_conv = _conv(c.dims, c.in_channels, mid)
        self.initial_norm = nn.GroupNorm(32, mid)
        self.res_blocks = nn.ModuleList(ResBlock(mid, c.dims) for _ in range(c.blocks_per_stage))
        if c.rational:
            self.upsampler: nn.Module = RationalResampler(mid, c.spatial_scale)
        elif c.spatial and not c.temporal:
            self.upsampler = nn.Sequential(nn.Conv2d(mid, 4 * mid, 3, padding=1))
        else:
            self.upsampler = nn.Sequential(nn.Conv3d(mid, (8 if c.spatial else 2) * mid, 3, padding=1))
        self.post_upsample_res_blocks = nn.ModuleList(ResBlock(mid, c.dims) for _ in range(c.blocks_per_stage))
        self.final_conv = _conv(c.dims, mid, c.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.initial_conv.weight.dtype

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, C, sH, sW]."""
        return self.upsampler(x) if self.config.rational else pixel_shuffle(self.upsampler(x), (2, 2))

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.temporal:
            return pixel_shuffle(self.upsampler(x), (2, 2, 2) if c.spatial else (2, 1, 1))[:, :, 1:]
        return self._spatial(x) if x.ndim == 4 else _per_frame(x, self._spatial)

    def _stages(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.initial_norm(self.initial_conv(x)))
        for block in self.res_blocks:
            x = block(x)
        x = self._upsample(x)
        for block in self.post_upsample_res_blocks:
            x = block(x)
        return self.final_conv(x)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.config.in_channels:
            raise ValueError(f"latent upsampler: expected latents [B, {self.config.in_channels}, F, h, w], "
                             f"got {list(latent.shape)}")
        if self.config.dims == 2:
            return _per_frame(latent, self._stages)
        return self._stages(latent)


def is_latent_upsampler(keys: Collection[str]) -> bool:
    return _MARKER in keys and "initial_conv.weight" in keys


def _count(keys: Collection[str], part: str) -> int:
    pattern = re.compile(re.escape(part) + r"\.(\d+)\.conv1\.weight$")
    return len({m[1] for k in keys if (m := pattern.match(k))})


def _metadata_scale(metadata: dict[str, str] | None) -> float | None:
    try:
        config = json.loads((metadata or {}).get("config", "{}"))
    except json.JSONDecodeError:
        return None
    scale = config.get("spatial_scale") if isinstance(config, dict) else None
    return float(scale) if isinstance(scale, int | float) else None


def config_from_state_dict(sd: StateDict, metadata: dict[str, str] | None = None) -> LatentUpsamplerConfig:
    """The layout from the weights' shapes (and, for a rational resampler of factor 3, the metadata's
    `spatial_scale`); ValueError for weights that are no latent upsampler this module can run."""
    if not is_latent_upsampler(sd):
        raise ValueError(f"no latent upsampler weights (initial_conv / {_MARKER})")
    conv = sd["initial_conv.weight"]
    mid, cin, dims = conv.shape[0], conv.shape[1], conv.ndim - 2
    blocks = _count(sd, "res_blocks")
    if blocks != _count(sd, "post_upsample_res_blocks") or mid % 32:
        raise ValueError("the stages before and after upsampling differ, or the width is no multiple of 32")
    if "upsampler.conv.weight" in sd:
        num = math.isqrt(sd["upsampler.conv.weight"].shape[0] // mid)
        scales = [s for s, (n, _) in RATIONAL_SCALES.items() if n == num]
        scale = _metadata_scale(metadata)
        if scale not in scales:
            if len(scales) != 1:
                raise ValueError(f"a rational resampler upsampling by {num}: the file's metadata must name its "
                                 f"spatial_scale (one of {scales})")
            scale = scales[0]
        return LatentUpsamplerConfig(cin, mid, blocks, dims, True, False, True, scale)
    up = sd["upsampler.0.weight"]
    kind = {(4, 4): (True, False), (5, 8): (True, True), (5, 2): (False, True)}.get((up.ndim, up.shape[0] // mid))
    if kind is None:
        raise ValueError(f"upsampler.0 of shape {list(up.shape)} is no known upsampler")
    return LatentUpsamplerConfig(cin, mid, blocks, dims, *kind)


def load_latent_upsampler(path_or_state_dict: str | Path | StateDict, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> LatentUpsampler:
    """A latent upsampler from a file (its metadata read for the scale) or tensors, on `device` in `dtype`,
    frozen. CheckpointError names the problem for other files, missing weights or leftover ones."""
    if isinstance(path_or_state_dict, dict):
        path, sd, metadata = Path("state dict"), path_or_state_dict, {}
    else:
        path = Path(path_or_state_dict)
        sd, metadata = ckpt.load_state_dict(path), ckpt.read_metadata(path)
    try:
        config = config_from_state_dict(sd, metadata)
    except ValueError as e:
        from ldm.parts import look_of

        look = look_of(sd)
        held = f"; it looks like {look.what}: {look.advice}" if look is not None else ""
        raise CheckpointError(f"{path.name}: {e}: neither LTX-2's latent upsampler nor HunyuanVideo 1.5's{held}"
                              ) from None
    model = ckpt._materialize(lambda: LatentUpsampler(config), sd, "latent upsampler", path, device, dtype)
    unused = sorted(set(sd) - set(model.state_dict()))
    if unused:
        raise CheckpointError(f"{path.name}: {len(unused)} weights have no place in a latent upsampler: "
                              + ", ".join(unused[:8]))
    return model


@torch.no_grad()
def upsample_latent(upsampler: LatentUpsampler, latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI's LTXVLatentUpsampler on a Loom LATENT's samples: the VAE's raw latents (Loom's LTX families normalise
    them as they sample, where ComfyUI's LATENT holds them normalised and its node takes the normalisation off
    around the upsampler, to the same effect), upsampled in the upsampler's dtype on its device, returned in the
    input's dtype on its device. (The node also drops the LATENT's noise_mask.)"""
    device = upsampler.initial_conv.weight.device
    return upsampler(latent.to(device, upsampler.dtype)).to(latent.device, latent.dtype)
