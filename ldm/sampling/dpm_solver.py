"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps"): fixed-step DPM-Solver-Fast and the adaptive DPM-Solver-12/23.

Works in t = -log(sigma) on eps = (x - x0) / sigma. Like ComfyUI's dpm_fast / dpm_adaptive, the
samplers take the usual sigmas but only use their ends: from sigmas[0] down to the last nonzero
sigma (the result keeps that last, small, noise level).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.sampling.noise import NoiseSampler
from ldm.sampling.samplers import (
    Callback,
    Model,
    _call,
    _report,
    get_ancestral_step,
    linear_combination,
    unseeded_noise_sampler,
)


class _Eps:
    """eps(x, t) evaluations of one step, cached by name so that shared stages run once (the
    adaptive solver's lower- and higher-order steps share their first stages); the model's x0 of
    the step's first evaluation is kept for the callback."""

    def __init__(self, model: Model, extra_args: dict | None) -> None:
        self.model, self.extra_args, self.cache, self.calls = model, extra_args, {}, 0
        self.denoised: Tensor | None = None

    def __call__(self, key: str, x: Tensor, t: float) -> Tensor:
        if key not in self.cache:
            sigma = math.exp(-t)
            denoised = _call(self.model, x, sigma, self.extra_args)
            if key == "eps":
                self.denoised = denoised
            self.cache[key] = torch.sub(x, denoised).div_(sigma)
            self.calls += 1
        return self.cache[key]

    def first_stage(self, x: Tensor, t: float, h: float, r1: float) -> Tensor:
        """u1, the point at t + r1 h that the second evaluation is made at (made once per r1)."""
        key = f"u1 {r1}"
        if key not in self.cache:
            self.cache[key] = torch.add(x, self("eps", x, t), alpha=-math.exp(-(t + r1 * h)) * math.expm1(r1 * h))
        return self.cache[key]


def _step_1(eps: _Eps, x: Tensor, t: float, t_next: float) -> Tensor:
    return torch.add(x, eps("eps", x, t), alpha=-math.exp(-t_next) * math.expm1(t_next - t))


# The higher-order steps are weighted sums of x and the eps evaluations, x - a e - b (e_r1 - e) - ...,
# regrouped per tensor so that each costs one fused multiply-add.


def _step_2(eps: _Eps, x: Tensor, t: float, t_next: float, r1: float = 1 / 2) -> Tensor:
    h = t_next - t
    e = eps("eps", x, t)
    e_r1 = eps("eps_r1", eps.first_stage(x, t, h, r1), t + r1 * h)
    a, b = math.exp(-t_next) * math.expm1(h), math.exp(-t_next) / (2 * r1) * math.expm1(h)
    return linear_combination([(1.0, x), (b - a, e), (-b, e_r1)])


def _step_3(eps: _Eps, x: Tensor, t: float, t_next: float, r1: float = 1 / 3, r2: float = 2 / 3) -> Tensor:
    h = t_next - t
    e = eps("eps", x, t)
    s1, s2 = t + r1 * h, t + r2 * h
    e_r1 = eps("eps_r1", eps.first_stage(x, t, h, r1), s1)
    phi = math.expm1(r2 * h) / (r2 * h) - 1
    a, b = math.exp(-s2) * math.expm1(r2 * h), math.exp(-s2) * (r2 / r1) * phi
    u2 = linear_combination([(1.0, x), (b - a, e), (-b, e_r1)])
    e_r2 = eps("eps_r2", u2, s2)
    a, b = math.exp(-t_next) * math.expm1(h), math.exp(-t_next) / r2 * (math.expm1(h) / h - 1)
    return linear_combination([(1.0, x), (b - a, e), (-b, e_r2)])


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """With eta > 0, step deterministically to t_next_ and add noise of std su to reach t_next."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_next_ = min(t_end, -math.log(sigma_down))
    return t_next_, (math.exp(-2 * t_next) - math.exp(-2 * t_next_)) ** 0.5


def _range(sigmas: Tensor) -> tuple[float, float]:
    positive = [s for s in sigmas.tolist() if s > 0]
    return -math.log(positive[0]), -math.log(positive[-1])


@torch.no_grad()
def sample_dpm_fast(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-Fast (Lu et al. 2022, section 3.4): len(sigmas) - 1 model calls spent on
    uniform steps in t, third order except for the last one or two."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    nfe = len(sigmas) - 1
    if nfe < 1:
        return x
    t_start, t_end = _range(sigmas)
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _ancestral_target(t, t_next, t_end, eta)
        eps = _Eps(model, extra_args)
        eps("eps", x, t)
        _report(callback, i, x, math.exp(-t), math.exp(-t), eps.denoised)
        x = (_step_1, _step_2, _step_3)[order - 1](eps, x, t, t_next_)
        if su:
            x = x + noise_sampler(math.exp(-t), math.exp(-t_next)) * (su * s_noise)
    return x


class _PIDController:
    """PID step-size control for adaptive ODE solvers (Söderlind 2003), as in k-diffusion."""

    def __init__(
        self,
        h: float,
        pcoeff: float,
        icoeff: float,
        dcoeff: float,
        order: float,
        accept_safety: float = 0.81,
        eps: float = 1e-8,
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Adaptive DPM-Solver-12 / 23 (Lu et al. 2022, section 3.3): embedded lower/higher-order
    pairs estimate the local error, and a PID controller picks the step size; the number of
    model calls follows from the tolerances, not from len(sigmas)."""
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    t_start, t_end = _range(sigmas)
    pid = _PIDController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s, steps = t_start, 0
    prev_abs = x.abs()  # |x_prev|, the lower-order solution of the last accepted step (x at first)
    while s < t_end - 1e-5:
        t = min(t_end, s + pid.h)
        t_, su = _ancestral_target(s, t, t_end, eta)
        eps = _Eps(model, extra_args)
        eps("eps", x, s)
        _report(callback, steps, x, math.exp(-s), math.exp(-s), eps.denoised)
        if order == 2:
            x_low, x_high = _step_1(eps, x, s, t_), _step_2(eps, x, s, t_)
        else:
            x_low, x_high = _step_2(eps, x, s, t_, r1=1 / 3), _step_3(eps, x, s, t_)
        # The error norm of k-diffusion, || (x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|)) ||
        # / sqrt(n), in place where the tensors are this step's own.
        low_abs = x_low.abs()
        delta = torch.maximum(low_abs, prev_abs).mul_(rtol).clamp_min_(atol)
        error = float(torch.linalg.vector_norm(torch.sub(x_low, x_high).div_(delta))) / x.numel() ** 0.5
        if pid.propose_step(error):
            prev_abs = low_abs
            x = x_high + noise_sampler(math.exp(-s), math.exp(-t)) * (su * s_noise) if su else x_high
            s = t
        steps += 1
    return x
