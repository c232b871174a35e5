"""iPNDM, iPNDM-v and gradient estimation. No library besides ComfyUI ships them, so they are checked against
their definitions: iPNDM-v's weights against exact Adams-Bashforth where they are that, one step by hand, and
whole runs against the exact solution of the probability-flow ODE for Gaussian data."""

import math

import numpy as np
import pytest
import torch

from ldm.sampling import DiscreteSchedule, get_sigmas, samplers
from ldm.sampling.samplers_multistep import (
    ipndm_v_weights,
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


def exact_adams_bashforth(nodes: list[float], target: float) -> list[float]:
    """The reference: weights that integrate, from nodes[0] to `target`, the polynomial through the history
    (Lagrange basis integrated with numpy), divided by the step."""
    weights = []
    for j, node in enumerate(nodes):
        basis = np.poly1d([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis *= np.poly1d([1.0, -other]) / (node - other)
        weights.append((basis.integ()(target) - basis.integ()(node if j == 0 else nodes[0])) / (target - nodes[0]))
    return weights


def test_ipndm_v_weights_at_order_2_are_exact_variable_step_adams_bashforth():
    for levels, target in (([3.0, 4.5], 2.2), ([1.0, 1.3], 0.6), ([10.0, 14.0], 7.5)):
        assert ipndm_v_weights(levels, target) == pytest.approx(exact_adams_bashforth(levels, target))


@pytest.mark.parametrize("levels", [[5.0, 6.0, 7.0], [5.0, 6.0, 7.0, 8.0], [2.0, 3.5, 4.1], [1.0, 1.7, 3.1, 4.0]])
def test_ipndm_v_weights_are_consistent_and_classical_on_equal_steps(levels):
    weights = ipndm_v_weights(levels, levels[0] - (levels[1] - levels[0]) * 0.8)
    h1, h2, h3 = (levels[k - 1] - levels[k] for k in range(1, len(levels))) if len(levels) == 4 else (1, 1, 1)
    if len(levels) == 3 or h1 / h2 == h2 / h3:
        assert sum(weights) == pytest.approx(1.0)  # a constant derivative is integrated exactly
    else:  # not by the authors' order-4 weights when the history's step ratios differ (kept, as in ComfyUI)
        assert sum(weights) != pytest.approx(1.0)
    equal = ipndm_v_weights([5.0 + k for k in range(len(levels))], 4.0)
    if len(levels) == 3:  # equal steps at order 3: the classical AB3 weights
        assert equal == pytest.approx([23 / 12, -16 / 12, 5 / 12])
    assert sum(equal) == pytest.approx(1.0)


def _linear_schedule(n: int, high: float = 10.0, low: float = 0.1) -> torch.Tensor:
    return torch.linspace(high, low, n + 1)


def test_ipndm_v_is_ipndm_on_equal_steps_to_order_3_and_differs_on_a_karras_schedule():
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 10
    sigmas = _linear_schedule(12)
    torch.testing.assert_close(sample_ipndm_v(gaussian_denoiser, x, sigmas, max_order=3),
                               sample_ipndm(gaussian_denoiser, x, sigmas, max_order=3))
    karras = get_sigmas("karras", DiscreteSchedule(), 12)[:-1]
    assert not torch.allclose(sample_ipndm_v(gaussian_denoiser, x, karras), sample_ipndm(gaussian_denoiser, x, karras))


def _error(sampler, steps: int, **kwargs) -> float:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    sigmas = torch.tensor(np.geomspace(10.0, 0.05, steps + 1))
    out = sampler(gaussian_denoiser, x, sigmas, **kwargs)
    return float((out - exact(x, 10.0, 0.05)).abs().max() / exact(x, 10.0, 0.05).abs().max())


@pytest.mark.parametrize("sampler", [sample_ipndm, sample_ipndm_v])
def test_ipndm_converges_faster_than_euler(sampler):
    """Error against the exact ODE solution at 10 and 40 steps: Euler's falls about 4x (first order); iPNDM's
    14x and iPNDM-v's 4x (its order-4 weights are inexact on unequal steps), both ending over 30x below
    Euler's."""
    euler = [_error(samplers.sample_euler, n) for n in (10, 40)]
    ours = [_error(sampler, n) for n in (10, 40)]
    assert 3 < euler[0] / euler[1] < 5
    assert ours[0] / ours[1] > 3.5
    assert ours[1] < euler[1] / 30


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

        def model(x_in, sigma, calls=calls):
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
