"""Flow-matching sampling of Flux: the shifted levels against diffusers' FlowMatchEulerDiscreteScheduler, and a whole
euler run through Loom's k-diffusion samplers against diffusers' FluxPipeline with the same model and noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ldm.sampling import get_sigmas, prepare_noise, sample
from ldm.sampling.flow import FlowSchedule, resolution_shift, time_shift
from tests.ldm.flux_reference import TINY, diffusers_twin, random_flux

DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def test_table_and_shift() -> None:
    schedule = FlowSchedule(1.15)
    assert schedule.num_timesteps == 10000 and schedule.sigma_max == 1.0
    assert schedule.sigma_min == pytest.approx(time_shift(1.15, 1e-4))
    assert float(schedule.sigmas[4999]) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))
    # ModelSamplingFlux's shift is diffusers' mu for the image's number of 2x2 latent patches.
    for width, height in [(1024, 1024), (512, 512), (768, 1344), (256, 256)]:
        assert resolution_shift(width, height) == pytest.approx(calculate_shift(width * height // 256))
    assert resolution_shift(1024, 1024) == pytest.approx(1.15)


@pytest.mark.parametrize("steps", [4, 7, 20])
def test_simple_scheduler_gives_diffusers_flow_match_levels(steps: int) -> None:
    mu = resolution_shift(512, 768)
    reference = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = get_sigmas("simple", FlowSchedule(mu), steps)
    # Every (10000 / steps)-th entry of the table: the same levels as far as 1/10000 rounds them.
    torch.testing.assert_close(ours, reference.sigmas.float(), rtol=0, atol=2e-4 if 10000 % steps else 1e-6)


def test_normal_scheduler_shifts_twice_as_comfyuis_does() -> None:
    schedule = FlowSchedule(1.15)
    expected = time_shift(1.15, torch.linspace(1.0, schedule.sigma_min, 5, dtype=torch.float64)).float()
    torch.testing.assert_close(get_sigmas("normal", schedule, 5), torch.cat([expected, torch.zeros(1)]))


def test_percent_levels() -> None:
    schedule = FlowSchedule(1.0)
    assert schedule.sigma_at_percent(0.0) == math.inf and schedule.sigma_at_percent(1.0) == 0.0
    # Shift 1 (ComfyUI's for schnell) is e / (e + 1/t - 1), not t; shift 0 leaves t as it is.
    assert schedule.sigma_at_percent(0.25) == pytest.approx(math.e / (math.e + 1 / 0.75 - 1))
    assert FlowSchedule(0.0).sigma_at_percent(0.25) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="already ends at pure noise"):
        schedule.zero_terminal_snr()


def loom_run(model, context, y, noise_seed: int, steps: int, shift: float, **kwargs) -> torch.Tensor:
    latent = torch.zeros(1, 16, 6, 8)
    positive = [(context, {"y": y})]
    with torch.no_grad():
        return sample(model, FlowSchedule(shift), latent, seed=noise_seed, steps=steps, cfg=1.0,
                      **{"sampler_name": "euler", **kwargs}, scheduler="simple", positive=positive,
                      negative=positive, prediction="flow")


@pytest.mark.parametrize("steps", [4, 10])
def test_euler_run_matches_flux_pipeline(steps: int) -> None:
    model = random_flux()
    generator = torch.Generator().manual_seed(5)
    context = torch.randn(1, 7, TINY.context_dim, generator=generator)
    pooled = torch.randn(1, TINY.vec_in_dim, generator=generator)
    height, width = 6 * 8, 8 * 8  # pixels of a 6x8 latent
    mu = calculate_shift((6 // 2) * (8 // 2))
    ours = loom_run(model, context, torch.cat([pooled, torch.tensor([[3.5]])], dim=1), 11, steps, mu)

    noise = prepare_noise(torch.zeros(1, 16, 6, 8), 11)  # what Loom's sample drew for seed 11
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=diffusers_twin(model))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        packed = pipe(prompt_embeds=context, pooled_prompt_embeds=pooled, height=height, width=width,
                      num_inference_steps=steps, guidance_scale=3.5, output_type="latent",
                      latents=FluxPipeline._pack_latents(noise, 1, 16, 6, 8)).images
    expected = FluxPipeline._unpack_latents(packed, height, width, 8)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_two_stage_run_with_leftover_noise_equals_one_run() -> None:
    model = random_flux()
    generator = torch.Generator().manual_seed(6)
    context = torch.randn(1, 5, TINY.context_dim, generator=generator)
    y = torch.cat([torch.randn(1, TINY.vec_in_dim, generator=generator), torch.tensor([[2.0]])], dim=1)
    whole = loom_run(model, context, y, 3, 6, 1.15)
    first = loom_run(model, context, y, 3, 6, 1.15, end_step=2, return_leftover_noise=True)
    second = sample(model, FlowSchedule(1.15), first, seed=0, steps=6, cfg=1.0, sampler_name="euler",
                    scheduler="simple", positive=[(context, {"y": y})], negative=[(context, {"y": y})],
                    prediction="flow", start_step=2, add_noise=False)
    # The first stage hands over x / (1 - sigma) (ComfyUI's inverse noise scaling), which the second scales back.
    assert not torch.allclose(first, whole, atol=0.1)
    torch.testing.assert_close(second, whole, rtol=1e-5, atol=1e-5)


def test_noise_mask_keeps_the_unmasked_latent() -> None:
    model = random_flux()
    context = torch.randn(1, 5, TINY.context_dim)
    y = torch.cat([torch.randn(1, TINY.vec_in_dim), torch.tensor([[2.0]])], dim=1)
    latent = torch.randn(1, 16, 6, 8)
    mask = torch.zeros(6, 8)
    mask[:, :4] = 1
    with torch.no_grad():
        out = sample(model, FlowSchedule(1.15), latent, seed=1, steps=3, cfg=1.0, sampler_name="euler",
                     scheduler="simple", positive=[(context, {"y": y})], negative=[(context, {"y": y})],
                     prediction="flow", noise_mask=mask)
    assert torch.equal(out[..., 4:], latent[..., 4:]) and not torch.allclose(out[..., :4], latent[..., :4])


def test_samplers_adding_sd_style_noise_are_refused() -> None:
    # ComfyUI has no rectified-flow form of these (the ancestral and SDE ones it has are in test_flow_samplers).
    with pytest.raises(ValueError, match="res_multistep_ancestral adds noise as SD models take it"):
        loom_run(random_flux(), torch.zeros(1, 5, TINY.context_dim), torch.zeros(1, TINY.y_dim), 0, 2, 1.15,
                 sampler_name="res_multistep_ancestral")
