"""Normalized Attention Guidance (ldm.nag): its mix against a transcription of ComfyUI's NAGuidance patch, where the
Flux blocks call it, and the guider's row layout that it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.attention import BasicTransformerBlock
from ldm.flux2_files import TINY_FLUX2_KLEIN, random_flux2
from ldm.lora import shallow_copy
from ldm.nag import NormalizedAttentionGuidance, nag_combine
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.flow import FlowSchedule
from ldm.sampling.guidance import CFGGuider
from ldm.sampling.model_patches import call_sides, current_sides
from ldm.unet import UNetConfig, UNetModel
from tests.ldm.flux_reference import TINY, random_flux


def comfy_patch(out: np.ndarray, sides: list[int], img_slice: tuple[int, int] | None, scale: float, alpha: float,
                tau: float) -> np.ndarray:
    """ComfyUI's nag_attention_output_patch, step by step, in float64 numpy."""
    out = out.copy()
    part = out if img_slice is None else out[:, img_slice[0]:img_slice[1]]
    half = part.shape[0] // len(sides)
    pos, neg = sides.index(0), sides.index(1)
    z_pos, z_neg = part[half * pos:half * (pos + 1)], part[half * neg:half * (neg + 1)]
    guided = z_pos * scale - z_neg * (scale - 1.0)
    norm_pos = np.maximum(np.abs(z_pos).sum(-1, keepdims=True), 1e-6)
    norm_guided = np.maximum(np.abs(guided).sum(-1, keepdims=True), 1e-6)
    ratio = norm_guided / norm_pos
    final = guided * (np.minimum(ratio, tau) / ratio) * alpha + z_pos * (1.0 - alpha)
    if img_slice is None:
        out[half * pos:half * (pos + 1)] = final
    else:
        out[half * neg:half * (neg + 1), img_slice[0]:img_slice[1]] = final
        out[half * pos:half * (pos + 1), img_slice[0]:img_slice[1]] = final
    return out


@pytest.mark.parametrize(("scale", "alpha", "tau"), [(5.0, 0.5, 1.5), (2.0, 1.0, 10.0), (11.0, 0.25, 1.0)])
def test_combine_matches_comfyuis_formula(scale: float, alpha: float, tau: float) -> None:
    generator = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(2, 3, 7, 16, generator=generator, dtype=torch.float64)
    expected = comfy_patch(torch.cat([positive, negative]).numpy(), [0, 1], None, scale, alpha, tau)[:3]
    np.testing.assert_allclose(nag_combine(positive, negative, scale, alpha, tau).numpy(), expected, rtol=1e-12)
    # The cap acts: the guided part's L1 norm is at most tau times the positive's.
    guided = (nag_combine(positive, negative, scale, 1.0, tau).abs().sum(-1)
              / positive.abs().sum(-1))
    assert float(guided.max()) <= tau + 1e-9


@pytest.mark.parametrize("sides", [(0, 1), (1, 0), (0, 0, 1)])
def test_patch_mixes_the_image_tokens_of_both_sides_as_comfyui(sides: tuple[int, ...]) -> None:
    out = torch.randn(2 * len(sides), 9, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    patch = NormalizedAttentionGuidance(5.0, 0.5, 1.5)
    with call_sides(sides):
        mixed = patch(out, image_start=4)
    expected = comfy_patch(out.numpy(), list(sides), (4, 9), 5.0, 0.5, 1.5)
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-12)
    assert not torch.equal(mixed, out)
    assert torch.equal(mixed[:, :4], out[:, :4])  # text tokens untouched


def test_patch_without_an_image_slice_mixes_every_token_of_the_positive_rows_as_comfyui() -> None:
    out = torch.randn(6, 9, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with call_sides((1, 0, 0)):
        mixed = NormalizedAttentionGuidance(3.0, 0.75, 2.0)(out)
    np.testing.assert_allclose(mixed.numpy(), comfy_patch(out.numpy(), [1, 0, 0], None, 3.0, 0.75, 2.0), rtol=1e-12)
    assert torch.equal(mixed[:2], out[:2]) and torch.equal(mixed[4:], out[4:])  # the negative, the 2nd positive


def test_patch_leaves_calls_without_both_sides_alone() -> None:
    out = torch.randn(2, 9, 16)
    patch = NormalizedAttentionGuidance(5.0, 0.5, 1.5)
    assert patch(out, 4) is out  # outside a guider's call
    for sides in ((0,), (1,), (0, 0)):
        with call_sides(sides):
            assert patch(out, 4) is out
    assert current_sides() is None


def _inputs(batch: int = 2) -> tuple:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 6, 8, generator=generator).expand(batch, -1, -1, -1)
    context = torch.randn(batch, 5, TINY.context_dim, generator=generator)
    y = torch.randn(batch, TINY.y_dim, generator=generator)
    return x, torch.full((batch,), 0.6), context, y


