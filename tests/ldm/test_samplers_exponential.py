"""DEIS, RES multistep (plain, ancestral, CFG++), gradient estimation CFG++ and Heun++.

Checked against the exact probability-flow ODE solution for Gaussian data (convergence at the expected order),
single steps derived by hand, and the identities between samplers. RES multistep is DPM-Solver++(2M) with the
"heun" correction, so it is also compared with diffusers' DPMSolverMultistepScheduler. diffusers' DEIS scheduler is
not ComfyUI's DEIS: it interpolates the noise in log(sigma), where ComfyUI's tAB interpolates in VP time, so the two
agree only at order 1 (an Euler step); DEIS's weights are checked against scipy's quadrature of their definition.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from ldm.sampling import DiscreteSchedule, get_sigmas, ksampler, sample, samplers
from ldm.sampling.samplers_cfgpp import UncondCapture
from ldm.sampling.samplers_exponential import (
    deis_weights,
    sample_deis,
    sample_gradient_estimation_cfg_pp,
    sample_heunpp2,
    sample_res_multistep,
    sample_res_multistep_ancestral,
    sample_res_multistep_ancestral_cfg_pp,
    sample_res_multistep_cfg_pp,
    vp_time,
)
from ldm.sampling.samplers_multistep import sample_gradient_estimation
from tests.ldm.test_samplers_multistep import exact, gaussian_denoiser

KARRAS = get_sigmas("karras", DiscreteSchedule(), 20).tolist()


def _error(sampler, steps: int, **kwargs) -> float:
    """Relative error of a run from sigma 10 to 0.05 against the exact ODE solution."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    sigmas = torch.tensor(np.geomspace(10.0, 0.05, steps + 1))
    out = sampler(gaussian_denoiser, x, sigmas, **kwargs)
    return float((out - exact(x, 10.0, 0.05)).abs().max() / exact(x, 10.0, 0.05).abs().max())


def _d(x, sigma: float):
    return (x - gaussian_denoiser(x, torch.tensor(sigma))) / sigma


def _x0(x, sigma: float):
    return gaussian_denoiser(x, torch.tensor(sigma))


def _guided_model(uncond_scale: float | None):
    """A stand-in guided denoiser, x0 = 0.5 x + 0.1 sin(x), recording an unconditional x0 (`uncond_scale` x, or the
    guided one itself for None) as the guider does."""
    capture = UncondCapture()

    def model(x, sigma):
        denoised = 0.5 * x + 0.1 * torch.sin(x)
        capture.value = denoised if uncond_scale is None else uncond_scale * x
        return denoised

    return model, capture


def _constant_noise(x):
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    return lambda sigma, sigma_next: noise


def _x(dtype=torch.float64):
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype) * 4


# DEIS


def test_vp_time_spans_deis_schedule():
    """sigma 0.002 at t = 1e-3 and sigma 80 at t = 1, increasing in between."""
    assert vp_time(0.002) == pytest.approx(1e-3, rel=1e-9)
    assert vp_time(80.0) == pytest.approx(1.0, rel=1e-12)
    times = [vp_time(s) for s in reversed(KARRAS[:-1])]
    assert all(a < b for a, b in zip(times, times[1:], strict=False))


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("i", [3, 10, 18])
def test_deis_weights_integrate_the_lagrange_polynomials_in_vp_time(order, i):
    """sum_j w_j p(t_j) = integral of p(t(sigma)) d sigma over the step, for p each Lagrange basis polynomial on the
    history's VP times: scipy integrates over sigma directly, a change of variables from how the weights are made.
    ComfyUI's 10,000-point quadrature is within 1e-4 of it."""
    levels, target = KARRAS[i::-1][:order], KARRAS[i + 1]
    nodes = [vp_time(level) for level in levels]
    expected = []
    for j, node in enumerate(nodes):
        def basis(sigma, j=j, node=node):
            return math.prod((vp_time(sigma) - other) / (node - other) for k, other in enumerate(nodes) if k != j)

        expected.append(integrate.quad(basis, levels[0], target, epsabs=0, epsrel=1e-12)[0])
    assert deis_weights(levels, target) == pytest.approx(expected, rel=1e-4)
    assert sum(deis_weights(levels, target)) == pytest.approx(target - levels[0], rel=1e-5)


