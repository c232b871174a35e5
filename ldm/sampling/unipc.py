"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): multistep UniP predictor and UniC corrector on x0 predictions, in log-sigma.

Written in sigma space: with lambda = -log(sigma), the data-prediction update of the paper,
divided by alpha_t, reads `x_t = (sigma_t / sigma_s) x_s - expm1(-h) x0_s - B(h) * sum(rho_k D_k)`.
The step into sigma = 0 is first order (lower_order_final), which lands exactly on x0; ComfyUI
instead steps to sigma = 0.001, a difference of 0.001 times the remaining noise direction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.sampling.samplers import Callback, Model, _call, _report, linear_combination


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small (at most 3x3) system a x = b by Gaussian elimination with partial pivoting:
    plain floats, as numpy's call overhead would cost more than the arithmetic at every step."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [v - f * p for v, p in zip(m[r], m[col], strict=True)]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


def _update(
    x: Tensor,
    sigma_s: float,
    sigma_t: float,
    history: list[tuple[float, Tensor]],
    order: int,
    variant: str,
    model_t: Tensor | None = None,
) -> Tensor:
    """One UniP step from sigma_s (whose x0 estimate is history[-1]) to sigma_t; with `model_t`,
    the x0 estimate at sigma_t, the UniC corrector instead.

    The update is linear in x and the x0 estimates, so it is assembled as one weighted sum:
    each difference D_k = (m_k - m0) / r_k contributes rho_k / r_k to m_k and its negative to m0.
    """
    sigma_0, m0 = history[-1]
    h = math.log(sigma_s / sigma_t)
    older = list(reversed(history[-order:-1]))
    ratios = [math.log(sigma_0 / sigma_i) / h for sigma_i, _ in older]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [*ratios, 1.0]
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if model_t is None:
        if not older:
            rhos = []
        else:
            rhos = [0.5] if order == 2 else _solve([row[:-1] for row in rows[:-1]], b[:-1])
        rho_t = 0.0
    else:
        rhos = [0.5] if order == 1 else _solve(rows, b)
        rhos, rho_t = rhos[:-1], rhos[-1]
    weights = [-b_h * rho / r for rho, r in zip(rhos, ratios, strict=True)]
    terms = [(sigma_t / sigma_s, x), (-h_phi_1 - sum(weights) + b_h * rho_t, m0)]
    terms += [(w, m_i) for w, (_, m_i) in zip(weights, older, strict=True)]
    if model_t is not None:
        terms.append((-b_h * rho_t, model_t))
    return linear_combination(terms)


@torch.no_grad()
def sample_uni_pc(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    order: int = 3,
    variant: str = "bh1",
) -> Tensor:
    """UniPC multistep with data prediction, `variant` 'bh1' (ComfyUI's uni_pc) or 'bh2'; one
    model call per step, warming up from first order and lowering the order over the last steps."""
    if variant not in ("bh1", "bh2"):
        raise ValueError("variant must be 'bh1' or 'bh2'")
    s = sigmas.tolist()
    n = len(s) - 1
    history: list[tuple[float, Tensor]] = []
    previous = None  # (x before the last predictor step, its sigma, that step's order)
    for k in range(n):
        denoised = _call(model, x, s[k], extra_args)
        _report(callback, k, x, s[k], s[k], denoised)
        if previous is not None:
            x_prev, sigma_prev, prev_order = previous
            x = _update(x_prev, sigma_prev, s[k], history, prev_order, variant, model_t=denoised)
        history = [*history[-(order - 1) :], (s[k], denoised)] if order > 1 else [(s[k], denoised)]
        step_order = min(order, k + 1, n - k)
        previous = (x, s[k], step_order)
        x = denoised if s[k + 1] == 0 else _update(x, s[k], s[k + 1], history, step_order, variant)
    return x
