"""The samplers of the original Stable Diffusion code (DDPM, DDIM, PLMS), restated in sigma space.

LDM's samplers step the variance-preserving latent `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`
between timesteps. Dividing by `sqrt(a_t)` turns it into `x = x0 + sigma eps` with
`sigma = sqrt((1 - a_t) / a_t)`, the form every sampler here works in, and `eps = (x - x0) / sigma`
is the sigma-ODE derivative `to_d`. With the sigmas of LDM's timesteps (the `ddim_uniform`
scheduler, whose final level would be `sigma_min` rather than 0 in LDM), these functions give
LDM's / diffusers' results up to rounding:
- DDIMSampler(eta): x' = x0 + sigma_down eps + sigma_up z, which is exactly an ancestral Euler
  step with the same eta (eta = 0: a plain Euler step).
- PLMSSampler: the same deterministic DDIM update, with eps replaced by an Adams-Bashforth
  combination of past eps values (pseudo linear multistep); the first step is improved Euler.
- DDPM ancestral sampling: the posterior mean of q(x_{t'} | x_t, x0) plus the posterior
  standard deviation (the "fixed small" variance) times fresh noise, generalised to skipping steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.sampling.noise import NoiseSampler
from ldm.sampling.samplers import (
    Callback,
    Model,
    _call,
    _report,
    euler_step,
    linear_combination,
    sample_euler_ancestral,
    to_d,
    unseeded_noise_sampler,
)

# Adams-Bashforth weights on eps for 2, 3 and 4 known values, newest first (Liu et al. 2022, eq. 12).
_PLMS_WEIGHTS = {2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) with stochasticity eta."""
    return sample_euler_ancestral(
        model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler
    )


@torch.no_grad()
def sample_plms(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
) -> Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical
    Methods for Diffusion Models on Manifolds"), as in LDM's PLMSSampler; steps + 1 model calls."""
    s = sigmas.tolist()
    history: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        d = to_d(x, s[i], denoised)
        _report(callback, i, x, s[i], s[i], denoised)
        dt = s[i + 1] - s[i]
        if history:
            # x + dt * (w0 d + w1 d_-1 + ...), the Adams-Bashforth combination
            weights = _PLMS_WEIGHTS[len(history) + 1]
            known = [d, *reversed(history)]
            x = linear_combination([(1.0, x), *((w * dt, old) for w, old in zip(weights, known, strict=True))])
        elif s[i + 1] > 0:
            # Improved Euler for the first step: average eps at both ends.
            x_2 = euler_step(x, s[i], denoised, s[i + 1])
            d_2 = to_d(x_2, s[i + 1], _call(model, x_2, s[i + 1], extra_args))
            x = linear_combination([(1.0, x), (dt / 2, d), (dt / 2, d_2)])
        else:
            x = euler_step(x, s[i], denoised, s[i + 1])
        history = [*history[-2:], d]
    return x


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2), from the posterior of each step."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        sigma, sigma_next = s[i], s[i + 1]
        a, a_next = 1 / (sigma**2 + 1), 1 / (sigma_next**2 + 1)
        alpha = a / a_next  # the product of (1 - beta) over the skipped timesteps
        # In DDPM's variance-preserving terms: x_vp' = (sqrt(a) x - (1 - alpha) / sqrt(1 - a) eps) / sqrt(alpha)
        # + std noise, with eps = (x - denoised) / sigma; back to sigma space over sqrt(a_next). Linear in
        # x, denoised and the noise, so it is one weighted sum.
        eps_scale = (1 - alpha) / (1 - a) ** 0.5 / sigma
        out_scale = 1 / a_next**0.5 if sigma_next > 0 else 1.0
        terms = [((a**0.5 - eps_scale) / alpha**0.5 * out_scale, x), (eps_scale / alpha**0.5 * out_scale, denoised)]
        if sigma_next > 0:
            std = ((1 - alpha) * (1 - a_next) / (1 - a)) ** 0.5
            terms.append((std * out_scale, noise_sampler(sigma, sigma_next)))
        x = linear_combination(terms)
    return x
