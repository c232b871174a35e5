"""The extra schedules against independent references: diffusers' AYS tables, k-diffusion, scipy, and by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.sampling import DiscreteSchedule
from ldm.sampling.extra_schedules import (
    AYS_TIMESTEPS,
    added_noise_level,
    ays_noise_levels,
    extend_intermediate_sigmas,
    loglinear_interp,
    sd_sigmas_float64,
    sigmas_align_your_steps,
    sigmas_laplace,
    sigmas_vp,
)
from ldm.sampling.schedules import sigma_at_percent
from tests.ldm.test_sampling_kdiffusion import K


def _diffusers_ays() -> dict:
    schedules = pytest.importorskip("diffusers.schedulers")
    return schedules.AysSchedules


@pytest.mark.parametrize("model_type, name", [("SD1", "StableDiffusion"), ("SDXL", "StableDiffusionXL")])
def test_ays_sd_levels_are_sd_at_nvidias_published_timesteps(model_type, name):
    """diffusers ships NVIDIA's published timesteps, and the continuous levels they were rounded from (to 3
    decimals, last one 0). The levels here are SD's schedule at those timesteps (ComfyUI's table holds the same),
    within 1.5% of the continuous ones, each of which lies at its published timestep (or next to it)."""
    ays = _diffusers_ays()
    assert list(AYS_TIMESTEPS[model_type][:-1]) == ays[f"{name}Timesteps"]
    sigmas = sigmas_align_your_steps(model_type, 10)
    assert len(sigmas) == 11 and sigmas[-1] == 0
    continuous = torch.tensor(ays[f"{name}Sigmas"])
    torch.testing.assert_close(sigmas, continuous, rtol=1.5e-2, atol=0)
    nearest = DiscreteSchedule().sigma_to_t(continuous[:-1], quantize=True)
    assert (nearest - torch.tensor(ays[f"{name}Timesteps"], dtype=nearest.dtype)).abs().max() <= 1


def test_ays_svd_levels_are_nvidias_published_ones():
    torch.testing.assert_close(sigmas_align_your_steps("SVD", 10),
                               torch.tensor(_diffusers_ays()["StableDiffusionVideoSigmas"]))


def test_ays_sd_levels_are_the_float32_schedule_at_the_timesteps_to_float32_rounding():
    table = DiscreteSchedule().sigmas
    levels = ays_noise_levels("SD1")
    # float32's 1 - alphas_cumprod loses a few digits at the first timesteps, where alphas_cumprod is nearly 1.
    torch.testing.assert_close(levels.float(), table[list(AYS_TIMESTEPS["SD1"])], rtol=2e-5, atol=0)
    torch.testing.assert_close(sd_sigmas_float64().float(), table, rtol=2e-5, atol=0)


def test_ays_other_step_counts_interpolate_in_log_sigma():
    """By hand: with 20 steps the 10-step levels stay at every other place and each new level is the geometric
    mean of its neighbours; with 5 steps every other published level is kept."""
    published = ays_noise_levels("SDXL")
    twenty = sigmas_align_your_steps("SDXL", 20)
    torch.testing.assert_close(twenty[0:-1:2], published[:-1].float())
    middles = (published[:-1] * published[1:]).sqrt().float()
    torch.testing.assert_close(twenty[1::2], middles)
    five = sigmas_align_your_steps("SDXL", 5)
    torch.testing.assert_close(five[:-1], published[0:-1:2].float())
    three = loglinear_interp(published, 4)  # positions 0, 10/3, 20/3, 10
    expected = math.exp(math.log(published[3]) * (2 / 3) + math.log(published[4]) / 3)
    assert float(three[1]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("steps, denoise, kept", [(10, 0.5, 5), (10, 0.25, 2), (10, 0.35, 4), (7, 0.999, 7)])
def test_ays_denoise_keeps_the_last_share_of_the_steps(steps, denoise, kept):
    full = sigmas_align_your_steps("SD1", steps)
    part = sigmas_align_your_steps("SD1", steps, denoise)
    assert len(part) == kept + 1 and part[-1] == 0  # round(2.5) is 2: Python's rounding, as in ComfyUI
    torch.testing.assert_close(part[:-1], full[-(kept + 1):-1])


def test_ays_denoise_to_no_step():
    assert len(sigmas_align_your_steps("SD1", 10, 0.0)) == 0
    assert sigmas_align_your_steps("SD1", 10, 0.04).tolist() == [0.0]  # round(0.4) = 0 steps: the last level only


@pytest.mark.parametrize("mu, beta", [(0.0, 0.5), (0.7, 0.3), (-1.0, 1.2)])
def test_laplace_levels_are_laplace_quantiles_in_log_sigma(mu, beta):
    """Hang et al.'s schedule: log-sigma at Laplace(mu, beta) quantiles of probabilities 1 - i/(n-1) (scipy)."""
    stats = pytest.importorskip("scipy.stats")
    n, low, high = 9, 0.03, 14.6
    sigmas = sigmas_laplace(n, low, high, mu, beta)
    assert len(sigmas) == n
    for i in range(1, n - 1):
        reference = math.exp(stats.laplace.ppf(1 - i / (n - 1), loc=mu, scale=beta))
        assert float(sigmas[i]) == pytest.approx(min(max(reference, low), high), rel=1e-4)
    # The ends are the infinite quantiles, kept finite by the 1e-5 inside the logarithm, then clamped.
    ends = [math.exp(mu + side * beta * math.log(1e-5)) for side in (-1, 1)]
    assert [float(sigmas[0]), float(sigmas[-1])] == pytest.approx([min(max(e, low), high) for e in ends], rel=1e-5)


