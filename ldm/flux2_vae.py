"""The FLUX.2 VAE (Black Forest Labs, 2025; ComfyUI's models/vae/flux2-vae.safetensors): an LDM KL autoencoder with
32 latent channels whose latents are packed 2x2 into 128 channels at 1/16 of the picture and normalised per channel
by the running statistics of a batch norm (`bn`), as BFL's AutoEncoder.encode and diffusers' Flux2Pipeline do.

`encode` returns those packed, normalised latents (what the FLUX.2 transformer samples: ComfyUI's Flux2 latent
format has scale 1 and no shift) and `decode` takes them back. Module attribute names are BFL's keys:
`encoder.*` (with `encoder.quant_conv`), `decoder.*` (with `decoder.post_quant_conv`), `bn.running_mean` and
`bn.running_var`. Files saved by ComfyUI (`quant_conv` / `post_quant_conv` at the top level) and by diffusers
(AutoencoderKLFlux2's `down_blocks` layout) load too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.vae import Decoder, DiagonalGaussianDistribution, Encoder, VAEConfig, tiled_apply


@dataclass(frozen=True)
class Flux2VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    # The decoder's base width where it differs from the encoder's (diffusers' decoder_block_out_channels).
    decoder_ch: int | None = None
    patch: int = 2  # latent pixels packed into one along each side
    bn_eps: float = 1e-4  # BFL's, and diffusers' batch_norm_eps

    @property
    def encoder_config(self) -> VAEConfig:
        return VAEConfig(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                         z_channels=self.z_channels, scaling_factor=1.0)

    @property
    def decoder_config(self) -> VAEConfig:
        return replace(self.encoder_config, ch=self.decoder_ch or self.ch)

    @property
    def latent_channels(self) -> int:
        return self.z_channels * self.patch ** 2

    @property
    def spatial_compression(self) -> int:
        return self.encoder_config.downscale * self.patch


FLUX2_VAE_CONFIG = Flux2VAEConfig()
# Four levels as in the real one (so 16x, and latents fit EmptyFlux2LatentImage's), 32 wide (GroupNorm's 32
# groups), one block a level: tests and examples.
TINY_FLUX2_VAE = Flux2VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
_BN_KEYS = ("bn.running_mean", "bn.running_var")
# BatchNorm2d's count of training batches: saved with the statistics, meaningless for inference.
_IGNORED = ("bn.num_batches_tracked",)


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*p*p, H/p, W/p]; packed channel c*p*p + i*p + j holds pixel (i, j) of each p x p square."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, c, h, w = z.shape
    return z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)


class LatentNorm(nn.Module):
    """The batch norm's inference half: per-channel running mean and variance of the packed latents (no affine
    part), applied and undone in float32."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.running_mean.to(like.device, torch.float32).view(1, -1, 1, 1)
        std = torch.sqrt(self.running_var.to(like.device, torch.float32).view(1, -1, 1, 1) + self.eps)
        return mean, std

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean_std(z)
        return (z.float() - mean) / std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean_std(z)
        return z.float() * std + mean


class Flux2Encoder(Encoder):
    """LDM's encoder with the 1x1 `quant_conv` after it, where BFL keep it."""

    def __init__(self, c: VAEConfig):
        super().__init__(c)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(super().forward(x))


class Flux2Decoder(Decoder):
    """LDM's decoder with the 1x1 `post_quant_conv` before it, where BFL keep it."""

    def __init__(self, c: VAEConfig):
        super().__init__(c)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(self.post_quant_conv(z))


