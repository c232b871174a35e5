"""Classifier-free guidance, batching and area/mask composition over CONDITIONING lists."""

from __future__ import annotations

import torch

from ldm.sampling import CFGGuider, Conditioning, Denoiser, DiscreteSchedule
from ldm.sampling.schedules import sigma_at_percent

SCHEDULE = DiscreteSchedule()


class AttentionUNet:
    """Attends from the latent's mean to the context, so repeated context tokens cancel out; logs calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, x, t, context, y=None):
        self.calls.append((x.shape[0], context.shape[1], None if y is None else tuple(y.shape)))
        q = x.mean(dim=(2, 3))
        weights = torch.softmax(torch.einsum("bc,blc->bl", q, context), dim=-1)
        v = torch.einsum("bl,blc->bc", weights, context)
        out = 0.1 * x + v[:, :, None, None] + t[:, None, None, None] / 1000
        return out if y is None else out + y.sum(1)[:, None, None, None]


def setup(h: int = 8, w: int = 8):
    unet = AttentionUNet()
    denoiser = Denoiser(unet, SCHEDULE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, h, w, generator=g) * 3
    sigma = torch.tensor([3.0, 3.0])
    ctx = [torch.randn(1, 77, 4, generator=g) for _ in range(3)]
    return unet, denoiser, x, sigma, ctx


def direct(denoiser, x, sigma, context, y=None):
    return denoiser(x, sigma, Conditioning(context.expand(x.shape[0], -1, -1), y))


def test_cfg_one_skips_the_unconditional_pass():
    unet, denoiser, x, sigma, ctx = setup()
    out = CFGGuider(denoiser, [(ctx[0], {})], [(ctx[1], {})], cfg=1.0)(x, sigma)
    assert unet.calls == [(2, 77, None)]
    assert torch.allclose(out, direct(denoiser, x, sigma, ctx[0]), atol=1e-6)


def test_cond_and_uncond_share_one_call():
    unet, denoiser, x, sigma, ctx = setup()
    out = CFGGuider(denoiser, [(ctx[0], {})], [(ctx[1], {})], cfg=7.5)(x, sigma)
    assert unet.calls == [(4, 77, None)]
    cond, uncond = direct(denoiser, x, sigma, ctx[0]), direct(denoiser, x, sigma, ctx[1])
    assert torch.allclose(out, uncond + 7.5 * (cond - uncond), atol=1e-5)


def test_long_prompts_are_repeated_to_a_common_length():
    unet, denoiser, x, sigma, ctx = setup()
    long = torch.cat([ctx[0], ctx[2]], dim=1)
    out = CFGGuider(denoiser, [(long, {})], [(ctx[1], {})], cfg=5.0)(x, sigma)
    assert unet.calls == [(4, 154, None)]
    cond, uncond = direct(denoiser, x, sigma, long), direct(denoiser, x, sigma, ctx[1])
    assert torch.allclose(out, uncond + 5.0 * (cond - uncond), atol=1e-5)


def test_incommensurable_lengths_run_separately():
    unet, denoiser, x, sigma, ctx = setup()
    odd = torch.randn(1, 400, 4)
    CFGGuider(denoiser, [(odd, {})], [(ctx[1], {})], cfg=5.0)(x, sigma)
    assert sorted(unet.calls) == [(2, 77, None), (2, 400, None)]


def test_area_conditioning_is_blended_with_feathered_edges():
    unet, denoiser, x, sigma, ctx = setup(16, 16)
    area = {"area": (8, 8, 0, 8), "strength": 2.0}  # (h, w, y, x): the top-right quarter
    out = CFGGuider(denoiser, [(ctx[0], {}), (ctx[1], area)], [], cfg=1.0)(x, sigma)
    assert len(unet.calls) == 2  # the whole image and the quarter cannot share a batch
    full = direct(denoiser, x, sigma, ctx[0])
    part = direct(denoiser, x[:, :, :8, 8:], sigma, ctx[1])
    ramp = torch.ones(8)
    ramp[:8] = torch.arange(1, 9) / 8
    weight = 2.0 * ramp.flip(0)[:, None] * ramp[None, :]  # bottom and left edges lie inside the image
    expected = full.clone()
    expected[:, :, :8, 8:] = (full[:, :, :8, 8:] + part * weight) / (1 + weight)
    assert torch.allclose(out, expected, atol=1e-5)


def test_under_cfg_an_area_prompt_gets_the_negative_prompt_over_the_same_area():
    """ComfyUI's pairing: the negative side predicts the area too (with its own prompt and the area's weights),
    so guidance there compares like with like."""
    unet, denoiser, x, sigma, ctx = setup(16, 16)
    area = {"area": (8, 8, 0, 8), "strength": 2.0}
    out = CFGGuider(denoiser, [(ctx[0], {}), (ctx[1], area)], [(ctx[2], {})], cfg=3.0)(x, sigma)
    ramp = torch.arange(1, 9) / 8
    weight = 2.0 * ramp.flip(0)[:, None] * ramp[None, :]

    def blended(whole_ctx, area_ctx):
        full = direct(denoiser, x, sigma, whole_ctx)
        full[:, :, :8, 8:] = (full[:, :, :8, 8:] + direct(denoiser, x[:, :, :8, 8:], sigma, area_ctx) * weight) / (
            1 + weight)
        return full

    cond, uncond = blended(ctx[0], ctx[1]), blended(ctx[2], ctx[2])
    assert torch.allclose(out, uncond + 3.0 * (cond - uncond), atol=1e-4)
    # An area the negative side already has is not doubled.
    unet.calls.clear()
    CFGGuider(denoiser, [(ctx[0], {}), (ctx[1], area)], [(ctx[2], {}), (ctx[2], area)], cfg=3.0)(x, sigma)
    assert sorted(call[0] for call in unet.calls) == [4, 4]  # one whole-image and one area call, both sides


def test_an_area_outside_the_latent_adds_nothing():
    # A prompt placed for a larger image (x = 160 px on a 128-px image): once a negative-size tensor error.
    unet, denoiser, x, sigma, ctx = setup(16, 16)
    outside = {"area": (8, 8, 0, 20), "strength": 1.0}
    out = CFGGuider(denoiser, [(ctx[0], {}), (ctx[1], outside)], [], cfg=1.0)(x, sigma)
    assert len(unet.calls) == 1
    assert torch.allclose(out, direct(denoiser, x, sigma, ctx[0]), atol=1e-6)


def test_masked_conditioning_weights_by_the_mask():
    unet, denoiser, x, sigma, ctx = setup()
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0  # left half, at a higher resolution than the latent
    out = CFGGuider(denoiser, [(ctx[0], {"mask": mask}), (ctx[1], {})], [], cfg=1.0)(x, sigma)
    assert unet.calls == [(4, 77, None)]
    first, second = direct(denoiser, x, sigma, ctx[0]), direct(denoiser, x, sigma, ctx[1])
    m = torch.nn.functional.interpolate(mask[:, None], size=(8, 8), mode="bilinear")
    assert torch.allclose(out, (first * m + second) / (m + 1), atol=1e-5)


def test_y_is_passed_per_entry_and_batched():
    unet, denoiser, x, sigma, ctx = setup()
    y_pos, y_neg = torch.ones(1, 6), torch.zeros(1, 6)
    out = CFGGuider(denoiser, [(ctx[0], {"y": y_pos})], [(ctx[1], {"y": y_neg})], cfg=3.0)(x, sigma)
    assert unet.calls == [(4, 77, (4, 6))]
    cond = direct(denoiser, x, sigma, ctx[0], y_pos.expand(2, -1))
    uncond = direct(denoiser, x, sigma, ctx[1], y_neg.expand(2, -1))
    assert torch.allclose(out, uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_an_entry_acts_only_within_its_timestep_range():
    """ConditioningSetTimestepRange's options: the first prompt for the first half of the run (high sigmas),
    the second for the second half; at each level the other is left out of the model call."""
    unet, denoiser, x, _, ctx = setup()
    positive = [(ctx[0], {"start_percent": 0.0, "end_percent": 0.5}), (ctx[1], {"start_percent": 0.5})]
    guider = CFGGuider(denoiser, positive, [], cfg=1.0)
    middle = sigma_at_percent(0.5, SCHEDULE.sigmas)
    for level, expected in [(middle * 2, ctx[0]), (middle / 2, ctx[1])]:
        unet.calls.clear()
        sigma = torch.full((2,), level)
        out = guider(x, sigma)
        assert unet.calls == [(2, 77, None)]
        assert torch.allclose(out, direct(denoiser, x, sigma, expected), atol=1e-6)
    # At the boundary both act (ComfyUI's inclusive ends), blended with equal weights.
    sigma = torch.full((2,), middle)
    both = (direct(denoiser, x, sigma, ctx[0]) + direct(denoiser, x, sigma, ctx[1])) / 2
    assert torch.allclose(guider(x, sigma), both, atol=1e-5)


def test_mask_bounds_run_the_model_on_the_masks_box_only():
    unet, denoiser, x, sigma, ctx = setup(16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[:, 2:6, 3:12] = 1.0  # 4 x 9: the box grows to 8 rows (the least), 9 columns
    entry = (ctx[0], {"mask": mask, "set_area_to_bounds": True})
    out = CFGGuider(denoiser, [entry, (ctx[1], {})], [], cfg=1.0)(x, sigma)
    assert unet.calls == [(2, 77, None), (2, 77, None)]  # the box and the whole image: two sizes, two calls
    box = direct(denoiser, x[:, :, 2:10, 3:12], sigma, ctx[0])
    whole = direct(denoiser, x, sigma, ctx[1])
    expected = whole.clone()
    expected[:, :, 2:10, 3:12] = (box * mask[:, None, 2:10, 3:12] + whole[:, :, 2:10, 3:12]) / (
        mask[:, None, 2:10, 3:12] + 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_more_masks_than_latents_use_the_first_ones():
    unet, denoiser, x, sigma, ctx = setup()
    first, second = torch.zeros(1, 8, 8), torch.ones(1, 8, 8)
    first[:, :, :4] = 1.0
    two = CFGGuider(denoiser, [(ctx[0], {"mask": torch.cat([first, second])}), (ctx[1], {})], [], cfg=1.0)
    one = CFGGuider(denoiser, [(ctx[0], {"mask": first}), (ctx[1], {})], [], cfg=1.0)
    torch.testing.assert_close(two(x[:1], sigma[:1]), one(x[:1], sigma[:1]))
