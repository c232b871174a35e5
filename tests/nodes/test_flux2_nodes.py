"""FLUX.2's nodes: its empty latent and scheduler (against diffusers' Flux2Pipeline levels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodes.sd.flux2 import EmptyFlux2LatentImage, Flux2Scheduler


@pytest.mark.parametrize(("steps", "width", "height"), [(20, 1024, 1024), (4, 512, 768), (50, 2048, 2048),
                                                        (1, 64, 64)])
def test_flux2_scheduler_gives_the_levels_of_diffusers_flux2_pipeline(steps: int, width: int, height: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    mu = compute_empirical_mu(image_seq_len=(width // 16) * (height // 16), num_steps=steps)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    [sigmas] = Flux2Scheduler().execute(steps, width, height)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    torch.testing.assert_close(sigmas, scheduler.sigmas.float(), atol=1e-6, rtol=0)


def test_larger_images_and_fewer_steps_spend_longer_at_high_noise() -> None:
    small, large = (Flux2Scheduler().execute(20, side, side)[0] for side in (512, 2048))
    few, many = (Flux2Scheduler().execute(steps, 1024, 1024)[0] for steps in (4, 200))
    assert (large[1:-1] > small[1:-1]).all()
    assert few[len(few) // 2] > many[len(many) // 2]


def test_empty_flux2_latent_is_128_channels_at_a_sixteenth() -> None:
    [latent] = EmptyFlux2LatentImage().execute(1024, 768, 2)
    assert latent["samples"].shape == (2, 128, 48, 64) and not latent["samples"].any()
    assert latent["downscale_ratio_spacial"] == 16
