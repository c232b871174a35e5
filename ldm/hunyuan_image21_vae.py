"""HunyuanImage 2.1's image VAE: pictures [B, 3, H, W] in -1..1 <-> 64-channel latents [B, 64, H/32, W/32]
(32x spatial compression: six levels, five 2x downsamples; H and W multiples of 32).

Weights: Comfy-Org's split_files/vae/hunyuan_image_2.1_vae_fp16.safetensors holds Tencent's original keys, no prefix
(ComfyUI detects it by `decoder.conv_in.weight` with 64 input channels and loads it into comfy/ldm/hunyuan_video/
vae.py, whose names are those that diffusers' convert_hunyuan_image_to_diffusers.py reads from Tencent's checkpoint):
LDM-style names, 324 tensors at the released sizes. Module names and shapes here are that file's, so it loads as it is:

    encoder.conv_in.weight                            [128, 3, 3, 3]
    encoder.down.{0..5}.block.{0,1}.{norm1, conv1, norm2, conv2}.{weight, bias}   (GroupNorm(32), 3x3 Conv2d)
    encoder.down.{0..4}.downsample.conv.weight        [C_next / 4, C, 3, 3]
    encoder.mid.block_1 / mid.attn_1 (norm, q, k, v, proj_out: 1x1 Conv2d) / mid.block_2
    encoder.norm_out, encoder.conv_out.weight         [128, 1024, 3, 3]
    decoder.conv_in.weight                            [1024, 64, 3, 3]
    decoder.mid.*, decoder.up.{0..5}.block.{0,1,2}.*, decoder.up.{0..4}.upsample.conv.weight  [4 C_next, C, 3, 3]
    decoder.norm_out, decoder.conv_out.weight         [3, 128, 3, 3]

Widths (128, 256, 512, 512, 1024, 1024), the decoder's reversed; a level's blocks never change the width (the
resamplers do), so no block has a `nin_shortcut`. Tencent's own checkpoint may store some convolutions as 5-D
[out, in, 1, k, k] (diffusers' script squeezes them); they are squeezed on load. diffusers' AutoencoderKLHunyuanImage
numbers each side's resnets and resamplers in one flat list (`encoder.down_blocks.N`, the resamplers holding only
`conv`), names the middle `mid_block.resnets.{0,1}` / `mid_block.attentions.0.{to_q, to_k, to_v, proj}`; it is renamed
on load (`file_from_diffusers` / `diffusers_from_file`).

The network (Tencent's hunyuanimage_vae.py): LDM resnet blocks and middle attention (`ldm.vae`'s, reused), with
resamplers that move pixels to channels and back: a downsample folds each 2x2 pixel block of a conv's C_next / 4
channels into C_next channels and adds the input folded alike, averaged over channel groups; an upsample unfolds a
conv's 4 C_next channels into 2x2 pixels and adds the input's channels repeated and unfolded alike. The encoder's
output adds its input's channel-group means; the decoder's input adds the latent repeated over channels.

Latents are raw: the model family multiplies them by SCALING_FACTOR (no per-channel mean or std). Checked against
diffusers 0.42's AutoencoderKLHunyuanImage with the same weights (tests/ldm/test_hunyuan_image21_vae.py).

HunyuanImage 2.1's refiner uses another VAE, HunyuanVideo 1.5's (`ldm.hunyuan_video15_vae`, 32 channels, 16x).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.vae import AttnBlock, DiagonalGaussianDistribution, ResnetBlock, tiled_apply

# The latent scale: ComfyUI's latent_formats.HunyuanImage21.scale_factor and the `scaling_factor` of the config
# diffusers' convert_hunyuan_image_to_diffusers.py writes for AutoencoderKLHunyuanImage (its pipeline divides latents
# by it before decoding) agree. Neither applies a per-channel mean or std.
SCALING_FACTOR = 0.75289


@dataclass(frozen=True)
class HunyuanImage21VAEConfig:
    """Sizes of the VAE; the defaults are the released one's. The decoder mirrors the encoder's widths; every level
    but the last ends in a 2x resampler."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    layers_per_block: int = 2  # encoder; the decoder's levels hold one more
    latent_channels: int = 64
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        widths, z = self.block_out_channels, self.latent_channels
        if len(widths) < 2 or any(w % 32 for w in widths):
            raise ValueError(f"widths {widths}: at least two levels, each a multiple of 32 (GroupNorm's groups)")
        if any(4 * a % b or 4 * b % a for a, b in pairwise(widths)):
            raise ValueError(f"widths {widths}: neighbours must divide four times each other (the resamplers' folds)")
        if widths[-1] % (2 * z):
            raise ValueError(f"the last width {widths[-1]} must be a multiple of twice the latent channels ({2 * z})")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


