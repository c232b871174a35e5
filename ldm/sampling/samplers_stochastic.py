"""Stochastic solvers of the reverse-time diffusion SDE on x0 predictions: ER-SDE-Solver, SEEDS and SA-Solver.

All take k-diffusion's signature and ComfyUI's options for the sampler names er_sde, seeds_2, seeds_3, sa_solver and
sa_solver_pece. Written in sigma space (the variance-exploding form x = x0 + sigma * eps of Karras et al. 2022), where
the papers' alpha_t is 1 and their half log-SNR is lambda = -log(sigma). Step coefficients are computed in float64
from the sigmas as Python floats, so that a step is one weighted sum of tensors. Switched to no noise (s_noise = 0,
eta = 0 or a noise scaler of x) each is a deterministic solver of the probability-flow ODE. The last step, into
sigma = 0, returns the denoised prediction. Their noise is fresh at every draw (`noise_sampler`), as in ComfyUI,
which uses no Brownian tree for them. With `flow` each runs on a rectified-flow latent (1 - sigma) x0 + sigma noise
the way ComfyUI's do on its CONST models: the same steps in the flow's half-log-SNR log((1 - sigma) / sigma), with
the papers' alpha_t = 1 - sigma, which is the variance-exploding solver run on x / alpha at levels sigma / alpha.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ldm.sampling.noise import NoiseSampler
from ldm.sampling.samplers import (
    Callback,
    Model,
    _call,
    _report,
    half_log_snr,
    linear_combination,
    unseeded_noise_sampler,
)
from ldm.sampling.schedules import DiscreteSchedule

NoiseScaler = Callable[[Tensor], Tensor]
# A SEEDS step's stages, given h * (1 + eta): (c, weights of the x0 predictions made so far) for each stage
Stages = Callable[[float], list[tuple[float, list[float]]]]
ER_SDE_SOLVER_TYPES = ("ER-SDE", "Reverse-time SDE", "ODE")


def er_sde_noise_scaler(solver_type: str = "ER-SDE", eta: float = 1.0) -> NoiseScaler:
    """The noise scaler phi(sigma) that picks an SDE out of the ER-SDE family (Cui et al. 2024), as
    ComfyUI's SamplerER_SDE builds it: "ER-SDE" the paper's sigma * (exp(sigma^0.3) + 10) with its second factor
    raised to `eta` (`eta` 1 is the er_sde sampler's default), "Reverse-time SDE" sigma^(1 + eta) (eta 1: the
    reverse SDE of Song et al. 2021), "ODE" sigma itself (the probability-flow ODE, no noise). It maps a float64
    tensor of levels to a tensor."""
    if solver_type == "ER-SDE":
        return lambda v: v * (torch.exp(v**0.3) + 10.0) ** eta
    if solver_type == "Reverse-time SDE":
        return lambda v: v ** (eta + 1)
    if solver_type == "ODE":
        return lambda v: v
    raise ValueError(f"solver_type must be one of {ER_SDE_SOLVER_TYPES}, got {solver_type!r}")


def er_sde_options(solver_type: str = "ER-SDE", max_stage: int = 3, eta: float = 1.0, s_noise: float = 1.0) -> dict:
    """The er_sde options that ComfyUI's SamplerER_SDE node makes of its inputs: an ODE, or eta 0, adds no noise."""
    if solver_type == "ODE" or eta == 0:
        solver_type, s_noise = "ODE", 0.0
    return {"s_noise": s_noise, "noise_scaler": er_sde_noise_scaler(solver_type, eta), "max_stage": max_stage}


# The points of the Riemann sums of the stage 2 and 3 integrals: ComfyUI's count, so the same numbers. The stage 3
# weight, a small difference of two terms, comes out up to about 10% short on short steps.
_ER_SDE_POINTS = 200


