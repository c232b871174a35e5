"""Flux.1 model files: the diffusion model in BFL's layout (alone, or in an all-in-one checkpoint), and its family.

A diffusion-model file (flux1-dev.safetensors, flux1-schnell.safetensors, their fp8 copies) holds BFL's keys, bare
or under `model.diffusion_model.`; ComfyUI's all-in-one checkpoints add the VAE under `first_stage_model.` and the
text encoders under `text_encoders.clip_l.transformer.` and `text_encoders.t5xxl.transformer.`. A diffusers folder's
transformer file (or its shards) is renamed to BFL's layout as it loads (`ldm.diffusers_dit`). fp8 weights are cast
to the model dtype as they load (those of ComfyUI's "scaled fp8" files multiplied by their scales). Whether the
model is dev or schnell is told by its guidance embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm import checkpoint as ckpt
from ldm.checkpoint import FLUX_VAE_SCALE, UNET_PREFIX, VAE_PREFIX, CheckpointError, StateDict
from ldm.diffusers_dit import dit_metadata, load_dit_state_dict, read_dit_shapes
from ldm.flow_family import FlowFamily
from ldm.flux import Flux, FluxConfig, axes_from_metadata, flux_config_from_state_dict, is_flux
from ldm.t5 import descaled_fp8, scaling_keys
from ldm.vae import VAEConfig

# The Flux latent space (BFL's ae.safetensors): 16 channels, stored as (z - shift) * scale for the transformer.
LATENT_SHIFT = 0.1159
FLUX_VAE = VAEConfig(z_channels=16, scaling_factor=FLUX_VAE_SCALE, use_quant_conv=False)
# The time shift each model samples with when no ModelSamplingFlux node sets one (ComfyUI's defaults). ComfyUI's
# schnell shift of 1 still bends the levels (ldm.sampling.flow.time_shift); diffusers samples schnell unshifted.
DEV_SHIFT, SCHNELL_SHIFT = 1.15, 1.0


@dataclass(frozen=True)
class FluxFamily(FlowFamily):
    """A Flux model's family: its transformer's config, the Flux latent space, and its default time shift."""

    unet_config: FluxConfig
    vae_config: VAEConfig = FLUX_VAE
    name: str = "flux"
    latent_shift: float = LATENT_SHIFT
    @property
    def variant(self) -> str:
        """"dev" (guidance-distilled: it takes a guidance strength) or "schnell" (timestep-distilled)."""
        return "dev" if self.unet_config.guidance_embed else "schnell"

    @property
    def shift(self) -> float:
        return DEV_SHIFT if self.unet_config.guidance_embed else SCHNELL_SHIFT


@dataclass
class LoadedFlux:
    family: FluxFamily
    unet: Flux
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def flux_weights(sd: StateDict) -> StateDict:
    """The transformer's tensors of a Flux file, without `model.diffusion_model.` if the file has it."""
    if is_flux(sd, UNET_PREFIX):
        return {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    return {k: v for k, v in sd.items() if not k.startswith(("first_stage_model.", "text_encoders."))}


def flux_family(weights: StateDict, metadata: dict[str, str] | None = None) -> FluxFamily:
    """The family of BFL-layout transformer weights (no prefix), the RoPE split from Loom's metadata if saved."""
    try:
        return FluxFamily(flux_config_from_state_dict(weights, axes_from_metadata(metadata or {})))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def peek_flux(path: str | Path) -> FluxFamily | None:
    """The family of a Flux file (BFL's layout or diffusers', one file or its shards) from its .safetensors
    headers alone; None for other files and formats."""
    shapes = read_dit_shapes(path)
    if shapes is None or not (is_flux(shapes) or is_flux(shapes, UNET_PREFIX)):
        return None
    try:
        return flux_family(flux_weights(shapes), dit_metadata(path))
    except CheckpointError as e:
        raise CheckpointError(f"{Path(path).name}: {e}") from None


def load_flux_unet(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   sd: StateDict | None = None) -> LoadedFlux:
    """Load a Flux diffusion model (a file of its own, or the one in a checkpoint, `sd` if already read) on
    `device` in `dtype`; keys of neither the transformer nor a checkpoint's other parts are listed as unused."""
    path = Path(path)
    sd = load_dit_state_dict(path) if sd is None else sd  # diffusers' layout converted, shards joined
    if not (is_flux(sd) or is_flux(sd, UNET_PREFIX)):
        raise CheckpointError(f"{path.name}: not a Flux diffusion model (no double_blocks / img_in weights in "
                              "Black Forest Labs' layout)")
    weights = descaled_fp8(flux_weights(sd))
    metadata = dit_metadata(path)
    try:
        family = flux_family(weights, metadata)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = ckpt._materialize(lambda: Flux(family.unet_config), weights, "Flux transformer", path, device, dtype)
    expected = set(model.state_dict())
    prefix = UNET_PREFIX if is_flux(sd, UNET_PREFIX) else ""
    skipped = scaling_keys(sd)
    unused = sorted(k for k in sd if k not in skipped and not k.startswith(("first_stage_model.", "text_encoders."))
                    and not (k.startswith(prefix) and k[len(prefix):] in expected))
    return LoadedFlux(family, model, unused, path, metadata)


def is_flux_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds a Flux transformer (alone or in a checkpoint), from its header."""
    shapes = ckpt.read_shapes(path)
    return shapes is not None and (is_flux(shapes) or is_flux(shapes, UNET_PREFIX))


def load_flux_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         text_encoder: bool = True) -> ckpt.LoadedCheckpoint:
    """An all-in-one Flux checkpoint (ComfyUI's layout, see the module docstring) as a LoadedCheckpoint: the
    transformer, the VAE, and the text encoders where the file has them (`text_encoder=False` skips them)."""
    from ldm.flux_text import flux_text_encoders_from_checkpoint, has_flux_text_encoders
    from ldm.vae import AutoencoderKL

    path = Path(path)
    sd = ckpt.load_state_dict(path)
    if not is_flux(sd, UNET_PREFIX):
        raise CheckpointError(f"{path.name}: not a Flux checkpoint (no model.diffusion_model.double_blocks weights)")
    loaded = load_flux_unet(path, device, dtype, sd=sd)
    vae_weights = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    try:
        vae_config = ckpt._vae_config(vae_weights, "", FLUX_VAE_SCALE)
    except KeyError as e:
        raise CheckpointError(f"{path.name}: the checkpoint's VAE (first_stage_model.) lacks {e}") from None
    vae = ckpt._materialize(lambda: AutoencoderKL(vae_config), vae_weights, "VAE", path, device, dtype)
    used = {VAE_PREFIX + k for k in vae.state_dict()}
    encoder = None
    if text_encoder and has_flux_text_encoders(sd):
        encoder, text_used = flux_text_encoders_from_checkpoint(sd, path, device, dtype)
        used |= text_used
    unused = sorted({*loaded.unused_keys, *(k for k in sd if k.startswith((VAE_PREFIX, "text_encoders."))
                                             and k not in used and (text_encoder or k.startswith(VAE_PREFIX)))})
    return ckpt.LoadedCheckpoint(loaded.family, loaded.unet, vae, encoder, unused, path, loaded.metadata)
