"""LTX-Video 0.9.x model files: the transformer (bare, or in an all-in-one file), its family, its sampling rules, and
tiny random files.

Files: ComfyUI users' all-in-one `ltx-video-2b-v0.9*.safetensors` hold the transformer under
`model.diffusion_model.` and the causal video VAE under `vae.`; transformer-only files hold Lightricks' keys bare.
fp8 weights are cast to the model dtype as they load (those of "scaled fp8" files multiplied by their scales). The
head count, which no weight's shape tells, is read from Lightricks' `config` metadata where a file has it, else 32
(every 0.9.x model's).

Latents: LTX's VAE latents are normalised per channel, (z - mean) / std, by the VAE's `per_channel_statistics`
buffers (`vae.per_channel_statistics.mean-of-means` and `std-of-means`, diffusers' `latents_mean` /
`latents_std`), which the loader reads from the VAE part of an all-in-one file into the family's `latent_mean` /
`latent_std`. A transformer-only file has none: its family's statistics are None (the LATENT is taken as it is, as
ComfyUI's LTXV latent format, whose VAE normalises its own latents, takes it).

Sampling (ComfyUI's rules, which Lightricks' pipeline and diffusers' share):

- The default levels are Flux's exponential time shift, sigma(t) = e^s / (e^s + 1 / t - 1), with s = 2.37
  (ComfyUI's LTXV sampling settings; `LTXVFamily.shift`).
- ModelSamplingLTXV sets s from the latent's token count n = T * H * W (4096 without a latent), on the line through
  (1024, base_shift) and (4096, max_shift): s = base_shift + (n - 1024) * (max_shift - base_shift) / 3072
  (`ltxv_shift`; defaults 2.05 and 0.95).
- LTXVScheduler: sigma_i = shifted(1 - i / steps) for i = 0..steps (the last 0) with s as above; with `stretch`,
  the non-zero ones become 1 - (1 - sigma_i) (1 - terminal) / (1 - sigma_last), so that the last non-zero level is
  `terminal` (`ltxv_scheduler_sigmas`; defaults steps 20, stretch on, terminal 0.1). diffusers' LTX scheduler
  config (exponential dynamic shifting, mu from the same line, shift_terminal 0.1) gives the same levels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import UNET_PREFIX, CheckpointError, StateDict, write_safetensors
from ldm.flow_family import FlowFamily
from ldm.flux_presets import TINY_T5, distinct_random_
from ldm.ltxv import LTXV_HEADS, LTXVConfig, LTXVModel, is_ltxv, ltxv_config_from_state_dict
from ldm.sampling.flow import time_shift
from ldm.t5 import descaled_fp8, scaling_keys
from ldm.vae import VAEConfig

VAE_PART = "vae."
LATENT_MEAN_KEY = "vae.per_channel_statistics.mean-of-means"
LATENT_STD_KEY = "vae.per_channel_statistics.std-of-means"
# The latent space's key for previews (ldm.latent_preview.latent_format): 128 channels, unscaled.
LTXV_LATENT = VAEConfig(z_channels=128, scaling_factor=1.0, use_quant_conv=False)
DEFAULT_SHIFT = 2.37
MAX_SHIFT, BASE_SHIFT = 2.05, 0.95
BASE_TOKENS, MAX_TOKENS = 1024, 4096
DEFAULT_TOKENS = 4096  # ModelSamplingLTXV and LTXVScheduler without a latent
# Its caption width is the tiny T5's (ldm.flux_presets), so that the tiny T5-XXL file serves Flux and LTX-Video alike.
TINY_LTXV = LTXVConfig(in_channels=128, out_channels=128, inner_dim=64, depth=2, caption_channels=TINY_T5.d_model,
                       cross_attention_dim=64, ff_dim=256)


@dataclass(frozen=True)
class LTXVFamily(FlowFamily):
    """An LTX-Video model's family: its transformer's config, its latent statistics (None: the file had no VAE
    part; see the module docstring) and its default time shift."""

    unet_config: LTXVConfig
    vae_config: VAEConfig = LTXV_LATENT
    name: str = "ltxv"
    latent_shift: float = 0.0
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None
    # A noise mask reaches the model as per-pixel noise levels, its kept part clean (`ldm.sampling.masked_timesteps`)
    token_timesteps: bool = True

    @property
    def latent_channels(self) -> int:
        return self.unet_config.latent_channels

    @property
    def shift(self) -> float:
        return DEFAULT_SHIFT


@dataclass
class LoadedLTXV:
    family: LTXVFamily
    unet: LTXVModel
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def ltxv_shift(tokens: int, max_shift: float = MAX_SHIFT, base_shift: float = BASE_SHIFT) -> float:
    """ModelSamplingLTXV's time shift for a latent of `tokens` = T * H * W latent pixels (module docstring)."""
    slope = (max_shift - base_shift) / (MAX_TOKENS - BASE_TOKENS)
    return base_shift + (tokens - BASE_TOKENS) * slope


