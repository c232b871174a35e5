"""Models trained on continuous noise levels (EDM: CosXL, Playground v2.5): the schedule, the preconditioning
against diffusers' EDMEulerScheduler on a diffusers UNet with the same weights, and the checkpoint markers."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import detect_family, edm_settings, load_checkpoint, load_state_dict
from ldm.presets import PRESETS, make_checkpoint, randomize_
from ldm.sampling import get_sigmas, samplers
from ldm.sampling.denoiser import Conditioning, Denoiser
from ldm.sampling.schedules import ContinuousSchedule
from ldm.unet import UNetModel

CONFIG = PRESETS["tiny-sd1"][2]


def test_the_schedule_is_even_in_log_sigma_with_comfyuis_percent_and_timestep():
    schedule = ContinuousSchedule(0.002, 120.0)
    assert schedule.sigma_min == pytest.approx(0.002) and schedule.sigma_max == pytest.approx(120.0)
    ratios = schedule.sigmas[1:] / schedule.sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)
    for sigma in (0.001, 0.5, 14.6, 300.0):  # past the table's ends too: the model takes any level
        t = schedule.sigma_to_t(torch.tensor([sigma]))
        assert float(schedule.unet_timestep(t)) == pytest.approx(0.25 * math.log(sigma), rel=1e-5, abs=1e-6)
        assert float(schedule.t_to_sigma(t)) == pytest.approx(sigma, rel=1e-5)
        assert schedule.unet_timestep(schedule.sigma_to_t_scalar(sigma)) == pytest.approx(0.25 * math.log(sigma))
    # ComfyUI's percent_to_sigma: evenly in log(sigma) from sigma_max to sigma_min
    assert schedule.sigma_at_percent(0.25) == pytest.approx(math.exp(math.log(120) + 0.25 * math.log(0.002 / 120)))
    assert schedule.sigma_at_percent(0.0) == math.inf and schedule.sigma_at_percent(1.0) == 0.0
    # The normal scheduler (even in the model's timestep) is then even in log(sigma), like karras' rho = 1 would be
    normal = get_sigmas("normal", schedule, 5)[:-1]
    assert torch.allclose(normal.log().diff(), normal.log().diff()[0].expand(4), rtol=1e-4)
    with pytest.raises(ValueError, match="sigma_min"):
        ContinuousSchedule(1.0, 0.5)


@pytest.mark.parametrize(("prediction", "theirs", "sigma_data"), [("edm", "epsilon", 0.5),
                                                                   ("v", "v_prediction", 1.0)])
def test_preconditioning_and_an_euler_run_match_diffusers_edm(prediction, theirs, sigma_data):
    diffusers = pytest.importorskip("diffusers")
    from tests.ldm.diffusers_reference import diffusers_unet

    unet = randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).eval()
    reference = diffusers_unet(CONFIG, unet.state_dict()).eval()
    scheduler = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=sigma_data,
                                            prediction_type=theirs)
    schedule = ContinuousSchedule(0.002, 80.0, sigma_data)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(1, 7, CONFIG.context_dim, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    sigmas = get_sigmas("karras", schedule, 6)
    denoiser = Denoiser(unet, schedule, prediction)

    def theirs_x0(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma_t = torch.tensor(sigma)
        out = reference(scheduler.precondition_inputs(x, sigma_t), scheduler.precondition_noise(sigma_t),
                        encoder_hidden_states=context).sample
        return scheduler.precondition_outputs(x, out, sigma_t)

    with torch.no_grad():
        ours = samplers.sample_euler(lambda x, s: denoiser(x, s, Conditioning(context)), noise * sigmas[0], sigmas)
        x = noise * sigmas[0]
        for sigma, sigma_next in zip(sigmas.tolist(), sigmas.tolist()[1:], strict=False):
            x = x + (x - theirs_x0(x, sigma)) / sigma * (sigma_next - sigma)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)
    plain = Denoiser(unet, schedule, "eps")
    with torch.no_grad():
        assert not torch.allclose(plain(noise, sigmas[:1], Conditioning(context)),
                                  denoiser(noise, sigmas[:1], Conditioning(context)), atol=1e-3)


def test_cosxl_and_playground_checkpoints_are_known_by_their_entries(tmp_path):
    path = make_checkpoint("tiny-sdxl", tmp_path / "base.safetensors", seed=1)
    sd = load_state_dict(path)
    assert edm_settings(sd) is None and detect_family(sd).edm is None

    cosxl = {**sd, "edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)}
    family = detect_family(cosxl)
    assert (family.prediction, family.edm, family.playground) == ("v", pytest.approx((0.002, 120.0, 1.0)), False)

    playground = {**sd, "edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)}
    safetensors.torch.save_file(playground, tmp_path / "playground.safetensors")
    loaded = load_checkpoint(tmp_path / "playground.safetensors")
    assert (loaded.family.prediction, loaded.family.edm, loaded.family.playground) == ("edm", (0.002, 80.0, 0.5),
                                                                                       True)
    assert not any(k.startswith("edm_") for k in loaded.unused_keys)


def test_the_continuous_v_schedule_steps_evenly_in_atan_sigma_as_comfyuis_normal_scheduler():
    from ldm.sampling.schedules import ContinuousVSchedule

    schedule = ContinuousVSchedule(0.03, 500.0)
    for sigma in (0.01, 0.5, 14.6, 800.0):
        timestep = schedule.unet_timestep(schedule.sigma_to_t_scalar(sigma))
        assert timestep == pytest.approx(math.atan(sigma) * 2 / math.pi)
        t = schedule.sigma_to_t(torch.tensor([sigma]))
        assert float(schedule.t_to_sigma(t)) == pytest.approx(sigma, rel=1e-4)
    # ComfyUI's normal scheduler: timesteps evenly from timestep(sigma_max) to timestep(sigma_min), then sigma(t)
    expected = torch.linspace(math.atan(500.0), math.atan(0.03), 6).tan()
    torch.testing.assert_close(get_sigmas("normal", schedule, 6)[:-1], expected.float(), rtol=1e-4, atol=1e-6)
    assert schedule.sigma_at_percent(0.5) == pytest.approx(math.sqrt(0.03 * 500.0))  # even in log(sigma)
