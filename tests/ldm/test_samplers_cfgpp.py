"""CFG++ samplers and dual guidance. No library besides ComfyUI implements them, so they are checked by hand on
one step and by their identities: with the unconditional prediction equal to the guided one, each CFG++
sampler is its plain counterpart; a second positive prompt equal to the first is plain guidance."""

import pytest
import torch

from ldm.sampling import DiscreteSchedule, get_sigmas, sample, samplers
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGGuider, DualCfg
from ldm.sampling.noise import seeded_noise_sampler
from ldm.sampling.samplers_cfgpp import (
    UncondCapture,
    sample_dpmpp_2m_cfg_pp,
    sample_dpmpp_2s_ancestral_cfg_pp,
    sample_euler_ancestral_cfg_pp,
    sample_euler_cfg_pp,
)

SIGMAS = get_sigmas("karras", DiscreteSchedule(), 6)


def _model(uncond_scale: float | None):
    """A stand-in guided denoiser, x0 = 0.5 x + 0.1 sin(x); it records an unconditional x0 (`uncond_scale` x,
    or the guided one itself for None), as the guider does."""
    capture = UncondCapture()

    def model(x, sigma):
        denoised = 0.5 * x + 0.1 * torch.sin(x)
        capture.value = denoised if uncond_scale is None else uncond_scale * x
        return denoised

    return model, capture


def test_euler_cfg_pp_one_step_by_hand():
    model, capture = _model(0.2)
    x = torch.randn(1, 4, 4, 4)
    out = sample_euler_cfg_pp(model, x, SIGMAS[:2], uncond=capture)
    s0, s1 = SIGMAS[:2].tolist()
    expected = 0.5 * x + 0.1 * torch.sin(x) + (x - 0.2 * x) * (s1 / s0)  # x0_guided + sigma' * eps_uncond
    assert torch.allclose(out, expected, atol=1e-6)


def test_euler_cfg_pp_alternative_one_step_by_hand_and_euler_when_the_predictions_agree():
    """ComfyUI's "alternative" SamplerEulerCFG++: an Euler step along (x - 2 x0_guided + x0_uncond) / sigma."""
    model, capture = _model(0.2)
    x = torch.randn(1, 4, 4, 4)
    out = sample_euler_cfg_pp(model, x, SIGMAS[:2], uncond=capture, alternative=True)
    s0, s1 = SIGMAS[:2].tolist()
    denoised = 0.5 * x + 0.1 * torch.sin(x)
    assert torch.allclose(out, x + (x - 2 * denoised + 0.2 * x) * ((s1 - s0) / s0), atol=1e-6)
    agreeing, capture = _model(None)
    torch.testing.assert_close(sample_euler_cfg_pp(agreeing, x, SIGMAS, uncond=capture, alternative=True),
                               samplers.sample_euler(agreeing, x, SIGMAS))


