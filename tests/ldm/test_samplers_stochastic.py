"""ER-SDE-Solver, SEEDS and SA-Solver. With their noise off they must solve the probability-flow ODE of Gaussian
data (whose solution is known) with their order; single steps are checked against the papers' formulas written out
by hand; with noise on, the exact variance of the final sample (every sampler here is linear on Gaussian data, so it
is computed from the coefficients of the initial latent and of each noise draw) must approach that of the data.
SA-Solver is checked against diffusers' SASolverScheduler on the same levels, stochasticity and noise."""

import math

import numpy as np
import pytest
import torch

from ldm.sampling import SAMPLERS, DiscreteSchedule, get_sigmas, samplers
from ldm.sampling.noise import seeded_noise_sampler
from ldm.sampling.samplers_stochastic import (
    er_sde_noise_scaler,
    er_sde_options,
    sa_solver_tau,
    sa_solver_weights,
    sample_er_sde,
    sample_sa_solver,
    sample_seeds_2,
    sample_seeds_3,
)

sample_sa_solver_pece = SAMPLERS["sa_solver_pece"]  # sa_solver with use_pece, as the KSampler runs it

DATA_STD = 0.8
ODE_SCALER = er_sde_noise_scaler("ODE")
NO_TAU = {"tau_func": lambda sigma: 0.0}


def gaussian_denoiser(x, sigma):
    """The exact x0 estimate for data drawn from N(0, DATA_STD^2): x * s^2 / (s^2 + sigma^2)."""
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x * DATA_STD**2 / (DATA_STD**2 + sigma**2)


def exact(x, sigma_from: float, sigma_to: float):
    """The probability-flow ODE's solution for that data: x scales with sqrt(s^2 + sigma^2)."""
    return x * math.sqrt((DATA_STD**2 + sigma_to**2) / (DATA_STD**2 + sigma_from**2))


class Recorder:
    """A noise sampler handing out known unit noise, and a model recording what it is called with."""

    def __init__(self, shape=(1, 4, 4, 4)):
        self.generator, self.shape = torch.Generator().manual_seed(5), shape
        self.draws, self.queries, self.inputs = [], [], []

    def noise(self, sigma, sigma_next):
        self.queries.append((sigma, sigma_next))
        self.draws.append(torch.randn(self.shape, generator=self.generator, dtype=torch.float64))
        return self.draws[-1]

    def model(self, x, sigma):
        self.inputs.append((x, float(sigma[0])))
        return gaussian_denoiser(x, sigma)


def D(x, sigma: float):
    return gaussian_denoiser(x, torch.tensor([sigma], dtype=torch.float64))


def _error(sampler, steps: int, **kwargs) -> float:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    sigmas = torch.tensor(np.geomspace(10.0, 0.05, steps + 1))
    out = sampler(gaussian_denoiser, x, sigmas, noise_sampler=Recorder().noise, **kwargs)
    return float((out - exact(x, 10.0, 0.05)).abs().max() / exact(x, 10.0, 0.05).abs().max())


@pytest.mark.parametrize(("sampler", "kwargs", "low", "high"), [
    (sample_er_sde, {"noise_scaler": ODE_SCALER, "s_noise": 0.0, "max_stage": 1}, 0.9, 1.1),
    (sample_er_sde, {"noise_scaler": ODE_SCALER, "s_noise": 0.0, "max_stage": 2}, 1.8, 2.2),
    # a multistep method started by a first-order step: its global order is 2 (error below stage 2's, though)
    (sample_er_sde, {"noise_scaler": ODE_SCALER, "s_noise": 0.0}, 1.8, 2.4),
    (sample_seeds_2, {"eta": 0.0}, 1.8, 2.2),
    (sample_seeds_2, {"eta": 0.0, "solver_type": "phi_2"}, 1.8, 2.2),
    (sample_seeds_2, {"eta": 0.0, "solver_type": "phi_2", "r": 1.0}, 1.8, 2.2),
    (SAMPLERS["exp_heun_2_x0"], {}, 1.8, 2.2),  # ComfyUI's name for the line above
    (sample_seeds_3, {"eta": 0.0}, 2.6, 3.3),
    (sample_sa_solver, NO_TAU, 3.0, 5.0),
    (sample_sa_solver_pece, NO_TAU, 3.0, 5.0),
])
def test_without_noise_each_solves_the_probability_flow_ode_with_its_order(sampler, kwargs, low, high):
    """The error against the exact solution at 20, 40 and 80 steps falls by 2^order at each doubling."""
    errors = [_error(sampler, n, **kwargs) for n in (20, 40, 80)]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert low < math.log2(coarse / fine) < high
    if sampler is sample_er_sde and "max_stage" not in kwargs:
        assert errors[-1] < _error(sampler, 80, **kwargs, max_stage=2)


