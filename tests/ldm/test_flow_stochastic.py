"""ER-SDE, SEEDS-2, SEEDS-3, the exponential Heun on x0 and SA-Solver in their rectified-flow forms (ComfyUI's for
CONST models): a step against the formula written out, whole runs against the variance-exploding solver on the same
latent written x / alpha at levels sigma / alpha (the same SDE, so the same numbers from the same draws), SEEDS-2 at
eta 0 against DPM-Solver++(2S), ER-SDE's ODE at first order against Euler, SA-Solver against diffusers'
SASolverScheduler(use_flow_sigmas), and runs of a tiny random Flux through `ksampler.sample`."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

from ldm.sampling.ksampler import SAMPLERS
from ldm.sampling.samplers import sample_dpmpp_2s_ancestral, sample_euler
from ldm.sampling.samplers_stochastic import (
    er_sde_options,
    sa_solver_tau,
    sample_er_sde,
    sample_sa_solver,
    sample_seeds_2,
    sample_seeds_3,
)
from tests.ldm.test_flow_samplers import SIGMAS, draws, flow_model, flux_run, replay, start


def ve_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`flow_model` seen through x_ve = x / alpha at sigma_ve = sigma / alpha (alpha = 1 - sigma)."""
    sigma_flow = sigma / (1 + sigma)
    return flow_model(x * (1 - sigma_flow.reshape(-1, *([1] * (x.ndim - 1)))), sigma_flow)


def test_seeds_2_flow_step_follows_the_formula() -> None:
    """One SEEDS-2 (phi_2) step, with noise, written out in the flow's half-log-SNR."""
    x, noises = start(), draws(2)
    sigma, sigma_next, r, eta = 0.8, 0.5, 0.4, 0.7
    ours = sample_seeds_2(flow_model, x, torch.tensor([sigma, sigma_next], dtype=torch.float64), eta=eta,
                          s_noise=0.9, noise_sampler=replay(noises), r=r, solver_type="phi_2", flow=True)
    lam_s, lam_t = math.log((1 - sigma) / sigma), math.log((1 - sigma_next) / sigma_next)
    h = lam_t - lam_s
    sigma_1 = 1 / (1 + math.exp(lam_s + r * h))
    d0 = flow_model(x, torch.full((2,), sigma, dtype=torch.float64))
    hn = h * (1 + eta)
    x_1 = sigma_1 / sigma * math.exp(-r * h * eta) * x + (1 - sigma_1) * -math.expm1(-r * hn) * d0
    noise_1 = math.sqrt(-math.expm1(-2 * r * h * eta)) * noises[0]
    x_1 = x_1 + 0.9 * sigma_1 * noise_1
    d1 = flow_model(x_1, torch.full((2,), sigma_1, dtype=torch.float64))
    b2 = (math.expm1(-hn) + hn) / hn / r  # the phi_2 weight of SEEDS' second stage, over r
    b1 = -math.expm1(-hn) - b2
    expected = sigma_next / sigma * math.exp(-h * eta) * x + (1 - sigma_next) * (b1 * d0 + b2 * d1)
    noise = noise_1 * math.exp((r - 1) * h * eta) + math.sqrt(-math.expm1(2 * (r - 1) * h * eta)) * noises[1]
    expected = expected + 0.9 * sigma_next * noise
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("solver", "options", "calls"), [
    (sample_seeds_2, {}, 2),
    (sample_seeds_2, {"solver_type": "phi_2", "r": 1.0}, 2),
    (sample_seeds_3, {"eta": 0.6}, 3),
    (sample_sa_solver, {}, 1),
    (SAMPLERS["sa_solver_pece"], {}, 1),
    (sample_er_sde, {}, 1),
    (sample_er_sde, er_sde_options("Reverse-time SDE", max_stage=2, eta=0.5), 1),
])
def test_flow_run_is_the_ve_run_of_x_over_alpha(solver, options: dict, calls: int) -> None:
    """x = alpha x_ve at sigma = alpha sigma_ve, lambda unchanged: the flow run and the VE run of the same
    denoiser agree draw for draw, as the data-prediction solvers' exact linear part says they must."""
    x = start()
    steps = len(SIGMAS) - 2
    noises = draws(calls * steps)
    ve_sigmas = SIGMAS / (1 - SIGMAS)
    if solver in (sample_sa_solver, SAMPLERS["sa_solver_pece"]):  # noise from sigma 0.85 to 0.25, found by level
        tau = sa_solver_tau(0.85, 0.25, eta=0.9)
        options = {**options, "tau_func": tau}
        ve_options = {**options, "tau_func": lambda v: tau(v / (1 + v))}
    else:
        ve_options = options
    ours = solver(flow_model, x, SIGMAS, noise_sampler=replay(noises), flow=True, **options)
    ve = solver(ve_model, x / (1 - SIGMAS[0]), ve_sigmas, noise_sampler=replay(noises), **ve_options)
    torch.testing.assert_close(ours, ve, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours, solver(flow_model, x, SIGMAS, noise_sampler=replay(noises), **options))


