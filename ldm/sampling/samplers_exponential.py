"""ComfyUI's exponential-integrator samplers (DEIS, RES multistep) and its other late additions (Heun++, gradient
estimation with CFG++), with k-diffusion's signature over the denoiser `model(x, sigma) -> x0`.

Each follows ComfyUI's update rule and its choices at the ends of the schedule, so that a workflow naming one gives
the same numbers. The CFG++ variants take `uncond`, the `UncondCapture` that `ksampler.sample` wires up.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.sampling.noise import NoiseSampler
from ldm.sampling.samplers import (
    Callback,
    Model,
    _call,
    _churn,
    _report,
    euler_step,
    get_ancestral_step,
    linear_combination,
    to_d,
    unseeded_noise_sampler,
)
from ldm.sampling.samplers_cfgpp import UncondCapture, _uncond
from ldm.sampling.samplers_multistep import multistep, sample_gradient_estimation

# DEIS measures time on a variance-preserving schedule that reaches sigma 0.002 at t = 1e-3 and sigma 80 at
# t = 1 (EDM's range), whatever the model's own range: sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1.
_VP_EPS, _VP_SIGMA_MIN, _VP_SIGMA_MAX = 1e-3, 0.002, 80.0
_BETA_D = 2 * (math.log1p(_VP_SIGMA_MIN**2) / _VP_EPS - math.log1p(_VP_SIGMA_MAX**2)) / (_VP_EPS - 1)
_BETA_MIN = math.log1p(_VP_SIGMA_MAX**2) - _BETA_D / 2


def vp_time(sigma: float) -> float:
    """The VP time t of a noise level on DEIS's schedule (the inverse of sigma(t) above)."""
    return (math.sqrt(_BETA_MIN**2 + 2 * _BETA_D * math.log1p(sigma**2)) - _BETA_MIN) / _BETA_D


def deis_weights(levels: list[float], target: float, points: int = 10_000) -> list[float]:
    """DEIS's "tAB" weights (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
    section 4) for a step from levels[0] to `target`, given the levels of the history (newest first):
    x' = x + sum_j w_j d_j with d_j the derivative (x - x0) / sigma, i.e. the noise, at levels[j].

    w_j integrates the Lagrange basis polynomial of node j, over the VP times of the levels, against d sigma:
    the noise is taken to be a polynomial in t, and dx/dsigma = eps in sigma space. One level is an Euler step.
    The integral is ComfyUI's quadrature (from the GITS authors' code): the mean of `points` samples of the
    integrand, end points included, times the step; kept so that the weights match ComfyUI's (in float64)."""
    if len(levels) == 1:
        return [target - levels[0]]
    nodes = [vp_time(level) for level in levels]
    t, t_next = nodes[0], vp_time(target)
    taus = torch.linspace(t, t_next, points, dtype=torch.float64)
    growth = torch.exp(_BETA_D * taus**2 / 2 + _BETA_MIN * taus)  # sigma(t)^2 + 1
    dsigma_dt = (_BETA_D * taus + _BETA_MIN) * growth / (2 * torch.sqrt(growth - 1))
    weights = []
    for j, node in enumerate(nodes):
        basis = torch.ones_like(taus)
        for k, other in enumerate(nodes):
            if k != j:
                basis *= (taus - other) / (node - other)
        weights.append(float((dsigma_dt * basis).sum()) * (t_next - t) / points)
    return weights


@torch.no_grad()
def sample_deis(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
                disable: bool | None = None, max_order: int = 3) -> Tensor:
    """DEIS (Zhang & Chen 2023), the tAB multistep method as ComfyUI runs it: each step integrates the polynomial
    (in VP time) through the last `max_order` noise predictions (`deis_weights`); the first steps use the history
    there is, the first an Euler step. The step to sigma 0 is an Euler step, which lands on the x0 prediction."""
    return multistep(model, x, sigmas, extra_args, callback, max_order, deis_weights)


