"""Every k-diffusion-family sampler and scheduler against k-diffusion's own `sampling.py`."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from ldm.sampling import (
    Conditioning,
    Denoiser,
    DiscreteSchedule,
    dpm_solver,
    get_sigmas,
    samplers,
    samplers_ldm,
    samplers_sde,
)
from ldm.sampling.noise import BrownianTreeNoiseSampler, seeded_noise_sampler
from ldm.sampling.schedulers import sigmas_exponential, sigmas_karras


def _load_k_diffusion_sampling() -> types.ModuleType | None:
    """k_diffusion/sampling.py loaded by path: the package itself imports torchvision and more."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "sampling.py"
    package = types.ModuleType("_kd_ref")
    package.__path__ = []
    utils = types.ModuleType("_kd_ref.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    stubs = {"_kd_ref": package, "_kd_ref.utils": utils}
    if importlib.util.find_spec("torchdiffeq") is None:
        stubs["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module_spec = importlib.util.spec_from_file_location("_kd_ref.sampling", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


K = _load_k_diffusion_sampling()
pytestmark = pytest.mark.skipif(K is None, reason="k-diffusion is not installed")

SCHEDULE = DiscreteSchedule()


class TinyUNet(torch.nn.Module):
    """A small conv net with timestep and context inputs, shaped like the real UNet's call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 4, 3, padding=1)
        self.time = torch.nn.Linear(1, 16)
        self.ctx = torch.nn.Linear(8, 16)

    def forward(self, x, t, context, y=None):
        h = (
            self.conv1(x)
            + self.time(t[:, None] / 1000)[:, :, None, None]
            + self.ctx(context.mean(1))[:, :, None, None]
        )
        return 0.5 * torch.tanh(self.conv2(torch.nn.functional.silu(h))) + 0.5 * x


def gaussian_denoiser(mean: float = 0.3, std: float = 0.7):
    """The exact denoiser E[x0 | x0 + sigma n = x] of data ~ N(mean, std^2) per element."""

    def model(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return mean + std**2 / (std**2 + s**2) * (x - mean)

    return model


def unet_denoiser():
    denoiser = Denoiser(TinyUNet().eval(), SCHEDULE)
    cond = Conditioning(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3)))
    return lambda x, sigma: denoiser(x, sigma, cond)


MODELS = {"gaussian": gaussian_denoiser, "unet": unet_denoiser}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def start(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]


ODE = {
    "euler": (samplers.sample_euler, "sample_euler"),
    "heun": (samplers.sample_heun, "sample_heun"),
    "dpm_2": (samplers.sample_dpm_2, "sample_dpm_2"),
    "lms": (samplers.sample_lms, "sample_lms"),
    "dpmpp_2m": (samplers.sample_dpmpp_2m, "sample_dpmpp_2m"),
}
STOCHASTIC = {
    "euler_ancestral": (samplers.sample_euler_ancestral, "sample_euler_ancestral"),
    "dpm_2_ancestral": (samplers.sample_dpm_2_ancestral, "sample_dpm_2_ancestral"),
    "dpmpp_2s_ancestral": (samplers.sample_dpmpp_2s_ancestral, "sample_dpmpp_2s_ancestral"),
    "dpmpp_sde": (samplers.sample_dpmpp_sde, "sample_dpmpp_sde"),
    "dpmpp_2m_sde": (samplers_sde.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde"),
    "dpmpp_3m_sde": (samplers_sde.sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde"),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", list(ODE))
def test_ode_samplers_match_k_diffusion(name, model_name):
    ours, theirs = ODE[name]
    model = MODELS[model_name]()
    sigmas = get_sigmas("karras", SCHEDULE, 20)
    x = start(sigmas)
    expected = getattr(K, theirs)(model, x, sigmas, disable=True)
    assert rel_err(ours(model, x, sigmas), expected) < 1e-5


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_samplers_match_k_diffusion_with_the_same_noise(name, model_name):
    ours, theirs = STOCHASTIC[name]
    model = MODELS[model_name]()
    sigmas = get_sigmas("normal", SCHEDULE, 20)
    x = start(sigmas)
    expected = getattr(K, theirs)(model, x, sigmas, disable=True, noise_sampler=seeded_noise_sampler(x, 7))
    got = ours(model, x, sigmas, noise_sampler=seeded_noise_sampler(x, 7))
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("kwargs", [{"solver_type": "heun"}, {"eta": 0.0}, {"eta": 0.5, "s_noise": 0.8}])
def test_dpmpp_2m_sde_options_match(kwargs):
    model = gaussian_denoiser()
    sigmas = get_sigmas("exponential", SCHEDULE, 20)
    x = start(sigmas)
    expected = K.sample_dpmpp_2m_sde(
        model, x, sigmas, disable=True, noise_sampler=seeded_noise_sampler(x, 2), **kwargs
    )
    got = samplers_sde.sample_dpmpp_2m_sde(
        model, x, sigmas, noise_sampler=seeded_noise_sampler(x, 2), **kwargs
    )
    assert rel_err(got, expected) < 1e-5


def test_churn_matches_k_diffusion_given_the_same_noise():
    model = gaussian_denoiser()
    sigmas = get_sigmas("karras", SCHEDULE, 20)
    x = start(sigmas)
    torch.manual_seed(5)
    expected = K.sample_euler(model, x, sigmas, disable=True, s_churn=5.0)
    torch.manual_seed(5)
    got = samplers.sample_euler(model, x, sigmas, s_churn=5.0)
    assert rel_err(got, expected) < 1e-5


def test_ddim_is_euler_and_ancestral_with_eta():
    model = gaussian_denoiser()
    sigmas = get_sigmas("ddim_uniform", SCHEDULE, 20)
    x = start(sigmas)
    assert torch.equal(samplers_ldm.sample_ddim(model, x, sigmas), samplers.sample_euler(model, x, sigmas))
    expected = K.sample_euler_ancestral(model, x, sigmas, eta=0.5, noise_sampler=seeded_noise_sampler(x, 1))
    got = samplers_ldm.sample_ddim(model, x, sigmas, eta=0.5, noise_sampler=seeded_noise_sampler(x, 1))
    assert rel_err(got, expected) < 1e-5


def test_brownian_tree_matches_k_diffusion():
    x = torch.zeros(2, 4, 8, 8)
    ours = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=42)
    theirs = K.BrownianTreeNoiseSampler(x, torch.tensor(0.03), torch.tensor(14.6), seed=42)
    for a, b in [(14.6, 7.0), (7.0, 1.5), (1.5, 0.03)]:
        assert rel_err(ours(a, b), theirs(torch.tensor(a), torch.tensor(b))) < 1e-4


@pytest.mark.parametrize("steps", [1, 2, 20, 37])
def test_karras_and_exponential_match_k_diffusion_and_end_in_zero(steps):
    smin, smax = SCHEDULE.sigma_min, SCHEDULE.sigma_max
    for ours, theirs in [
        (sigmas_karras, K.get_sigmas_karras),
        (sigmas_exponential, K.get_sigmas_exponential),
    ]:
        got, expected = ours(steps, smin, smax), theirs(steps, smin, smax)
        assert torch.allclose(got, expected, rtol=1e-5, atol=0)
        assert got[-1] == 0 and len(got) == steps + 1
    assert torch.equal(get_sigmas("karras", SCHEDULE, steps), sigmas_karras(steps, smin, smax))


def test_denoiser_matches_k_diffusion_style_preconditioning():
    unet = TinyUNet().eval()
    cond = Conditioning(torch.randn(1, 5, 8))
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([3.0])
    t = SCHEDULE.sigma_to_t(sigma)
    eps = unet(x / math.sqrt(10), t, cond.context)
    assert torch.allclose(Denoiser(unet, SCHEDULE)(x, sigma, cond), x - 3 * eps, atol=1e-6)
    v = eps
    expected = x / 10 - v * 3 / math.sqrt(10)
    assert torch.allclose(Denoiser(unet, SCHEDULE, prediction="v")(x, sigma, cond), expected, atol=1e-6)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("steps", [9, 10, 20])
def test_dpm_fast_matches_k_diffusion(model_name, steps):
    model = MODELS[model_name]()
    sigmas = get_sigmas("karras", SCHEDULE, steps)
    x = start(sigmas)
    expected = K.sample_dpm_fast(model, x, float(sigmas[-2]), float(sigmas[0]), steps, disable=True)
    assert rel_err(dpm_solver.sample_dpm_fast(model, x, sigmas), expected) < 1e-5


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_matches_k_diffusion(order, float64_default):
    # In float64: k-diffusion keeps its times in default-dtype tensors, and in float32 their
    # rounding, fed through the step-size controller, moves the result by ~1e-4.
    model = gaussian_denoiser()
    sigmas = get_sigmas("karras", SCHEDULE, 20).double()
    x = start(sigmas).double()
    expected, info = K.sample_dpm_adaptive(
        model, x, float(sigmas[-2]), float(sigmas[0]), order=order, disable=True, return_info=True
    )
    calls = []
    got = dpm_solver.sample_dpm_adaptive(lambda x, s: calls.append(1) or model(x, s), x, sigmas, order=order)
    assert rel_err(got, expected) < 1e-10
    assert len(calls) == info["nfe"]


def test_the_ksamplers_ancestral_noise_is_comfyuis_on_the_cpu():
    """ComfyUI's KSampler on the CPU: the initial noise from the seed, the step noise from a generator seeded with
    seed + 1, one draw shaped like the latent per noisy step; the same run through k-diffusion's own sampler."""
    from ldm.sampling import compute_sigmas, sample
    from ldm.sampling.guidance import CFGGuider

    positive, negative = [(torch.full((1, 77, 8), 0.1), {})], [(torch.full((1, 77, 8), -0.1), {})]
    sigmas = compute_sigmas(SCHEDULE, "normal", 6)
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(42))
    step = torch.Generator().manual_seed(43)
    guider = CFGGuider(Denoiser(TinyUNet(), SCHEDULE), positive, negative, 6.0)
    with torch.no_grad():
        expected = K.sample_euler_ancestral(guider, noise * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas,
                                            noise_sampler=lambda sigma, sigma_next: torch.randn(latent.shape,
                                                                                                generator=step))
        ours = sample(TinyUNet(), SCHEDULE, latent, seed=42, steps=6, cfg=6.0, sampler_name="euler_ancestral",
                      scheduler="normal", positive=positive, negative=negative)
    torch.testing.assert_close(ours, expected)