def test_deis_order_1_is_euler():
    x = _x()
    sigmas = torch.tensor(KARRAS, dtype=torch.float64)
    torch.testing.assert_close(sample_deis(gaussian_denoiser, x, sigmas, max_order=1),
                               samplers.sample_euler(gaussian_denoiser, x, sigmas))


def test_deis_first_steps_by_hand():
    """An Euler step, then the order-2 weights on the newest and the previous derivative; the step to 0 is x0."""
    x = _x()
    s = [4.0, 2.0, 1.0, 0.0]
    calls = []

    def model(x_in, sigma):
        calls.append(x_in)
        return gaussian_denoiser(x_in, sigma)

    out = sample_deis(model, x, torch.tensor(s, dtype=torch.float64))
    x1 = x + (s[1] - s[0]) * _d(x, s[0])
    w_new, w_old = deis_weights([s[1], s[0]], s[2])
    x2 = x1 + w_new * _d(x1, s[1]) + w_old * _d(x, s[0])
    torch.testing.assert_close(calls[1], x1)
    torch.testing.assert_close(calls[2], x2)
    torch.testing.assert_close(out, _x0(x2, s[2]))


def test_deis_converges_at_its_order():
    """Error at 10 and 40 steps: order 2 falls over 10x (16x ideally), order 3 over 30x (64x), both below Euler."""
    euler = _error(samplers.sample_euler, 40)
    second = [_error(sample_deis, n, max_order=2) for n in (10, 40)]
    third = [_error(sample_deis, n) for n in (10, 40)]
    assert second[0] / second[1] > 10
    assert third[0] / third[1] > 30
    assert third[1] < second[1] / 5 < euler / 50


# RES multistep


def test_res_multistep_matches_diffusers_dpm_solver_2m_heun():
    diffusers = pytest.importorskip("diffusers")
    from tests.ldm.test_sampling_diffusers import SD_CONFIG, D, rel_err, run_vp, unit_noise

    scheduler = diffusers.DPMSolverMultistepScheduler(
        **SD_CONFIG, algorithm_type="dpmsolver++", solver_order=2, solver_type="heun", final_sigmas_type="zero"
    )
    sigmas, expected = run_vp(scheduler, 0.0)
    assert rel_err(sample_res_multistep(D, unit_noise() * sigmas[0], sigmas), expected) < 1e-5
    # and not the midpoint correction of dpmpp_2m
    assert rel_err(samplers.sample_dpmpp_2m(D, unit_noise() * sigmas[0], sigmas), expected) > 1e-3


def test_res_multistep_is_second_order():
    errors = [_error(sample_res_multistep, n) for n in (10, 20, 40)]
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5
    assert errors[2] < _error(samplers.sample_euler, 40) / 10


def test_res_multistep_by_hand():
    """An Euler step (sigma 4 -> 2), then with h = h_previous = log 2: x' = x/2 + x0/2 + (1 - 1/(2h)) (x0 - x0_prev)
    (x0 integrated exactly as a line in t = -log sigma); the step to 0 is x0."""
    x = _x()
    s = [4.0, 2.0, 1.0, 0.0]
    calls = []

    def model(x_in, sigma):
        calls.append(x_in)
        return gaussian_denoiser(x_in, sigma)

    out = sample_res_multistep(model, x, torch.tensor(s, dtype=torch.float64))
    x1 = (x + _x0(x, 4.0)) / 2
    x2 = x1 / 2 + _x0(x1, 2.0) / 2 + (1 - 1 / (2 * math.log(2))) * (_x0(x1, 2.0) - _x0(x, 4.0))
    torch.testing.assert_close(calls[1], x1)
    torch.testing.assert_close(calls[2], x2)
    torch.testing.assert_close(out, _x0(x2, 1.0))