@torch.no_grad()
def test_flux_blocks_call_the_patch_on_every_attention_output() -> None:
    model = random_flux()
    seen = []
    copy = shallow_copy(model)
    copy.attention_output = lambda out, image_start: seen.append((tuple(out.shape), image_start)) or out
    x, t, context, y = _inputs()
    assert torch.equal(copy(x, t, context, y), model(x, t, context, y))
    assert seen == [((2, 5 + 12, TINY.hidden_size), 5)] * (TINY.depth + TINY.depth_single_blocks)
    assert model.attention_output is None  # the copy's, not the model's


@torch.no_grad()
def test_flux_with_nag_at_scale_1_is_the_plain_run_and_otherwise_moves_the_positive() -> None:
    model = random_flux()
    x, t, context, y = _inputs()
    plain = model(x, t, context, y)
    for scale, alpha, moves in ((1.0, 0.5, False), (5.0, 0.0, False), (5.0, 0.5, True)):
        copy = shallow_copy(model)
        copy.attention_output = NormalizedAttentionGuidance(scale, alpha, 1.5)
        with call_sides((0, 1)):
            out = copy(x, t, context, y)
        assert torch.equal(out[:1], plain[:1]) is not moves
    copy.attention_output = NormalizedAttentionGuidance(5.0, 0.5, 1.5)
    assert torch.equal(copy(x, t, context, y), plain)  # no guider's call: no negative rows known


@torch.no_grad()
def test_flux2_blocks_call_the_patch_as_flux1s() -> None:
    model = random_flux2(TINY_FLUX2_KLEIN, seed=1).float()
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 128, 3, 4, generator=generator).expand(2, -1, -1, -1)
    t, context = torch.full((2,), 0.5), torch.randn(2, 7, TINY_FLUX2_KLEIN.context_dim, generator=generator)
    plain = model(x, t, context)
    seen = []
    copy = shallow_copy(model)
    copy.attention_output = lambda out, image_start: seen.append((out.shape[1], image_start)) or out
    assert torch.equal(copy(x, t, context), plain)
    assert seen == [(7 + 12, 7)] * (TINY_FLUX2_KLEIN.depth + TINY_FLUX2_KLEIN.depth_single_blocks)
    copy.attention_output = NormalizedAttentionGuidance(1.0, 0.5, 1.5)
    with call_sides((0, 1)):
        assert torch.equal(copy(x, t, context)[:1], plain[:1])
    copy.attention_output = NormalizedAttentionGuidance(5.0, 0.5, 1.5)
    with call_sides((0, 1)):
        assert not torch.equal(copy(x, t, context)[:1], plain[:1])


@torch.no_grad()
def test_unet_self_attention_takes_the_patch_on_the_positive_rows() -> None:
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                                num_heads=4, context_dim=32))
    for weight in unet.parameters():
        torch.nn.init.normal_(weight, std=0.2)
    x = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
    t, context = torch.full((2,), 500.0), torch.randn(2, 7, 32)
    plain = unet(x, t, context)
    outputs = {}
    for scale in (1.0, 5.0):
        copy = shallow_copy(unet)
        blocks = [m for m in copy.modules() if isinstance(m, BasicTransformerBlock)]
        for block in blocks:
            block.attn1_output = NormalizedAttentionGuidance(scale, 0.5, 1.5)
        with call_sides((0, 1)):
            outputs[scale] = copy(x, t, context)
    assert len(blocks) == 7 and not any(isinstance(m, BasicTransformerBlock) and m.attn1_output is not None
                                        for m in unet.modules())
    assert torch.equal(outputs[1.0], plain)
    assert float((outputs[5.0][:1] - plain[:1]).abs().max()) > 1e-2
    # Without an image slice (a UNet) the negative rows keep their own attention outputs.
    assert torch.equal(outputs[5.0][1:], plain[1:])


@torch.no_grad()
def test_guider_tells_the_model_which_rows_are_which() -> None:
    model = random_flux()
    layouts = []

    def unet(x, t, context, y=None):
        layouts.append(current_sides())
        return model(x, t, context, y)

    x, _, context, y = _inputs(1)
    sigma = torch.tensor([0.6])
    positive, negative = [(context, {"y": y})], [(context + 1, {"y": y})]
    CFGGuider(Denoiser(unet, FlowSchedule(1.0), "flow"), positive, negative, 1.0, keep_negative=True)(x, sigma)
    CFGGuider(Denoiser(unet, FlowSchedule(1.0), "flow"), positive, negative, 1.0)(x, sigma)
    CFGGuider(Denoiser(unet, FlowSchedule(1.0), "flow"), positive, negative, 3.0,
              cfg_function=lambda args: args.cond)(x, sigma)
    assert layouts == [(0, 1), (0,), (0, 1)]
    assert current_sides() is None