class PackedPosterior:
    """The encoder's Gaussian posterior seen in the packed, normalised latent space: `mode()` and `sample()` give
    [B, 128, H/16, W/16] float32 latents."""

    def __init__(self, posterior: DiagonalGaussianDistribution, norm: LatentNorm, patch: int):
        self.posterior, self.norm, self.patch = posterior, norm, patch

    def _pack(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm.normalise(patchify(z.float(), self.patch))

    def mode(self) -> torch.Tensor:
        return self._pack(self.posterior.mode())

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the posterior (noise drawn at the 32-channel latent's shape, as diffusers draws it)."""
        return self._pack(self.posterior.sample(generator))


class Flux2VAE(nn.Module):
    """Pixels [B, 3, H, W] in -1..1 (sides multiples of 16) <-> FLUX.2 latents [B, 128, H/16, W/16]."""

    def __init__(self, config: Flux2VAEConfig = FLUX2_VAE_CONFIG):
        super().__init__()
        self.config = config
        self.encoder = Flux2Encoder(config.encoder_config)
        self.decoder = Flux2Decoder(config.decoder_config)
        self.bn = LatentNorm(config.latent_channels, config.bn_eps)
        self.latent_channels = config.latent_channels
        self.spatial_compression = config.spatial_compression
        # Latents come out normalised: the model family's scale is 1 (Loom's Vae.scaling_factor reads this).
        self.scaling_factor = 1.0

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.spatial_compression
        if pixels.ndim != 4 or pixels.shape[-2] % s or pixels.shape[-1] % s:
            raise ValueError(f"the FLUX.2 VAE encodes pictures [B, 3, H, W] with sides multiples of {s}, "
                             f"got {list(pixels.shape)}")

    def encode(self, pixels: torch.Tensor) -> PackedPosterior:
        self._check_pixels(pixels)
        moments = self.encoder(pixels.to(self.dtype))
        return PackedPosterior(DiagonalGaussianDistribution(moments), self.bn, self.config.patch)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected FLUX.2 latents [B, {self.latent_channels}, h, w], got {list(z.shape)}")
        unpacked = unpatchify(self.bn.denormalise(z), self.config.patch)
        return self.decoder(unpacked.to(self.dtype))

    def encode_tiled(self, pixels: torch.Tensor, tile_size: int = 512, overlap: int = 64) -> PackedPosterior:
        """`encode` in pixel tiles of `tile_size` overlapping by `overlap`, blended (the encoder's moments, before
        packing); for large images."""
        self._check_pixels(pixels)
        f, z = self.config.encoder_config.downscale, self.config.z_channels
        moments = tiled_apply(lambda p: self.encoder(p.to(self.dtype)), pixels, tile_size, overlap, 1.0 / f, 2 * z)
        return PackedPosterior(DiagonalGaussianDistribution(moments), self.bn, self.config.patch)

    def decode_tiled(self, z: torch.Tensor, tile_size: int = 64, overlap: int = 16) -> torch.Tensor:
        """`decode` in latent tiles of `tile_size` overlapping by `overlap` (FLUX.2 latent pixels), blended."""
        return tiled_apply(self.decode, z, tile_size, overlap, float(self.spatial_compression), 3)


# --- files -----------------------------------------------------------------------------------------------------

def is_flux2_vae(shapes: StateDict) -> bool:
    """Whether a state dict (or its meta tensors, `ckpt.read_shapes`) is a FLUX.2 VAE's: an LDM or diffusers KL
    autoencoder with batch-norm statistics over its latent packed 2x2 (Flux.1's ae and SD VAEs have no `bn`)."""
    if not all(k in shapes for k in (*_BN_KEYS, "encoder.conv_in.weight", "decoder.conv_in.weight")):
        return False
    z = shapes["decoder.conv_in.weight"].shape[1]
    return shapes["bn.running_mean"].numel() == 4 * z == shapes["bn.running_var"].numel()


def peek_flux2_vae(path: str | Path) -> bool:
    """Whether a .safetensors file is a FLUX.2 VAE, from its header alone."""
    shapes = ckpt.shapes_or_none(path)
    return shapes is not None and is_flux2_vae(shapes)


def _indices(keys: Collection[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := regex.match(k))})


def _bfl_names(sd: StateDict) -> dict[str, str]:
    """Each key of a FLUX.2 VAE file -> its name in BFL's layout (our attribute names)."""
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:  # diffusers' AutoencoderKLFlux2
        levels = len(_indices(sd, r"decoder\.up_blocks\.(\d+)\."))
        names = {k: ckpt._diffusers_vae_key_to_ldm(k, levels) for k in sd}
    else:
        names = {k: k for k in sd}
    # ComfyUI (and diffusers) keep the 1x1 convolutions around the latent at the top level.
    flat = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
    for key, name in names.items():
        for old, new in flat.items():
            if name.startswith(old):
                names[key] = new + name[len(old):]
    return names


def flux2_vae_config_from_state_dict(sd: StateDict) -> Flux2VAEConfig:
    """The config of a FLUX.2 VAE from its weights' shapes (BFL's key names); ValueError where they do not fit."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        widths = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]
                  for i in _indices(sd, r"encoder\.down\.(\d+)\.")]
        decoder_width, z = sd["decoder.conv_in.weight"].shape[:2]
        packed = sd["bn.running_mean"].numel()
    except KeyError as e:
        raise ValueError(f"no encoder/decoder weight {e} in the LDM layout") from None
    if not widths or any(w % ch or w < ch for w in widths) or decoder_width % (widths[-1] // ch):
        raise ValueError(f"its levels' widths {widths} do not fit the encoder's input width {ch}")
    ch_mult = tuple(w // ch for w in widths)
    decoder_ch = decoder_width // ch_mult[-1]
    patch = math.isqrt(packed // z)
    if patch * patch * z != packed:
        raise ValueError(f"its batch norm has {packed} channels, not {z} latent channels times a square patch")
    blocks = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    return Flux2VAEConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=blocks, z_channels=z,
                          decoder_ch=None if decoder_ch == ch else decoder_ch, patch=patch)


def load_flux2_vae(path_or_state_dict: str | Path | StateDict, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Flux2VAE:
    """A FLUX.2 VAE from its file (or its tensors), on `device` in `dtype` (its batch-norm statistics in float32),
    frozen; CheckpointError naming the file for one that is not a FLUX.2 VAE, lacks weights, or holds weights the
    VAE has no place for."""
    if isinstance(path_or_state_dict, dict):
        sd, path = path_or_state_dict, Path("state dict")
    else:
        path = Path(path_or_state_dict)
        sd = ckpt.load_state_dict(path)
    if not is_flux2_vae(sd):
        raise CheckpointError(f"{path.name}: not a FLUX.2 VAE (no encoder/decoder weights with batch-norm statistics "
                              "bn.running_mean / bn.running_var over a 2x2-packed latent)")
    names = _bfl_names(sd)
    weights = ckpt._vae_attention_as_conv({names[k]: v for k, v in sd.items() if k not in _IGNORED})
    try:
        config = flux2_vae_config_from_state_dict(weights)
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    vae = ckpt._materialize(lambda: Flux2VAE(config), weights, "FLUX.2 VAE", path, device, dtype)
    expected = set(vae.state_dict())
    unused = sorted(k for k in sd if k not in _IGNORED and names[k] not in expected)
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise CheckpointError(f"{path.name}: {len(unused)} weights have no place in a FLUX.2 VAE: {shown}")
    for key in _BN_KEYS:  # the statistics stay exact whatever the weights' dtype
        setattr(vae.bn, key.split(".")[1], weights[key].to(device, torch.float32))
    return vae


def random_flux2_vae(config: Flux2VAEConfig = TINY_FLUX2_VAE, seed: int = 0) -> Flux2VAE:
    """A Flux2VAE with seeded random weights that keep activations in range (norm gains near 1, small biases) and
    batch-norm statistics measured on its own encodings of seeded noise pictures: normalised latents come out near
    unit scale, as a trained VAE's do, and the per-channel means and variances are not a fresh batch norm's 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    model = Flux2VAE(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif param.ndim == 1:  # GroupNorm gains, the only 1-D weights
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise * param[0].numel() ** -0.5)
        side = 4 * config.spatial_compression
        pictures = torch.rand(4, 3, side, side, generator=generator) * 2 - 1
        packed = patchify(model.encoder(pictures).chunk(2, dim=1)[0], config.patch)
        model.bn.running_mean.copy_(packed.mean(dim=(0, 2, 3)))
        model.bn.running_var.copy_(packed.var(dim=(0, 2, 3)))
    return model.eval().requires_grad_(False)


def write_tiny_flux2_vae(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny FLUX.2 VAE file (TINY_FLUX2_VAE: 32 latent channels packed into 128, 16x) with random weights in BFL's
    key layout, as ComfyUI users' flux2-vae.safetensors has them."""
    ckpt.write_safetensors(random_flux2_vae(TINY_FLUX2_VAE, seed).state_dict(), path, {}, dtype)
    return Path(path)