def test_er_sde_steps_by_hand():
    """Three steps of the default ER-SDE (stages 1, 2, 3) against the ER-SDE-Solver-3 update written out:
    x' = r x + (1 - r) D + c1 D' + c2 D'' + sqrt(sigma'^2 - r^2 sigma^2) n, r = phi(sigma') / phi(sigma),
    c1 = sigma' - sigma + phi(sigma') S1, c2 = (sigma' - sigma)^2 / 2 + phi(sigma') S2 with S1, S2 the 200-point
    left Riemann sums of 1 / phi and (l - sigma) / phi over [sigma', sigma], D' and D'' divided differences."""
    rec = Recorder()
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6
    levels = [6.0, 3.5, 2.0, 1.1]
    out = sample_er_sde(rec.model, x, torch.tensor(levels, dtype=torch.float64), s_noise=0.7,
                        noise_sampler=rec.noise)

    def phi(v):
        return v * (np.exp(v**0.3) + 10)

    xs, ds, slopes = [x], [], []
    for i in range(3):
        sigma, sigma_next = levels[i], levels[i + 1]
        ds.append(D(xs[-1], sigma))
        r = phi(sigma_next) / phi(sigma)
        nodes = np.linspace(sigma_next, sigma, 200, endpoint=False)
        width = (sigma - sigma_next) / 200
        c1 = sigma_next - sigma + phi(sigma_next) * np.sum(1 / phi(nodes)) * width
        c2 = (sigma_next - sigma) ** 2 / 2 + phi(sigma_next) * np.sum((nodes - sigma) / phi(nodes)) * width
        new = r * xs[-1] + (1 - r) * ds[-1]
        if i >= 1:
            slopes.append((ds[-1] - ds[-2]) / (sigma - levels[i - 1]))
            new = new + c1 * slopes[-1]
        if i >= 2:
            new = new + c2 * (slopes[-1] - slopes[-2]) / ((sigma - levels[i - 2]) / 2)
        xs.append(new + 0.7 * math.sqrt(sigma_next**2 - r**2 * sigma**2) * rec.draws[i])
    torch.testing.assert_close(out, xs[-1], rtol=1e-10, atol=1e-10)
    assert rec.queries == list(zip(levels, levels[1:], strict=False))


@pytest.mark.parametrize("solver_type", ["ER-SDE", "Reverse-time SDE", "ODE"])
def test_er_sde_riemann_sums_approximate_the_integrals_they_stand_for(solver_type, monkeypatch):
    """The stage weights are phi(sigma') times the integrals of phi'(l) / phi(l)^2 (l - sigma)^n / n! (n = 1, 2)
    over [sigma', sigma], rewritten by parts into sums over 1 / phi. ComfyUI's 200-point left sums get the first
    within 0.6% and the second, a small difference, within 12% (worst on short steps); with 20,000 points both are
    within 0.2%, which checks the rewriting. For the ODE scaler phi(l) = l the first is known in closed form."""
    from scipy import integrate

    from ldm.sampling import samplers_stochastic

    scaler = er_sde_noise_scaler(solver_type, eta=0.7)

    def phi(v):
        return float(scaler(torch.tensor(v, dtype=torch.float64)))

    def dphi(v):
        return (phi(v * (1 + 1e-6)) - phi(v * (1 - 1e-6))) / (2e-6 * v)

    for points, tolerances in ((200, (6e-3, 0.12)), (20000, (1e-4, 2e-3))):
        monkeypatch.setattr(samplers_stochastic, "_ER_SDE_POINTS", points)
        for sigma, sigma_next in ((8.0, 5.0), (8.0, 7.0), (1.0, 0.7), (0.05, 0.03)):
            r, first, second = samplers_stochastic._er_sde_weights(sigma, sigma_next, scaler)
            assert r == pytest.approx(phi(sigma_next) / phi(sigma))
            for n, weight, tolerance in ((1, first, tolerances[0]), (2, second, tolerances[1])):

                def integrand(v, n=n, sigma=sigma):
                    return dphi(v) / phi(v) ** 2 * (v - sigma) ** n / math.factorial(n)

                integral = integrate.quad(integrand, sigma_next, sigma, epsrel=1e-10)[0]
                assert weight == pytest.approx(phi(sigma_next) * integral, rel=tolerance)
            if solver_type == "ODE":
                closed = sigma_next * math.log(sigma / sigma_next) - (sigma - sigma_next)
                assert first == pytest.approx(closed, rel=tolerances[0])


