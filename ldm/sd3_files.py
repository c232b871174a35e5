"""Stable Diffusion 3 / 3.5 checkpoint files in Stability's single-file layout, and their family.

A checkpoint (sd3_medium.safetensors, sd3.5_large.safetensors, sd3.5_medium.safetensors, sd3.5_large_turbo...)
holds the MMDiT under `model.diffusion_model.` and the 16-channel VAE (no 1x1 convolutions around the latent) under
`first_stage_model.`; some also hold the text encoders under `text_encoders.clip_l.transformer.`,
`text_encoders.clip_g.transformer.` and `text_encoders.t5xxl.transformer.` (``ldm.sd3_text``). Without them, the
user adds TripleCLIPLoader's files. SD3's latents are stored as (z - 0.0609) * 1.5305 for the transformer; it
samples with ComfyUI's ModelSamplingSD3 shift of 3.0 unless a node says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm import checkpoint as ckpt
from ldm.checkpoint import UNET_PREFIX, VAE_PREFIX, CheckpointError, StateDict
from ldm.flow_family import FlowFamily
from ldm.mmdit import MMDiT, MMDiTConfig, is_mmdit, mmdit_config_from_state_dict
from ldm.t5 import descaled_fp8, scaling_keys
from ldm.vae import AutoencoderKL, VAEConfig

LATENT_SCALE, LATENT_SHIFT = 1.5305, 0.0609
SD3_VAE = VAEConfig(z_channels=16, scaling_factor=LATENT_SCALE, use_quant_conv=False)
DEFAULT_SHIFT = 3.0  # ComfyUI's ModelSamplingSD3 default (diffusers' SD3 scheduler config says the same)


@dataclass(frozen=True)
class SD3Family(FlowFamily):
    """An SD3 model's family: its MMDiT's config, the SD3 latent space, and the time shift it samples with."""

    unet_config: MMDiTConfig
    vae_config: VAEConfig = SD3_VAE
    name: str = "sd3"
    latent_shift: float = LATENT_SHIFT
    shift: float = DEFAULT_SHIFT


def is_sd3_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds an SD3 MMDiT under `model.diffusion_model.`, from its header."""
    shapes = ckpt.read_shapes(path)
    return shapes is not None and is_mmdit(shapes, UNET_PREFIX)


def load_sd3_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        text_encoder: bool = True) -> ckpt.LoadedCheckpoint:
    """An SD3 checkpoint as a LoadedCheckpoint: the MMDiT, the VAE, and the text encoders the file holds (None
    without any; `text_encoder=False` skips them). fp8 weights are cast to `dtype` (scaled fp8 descaled)."""
    from ldm.sd3_text import has_sd3_text_encoders, sd3_text_encoders_from_checkpoint

    path = Path(path)
    sd = ckpt.load_state_dict(path)
    if not is_mmdit(sd, UNET_PREFIX):
        raise CheckpointError(f"{path.name}: not an SD3 checkpoint (no model.diffusion_model.joint_blocks / "
                              "x_embedder weights in Stability's layout)")
    weights = dict(descaled_fp8(sd3_weights(sd)))
    try:
        family = SD3Family(mmdit_config_from_state_dict(weights))
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    unet = ckpt._materialize(lambda: MMDiT(family.unet_config), weights, "SD3 transformer", path, device, dtype)
    vae_weights = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    try:
        vae_config = ckpt._vae_config(vae_weights, "", LATENT_SCALE)
    except KeyError as e:
        raise CheckpointError(f"{path.name}: the checkpoint's VAE (first_stage_model.) lacks {e}") from None
    vae = ckpt._materialize(lambda: AutoencoderKL(vae_config), vae_weights, "VAE", path, device, dtype)
    used = {UNET_PREFIX + k for k in unet.state_dict()} | {VAE_PREFIX + k for k in vae.state_dict()} | scaling_keys(sd)
    encoder = None
    if text_encoder and has_sd3_text_encoders(sd):
        encoder, text_used = sd3_text_encoders_from_checkpoint(sd, path, device, dtype)
        used |= text_used
    unused = sorted(k for k in sd if k not in used and (text_encoder or not k.startswith("text_encoders.")))
    return ckpt.LoadedCheckpoint(family, unet, vae, encoder, unused, path, ckpt.read_metadata(path))


def sd3_weights(sd: StateDict) -> StateDict:
    """The MMDiT's tensors of a checkpoint, without `model.diffusion_model.`."""
    return {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