def test_laplace_by_hand_at_the_middle_and_a_quarter():
    sigmas = sigmas_laplace(5, 0.0291675, 14.614642, 0.0, 0.5)
    assert float(sigmas[2]) == pytest.approx(1.0)  # e^mu
    assert float(sigmas[1]) == pytest.approx(math.exp(-0.5 * math.log(0.5 + 1e-5)), rel=1e-6)  # sqrt(2)
    assert float(sigmas[3]) == pytest.approx(math.exp(0.5 * math.log(0.5 + 1e-5)), rel=1e-6)
    assert float(sigmas[-1]) == pytest.approx(0.0291675)  # e^(0.5 ln 1e-5) = 0.0032, clamped; no 0 after it


def test_vp_by_hand():
    sigmas = sigmas_vp(3, beta_d=19.9, beta_min=0.1, eps_s=0.001)
    t_mid = (1 + 0.001) / 2
    for level, t in zip(sigmas.tolist(), [1.0, t_mid, 0.001], strict=False):
        assert level == pytest.approx(math.sqrt(math.exp(19.9 * t * t / 2 + 0.1 * t) - 1), rel=1e-5)
    assert sigmas[-1] == 0 and len(sigmas) == 4


@pytest.mark.skipif(K is None, reason="k-diffusion is not installed")
@pytest.mark.parametrize("n, beta_d, beta_min, eps_s",
                         [(20, 19.9, 0.1, 1e-3), (7, 5.0, 0.3, 0.02), (1, 19.9, 0.1, 1e-3)])