def ltxv_scheduler_sigmas(steps: int, max_shift: float = MAX_SHIFT, base_shift: float = BASE_SHIFT,
                          stretch: bool = True, terminal: float = 0.1, tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    """LTXVScheduler's `steps` + 1 noise levels, 1 down to 0 (float32; module docstring)."""
    if steps < 1:
        raise ValueError(f"LTXVScheduler needs at least one step; got {steps}")
    if not 0 <= terminal < 1:
        raise ValueError(f"the terminal level must be in [0, 1); got {terminal}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = time_shift(ltxv_shift(tokens, max_shift, base_shift), t)
    if stretch and sigmas[-2] < 1:  # one step has no level between 1 and 0 to stretch
        moving = sigmas[:-1]
        sigmas[:-1] = 1 - (1 - moving) * (1 - terminal) / (1 - moving[-1])
    return sigmas.float()


def ltxv_weights(sd: StateDict) -> StateDict:
    """The transformer's tensors of an LTX-Video file, without `model.diffusion_model.` if the file has it."""
    if is_ltxv(sd, UNET_PREFIX):
        return {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    return {k: v for k, v in sd.items() if not k.startswith(VAE_PART)}


def latent_statistics(sd: StateDict) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) per latent channel from an all-in-one file's VAE part; None when it has none."""
    if LATENT_MEAN_KEY not in sd or LATENT_STD_KEY not in sd:
        return None
    return tuple(sd[LATENT_MEAN_KEY].float().tolist()), tuple(sd[LATENT_STD_KEY].float().tolist())


def heads_from_metadata(metadata: dict[str, str]) -> int:
    """The head count a file's Lightricks metadata (`config`: JSON with a `transformer` section) gives; else 32."""
    try:
        return int(json.loads(metadata["config"])["transformer"]["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return LTXV_HEADS


def ltxv_family(weights: StateDict, statistics: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                name: str = "", metadata: dict[str, str] | None = None) -> LTXVFamily:
    """The family of Lightricks-layout transformer weights (no prefix), with the VAE's latent statistics if known
    and the head count of the file's metadata if it has one."""
    try:
        config = ltxv_config_from_state_dict(weights, heads_from_metadata(metadata or {}))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}" if name else str(e)) from None
    mean, std = statistics or (None, None)
    if mean is not None and not len(mean) == len(std) == config.latent_channels:
        raise CheckpointError(f"{name}: the VAE's latent statistics have {len(mean)} channels, the transformer "
                              f"{config.latent_channels}")
    return LTXVFamily(config, latent_mean=mean, latent_std=std)


def is_ltxv_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds an LTX-Video transformer (bare or all-in-one), from its header."""
    shapes = ckpt.read_shapes(path)
    return shapes is not None and (is_ltxv(shapes) or is_ltxv(shapes, UNET_PREFIX))


def peek_ltxv(path: str | Path) -> LTXVFamily | None:
    """The family of an LTX-Video file from its header (and its two small latent-statistics tensors, if it has a
    VAE part); None for other files and formats."""
    shapes = ckpt.read_shapes(path)
    if shapes is None or not (is_ltxv(shapes) or is_ltxv(shapes, UNET_PREFIX)):
        return None
    statistics = None
    if LATENT_MEAN_KEY in shapes and LATENT_STD_KEY in shapes:
        with safetensors.safe_open(path, framework="pt") as f:
            statistics = latent_statistics({k: f.get_tensor(k) for k in (LATENT_MEAN_KEY, LATENT_STD_KEY)})
    return ltxv_family(ltxv_weights(shapes), statistics, Path(path).name, ckpt.read_metadata(path))


def load_ltxv_unet(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   sd: StateDict | None = None) -> LoadedLTXV:
    """Load an LTX-Video transformer (a file of its own, or the one in an all-in-one file, `sd` if already read) on
    `device` in `dtype`; keys of neither the transformer nor the file's VAE part are listed as unused."""
    path = Path(path)
    sd = ckpt.load_state_dict(path) if sd is None else sd
    if not (is_ltxv(sd) or is_ltxv(sd, UNET_PREFIX)):
        raise CheckpointError(f"{path.name}: not an LTX-Video 0.9.x transformer (no patchify_proj / adaln_single "
                              "weights in Lightricks' layout)")
    weights = dict(descaled_fp8(ltxv_weights(sd)))
    metadata = ckpt.read_metadata(path)
    family = ltxv_family(weights, latent_statistics(sd), path.name, metadata)
    model = ckpt._materialize(lambda: LTXVModel(family.unet_config), weights, "LTX-Video transformer", path, device,
                              dtype)
    expected = set(model.state_dict())
    prefix = UNET_PREFIX if is_ltxv(sd, UNET_PREFIX) else ""
    skipped = scaling_keys(sd)
    unused = sorted(k for k in sd if k not in skipped and not k.startswith(VAE_PART)
                    and not (k.startswith(prefix) and k[len(prefix):] in expected))
    return LoadedLTXV(family, model, unused, path, metadata)


def random_ltxv(config: LTXVConfig = TINY_LTXV, seed: int = 0) -> LTXVModel:
    """An LTX-Video transformer with seeded random weights, each distinct (q / k norm weights near 1)."""
    return distinct_random_(LTXVModel(config).eval(), seed, norm_scales=("_norm.weight",))


def write_tiny_ltxv(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                    config: LTXVConfig = TINY_LTXV, vae: nn.Module | None = None) -> Path:
    """Write a tiny random LTX-Video transformer in the all-in-one layout (under `model.diffusion_model.`) to
    `path`, with `vae` (an `ldm.ltxv_vae.LTXVVAE`, its latent statistics included) under `vae.` if given, else
    transformer only; returns the path. The videos it makes are noise."""
    path = Path(path)
    tensors = {UNET_PREFIX + k: v for k, v in random_ltxv(config, seed).state_dict().items()}
    if vae is not None:
        tensors |= {VAE_PART + k: v for k, v in vae.state_dict().items()}
    write_safetensors(tensors, path, {"loom.seed": str(seed)}, dtype)
    return path


def load_ltxv_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> ckpt.LoadedCheckpoint:
    """An all-in-one LTX-Video file (transformer under `model.diffusion_model.`, VAE under `vae.`) as a
    LoadedCheckpoint: the transformer, its family with the VAE's latent statistics, the VAE, and no text encoder
    (the files hold none: T5-XXL comes from its own file)."""
    from ldm.ltxv_vae import load_ltxv_vae

    path = Path(path)
    sd = ckpt.load_state_dict(path)
    if is_ltxv(sd):
        raise CheckpointError(f"{path.name}: an LTX-Video transformer alone, not an all-in-one checkpoint; load it "
                              "with UNETLoader (Load Diffusion Model) and its VAE with VAELoader")
    if not is_ltxv(sd, UNET_PREFIX):
        raise CheckpointError(f"{path.name}: not an LTX-Video checkpoint (no model.diffusion_model.patchify_proj / "
                              "adaln_single weights)")
    loaded = load_ltxv_unet(path, device, dtype, sd=sd)
    vae = load_ltxv_vae(path, device, dtype, prefix=VAE_PART)  # refuses a file without its VAE part, by name
    return ckpt.LoadedCheckpoint(loaded.family, loaded.unet, vae, None, loaded.unused_keys, path, loaded.metadata)