HUNYUAN_IMAGE21_VAE_CONFIG = HunyuanImage21VAEConfig()


def tiny_config() -> HunyuanImage21VAEConfig:
    """The real levels, 32x compression and 64 latent channels at GroupNorm's fewest channels: tests and examples."""
    return HunyuanImage21VAEConfig(block_out_channels=(32, 32, 64, 64, 128, 128))


def _fold(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 2H, 2W] -> [B, 4C, H, W], channels ordered (row, column, channel)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def _unfold(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `_fold`."""
    b, c, h, w = x.shape
    x = x.reshape(b, 2, 2, c // 4, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


def _group_mean(x: torch.Tensor, group: int) -> torch.Tensor:
    """Means of consecutive groups of `group` channels."""
    b, c, h, w = x.shape
    return x.reshape(b, c // group, group, h, w).mean(dim=2)


class Downsample(nn.Module):
    """A conv to out_dim / 4 channels folded to half size, plus the input folded and averaged over channel groups."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim // 4, 3, padding=1)
        self.group = 4 * in_dim // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fold(self.conv(x)) + _group_mean(_fold(x), self.group)


class Upsample(nn.Module):
    """A conv to out_dim * 4 channels unfolded to double size, plus the input's channels repeated and unfolded."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim * 4, 3, padding=1)
        self.repeats = 4 * out_dim // in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _unfold(self.conv(x)) + _unfold(x.repeat_interleave(self.repeats, dim=1))


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block_1 = ResnetBlock(dim, dim)
        self.attn_1 = AttnBlock(dim)
        self.block_2 = ResnetBlock(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block` (resnet blocks), then `downsample` or `upsample` where it has one."""

    def __init__(self, dim: int, blocks: int, resample: Downsample | Upsample | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(dim, dim) for _ in range(blocks))
        self.resample_name = name
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    def __init__(self, c: HunyuanImage21VAEConfig):
        super().__init__()
        widths = c.block_out_channels
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(width, c.layers_per_block,
                  Downsample(width, widths[i + 1]) if i + 1 < len(widths) else None, "downsample")
            for i, width in enumerate(widths))
        self.mid = MidBlock(widths[-1])
        self.norm_out = nn.GroupNorm(32, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 2 * latent_channels, H/32, W/32]: the posterior's mean and log-variance."""
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        shortcut = _group_mean(x, x.shape[1] // self.conv_out.out_channels)
        return self.conv_out(F.silu(self.norm_out(x))) + shortcut


class Decoder(nn.Module):
    def __init__(self, c: HunyuanImage21VAEConfig):
        super().__init__()
        widths = c.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0])
        self.up = nn.ModuleList(
            Level(width, c.layers_per_block + 1,
                  Upsample(width, widths[i + 1]) if i + 1 < len(widths) else None, "upsample")
            for i, width in enumerate(widths))
        self.norm_out = nn.GroupNorm(32, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z) + z.repeat_interleave(self.conv_in.out_channels // z.shape[1], dim=1)
        x = self.mid(x)
        for level in self.up:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class HunyuanImage21VAE(nn.Module):
    """Pictures [B, 3, H, W] in -1..1 (H, W multiples of 32) <-> raw latents [B, 64, H/32, W/32]. `encode` gives the
    posterior (`.mode()`, its mean, is the latent to use); `decode` gives pixels clamped to -1..1."""

    scaling_factor = SCALING_FACTOR  # what the model family multiplies raw latents by

    def __init__(self, config: HunyuanImage21VAEConfig = HUNYUAN_IMAGE21_VAE_CONFIG):
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.spatial_compression = config.spatial_compression
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels` in the model's dtype; ValueError for shapes it cannot encode."""
        s, channels = self.spatial_compression, self.config.in_channels
        if pixels.ndim != 4 or pixels.shape[1] != channels or pixels.shape[2] % s or pixels.shape[3] % s:
            raise ValueError(f"the HunyuanImage 2.1 VAE encodes pictures [B, {channels}, H, W] with sides multiples "
                             f"of {s}, got {list(pixels.shape)}")
        return pixels.to(self.dtype)

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior over latents [B, latent_channels, H/32, W/32] of `pixels` [B, 3, H, W]."""
        return DiagonalGaussianDistribution(self.encoder(self._pixels(pixels)))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, 32h, 32w] in -1..1 from raw latents [B, latent_channels, h, w]."""
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"expected HunyuanImage 2.1 latents [B, {self.latent_channels}, h, w], "
                             f"got {list(latent.shape)}")
        return self.decoder(latent.to(self.dtype)).clamp(-1.0, 1.0)

    def encode_tiled(self, pixels: torch.Tensor, tile_size: int = 512, overlap: int = 64
                     ) -> DiagonalGaussianDistribution:
        """`encode` in pixel tiles of `tile_size` overlapping by `overlap` (multiples of 32), blended."""
        moments = tiled_apply(self.encoder, self._pixels(pixels), tile_size, overlap, 1.0 / self.spatial_compression,
                              2 * self.latent_channels)
        return DiagonalGaussianDistribution(moments)

    def decode_tiled(self, latent: torch.Tensor, tile_size: int = 16, overlap: int = 4) -> torch.Tensor:
        """`decode` in latent tiles of `tile_size` overlapping by `overlap`, blended."""
        return tiled_apply(self.decode, latent, tile_size, overlap, float(self.spatial_compression),
                           self.config.out_channels)


# --- files -----------------------------------------------------------------------------------------------------

_MARKERS = ("encoder.conv_in.weight", "encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.conv1.weight",
            "encoder.mid.attn_1.proj_out.weight", "decoder.conv_in.weight", "decoder.up.0.upsample.conv.weight",
            "decoder.up.1.block.0.conv1.weight", "decoder.norm_out.weight")
_DIFFUSERS_MARKERS = ("encoder.conv_in.weight", "encoder.down_blocks.0.conv1.weight",
                      "encoder.mid_block.attentions.0.proj.weight", "decoder.conv_in.weight",
                      "decoder.up_blocks.0.conv1.weight", "decoder.mid_block.attentions.0.proj.weight")
# The middle: (file name, diffusers' name) prefixes after `encoder.` / `decoder.`.
_MID = (("mid.block_1.", "mid_block.resnets.0."), ("mid.block_2.", "mid_block.resnets.1."),
        ("mid.attn_1.q.", "mid_block.attentions.0.to_q."), ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
        ("mid.attn_1.v.", "mid_block.attentions.0.to_v."), ("mid.attn_1.proj_out.", "mid_block.attentions.0.proj."),
        ("mid.attn_1.norm.", "mid_block.attentions.0.norm."))
_SIDES = (("encoder", "down", "down_blocks", "downsample"), ("decoder", "up", "up_blocks", "upsample"))


def _squeezed(sd: StateDict) -> StateDict:
    """`sd` with 5-D convolution weights of temporal kernel 1 ([out, in, 1, k, k], Tencent's checkpoint) made 2-D."""
    return {k: v.squeeze(2) if v.ndim == 5 and v.shape[2] == 1 else v for k, v in sd.items()}


def _rename_mid(key: str, to_diffusers: bool) -> str:
    side, _, rest = key.partition(".")
    for file_name, diffusers_name in _MID:
        old, new = (file_name, diffusers_name) if to_diffusers else (diffusers_name, file_name)
        if rest.startswith(old):
            return f"{side}.{new}{rest[len(old):]}"
    return key


def diffusers_from_file(sd: StateDict) -> StateDict:
    """The file's tensors under AutoencoderKLHunyuanImage's names: each side's levels flattened into one list of
    resnets and resamplers, in order."""
    out = {}
    for side, level_name, flat_name, resample_name in _SIDES:
        pattern = re.compile(rf"{side}\.{level_name}\.(\d+)\.(?:block\.(\d+)|{resample_name})\.(.+)")
        parts = sorted({(int(m[1]), -1 if m[2] is None else int(m[2])) for k in sd if (m := pattern.fullmatch(k))},
                       key=lambda p: (p[0], p[1] < 0, p[1]))  # a level's blocks, then its resampler
        flat = {part: n for n, part in enumerate(parts)}
        for key, value in sd.items():
            if m := pattern.fullmatch(key):
                index = flat[int(m[1]), -1 if m[2] is None else int(m[2])]
                out[f"{side}.{flat_name}.{index}.{m[3]}"] = value
    for key, value in sd.items():
        if not any(re.match(rf"{side}\.{level}\.\d+\.", key) for side, level, _, _ in _SIDES):
            out[_rename_mid(key, to_diffusers=True)] = value
    return out


def file_from_diffusers(sd: StateDict) -> StateDict:
    """AutoencoderKLHunyuanImage's tensors under the file's (Tencent's original) names: a resampler (a `conv` with
    no `conv1`) ends a level."""
    out = {}
    for side, level_name, flat_name, resample_name in _SIDES:
        pattern = re.compile(rf"{side}\.{flat_name}\.(\d+)\.(.+)")
        entries = sorted({int(m[1]) for k in sd if (m := pattern.fullmatch(k))})
        names, level, block = {}, 0, 0
        for n in entries:
            if f"{side}.{flat_name}.{n}.conv1.weight" in sd:
                names[n], block = f"{side}.{level_name}.{level}.block.{block}", block + 1
            else:
                names[n], level, block = f"{side}.{level_name}.{level}.{resample_name}", level + 1, 0
        for key, value in sd.items():
            if m := pattern.fullmatch(key):
                out[f"{names[int(m[1])]}.{m[2]}"] = value
    for key, value in sd.items():
        if not any(re.match(rf"{side}\.{flat}\.\d+\.", key) for side, _, flat, _ in _SIDES):
            out[_rename_mid(key, to_diffusers=False)] = value
    return out


def is_hunyuan_image21_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict (or `ckpt.read_shapes`' meta tensors) is HunyuanImage 2.1's VAE in the file's layout:
    LDM names whose 2-D resamplers fold pixels into channels: a downsample conv gives a quarter of the next level's
    width, an upsample conv four times it. The LDM image VAEs (SD, SDXL, Flux: width-keeping strided downsamples,
    `up.0` the last level), Comfy-Org's HunyuanImage refiner VAE (3-D kernels, 2x2x2 folds), HunyuanVideo 1.5's
    (`conv_in.conv`), Wan's (`encoder.conv1`) and LTX-Video's (`up_blocks`) do not fit."""
    if not all(k in sd for k in _MARKERS):
        return False
    shape = {k: tuple(sd[k].shape) for k in _MARKERS}
    if any(len(s) not in (4, 5) or (len(s) == 5 and s[2] != 1) for k, s in shape.items() if "norm" not in k):
        return False
    down = shape["encoder.down.0.downsample.conv.weight"][0] * 4 == shape["encoder.down.1.block.0.conv1.weight"][0]
    up = shape["decoder.up.0.upsample.conv.weight"][0] == 4 * shape["decoder.up.1.block.0.conv1.weight"][0]
    return down and up


def _is_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return all(k in sd for k in _DIFFUSERS_MARKERS)


def _indices(keys: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m[1]) for k in keys if (m := pattern.match(k))})


def config_from_state_dict(sd: StateDict) -> HunyuanImage21VAEConfig:
    """The sizes of a HunyuanImage 2.1 VAE in the file's layout, read from its shapes (tensors or meta tensors);
    ValueError when it is not one or its shapes are not those of the config they imply."""
    if not is_hunyuan_image21_vae(sd):
        raise ValueError("no HunyuanImage 2.1 VAE weights (encoder.down.N.downsample.conv folding 2x2 pixels, ...)")
    sd = _squeezed(sd)
    levels = _indices(sd, "encoder.down.")
    down = [i for i in levels if f"encoder.down.{i}.downsample.conv.weight" in sd]
    if levels != list(range(len(levels))) or down != levels[:-1]:
        raise ValueError("the encoder's levels are not numbered 0..n with downsamples on all but the last")
    widths = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels)
    config = HunyuanImage21VAEConfig(
        widths, layers_per_block=len(_indices(sd, "encoder.down.0.block.")),
        latent_channels=sd["decoder.conv_in.weight"].shape[1], in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0])
    ckpt.check_fit(lambda: HunyuanImage21VAE(config), sd, config)
    return config


def peek_hunyuan_image21_vae(path: str | Path) -> bool:
    """Whether a .safetensors file is HunyuanImage 2.1's VAE (the file's layout or diffusers'), from its header."""
    try:
        shapes = ckpt.read_shapes(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return shapes is not None and (is_hunyuan_image21_vae(shapes) or _is_diffusers_layout(shapes))


def load_hunyuan_image21_vae(path_or_state_dict: str | Path | StateDict, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32) -> HunyuanImage21VAE:
    """HunyuanImage 2.1's VAE from its file (or its tensors; the file's layout or diffusers'), on `device` in
    `dtype`, frozen; CheckpointError naming the problem for anything else."""
    if isinstance(path_or_state_dict, dict):
        sd, path = path_or_state_dict, Path("state dict")
    else:
        path = Path(path_or_state_dict)
        sd = ckpt.load_state_dict(path)
    if _is_diffusers_layout(sd):
        sd = file_from_diffusers(sd)
    if not is_hunyuan_image21_vae(sd):
        raise CheckpointError(f"{path.name}: not HunyuanImage 2.1's VAE (no encoder.down.N.downsample.conv / "
                              "decoder.up.N.upsample.conv folding 2x2 pixels into channels, nor diffusers' names)")
    sd = _squeezed(sd)
    try:
        config = config_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    return ckpt._materialize(lambda: HunyuanImage21VAE(config), sd, "HunyuanImage 2.1 VAE", path, device, dtype)


def tiny_state_dict(seed: int = 0) -> StateDict:
    """Seeded random weights of `tiny_config()` in the file's layout (norm gains near 1, small biases, weights at
    1/sqrt(fan-in), so activations stay in range)."""
    model = HunyuanImage21VAE(tiny_config())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif param.ndim == 1:  # GroupNorm gains
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise * param[0].numel() ** -0.5)
    return model.state_dict()
