"""LTX-Video's causal video VAE (Lightricks' CausalVideoAutoencoder, 0.9.0 / 0.9.1 / 0.9.5, and LTX-2's): attribute
names follow the `vae.` keys of the all-in-one `ltx-video-2b-v0.9*.safetensors` and `ltx-2-19b-*.safetensors` files.

Pixels [B, 3, T, H, W] in -1..1 <-> 128-channel latents [B, 128, 1 + (T-1)//8, H/32, W/32]. 4x4 pixel patches are
folded into channels first, then three 2x2x2 compressions. The encoder's convolutions are causal (frames are padded
by repeating the first one), the decoder's are not (first and last frame repeated). Norms are parameter-free RMS norms
over channels ("pixel norm"). 0.9.1's decoder is conditioned on a timestep (scale/shift per res block, as in
PixArt) and adds StyleGAN-like spatial noise inside its res blocks; its upsamplers halve the channels and add a
pixel-shuffled copy of their input. 0.9.5's encoder downsamples space and time separately, with averaged shortcuts.

LTX-2's video VAE is 0.9.5's layout (the same blocks, widths and layer counts) without the timestep conditioning: its
decoder has no `last_time_embedder` / `last_scale_shift_table` / `timestep_scale_multiplier` / per-block time
embedders, so decoding adds no noise and takes no timestep. Its decoder pads spatially by reflection and its encoder
by zeros (the metadata's `decoder_spatial_padding_mode` / `encoder_spatial_padding_mode`; ComfyUI's and diffusers'
defaults for it). `encode_latent` / `decode_latent` work on the normalised latents ComfyUI's VAE nodes hand around.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors
import torch
import torch.nn.functional as F
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.ltxv_vae_layers import (
    CausalConv3d,
    DepthToSpaceUpsample,
    ResBlocks,
    ResnetBlock3D,
    SpaceToDepthDownsample,
    TimestepEmbedder,
    pixel_norm,
)
from ldm.vae import DiagonalGaussianDistribution

# What ComfyUI's VAEDecode hands a timestep-conditioned LTX decoder (its VideoVAE.decode defaults): the latent is
# mixed with 2.5% noise in the normalised latent space and decoded as if at timestep 0.05. diffusers' LTXPipeline
# defaults to decode_timestep=0.0 with decode_noise_scale = decode_timestep, and mixes in the raw latent space.
DEFAULT_DECODE_TIMESTEP = 0.05
DEFAULT_DECODE_NOISE_SCALE = 0.025
# The seed of the decoder's noise when no generator is given: the same latent always decodes to the same video.
DEFAULT_DECODE_SEED = 0
_STRIDES = {"compress_space_res": (1, 2, 2), "compress_time_res": (2, 1, 1), "compress_all_res": (2, 2, 2)}


@dataclass(frozen=True)
class Block:
    """One entry of `encoder.down_blocks` / `decoder.up_blocks`, in stored order.

    kind: "res_x" (a stack of res blocks), "res_x_y" (one res block changing the width), "compress_all" (encoder: a
    stride-2 convolution; decoder: a 2x2x2 depth-to-space upsampler), or 0.9.5's space-to-depth downsamplers
    "compress_space_res" / "compress_time_res" / "compress_all_res".
    count: res_x's layers; otherwise the channel multiplier (the decoder divides by it).
    """

    kind: str
    count: int = 1
    inject_noise: bool = False
    residual: bool = False


@dataclass(frozen=True)
class LTXVVAEConfig:
    encoder_blocks: tuple[Block, ...]
    decoder_blocks: tuple[Block, ...]
    encoder_width: int = 128  # encoder.conv_in's output channels
    decoder_width: int = 512  # decoder.conv_in's output channels
    latent_channels: int = 128
    patch_size: int = 4
    timestep_conditioning: bool = False
    # Spatial padding of the convolutions: the file's metadata config may name one ("spatial_padding_mode"); the
    # original and diffusers default to zeros. ComfyUI's decoder (since its PR #8930) pads by reflection unless the
    # metadata names a mode, which changes the pixels along the frame borders.
    padding_mode: str = "zeros"
    # The decoder's, where it differs (LTX-2: "reflect"); None: `padding_mode`.
    decoder_padding_mode: str | None = None

    @property
    def version(self) -> str:
        if any(b.kind in _STRIDES for b in self.encoder_blocks):
            return "0.9.5" if self.timestep_conditioning else "2.0"
        return "0.9.1" if self.timestep_conditioning else "0.9.0"


def _layout(encoder: list[tuple[str, int]], decoder: list[tuple[str, int, bool, bool]], width: int,
            timestep_conditioning: bool) -> LTXVVAEConfig:
    dec = tuple(Block(*b) for b in decoder)
    dec_width = width * math.prod(b.count for b in dec if b.kind != "res_x")
    return LTXVVAEConfig(tuple(Block(*b) for b in encoder), dec, width, dec_width,
                         timestep_conditioning=timestep_conditioning)


def _encoder_090(layers: tuple[int, ...]) -> list[tuple[str, int]]:
    a, b, c, d, e = layers
    return [("res_x", a), ("compress_all", 1), ("res_x_y", 2), ("res_x", b), ("compress_all", 1), ("res_x_y", 2),
            ("res_x", c), ("compress_all", 1), ("res_x", d), ("res_x", e)]


def _decoder_091(layers: tuple[int, ...], noise: bool) -> list[tuple[str, int, bool, bool]]:
    mid, *ups = layers
    out: list[tuple[str, int, bool, bool]] = [("res_x", mid, False, False)]
    for n in ups:
        out += [("compress_all", 2, False, True), ("res_x", n, noise, False)]
    return out


def _preset(version: str, width: int, enc: tuple[int, ...], dec: tuple[int, ...]) -> LTXVVAEConfig:
    if version == "0.9.0":
        decoder = [(k, n, False, False) for k, n in reversed(_encoder_090(enc))]
        return _layout(_encoder_090(enc), decoder, width, False)
    if version == "0.9.1":
        return _layout(_encoder_090(enc), _decoder_091(dec, True), width, True)
    a, b, c, d, e = enc
    encoder = [("res_x", a), ("compress_space_res", 2), ("res_x", b), ("compress_time_res", 2), ("res_x", c),
               ("compress_all_res", 2), ("res_x", d), ("compress_all_res", 2), ("res_x", e)]
    if version == "2.0":
        return replace(_layout(encoder, _decoder_091(dec, False), width, False), decoder_padding_mode="reflect")
    return _layout(encoder, _decoder_091(dec, False), width, True)


LTXV_090 = _preset("0.9.0", 128, (4, 3, 3, 3, 4), ())
LTXV_091 = _preset("0.9.1", 128, (4, 3, 3, 3, 4), (8, 7, 6, 5))
LTXV_095 = _preset("0.9.5", 128, (4, 6, 6, 2, 2), (5, 5, 5, 5))
LTX2 = _preset("2.0", 128, (4, 6, 6, 2, 2), (5, 5, 5, 5))
# Same block lists (and so the same key indices) at width 8 with few layers, for tests.
TINY_LTXV_090 = _preset("0.9.0", 8, (2, 1, 1, 1, 2), ())
TINY_LTXV_091 = _preset("0.9.1", 8, (2, 1, 1, 1, 2), (2, 1, 1, 1))
TINY_LTXV_095 = _preset("0.9.5", 8, (1, 1, 1, 1, 2), (2, 1, 1, 1))
TINY_LTX2 = _preset("2.0", 8, (1, 1, 1, 1, 2), (2, 1, 1, 1))


# --- encoder, decoder, the VAE ---------------------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, c: LTXVVAEConfig):
        super().__init__()
        self.patch_size = c.patch_size
        ch, pad = c.encoder_width, c.padding_mode
        self.conv_in = CausalConv3d(3 * c.patch_size ** 2, ch, padding_mode=pad)
        blocks: list[nn.Module] = []
        for b in c.encoder_blocks:
            if b.kind == "res_x":
                blocks.append(ResBlocks(ch, b.count, True, pad))
            elif b.kind == "res_x_y":
                blocks.append(ResnetBlock3D(ch, ch * b.count, True, pad))
                ch *= b.count
            elif b.kind == "compress_all":
                blocks.append(CausalConv3d(ch, ch, stride=2, padding_mode=pad))
            else:
                blocks.append(SpaceToDepthDownsample(ch, ch * b.count, _STRIDES[b.kind], pad))
                ch *= b.count
        self.down_blocks = nn.ModuleList(blocks)
        # One log-variance channel shared by all latent channels (the original's latent_log_var="uniform").
        self.conv_out = CausalConv3d(ch, c.latent_channels + 1, padding_mode=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        p = self.patch_size
        # Patches into channels, as (channel, column offset, row offset): the original's einops order.
        x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5).reshape(b, -1, t, h // p, w // p)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.conv_out(F.silu(pixel_norm(x)))
        logvar = x[:, -1:].expand(-1, x.shape[1] - 1, -1, -1, -1)
        return torch.cat([x[:, :-1], logvar], dim=1)


class Decoder(nn.Module):
    def __init__(self, c: LTXVVAEConfig):
        super().__init__()
        self.patch_size = c.patch_size
        pad, tc = c.decoder_padding_mode or c.padding_mode, c.timestep_conditioning
        ch = c.decoder_width
        self.conv_in = CausalConv3d(c.latent_channels, ch, causal=False, padding_mode=pad)
        blocks: list[nn.Module] = []
        for b in c.decoder_blocks:
            if b.kind == "res_x":
                blocks.append(ResBlocks(ch, b.count, False, pad, b.inject_noise, tc))
            elif b.kind == "res_x_y":
                blocks.append(ResnetBlock3D(ch, ch // b.count, False, pad, b.inject_noise))
                ch //= b.count
            else:
                blocks.append(DepthToSpaceUpsample(ch, b.count, b.residual, pad))
                ch //= b.count
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_out = CausalConv3d(ch, 3 * c.patch_size ** 2, causal=False, padding_mode=pad)
        if tc:
            self.timestep_scale_multiplier = nn.Parameter(torch.tensor(1000.0))
            self.last_time_embedder = TimestepEmbedder(2 * ch)
            self.last_scale_shift_table = nn.Parameter(torch.zeros(2, ch))

    def forward(self, z: torch.Tensor, timestep: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.conv_in(z)
        t = timestep * self.timestep_scale_multiplier if timestep is not None else None
        for block in self.up_blocks:
            x = block(x, t, generator) if isinstance(block, ResBlocks) else block(x)
        x = pixel_norm(x)
        if t is not None:
            ada = self.last_time_embedder(t, x.dtype).unflatten(1, (2, -1))
            shift, scale = (ada + self.last_scale_shift_table[None, :, :, None, None, None]).unbind(1)
            x = x * (1 + scale) + shift
        x = self.conv_out(F.silu(x))
        b, _, t_, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, -1, p, p, t_, h, w).permute(0, 1, 4, 5, 3, 6, 2)
        return x.reshape(b, -1, t_, h * p, w * p)


class PerChannelStatistics(nn.Module):
    """The latent statistics the model family normalises with: z_model = (z - mean-of-means) / std-of-means."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean-of-means", torch.zeros(channels))
        self.register_buffer("std-of-means", torch.ones(channels))