def test_res_multistep_ancestral_with_eta_0_is_res_multistep():
    x = _x()
    sigmas = torch.tensor(KARRAS, dtype=torch.float64)
    torch.testing.assert_close(sample_res_multistep_ancestral(gaussian_denoiser, x, sigmas, eta=0.0),
                               sample_res_multistep(gaussian_denoiser, x, sigmas), rtol=0, atol=0)


def test_res_multistep_ancestral_by_hand():
    """Steps to sigma_down then noise of sigma_up; the second step's previous estimate sits at an offset measured
    from the previous step's sigma_down (ComfyUI's choice), c = log(sigma_down_prev / sigma_prev) / h."""
    x = _x()
    s = [4.0, 2.0, 1.0]
    noise_sampler = _constant_noise(x)
    noise = noise_sampler(0, 0)
    out = sample_res_multistep_ancestral(gaussian_denoiser, x, torch.tensor(s, dtype=torch.float64),
                                         noise_sampler=noise_sampler)
    down_0, up_0 = samplers.get_ancestral_step(4.0, 2.0)
    x1 = _x0(x, 4.0) + (x - _x0(x, 4.0)) * (down_0 / 4.0) + noise * up_0
    down_1, up_1 = samplers.get_ancestral_step(2.0, 1.0)
    h = math.log(2.0 / down_1)
    c = math.log(down_0 / 4.0) / h
    h_phi_1, h_phi_2 = 1 - math.exp(-h), 1 - (1 - math.exp(-h)) / h
    x2 = (down_1 / 2.0) * x1 + (h_phi_1 - h_phi_2 / c) * _x0(x1, 2.0) + (h_phi_2 / c) * _x0(x, 4.0) + noise * up_1
    torch.testing.assert_close(out, x2)


@pytest.mark.parametrize("ancestral", [False, True])
def test_res_multistep_cfg_pp_with_the_guided_prediction_as_unconditional_is_the_plain_sampler(ancestral):
    model, capture = _guided_model(None)
    x = _x(torch.float32)
    sigmas = get_sigmas("karras", DiscreteSchedule(), 6)
    if ancestral:
        expected = sample_res_multistep_ancestral(model, x, sigmas, noise_sampler=_constant_noise(x))
        got = sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, noise_sampler=_constant_noise(x), uncond=capture)
    else:
        expected = sample_res_multistep(model, x, sigmas)
        got = sample_res_multistep_cfg_pp(model, x, sigmas, uncond=capture)
    torch.testing.assert_close(got, expected)


def test_res_multistep_cfg_pp_by_hand():
    """The Euler step is CFG++'s, x0_guided + (sigma'/sigma)(x - x0_uncond); the multistep one integrates the
    unconditional estimates from x + (x0_guided - x0_uncond)."""
    model, capture = _guided_model(0.2)
    x = _x()
    s = [4.0, 2.0, 1.0]
    out = sample_res_multistep_cfg_pp(model, x, torch.tensor(s, dtype=torch.float64), uncond=capture)
    x1 = 0.5 * x + 0.1 * torch.sin(x) + (x - 0.2 * x) / 2
    guided_1, uncond_1 = 0.5 * x1 + 0.1 * torch.sin(x1), 0.2 * x1
    h = math.log(2)
    x2 = (x1 + guided_1 - uncond_1) / 2 + uncond_1 / 2 + (1 - 1 / (2 * h)) * (uncond_1 - 0.2 * x)
    torch.testing.assert_close(out, x2)
    for sampler in (sample_res_multistep_cfg_pp, sample_res_multistep_ancestral_cfg_pp,
                    sample_gradient_estimation_cfg_pp):
        with pytest.raises(ValueError, match="unconditional"):  # not silently the plain sampler
            sampler(model, x, torch.tensor(s))


# Gradient estimation with CFG++


def test_gradient_estimation_cfg_pp_with_the_guided_prediction_as_unconditional_is_the_plain_sampler():
    model, capture = _guided_model(None)
    x = _x(torch.float32)
    sigmas = get_sigmas("karras", DiscreteSchedule(), 6)
    torch.testing.assert_close(sample_gradient_estimation_cfg_pp(model, x, sigmas, uncond=capture),
                               sample_gradient_estimation(model, x, sigmas))


