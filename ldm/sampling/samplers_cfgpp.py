"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
Models"): each step re-noises towards the next level along the unconditional prediction's noise instead of the
guided one's, which keeps samples near the data manifold; they are meant for small guidance scales (about 1-2).

They take k-diffusion's signature plus `uncond`, an `UncondCapture` the guider fills with the unconditional
x0 estimate at each model call (`ksampler.sample` wires it up).
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
    _report,
    euler_step,
    get_ancestral_step,
    unseeded_noise_sampler,
)


class UncondCapture:
    """Holds the unconditional x0 estimate of the latest model call (the guided one when there is none)."""

    value: Tensor | None = None

    def __call__(self, args, denoised: Tensor, _predict) -> Tensor:
        """A post-guidance function (`ldm.sampling.model_patches`) that records and changes nothing."""
        self.value = args.uncond if args.uncond is not None else args.cond
        return denoised


def _uncond(uncond: UncondCapture | None) -> Tensor:
    if uncond is None or uncond.value is None:
        raise ValueError("CFG++ samplers need the unconditional prediction: run them through ksampler.sample")
    return uncond.value


@torch.no_grad()
def sample_euler_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                        callback: Callback = None, disable: bool | None = None,
                        uncond: UncondCapture | None = None, alternative: bool = False) -> Tensor:
    """CFG++ with Euler steps (the paper's Algorithm 1 in sigma form): x' = x0_guided + sigma' * eps_uncond.
    `alternative` is ComfyUI's other form (SamplerEulerCFG++'s "alternative" version): an Euler step along
    (x - x0_guided + x0_uncond - x0_guided) / sigma."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if alternative:
            x = x + (x - 2 * denoised + _uncond(uncond)) * ((s[i + 1] - s[i]) / s[i])
        else:
            x = denoised + (x - _uncond(uncond)) * (s[i + 1] / s[i])
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                                  callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                                  s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                                  uncond: UncondCapture | None = None, flow: bool = False) -> Tensor:
    """CFG++ with ancestral Euler steps, as ComfyUI writes them in the half-log-SNR: with alpha the signal's scale (1;
    1 - sigma for a rectified-flow latent, `flow`), down to alpha_t sigma_down along the unconditional noise
    (x - alpha_s x0_uncond) / sigma, the ancestral step taken between sigma / alpha, then fresh noise of alpha_t
    sigma_up."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        alpha_s, alpha_t = (1 - s[i], 1 - s[i + 1]) if flow else (1.0, 1.0)
        d = (x - alpha_s * _uncond(uncond)) / s[i]
        if alpha_s > 0:
            sigma_down, sigma_up = get_ancestral_step(s[i] / alpha_s, s[i + 1] / alpha_t, eta)
        else:  # from pure noise (a flow's sigma 1: an infinite sigma / alpha), the whole step is noise at eta 1
            sigma_up = min(1.0, eta) * s[i + 1] / alpha_t
            sigma_down = (max((s[i + 1] / alpha_t) ** 2 - sigma_up**2, 0.0)) ** 0.5
        x = alpha_t * denoised + (alpha_t * sigma_down) * d
        if eta > 0 and s_noise > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * (alpha_t * s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                                     callback: Callback = None, disable: bool | None = None, eta: float = 1.0,
                                     s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                                     uncond: UncondCapture | None = None) -> Tensor:
    """DPM-Solver++(2S) ancestral steps with CFG++'s re-noising: both the half step and the full step start from
    x + (x0_guided - x0_uncond), the latent whose noise towards the guided x0 is the unconditional one."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        _report(callback, i, x, s[i], s[i], denoised)
        shifted = x + (denoised - _uncond(uncond))
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = (s[i] * sigma_down) ** 0.5  # half the step in log-sigma
            denoised_2 = _call(model, euler_step(shifted, s[i], denoised, sigma_mid), sigma_mid, extra_args)
            x = euler_step(shifted, s[i], denoised_2, sigma_down)
        if s[i + 1] > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                           callback: Callback = None, disable: bool | None = None,
                           uncond: UncondCapture | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) with CFG++'s re-noising: with h = log(sigma / sigma'),
    x' = x0_guided + e^-h (x - x0_uncond), plus the multistep correction
    (1 - e^-h) / (2r) (x0_guided - previous x0_uncond), r = h_previous / h (ComfyUI's formulation)."""
    s = sigmas.tolist()
    previous_uncond, h_last = None, None
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        current_uncond = _uncond(uncond)
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i] / s[i + 1])
        decay = math.exp(-h)  # = sigma' / sigma
        x = denoised + (x - current_uncond) * decay
        if previous_uncond is not None:
            x = x + (denoised - previous_uncond) * ((1 - decay) * h / (2 * h_last))
        previous_uncond, h_last = current_uncond, h
    return x
