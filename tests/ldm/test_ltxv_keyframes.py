"""LTX-Video's transformer with keyframe guides (`keyframe_idxs`) against diffusers' LTXVideoTransformer3DModel given
the same positions as `video_coords`: the guide tokens' coordinates built as its LTXConditionPipeline builds those of
its conditioning frames, appended after the video's tokens as ComfyUI appends them, or put first as diffusers does."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXConditionPipeline

from ldm.ltxv import latent_positions, with_keyframes
from tests.ldm.test_ltxv import _inputs, _twin

FRAMES, ROWS, COLS, RATE = 3, 4, 5, 24.0
GUIDE_FRAMES, GUIDE_AT = 2, 16  # a two-latent-frame guide (a 9-picture clip) at picture 16


@pytest.fixture(scope="module")
def model():
    from ldm.ltxv_files import TINY_LTXV, random_ltxv

    return random_ltxv(TINY_LTXV, seed=5)


@pytest.fixture(scope="module")
def reference(model):
    return _twin(model)


def _ids(frames: int, frame_index: int) -> torch.Tensor:
    """LTXConditionPipeline's pixel coordinates [1, 3, N] of `frames` latent frames starting at picture
    `frame_index` (the causal first frame), as it makes them for the video and for its conditioning frames."""
    ids = LTXConditionPipeline._prepare_video_ids(1, frames, ROWS, COLS)
    return LTXConditionPipeline._scale_video_ids(ids, scale_factor=32, scale_factor_t=8,
                                                 frame_index=frame_index).float()


def _guided_inputs():
    """Latents of the video's frames followed by the guide's, and the guide tokens' coordinates [1, 3, K]."""
    x, sigma, context = _inputs()
    guide = torch.randn(2, 128, GUIDE_FRAMES, ROWS, COLS, generator=torch.Generator().manual_seed(7))
    return torch.cat([x, guide], dim=2), sigma, context, _ids(GUIDE_FRAMES, GUIDE_AT)


def _diffusers(reference, x, sigma, context, coords, guides_first: bool = False):
    """diffusers' transformer on the packed tokens at `coords` [1, 3, S] (pixels; frames turned to seconds here);
    `guides_first` packs the guide tokens before the video's, as LTXConditionPipeline orders them."""
    coords = coords.repeat(x.shape[0], 1, 1)
    coords[:, 0] = coords[:, 0] / RATE
    tokens = LTXPipeline._pack_latents(x)
    video = FRAMES * ROWS * COLS
    if guides_first:
        tokens = torch.cat([tokens[:, video:], tokens[:, :video]], dim=1)
        coords = torch.cat([coords[..., video:], coords[..., :video]], dim=-1)
    with torch.no_grad():
        out = reference(tokens, context, sigma * 1000, torch.ones(context.shape[:2]), video_coords=coords,
                        return_dict=False)[0]
    if guides_first:
        out = torch.cat([out[:, -video:], out[:, :-video]], dim=1)
    return LTXPipeline._unpack_latents(out, FRAMES + GUIDE_FRAMES, ROWS, COLS)


@pytest.mark.parametrize("guides_first", [False, True])
def test_keyframe_positions_match_diffusers_video_coords(model, reference, guides_first) -> None:
    x, sigma, context, guides = _guided_inputs()
    with torch.no_grad():
        ours = model(x, sigma, context, frame_rate=RATE, keyframe_idxs=guides)
        unguided = model(x, sigma, context, frame_rate=RATE)  # the guide at its place in the latent instead
    coords = torch.cat([_ids(FRAMES, 0), guides], dim=-1)
    expected = _diffusers(reference, x, sigma, context, coords, guides_first)
    assert ours.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - unguided).abs().max() > 1e-3  # the positions count, for the video's tokens too


def test_sampler_route_through_y_equals_the_argument(model) -> None:
    """The sampler hands the model the frame rate and the flattened coordinates as `y` (`ltxv_conditioning`); rows
    of one call may carry different guides (a positive and a negative prompt of their own)."""
    x, sigma, context, guides = _guided_inputs()
    other = guides.clone()
    other[:, 0] += 8.0
    y = torch.cat([torch.full((2, 1), RATE), torch.cat([guides, other]).flatten(1)], dim=1)
    with torch.no_grad():
        through_y = model(x, sigma, context, y=y)
        first = model(x[:1], sigma[:1], context[:1], frame_rate=RATE, keyframe_idxs=guides)
        second = model(x[1:], sigma[1:], context[1:], frame_rate=RATE, keyframe_idxs=other)
    torch.testing.assert_close(through_y, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_with_keyframes_replaces_the_last_tokens_positions() -> None:
    positions = latent_positions(2, 1, 2, frame_rate=8.0)  # 4 tokens, the last 2 a one-frame guide
    guides = torch.tensor([[[24.0, 24.0], [0.0, 0.0], [0.0, 32.0]]])
    out = with_keyframes(positions, guides, 8.0, batch=2)
    assert out.shape == (2, 4, 3)
    assert out[0].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 32.0], [3.0, 0.0, 0.0], [3.0, 0.0, 32.0]]


def test_bad_keyframes_are_refused(model) -> None:
    x, sigma, context, guides = _guided_inputs()
    with pytest.raises(ValueError, match=r"not \[B, 3, K\] guide coordinates"):
        model(x, sigma, context, keyframe_idxs=guides[:, :2])
    with pytest.raises(ValueError, match="guide tokens for a latent of"):
        model(x, sigma, context, keyframe_idxs=torch.zeros(1, 3, 1000))
    with pytest.raises(ValueError, match="3 coordinates per guide token"):
        model(x, sigma, context, y=torch.zeros(2, 3))
