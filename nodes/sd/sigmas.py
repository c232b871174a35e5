"""ComfyUI's Align Your Steps, GITS, Optimal Steps, Laplace and VP schedulers, sigma tools and AddNoise
(math: extra_schedules, step_schedules)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ldm.sampling import av_latent
from ldm.sampling.extra_schedules import (
    AYS_MODEL_TYPES,
    EXTEND_SPACINGS,
    added_noise_level,
    extend_intermediate_sigmas,
    sigmas_align_your_steps,
    sigmas_laplace,
    sigmas_vp,
)
from ldm.sampling.noise import prepare_noise
from ldm.sampling.step_schedules import (
    GITS_COEFF_MAX,
    GITS_COEFF_MIN,
    GITS_COEFF_STEP,
    OSS_MODEL_TYPES,
    gits_coeff_problem,
    sigmas_gits,
    sigmas_optimal_steps,
)
from nodes.node import Node
from nodes.sd.custom_sampling import SIGMA_MAX, SIGMA_MIN, NoiseSource, _sigmas_out
from nodes.sd.models import DiffusionModel
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket

# What ComfyUI's percent_to_sigma answers for 0%: a level above any model's, for "from the start" checks.
SIGMA_BEFORE_START = 999999999.9
# The largest x with exp(x) finite in float32: the VP schedule's first level is sqrt(e^x - 1).
FLOAT32_MAX_EXPONENT = math.log(torch.finfo(torch.float32).max)


def _numbers(inputs: dict, *names: str) -> list[float] | None:
    """The named inputs when all are given as numbers (constants), else None: a linked value is checked at run time."""
    values = [inputs.get(name) for name in names]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    return None


def _raise_if(problem: str | None) -> None:
    if problem:
        raise ValueError(problem)


class AlignYourStepsScheduler(Node):
    """NVIDIA's Align Your Steps schedules for SD1, SDXL and SVD (10 steps published; other counts interpolated in
    log-sigma). Denoise below 1 keeps that share of the steps, at the low-noise end."""

    category = "sampling/schedulers"
    model_type = Combo(AYS_MODEL_TYPES)
    steps = Int(10, min=1, max=10000)
    denoise = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("SIGMAS"),)

    def execute(self, model_type: str, steps: int, denoise: float) -> tuple[torch.Tensor]:
        return _sigmas_out(sigmas_align_your_steps(model_type, steps, denoise))


def _gits_problem(inputs: dict) -> str | None:
    coeff = _numbers(inputs, "coeff")
    return gits_coeff_problem(coeff[0]) if coeff else None


class GITSScheduler(Node):
    """Chen et al.'s GITS schedules for SD1.5, published for 2 to 20 steps at each cost coefficient (the 20-step
    one is stretched log-linearly for more). Denoise below 1 keeps that share of the steps, at the low-noise end."""

    category = "sampling/schedulers"
    coeff = Float(1.20, min=GITS_COEFF_MIN, max=GITS_COEFF_MAX, step=GITS_COEFF_STEP)
    steps = Int(10, min=2, max=1000)
    denoise = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("SIGMAS"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        return _gits_problem(inputs)

    def execute(self, coeff: float, steps: int, denoise: float) -> tuple[torch.Tensor]:
        return _sigmas_out(sigmas_gits(coeff, steps, denoise))


class OptimalStepsScheduler(Node):
    """Pei et al.'s Optimal Stepsize schedules for FLUX, Wan and Chroma (flow sigmas; other step counts than the
    published ones interpolated in log-sigma). Denoise below 1 keeps that share of the steps, at the low end."""

    category = "sampling/custom_sampling/schedulers"
    model_type = Combo(OSS_MODEL_TYPES)
    steps = Int(20, min=3, max=1000)
    denoise = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("SIGMAS"),)

    def execute(self, model_type: str, steps: int, denoise: float) -> tuple[torch.Tensor]:
        return _sigmas_out(sigmas_optimal_steps(model_type, steps, denoise))


def _laplace_problem(inputs: dict) -> str | None:
    numbers = _numbers(inputs, "sigma_min", "sigma_max")
    if numbers and not 0 <= numbers[0] < numbers[1]:
        return f"sigma_min ({numbers[0]}) must be below sigma_max ({numbers[1]})"
    beta = inputs.get("beta")
    if isinstance(beta, (int, float)) and beta <= 0:
        return f"beta must be above 0 (got {beta}): with no spread every level is e^mu"
    everything = _numbers(inputs, "steps", "sigma_max", "sigma_min", "mu", "beta")
    if everything is None:
        return None
    steps, sigma_max, sigma_min, mu, beta = everything
    sigmas = sigmas_laplace(int(steps), sigma_min, sigma_max, mu, beta)
    repeated = int((sigmas[1:] >= sigmas[:-1]).sum())
    if repeated:
        return (f"{repeated} of the {int(steps)} Laplace levels repeat the one before (clamped to sigma_max "
                f"{sigma_max} or sigma_min {sigma_min}), and samplers need a falling schedule: use fewer steps, "
                "a smaller beta, a mu nearer the middle of the range (log-sigma), or a wider range")
    return None


class LaplaceScheduler(Node):
    """Hang et al.'s Laplace schedule: log-sigma at the quantiles of a Laplace(mu, beta), most steps near e^mu.
    As in ComfyUI it ends at sigma_min, without a final 0."""

    category = "sampling/schedulers"
    steps = Int(20, min=1, max=10000)
    sigma_max = Float(SIGMA_MAX, min=0.0, max=5000.0, step=0.01, round=False)
    sigma_min = Float(SIGMA_MIN, min=0.0, max=5000.0, step=0.01, round=False)
    mu = Float(0.0, min=-10.0, max=10.0, step=0.1, round=False)
    beta = Float(0.5, min=0.0, max=10.0, step=0.1, round=False)
    outputs = (Output("SIGMAS"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        return _laplace_problem(inputs)

    def execute(self, steps: int, sigma_max: float, sigma_min: float, mu: float, beta: float) -> tuple[torch.Tensor]:
        _raise_if(_laplace_problem({"steps": steps, "sigma_max": sigma_max, "sigma_min": sigma_min, "mu": mu,
                                    "beta": beta}))
        return _sigmas_out(sigmas_laplace(steps, sigma_min, sigma_max, mu, beta))


def _vp_problem(inputs: dict) -> str | None:
    eps_s = inputs.get("eps_s")
    if isinstance(eps_s, (int, float)) and not 0 < eps_s < 1:
        return f"eps_s must be between 0 and 1, both excluded (got {eps_s}): t runs from 1 down to eps_s"
    betas = _numbers(inputs, "beta_d", "beta_min")
    if betas is None:
        return None
    beta_d, beta_min = betas
    if beta_d + beta_min <= 0:
        return "beta_d and beta_min are both 0: every level would be 0"
    if beta_d / 2 + beta_min >= FLOAT32_MAX_EXPONENT:
        return (f"the first level, sqrt(e^(beta_d / 2 + beta_min) - 1), overflows: beta_d / 2 + beta_min must stay "
                f"below {FLOAT32_MAX_EXPONENT:.1f} (got {beta_d / 2 + beta_min:g})")
    return None


class VPScheduler(Node):
    """The continuous variance-preserving schedule (Song et al. 2021) as noise levels, ending in 0."""

    category = "sampling/schedulers"
    steps = Int(20, min=1, max=10000)
    beta_d = Float(19.9, min=0.0, max=5000.0, step=0.01, round=False)
    beta_min = Float(0.1, min=0.0, max=5000.0, step=0.01, round=False)
    eps_s = Float(0.001, min=0.0, max=1.0, step=0.0001, round=False)
    outputs = (Output("SIGMAS"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        return _vp_problem(inputs)

    def execute(self, steps: int, beta_d: float, beta_min: float, eps_s: float) -> tuple[torch.Tensor]:
        _raise_if(_vp_problem({"beta_d": beta_d, "beta_min": beta_min, "eps_s": eps_s}))
        return _sigmas_out(sigmas_vp(steps, beta_d, beta_min, eps_s))


class SamplingPercentToSigma(Node):
    """The model's noise level at a point of sampling (0: the start, 1: the end). Without return_actual_sigma,
    0 and 1 give the values ComfyUI's range checks use (999999999.9 and 0) instead of sigma_max and sigma_min."""

    category = "sampling/sigmas"
    model = Socket("MODEL")
    sampling_percent = Float(0.0, min=0.0, max=1.0, step=0.0001)
    return_actual_sigma = Boolean(False, tooltip="Return the actual sigma value instead of the value used for "
                                                 "interval checks.\nThis only affects results at 0.0 and 1.0.")
    outputs = (Output("FLOAT", "sigma_value"),)

    def execute(self, model: DiffusionModel, sampling_percent: float, return_actual_sigma: bool) -> tuple[float]:
        schedule = model.schedule
        if return_actual_sigma and sampling_percent == 0.0:
            return (schedule.sigma_max,)
        if return_actual_sigma and sampling_percent == 1.0:
            return (schedule.sigma_min,)
        if sampling_percent <= 0.0:
            return (SIGMA_BEFORE_START,)
        return (schedule.sigma_at_percent(sampling_percent),)


