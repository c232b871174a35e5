"""Sampling patches (ldm.sampling.model_patches) and the schedules and predictions ModelSamplingDiscrete picks,
against diffusers' implementations of the same papers where it has one."""

import pytest
import torch

from ldm.sampling import DiscreteSchedule, sample
from ldm.sampling.denoiser import Conditioning, Denoiser
from ldm.sampling.guidance import CFGGuider
from ldm.sampling.model_patches import (
    CfgArgs,
    DifferentialDiffusion,
    PerturbedAttentionGuidance,
    RescaleCFG,
    SamplingPatches,
)


def _v(x0: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The v-prediction that gives `x0` for the unscaled latent `x` at `sigma` (Salimans & Ho 2022)."""
    alpha, s = (1 + sigma**2) ** -0.5, sigma * (1 + sigma**2) ** -0.5
    eps = (x - x0) / sigma
    return alpha * eps - s * x0


@pytest.mark.parametrize("multiplier", [0.0, 0.7, 1.0])
def test_rescale_cfg_matches_diffusers_rescale_noise_cfg_in_v_space(multiplier):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(2, 4, 8, 8, generator=g) * scale for scale in (3.0, 1.0, 1.2))
    sigma, cfg = 2.5, 7.0
    ours = RescaleCFG(multiplier)(CfgArgs(x, torch.full((2,), sigma), cond, uncond, cfg))
    v_cond, v_uncond = _v(cond, x, sigma), _v(uncond, x, sigma)
    v_expected = rescale_noise_cfg(v_uncond + cfg * (v_cond - v_uncond), v_cond, guidance_rescale=multiplier)
    assert torch.allclose(_v(ours, x, sigma), v_expected, atol=1e-4)
    if multiplier == 0.0:
        assert torch.allclose(ours, uncond + cfg * (cond - uncond), atol=1e-4)  # plain cfg


def test_rescale_cfg_without_a_negative_pass_is_the_positive_prediction():
    cond = torch.randn(1, 4, 4, 4)
    assert RescaleCFG(0.7)(CfgArgs(torch.randn(1, 4, 4, 4), torch.ones(1), cond, None, 1.0)) is cond


def test_zero_terminal_snr_matches_diffusers_except_the_finite_last_level():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    base = DiscreteSchedule()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0)
    ours = base.zero_terminal_snr()
    assert torch.allclose(ours.alphas_cumprod[:-1].double(), expected[:-1], rtol=1e-5, atol=1e-9)
    assert expected[-1] == 0 and 4000 < ours.sigma_max < 5000  # pure noise, kept finite
    assert ours.sigma_min == pytest.approx(base.sigma_min, rel=1e-5)  # the first level is unchanged


def test_distilled_schedule_keeps_every_twentieth_level_and_the_unet_sees_the_original_timesteps():
    base = DiscreteSchedule()
    lcm = base.distilled(50)
    assert lcm.num_timesteps == 50
    assert torch.equal(lcm.sigmas, base.sigmas[19::20])
    assert lcm.unet_timestep(lcm.sigma_to_t_scalar(lcm.sigma_max)) == pytest.approx(999)
    assert lcm.unet_timestep(lcm.sigma_to_t_scalar(lcm.sigma_min)) == pytest.approx(19)


@pytest.mark.parametrize("t_index", [0, 24, 49])
def test_lcm_prediction_matches_diffusers_lcm_scheduler(t_index):
    """diffusers' LCMScheduler step: c_skip * sample + c_out * x0 at the original timestep. It applies c_skip
    to the DDPM-scaled sample and we (as ComfyUI) to the unscaled latent; c_skip is below 1e-5 at every
    distilled timestep, so the two agree to that."""
    from diffusers import LCMScheduler

    schedule = DiscreteSchedule().distilled(50)
    sigma = float(schedule.sigmas[t_index])
    timestep = int(schedule.unet_timestep(t_index))
    g = torch.Generator().manual_seed(1)
    eps, x = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g) * (1 + sigma**2) ** 0.5
    seen = []

    def unet(x_in, t, context, y=None):
        seen.append(float(t[0]))
        return eps

    ours = Denoiser(unet, schedule, "lcm").at_level(x, sigma, Conditioning(torch.zeros(1, 1, 8)))
    assert seen == [pytest.approx(timestep)]
    reference = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    reference.set_timesteps(4)
    alpha_bar = reference.alphas_cumprod[timestep]
    sample_vp = x * alpha_bar**0.5
    c_skip, c_out = reference.get_scalings_for_boundary_condition_discrete(timestep)
    x0 = (sample_vp - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    assert torch.allclose(ours, c_out * x0 + c_skip * sample_vp, atol=1e-4)


def test_x0_prediction_is_the_model_output():
    out = torch.randn(1, 4, 8, 8)
    denoiser = Denoiser(lambda *a, **k: out, DiscreteSchedule(), "x0")
    assert torch.equal(denoiser.at_level(torch.randn(1, 4, 8, 8), 3.0, Conditioning(torch.zeros(1, 1, 8))), out)


def test_differential_diffusion_frees_each_pixel_for_the_last_part_of_the_run_its_mask_gives():
    mask = torch.tensor([0.0, 0.3, 0.7, 1.0])
    dd = DifferentialDiffusion()
    assert dd(mask, 1.0).tolist() == [0, 0, 0, 1]
    assert dd(mask, 0.5).tolist() == [0, 0, 1, 1]
    assert dd(mask, 0.2).tolist() == [0, 1, 1, 1]
    assert torch.allclose(DifferentialDiffusion(0.5)(mask, 0.5), torch.tensor([0.0, 0.15, 0.85, 1.0]))


def _unet(x, t, context, y=None):
    return torch.sin(x * 1.3) * 0.5 + context.mean() * 0.1  # a smooth stand-in eps-predictor


def test_differential_diffusion_in_sampling_holds_pixels_until_their_threshold():
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0
    mask[:, :, 2:4] = 0.5
    cond = [(torch.ones(1, 1, 8), {})]
    schedule = DiscreteSchedule()
    kwargs = dict(seed=3, steps=6, cfg=1.0, sampler_name="euler", positive=cond, negative=cond, noise_mask=mask)
    plain = sample(_unet, schedule, latent, **kwargs)
    dd = sample(_unet, schedule, latent, **kwargs, patches=SamplingPatches(denoise_mask=DifferentialDiffusion()))
    assert torch.equal(dd[..., :2], latent[..., :2])  # mask 0: kept
    assert not torch.allclose(dd[..., 2:4], latent[..., 2:4])  # 0.5: repainted over the second half
    assert not torch.allclose(dd[..., 2:4], plain[..., 2:4])  # which differs from a soft 50% blend
    binary = (mask > 0.75).float()
    kwargs["noise_mask"] = binary  # a hard mask is its own threshold at every step
    assert torch.equal(sample(_unet, schedule, latent, **kwargs),
                       sample(_unet, schedule, latent, **kwargs,
                              patches=SamplingPatches(denoise_mask=DifferentialDiffusion())))


def test_pag_adds_the_scaled_gap_to_the_perturbed_model_after_guidance():
    import dataclasses

    from ldm.patches import perturbed_attention_copy
    from ldm.presets import PRESETS, randomize_
    from ldm.unet import UNetModel

    config = dataclasses.replace(PRESETS["tiny-sd1"][2], num_heads=8)
    unet = randomize_(UNetModel(config), torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=g) * 5
    positive = [(torch.randn(1, 7, config.context_dim, generator=g), {})]
    negative = [(torch.randn(1, 7, config.context_dim, generator=g), {})]
    schedule, sigma = DiscreteSchedule(), torch.full((1,), 4.0)
    denoiser = Denoiser(unet, schedule)
    with torch.no_grad():
        plain = CFGGuider(denoiser, positive, negative, 5.0)(x, sigma)
        pag = CFGGuider(denoiser, positive, negative, 5.0, post_cfg=(PerturbedAttentionGuidance(3.0),),
                        module=unet)(x, sigma)
        cond = CFGGuider(denoiser, positive, [], 1.0)(x, sigma)
        perturbed = CFGGuider(Denoiser(perturbed_attention_copy(unet), schedule), positive, [], 1.0)(x, sigma)
    assert torch.allclose(pag, plain + 3.0 * (cond - perturbed), atol=1e-4)
    assert (pag - plain).abs().max() > 1e-3


def test_zero_snr_then_distilled_keeps_every_twentieth_level_of_the_rescaled_table():
    full = DiscreteSchedule().zero_terminal_snr()
    lcm = full.distilled(50)
    assert torch.equal(lcm.sigmas, full.sigmas[19::20]) and lcm.zero_snr
    assert lcm.sigmas[:3].tolist() == pytest.approx([0.1391, 0.2034, 0.2575], rel=2e-3)  # ComfyUI's


def test_a_distilled_model_is_fed_only_its_own_timesteps():
    """sgm_uniform's levels fall between the 50 trained ones; each goes to the nearest (ComfyUI's rounding)."""
    seen = []

    def unet(x, t, context, y=None):
        seen.append(round(float(t[0]), 3))
        return torch.zeros_like(x)

    cond = [(torch.zeros(1, 1, 8), {})]
    sample(unet, DiscreteSchedule().distilled(50), torch.zeros(1, 4, 8, 8), seed=0, steps=4, cfg=1.0,
           sampler_name="lcm", scheduler="sgm_uniform", positive=cond, negative=cond, prediction="lcm")
    assert seen == [999, 759, 519, 259]
