"""Multistep ODE samplers in sigma: iPNDM, its variable-step form, and gradient estimation.

All step along the probability-flow ODE dx/dsigma = (x - x0) / sigma with k-diffusion's signature, reusing
earlier derivatives instead of extra model calls. A step that ends at sigma 0 returns the denoised
prediction, as the iPNDM authors' code does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ldm.sampling.samplers import Callback, Model, _call, _report, linear_combination, to_d

# Adams-Bashforth weights for equal steps, newest derivative first (orders 1 to 4).
_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def adams_bashforth_weights(nodes: list[float], target: float) -> list[float]:
    """Weights w_j with sum_j w_j d(nodes[j]) = the integral of d from nodes[0] to `target`, exact for every
    polynomial d of degree below len(nodes): the variable-step Adams-Bashforth rule (nodes newest first)."""
    weights = []
    for j, node in enumerate(nodes):
        basis = np.poly1d([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis *= np.poly1d([1.0, -other]) / (node - other)
        antiderivative = basis.integ()
        weights.append(float(antiderivative(target) - antiderivative(nodes[0])))
    return weights


def _multistep(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback,
               max_order: int, variable: bool) -> Tensor:
    s = sigmas.tolist()
    history: list[Tensor] = []  # derivatives, newest first
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            return denoised
        history.insert(0, to_d(x, s[i], denoised))
        del history[max_order:]
        order = len(history)
        step = s[i + 1] - s[i]
        if variable and order > 1:
            terms = list(zip(adams_bashforth_weights(s[i::-1][:order], s[i + 1]), history, strict=True))
        else:
            terms = [(w * step, d) for w, d in zip(_ADAMS_BASHFORTH[order], history, strict=True)]
        x = linear_combination([(1.0, x), *terms])
    return x


@torch.no_grad()
def sample_ipndm(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None, callback: Callback = None,
                 disable: bool | None = None, max_order: int = 4) -> Tensor:
    """iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", the improved
    pseudo-numerical method): Adams-Bashforth steps of up to `max_order`, with equal-step weights whatever the
    schedule, and lower orders while the history fills."""
    return _multistep(model, x, sigmas, extra_args, callback, max_order, variable=False)


@torch.no_grad()
def sample_ipndm_v(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                   callback: Callback = None, disable: bool | None = None, max_order: int = 4) -> Tensor:
    """iPNDM with weights for the schedule's actual, unequal steps (variable-step Adams-Bashforth, exact for
    derivatives that are polynomials in sigma of degree below the order)."""
    return _multistep(model, x, sigmas, extra_args, callback, max_order, variable=True)


@torch.no_grad()
def sample_gradient_estimation(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None = None,
                               callback: Callback = None, disable: bool | None = None,
                               ge_gamma: float = 2.0) -> Tensor:
    """Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from an
    Optimization Perspective", Algorithm 2): Euler steps along `gamma * d + (1 - gamma) * d_previous`, an
    extrapolation of the denoising direction that corrects its error. The last step, to 0, is the denoised
    prediction itself (ComfyUI's choice)."""
    s = sigmas.tolist()
    previous: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            return denoised
        d = to_d(x, s[i], denoised)
        step = s[i + 1] - s[i]
        if previous is None:
            x = x + d * step
        else:
            x = linear_combination([(1.0, x), (ge_gamma * step, d), ((1 - ge_gamma) * step, previous)])
        previous = d
    return x
