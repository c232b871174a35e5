"""Schedulers: how many and which noise levels (sigmas) a sampler walks through.

Each `get_sigmas` result runs from high to low noise and ends with a 0, the clean sample, as
ComfyUI's schedulers do. Names and behaviours follow ComfyUI's scheduler list.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.sampling.schedules import DiscreteSchedule

SCHEDULER_NAMES = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
                   "linear_quadratic", "kl_optimal"]


def append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The noise schedule of Karras et al. (2022), eq. 5: uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform steps in log-sigma."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def sigmas_normal(schedule: DiscreteSchedule, steps: int, sgm: bool = False) -> Tensor:
    """Timesteps evenly spaced from the last to the first, inclusive (`sgm=False`), or with the
    final timestep left out (`sgm=True`, the "trailing" spacing SDXL-era models prefer)."""
    start = float(schedule.sigma_to_t(torch.tensor(schedule.sigma_max)))
    end = float(schedule.sigma_to_t(torch.tensor(schedule.sigma_min)))
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        timesteps = torch.linspace(start, end, steps)
    return append_zero(schedule.t_to_sigma(timesteps))


def sigmas_simple(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Every (1000/steps)-th sigma of the table, counted down from the top."""
    stride = schedule.num_timesteps / steps
    return append_zero(torch.stack([schedule.sigmas[-(1 + int(i * stride))] for i in range(steps)]))


def sigmas_ddim_uniform(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """The timesteps of LDM's DDIMSampler ("uniform" discretisation: 1, 1 + c, 1 + 2c, ...).

    As in ComfyUI, the integer stride can yield a few more than `steps` levels.
    """
    stride = max(schedule.num_timesteps // steps, 1)
    picked = schedule.sigmas[1::stride]
    return append_zero(picked.flip(0))


def sigmas_beta(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Timesteps at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024,
    "Beta Sampling is All You Need"), denser at both ends; repeated timesteps are dropped."""
    from scipy import stats

    last = schedule.num_timesteps - 1
    quantiles = 1 - torch.linspace(0, 1, steps + 1, dtype=torch.float64)[:-1].numpy()
    timesteps = (stats.beta.ppf(quantiles, alpha, beta) * last).round().astype(int)
    unique = [t for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]
    return append_zero(schedule.sigmas[unique])


def sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """The "KL-optimal" schedule (A1111 PR 15608, after Sabour et al. 2024): evenly spaced in atan(sigma)."""
    if n == 1:
        return append_zero(torch.tensor([sigma_max]))
    ramp = torch.arange(n, dtype=torch.float32) / (n - 1)
    return append_zero(torch.tan(ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)))


def sigmas_linear_quadratic(n: int, sigma_max: float, threshold: float = 0.025) -> Tensor:
    """Genmo Mochi's schedule as ComfyUI applies it to any model: in units of sigma_max, the first half of the
    steps falls linearly by `threshold` in all, the second half quadratically to 0."""
    if n == 1:
        return torch.tensor([sigma_max, 0.0])
    linear_steps = n // 2
    fractions = [i * threshold / linear_steps for i in range(linear_steps)]
    quadratic_steps = n - linear_steps
    gap = linear_steps - threshold * n
    a = gap / (linear_steps * quadratic_steps**2)
    b = threshold / linear_steps - 2 * gap / quadratic_steps**2
    c = a * linear_steps**2
    fractions += [a * i**2 + b * i + c for i in range(linear_steps, n)] + [1.0]
    return torch.tensor([1.0 - f for f in fractions], dtype=torch.float32) * sigma_max


# Ideogram 4's log-SNR range: the clean-time fraction t = sigmoid(logSNR / 2) is kept inside it.
IDEOGRAM4_LOGSNR = (-15.0, 18.0)


def sigmas_ideogram4(steps: int, width: int, height: int, mu: float = 0.0, std: float = 1.5) -> Tensor:
    """Ideogram 4's logit-normal flow schedule, as ComfyUI's Ideogram4Scheduler lays out its reference loop: `steps
    + 1` evenly spaced quantiles u (float32) of a normal distribution of mean mu + ln(pixels / 512^2) / 2 and spread
    `std`, each mapped to a clean-time fraction t = 1 - sigmoid(quantile), clamped to the log-SNR range (so the
    levels run from about 1 - 1.2e-4 down to about 5.5e-4, not 0), and sigma = 1 - t, high to low."""
    mean = mu + 0.5 * math.log(width * height / (512 * 512))
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32).double()
    low, high = IDEOGRAM4_LOGSNR
    t = (1.0 - torch.sigmoid(mean + std * torch.special.ndtri(u))).clamp(1 / (1 + math.exp(high / 2)),
                                                                         1 / (1 + math.exp(low / 2)))
    return (1.0 - t.float()).flip(0)


def get_sigmas(scheduler: str, schedule: DiscreteSchedule, steps: int) -> Tensor:
    """The `steps + 1` sigmas (fewer for `beta`, maybe more for `ddim_uniform`) of a named scheduler."""
    if steps <= 0:
        return torch.zeros(0)
    if scheduler == "normal":
        return sigmas_normal(schedule, steps)
    if scheduler == "karras":
        return sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max)
    if scheduler == "exponential":
        return sigmas_exponential(steps, schedule.sigma_min, schedule.sigma_max)
    if scheduler == "sgm_uniform":
        return sigmas_normal(schedule, steps, sgm=True)
    if scheduler == "simple":
        return sigmas_simple(schedule, steps)
    if scheduler == "ddim_uniform":
        return sigmas_ddim_uniform(schedule, steps)
    if scheduler == "beta":
        return sigmas_beta(schedule, steps)
    if scheduler == "linear_quadratic":
        return sigmas_linear_quadratic(steps, schedule.sigma_max)
    if scheduler == "kl_optimal":
        return sigmas_kl_optimal(steps, schedule.sigma_min, schedule.sigma_max)
    raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULER_NAMES}")