class ExtendIntermediateSigmas(Node):
    """Splits each step starting between end_at_sigma and start_at_sigma (-1: no upper bound) into `steps` smaller
    ones, spaced linearly, or denser at the step's end (cosine) or start (sine)."""

    category = "sampling/sigmas"
    sigmas = Socket("SIGMAS")
    steps = Int(2, min=1, max=100)
    start_at_sigma = Float(-1.0, min=-1.0, max=20000.0, step=0.01, round=False)
    end_at_sigma = Float(12.0, min=0.0, max=20000.0, step=0.01, round=False)
    spacing = Combo(EXTEND_SPACINGS)
    outputs = (Output("SIGMAS"),)

    def execute(self, sigmas: torch.Tensor, steps: int, start_at_sigma: float, end_at_sigma: float,
                spacing: str) -> tuple[torch.Tensor]:
        return _sigmas_out(extend_intermediate_sigmas(sigmas, steps, start_at_sigma, end_at_sigma, spacing))


class AddNoise(Node):
    """Adds a NOISE to a latent at the schedule's level (|first - last| sigma; the only one of a one-level
    schedule), as the sampler would, so that a sampler given DisableNoise continues from it. An empty schedule
    leaves the latent as it is."""

    category = "experimental/custom_sampling/noise"
    model = Socket("MODEL")
    noise = Socket("NOISE")
    sigmas = Socket("SIGMAS")
    latent_image = Socket("LATENT")
    outputs = (Output("LATENT"),)

    def execute(self, model: DiffusionModel, noise: NoiseSource, sigmas: torch.Tensor,
                latent_image: dict) -> tuple[dict]:
        if not len(sigmas):
            return (latent_image,)
        samples = latent_image["samples"].to(torch.float32)
        # In the model's latent space (scaled), as the sampler adds its noise; LATENT stays unscaled. An
        # audio-video latent's parts are noised as the sampler noises them: packed, each part's noise in turn.
        parts = [model.latent_in(samples)]
        if av_latent.is_av(latent_image):
            parts.append(latent_image[av_latent.AUDIO_SAMPLES].to(torch.float32))
        packed = av_latent.pack(parts) if len(parts) > 1 else parts[0]
        shapes = av_latent.shapes_of(parts) if len(parts) > 1 else None
        if noise.enabled:
            drawn = prepare_noise(packed, noise.seed, latent_image.get("batch_index"), shapes)
        else:
            drawn = torch.zeros_like(packed)
        noisy = torch.nan_to_num(packed + drawn * added_noise_level(sigmas), nan=0.0, posinf=0.0, neginf=0.0)
        if shapes is None:
            return ({**latent_image, "samples": model.latent_out(noisy)},)
        video, audio = av_latent.unpack(noisy, shapes)
        return ({**latent_image, "samples": model.latent_out(video), av_latent.AUDIO_SAMPLES: audio},)


NODES: list[Any] = [
    AlignYourStepsScheduler, GITSScheduler, OptimalStepsScheduler, LaplaceScheduler, VPScheduler,
    SamplingPercentToSigma, ExtendIntermediateSigmas, AddNoise,
]