def test_er_sde_options_follow_the_samplerer_sde_node():
    ode = er_sde_options("ODE", max_stage=2, eta=0.5, s_noise=1.0)
    assert ode["s_noise"] == 0.0 and ode["max_stage"] == 2
    assert er_sde_options("ER-SDE", eta=0.0)["s_noise"] == 0.0  # eta 0 is the ODE too
    v = torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(er_sde_options("ODE")["noise_scaler"](v), v)
    torch.testing.assert_close(er_sde_options("Reverse-time SDE", eta=1.0)["noise_scaler"](v), v**2)
    torch.testing.assert_close(er_sde_options("ER-SDE", eta=1.0)["noise_scaler"](v), v * (torch.exp(v**0.3) + 10))
    with pytest.raises(ValueError, match="solver_type"):
        er_sde_noise_scaler("Langevin")


def test_seeds_2_step_by_hand():
    """One SEEDS-2 step, eta 1 and r 1/2: with h = log(sigma / sigma'), the midpoint sigma_m = sqrt(sigma sigma')
    gets x_m = (sigma_m / sigma) e^(-h/2) x + (1 - e^(-h)) D + sigma_m sqrt(1 - e^(-h)) n1, and the step ends at
    x' = (sigma' / sigma) e^(-h) x + (1 - e^(-2h)) D(x_m) + sigma' (e^(-h/2) sqrt(1 - e^(-h)) n1 + sqrt(1 - e^(-h)) n2):
    its noise of variance 1 - e^(-2h) the same Brownian path as the midpoint's."""
    rec = Recorder()
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    sigma, sigma_next = 3.0, 1.2
    out = sample_seeds_2(rec.model, x, torch.tensor([sigma, sigma_next], dtype=torch.float64),
                         noise_sampler=rec.noise)
    h, mid = math.log(sigma / sigma_next), math.sqrt(sigma * sigma_next)
    n1, n2 = rec.draws
    x_mid = (mid / sigma * math.exp(-h / 2) * x + (1 - math.exp(-h)) * D(x, sigma)
             + mid * math.sqrt(1 - math.exp(-h)) * n1)
    noise = math.exp(-h / 2) * math.sqrt(1 - math.exp(-h)) * n1 + math.sqrt(1 - math.exp(-h)) * n2
    expected = sigma_next / sigma * math.exp(-h) * x + (1 - math.exp(-2 * h)) * D(x_mid, mid) + sigma_next * noise
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert rec.queries == [(sigma, pytest.approx(mid)), (pytest.approx(mid), sigma_next)]


def test_seeds_2_without_noise_is_dpm_solver_pp_2s():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    sigmas = get_sigmas("karras", DiscreteSchedule(), 10).double()
    torch.testing.assert_close(sample_seeds_2(gaussian_denoiser, x, sigmas, eta=0.0),
                               samplers.sample_dpmpp_2s_ancestral(gaussian_denoiser, x, sigmas, eta=0.0))


