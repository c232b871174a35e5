"""The k-diffusion family of samplers over one denoiser interface `model(x, sigma) -> x0`.

Every sampler has k-diffusion's signature `sample_X(model, x, sigmas, extra_args, callback,
disable, ...)`: `x` is the starting latent already at noise level `sigmas[0]`, `sigmas` runs
down to (usually) 0, and `callback` gets `dict(i, x, sigma, sigma_hat, denoised)` after each
model evaluation of a step (sigmas as Python floats). `disable` is accepted for compatibility;
progress is reported through `callback` only. Stochastic samplers take a `noise_sampler(sigma,
sigma_next) -> unit noise`; the high-level `ksampler.sample` always passes a seeded one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.sampling.denoiser import level_tensor
from ldm.sampling.noise import BrownianTreeNoiseSampler, NoiseSampler

Model = Callable[..., Tensor]
Callback = Callable[[dict], None] | None


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The derivative dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def linear_combination(terms: list[tuple[float, Tensor]]) -> Tensor:
    """sum(coefficient * tensor) in one pass per term: a sampler's step written as one weighted sum
    of x, the x0 estimates and the noise costs a few fused multiply-adds instead of many small ops."""
    (c0, t0), *rest = terms
    out = t0 * c0
    for c, tensor in rest:
        out.add_(tensor, alpha=c)
    return out


def euler_step(x: Tensor, sigma: float, denoised: Tensor, sigma_next: float) -> Tensor:
    """`x + to_d(x, sigma, denoised) * (sigma_next - sigma)` in one pass over x: the step moves x
    along the straight line to `denoised`, a fraction (sigma - sigma_next) / sigma of the way."""
    return torch.lerp(x, denoised, (sigma - sigma_next) / sigma)


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split an ancestral step into a deterministic step down to `sigma_down` and fresh noise of
    standard deviation `sigma_up`, with sigma_down^2 + sigma_up^2 = sigma_to^2."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def get_ancestral_step_rf(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float, float]:
    """The ancestral step of a rectified-flow latent `(1 - sigma) x0 + sigma noise` (ComfyUI's "_RF" samplers):
    a deterministic step down to `sigma_down = sigma_to * (1 + (sigma_to / sigma_from - 1) * eta)`, then the latent
    times `scale = (1 - sigma_to) / (1 - sigma_down)` plus fresh noise of standard deviation `sigma_up`, which puts
    it back at `sigma_to`. Returns (sigma_down, sigma_up, scale)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0, 1.0
    sigma_down = sigma_to * (1 + (sigma_to / sigma_from - 1) * eta)
    scale = (1 - sigma_to) / (1 - sigma_down)
    return sigma_down, max(0.0, sigma_to**2 - (sigma_down * scale) ** 2) ** 0.5, scale


def _ancestral(sigma_from: float, sigma_to: float, eta: float, flow: bool) -> tuple[float, float, float]:
    """(sigma_down, sigma_up, scale) of an ancestral step: the fresh noise is added to `scale * x`."""
    return get_ancestral_step_rf(sigma_from, sigma_to, eta) if flow else (*get_ancestral_step(sigma_from, sigma_to,
                                                                                                eta), 1.0)


def _renoise(x: Tensor, scale: float, noise: Tensor, std: float) -> Tensor:
    return torch.add(x if scale == 1.0 else x * scale, noise, alpha=std)


def unseeded_noise_sampler(x: Tensor) -> NoiseSampler:
    return lambda sigma, sigma_next: torch.randn_like(x)


def _call(model: Model, x: Tensor, sigma: float, extra_args: dict | None) -> Tensor:
    return model(x, level_tensor(sigma, x.shape[0], x.device, x.dtype), **(extra_args or {}))


def _report(callback: Callback, i: int, x: Tensor, sigma: float, sigma_hat: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(
    x: Tensor,
    sigmas: list[float],
    i: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    noise_sampler: NoiseSampler | None,
) -> tuple[Tensor, float]:
    """Karras et al. (2022) Algorithm 2, lines 4-6: raise the noise level by a factor (1 + gamma)."""
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigmas[i]
    sigma_hat = sigmas[i] * (gamma + 1)
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    return x + noise_sampler(sigmas[i], sigma_hat) * s_noise * (
        sigma_hat**2 - sigmas[i] ** 2
    ) ** 0.5, sigma_hat


@torch.no_grad()
def sample_euler(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Karras et al. (2022), Algorithm 2 with Euler steps. Also DDIM with eta = 0 (Song et al. 2021),
    which is exactly an Euler step of the ODE in sigma space."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = _call(model, x, sigma_hat, extra_args)
        _report(callback, i, x, s[i], sigma_hat, denoised)
        x = euler_step(x, sigma_hat, denoised, s[i + 1])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    flow: bool = False,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion). Equals DDIM with the same eta. `flow`: the latent is a
    rectified-flow one, re-noised as `get_ancestral_step_rf` says."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        sigma_down, sigma_up, scale = _ancestral(s[i], s[i + 1], eta, flow)
        _report(callback, i, x, s[i], s[i], denoised)
        x = euler_step(x, s[i], denoised, sigma_down)
        if s[i + 1] > 0 and sigma_up > 0:
            x = _renoise(x, scale, noise_sampler(s[i], s[i + 1]), s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_heun(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Karras et al. (2022), Algorithm 2 (Heun's second-order method; Euler on the last step)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = _call(model, x, sigma_hat, extra_args)
        _report(callback, i, x, s[i], sigma_hat, denoised)
        x_2 = euler_step(x, sigma_hat, denoised, s[i + 1])
        if s[i + 1] == 0:
            x = x_2
        else:
            # x + (d + d_2) * dt / 2 with x + d * dt = x_2 and d_2 = (x_2 - denoised_2) / sigma_next
            denoised_2 = _call(model, x_2, s[i + 1], extra_args)
            dt = s[i + 1] - sigma_hat
            x = torch.lerp(x, x_2, 0.5).add_(x_2 - denoised_2, alpha=dt / (2 * s[i + 1]))
    return x


def _midpoint_step(
    model: Model, x: Tensor, sigma: float, denoised: Tensor, sigma_next: float, extra_args: dict | None
) -> Tensor:
    """DPM-Solver-2's step from sigma to sigma_next, with its derivative taken at the geometric
    midpoint; a plain Euler step into sigma_next = 0."""
    if sigma_next == 0:
        return euler_step(x, sigma, denoised, sigma_next)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_next)) / 2)
    x_2 = euler_step(x, sigma, denoised, sigma_mid)
    denoised_2 = _call(model, x_2, sigma_mid, extra_args)
    return torch.add(x, x_2 - denoised_2, alpha=(sigma_next - sigma) / sigma_mid)  # x + d_2 * dt


@torch.no_grad()
def sample_dpm_2(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022) midpoint steps in log-sigma, in Karras et al.'s Algorithm 2."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = _call(model, x, sigma_hat, extra_args)
        _report(callback, i, x, s[i], sigma_hat, denoised)
        x = _midpoint_step(model, x, sigma_hat, denoised, s[i + 1], extra_args)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    flow: bool = False,
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 (Lu et al. 2022) steps (`flow`: as in `sample_euler_ancestral`)."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        sigma_down, sigma_up, scale = _ancestral(s[i], s[i + 1], eta, flow)
        _report(callback, i, x, s[i], s[i], denoised)
        x = _midpoint_step(model, x, s[i], denoised, sigma_down, extra_args)
        if sigma_down != 0:
            x = _renoise(x, scale, noise_sampler(s[i], s[i + 1]), s_noise * sigma_up)
    return x


def linear_multistep_coeff(order: int, t: list[float], i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial of t_{i-j} on t_i..t_{i-order+1}.

    Integrated exactly (k-diffusion uses adaptive quadrature, which is exact for these low degrees).
    """
    coeffs = [1.0]  # ascending powers of the basis polynomial's numerator
    denominator = 1.0
    for k in range(order):
        if k != j:
            root = t[i - k]
            coeffs = [a - root * b for a, b in zip([0.0, *coeffs], [*coeffs, 0.0], strict=True)]
            denominator *= t[i - j] - root

    def antiderivative(tau: float) -> float:
        return sum(c * tau ** (n + 1) / (n + 1) for n, c in enumerate(coeffs))

    return (antiderivative(t[i + 1]) - antiderivative(t[i])) / denominator


@torch.no_grad()
def sample_lms(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep method on the sigma-ODE, with coefficients for non-uniform steps (k-diffusion)."""
    s = sigmas.tolist()
    ds: list[tuple[float, Tensor]] = []  # the derivatives d = (x - denoised) / sigma, as (sigma, x - denoised)
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        ds = [*ds[-(order - 1) :], (s[i], x - denoised)] if order > 1 else [(s[i], x - denoised)]
        _report(callback, i, x, s[i], s[i], denoised)
        cur_order = min(i + 1, order)
        (c, diff), *rest = [
            (linear_multistep_coeff(cur_order, s, i, j) / sigma_j, diff)
            for j, (sigma_j, diff) in enumerate(reversed(ds))
        ]
        x = torch.add(x, diff, alpha=c)
        for c, diff in rest:
            x.add_(diff, alpha=c)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    flow: bool = False,
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, "DPM-Solver++", Algorithm 1). `flow`: as in
    `sample_euler_ancestral`, with the half step in the flow's half-log-SNR log((1 - sigma) / sigma)."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        sigma_down, sigma_up, scale = _ancestral(s[i], s[i + 1], eta, flow)
        _report(callback, i, x, s[i], s[i], denoised)
        if sigma_down == 0:
            x = euler_step(x, s[i], denoised, sigma_down)
        else:
            # Half step in log-SNR (t = -log sigma), then the full step from the midpoint's x0.
            # The DPM-Solver++ first-order update (sigma'/sigma) x - expm1(-h) x0 is the Euler step.
            if not flow:
                sigma_mid = (s[i] * sigma_down) ** 0.5
            elif s[i] >= 1:  # pure noise has no finite log-SNR: a level just below it (ComfyUI's)
                sigma_mid = 0.9999
            else:
                sigma_mid = 1 / (1 + ((1 - s[i]) / s[i] * (1 - sigma_down) / sigma_down) ** 0.5)
            x_2 = euler_step(x, s[i], denoised, sigma_mid)
            denoised_2 = _call(model, x_2, sigma_mid, extra_args)
            x = euler_step(x, s[i], denoised_2, sigma_down)
        if s[i + 1] > 0 and (sigma_up > 0 or not flow):
            x = _renoise(x, scale, noise_sampler(s[i], s[i + 1]), s_noise * sigma_up)
    return x


def half_log_snr(sigma: float, flow: bool) -> float:
    """log(alpha / sigma), the time the exponential integrators step in: -log(sigma) for a latent x0 + sigma noise,
    log((1 - sigma) / sigma) for a rectified-flow one (1 - sigma) x0 + sigma noise."""
    return math.log((1 - sigma) / sigma) if flow else -math.log(sigma)


def dpmpp_sde_stage_level(sigma: float, sigma_next: float, r: float, flow: bool) -> float:
    """The level of DPM-Solver++ SDE's intermediate stage, a fraction `r` of the step in half-log-SNR (also where
    the KSampler's Brownian tree is asked for its noise, so computed here once for both)."""
    if not flow:
        return sigma * math.exp(-math.log(sigma / sigma_next) * r)
    lam = half_log_snr(sigma, True) + r * (half_log_snr(sigma_next, True) - half_log_snr(sigma, True))
    return 1 / (1 + math.exp(lam))


def _brownian(
    x: Tensor, sigmas: list[float], noise_sampler: NoiseSampler | None, seed: int | None
) -> NoiseSampler:
    if noise_sampler is not None:
        return noise_sampler
    positive = [v for v in sigmas if v > 0]
    seed = int(torch.randint(0, 2**63 - 1, [])) if seed is None else seed
    return BrownianTreeNoiseSampler(x, min(positive), max(positive), seed)


@torch.no_grad()
def sample_dpmpp_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r: float = 0.5,
    seed: int | None = None,
    flow: bool = False,
) -> Tensor:
    """DPM-Solver++ (stochastic, second order, single step; k-diffusion), with Brownian tree noise. `flow`: a
    rectified-flow latent x = alpha x0 + sigma noise (alpha = 1 - sigma), whose x / alpha is a latent of level
    sigma / alpha in the form the steps take; each stage steps that, then scales back by its level's alpha."""
    s = sigmas.tolist()
    noise_sampler = _brownian(x, s, noise_sampler, seed)
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = euler_step(x, s[i], denoised, s[i + 1])
            continue
        sigma_s = dpmpp_sde_stage_level(s[i], s[i + 1], r, flow)
        # x / alpha and the levels sigma / alpha: the same numbers but for a flow latent.
        alpha, alpha_s, alpha_next = (1 - s[i], 1 - sigma_s, 1 - s[i + 1]) if flow else (1.0, 1.0, 1.0)
        x_hat = x / alpha if flow else x
        level, level_s, level_next = s[i] / alpha, sigma_s / alpha_s, s[i + 1] / alpha_next
        # Step 1: ancestral step to the intermediate level sigma_s.
        sd, su = get_ancestral_step(level, level_s, eta)
        x_2 = euler_step(x_hat, level, denoised, sd)
        x_2 = torch.add(x_2, noise_sampler(s[i], sigma_s), alpha=s_noise * su)
        denoised_2 = _call(model, x_2 * alpha_s if flow else x_2, sigma_s, extra_args)
        # Step 2: ancestral step to sigma_next with the blended x0 estimate.
        sd, su = get_ancestral_step(level, level_next, eta)
        fac = 1 / (2 * r)
        x = euler_step(x_hat, level, torch.lerp(denoised, denoised_2, fac), sd)
        x = torch.add(x, noise_sampler(s[i], s[i + 1]), alpha=s_noise * su)
        x = x * alpha_next if flow else x
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), multistep in log-sigma."""
    s = sigmas.tolist()
    old_denoised = None
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        # The first-order update (sigma'/sigma) x - expm1(-h) x0 is the Euler step toward x0.
        if s[i + 1] == 0:
            x = denoised
        elif old_denoised is None:
            x = euler_step(x, s[i], denoised, s[i + 1])
        else:
            r = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
            # (1 + 1/2r) denoised - (1/2r) old_denoised
            x = euler_step(x, s[i], torch.lerp(denoised, old_denoised, -1 / (2 * r)), s[i + 1])
        old_denoised = denoised
    return x