def test_euler_ancestral_cfg_pp_on_a_flow_latent_one_step_by_hand():
    """ComfyUI's half-log-SNR form with a rectified flow's alpha = 1 - sigma (lambda = log((1 - s) / s), alpha =
    s e^lambda): x' = a_t x0 + a_t s_down (x - a_s x0_uncond) / s + a_t s_up n, the ancestral step between s / a."""
    model, capture = _model(0.2)
    x, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    s0, s1 = 0.8, 0.5
    out = sample_euler_ancestral_cfg_pp(model, x, torch.tensor([s0, s1]), uncond=capture, flow=True,
                                        noise_sampler=lambda a, b: noise)
    a0, a1 = (s * torch.tensor((1 - s) / s).log().exp().item() for s in (s0, s1))
    t0, t1 = s0 / a0, s1 / a1
    up = min(t1, (t1**2 * (t0**2 - t1**2) / t0**2) ** 0.5)
    down = (t1**2 - up**2) ** 0.5
    denoised = 0.5 * x + 0.1 * torch.sin(x)
    expected = a1 * denoised + a1 * down * (x - a0 * 0.2 * x) / s0 + a1 * up * noise
    assert torch.allclose(out, expected, atol=1e-6)
    last = sample_euler_ancestral_cfg_pp(model, x, torch.tensor([s0, 0.0]), uncond=capture, flow=True)
    assert torch.equal(last, denoised)  # the last step lands on the guided prediction


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m"])
def test_cfg_pp_with_the_guided_prediction_as_unconditional_is_the_plain_sampler(name):
    model, capture = _model(None)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * SIGMAS[0]
    cfg_pp = {"euler": sample_euler_cfg_pp, "euler_ancestral": sample_euler_ancestral_cfg_pp,
              "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral_cfg_pp, "dpmpp_2m": sample_dpmpp_2m_cfg_pp}[name]
    plain = getattr(samplers, f"sample_{name}")
    noisy = "ancestral" in name
    noise = {"noise_sampler": seeded_noise_sampler(x, 3)} if noisy else {}
    expected = plain(model, x, SIGMAS, **noise)
    noise = {"noise_sampler": seeded_noise_sampler(x, 3)} if noisy else {}
    assert torch.allclose(cfg_pp(model, x, SIGMAS, uncond=capture, **noise), expected, atol=1e-4, rtol=1e-5)


def _unet(x, t, context, y=None):
    return torch.sin(x * 1.3) * 0.5 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) * 0.3


def _cond(value: float):
    return [(torch.full((1, 2, 8), value), {})]


def test_cfg_pp_in_sample_differs_from_plain_and_matches_it_when_the_prompts_agree():
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    schedule = DiscreteSchedule()
    kwargs = dict(seed=2, steps=5, cfg=1.5)
    for name in ("euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m"):
        same = sample(_unet, schedule, latent, sampler_name=f"{name}_cfg_pp", positive=_cond(1.0),
                      negative=_cond(1.0), **kwargs)
        plain = sample(_unet, schedule, latent, sampler_name=name, positive=_cond(1.0), negative=_cond(1.0),
                       **kwargs)
        assert torch.allclose(same, plain, atol=1e-4, rtol=1e-5)
        different = sample(_unet, schedule, latent, sampler_name=f"{name}_cfg_pp", positive=_cond(1.0),
                           negative=_cond(-1.0), **kwargs)
        guided = sample(_unet, schedule, latent, sampler_name=name, positive=_cond(1.0), negative=_cond(-1.0),
                        **kwargs)
        assert (different - guided).abs().max() > 1e-3
    # At cfg 1 the negative prompt still sets the re-noising direction, as in ComfyUI.
    one = dict(kwargs, cfg=1.0)
    assert not torch.allclose(
        sample(_unet, schedule, latent, sampler_name="euler_cfg_pp", positive=_cond(1.0), negative=_cond(-1.0), **one),
        sample(_unet, schedule, latent, sampler_name="euler", positive=_cond(1.0), negative=_cond(-1.0), **one))


@pytest.mark.parametrize("nested", [False, True])
def test_dual_guidance_by_hand(nested):
    denoiser = Denoiser(_unet, DiscreteSchedule())
    x, sigma = torch.randn(1, 4, 8, 8), torch.full((1,), 3.0)
    positive, negative, middle = _cond(1.0), _cond(-1.0), _cond(0.3)
    pos, neg, mid = (CFGGuider(denoiser, c, [], 1.0)(x, sigma) for c in (positive, negative, middle))
    dual = CFGGuider(denoiser, positive, negative, 4.0, dual=DualCfg(middle, 2.5, nested))(x, sigma)
    if nested:
        expected = neg + 2.5 * (mid + 4.0 * (pos - mid) - neg)
    else:
        expected = neg + 2.5 * (mid - neg) + 4.0 * (pos - mid)
    assert torch.allclose(dual, expected, atol=1e-5)
    # A second prompt equal to the first: plain guidance at the second scale (regular style).
    if not nested:
        same = CFGGuider(denoiser, positive, negative, 4.0, dual=DualCfg(positive, 2.5))(x, sigma)
        assert torch.allclose(same, CFGGuider(denoiser, positive, negative, 2.5)(x, sigma), atol=1e-5)