def test_seeds_3_step_by_hand():
    """One SEEDS-3 step (r1 1/3, r2 2/3, eta 1, so the exponential-integrator step is H = 2h): stage k at
    sigma e^(-r_k h) is e^(-r_k h) (sigma_k / sigma) x + the phi-weighted x0s + sigma_k z_k, with
    phi1(z) = (e^z - 1) / z, phi2(z) = (phi1(z) - 1) / z and z_k the noise path carried over between stages."""
    rec = Recorder()
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    sigma, sigma_next = 3.0, 1.2
    out = sample_seeds_3(rec.model, x, torch.tensor([sigma, sigma_next], dtype=torch.float64),
                         noise_sampler=rec.noise, s_noise=0.5)
    h = math.log(sigma / sigma_next)
    big = 2 * h

    def phi1(z):
        return math.expm1(z) / z

    def phi2(z):
        return (phi1(z) - 1) / z

    def level(r):
        return sigma * math.exp(-r * h)

    def carried(z_prev, r_prev, r, n):
        return z_prev * math.exp(-(r - r_prev) * h) + math.sqrt(1 - math.exp(-2 * (r - r_prev) * h)) * n

    n1, n2, n3 = rec.draws
    d0 = D(x, sigma)
    z1 = carried(0 * n1, 0, 1 / 3, n1)
    x1 = level(1 / 3) / sigma * math.exp(-h / 3) * x + big / 3 * phi1(-big / 3) * d0 + 0.5 * level(1 / 3) * z1
    d1 = D(x1, level(1 / 3))
    a = 2 * (2 * big / 3) * phi2(-2 * big / 3)  # (r2 / r1) * H r2 phi2(-H r2)
    z2 = carried(z1, 1 / 3, 2 / 3, n2)
    x2 = (level(2 / 3) / sigma * math.exp(-2 * h / 3) * x + (2 * big / 3 * phi1(-2 * big / 3) - a) * d0 + a * d1
          + 0.5 * level(2 / 3) * z2)
    d2 = D(x2, level(2 / 3))
    b = big * phi2(-big) / (2 / 3)
    z3 = carried(z2, 2 / 3, 1, n3)
    expected = sigma_next / sigma * math.exp(-h) * x + (big * phi1(-big) - b) * d0 + b * d2 + 0.5 * sigma_next * z3
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert len(rec.inputs) == 3


def test_sa_solver_weights_are_the_exponentially_weighted_lagrange_integrals():
    """Against numerical quadrature, for small and large (1 + tau^2) h (the series and the recurrence)."""
    from scipy import integrate

    for h in (0.01, 0.07, 0.4, 2.0):
        for tau in (0.0, 1.0, 3.0):
            tau_mul, start = 1 + tau**2, -0.5
            end = start + h
            for nodes in ([start], [start - h, start], [start - 2.3 * h, start - h, start, end],
                          [start - 4 * h, start - 3 * h, start - 1.7 * h, start - h, start, end]):
                for j, node in enumerate(nodes):

                    def integrand(u, j=j, node=node, nodes=nodes, tau_mul=tau_mul, end=end):
                        basis = math.prod((u - other) / (node - other) for k, other in enumerate(nodes) if k != j)
                        return tau_mul * math.exp(tau_mul * (u - end)) * basis

                    reference = integrate.quad(integrand, start, end, epsabs=1e-15, epsrel=1e-12)[0]
                    assert sa_solver_weights(nodes, start, end, tau)[j] == pytest.approx(reference, rel=1e-9, abs=1e-13)


def test_sa_solver_first_steps_by_hand():
    """Step 0 predicts with one x0: x1 = (sigma1 / sigma0) e^(-tau^2 h) x + (1 - e^(-z)) D0 + sigma1 sqrt(1 -
    e^(-2 tau^2 h)) n, z = (1 + tau^2) h. Step 1 corrects it with D0, D1 (the two-node Adams-Moulton weights
    (z - 1 + e^(-z)) / z on D1, the rest of 1 - e^(-z) on D0; the same noise), then predicts from the corrected
    state with D0, D1 extrapolated (weight -(h1 / h0) (z1 - 1 + e^(-z1)) / z1 on D0)."""
    rec = Recorder()
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    levels, tau = [5.0, 2.5, 1.2, 0.6], 0.8
    sample_sa_solver(rec.model, x, torch.tensor(levels, dtype=torch.float64), tau_func=lambda s: tau,
                     noise_sampler=rec.noise)
    lam = [-math.log(v) for v in levels]
    h0, h1, tau_mul = lam[1] - lam[0], lam[2] - lam[1], 1 + tau**2
    z0, z1 = tau_mul * h0, tau_mul * h1
    noise0 = levels[1] * math.sqrt(1 - math.exp(-2 * tau**2 * h0)) * rec.draws[0]
    x1 = levels[1] / levels[0] * math.exp(-(tau**2) * h0) * x + (1 - math.exp(-z0)) * D(x, levels[0]) + noise0
    torch.testing.assert_close(rec.inputs[1][0], x1, rtol=1e-12, atol=1e-12)
    d0, d1 = D(x, levels[0]), D(x1, levels[1])
    new = (z0 - 1 + math.exp(-z0)) / z0
    corrected = (levels[1] / levels[0] * math.exp(-(tau**2) * h0) * x + (1 - math.exp(-z0) - new) * d0 + new * d1
                 + noise0)
    old = -(h1 / h0) * (z1 - 1 + math.exp(-z1)) / z1
    x2 = (levels[2] / levels[1] * math.exp(-(tau**2) * h1) * corrected + old * d0 + (1 - math.exp(-z1) - old) * d1
          + levels[2] * math.sqrt(1 - math.exp(-2 * tau**2 * h1)) * rec.draws[1])
    torch.testing.assert_close(rec.inputs[2][0], x2, rtol=1e-12, atol=1e-12)


