"""The lcm_upscale sampler: ComfyUI's spread of the ratio over the steps, lcm's steps exactly at ratio 1, a hand-written
loop of LCM steps with the resizes between them, and what follows a latent that changes size (areas, inpainting
channels) or cannot (a noise mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.sampling import DiscreteSchedule, get_sigmas, sample
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGGuider
from ldm.sampling.noise import cpu_generator, prepare_noise, step_noise_seed
from ldm.sampling.samplers_lcm_upscale import sample_lcm_upscale, upscale_factors, upscale_sizes

SCHEDULE = DiscreteSchedule()
POS = [(torch.full((1, 77, 8), 0.1), {})]
NEG = [(torch.full((1, 77, 8), -0.1), {})]


class ConvUNet(torch.nn.Module):
    """A small convolutional eps-predictor that works at any size and sees the prompt and the timestep."""

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(in_channels, 4, 3, padding=1)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, context, y=None):
        self.inputs.append(x)
        return 0.3 * torch.tanh(self.conv(x)) + 0.5 * x[:, :4] + context.mean() + t[:, None, None, None] / 5000


def run(sampler_name: str, latent: torch.Tensor | None = None, unet: torch.nn.Module | None = None, **kwargs):
    args = dict(seed=42, steps=4, cfg=5.0, scheduler="simple", positive=POS, negative=NEG)
    args.update(kwargs)
    latent = torch.zeros(2, 4, 8, 8) if latent is None else latent
    return sample(unet or ConvUNet(), SCHEDULE, latent, sampler_name=sampler_name, **args)


@pytest.mark.parametrize("levels", [2, 3, 5, 9, 21])
@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0, 0.5, 1.37])
@pytest.mark.parametrize("steps", [None, 0, 1, 3, 8, 40])
def test_factors_follow_comfyuis_linspace_rule(levels, ratio, steps):
    """ComfyUI: np.linspace(1, ratio, n)[1:] with n = max(levels // 2 + 1, 2) for scale_steps -1, else
    min(scale_steps + 1, levels + 1); compared as exact floats, so that .5 sizes round alike."""
    count = max(levels // 2 + 1, 2) if steps is None else min(steps + 1, levels + 1)
    expected = [float(f) for f in np.linspace(1.0, ratio, count)[1:]][:levels - 1]  # the steps there are
    assert upscale_factors(levels, ratio, steps) == expected


def test_sizes_over_the_steps():
    # 4 steps (5 levels), -1: the first half of the steps, evenly from 1 to the ratio.
    assert upscale_sizes(8, 8, 5, 1.5) == [(10, 10), (12, 12)]
    assert upscale_sizes(64, 40, 9, 2.0, 3) == [(85, 53), (107, 67), (128, 80)]
    assert upscale_sizes(8, 8, 5, 2.0, 0) == []  # scale_steps 0: no resize
    assert upscale_sizes(8, 8, 2, 2.0) == [(16, 16)]  # one step: resized after it, the result is the larger x0
    # More scale_steps than steps: ComfyUI spreads the ratio over one step more than the run has.
    assert upscale_sizes(10, 10, 5, 2.0, 10) == [(12, 12), (14, 14), (16, 16), (18, 18)]


@pytest.mark.parametrize("steps", [1, 4])
def test_ratio_one_is_the_lcm_sampler_exactly(steps):
    for scale_steps in (None, 2):
        options = {"total_upscale": 1.0, "upscale_steps": scale_steps}
        upscaled = run("lcm_upscale", steps=steps, sampler_options=options)
        assert torch.equal(upscaled, run("lcm", steps=steps))
    assert not torch.equal(upscaled, run("lcm", steps=steps, seed=43))


def test_ratio_one_with_a_noise_mask_is_lcm_with_it():
    latent, mask = torch.randn(1, 4, 8, 8), torch.zeros(8, 8)
    mask[2:6, 1:5] = 1
    expected = run("lcm", latent, noise_mask=mask)
    assert torch.equal(run("lcm_upscale", latent, noise_mask=mask, sampler_options={"total_upscale": 1.0}), expected)
    assert torch.equal(expected[..., 0, :], latent[..., 0, :])  # unmasked rows kept


def bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("ratio", "scale_steps", "sizes"), [
    (1.5, None, [(10, 10), (12, 12)]),
    (2.0, 3, [(11, 11), (13, 13), (16, 16)]),
    (0.5, 1, [(4, 4)]),
])
def test_ksampler_run_is_a_hand_written_loop_of_lcm_steps_with_resizes(ratio, scale_steps, sizes):
    """The whole KSampler path (initial noise, guider at each new size, seeded step noise) against LCM steps written
    out by hand: x0 = guided prediction; resize x0; add sigma_next * fresh noise of the new size."""
    latent, seed, cfg = torch.randn(2, 4, 8, 8) * 0.3, 7, 4.0
    unet = ConvUNet()
    sigmas = get_sigmas("simple", SCHEDULE, 4)
    out = run("lcm_upscale", latent, unet, seed=seed, cfg=cfg,
              sampler_options={"total_upscale": ratio, "upscale_steps": scale_steps})

    guider = CFGGuider(Denoiser(unet, SCHEDULE, "eps"), POS, NEG, cfg)
    generator = cpu_generator(step_noise_seed(seed))
    s = sigmas.tolist()
    x = latent + prepare_noise(latent, seed) * (1 + s[0] ** 2) ** 0.5  # from the top: the variance-preserving scale
    seen = []
    for i in range(4):
        seen.append(tuple(x.shape[-2:]))
        x = guider(x, torch.full((2,), s[i]))
        if i < len(sizes):
            x = bilinear(x, *sizes[i])
        if s[i + 1] > 0:
            x = x + s[i + 1] * torch.randn(x.shape, generator=generator)
    assert seen == [(8, 8), *(sizes[min(i, len(sizes) - 1)] for i in range(3))]  # the model saw each size
    assert out.shape == (2, 4, *sizes[-1])
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)  # x + s * noise here, one fused add there


def test_the_sampler_function_calls_the_model_at_each_size_and_reports_each_step():
    calls, steps = [], []

    def model(x, sigma):
        calls.append((tuple(x.shape), float(sigma[0])))
        return x * 0.5

    x = torch.ones(1, 4, 6, 6)
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.0])
    out = sample_lcm_upscale(model, x, sigmas, total_upscale=2.0, upscale_steps=2, seed=1,
                             callback=lambda d: steps.append((d["i"], tuple(d["denoised"].shape))))
    assert calls == [((1, 4, 6, 6), 3.0), ((1, 4, 9, 9), 2.0), ((1, 4, 12, 12), 1.0)]
    assert steps == [(0, (1, 4, 6, 6)), (1, (1, 4, 9, 9)), (2, (1, 4, 12, 12))]
    assert out.shape == (1, 4, 12, 12)
    # The last step lands on x0 without noise.
    assert torch.equal(sample_lcm_upscale(model, x, sigmas[2:], total_upscale=1.0), x * 0.5)


def test_a_noise_mask_with_a_resize_is_refused_naming_the_problem():
    mask = torch.ones(8, 8)
    with pytest.raises(ValueError, match=r"lcm_upscale resized the latent from \(8, 8\) to \(10, 10\).*noise mask"):
        run("lcm_upscale", noise_mask=mask, sampler_options={"total_upscale": 1.5})
    # Resized only after the last step (one step): caught before the unmasked part is put back.
    with pytest.raises(ValueError, match=r"from \(8, 8\) to \(16, 16\)"):
        run("lcm_upscale", steps=1, noise_mask=mask, sampler_options={"total_upscale": 2.0})


def test_areas_in_latent_pixels_grow_with_the_latent():
    """An area set in latent pixels covers the same part of the image at every size: the run equals the one with
    that area given as fractions, and at ratio 1 the area run equals lcm's."""
    def conds(area):
        return [(torch.full((1, 77, 8), 0.1), {}), (torch.full((1, 77, 8), 0.4), {"area": area, "strength": 2.0})]

    options = {"total_upscale": 2.0, "upscale_steps": 2}
    in_pixels = run("lcm_upscale", positive=conds((8, 4, 0, 4)), sampler_options=options)
    as_fractions = run("lcm_upscale", positive=conds(("percentage", 1.0, 0.5, 0.0, 0.5)), sampler_options=options)
    assert torch.equal(in_pixels, as_fractions)
    whole = run("lcm_upscale", sampler_options=options)
    # At 16x16 the area is the right half (columns 8 to 16): the prompt acts there, not on the far left.
    assert (in_pixels[..., :4] - whole[..., :4]).abs().max() < 0.1 * (in_pixels[..., 12:] - whole[..., 12:]).abs().max()
    assert torch.equal(run("lcm_upscale", positive=conds((8, 4, 0, 4)), sampler_options={"total_upscale": 1.0}),
                       run("lcm", positive=conds((8, 4, 0, 4))))


def test_an_inpainting_models_extra_channels_follow_the_latent():
    unet = ConvUNet(in_channels=9)
    concat = torch.rand(1, 5, 8, 8)
    out = run("lcm_upscale", unet=unet, concat=concat, sampler_options={"total_upscale": 1.5})
    assert out.shape == (2, 4, 12, 12)
    sizes = [tuple(x.shape[-2:]) for x in unet.inputs]
    assert sizes == [(8, 8), (10, 10), (12, 12), (12, 12)]
    for x in unet.inputs:
        resized = concat if x.shape[-2:] == (8, 8) else bilinear(concat, *x.shape[-2:])
        assert torch.equal(x[:, 4:], resized.expand(x.shape[0], -1, -1, -1))
