"""Samplers against diffusers' schedulers, on the exact denoiser of Gaussian data, same noise.

diffusers steps the variance-preserving latent x_vp = x / sqrt(1 + sigma^2) by integer timestep
(DDIM, PNDM, DDPM, DPMSolverMultistep) or the sigma-space latent (Euler, Heun, KDPM2, LMS,
DPMSolverSDE); both sides are fed the same noise levels and the results compared in sigma space.
"""

from __future__ import annotations

import pytest
import torch

from ldm.sampling import DiscreteSchedule, samplers, samplers_ldm, unipc
from ldm.sampling.noise import BrownianTreeNoiseSampler, seeded_noise_sampler

diffusers = pytest.importorskip("diffusers")

SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
STEPS = 20


def gaussian_denoiser(mean: float = 0.3, std: float = 0.7):
    def model(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return mean + std**2 / (std**2 + s**2) * (x - mean)

    return model


D = gaussian_denoiser()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def unit_noise() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def eps_of(x_k: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x_k - D(x_k, torch.tensor([sigma]))) / sigma


def run_vp(scheduler, final_sigma: float, step_kwargs=lambda: {}) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timestep scheduler; returns (our-schedule sigmas, final x in sigma space)."""
    schedule = DiscreteSchedule(alphas_cumprod=scheduler.alphas_cumprod)
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps.tolist()
    levels = [float(schedule.sigmas[t]) for t in timesteps]
    x = unit_noise() * levels[0] / (1 + levels[0] ** 2) ** 0.5
    for t, sigma in zip(timesteps, levels, strict=True):
        x_k = x * (1 + sigma**2) ** 0.5
        x = scheduler.step(eps_of(x_k, sigma), t, x, **step_kwargs()).prev_sample
    unique = list(dict.fromkeys(levels))
    sigmas = torch.tensor([*unique, final_sigma])
    return sigmas, x * (1 + final_sigma**2) ** 0.5


def run_k(scheduler, current_sigma, generator=None, noise_sampler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a sigma-space scheduler; `current_sigma(scheduler)` is the level its model input has."""
    scheduler.set_timesteps(STEPS)
    if noise_sampler is not None:
        scheduler.noise_sampler = noise_sampler
    sigmas = torch.unique_consecutive(scheduler.sigmas)
    x = unit_noise() * sigmas[0]
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        sigma = float(current_sigma(scheduler))
        eps = eps_of(x_in * (1 + sigma**2) ** 0.5, sigma)
        x = (
            scheduler.step(eps, t, x, generator=generator).prev_sample
            if generator
            else scheduler.step(eps, t, x).prev_sample
        )
    return sigmas, x


def plain_sigma(s):
    return s.sigmas[s.step_index]


def test_ddim_eta0_matches_diffusers_ddim():
    scheduler = diffusers.DDIMScheduler(
        **SD_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    final = float(DiscreteSchedule(alphas_cumprod=scheduler.alphas_cumprod).sigmas[0])
    sigmas, expected = run_vp(scheduler, final)
    assert rel_err(samplers_ldm.sample_ddim(D, unit_noise() * sigmas[0], sigmas), expected) < 1e-5


def test_ddim_with_eta_matches_diffusers_ddim_given_the_same_noise():
    scheduler = diffusers.DDIMScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    noise = seeded_noise_sampler(unit_noise(), 9)
    sigmas, expected = run_vp(scheduler, 0.0, lambda: {"eta": 0.7, "variance_noise": noise(0, 0)})
    got = samplers_ldm.sample_ddim(
        D, unit_noise() * sigmas[0], sigmas, eta=0.7, noise_sampler=seeded_noise_sampler(unit_noise(), 9)
    )
    assert rel_err(got, expected) < 1e-5


def test_plms_matches_diffusers_pndm():
    scheduler = diffusers.PNDMScheduler(
        **SD_CONFIG, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1
    )
    sigmas, expected = run_vp(scheduler, 0.0)
    assert rel_err(samplers_ldm.sample_plms(D, unit_noise() * sigmas[0], sigmas), expected) < 1e-5


def test_ddpm_matches_diffusers_ddpm_given_the_same_noise():
    scheduler = diffusers.DDPMScheduler(**SD_CONFIG, clip_sample=False, variance_type="fixed_small")
    generator = torch.Generator().manual_seed(4)
    sigmas, expected = run_vp(scheduler, 0.0, lambda: {"generator": generator})
    got = samplers_ldm.sample_ddpm(
        D, unit_noise() * sigmas[0], sigmas, noise_sampler=seeded_noise_sampler(unit_noise(), 4)
    )
    assert rel_err(got, expected) < 1e-5


def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep():
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )
    sigmas, expected = run_vp(scheduler, 0.0)
    assert rel_err(samplers.sample_dpmpp_2m(D, unit_noise() * sigmas[0], sigmas), expected) < 1e-5


@pytest.mark.parametrize(
    "scheduler_cls, ours, current_sigma",
    [
        ("EulerDiscreteScheduler", samplers.sample_euler, plain_sigma),
        ("HeunDiscreteScheduler", samplers.sample_heun, plain_sigma),
        ("LMSDiscreteScheduler", samplers.sample_lms, plain_sigma),
        (
            "KDPM2DiscreteScheduler",
            samplers.sample_dpm_2,
            lambda s: s.sigmas[s.step_index] if s.state_in_first_order else s.sigmas_interpol[s.step_index],
        ),
    ],
)
def test_ode_samplers_match_diffusers(scheduler_cls, ours, current_sigma):
    scheduler = getattr(diffusers, scheduler_cls)(**SD_CONFIG)
    sigmas, expected = run_k(scheduler, current_sigma)
    assert rel_err(ours(D, unit_noise() * sigmas[0], sigmas), expected) < 1e-5


def test_euler_ancestral_matches_diffusers_given_the_same_noise():
    scheduler = diffusers.EulerAncestralDiscreteScheduler(**SD_CONFIG)
    sigmas, expected = run_k(scheduler, plain_sigma, generator=torch.Generator().manual_seed(6))
    got = samplers.sample_euler_ancestral(
        D, unit_noise() * sigmas[0], sigmas, noise_sampler=seeded_noise_sampler(unit_noise(), 6)
    )
    assert rel_err(got, expected) < 1e-5


def test_dpmpp_sde_matches_diffusers_dpm_solver_sde_given_the_same_noise():
    scheduler = diffusers.DPMSolverSDEScheduler(**SD_CONFIG)
    sigmas, expected = run_k(
        scheduler,
        lambda s: s.sigmas[s.step_index] if s.state_in_first_order else s.mid_point_sigma,
        noise_sampler=seeded_noise_sampler(unit_noise(), 11),
    )
    got = samplers.sample_dpmpp_sde(
        D, unit_noise() * sigmas[0], sigmas, noise_sampler=seeded_noise_sampler(unit_noise(), 11)
    )
    assert rel_err(got, expected) < 1e-5


def test_dpmpp_sde_with_the_same_brownian_tree_seed_stays_close_to_diffusers():
    # Both query one seeded torchsde tree; diffusers computes the query times in float32, which
    # moves the increments by ~1e-5, so this end-to-end check is looser than the others.
    scheduler = diffusers.DPMSolverSDEScheduler(**SD_CONFIG, noise_sampler_seed=11)
    sigmas, expected = run_k(
        scheduler, lambda s: s.sigmas[s.step_index] if s.state_in_first_order else s.mid_point_sigma
    )
    x = unit_noise() * sigmas[0]
    positive = sigmas[sigmas > 0]
    noise = BrownianTreeNoiseSampler(x, float(positive.min()), float(positive.max()), seed=11)
    assert rel_err(samplers.sample_dpmpp_sde(D, x, sigmas, noise_sampler=noise), expected) < 1e-3


@pytest.mark.parametrize(
    "variant, final", [("bh1", "sigma_min"), ("bh2", "sigma_min"), ("bh2", "zero")]
)  # diffusers' bh1 turns NaN on a final step to sigma 0, so that case is checked with bh2 only
def test_uni_pc_matches_diffusers_unipc(variant, final):
    scheduler = diffusers.UniPCMultistepScheduler(
        **SD_CONFIG, solver_order=3, solver_type=variant, predict_x0=True, final_sigmas_type=final
    )
    last = (
        0.0 if final == "zero" else float(DiscreteSchedule(alphas_cumprod=scheduler.alphas_cumprod).sigmas[0])
    )
    sigmas, expected = run_vp(scheduler, last)
    got = unipc.sample_uni_pc(D, unit_noise() * sigmas[0], sigmas, variant=variant)
    assert rel_err(got, expected) < 1e-5
