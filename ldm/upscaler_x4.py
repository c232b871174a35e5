"""The Stable Diffusion x4 upscaler's sampling facts: its noise schedule, and the noise augmentation of the
low-resolution image it takes beside the latent, whose noise level it is given as a class label."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ldm.sampling.noise import cpu_generator
from ldm.sampling.schedules import DiscreteSchedule

FAMILY = "sd_x4_upscaler"
# LDM's x4-upscaling.yaml: a 1,000-step "linear" schedule (linear in sqrt(beta)) from 0.0001 to 0.02, for the
# latent (v-prediction) and for the augmentation of the image alike, and noise levels up to 350 for the image.
LINEAR_START, LINEAR_END = 0.0001, 0.02
MAX_NOISE_LEVEL = 350
IMAGE_CHANNELS = 3  # the low-resolution RGB image, in -1..1, beside the 4-channel latent


def schedule() -> DiscreteSchedule:
    """The schedule the upscaler samples its latent with."""
    return DiscreteSchedule(LINEAR_START, LINEAR_END)


def noise_level(augmentation: float) -> int:
    """The class label for a noise augmentation in 0..1: that fraction of the highest level, rounded (as
    ComfyUI's SD_4XUpscale_Conditioning has it)."""
    if not 0.0 <= augmentation <= 1.0:
        raise ValueError(f"noise augmentation must be within 0..1, not {augmentation}")
    return round(MAX_NOISE_LEVEL * augmentation)


@functools.lru_cache(maxsize=1)
def _roots() -> tuple[Tensor, Tensor]:
    """(sqrt(alpha-bar), sqrt(1 - alpha-bar)) per level, computed in float64 as LDM does, kept in float32."""
    betas = torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return alphas_cumprod.sqrt().float(), (1.0 - alphas_cumprod).sqrt().float()


def augment(image: Tensor, level: int, seed: int) -> Tensor:
    """`image` [B, 3, h, w] noised to `level` of the schedule (DDPM's forward process, `q_sample`), with unit
    noise drawn on the CPU from `seed`. ComfyUI seeds it with the sampler's seed less 10, and skips this
    altogether when the augmentation is 0 (level 0 would still add a little noise)."""
    if not 0 <= level < 1000:
        raise ValueError(f"noise level must be within 0..999, not {level}")
    signal, spread = (r[level].item() for r in _roots())
    noise = torch.randn(image.shape, generator=cpu_generator(seed), dtype=torch.float32)
    return image.float() * signal + noise.to(image.device) * spread
