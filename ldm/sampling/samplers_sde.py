"""Multistep SDE samplers (DPM-Solver++ 2M/3M SDE) and consistency-model (LCM) sampling."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.sampling.noise import NoiseSampler
from ldm.sampling.samplers import (
    Callback,
    Model,
    _brownian,
    _call,
    _report,
    half_log_snr,
    linear_combination,
    unseeded_noise_sampler,
)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    solver_type: str = "midpoint",
    seed: int | None = None,
    flow: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", section 5; k-diffusion's variant),
    with Brownian tree noise; `solver_type` 'midpoint' or 'heun' picks the second-order correction.
    `flow`: a rectified-flow latent, stepped in its half-log-SNR with its signal scale alpha = 1 - sigma."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    s = sigmas.tolist()
    noise_sampler = _brownian(x, s, noise_sampler, seed)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            h = None
        else:
            h = half_log_snr(s[i + 1], flow) - half_log_snr(s[i], flow)
            alpha = 1 - s[i + 1] if flow else 1.0
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            # x' = a x + alpha (phi denoised + c (denoised - old_denoised)) + noise, as one weighted sum
            c = 0.0
            if old_denoised is not None:
                r = h_last / h
                c = ((phi / (-h - eta_h) + 1) / r) if solver_type == "heun" else (0.5 * phi / r)
            terms = [(s[i + 1] / s[i] * math.exp(-eta_h), x), (alpha * (phi + c), denoised)]
            if c:
                terms.append((-alpha * c, old_denoised))
            if eta:
                noise_scale = s[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
                terms.append((noise_scale, noise_sampler(s[i], s[i + 1])))
            x = linear_combination(terms)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    seed: int | None = None,
    flow: bool = False,
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion): third-order multistep in log-sigma, Brownian tree noise (`flow`: as in
    `sample_dpmpp_2m_sde`)."""
    s = sigmas.tolist()
    noise_sampler = _brownian(x, s, noise_sampler, seed)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        h = None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = half_log_snr(s[i + 1], flow) - half_log_snr(s[i], flow)
            alpha = 1 - s[i + 1] if flow else 1.0
            h_eta = h * (eta + 1)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            # k-diffusion's x' = (sigma' / sigma) exp(-h eta) x + alpha (-expm1(-h_eta) denoised + phi_2 d1 - phi_3 d2)
            # with d1 = d1_0 + q (d1_0 - d1_1), d2 = (d1_0 - d1_1) / (r0 + r1), d1_0 = (denoised - denoised_1) / r0,
            # d1_1 = (denoised_1 - denoised_2) / r1: expanded into one weighted sum of x and the three x0s.
            c0 = c1 = 0.0  # the weights of d1_0 and d1_1
            r0 = r1 = 1.0
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                q, phi_3 = r0 / (r0 + r1), phi_2 / h_eta - 0.5
                c0 = phi_2 * (1 + q) - phi_3 / (r0 + r1)
                c1 = -phi_2 * q + phi_3 / (r0 + r1)
            elif h_1 is not None:
                r0, c0 = h_1 / h, phi_2
            terms = [(s[i + 1] / s[i] * math.exp(-h * eta), x), (alpha * (-math.expm1(-h_eta) + c0 / r0), denoised)]
            if h_1 is not None:
                terms.append((alpha * (-c0 / r0 + c1 / r1), denoised_1))
            if h_2 is not None:
                terms.append((-alpha * c1 / r1, denoised_2))
            if eta:
                noise_scale = s[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise
                terms.append((noise_scale, noise_sampler(s[i], s[i + 1])))
            x = linear_combination(terms)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_lcm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
    flow: bool = False,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; Luo et al. 2023, LCM):
    jump to the model's x0 estimate, then re-noise it to the next level with fresh noise (`flow`: mixed in as a
    rectified-flow latent, sigma' noise + (1 - sigma') x0)."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        x = denoised
        if s[i + 1] > 0:
            x = torch.add(x * (1 - s[i + 1]) if flow else x, noise_sampler(s[i], s[i + 1]), alpha=s[i + 1])
    return x