class LTXVVAE(nn.Module):
    """Video pixels in -1..1 <-> raw LTX-Video latents (see the module docstring).

    `encode`/`decode` work on raw latents; the model family normalises them per channel with `latent_mean` /
    `latent_std` (ComfyUI does it inside its VAE; the numbers are the same).
    """

    scaling_factor = 1.0
    spatial_compression = 32
    temporal_compression = 8

    def __init__(self, config: LTXVVAEConfig):
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.per_channel_statistics = PerChannelStatistics(config.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    @property
    def latent_mean(self) -> torch.Tensor:
        return self.per_channel_statistics.get_buffer("mean-of-means")

    @property
    def latent_std(self) -> torch.Tensor:
        return self.per_channel_statistics.get_buffer("std-of-means")

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussianDistribution:
        """[B, 3, T, H, W] in -1..1, T = 1 + 8k (ComfyUI refuses other counts too; diffusers would drop the
        frames past the last full group of 8), H and W multiples of 32 -> posterior over [B, 128, 1 + k, H/32,
        W/32]."""
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"LTX-Video VAE: expected pixels [B, 3, T, H, W], got {list(pixels.shape)}")
        t, h, w = pixels.shape[2:]
        if (t - 1) % self.temporal_compression:
            raise ValueError(f"LTX-Video VAE: {t} frames; a video must have 1 + 8k frames (1, 9, 17, ...)")
        if h % self.spatial_compression or w % self.spatial_compression:
            raise ValueError(f"LTX-Video VAE: {w}x{h} pixels; width and height must be multiples of 32 "
                             "(crop or resize first)")
        return DiagonalGaussianDistribution(self.encoder(pixels.to(self.dtype)))

    def decode(self, z: torch.Tensor, timestep: float | None = None, noise_scale: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw latents [B, 128, T', h, w] -> pixels [B, 3, 1 + 8(T'-1), 32h, 32w], nominally -1..1 (not clamped).

        A timestep-conditioned decoder (0.9.1, 0.9.5) first mixes `noise_scale` of Gaussian noise into the
        normalised latent, as the original pipeline and ComfyUI do (z_n = (z - mean) / std; (1 - s) z_n + s n),
        then decodes at `timestep`; None means ComfyUI's VAEDecode defaults (0.05 and 0.025). Its res blocks add
        spatial noise as well. All noise comes from `generator`, in a fixed order; None means a CPU generator
        seeded with DEFAULT_DECODE_SEED, so that decoding (the VAE decode node's result) is reproducible, the same
        on every device, and leaves torch's global generator alone. 0.9.0's and LTX-2's decoders ignore the three.
        """
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"LTX-Video VAE: expected latents [B, {self.latent_channels}, T, h, w], "
                             f"got {list(z.shape)}")
        z = z.to(self.dtype)
        if not self.config.timestep_conditioning:
            return self.decoder(z)
        t = DEFAULT_DECODE_TIMESTEP if timestep is None else timestep
        s = DEFAULT_DECODE_NOISE_SCALE if noise_scale is None else noise_scale
        generator = generator or torch.Generator().manual_seed(DEFAULT_DECODE_SEED)
        if s:
            noise = torch.randn(z.shape, generator=generator, device=generator.device, dtype=z.dtype).to(z.device)
            mean, std = (v.to(z).view(1, -1, 1, 1, 1) for v in (self.latent_mean, self.latent_std))
            # (1 - s) z_n + s n in the normalised space, written out in the raw one.
            z = (1 - s) * z + s * (mean + std * noise)
        return self.decoder(z, torch.full((z.shape[0],), float(t), device=z.device, dtype=z.dtype), generator)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the model family's: (z - mean-of-means) / std-of-means per channel."""
        mean, std = (v.to(z).view(1, -1, 1, 1, 1) for v in (self.latent_mean, self.latent_std))
        return (z - mean) / std

    def un_normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = (v.to(z).view(1, -1, 1, 1, 1) for v in (self.latent_mean, self.latent_std))
        return z * std + mean

    def encode_latent(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, 1 + 8k, H, W] in -1..1 -> normalised latents [B, 128, 1 + k, H/32, W/32]: the posterior's
        mean, normalised, as ComfyUI's VAE encode returns them."""
        return self.normalize(self.encode(pixels).mode())

    def decode_latent(self, latent: torch.Tensor, timestep: float | None = None, noise_scale: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents (ComfyUI's LATENT) -> pixels [B, 3, 1 + 8(T'-1), 32h, 32w]; see `decode`."""
        return self.decode(self.un_normalize(latent.to(self.dtype)), timestep, noise_scale, generator)


# --- files -----------------------------------------------------------------------------------------------------

_MARKERS = ("encoder.conv_in.conv.weight", "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight")
# Statistics the files also carry; the model family needs only the mean and std of the means.
_UNUSED_STATISTICS = tuple(f"per_channel_statistics.{n}"
                           for n in ("channel", "mean-of-stds", "mean-of-stds_over_std-of-means"))
TINY_LTXV_VAES = {"0.9.0": TINY_LTXV_090, "0.9.1": TINY_LTXV_091, "0.9.5": TINY_LTXV_095, "2.0": TINY_LTX2}


def is_ltxv_vae(keys: Collection[str], prefix: str = "vae.") -> bool:
    return all(prefix + k in keys for k in _MARKERS)


def _indices(keys: Collection[str], part: str) -> list[int]:
    pattern = re.compile(re.escape(part) + r"\.(\d+)\.")
    return sorted({int(m[1]) for k in keys if (m := pattern.match(k))})


def _block_width(sd: StateDict, p: str) -> int:
    for suffix in ("res_blocks.0.conv1.conv.weight", "conv1.conv.weight", "conv.conv.weight", "conv.weight"):
        if p + suffix in sd:
            return sd[p + suffix].shape[1]
    raise ValueError(f"{p}* is no LTX-Video VAE block")


def _blocks(sd: StateDict, part: str, final_width: int, decoder: bool) -> tuple[Block, ...]:
    """The block list of `part`, told apart by their weights; widths are read from the next block's input."""
    indices = _indices(sd, part)
    if indices != list(range(len(indices))):
        raise ValueError(f"{part} is not numbered 0..n")
    widths = [_block_width(sd, f"{part}.{i}.") for i in indices] + [final_width]
    blocks = []
    for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
        p = f"{part}.{i}."
        if p + "res_blocks.0.conv1.conv.weight" in sd:
            layers = len(_indices(sd, p + "res_blocks"))
            blocks.append(Block("res_x", layers, p + "res_blocks.0.per_channel_scale1" in sd))
        elif p + "conv1.conv.weight" in sd:
            blocks.append(Block("res_x_y", cin // cout if decoder else cout // cin, p + "per_channel_scale1" in sd))
        elif decoder and p + "conv.conv.weight" in sd:
            # The files do not say whether an upsampler adds its input back: those that narrow the channels do
            # (0.9.1, 0.9.5), those that keep them do not (0.9.0).
            blocks.append(Block("compress_all", cin // cout, residual=cin > cout))
        elif not decoder and p + "conv.weight" in sd:
            blocks.append(Block("compress_all"))
        else:
            stride = cout // sd[p + "conv.conv.weight"].shape[0]
            kind = {2: "compress_time_res", 4: "compress_space_res", 8: "compress_all_res"}.get(stride)
            if kind is None:
                raise ValueError(f"{p}conv folds {stride} positions into channels; expected 2, 4 or 8")
            blocks.append(Block(kind, cout // cin))
    return tuple(blocks)


def ltxv_vae_config_from_state_dict(sd: StateDict, prefix: str = "vae.") -> LTXVVAEConfig:
    """The layout of an LTX-Video VAE from its weight shapes (keys under `prefix`); ValueError if it is not one
    this module can run (32x / 8x compression, one shared log-variance channel)."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not is_ltxv_vae(sd, ""):
        raise ValueError("no LTX-Video VAE weights (encoder.conv_in.conv / decoder.up_blocks.0.res_blocks)")
    conv_in, dec_in = sd["encoder.conv_in.conv.weight"], sd["decoder.conv_in.conv.weight"]
    latent = dec_in.shape[1]
    if sd["encoder.conv_out.conv.weight"].shape[0] != latent + 1:
        raise ValueError("the encoder does not output one shared log-variance channel (latent_log_var 'uniform')")
    enc = _blocks(sd, "encoder.down_blocks", sd["encoder.conv_out.conv.weight"].shape[1], decoder=False)
    dec = _blocks(sd, "decoder.up_blocks", sd["decoder.conv_out.conv.weight"].shape[1], decoder=True)
    patch = math.isqrt(conv_in.shape[1] // 3)
    space = patch * 2 ** sum(b.kind in ("compress_all", "compress_all_res", "compress_space_res") for b in enc)
    time = 2 ** sum(b.kind in ("compress_all", "compress_all_res", "compress_time_res") for b in enc)
    ups = sum(b.kind == "compress_all" for b in dec)
    if (space, time, ups) != (32, 8, 3):
        raise ValueError(f"compression {space}x{space}x{time} with {ups} upsamplers; LTX-Video's is 32x32x8")
    config = LTXVVAEConfig(enc, dec, conv_in.shape[0], dec_in.shape[0], latent, patch,
                           "decoder.last_scale_shift_table" in sd)
    return replace(config, decoder_padding_mode="reflect") if config.version == "2.0" else config


def _padding_modes(metadata: dict[str, str]) -> tuple[str | None, str | None]:
    """The encoder's and the decoder's spatial padding named by the VAE config that Lightricks' files carry in their
    metadata: `spatial_padding_mode` for both (LTX-Video 0.9.x), `encoder_spatial_padding_mode` /
    `decoder_spatial_padding_mode` each (LTX-2); None where it names none."""
    try:
        vae = json.loads(metadata.get("config", "{}")).get("vae", {})
    except (json.JSONDecodeError, AttributeError):
        return None, None
    if not isinstance(vae, dict):
        return None, None
    modes = ("zeros", "reflect", "replicate", "circular")
    both = vae.get("spatial_padding_mode")
    enc, dec = (vae.get(f"{part}_spatial_padding_mode", both) for part in ("encoder", "decoder"))
    return (enc if enc in modes else None), (dec if dec in modes else None)


def _find_prefix(keys: Collection[str], prefix: str | None, name: str) -> str:
    prefixes = [prefix] if prefix is not None else ["vae.", ""]
    found = next((p for p in prefixes if is_ltxv_vae(keys, p)), None)
    if found is None:
        raise CheckpointError(f"{name}: no LTX-Video VAE in it (no {prefixes[0]}encoder.conv_in.conv / "
                              f"{prefixes[0]}decoder.up_blocks.0.res_blocks weights in Lightricks' layout)")
    return found


def _read(path: Path, prefix: str | None) -> tuple[StateDict, str, dict[str, str]]:
    """The VAE's tensors only (an all-in-one file's transformer stays on disk), the prefix found, the metadata."""
    shapes = ckpt.read_shapes(path)
    if shapes is None:
        sd = ckpt.load_state_dict(path)
        return sd, _find_prefix(sd, prefix, path.name), {}
    found = _find_prefix(shapes, prefix, path.name)
    with safetensors.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in shapes if k.startswith(found)}, found, ckpt.read_metadata(path)


def load_ltxv_vae(path_or_state_dict: str | Path | StateDict, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, prefix: str | None = None) -> LTXVVAE:
    """An LTX-Video VAE from an all-in-one checkpoint (keys under `vae.`), a VAE-only file (no prefix) or tensors,
    on `device` in `dtype`, frozen. `prefix` None tries "vae." then "". CheckpointError names the problem for a
    file without one, with missing weights, or with weights the detected layout has no place for."""
    if isinstance(path_or_state_dict, dict):
        path, sd, metadata = Path("state dict"), path_or_state_dict, {}
        found = _find_prefix(sd, prefix, "state dict")
    else:
        path = Path(path_or_state_dict)
        sd, found, metadata = _read(path, prefix)
    try:
        config = ltxv_vae_config_from_state_dict(sd, found)
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    enc, dec = _padding_modes(metadata)
    config = replace(config, padding_mode=enc or config.padding_mode,
                     decoder_padding_mode=dec or config.decoder_padding_mode)
    weights = {k[len(found):]: v for k, v in sd.items() if k.startswith(found)}
    vae = ckpt._materialize(lambda: LTXVVAE(config), weights, "LTX-Video VAE", path, device, dtype)
    unused = sorted(set(weights) - set(vae.state_dict()) - set(_UNUSED_STATISTICS))
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise CheckpointError(f"{path.name}: {len(unused)} weights have no place in an LTX-Video VAE: {shown}")
    return vae


def peek_ltxv_vae(path: str | Path) -> str | None:
    """The LTX-Video VAE version ("0.9.0", "0.9.1", "0.9.5", or "2.0" for LTX-2's) in a .safetensors file, from its
    header alone; None when it holds none (or is not a safetensors file)."""
    shapes = ckpt.read_shapes(path)
    for prefix in ("vae.", ""):
        if shapes is not None and is_ltxv_vae(shapes, prefix):
            try:
                return ltxv_vae_config_from_state_dict(shapes, prefix).version
            except ValueError:
                return None
    return None


_DIFFUSERS_STATISTICS = {"latents_mean": "per_channel_statistics.mean-of-means",
                         "latents_std": "per_channel_statistics.std-of-means"}
_DIFFUSERS_BLOCK = re.compile(
    r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets|downsamplers\.0|upsamplers\.0)\.(.*)")


def convert_diffusers_ltx2_vae(sd: StateDict) -> StateDict:
    """diffusers' AutoencoderKLLTX2Video keys -> Lightricks' (the inverse of diffusers' convert_ltx2_to_diffusers):
    the encoder's down_blocks.i.resnets / .downsamplers.0 become blocks 2i / 2i+1 and its mid_block the last; the
    decoder's mid_block is up_blocks.0, its up_blocks.i.upsamplers.0 / .resnets blocks 2i+1 / 2i+2; latents_mean /
    latents_std the per-channel statistics."""
    mids = {"encoder.mid_block.": f"encoder.down_blocks.{2 * len(_indices(sd, 'encoder.down_blocks'))}.",
            "decoder.mid_block.": "decoder.up_blocks.0."}
    out: StateDict = {}
    for key, value in sd.items():
        if key in _DIFFUSERS_STATISTICS:
            key = _DIFFUSERS_STATISTICS[key]
        elif m := _DIFFUSERS_BLOCK.match(key):
            part, i, kind, rest = m[1], int(m[2]), m[3], m[4]
            index = 2 * i + (kind != "resnets") if part == "encoder.down_blocks" else 2 * i + 1 + (kind == "resnets")
            key = f"{part}.{index}." + ("res_blocks." if kind == "resnets" else "") + rest
        elif (mid := key[:len("encoder.mid_block.")]) in mids:  # the two prefixes are equally long
            key = mids[mid] + key[len(mid):]
        out[key.replace(".resnets.", ".res_blocks.")] = value
    return out


def random_ltxv_vae(config: LTXVVAEConfig, seed: int = 0) -> LTXVVAE:
    """An LTXVVAE with seeded random weights that keep activations in range, noise scales and timestep tables
    non-zero so that every path is exercised, and plausible latent statistics."""
    generator = torch.Generator().manual_seed(seed)
    model = LTXVVAE(config)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("timestep_scale_multiplier"):
                continue
            if name.endswith("std-of-means"):
                tensor.copy_(0.5 + 0.5 * noise.abs())
            elif name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("bias", "mean-of-means", "scale_shift_table", "per_channel_scale1",
                                "per_channel_scale2")):
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(noise * tensor[0].numel() ** -0.5)
    return model.eval().requires_grad_(False)


def write_tiny_ltxv_vae(path: str | Path, version: str = "0.9.0", prefix: str = "vae.", seed: int = 0) -> Path:
    """A tiny random LTX-Video VAE of `version`'s layout in the original keys under `prefix` (the all-in-one files'
    "vae."), the unused statistics included. An existing file keeps its other tensors and its metadata, so a tiny
    transformer and this VAE can be written into one all-in-one file in either order."""
    if version not in TINY_LTXV_VAES:
        raise ValueError(f"unknown LTX-Video VAE version {version!r}; one of {', '.join(TINY_LTXV_VAES)}")
    model = random_ltxv_vae(TINY_LTXV_VAES[version], seed)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    channels = model.latent_channels
    sd[f"{prefix}per_channel_statistics.channel"] = torch.arange(channels, dtype=torch.float32)
    for name in ("mean-of-stds", "mean-of-stds_over_std-of-means"):
        sd[f"{prefix}per_channel_statistics.{name}"] = torch.ones(channels)
    path = Path(path)
    existing, metadata = ({}, {"format": "pt"}) if not path.is_file() else \
        ({k: v.clone() for k, v in ckpt.load_state_dict(path).items()},  # copies: the file is rewritten below
         ckpt.read_metadata(path) or {"format": "pt"})
    ckpt.write_safetensors({**existing, **sd}, path, metadata)
    return path