def _er_sde_weights(sigma: float, sigma_next: float, noise_scaler: NoiseScaler) -> tuple[float, float, float]:
    """For the step from `sigma` to `sigma_next`: the ratio r = phi(sigma_next) / phi(sigma) that weighs x, and the
    weights of the first and second derivatives of x0 in sigma, phi(sigma_next) times the integrals of
    phi'(l) / phi(l)^2 (l - sigma)^n / n! over [sigma_next, sigma], integrated by parts into the integrals of
    (l - sigma)^(n-1) / phi(l), which are left Riemann sums from sigma_next."""
    phi_sigma, phi_next = (float(noise_scaler(torch.tensor(v, dtype=torch.float64))) for v in (sigma, sigma_next))
    width = (sigma - sigma_next) / _ER_SDE_POINTS
    levels = sigma_next + torch.arange(_ER_SDE_POINTS, dtype=torch.float64) * width
    inverse = 1 / noise_scaler(levels)
    first = float(inverse.sum()) * width
    second = float(((levels - sigma) * inverse).sum()) * width
    dt = sigma_next - sigma
    return phi_next / phi_sigma, dt + first * phi_next, dt**2 / 2 + second * phi_next


@torch.no_grad()
def sample_er_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    noise_scaler: NoiseScaler | None = None,
    max_stage: int = 3,
    flow: bool = False,
) -> Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2024, "Elucidating the Solution Space of Extended Reverse-Time SDE for
    Diffusion Models", in VE form): the exact solution of the linear part of the SDE that `noise_scaler`
    picks (default: the paper's, `er_sde_noise_scaler()`), with x0 expanded to second order in sigma through
    divided differences of the last three predictions (`max_stage` 1 to 3 caps the order; lower while they
    accumulate), plus noise of variance sigma_next^2 - r^2 sigma^2 times `s_noise`^2 (0 for the ODE scaler).
    `flow`: a rectified-flow latent x = alpha x_ve (alpha = 1 - sigma), stepped as x_ve at levels sigma / alpha
    (ComfyUI's for CONST models; sigma below 1)."""
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    noise_scaler = noise_scaler or er_sde_noise_scaler()
    sigma_list = sigmas.tolist()
    alphas = [1 - v if flow else 1.0 for v in sigma_list]
    s = [v / alpha for v, alpha in zip(sigma_list, alphas, strict=True)]  # the levels of x / alpha
    history: list[Tensor] = []  # the denoised predictions, newest first
    for i in range(len(s) - 1):
        denoised = _call(model, x, sigma_list[i], extra_args)
        _report(callback, i, x, sigma_list[i], sigma_list[i], denoised)
        history = [denoised, *history[:2]]
        if s[i + 1] == 0:
            x = denoised
            continue
        r, first, second = _er_sde_weights(s[i], s[i + 1], noise_scaler)
        weights = [1 - r, 0.0, 0.0]  # of the newest, the previous and the one before
        stage = min(max_stage, i + 1)
        if stage >= 2:
            # first derivative ~ (D_0 - D_1) / a, with a = sigma_i - sigma_{i-1}
            a = s[i] - s[i - 1]
            weights[0] += first / a
            weights[1] -= first / a
        if stage >= 3:
            # second derivative ~ ((D_0 - D_1) / a - (D_1 - D_2) / b) / m, a second divided difference times 2
            b, m = s[i - 1] - s[i - 2], (s[i] - s[i - 2]) / 2
            weights[0] += second / (a * m)
            weights[1] -= second / (a * m) + second / (b * m)
            weights[2] += second / (b * m)
        alpha = alphas[i + 1]  # x_ve' = r x_ve + ... for x_ve = x / alphas[i], times alpha
        terms = [(r * alpha / alphas[i], x), *((alpha * w, d) for w, d in zip(weights, history, strict=False) if w)]
        if s_noise > 0:
            noise_std = math.sqrt(max(s[i + 1] ** 2 - (r * s[i]) ** 2, 0.0))
            terms.append((alpha * s_noise * noise_std, noise_sampler(sigma_list[i], sigma_list[i + 1])))
        x = linear_combination(terms)
    return x


def _h_phi_1(z: float) -> float:
    """z * phi_1(z) = exp(z) - 1, of the exponential integrators."""
    return math.expm1(z)


def _h_phi_2(z: float) -> float:
    """z * phi_2(z) = (exp(z) - 1 - z) / z."""
    return (math.expm1(z) - z) / z


def _seeds_step(
    model: Model,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    denoised: Tensor,
    extra_args: dict | None,
    eta: float,
    s_noise: float,
    noise_sampler: NoiseSampler,
    stages: Stages,
    flow: bool = False,
) -> Tensor:
    """One SEEDS step from `sigma` to `sigma_next`, h = log(sigma / sigma_next) (`flow`: h the rise of the flow's
    half-log-SNR log((1 - sigma) / sigma), stage levels where it is lambda_s + c h, x0 weights times the stage's
    signal scale alpha = 1 - sigma_k, as ComfyUI steps its CONST models). `stages(h * (1 + eta))` lists
    (c, weights): stage k lands at sigma e^(-c h) (the last at c = 1) as e^(-c h eta) (sigma_k / sigma) x plus the
    weighted x0 predictions made so far, plus noise; each stage but the last is evaluated by the model. The
    noise of a stage is the previous stage's carried over, e^(-(c - c_prev) h eta) of it, plus a fresh draw, so that
    each stage sees one consistent Brownian path (of variance 1 - e^(-2 c h eta) relative to sigma_k^2)."""
    lambda_s = half_log_snr(sigma, flow)
    h = half_log_snr(sigma_next, flow) - lambda_s
    inject = eta > 0 and s_noise > 0
    predictions, noise, level, c_prev, x_k = [denoised], None, sigma, 0.0, x
    plan = stages(h * (eta + 1))
    for k, (c, weights) in enumerate(plan):
        if k == len(plan) - 1:
            sigma_k = sigma_next
        else:  # where the half-log-SNR is lambda_s + c h
            sigma_k = 1 / (1 + math.exp(lambda_s + c * h)) if flow else sigma * math.exp(-c * h)
        alpha_k = 1 - sigma_k if flow else 1.0
        if k > 0:
            predictions.append(_call(model, x_k, level, extra_args))
        terms = [(sigma_k / sigma * math.exp(-c * h * eta), x)]
        terms += [(alpha_k * w, d) for w, d in zip(weights, predictions, strict=False) if w]
        if inject:
            decay = (c_prev - c) * h * eta
            fresh = noise_sampler(level, sigma_k) * math.sqrt(-math.expm1(2 * decay))
            noise = fresh if noise is None else noise.mul_(math.exp(decay)).add_(fresh)
            terms.append((sigma_k * s_noise, noise))
        x_k = linear_combination(terms)
        level, c_prev = sigma_k, c
    return x_k


@torch.no_grad()
def sample_seeds_2(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r: float = 0.5,
    solver_type: str = "phi_1",
    flow: bool = False,
) -> Tensor:
    """SEEDS-2 (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from
    Diffusion Models", data prediction): two stages per step, the second at the fraction `r` of the step in
    log-sigma. `solver_type` 'phi_1' blends the two x0s 1 - 1/(2r) : 1/(2r) under the phi_1 weight (with eta 0
    and r 1/2, DPM-Solver++(2S)); 'phi_2' weighs their difference by phi_2 (with r 1 and eta 0, ComfyUI's
    exp_heun_2_x0). `eta` scales the SDE's noise (0: the probability-flow ODE), `s_noise` the noise drawn.
    `flow`: a rectified-flow latent (1 - sigma) x0 + sigma noise, stepped in its half-log-SNR (sigma below 1)."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")

    def stages(h_eta: float) -> list[tuple[float, list[float]]]:
        whole = -_h_phi_1(-h_eta)
        if solver_type == "phi_1":
            last = [whole * (1 - 1 / (2 * r)), whole / (2 * r)]
        else:
            b2 = -_h_phi_2(-h_eta) / r
            last = [whole - b2, b2]
        return [(r, [-_h_phi_1(-r * h_eta)]), (1.0, last)]

    return _seeds(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, stages, flow)


@torch.no_grad()
def sample_seeds_3(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r_1: float = 1 / 3,
    r_2: float = 2 / 3,
    flow: bool = False,
) -> Tensor:
    """SEEDS-3 (Gonzalez et al. 2023, data prediction): three stages per step, at the fractions `r_1` and `r_2` of
    the step in log-sigma, each correcting the x0 of the step's start by a phi_2-weighted difference (with eta 0,
    a third-order exponential integrator of the probability-flow ODE). `flow`: as in `sample_seeds_2`."""

    def stages(h_eta: float) -> list[tuple[float, list[float]]]:
        a2 = -r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        b3 = -_h_phi_2(-h_eta) / r_2
        return [
            (r_1, [-_h_phi_1(-r_1 * h_eta)]),
            (r_2, [-_h_phi_1(-r_2 * h_eta) - a2, a2]),
            (1.0, [-_h_phi_1(-h_eta) - b3, 0.0, b3]),
        ]

    return _seeds(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler, stages, flow)


def _seeds(model: Model, x: Tensor, sigmas: Tensor, extra_args: dict | None, callback: Callback, eta: float,
           s_noise: float, noise_sampler: NoiseSampler | None, stages: Stages, flow: bool) -> Tensor:
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            x = _seeds_step(model, x, s[i], s[i + 1], denoised, extra_args, eta, s_noise, noise_sampler, stages,
                            flow)
    return x


def sa_solver_tau(start_sigma: float, end_sigma: float, eta: float = 1.0) -> Callable[[float], float]:
    """SA-Solver's stochasticity tau as a function of the level a step ends at: `eta` inside
    [end_sigma, start_sigma], 0 (the ODE) outside (ComfyUI's interval rule; the authors' is in time)."""
    return lambda sigma: float(eta) if eta > 0 and start_sigma >= sigma >= end_sigma else 0.0


@functools.cache
def _default_tau() -> Callable[[float], float]:
    """ComfyUI's default: noise from 20% to 80% of the way through SD's schedule."""
    schedule = DiscreteSchedule()
    return sa_solver_tau(schedule.sigma_at_percent(0.2), schedule.sigma_at_percent(0.8))


def _exp_moments(z: float, count: int) -> list[float]:
    """z times the integral over [0, 1] of s^n e^(-z s), for n < count: by its series where z is small (the
    recurrence z m_n = n m_(n-1) - e^(-z) would lose digits there), else by the recurrence."""
    if z < 1:
        return [z * sum((-z) ** k / (math.factorial(k) * (n + k + 1)) for k in range(30)) for n in range(count)]
    moments = [-math.expm1(-z)]
    for n in range(1, count):
        moments.append(n / z * moments[-1] - math.exp(-z))
    return moments


def sa_solver_weights(nodes: list[float], lambda_s: float, lambda_t: float, tau: float) -> list[float]:
    """The stochastic Adams weights of the x0 predictions made at half log-SNRs `nodes` for a step from lambda_s
    to lambda_t (Xue et al. 2023, eqs. 15 and 18): the integrals of (1 + tau^2) e^((1 + tau^2)(l - lambda_t))
    times each Lagrange basis polynomial of the nodes, over [lambda_s, lambda_t]. Taken in s = (lambda_t - l) / h,
    where the integrand is a polynomial times e^(-z s) with z = (1 + tau^2) h: exact moments, no linear solve."""
    h = lambda_t - lambda_s
    moments = _exp_moments((1 + tau**2) * h, len(nodes))
    positions = [(lambda_t - node) / h for node in nodes]
    weights = []
    for j, root_j in enumerate(positions):
        coeffs, denominator = [1.0], 1.0  # the basis polynomial's numerator, ascending powers of s
        for k, root in enumerate(positions):
            if k != j:
                coeffs = [a - root * b for a, b in zip([0.0, *coeffs], [*coeffs, 0.0], strict=True)]
                denominator *= root_j - root
        weights.append(sum(c * m for c, m in zip(coeffs, moments, strict=True)) / denominator)
    return weights


def _simple_order_2_weights(nodes: list[float], lambda_s: float, lambda_t: float, tau: float,
                            corrector: bool) -> list[float]:
    """The paper's simplified two-node weights (Xue et al. 2023, appendix D; ComfyUI's simple_order_2), oldest
    first: they sum to the exact total but put (1 + tau^2) h^2 / 2 of it on the difference of the two x0s."""
    tau_mul, h = 1 + tau**2, lambda_t - lambda_s
    whole = -math.expm1(-tau_mul * h)
    if corrector:
        return [whole - tau_mul * h / 2, tau_mul * h / 2]
    older = tau_mul * h**2 / 2 / (nodes[0] - lambda_s)
    return [older, whole - older]


@torch.no_grad()
def sample_sa_solver(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    tau_func: Callable[[float], float] | None = None,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
    simple_order_2: bool = False,
    flow: bool = False,
) -> Tensor:
    """SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models",
    data prediction): a stochastic Adams-Bashforth predictor over the last `predictor_order` x0s,
    then at the next level a stochastic Adams-Moulton corrector that redoes the step with the new x0 included
    (up to `corrector_order` of them) and the predictor's noise. `tau_func(sigma_next)` sets each step's
    stochasticity (default `sa_solver_tau` over 20%-80% of SD's schedule, as ComfyUI; return 0 for the ODE).
    `use_pece` evaluates the model again at the corrected state (PECE, twice the model calls). Orders are lowered
    while the history fills and over the last steps of a run ending at sigma 0, as ComfyUI does. `flow`: a
    rectified-flow latent, stepped in its half-log-SNR with x0 weights times alpha = 1 - sigma (sigma below 1)."""
    s = sigmas.tolist()
    if len(s) <= 1:
        return x
    noise_sampler = noise_sampler or unseeded_noise_sampler(x)
    tau_func = tau_func or _default_tau()
    lambdas = [half_log_snr(v, flow) if v > 0 else math.inf for v in s]
    alphas = [1 - v if flow else 1.0 for v in s]
    steps, to_zero = len(s) - 1, s[-1] == 0

    def weights(nodes: list[float], lambda_s: float, lambda_t: float, tau: float, corrector: bool) -> list[float]:
        if simple_order_2 and len(nodes) == 2:
            return _simple_order_2_weights(nodes, lambda_s, lambda_t, tau, corrector)
        return sa_solver_weights(nodes, lambda_s, lambda_t, tau)

    history: list[Tensor] = []  # x0 predictions, oldest first
    x_pred = x_corr = x
    tau, noise = 0.0, None  # of the last predictor step
    for i in range(steps):
        denoised = _call(model, x_pred, s[i], extra_args)
        _report(callback, i, x_pred, s[i], s[i], denoised)
        history = [*history, denoised][-max(predictor_order, corrector_order) :]
        p_order = min(predictor_order, len(history))
        c_order = 0 if i == 0 or (s[i + 1] == 0 and not use_pece) else min(corrector_order, len(history))
        if to_zero:
            p_order, c_order = min(p_order, steps - 1 - i), min(c_order, steps - i)

        # Corrector: the step from sigma_{i-1} again, with the x0 predicted at x_pred among the nodes.
        if c_order == 0:
            x_corr = x_pred
        else:
            decay = s[i] / s[i - 1] * math.exp(-(tau**2) * (lambdas[i] - lambdas[i - 1]))
            w = weights(lambdas[i - c_order + 1 : i + 1], lambdas[i - 1], lambdas[i], tau, corrector=True)
            w = [alphas[i] * v for v in w]
            x_corr = linear_combination([(decay, x_corr), *zip(w, history[-c_order:], strict=True)])
            if noise is not None:
                x_corr.add_(noise)
            if use_pece:
                history[-1] = _call(model, x_corr, s[i], extra_args)

        # Predictor: to sigma_{i+1}, from the corrected state.
        if s[i + 1] == 0:
            x_pred = history[-1]
            continue
        tau, noise = tau_func(s[i + 1]), None
        h = lambdas[i + 1] - lambdas[i]
        w = weights(lambdas[i - p_order + 1 : i + 1], lambdas[i], lambdas[i + 1], tau, corrector=False)
        w = [alphas[i + 1] * v for v in w]
        terms = [(s[i + 1] / s[i] * math.exp(-(tau**2) * h), x_corr), *zip(w, history[-p_order:], strict=True)]
        if tau > 0 and s_noise > 0:
            noise = noise_sampler(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * tau**2 * h)) * s_noise)
            terms.append((1.0, noise))
        x_pred = linear_combination(terms)
    return x_pred
