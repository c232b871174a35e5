"""FLUX.2 diffusion-model files (Comfy-Org's single files: flux2_dev_fp8mixed, flux-2-klein-4b, flux-2-klein-9b-fp8
and the like, and BFL's own: BFL's keys, bare or under `model.diffusion_model.`; bf16, fp16, fp8, ComfyUI's scaled
fp8 and mixed-precision fp8), their family, and tiny random files.

The family carries what the sampler needs beyond the weights. FLUX.2's latent is the FLUX.2 VAE's 32 channels
packed 2x2 into 128, which that VAE (ldm.flux2_vae) normalises itself: the transformer takes it as it is (ComfyUI's
Flux2 latent format: shift 0, scale 1). Its time shift, where no node sets one, is ComfyUI's for the family:
supported_models.Flux2's sampling_settings shift 2.02, on Flux's exponential shift (ModelSamplingFlux, multiplier
1); ComfyUI's FLUX.2 workflows sample with the Flux2Scheduler's resolution-fitted levels instead
(ldm.sampling.flow.flux2_sigmas). Whether the model is dev or klein is told by its guidance embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ldm.checkpoint import StateDict, write_safetensors
from ldm.flow_family import FlowFamily
from ldm.flux2 import Flux2, Flux2Config, flux2_config_from_state_dict, is_flux2
from ldm.flux_presets import distinct_random_
from ldm.single_file_family import SingleFileFamily
from ldm.vae import VAEConfig

FLUX2_SHIFT = 2.02  # ComfyUI's supported_models.Flux2 sampling_settings["shift"] (exponential, ModelSamplingFlux)
# Only the latent format's key (width 128, scale 1: `ldm.latent_preview.latent_format`) is read from this: the
# FLUX.2 VAE itself (32 channels, patched 2x2 and batch-normalised into 128) is ldm/flux2_vae.py.
FLUX2_VAE = VAEConfig(z_channels=128, scaling_factor=1.0)
# Files Loom writes carry the RoPE split, which the weights cannot tell (the released models' heads are 128 wide).
AXES_KEY = "loom.flux2_axes"
# dev's shape in miniature (a guidance embedding); the MLP 3 x hidden as in the released models.
TINY_FLUX2 = Flux2Config(context_dim=24, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2, mlp_hidden=192,
                         axes_dim=(4, 4, 4, 4), guidance_embed=True)
TINY_FLUX2_KLEIN = replace(TINY_FLUX2, guidance_embed=False)


# Each FLUX.2 model's text encoder, by the width of the states it takes (three of the encoder's layers stacked).
_ENCODER_OF = {15360: "Mistral Small 3 for FLUX.2 [dev]", 7680: "Qwen3-4B for FLUX.2 [klein] 4B",
               12288: "Qwen3-8B for FLUX.2 [klein] 9B"}


@dataclass(frozen=True)
class Flux2Family(FlowFamily):
    """A FLUX.2 model's family: its transformer's config and the FLUX.2 latent space (128 channels, taken as they
    are). Built as `Flux2Family(config)`."""

    unet_config: Flux2Config
    vae_config: VAEConfig = FLUX2_VAE
    name: str = "flux2"
    latent_shift: float = 0.0

    @property
    def latent_channels(self) -> int:
        return self.unet_config.latent_channels

    @property
    def variant(self) -> str:
        """"dev" (guidance-distilled: it takes a guidance strength) or "klein"."""
        return "dev" if self.unet_config.guidance_embed else "klein"

    @property
    def shift(self) -> float:
        return FLUX2_SHIFT

    @property
    def prompt_hint(self) -> str:
        """What a prompt of another width should be encoded with (the sampler's refusal names it)."""
        encoder = _ENCODER_OF.get(self.unet_config.context_dim, "the one it was trained with")
        return f"encode it with the model's FLUX.2 text encoder (CLIPLoader type flux2: {encoder})"


@dataclass
class LoadedFlux2:
    family: Flux2Family
    unet: Flux2
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def _family(weights: StateDict, axes: tuple[int, ...] | None, prefix: str) -> Flux2Family:
    return Flux2Family(flux2_config_from_state_dict(weights, axes, prefix))


# The family of FLUX.2 weights (the RoPE split from Loom's metadata if saved); whether a file holds them; a file's
# family from its header alone.
FILES = SingleFileFamily("a FLUX.2 transformer (no img_in / double_stream_modulation_img / single_stream_modulation "
                         "weights in Black Forest Labs' layout)", is_flux2, _family, AXES_KEY)
flux2_family, is_flux2_file, peek_flux2 = FILES.family, FILES.is_file, FILES.peek


def load_flux2_unet(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.bfloat16) -> LoadedFlux2:
    """Load a FLUX.2 diffusion-model file on `device` in `dtype` (fp8, scaled fp8 and mixed-precision weights
    cast, times their scales, as they load); keys the transformer does not use are listed as unused."""
    path = Path(path)
    family, model, unused, metadata = FILES.load(
        path, lambda family: Flux2(family.unet_config), "FLUX.2 transformer", device, dtype,
        lambda sd: "not a FLUX.2 diffusion model (no img_in / double_stream_modulation_img / single_stream_modulation "
                   "weights in Black Forest Labs' layout)")
    return LoadedFlux2(family, model, unused, path, metadata)


def random_flux2(config: Flux2Config = TINY_FLUX2, seed: int = 0) -> Flux2:
    """A FLUX.2 transformer with seeded random weights, each distinct (`ldm.flux_presets.distinct_random_`; the
    RMS norms' scales near 1)."""
    return distinct_random_(Flux2(config).eval(), seed)


def write_tiny_flux2(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, prefix: str = "",
                     config: Flux2Config = TINY_FLUX2) -> Path:
    """Write a tiny random FLUX.2 transformer (dev-like unless `config` says: TINY_FLUX2_KLEIN has no guidance
    embedding) in BFL's single-file layout (its keys under `prefix`: bare, as Comfy-Org's files are), with the
    RoPE split in Loom's metadata; returns the path. Its images are noise."""
    model = random_flux2(config, seed)
    path = Path(path)
    write_safetensors({prefix + k: v for k, v in model.state_dict().items()}, path,
                      {AXES_KEY: ",".join(map(str, config.axes_dim)), "loom.seed": str(seed)}, dtype)
    return path
