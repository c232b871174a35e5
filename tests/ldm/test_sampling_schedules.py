"""SD's discrete schedule, the named schedulers and seeded noise."""

from __future__ import annotations

import pytest
import torch

from ldm.sampling import (
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    Conditioning,
    Denoiser,
    DiscreteSchedule,
    get_sigmas,
    prepare_noise,
)

SCHEDULE = DiscreteSchedule()


def test_sd_schedule_range():
    assert round(SCHEDULE.sigma_min, 4) == 0.0292
    assert round(SCHEDULE.sigma_max, 4) == 14.6146
    assert SCHEDULE.num_timesteps == 1000


def test_sigma_timestep_round_trip():
    t = torch.tensor([0.0, 1.0, 250.5, 998.25, 999.0])
    assert torch.allclose(SCHEDULE.sigma_to_t(SCHEDULE.t_to_sigma(t)), t, atol=1e-3)
    assert torch.allclose(SCHEDULE.t_to_sigma(torch.arange(1000.0)), SCHEDULE.sigmas)
    assert SCHEDULE.sigma_to_t(torch.tensor([100.0, 1e-4])).tolist() == [999.0, 0.0]
    assert SCHEDULE.sigma_to_t(torch.tensor([1.0]), quantize=True).item() == 354.0


def test_names_in_comfyui_order():
    assert SCHEDULER_NAMES == [
        "normal",
        "karras",
        "exponential",
        "sgm_uniform",
        "simple",
        "ddim_uniform",
        "beta",
        "linear_quadratic",
        "kl_optimal",
    ]
    # ComfyUI's KSampler list (comfy/samplers.py, late 2025): Loom has them all in the same order, then plms
    # from the original SD code.
    comfy = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
             "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
             "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
             "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
             "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
             "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
             "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
             "ddim", "uni_pc", "uni_pc_bh2"]
    assert SAMPLER_NAMES == [*comfy, "plms"]


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_schedulers_descend_to_zero(scheduler, steps):
    sigmas = get_sigmas(scheduler, SCHEDULE, steps)
    assert sigmas[-1] == 0
    assert (sigmas[:-1] > 0).all() and (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[0] <= SCHEDULE.sigma_max * (1 + 1e-6)
    if scheduler not in ("ddim_uniform", "beta"):
        assert len(sigmas) == steps + 1


def test_kl_optimal_is_evenly_spaced_in_atan_sigma():
    sigmas = get_sigmas("kl_optimal", SCHEDULE, 10)[:-1]
    assert sigmas[0] == pytest.approx(SCHEDULE.sigma_max) and sigmas[-1] == pytest.approx(SCHEDULE.sigma_min)
    gaps = sigmas.double().atan().diff()
    assert torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-4)


def test_linear_quadratic_falls_linearly_by_the_threshold_then_quadratically():
    fractions = 1 - get_sigmas("linear_quadratic", SCHEDULE, 10).double() / SCHEDULE.sigma_max
    assert torch.allclose(fractions[:6], torch.arange(6, dtype=torch.float64) * 0.025 / 5)  # 0 .. 0.025 linearly
    second = fractions[5:].diff().diff()  # a constant second difference: a quadratic through 0.025 and 1
    assert torch.allclose(second, second[0].expand_as(second)) and fractions[-1] == 1


def test_normal_includes_the_last_timestep_and_sgm_uniform_does_not():
    assert torch.allclose(get_sigmas("normal", SCHEDULE, 1000)[:-1], SCHEDULE.sigmas.flip(0))
    assert get_sigmas("normal", SCHEDULE, 10)[-2] == pytest.approx(SCHEDULE.sigma_min)
    sgm = get_sigmas("sgm_uniform", SCHEDULE, 10)
    assert sgm[0] == pytest.approx(SCHEDULE.sigma_max)
    assert sgm[-2] == pytest.approx(float(SCHEDULE.t_to_sigma(torch.tensor(99.9))), rel=1e-5)


def test_simple_and_ddim_uniform_pick_table_entries():
    assert torch.equal(get_sigmas("simple", SCHEDULE, 4)[:-1], SCHEDULE.sigmas[[999, 749, 499, 249]])
    assert torch.equal(get_sigmas("ddim_uniform", SCHEDULE, 20)[:-1], SCHEDULE.sigmas[1::50].flip(0))


def test_beta_is_denser_at_both_ends_than_uniform_timesteps():
    t = SCHEDULE.sigma_to_t(get_sigmas("beta", SCHEDULE, 20)[:-1])
    gaps = (t[:-1] - t[1:]).tolist()
    assert gaps[0] < gaps[len(gaps) // 2] and gaps[-1] < gaps[len(gaps) // 2]


def test_unknown_scheduler_is_rejected():
    with pytest.raises(ValueError, match="unknown scheduler"):
        get_sigmas("linear", SCHEDULE, 10)


def test_noise_is_seeded_batch_consistent_and_device_independent():
    latent = torch.zeros(4, 4, 8, 8)
    a, b = prepare_noise(latent, 123), prepare_noise(latent, 123)
    assert torch.equal(a, b) and not torch.equal(a, prepare_noise(latent, 124))
    assert torch.equal(prepare_noise(latent[:2], 123), a[:2])
    assert torch.equal(a, torch.randn(4, 4, 8, 8, generator=torch.manual_seed(123)))
    picked = prepare_noise(latent[:2], 123, batch_index=[3, 1])
    assert torch.equal(picked, a[[3, 1]])
    half = prepare_noise(latent.half(), 123)
    assert half.dtype == torch.float16 and torch.equal(half, a.half())


def test_noise_accepts_the_full_64_bit_seed_range():
    latent = torch.zeros(1, 4, 8, 8)
    top = prepare_noise(latent, 2**64 - 1)
    assert torch.isfinite(top).all() and not torch.equal(top, prepare_noise(latent, 0))


def test_scalar_sigma_to_t_agrees_with_the_tensor_version():
    levels = torch.cat([SCHEDULE.sigmas[::37], torch.linspace(0.01, 20.0, 101)])
    expected = SCHEDULE.sigma_to_t(levels)
    got = torch.tensor([SCHEDULE.sigma_to_t_scalar(v) for v in levels.tolist()])
    assert torch.allclose(got, expected, atol=2e-3)
    quantized = torch.tensor([SCHEDULE.sigma_to_t_scalar(v, quantize=True) for v in levels.tolist()])
    assert torch.equal(quantized, SCHEDULE.sigma_to_t(levels, quantize=True))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_scalar_path_matches_the_per_sample_path(prediction):
    unet = lambda x, t, context, y=None: torch.tanh(x) + t[:, None, None, None] / 1000 + context.mean()  # noqa: E731
    denoiser = Denoiser(unet, SCHEDULE, prediction)
    x, cond = torch.randn(2, 4, 8, 8), Conditioning(torch.randn(2, 5, 8))
    uniform = denoiser(x, torch.tensor([2.5, 2.5]), cond)
    mixed = denoiser(
        torch.cat([x, x]), torch.tensor([2.5, 2.5, 2.5, 2.6]), Conditioning(cond.context.repeat(2, 1, 1))
    )
    assert torch.allclose(uniform, mixed[:2], atol=1e-5)
