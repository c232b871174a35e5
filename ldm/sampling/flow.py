"""Noise levels of rectified-flow models (Flux.1), as ComfyUI's ModelSamplingFlux lays them out.

A rectified-flow model sees `x = sigma * noise + (1 - sigma) * x0` for sigma in [0, 1] and predicts the velocity
`v = noise - x0`, so that `x0 = x - sigma * v` (the denoiser's "flow" prediction; ComfyUI's CONST). The ODE
`dx/dsigma = v = (x - x0) / sigma` is the one k-diffusion's samplers already walk, so euler, heun, dpmpp_2m and the
other deterministic samplers run on these levels unchanged.

Flux samples levels shifted towards the noisy end, the more so for larger images (Esser et al. 2024, "Scaling
Rectified Flow Transformers", section 5.3.2): `sigma(t) = e^shift / (e^shift + 1/t - 1)` for t in (0, 1]. The table
the schedulers walk holds sigma((i + 1) / 10000) for i < 10,000, as ComfyUI's does; the model's timestep input is
sigma itself. As in ComfyUI, a position `t` of this schedule is that timestep (`sigma_to_t` is the identity) while
`t_to_sigma` applies the shift: the two are not inverses, which makes the `normal` scheduler shift twice, exactly
as ComfyUI's does for Flux. `simple` (what Flux workflows use) takes every (10000 / steps)-th level of the table:
shift(1 - i / steps), the levels of diffusers' FlowMatchEulerDiscreteScheduler with the same shift (its `mu`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.sampling.schedules import DiscreteSchedule

FLUX_TIMESTEPS = 10000
SD3_TIMESTEPS = 1000
# ModelSamplingFlux's line through (256 image tokens, base_shift) and (4096 tokens, max_shift).
BASE_TOKENS, MAX_TOKENS = 256, 4096


def time_shift(shift: float, t: Tensor | float) -> Tensor | float:
    """Flux's shifted noise level at time t in (0, 1] (BFL's time_shift with sigma 1; 0 at t = 0)."""
    if isinstance(t, Tensor):
        return torch.where(t > 0, math.exp(shift) / (math.exp(shift) + 1 / t - 1), torch.zeros_like(t))
    return math.exp(shift) / (math.exp(shift) + 1 / t - 1) if t > 0 else 0.0


def resolution_shift(width: int, height: int, max_shift: float = 1.15, base_shift: float = 0.5) -> float:
    """The shift for an image of width x height pixels (ComfyUI's ModelSamplingFlux node; diffusers' `mu`): linear
    in its number of 16x16-pixel patches, base_shift at 256 of them (256 px square), max_shift at 4096 (1024 px)."""
    slope = (max_shift - base_shift) / (MAX_TOKENS - BASE_TOKENS)
    return (width * height / (8 * 8 * 2 * 2)) * slope + base_shift - slope * BASE_TOKENS


# FLUX.2's fitted shift (BFL's flux2 sampling, diffusers' Flux2Pipeline and ComfyUI's Flux2Scheduler alike): `mu` is
# linear in the image tokens along two lines fitted at 10 and 200 steps, interpolated in the step count below 4,300
# tokens and the 200-step line alone above.
MU_10_STEPS = (8.73809524e-05, 1.89833333)
MU_200_STEPS = (0.00016927, 0.45666666)
MU_ONE_LINE_TOKENS = 4300


def empirical_mu(image_tokens: int, steps: int) -> float:
    """FLUX.2's time shift (`mu`) for an image of `image_tokens` latent tokens (pixels / 16^2) sampled in `steps`."""
    (a1, b1), (a2, b2) = MU_10_STEPS, MU_200_STEPS
    at_200 = a2 * image_tokens + b2
    if image_tokens > MU_ONE_LINE_TOKENS:
        return at_200
    at_10 = a1 * image_tokens + b1
    slope = (at_200 - at_10) / 190.0
    return slope * steps + at_200 - 200.0 * slope


def flux2_sigmas(steps: int, width: int, height: int) -> Tensor:
    """The `steps + 1` noise levels of ComfyUI's Flux2Scheduler for a width x height image: 1 to 0 evenly in time,
    each shifted by `empirical_mu` (Flux's exponential shift, `time_shift`)."""
    mu = empirical_mu(round(width * height / (16 * 16)), steps)
    return time_shift(mu, torch.linspace(1, 0, steps + 1, dtype=torch.float64)).float()


class FlowSchedule(DiscreteSchedule):
    """Flux's noise levels with time shift `shift` (1.15 for dev, 1.0 for schnell, unless ModelSamplingFlux says)."""

    def __init__(self, shift: float = 1.15, timesteps: int = FLUX_TIMESTEPS) -> None:
        self.shift = shift
        t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
        sigmas = self.shifted(t)
        # The base class's DDPM view of the same levels (alpha-bar = 1 / (1 + sigma^2)), for code that reads it.
        super().__init__(alphas_cumprod=1 / (1 + sigmas**2))
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()
        self._log_sigma_list = sigmas.log().tolist()

    def shifted(self, t: Tensor | float) -> Tensor | float:
        """The noise level at time t in [0, 1] (Flux's exponential time shift)."""
        return time_shift(self.shift, t)

    def unet_timestep(self, t: Tensor | float) -> Tensor | float:
        return t

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        return sigma.clone()

    def sigma_to_t_scalar(self, sigma: float, quantize: bool = False) -> float:
        return float(sigma)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return self.shifted(t.to(torch.float64).clamp(0, 1)).float()

    def sigma_at_percent(self, percent: float) -> float:
        """shift(1 - percent), inf at the start (ComfyUI's percent_to_sigma gives 1.0, the top level) and 0 at the
        end: Loom's convention for "from the start", above any level."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        return float(self.shifted(1.0 - percent))

    def zero_terminal_snr(self) -> DiscreteSchedule:
        raise ValueError("a rectified-flow (Flux) schedule already ends at pure noise; there is no SNR to rescale")

    def distilled(self, steps: int = 50) -> DiscreteSchedule:
        raise ValueError("a rectified-flow (Flux) schedule has no DDPM levels to distil")


class SD3FlowSchedule(FlowSchedule):
    """Stable Diffusion 3's noise levels (ComfyUI's ModelSamplingDiscreteFlow, ModelSamplingSD3's shift, 3.0 by
    default): 1000 levels `shift * t / (1 + (shift - 1) * t)`, the shift of diffusers' FlowMatchEulerDiscreteScheduler
    (Esser et al. 2024, section 5.3.2, with shift = sqrt(m / n))."""

    def __init__(self, shift: float = 3.0) -> None:
        super().__init__(shift, SD3_TIMESTEPS)

    def shifted(self, t: Tensor | float) -> Tensor | float:
        return self.shift * t / (1 + (self.shift - 1) * t)
