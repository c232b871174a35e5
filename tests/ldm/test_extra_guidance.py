"""Temporal Score Rescaling, Tangential Amplifying Guidance, FreSca, CFG Override and the negative prompt predicted by
another module (SkipLayerGuidanceDiTSimple, DualModelGuider), against ComfyUI's arithmetic written out here."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch

from ldm.sampling import CFGGuider, Conditioning, Denoiser, DiscreteSchedule
from ldm.sampling.extra_guidance import (
    CfgOverride,
    FreSca,
    NegativeOnModel,
    TangentialAmplifyingGuidance,
    TemporalScoreRescaling,
    frequency_scaled,
)
from ldm.sampling.flow import SD3FlowSchedule
from ldm.sampling.guidance import DualCfg
from ldm.sampling.model_patches import CfgArgs, cfg_override, overridden_cfg
from ldm.skip_layers import SkipLayers, SkipLayersOnNegative
from tests.ldm.mmdit_reference import TINY_SD3, random_mmdit


def _no_predict(*args, **kwargs):
    raise AssertionError("these patches run no model")


def _args(sigma: float, shape: tuple[int, ...] = (2, 4, 6, 5), seed: int = 0) -> CfgArgs:
    g = torch.Generator().manual_seed(seed)
    x, cond, uncond = (torch.randn(*shape, generator=g) * 3 for _ in range(3))
    return CfgArgs(x, torch.full((shape[0],), sigma), cond, uncond, 5.0)


# ComfyUI's arithmetic, written out (nodes_eps.py, nodes_tag.py, nodes_fresca.py) ------------------------------------

def comfy_tsr(denoised, x, sigma, k, tsr_sigma, const):
    half_log_snr = sigma.logit().neg() if const else sigma.log().neg()
    snr = (2 * half_log_snr).exp()
    variance = tsr_sigma**2
    r = torch.where(torch.isposinf(snr), k, (snr * variance + 1) / (snr * variance / k + 1))
    alpha = sigma * half_log_snr.exp()
    return torch.lerp(x / alpha, denoised, r)


def comfy_tag(x, prev_x, t_scale, r_scale):
    dims = tuple(dim + 1 for dim, size in enumerate(x.shape[1:]) if size > 1)
    v_r = prev_x / (prev_x.norm(p=2, dim=dims, keepdim=True) + 1e-8)
    dx = x - prev_x
    radial = (dx * v_r).sum(dim=dims, keepdim=True) * v_r
    return prev_x + t_scale * (dx - radial) + r_scale * radial


def comfy_fourier(x, scale_low, scale_high, freq_cutoff):
    x_freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(x_freq.shape) * scale_high
    m = mask
    for d in range(len(x_freq.shape) - 2):
        dim = d + 2
        cc = x_freq.shape[dim] // 2
        f_c = min(freq_cutoff, cc)
        m = m.narrow(dim, cc - f_c, f_c * 2)
    m[:] = scale_low
    x_freq = torch.fft.ifftshift(x_freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(x_freq, dim=(-2, -1)).real.to(x.dtype)


@pytest.mark.parametrize(("sigma", "flow"), [(2.5, False), (0.05, False), (0.6, True), (0.02, True)])
def test_temporal_score_rescaling_is_comfyuis(sigma: float, flow: bool) -> None:
    args = _args(sigma)
    denoised = args.uncond + 5.0 * (args.cond - args.uncond)
    out = TemporalScoreRescaling(0.8, 1.5, flow)(args, denoised, _no_predict)
    expected = comfy_tsr(denoised, args.x, torch.tensor(sigma), 0.8, 1.5, flow)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - denoised).abs().max() > 1e-3


def test_temporal_score_rescaling_leaves_k_1_and_the_ends_alone() -> None:
    args = _args(1.0)
    denoised = args.cond
    assert TemporalScoreRescaling(1.0, 1.0)(args, denoised, _no_predict) is denoised
    assert TemporalScoreRescaling(0.5, 1.0, flow=True)(args, denoised, _no_predict) is denoised  # snr 0
    assert TemporalScoreRescaling(0.5, 1.0)(_args(0.0), denoised, _no_predict) is denoised


@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (1, 4, 1, 6, 5)])
def test_tangential_amplifying_guidance_is_comfyuis_within_its_window(shape: tuple[int, ...]) -> None:
    args = _args(3.0, shape)
    denoised = args.cond
    patch = TangentialAmplifyingGuidance(1.3, 0.7, sigma_high=3.0, sigma_low=1.0)
    out = patch(args, denoised, _no_predict)
    torch.testing.assert_close(out, comfy_tag(denoised, args.x, 1.3, 0.7), rtol=1e-5, atol=1e-5)
    assert (out - denoised).abs().max() > 1e-2
    # Both ends included, as ComfyUI's `sigma_lo <= sigma <= sigma_hi`.
    assert not torch.equal(TangentialAmplifyingGuidance(1.3, 0.7, 5.0, 3.0)(args, denoised, _no_predict), denoised)
    assert TangentialAmplifyingGuidance(1.3, 0.7, 2.9, 0.0)(args, denoised, _no_predict) is denoised
    assert TangentialAmplifyingGuidance(1.3, 0.7, 9.0, 3.1)(args, denoised, _no_predict) is denoised


@pytest.mark.parametrize(("shape", "cutoff"), [((2, 4, 8, 8), 2), ((1, 4, 9, 7), 3), ((1, 4, 6, 5), 20),
                                               ((1, 4, 5, 8, 6), 2)])
def test_fresca_scales_the_guidance_spectrum_as_comfyui(shape: tuple[int, ...], cutoff: int) -> None:
    args = _args(2.0, shape)
    guidance = args.cond - args.uncond
    torch.testing.assert_close(frequency_scaled(guidance, 0.8, 1.4, cutoff), comfy_fourier(guidance, 0.8, 1.4, cutoff),
                               rtol=1e-5, atol=1e-5)
    out = FreSca(0.8, 1.4, cutoff)(args, {})
    assert out.uncond is args.uncond and out.cfg == args.cfg
    torch.testing.assert_close(out.cond, comfy_fourier(guidance, 0.8, 1.4, cutoff) + args.uncond, rtol=1e-5,
                               atol=1e-5)
    # Scales of 1 give the positive prediction back; without a negative one nothing happens.
    torch.testing.assert_close(FreSca(1.0, 1.0, cutoff)(args, {}).cond, args.cond, rtol=1e-5, atol=1e-5)
    alone = dataclasses.replace(args, uncond=None)
    assert FreSca(0.8, 1.4, cutoff)(alone, {}) is alone


# Guiders, with a tiny attention "UNet" (as tests/ldm/test_sampling_guidance.py) ------------------------------------

class AttentionUNet(torch.nn.Module):
    """Attends from the latent's mean to the context; `gain` makes another "model"; logs each call's batch."""

    def __init__(self, gain: float = 0.1) -> None:
        super().__init__()
        self.gain = gain
        self.calls: list[int] = []

    def forward(self, x, t, context, y=None):
        self.calls.append(x.shape[0])
        q = x.mean(dim=(2, 3))
        weights = torch.softmax(torch.einsum("bc,blc->bl", q, context), dim=-1)
        v = torch.einsum("bl,blc->bc", weights, context)
        return self.gain * x + v[:, :, None, None] + t[:, None, None, None] / 1000


SCHEDULE = DiscreteSchedule()


def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3
    ctx = [torch.randn(1, 7, 4, generator=g) for _ in range(2)]
    return x, ctx


def predicted(unet, x, sigma, context):
    return Denoiser(unet, SCHEDULE)(x, sigma, Conditioning(context.expand(x.shape[0], -1, -1)))


def test_cfg_override_guides_at_its_cfg_within_its_range_only() -> None:
    unet = AttentionUNet()
    x, ctx = setup()
    guider = CFGGuider(Denoiser(unet, SCHEDULE), [(ctx[0], {})], [(ctx[1], {})], cfg=1.0, module=unet)
    run = CfgOverride(4.0, sigma_high=3.0, sigma_low=1.0)(torch.tensor([3.0, 1.0, 0.0]))
    cond_at, uncond_at = (partial(predicted, unet, x, context=c) for c in ctx)
    for level in (3.0, 2.0):  # (sigma_low, sigma_high]: the top included
        sigma = torch.full((2,), level)
        expected = torch.lerp(uncond_at(sigma), cond_at(sigma), 4.0)
        torch.testing.assert_close(run(x, sigma, guide=guider), expected, rtol=1e-5, atol=1e-5)
    unet.calls.clear()
    for level in (1.0, 3.5):  # outside it, the guider's own cfg 1: the positive prompt alone, one pass
        sigma = torch.full((2,), level)
        torch.testing.assert_close(run(x, sigma, guide=guider), cond_at(sigma), rtol=1e-5, atol=1e-5)
    assert unet.calls[0::2] == [2, 2]
    # Nested overrides: the inner one (nearest the sampler) wins; the state is gone after the call.
    inner = CfgOverride(2.0, 9.0, 0.0)(torch.tensor([1.0]))
    sigma = torch.full((2,), 2.0)
    out = run(x, sigma, guide=partial(inner, guide=guider))
    torch.testing.assert_close(out, torch.lerp(uncond_at(sigma), cond_at(sigma), 2.0), rtol=1e-5, atol=1e-5)
    assert overridden_cfg() is None


def test_cfg_override_leaves_dual_cfg_alone_and_cfg_1_skips_the_negative() -> None:
    unet = AttentionUNet()
    x, ctx = setup()
    sigma = torch.full((2,), 2.0)
    dual = CFGGuider(Denoiser(unet, SCHEDULE), [(ctx[0], {})], [(ctx[1], {})], cfg=3.0,
                     dual=DualCfg([(ctx[1], {})], 2.0))
    plain = dual(x, sigma)
    with cfg_override(7.0):
        torch.testing.assert_close(dual(x, sigma), plain)
    guider = CFGGuider(Denoiser(unet, SCHEDULE), [(ctx[0], {})], [(ctx[1], {})], cfg=6.0)
    unet.calls.clear()
    with cfg_override(1.0):
        out = guider(x, sigma)
    assert unet.calls == [2]
    torch.testing.assert_close(out, predicted(unet, x, sigma, ctx[0]), rtol=1e-5, atol=1e-5)


def test_negative_predicted_by_another_model() -> None:
    unet, other = AttentionUNet(), AttentionUNet(gain=0.7)
    x, ctx = setup()
    sigma = torch.full((2,), 2.0)
    guider = CFGGuider(Denoiser(unet, SCHEDULE), [(ctx[0], {})], [(ctx[1], {})], cfg=4.0, module=unet,
                       negative_by=NegativeOnModel(lambda: other))
    out = guider(x, sigma)
    assert unet.calls == [2] and other.calls == [2]  # each side alone, once
    expected = torch.lerp(predicted(other, x, sigma, ctx[1]), predicted(unet, x, sigma, ctx[0]), 4.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    other.calls.clear()
    # At cfg 1 no negative is predicted, by either model.
    at_one = CFGGuider(Denoiser(unet, SCHEDULE), [(ctx[0], {})], [(ctx[1], {})], cfg=1.0, module=unet,
                       negative_by=NegativeOnModel(lambda: other))
    torch.testing.assert_close(at_one(x, sigma), predicted(unet, x, sigma, ctx[0]), rtol=1e-5, atol=1e-5)
    assert other.calls == []


def test_skip_layers_on_the_negative_side_only_within_the_window() -> None:
    """A tiny SD3 MMDiT: between sigma_end (left out) and sigma_start (included) the negative prompt is predicted
    with joint block 1 skipped and the positive as usual; elsewhere the guider is the plain one."""
    model = random_mmdit(dataclasses.replace(TINY_SD3, depth=3))
    schedule = SD3FlowSchedule(3.0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 8, 8, generator=g)
    (pos, neg), (pos_y, neg_y) = ([torch.randn(1, 5, TINY_SD3.context_dim, generator=g) for _ in range(2)],
                                  [torch.randn(1, TINY_SD3.adm_in_channels, generator=g) for _ in range(2)])
    positive, negative = [(pos, {"y": pos_y})], [(neg, {"y": neg_y})]
    negative_by = SkipLayersOnNegative(SkipLayers((1,)), sigma_start=0.75, sigma_end=0.25)
    slg = CFGGuider(Denoiser(model, schedule, "flow"), positive, negative, 3.0, module=model,
                    negative_by=negative_by)
    plain = CFGGuider(Denoiser(model, schedule, "flow"), positive, negative, 3.0, module=model)
    skipped = SkipLayers((1,))(model)
    with torch.no_grad():
        for level in (0.75, 0.5):  # levels a float32 holds exactly, as the window's ends
            sigma = torch.tensor([level])
            cond = Denoiser(model, schedule, "flow")(x, sigma, Conditioning(pos, pos_y))
            uncond = Denoiser(skipped, schedule, "flow")(x, sigma, Conditioning(neg, neg_y))
            plain_uncond = Denoiser(model, schedule, "flow")(x, sigma, Conditioning(neg, neg_y))
            assert (uncond - plain_uncond).abs().mean() > 1e-3
            torch.testing.assert_close(slg(x, sigma), torch.lerp(uncond, cond, 3.0), rtol=1e-4, atol=1e-4)
        for level in (0.875, 0.25):
            sigma = torch.tensor([level])
            torch.testing.assert_close(slg(x, sigma), plain(x, sigma), rtol=1e-5, atol=1e-5)


def test_the_negative_on_another_model_keeps_area_prompts_and_their_pairs() -> None:
    """With the negative side predicted by a model of its own, area prompts and the pairs ComfyUI makes of them
    (the other side's prompt over an area) still count: predicted by the same model, the result is the plain
    guider's, the two sides in calls of their own."""
    unet = AttentionUNet()
    x, ctx = setup()
    sigma = torch.full((2,), 2.0)
    positive = [(ctx[0], {}), (ctx[0] * 2, {"area": (4, 4, 0, 0)})]
    cases = ((positive, [(ctx[1], {}), (ctx[1] * 3, {"area": (4, 8, 4, 0)})]), (positive, [(ctx[1], {})]))
    for positive, negative in cases:
        plain = CFGGuider(Denoiser(unet, SCHEDULE), positive, negative, 4.0, module=unet)
        same = CFGGuider(Denoiser(unet, SCHEDULE), positive, negative, 4.0, module=unet,
                         negative_by=NegativeOnModel(lambda: unet))
        with torch.no_grad():
            torch.testing.assert_close(same(x, sigma), plain(x, sigma), rtol=0, atol=1e-5)
