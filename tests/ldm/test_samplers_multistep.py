"""iPNDM, iPNDM-v and gradient estimation. No library besides ComfyUI ships them, so they are checked against
their definitions: Adams-Bashforth weights by exactness on polynomials, one step of each by hand, and whole runs
against the exact solution of the probability-flow ODE for Gaussian data."""

import math

import numpy as np
import pytest
import torch

from ldm.sampling import DiscreteSchedule, get_sigmas, samplers
from ldm.sampling.samplers_multistep import (
    adams_bashforth_weights,
    sample_gradient_estimation,
    sample_ipndm,
    sample_ipndm_v,
)

DATA_STD = 0.8


def gaussian_denoiser(x, sigma):
    """The exact x0 estimate for data drawn from N(0, DATA_STD^2): x * s^2 / (s^2 + sigma^2)."""
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x * DATA_STD**2 / (DATA_STD**2 + sigma**2)


def exact(x, sigma_from: float, sigma_to: float):
    """The probability-flow ODE's solution for that data: x scales with sqrt(s^2 + sigma^2)."""
    return x * math.sqrt((DATA_STD**2 + sigma_to**2) / (DATA_STD**2 + sigma_from**2))


@pytest.mark.parametrize("nodes", [[2.0, 3.0], [2.0, 3.5, 4.0], [1.0, 1.7, 3.1, 4.0]])
def test_adams_bashforth_weights_integrate_polynomials_exactly(nodes):
    target = 0.6
    for degree in range(len(nodes)):
        poly = np.poly1d(np.arange(1.0, degree + 2))
        integral = poly.integ()(target) - poly.integ()(nodes[0])
        assert sum(w * poly(n) for w, n in zip(adams_bashforth_weights(nodes, target), nodes)) == pytest.approx(
            integral, rel=1e-9, abs=1e-12)
    if len(nodes) == 2:  # the variable-step AB2 of iPNDM-v's authors: h * ((2 + h / h1) / 2, -(h / h1) / 2)
        h, h1 = target - nodes[0], nodes[0] - nodes[1]
        assert adams_bashforth_weights(nodes, target) == pytest.approx([h * (2 + h / h1) / 2, -h * (h / h1) / 2])


def test_equal_steps_give_the_classical_weights():
    for order, expected in ((2, [3, -1]), (3, [23, -16, 5]), (4, [55, -59, 37, -9])):
        nodes = [5.0 + k for k in range(order)]  # the history lies at higher noise
        weights = adams_bashforth_weights(nodes, 4.0)  # one step of -1
        assert weights == pytest.approx([-w / {2: 2, 3: 12, 4: 24}[order] for w in expected])


def _linear_schedule(n: int, high: float = 10.0, low: float = 0.1) -> torch.Tensor:
    return torch.linspace(high, low, n + 1)


def test_ipndm_v_is_ipndm_on_equal_steps_and_differs_on_a_karras_schedule():
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 10
    sigmas = _linear_schedule(12)
    torch.testing.assert_close(sample_ipndm_v(gaussian_denoiser, x, sigmas), sample_ipndm(gaussian_denoiser, x, sigmas))
    karras = get_sigmas("karras", DiscreteSchedule(), 12)[:-1]
    assert not torch.allclose(sample_ipndm_v(gaussian_denoiser, x, karras), sample_ipndm(gaussian_denoiser, x, karras))


def _error(sampler, steps: int, **kwargs) -> float:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    sigmas = torch.tensor(np.geomspace(10.0, 0.05, steps + 1))
    out = sampler(gaussian_denoiser, x, sigmas, **kwargs)
    return float((out - exact(x, 10.0, 0.05)).abs().max() / exact(x, 10.0, 0.05).abs().max())


@pytest.mark.parametrize("sampler", [sample_ipndm, sample_ipndm_v])
def test_ipndm_converges_faster_than_euler(sampler):
    """Error against the exact ODE solution at 10 and 40 steps: Euler's falls about 4x (first order); iPNDM's,
    whose warm-up steps are lower order, at least 10x (measured: 14x, and 72x for the variable-step form),
    ending 50x below Euler's."""
    euler = [_error(samplers.sample_euler, n) for n in (10, 40)]
    ours = [_error(sampler, n) for n in (10, 40)]
    assert 3 < euler[0] / euler[1] < 5
    assert ours[0] / ours[1] > 10
    assert ours[1] < euler[1] / 20


def test_gradient_estimation_converges_and_improves_on_euler():
    """With gamma 2 the extrapolated direction is first order in sigma, like Euler's (the method is meant for
    the few-step regime), but its error is smaller at every step count."""
    for steps in (10, 20, 40):
        assert _error(sample_gradient_estimation, steps) < _error(samplers.sample_euler, steps)
    assert _error(sample_gradient_estimation, 10) / _error(sample_gradient_estimation, 40) > 2.5


def test_the_last_step_to_zero_is_the_denoised_prediction():
    x = torch.randn(1, 4, 4, 4)
    sigmas = torch.tensor([3.0, 1.0, 0.0])
    for sampler in (sample_ipndm, sample_ipndm_v, sample_gradient_estimation):
        calls = []

        def model(x_in, sigma):
            calls.append(x_in)
            return gaussian_denoiser(x_in, sigma)

        out = sampler(model, x, sigmas)
        torch.testing.assert_close(out, gaussian_denoiser(calls[-1], torch.ones(1)))


def test_gradient_estimation_one_step_by_hand():
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    sigmas = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    out = sample_gradient_estimation(gaussian_denoiser, x, sigmas, ge_gamma=2.0)
    d0 = (x - gaussian_denoiser(x, torch.tensor(4.0))) / 4.0
    x1 = x - 2.0 * d0
    d1 = (x1 - gaussian_denoiser(x1, torch.tensor(2.0))) / 2.0
    torch.testing.assert_close(out, x1 - 1.0 * (2 * d1 - d0))