def test_gradient_estimation_cfg_pp_by_hand():
    model, capture = _guided_model(0.2)
    x = _x()
    s = [4.0, 2.0, 1.0, 0.0]
    calls = []

    def recording(x_in, sigma):
        calls.append(x_in)
        return model(x_in, sigma)

    out = sample_gradient_estimation_cfg_pp(recording, x, torch.tensor(s, dtype=torch.float64), ge_gamma=2.5,
                                            uncond=capture)
    d0 = (x - 0.2 * x) / 4.0
    x1 = 0.5 * x + 0.1 * torch.sin(x) + 2.0 * d0
    d1 = (x1 - 0.2 * x1) / 2.0
    x2 = 0.5 * x1 + 0.1 * torch.sin(x1) + 1.0 * d1 + 1.5 * (1.0 - 2.0) * (d1 - d0)
    torch.testing.assert_close(calls[1], x1)
    torch.testing.assert_close(calls[2], x2)
    torch.testing.assert_close(out, 0.5 * x2 + 0.1 * torch.sin(x2))  # the step to 0: the guided prediction


# Heun++


def test_heunpp2_by_hand():
    """On 4 -> 2 -> 1 -> 0: a three-derivative step (weights 1/12 and 2/12 for the probes at 1 and 2, by their
    level / (3 * 4)), a two-derivative one (1/8 = 1 / (2 * 4) for the probe at 1), then Euler to 0."""
    x = _x()
    calls = []

    def model(x_in, sigma):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x_in, sigma)

    out = sample_heunpp2(model, x, torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64))
    d = _d(x, 4.0)
    probe_2 = x - 2.0 * d
    d_2 = _d(probe_2, 2.0)
    d_3 = _d(probe_2 - 1.0 * d_2, 1.0)
    x1 = x - 2.0 * ((1 - 2 / 12 - 1 / 12) * d + 2 / 12 * d_2 + 1 / 12 * d_3)
    d = _d(x1, 2.0)
    x2 = x1 - 1.0 * (7 / 8 * d + 1 / 8 * _d(x1 - d, 1.0))
    torch.testing.assert_close(out, _x0(x2, 1.0))
    assert calls == [4.0, 2.0, 1.0, 2.0, 1.0, 1.0]


def test_heunpp2_converges_at_first_order_below_euler():
    """Its weights are not Heun's 1/2, so the error halves as the steps double, like Euler's but smaller."""
    ours = [_error(sample_heunpp2, n) for n in (10, 20, 40)]
    assert 1.8 < ours[0] / ours[1] < 2.2 and 1.8 < ours[1] / ours[2] < 2.2
    for n, error in zip((10, 20, 40), ours, strict=True):
        assert error < 0.85 * _error(samplers.sample_euler, n)


# Through the KSampler


@pytest.mark.parametrize("name", ["res_multistep", "res_multistep_ancestral", "gradient_estimation"])
def test_cfg_pp_in_sample_matches_plain_when_the_prompts_agree_and_differs_otherwise(name):
    """The guider's unconditional prediction reaches the CFG++ samplers through the KSampler's registry."""
    assert f"{name}_cfg_pp" in ksampler._CFG_PP

    def unet(x, t, context, y=None):
        return torch.sin(x * 1.3) * 0.5 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) * 0.3

    def cond(value):
        return [(torch.full((1, 2, 8), value), {})]

    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(sampler_name, negative):
        return sample(unet, DiscreteSchedule(), latent, seed=2, steps=5, cfg=1.5, sampler_name=sampler_name,
                      positive=cond(1.0), negative=cond(negative))

    torch.testing.assert_close(run(f"{name}_cfg_pp", 1.0), run(name, 1.0), atol=1e-4, rtol=1e-5)
    assert (run(f"{name}_cfg_pp", -1.0) - run(name, -1.0)).abs().max() > 1e-3
