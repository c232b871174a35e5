"""The ancestral, SDE and consistency samplers in their rectified-flow forms (ComfyUI's for CONST models): steps against
the formulas written out here and against diffusers' flow schedulers, eta 0 against the deterministic samplers, and
whole runs of a tiny random Flux through `ksampler.sample`."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from ldm.sampling import sample
from ldm.sampling.flow import FlowSchedule
from ldm.sampling.ksampler import _brownian_queries
from ldm.sampling.samplers import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
)
from ldm.sampling.samplers_sde import sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_lcm
from tests.ldm.flux_reference import TINY, random_flux

SIGMAS = torch.tensor([0.95, 0.8, 0.62, 0.45, 0.3, 0.15, 0.0], dtype=torch.float64)


def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a flow model's velocity."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * x + torch.sin(3 * s) * torch.cos(x) - 0.2


def flow_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The denoiser of `velocity`: x0 = x - sigma v."""
    return x - sigma.reshape(-1, *([1] * (x.ndim - 1))) * velocity(x, sigma)


def draws(count: int, seed: int = 7, shape: tuple[int, ...] = (2, 3, 4, 4)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(count)]


def replay(noises: list[torch.Tensor]):
    """A noise sampler that hands out `noises` in order, and counts its calls."""
    queue = list(noises)

    def noise_sampler(sigma: float, sigma_next: float) -> torch.Tensor:
        noise_sampler.calls += 1
        noise_sampler.queries.append((sigma, sigma_next))
        return queue.pop(0)

    noise_sampler.calls, noise_sampler.queries = 0, []
    return noise_sampler


def start(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_euler_ancestral_rf_steps_follow_the_formula(eta: float) -> None:
    x, noises = start(), draws(len(SIGMAS))
    ours = sample_euler_ancestral(flow_model, x, SIGMAS, eta=eta, s_noise=0.9, noise_sampler=replay(noises),
                                  flow=True)
    levels = SIGMAS.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:], strict=False)):
        x0 = x - sigma * velocity(x, torch.full((2,), sigma, dtype=torch.float64))
        if sigma_next == 0:
            x = x0
            continue
        sigma_down = sigma_next - eta * sigma_next * (sigma - sigma_next) / sigma
        x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * x0  # down to sigma_down along the straight line
        alpha_ratio = (1 - sigma_next) / (1 - sigma_down)  # back up to sigma_next: scale the signal, add noise
        x = alpha_ratio * x + 0.9 * noises[i] * math.sqrt(sigma_next**2 - (alpha_ratio * sigma_down) ** 2)
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_rf_ancestral_step_lands_on_the_next_level(eta: float) -> None:
    """With the true x0, a step from (1 - s) x0 + s n leaves (1 - s') x0 plus noise of standard deviation s'."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 256, 256, generator=generator, dtype=torch.float64)
    x = 0.3 * x0 + 0.7 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    step = torch.tensor([0.7, 0.4], dtype=torch.float64)
    out = sample_euler_ancestral(lambda x, sigma: x0, x, step, eta=eta, flow=True,
                                 noise_sampler=lambda s, t: torch.randn(x0.shape, generator=generator,
                                                                        dtype=torch.float64))
    assert float((out - 0.6 * x0).std()) == pytest.approx(0.4, rel=5e-3)
    assert abs(float(((out - 0.6 * x0) * x0).mean())) < 5e-3  # the noise left is independent of x0


def test_ancestral_samplers_at_eta_0_are_their_deterministic_ones() -> None:
    x = start()
    for ancestral, deterministic in [(sample_euler_ancestral, sample_euler), (sample_dpm_2_ancestral, sample_dpm_2)]:
        expected = deterministic(flow_model, x, SIGMAS)
        assert torch.equal(ancestral(flow_model, x, SIGMAS, eta=0.0, noise_sampler=replay(draws(9)), flow=True),
                           expected)


def test_dpmpp_2s_ancestral_rf_steps_follow_the_formula() -> None:
    """DPM-Solver++(2S) in the flow's half-log-SNR lambda = log((1 - s) / s); at eta 0 it draws no noise."""
    x, sigmas = start(), torch.cat([torch.tensor([1.0], dtype=torch.float64), SIGMAS])
    noise_sampler = replay([])
    ours = sample_dpmpp_2s_ancestral(flow_model, x, sigmas, eta=0.0, noise_sampler=noise_sampler, flow=True)
    levels = sigmas.tolist()
    for sigma, sigma_next in zip(levels, levels[1:], strict=False):
        x0 = flow_model(x, torch.full((2,), sigma, dtype=torch.float64))
        if sigma_next == 0:
            x = x0
            continue
        # The midpoint in lambda (just below 1 at pure noise, where lambda is -inf), then the step from its x0.
        lam = (math.log((1 - sigma) / sigma) + math.log((1 - sigma_next) / sigma_next)) / 2 if sigma < 1 else None
        sigma_mid = 0.9999 if lam is None else 1 / (math.exp(lam) + 1)
        x_mid = (sigma_mid / sigma) * x + (1 - sigma_mid / sigma) * x0
        x0_mid = flow_model(x_mid, torch.full((2,), sigma_mid, dtype=torch.float64))
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * x0_mid
    assert noise_sampler.calls == 0
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)