def test_vp_matches_k_diffusion(n, beta_d, beta_min, eps_s):
    """k-diffusion's get_sigmas_vp, run in float64: its exp(x) - 1 loses the low levels to cancellation in float32,
    where the expm1 used here (and by ComfyUI) does not."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        reference = K.get_sigmas_vp(n, beta_d=beta_d, beta_min=beta_min, eps_s=eps_s)
    finally:
        torch.set_default_dtype(default)
    assert reference.dtype == torch.float64
    torch.testing.assert_close(sigmas_vp(n, beta_d, beta_min, eps_s), reference.float(), rtol=1e-5, atol=0)


def test_extend_intermediate_sigmas_by_hand():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.0])
    assert extend_intermediate_sigmas(sigmas, 2, -1.0, 3.0, "linear").tolist() == [10, 7.5, 5, 3.5, 2, 0]
    s = math.sin(math.pi / 4)
    cosine = extend_intermediate_sigmas(sigmas, 2, -1.0, 3.0, "cosine")
    assert cosine.tolist() == pytest.approx([10, 10 - 5 * s, 5, 5 - 3 * s, 2, 0])
    sine = extend_intermediate_sigmas(sigmas, 2, -1.0, 3.0, "sine")
    assert sine.tolist() == pytest.approx([10, 10 - 5 * (1 - s), 5, 5 - 3 * (1 - s), 2, 0])
    # Only steps starting inside [end, start] are split; 3 steps add two levels each.
    inside = extend_intermediate_sigmas(sigmas, 3, 6.0, 1.0, "linear")
    assert inside.tolist() == pytest.approx([10, 5, 4, 3, 2, 4 / 3, 2 / 3, 0])
    assert extend_intermediate_sigmas(sigmas, 1, -1.0, 0.0, "linear").tolist() == sigmas.tolist()
    assert len(extend_intermediate_sigmas(torch.zeros(0), 2, -1.0, 0.0, "linear")) == 0
    assert extend_intermediate_sigmas(torch.tensor([3.0]), 2, -1.0, 0.0, "linear").tolist() == [3.0]


def test_extend_compares_the_bounds_with_the_float32_levels():
    """0.0291675 is 0.02916749939... in float32; ComfyUI compares in float32, so the bound includes that level."""
    sigmas = torch.tensor([1.0, 0.0291675, 0.0])
    extended = extend_intermediate_sigmas(sigmas, 2, -1.0, 0.0291675, "linear")
    assert len(extended) == 5


def test_added_noise_level():
    assert added_noise_level(torch.tensor([14.6, 3.0, 0.0])) == pytest.approx(14.6)
    assert added_noise_level(torch.tensor([14.6, 3.0])) == pytest.approx(11.6)  # a high part split off: the gap
    assert added_noise_level(torch.tensor([2.5])) == pytest.approx(2.5)


def test_sampling_percent_by_hand():
    table = DiscreteSchedule().sigmas
    assert sigma_at_percent(0.0, table) == math.inf and sigma_at_percent(1.0, table) == 0.0
    assert sigma_at_percent(1 - 500 / 999, table) == pytest.approx(float(table[500]), rel=1e-5)
    halfway = math.sqrt(float(table[499]) * float(table[500]))  # timestep 499.5: the log-linear middle
    assert sigma_at_percent(0.5, table) == pytest.approx(halfway, rel=1e-5)


def test_sampling_percent_on_a_distilled_table_finds_the_same_unet_timestep():
    """An LCM-style table holds timesteps 19, 39, ..., 999 (stride 20, offset 19): a percent that falls on
    timestep 519 gives the full schedule's level there; between entries, the log-linear blend of the two."""
    full = DiscreteSchedule().sigmas
    distilled = full[19::20]
    assert sigma_at_percent(1 - 519 / 999, distilled, 20, 19) == pytest.approx(float(full[519]), rel=1e-5)
    between = math.sqrt(float(full[519]) * float(full[539]))  # timestep 529: halfway from entry 25 to 26
    assert sigma_at_percent(1 - 529 / 999, distilled, 20, 19) == pytest.approx(between, rel=1e-5)
    assert sigma_at_percent(0.9999, distilled, 20, 19) == pytest.approx(float(full[19]))  # clamped
    lcm = DiscreteSchedule().distilled(50)
    assert lcm.sigma_at_percent(1 - 519 / 999) == pytest.approx(float(full[519]), rel=1e-5)