def _res_multistep(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback, eta: float,
                   s_noise: float, noise_sampler: NoiseSampler | None, uncond: UncondCapture | None) -> Tensor:
    """RES multistep steps, ancestral for eta > 0 and CFG++ when `uncond` is given (see `sample_res_multistep`)."""
    if eta > 0:
        noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    previous: tuple[Tensor, float] | None = None  # the last step's x0 estimate, and the level its step went down to
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        x0 = denoised if uncond is None else _uncond(uncond)  # the estimate the step integrates
        start = x if uncond is None else x + (denoised - x0)  # CFG++: its noise towards denoised is x0's
        if sigma_down == 0 or previous is None:
            x = euler_step(start, s[i], denoised, sigma_down)
        else:
            # With h = log(sigma / sigma_down), x0 taken linear in t = -log(sigma) through the previous estimate:
            # x' = e^-h x + h phi_1(-h) x0 - h phi_2(-h) (x0 - x0_prev) / c, where c = (t_prev - t) / h < 0 is
            # the previous estimate's offset in steps of h. ComfyUI takes that t at the previous step's sigma_down
            # rather than at sigma, which differs in ancestral steps only.
            old_x0, old_sigma_down = previous
            h = math.log(s[i] / sigma_down)
            offset = math.log(old_sigma_down / s[i - 1]) / h
            h_phi_1 = -math.expm1(-h)
            h_phi_2 = 1 - h_phi_1 / h
            x = linear_combination([(sigma_down / s[i], start), (h_phi_1 - h_phi_2 / offset, x0),
                                    (h_phi_2 / offset, old_x0)])
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * (s_noise * sigma_up)
        previous = x0, sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                         callback: Callback = None, disable: bool | None = None) -> Tensor:
    """RES, the refined exponential solver's second-order multistep method (Zhang, Song & Chen 2023, "Improved
    Order Analysis and Design of Exponential Integrator for Diffusion Models Sampling", arXiv:2308.02157), in
    x0 form and t = -log(sigma): x0 is extrapolated linearly through the previous estimate and integrated exactly
    with the phi functions. The first step and the step to sigma 0 are Euler steps (ComfyUI's choice). On a
    falling schedule this is DPM-Solver++(2M) with the "heun" correction of Lu et al. (2022)."""
    return _res_multistep(model, x, sigmas, extra_args, callback, 0.0, 1.0, None, None)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                                callback: Callback = None, disable: bool | None = None,
                                uncond: UncondCapture | None = None) -> Tensor:
    """RES multistep with CFG++ (Chung et al. 2024): the steps integrate the unconditional x0 from
    x + (x0_guided - x0_uncond). As in ComfyUI, the Euler steps end at x0_guided + (sigma'/sigma)(x - x0_uncond),
    while in the multistep ones that shift decays with x, so they keep only sigma'/sigma of the guidance."""
    uncond = uncond or UncondCapture()  # empty, not None: a call without one fails instead of running plain RES
    return _res_multistep(model, x, sigmas, extra_args, callback, 0.0, 1.0, None, uncond)


@torch.no_grad()
def sample_res_multistep_ancestral(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                                   callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                                   s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Ancestral RES multistep: each step goes down to sigma_down (`get_ancestral_step`) and adds fresh noise of
    sigma_up; eta 0 is `sample_res_multistep`."""
    return _res_multistep(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, None)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                                          callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                                          s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                                          uncond: UncondCapture | None = None) -> Tensor:
    """Ancestral RES multistep with CFG++ (`sample_res_multistep_cfg_pp`'s steps to sigma_down, then fresh noise)."""
    uncond = uncond or UncondCapture()
    return _res_multistep(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, uncond)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                                      callback: Callback = None, disable: bool | None = None, ge_gamma: float = 2.0,
                                      uncond: UncondCapture | None = None) -> Tensor:
    """Gradient estimation (Permenter & Yuan 2024, Algorithm 2) with CFG++ (Chung et al. 2024): the direction d is
    the unconditional one, (x - x0_uncond) / sigma; each step goes to x0_guided + sigma' d, then adds
    (gamma - 1)(sigma' - sigma)(d - d_previous) (`sample_gradient_estimation` with `uncond`)."""
    return sample_gradient_estimation(model, x, sigmas, extra_args, callback, disable, ge_gamma,
                                      uncond or UncondCapture())  # empty: a call without one fails, not plain


@torch.no_grad()
def sample_heunpp2(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
                   disable: bool | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                   s_tmax: float = float("inf"), s_noise: float = 1.0,
                   noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Heun++ (Carzit, sd-webui-samplers-scheduler, MIT; ComfyUI's heunpp2), in Karras et al.'s (2022) Algorithm 2.

    From x at sigma, Euler probes follow the schedule to its next level and, unless that one is the last, to the one
    after; the step to the next level then moves along a weighted mean of the derivatives met, a later one weighted
    by its level / (n * sigmas[0]) for n derivatives. The weights are empirical: not Heun's 1/2, so the method is
    first order, with a smaller error constant than Euler's. The last step is an Euler step."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = _call(model, x, sigma_hat, extra_args)
        _report(callback, i, x, s[i], sigma_hat, denoised)
        if s[i + 1] == s[-1]:
            x = euler_step(x, sigma_hat, denoised, s[i + 1])
            continue
        levels = [sigma_hat, *s[i + 1 : i + (2 if s[i + 2] == s[-1] else 3)]]
        derivatives = [to_d(x, sigma_hat, denoised)]
        probe = x
        for level_from, level in zip(levels, levels[1:], strict=False):
            probe = probe + derivatives[-1] * (level - level_from)
            derivatives.append(to_d(probe, level, _call(model, probe, level, extra_args)))
        later = [level / (len(levels) * s[0]) for level in levels[1:]]
        step = s[i + 1] - sigma_hat
        weights = [1 - sum(later), *later]
        x = linear_combination([(1.0, x), *((w * step, d) for w, d in zip(weights, derivatives, strict=True))])
    return x