def test_dpmpp_2s_ancestral_rf_renoises_as_euler_ancestral() -> None:
    """Its noise step is euler_ancestral's: a one-step run to a level, with the same draw, differs only in x0."""
    x, step, noise = start(), torch.tensor([0.6, 0.3], dtype=torch.float64), draws(1)
    constant = torch.full_like(x, 0.25)
    ours = sample_dpmpp_2s_ancestral(lambda x, s: constant, x, step, noise_sampler=replay(noise), flow=True)
    expected = sample_euler_ancestral(lambda x, s: constant, x, step, noise_sampler=replay(noise), flow=True)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_dpmpp_sde_rf_steps_follow_the_formula(eta: float) -> None:
    """DPM-Solver++ SDE in the flow's half-log-SNR lambda, alpha = 1 - sigma (ComfyUI's form for CONST models)."""
    x, noises, r = start(), draws(2 * len(SIGMAS)), 0.4
    noise_sampler = replay(noises)
    ours = sample_dpmpp_sde(flow_model, x, SIGMAS, eta=eta, s_noise=0.8, r=r, noise_sampler=noise_sampler, flow=True)

    def lam(sigma: float) -> float:
        return math.log((1 - sigma) / sigma)

    def ancestral(sigma_from: float, sigma_to: float) -> tuple[float, float]:
        up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
        return math.sqrt(sigma_to**2 - up**2), up

    levels, drawn = SIGMAS.tolist(), iter(noises)
    for sigma, sigma_next in zip(levels, levels[1:], strict=False):
        x0 = flow_model(x, torch.full((2,), sigma, dtype=torch.float64))
        if sigma_next == 0:
            x = x0
            continue
        lam_s, lam_t = lam(sigma), lam(sigma_next)
        lam_1 = lam_s + r * (lam_t - lam_s)
        sigma_1 = 1 / (1 + math.exp(lam_1))
        a_s, a_1, a_t = 1 - sigma, 1 - sigma_1, 1 - sigma_next
        down, up = ancestral(math.exp(-lam_s), math.exp(-lam_1))
        h = -math.log(down) - lam_s
        x_2 = (a_1 / a_s) * math.exp(-h) * x - a_1 * math.expm1(-h) * x0 + a_1 * 0.8 * up * next(drawn)
        x0_2 = flow_model(x_2, torch.full((2,), sigma_1, dtype=torch.float64))
        down, up = ancestral(math.exp(-lam_s), math.exp(-lam_t))
        h = -math.log(down) - lam_s
        blend = (1 - 1 / (2 * r)) * x0 + 1 / (2 * r) * x0_2
        x = (a_t / a_s) * math.exp(-h) * x - a_t * math.expm1(-h) * blend + a_t * 0.8 * up * next(drawn)
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)
    # With noise, the KSampler asks its Brownian tree for the same (sigma, sigma_next) pairs, ahead of the run.
    if eta:
        assert noise_sampler.queries == _brownian_queries("dpmpp_sde", levels, {"eta": eta, "r": r, "flow": True})


def _diffusers_dpmpp_2m(sigmas: torch.Tensor, x: torch.Tensor, noises: list[torch.Tensor] | None,
                        solver_type: str) -> torch.Tensor:
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2, lower_order_final=False,
        algorithm_type="sde-dpmsolver++" if noises else "dpmsolver++", solver_type=solver_type)
    scheduler.set_timesteps(len(sigmas) - 1)
    scheduler.sigmas = sigmas.clone()  # the levels under test, with the timesteps the model never sees
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(x, torch.full((2,), float(sigmas[i]), dtype=torch.float64))
        x = scheduler.step(v, t, x, variance_noise=noises[i] if noises else None).prev_sample
    return x


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_2m_sde_rf_matches_diffusers_flow_dpm_solver(eta: float, solver_type: str) -> None:
    x, noises = start(), draws(len(SIGMAS))
    ours = sample_dpmpp_2m_sde(flow_model, x, SIGMAS, eta=eta, noise_sampler=replay(noises), solver_type=solver_type,
                               flow=True)
    expected = _diffusers_dpmpp_2m(SIGMAS, x, noises if eta else None, solver_type)
    assert (ours - x).abs().mean() > 0.1
    torch.testing.assert_close(ours, expected.double(), rtol=1e-5, atol=1e-5)  # diffusers steps in float32


