"""More noise schedules (Align Your Steps, Laplace, VP) and schedule tools, as functions over tensors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# NVIDIA's optimized 10-step schedules (Sabour et al. 2024, "Align Your Steps: Optimizing Sampling Schedules
# in Diffusion Models"), as published on the project's quick-start page
# (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html): timesteps of SD's 1,000-step schedule for
# SD 1.5 and SDXL, noise levels for Stable Video Diffusion (an EDM-style continuous model).
AYS_TIMESTEPS: dict[str, tuple[int, ...]] = {
    "SD1": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
    "SDXL": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
}
AYS_SVD_SIGMAS: tuple[float, ...] = (700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002)
AYS_MODEL_TYPES = ["SD1", "SDXL", "SVD"]

EXTEND_SPACINGS = ["linear", "cosine", "sine"]


def sd_sigmas_float64(linear_start: float = 0.00085, linear_end: float = 0.012, num_timesteps: int = 1000) -> Tensor:
    """The sigmas of SD's scaled-linear DDPM schedule by timestep, kept in float64 (DiscreteSchedule rounds its
    table to float32; the AYS levels are read from this one, to the precision the published numbers carry)."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def ays_noise_levels(model_type: str) -> Tensor:
    """NVIDIA's 11 published Align Your Steps noise levels (10 steps) for SD1, SDXL or SVD, in float64.

    SD1 and SDXL are published as timesteps: their sigmas are SD's schedule at those timesteps."""
    if model_type == "SVD":
        return torch.tensor(AYS_SVD_SIGMAS, dtype=torch.float64)
    if model_type not in AYS_TIMESTEPS:
        raise ValueError(f"unknown Align Your Steps model type {model_type!r}; expected one of {AYS_MODEL_TYPES}")
    return sd_sigmas_float64()[list(AYS_TIMESTEPS[model_type])]


def loglinear_interp(levels: Tensor, count: int) -> Tensor:
    """`count` levels spread evenly over the positions of `levels` (falling, all above 0), each one
    interpolated linearly in log-sigma between its neighbours: the way the AYS authors stretch their
    10-step schedules to other step counts (float64)."""
    logs = levels.to(torch.float64).log()
    position = torch.linspace(0, 1, count, dtype=torch.float64) * (len(logs) - 1)
    low = position.floor().long().clamp(max=len(logs) - 2)
    weight = position - low
    return torch.lerp(logs[low], logs[low + 1], weight).exp()


def sigmas_align_your_steps(model_type: str, steps: int, denoise: float = 1.0) -> Tensor:
    """Align Your Steps (Sabour et al. 2024) for `steps` steps: NVIDIA's 10-step levels, log-linearly
    interpolated for other counts, ending in 0.

    Below denoise 1 it keeps the last round(steps * denoise) steps of that `steps`-step schedule (fewer
    steps over the low end, as ComfyUI's node does; BasicScheduler instead stretches the schedule so that all
    `steps` run); denoise 0 gives no levels.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if denoise <= 0.0:
        return torch.zeros(0)
    kept = steps if denoise >= 1.0 else round(steps * denoise)
    levels = ays_noise_levels(model_type)
    if len(levels) != steps + 1:
        levels = loglinear_interp(levels, steps + 1)
    levels = levels[len(levels) - (kept + 1):].clone()
    levels[-1] = 0.0
    return levels.to(torch.float32)


LAPLACE_EPSILON = 1e-5


def sigmas_laplace(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> Tensor:
    """The Laplace schedule of Hang et al. (2024), "Improved Noise Schedule for Diffusion Training", in the
    form ComfyUI's LaplaceScheduler uses: n log-sigmas at the quantiles of a Laplace(mu, beta) distribution,
    taken at evenly spaced probabilities from 1 down to 0, i.e.

        log sigma_i = mu - beta * sign(0.5 - x_i) * ln(1 - 2 |0.5 - x_i| + 1e-5),   x_i = i / (n - 1),

    clamped to [sigma_min, sigma_max]: most steps go to levels near e^mu. (The paper's Laplace variable is a
    log-SNR drawn for training; here, as in ComfyUI, its quantiles are read as log-sigma for sampling.)

    As in ComfyUI, no 0 is appended: sampling stops at the last (clamped) level, sigma_min.
    """
    x = torch.linspace(0, 1, n, dtype=torch.float32)
    distance = (0.5 - x).abs()
    log_sigma = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * distance + LAPLACE_EPSILON)
    return log_sigma.exp().clamp(min=sigma_min, max=sigma_max)


def sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> Tensor:
    """The continuous variance-preserving schedule of Song et al. (2021), "Score-Based Generative Modeling
    through Stochastic Differential Equations", in the sigma form of Karras et al. (2022), Table 1:

        sigma(t) = sqrt(exp(beta_d * t^2 / 2 + beta_min * t) - 1),   t from 1 down to eps_s,

    at n evenly spaced t, ending in 0 (k-diffusion's get_sigmas_vp; expm1, as in ComfyUI's copy of it, keeps
    the low levels exact in float32)."""
    t = torch.linspace(1, eps_s, n, dtype=torch.float32)
    sigmas = torch.special.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def extend_intermediate_sigmas(sigmas: Tensor, steps: int, start_at_sigma: float, end_at_sigma: float,
                               spacing: str = "linear") -> Tensor:
    """Splits each step that starts at a level in [end_at_sigma, start_at_sigma] (a negative start: no upper
    bound) into `steps` smaller ones, placing the new levels between its two ends at fractions f(k / steps),
    k = 1 .. steps - 1, where f is the identity (`linear`), sin(x pi/2) (`cosine`: denser towards the step's
    end) or 1 - cos(x pi/2) (`sine`: denser towards its start). ComfyUI's ExtendIntermediateSigmas."""
    if spacing not in EXTEND_SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {EXTEND_SPACINGS}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    upper = math.inf if start_at_sigma < 0 else start_at_sigma
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float32)[1:-1]
    if spacing == "cosine":
        fractions = torch.sin(fractions * math.pi / 2)
    elif spacing == "sine":
        fractions = 1 - torch.cos(fractions * math.pi / 2)
    levels = sigmas.detach().to("cpu", torch.float32).flatten()
    pieces: list[Tensor] = []
    for current, following in zip(levels[:-1], levels[1:], strict=True):
        pieces.append(current.reshape(1))
        # Compared in float32, as ComfyUI compares its float32 levels with the bounds.
        if end_at_sigma <= current <= upper:
            pieces.append(current + fractions * (following - current))
    pieces.append(levels[-1:])
    return torch.cat(pieces)


def added_noise_level(sigmas: Tensor) -> float:
    """The noise level ComfyUI's AddNoise node adds for a schedule: |first - last| level (the first level alone
    for a one-level schedule). For a schedule ending in 0 that is its first level."""
    levels = sigmas.flatten().tolist()
    return abs(levels[0] - levels[-1]) if len(levels) > 1 else levels[0]
