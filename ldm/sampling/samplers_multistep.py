"""Multistep ODE samplers in sigma: iPNDM, its variable-step form, and gradient estimation.

All step along the probability-flow ODE dx/dsigma = (x - x0) / sigma with k-diffusion's signature, reusing
earlier derivatives instead of extra model calls. A step that ends at sigma 0 returns the denoised
prediction, as the iPNDM authors' code does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.sampling.samplers import Callback, Model, _call, _report, linear_combination, to_d
from ldm.sampling.samplers_cfgpp import UncondCapture, _uncond

# Adams-Bashforth weights for equal steps, newest derivative first (orders 1 to 4).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm_v_weights(levels: list[float], target: float) -> list[float]:
    """The variable-step iPNDM weights of the GITS authors (zju-pi/diff-sampler, Apache-2.0; the form ComfyUI's
    ipndm_v uses) for a step from levels[0] to `target`, given the history levels (newest first, up to 4 in
    all): x' = x + (target - levels[0]) * sum_j w_j d_j. Order 2 is the exact variable-step Adams-Bashforth
    rule and order 3 on equal steps the classical one. Kept as published, so that workflows naming ipndm_v
    match ComfyUI: on unequal steps the order-4 weights do not sum to 1 (a constant derivative is not
    integrated exactly)."""
    h = target - levels[0]  # the step, and the earlier ones, all negative on a falling schedule
    h1, h2, h3 = (levels[k - 1] - levels[k] if k < len(levels) else 0.0 for k in (1, 2, 3))
    r = h / h1
    if len(levels) == 2:
        return [(2 + r) / 2, -r / 2]
    first = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if len(levels) == 3:
        return [(2 + r) / 2 + first, -r / 2 - (1 + h1 / h2) * first, first * h1 / h2]
    second = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
              * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    ratio = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [(2 + r) / 2 + first + second,
            -r / 2 - (1 + h1 / h2) * first - (1 + h1 / h2 + ratio) * second,
            first * h1 / h2 + (h1 / h2 + ratio * (1 + h2 / h3)) * second,
            -second * ratio * h1 / h2]


# The coefficients of the derivatives in the history (newest first, at `levels`) in a step from levels[0] to
# `target`: x' = x + sum_j w_j d_j.
Weights = Callable[[list[float], float], list[float]]


def adams_bashforth(levels: list[float], target: float) -> list[float]:
    """Equal-step Adams-Bashforth of the history's order, whatever the schedule (iPNDM)."""
    return [w * (target - levels[0]) for w in _ADAMS_BASHFORTH[len(levels)]]


def variable_adams_bashforth(levels: list[float], target: float) -> list[float]:
    """`ipndm_v_weights` (Euler while there is one derivative)."""
    if len(levels) == 1:
        return adams_bashforth(levels, target)
    return [w * (target - levels[0]) for w in ipndm_v_weights(levels, target)]


def multistep(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback,
              max_order: int, weights: Weights) -> Tensor:
    """Linear multistep steps over the last `max_order` derivatives, with `weights` for each step."""
    s = sigmas.tolist()
    history: list[Tensor] = []  # derivatives, newest first
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            return denoised
        history.insert(0, to_d(x, s[i], denoised))
        del history[max_order:]
        x = linear_combination([(1.0, x), *zip(weights(s[i::-1][: len(history)], s[i + 1]), history, strict=True)])
    return x


@torch.no_grad()
def sample_ipndm(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
                 disable: bool | None = None, max_order: int = 4) -> Tensor:
    """iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", the improved
    pseudo-numerical method): Adams-Bashforth steps of up to `max_order`, with equal-step weights whatever the
    schedule, and lower orders while the history fills."""
    return multistep(model, x, sigmas, extra_args, callback, max_order, adams_bashforth)


@torch.no_grad()
def sample_ipndm_v(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                   callback: Callback = None, disable: bool | None = None, max_order: int = 4) -> Tensor:
    """iPNDM with weights for the schedule's actual, unequal steps (`ipndm_v_weights`)."""
    return multistep(model, x, sigmas, extra_args, callback, max_order, variable_adams_bashforth)


@torch.no_grad()
def sample_gradient_estimation(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                               callback: Callback = None, disable: bool | None = None,
                               ge_gamma: float = 2.0, uncond: UncondCapture | None = None) -> Tensor:
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from an
    Optimization Perspective", Algorithm 2): Euler steps along `gamma * d + (1 - gamma) * d_previous`, an
    extrapolation of the denoising direction that corrects its error. The last step, to 0, is the denoised
    prediction itself (ComfyUI's choice). With `uncond` (CFG++, Chung et al. 2024: gradient_estimation_cfg_pp),
    d is the unconditional direction (x - x0_uncond) / sigma and the step starts from x0_guided + sigma d."""
    s = sigmas.tolist()
    previous: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            return denoised
        x0 = denoised if uncond is None else _uncond(uncond)
        d = to_d(x, s[i], x0)
        start = x if uncond is None else x + (denoised - x0)
        step = s[i + 1] - s[i]
        if previous is None:
            x = start + d * step
        else:
            x = linear_combination([(1.0, start), (ge_gamma * step, d), ((1 - ge_gamma) * step, previous)])
        previous = d
    return x
