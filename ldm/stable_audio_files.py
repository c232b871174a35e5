"""Stable Audio Open 1.0 as a Loom model family, from the single file ComfyUI users load with CheckpointLoaderSimple
(stabilityai/stable-audio-open-1.0's model.safetensors, saved as stable-audio-open-1.0.safetensors): the transformer
and its seconds conditioners (`ldm.stable_audio`) and the Oobleck VAE (`ldm.oobleck`, under `pretransform.model.`).
The prompt's T5-base is not in the file: CLIPLoader type stable_audio loads it (`ldm.stable_audio_text`).

Sampling is ComfyUI's for this model: v-prediction on continuous levels from 0.03 to 500 (ModelSamplingContinuousV,
`ldm.sampling.schedules.ContinuousVSchedule`: the transformer's timestep is atan(sigma) * 2 / pi), latents [B, 64, L]
at 44.1 kHz / 2048, unscaled. The seconds a prompt asks for (ConditioningStableAudio's seconds_start and
seconds_total) ride in its conditioning and reach the model by keyword (`ldm.sampling.cond_jobs.MODEL_INPUTS`);
without them it is conditioned on 0 and on the latent's own length, as ComfyUI's StableAudio1 is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError
from ldm.flow_family import FlowFamily
from ldm.stable_audio import (
    StableAudioConditioners,
    StableAudioConfig,
    StableAudioDiT,
    default_seconds_total,
    is_stable_audio,
    load_stable_audio,
    stable_audio_conditioning,
)
from ldm.vae import VAEConfig

VAE_PREFIX = "pretransform.model."
SIGMA_RANGE = (0.03, 500.0, 1.0)  # ComfyUI's sampling settings for Stable Audio: sigma_min, sigma_max, sigma_data
# The latent space, as the families' vae_config names it (for the sampler's empty-latent fitting): unscaled.
AUDIO_LATENT = VAEConfig(z_channels=64, scaling_factor=1.0)


@dataclass(frozen=True)
class StableAudioFamily(FlowFamily):
    """Stable Audio's family: its transformer's config, v-prediction on ComfyUI's continuous levels."""

    unet_config: StableAudioConfig
    vae_config: VAEConfig = AUDIO_LATENT
    name: str = "stable_audio"
    latent_shift: float = 0.0
    prediction: str = "v"
    v_continuous: tuple[float, float, float] = SIGMA_RANGE  # ContinuousVSchedule's (sigma_min, sigma_max, data)
    prompt_hint: str = "encode it with T5-base through CLIPLoader type stable_audio (t5-base.safetensors)"

    @property
    def latent_channels(self) -> int:
        return self.unet_config.io_channels


class StableAudioModel(nn.Module):
    """The transformer with its seconds conditioners, called as Loom's denoiser calls a model: the prompt's T5-base
    states (padding zeroed) in `context`, the seconds by keyword (one value, or one per prompt in the batch)."""

    def __init__(self, dit: StableAudioDiT, conditioners: StableAudioConditioners):
        super().__init__()
        self.dit, self.conditioners = dit, conditioners

    @property
    def config(self) -> StableAudioConfig:
        return self.dit.config

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.preprocess_conv.weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                seconds_start: Tensor | Sequence[float] | float | None = None,
                seconds_total: Tensor | Sequence[float] | float | None = None) -> Tensor:
        """The v-prediction for latents `x` [B, 64, L] at `timesteps` (atan(sigma) * 2 / pi); `y` is unused (T5 has
        no pooled prompt: the global conditioning is the seconds')."""
        start = 0.0 if seconds_start is None else seconds_start
        total = default_seconds_total(x.shape[-1]) if seconds_total is None else seconds_total
        context = context.expand(x.shape[0], -1, -1) if context.shape[0] == 1 else context
        context, y = stable_audio_conditioning(context, None, start, total, self.conditioners)
        return self.dit(x, timesteps, context, y=y)


def is_stable_audio_file(path: str | Path) -> bool:
    """Whether a .safetensors file holds Stable Audio's transformer in Stability's layout, from its header."""
    shapes = ckpt.read_shapes(path)
    return shapes is not None and is_stable_audio(shapes)


def load_stable_audio_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                                 dtype: torch.dtype = torch.float32) -> ckpt.LoadedCheckpoint:
    """Stability's single file as a LoadedCheckpoint: the transformer and conditioners as one model, its family, the
    Oobleck VAE, and no text encoder (T5-base comes from its own file)."""
    from ldm.oobleck import is_oobleck, load_oobleck

    path = Path(path)
    sd = ckpt.load_state_dict(path)
    if not is_stable_audio(sd):
        raise CheckpointError(f"{path.name}: not a Stable Audio checkpoint (no model.model.transformer weights)")
    if not is_oobleck(sd, VAE_PREFIX):
        raise CheckpointError(f"{path.name}: a Stable Audio checkpoint without its VAE (pretransform.model.): Loom "
                              "loads the whole stable-audio-open-1.0 file")
    dit, conditioners = load_stable_audio(sd, device, dtype)
    vae = load_oobleck(sd, prefix=VAE_PREFIX, device=device, dtype=torch.float32)
    model = StableAudioModel(dit, conditioners).eval()
    used = ("model.model.", "conditioner.conditioners.", VAE_PREFIX)
    unused = sorted(k for k in sd if not k.startswith(used))
    return ckpt.LoadedCheckpoint(StableAudioFamily(dit.config), model, vae, None, unused, path,
                                 ckpt.read_metadata(path))