def test_sde_samplers_first_order_step_at_eta_0_is_euler() -> None:
    """In the flow's lambda the first-order exponential step is the straight Euler step (DDIM)."""
    x, step = start(), torch.tensor([0.8, 0.5, 0.0], dtype=torch.float64)
    expected = sample_euler(flow_model, x, step[:2])
    for sampler in (sample_dpmpp_2m_sde, sample_dpmpp_3m_sde):
        torch.testing.assert_close(sampler(flow_model, x, step[:2], eta=0.0, flow=True), expected,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_3m_sde_rf_over_three_steps_is_2m_sde_heun(eta: float) -> None:
    """Three steps leave 3M SDE no room for its third order: its second-order step is 2M SDE's Heun one."""
    x, sigmas, noises = start(), torch.tensor([0.9, 0.6, 0.3, 0.0], dtype=torch.float64), draws(3)
    ours = sample_dpmpp_3m_sde(flow_model, x, sigmas, eta=eta, noise_sampler=replay(noises), flow=True)
    expected = sample_dpmpp_2m_sde(flow_model, x, sigmas, eta=eta, noise_sampler=replay(noises), solver_type="heun",
                                   flow=True)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_lcm_rf_matches_diffusers_stochastic_flow_match_euler() -> None:
    """FlowMatchEulerDiscreteScheduler(stochastic_sampling=True): x0, re-noised to the next level with fresh noise."""
    x = start().float()
    steps = len(SIGMAS) - 1
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = SIGMAS.float().clone()
    expected = x
    generator = torch.Generator().manual_seed(4)
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(expected, torch.full((2,), float(SIGMAS[i])))
        expected = scheduler.step(v, t, expected, generator=generator).prev_sample
    ours_generator = torch.Generator().manual_seed(4)
    ours = sample_lcm(flow_model, x, SIGMAS.float(), flow=True,
                      noise_sampler=lambda s, t: torch.randn(x.shape, generator=ours_generator))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def flux_run(sampler_name: str, seed: int, **options) -> torch.Tensor:
    model = random_flux()
    generator = torch.Generator().manual_seed(5)
    context = torch.randn(1, 7, TINY.context_dim, generator=generator)
    y = torch.cat([torch.randn(1, TINY.vec_in_dim, generator=generator), torch.tensor([[3.5]])], dim=1)
    positive = [(context, {"y": y})]
    with torch.no_grad():
        return sample(model, FlowSchedule(1.15), torch.zeros(1, 16, 6, 8), seed=seed, steps=5, cfg=1.0,
                      sampler_name=sampler_name, scheduler="simple", positive=positive, negative=positive,
                      prediction="flow", sampler_options=options or None)


def test_flux_euler_ancestral_run_is_reproducible_and_at_eta_0_is_euler() -> None:
    first, again, other = flux_run("euler_ancestral", 11), flux_run("euler_ancestral", 11), flux_run(
        "euler_ancestral", 12)
    assert torch.equal(first, again) and not torch.allclose(first, other, atol=0.1)
    euler = flux_run("euler", 11)
    assert torch.isfinite(first).all() and first.abs().max() < 10 * max(1.0, float(euler.abs().max()))
    assert not torch.allclose(first, euler, atol=0.05)  # its fresh noise changed the result
    torch.testing.assert_close(flux_run("euler_ancestral", 11, eta=0.0), euler, rtol=0, atol=0)


@pytest.mark.parametrize("sampler_name", ["dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
                                          "dpmpp_2m_sde_gpu",
                                          "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "lcm", "euler_ancestral_cfg_pp"])
def test_flux_runs_with_rf_samplers(sampler_name: str) -> None:
    """The SDE ones start at sigma 1, where the flow's log-SNR is infinite: they begin just below it, as ComfyUI's."""
    out = flux_run(sampler_name, 11)
    assert torch.isfinite(out).all() and out.abs().max() < 50 and out.std() > 0.1
    assert torch.equal(out, flux_run(sampler_name, 11))


@pytest.mark.parametrize("sampler_name", ["res_multistep_ancestral", "ddpm"])
def test_samplers_without_a_flow_form_are_refused(sampler_name: str) -> None:
    with pytest.raises(ValueError, match=f"{sampler_name} adds noise as SD models take it.*euler_ancestral"):
        flux_run(sampler_name, 0)