def test_seeds_2_flow_without_noise_is_dpmpp_2s() -> None:
    x = start()
    ours = sample_seeds_2(flow_model, x, SIGMAS, eta=0.0, flow=True)
    torch.testing.assert_close(ours, sample_dpmpp_2s_ancestral(flow_model, x, SIGMAS, eta=0.0, flow=True),
                               rtol=1e-10, atol=1e-10)


def test_er_sde_flow_ode_at_first_order_is_euler() -> None:
    """Its exact step of x / alpha in sigma / alpha, linear in x0, is the flow's Euler step: x' = (sigma' / sigma) x
    + (1 - sigma' / sigma) x0 either way."""
    x = start()
    ours = sample_er_sde(flow_model, x, SIGMAS, flow=True, **er_sde_options("ODE", max_stage=1))
    torch.testing.assert_close(ours, sample_euler(flow_model, x, SIGMAS), rtol=1e-12, atol=1e-12)
    third = sample_er_sde(flow_model, x, SIGMAS, flow=True, **er_sde_options("ODE"))
    assert not torch.allclose(third, ours, atol=1e-3)


def test_seeds_3_flow_without_noise_is_third_order() -> None:
    """Halving the steps of a run in lambda cuts its error from a fine run about 8-fold."""
    x = start()
    lambdas = torch.linspace(math.log(0.1 / 0.9), math.log(0.9 / 0.1), 33, dtype=torch.float64)
    levels = torch.sigmoid(-lambdas)
    fine = sample_seeds_3(flow_model, x, levels, eta=0.0, flow=True)
    errors = [float((sample_seeds_3(flow_model, x, levels[::k], eta=0.0, flow=True) - fine).abs().max())
              for k in (8, 4)]
    assert 5 < errors[0] / errors[1] < 12


@pytest.mark.parametrize(("predictor_order", "corrector_order"), [(3, 4), (2, 2), (1, 3)])
def test_sa_solver_flow_matches_diffusers(predictor_order: int, corrector_order: int) -> None:
    """diffusers' SASolverScheduler on its flow levels (shift 3), x0 predictions, the same noise and tau (by the
    level a step ends at). Its flow schedule ends with a step of length 0 (the last level repeated), so both stop
    one level short of it; float32, its two-node steps with the paper's simplified weights as in the SD test."""
    scheduler = diffusers.SASolverScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="sample",
                                            predictor_order=predictor_order, corrector_order=corrector_order,
                                            lower_order_final=False)
    scheduler.set_timesteps(12)
    sigmas = scheduler.sigmas[:-1].clone()
    s, timesteps = sigmas.tolist(), scheduler.timesteps[:-1]
    tau_by_level = {s[i + 1]: float(scheduler.tau_func(t)) for i, t in enumerate(timesteps.tolist())}
    assert set(tau_by_level.values()) == {0.0, 1.0}

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        level = sigma.reshape(-1, 1, 1, 1)
        return 0.6 * (1 - level) * x + 0.1 * torch.tanh(x) * level

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected, generator = x, torch.Generator().manual_seed(5)
    for i, t in enumerate(timesteps):
        expected = scheduler.step(model(expected, sigmas[i : i + 1].repeat(2)), t, expected,
                                  generator=generator).prev_sample
    generator = torch.Generator().manual_seed(5)
    noises = {(s[i], s[i + 1]): torch.randn(2, 4, 8, 8, generator=generator) for i in range(len(s) - 1)}
    ours = sample_sa_solver(model, x, sigmas, tau_func=lambda v: tau_by_level[v],
                            noise_sampler=lambda a, b: noises[(a, b)], predictor_order=predictor_order,
                            corrector_order=corrector_order, simple_order_2=True, flow=True)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("sampler_name", ["seeds_2", "seeds_3", "exp_heun_2_x0_sde", "exp_heun_2_x0", "sa_solver",
                                          "sa_solver_pece", "er_sde"])
def test_flux_runs_with_seeds(sampler_name: str) -> None:
    out = flux_run(sampler_name, 11)
    assert torch.isfinite(out).all() and out.abs().max() < 50 and out.std() > 0.1
    assert torch.equal(out, flux_run(sampler_name, 11))
    if sampler_name != "exp_heun_2_x0":
        assert not torch.allclose(out, flux_run(sampler_name, 12), atol=0.05)


def test_flux_exp_heun_2_x0_sde_at_eta_0_is_exp_heun_2_x0() -> None:
    torch.testing.assert_close(flux_run("exp_heun_2_x0_sde", 11, eta=0.0), flux_run("exp_heun_2_x0", 11),
                               rtol=0, atol=0)