def test_sa_solver_tau_is_eta_inside_comfyuis_interval():
    tau = sa_solver_tau(8.0, 1.0, eta=0.6)
    assert [tau(s) for s in (9.0, 8.0, 3.0, 1.0, 0.5)] == [0.0, 0.6, 0.6, 0.6, 0.0]
    assert sa_solver_tau(8.0, 1.0, eta=0.0)(3.0) == 0.0
    schedule = DiscreteSchedule()
    rec, sigmas = Recorder(), get_sigmas("karras", schedule, 12)
    sample_sa_solver(rec.model, torch.randn(1, 4, 4, 4, dtype=torch.float64), sigmas.double(), noise_sampler=rec.noise)
    high, low = schedule.sigma_at_percent(0.2), schedule.sigma_at_percent(0.8)
    s = sigmas.tolist()
    assert [q[1] for q in rec.queries] == pytest.approx([v for v in s[1:] if high >= v >= low])


@pytest.mark.parametrize(("predictor_order", "corrector_order"), [(3, 4), (2, 2), (1, 3)])
def test_sa_solver_matches_diffusers(predictor_order, corrector_order):
    """diffusers' SASolverScheduler (data prediction) on its own levels, the same noise and stochasticity. Its
    two-node steps use the paper's simplified weights, so ours run with `simple_order_2`; diffusers picks tau by
    the step's starting timestep, ComfyUI by the level it ends at, so ours gets the same values by level. Both run
    in float32; diffusers steps the variance-preserving latent x / sqrt(1 + sigma^2)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.SASolverScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample",
        predictor_order=predictor_order, corrector_order=corrector_order, lower_order_final=False)
    steps = 15
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.clone()
    s = sigmas.tolist()
    tau_by_level = {s[i + 1]: float(scheduler.tau_func(t)) for i, t in enumerate(scheduler.timesteps.tolist())}
    assert set(tau_by_level.values()) == {0.0, 1.0}

    def model(x, sigma):  # any smooth x0 estimate will do: a nonlinear one tests more
        level = sigma.reshape(-1, 1, 1, 1)
        return gaussian_denoiser(x, sigma) + 0.1 * torch.tanh(x) * level / (1 + level)

    x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sample, generator = x_vp, torch.Generator().manual_seed(5)
    for i, t in enumerate(scheduler.timesteps):
        scale = (1 + s[i] ** 2) ** 0.5
        sample = scheduler.step(model(sample * scale, sigmas[i : i + 1].repeat(2)), t, sample,
                                generator=generator).prev_sample
    generator = torch.Generator().manual_seed(5)
    draws = {(s[i], s[i + 1]): torch.randn(2, 4, 8, 8, generator=generator) for i in range(steps)}

    def ours(simple_order_2):
        out = sample_sa_solver(model, x_vp * (1 + s[0] ** 2) ** 0.5, sigmas, tau_func=lambda v: tau_by_level[v],
                               noise_sampler=lambda a, b: draws[(a, b)], predictor_order=predictor_order,
                               corrector_order=corrector_order, simple_order_2=simple_order_2)
        return out / (1 + s[-1] ** 2) ** 0.5

    torch.testing.assert_close(ours(True), sample, rtol=0, atol=5e-5)
    if (predictor_order, corrector_order) == (2, 2):  # without the simplified weights, it is another solver
        assert (ours(False) - sample).abs().max() > 1e-2


def _marginal(sampler, steps: int, **kwargs) -> tuple[float, float]:
    """The exact variance of the final sample relative to DATA_STD^2, and its correlation with the starting latent:
    every update is linear in x and the noise, so one element carrying the starting latent and one per noise draw
    (a one-hot draw) give the coefficients of each."""
    sigmas = get_sigmas("karras", DiscreteSchedule(), steps).double()
    x = torch.zeros(1, 1, 1, 1 + 3 * steps, dtype=torch.float64)
    x[..., 0] = 1
    draws = []

    def one_hot(sigma, sigma_next):
        draws.append(torch.zeros_like(x))
        draws[-1][..., len(draws)] = 1
        return draws[-1]

    out = sampler(gaussian_denoiser, x, sigmas, noise_sampler=one_hot, **kwargs).flatten()
    start_std = math.sqrt(DATA_STD**2 + float(sigmas[0]) ** 2)
    variance = (out[0] * start_std) ** 2 + (out[1 : len(draws) + 1] ** 2).sum()
    return float(variance) / DATA_STD**2, float(out[0] * start_std / variance**0.5)


SDE_CASES = [
    (sample_er_sde, {}),
    (sample_er_sde, {"noise_scaler": er_sde_noise_scaler("Reverse-time SDE")}),
    (sample_seeds_2, {}),
    (sample_seeds_2, {"solver_type": "phi_2"}),
    (sample_seeds_3, {}),
    (sample_sa_solver, {}),
    (sample_sa_solver, {"tau_func": lambda sigma: 1.0}),
    (sample_sa_solver_pece, {}),
]


@pytest.mark.parametrize(("sampler", "kwargs"), SDE_CASES)
def test_with_noise_the_final_variance_approaches_the_datas(sampler, kwargs):
    """The reverse SDE carries N(0, s^2 + sigma_max^2) to the data's N(0, s^2); the last step returns the x0
    estimate at the smallest level, of variance s^4 / (s^2 + sigma_min^2). Within 2% at 40 steps and 0.7% at 80,
    while the result is no longer a function of the starting latent alone (an ODE's correlation with it is 1).
    With its noise off, the same drift would leave far too little variance."""
    target = DATA_STD**2 / (DATA_STD**2 + float(DiscreteSchedule().sigma_min) ** 2)
    (coarse, correlation), (fine, _) = (_marginal(sampler, n, **kwargs) for n in (40, 80))
    assert abs(coarse / target - 1) < 0.02 and abs(fine / target - 1) < 0.007
    assert correlation < 0.7
    assert _marginal(sampler, 40, **kwargs, s_noise=0.0)[0] < 0.5


@pytest.mark.parametrize(("sampler", "kwargs"), SDE_CASES)
def test_seeded_noise_makes_runs_reproducible(sampler, kwargs):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = get_sigmas("karras", DiscreteSchedule(), 8)

    def run(seed):
        return sampler(gaussian_denoiser, x, sigmas, noise_sampler=seeded_noise_sampler(x, seed), **kwargs)

    assert torch.isfinite(run(1)).all()
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


@pytest.mark.parametrize(("sampler", "kwargs", "draws_per_step", "calls_per_step"), [
    (sample_er_sde, {}, 1, 1),
    (sample_seeds_2, {}, 2, 2),
    (sample_seeds_3, {}, 3, 3),
    (sample_sa_solver, {"tau_func": lambda sigma: 1.0}, 1, 1),
    (sample_sa_solver_pece, {"tau_func": lambda sigma: 1.0}, 1, 2),
])
def test_noise_draws_and_model_calls_follow_comfyui(sampler, kwargs, draws_per_step, calls_per_step):
    """Noise is drawn only where the SDE adds it (never into sigma 0, never with it switched off), so the step noise
    stream stays aligned with ComfyUI's; the last step, into sigma 0, returns the denoised prediction."""
    sigmas = torch.tensor([6.0, 3.0, 1.5, 0.7, 0.0], dtype=torch.float64)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6
    rec, reports = Recorder(), []
    out = sampler(rec.model, x, sigmas, noise_sampler=rec.noise, callback=reports.append, **kwargs)
    assert len(rec.draws) == 3 * draws_per_step and [r["i"] for r in reports] == [0, 1, 2, 3]
    # the step into 0 makes one call (PECE: and one at its corrected state); SEEDS evaluate each stage, PECE each
    # corrected state but the first step's
    assert len(rec.inputs) == 1 + 3 * calls_per_step
    torch.testing.assert_close(out, gaussian_denoiser(rec.inputs[-1][0], torch.tensor([0.7], dtype=torch.float64)))
    assert rec.inputs[-1][1] == 0.7
    quiet = Recorder()
    off = {"tau_func": lambda sigma: 0.0} if "tau_func" in kwargs else {"s_noise": 0.0}
    sampler(quiet.model, x, sigmas, noise_sampler=quiet.noise, **off)
    assert quiet.draws == []
