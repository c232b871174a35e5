"""LTX-2's guidance switches (ldm/ltx2.py: STG's value passthrough, severed audio<->video cross-attention, ID-LoRA's
reference audio tokens) against hand transcriptions, and the guidance functions of ldm/ltx2_guidance.py through the
real guider over the packed audio-video latent, against direct model calls, counting the model's passes."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import Tensor

import ldm.ltx2
from ldm.ltx2 import LTX2Model, reference_audio_positions, tiny_config, tiny_config_23
from ldm.ltx2_files import LTX2Denoiser
from ldm.ltx2_guidance import (
    REF_AUDIO,
    DualModalityCfg,
    LTX2Perturbation,
    ModalityGuidance,
    ReferenceAudioGuidance,
    SpatioTemporalGuidance,
    reference_audio_tokens,
)
from ldm.sampling.av_latent import PackedParts, pack
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.flow import FlowSchedule
from ldm.sampling.guidance import CFGGuider

CONFIGS = {"ltx2.0": tiny_config, "ltx2.3": tiny_config_23}
VIDEO, AUDIO = (1, 16, 2, 2, 2), (1, 8, 5, 16)
SIGMA = 0.6
TOL = 1e-4  # float32, batched and single calls


def _model(make) -> LTX2Model:
    torch.manual_seed(0)
    model = LTX2Model(make()).eval()
    for p in model.parameters():  # lively weights: the default init leaves the modulations near zero
        p.data.normal_(0, 0.2)
    return model


def _inputs(model: LTX2Model, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    with torch.no_grad():
        video_ctx, audio_ctx, _ = model.preprocess_text_embeds(torch.randn(1, 6, c.context_dim, generator=g))
    return {"video_latent": torch.randn(VIDEO, generator=g), "audio_latent": torch.randn(AUDIO, generator=g),
            "video_timestep": torch.tensor([SIGMA]), "audio_timestep": None, "video_context": video_ctx,
            "audio_context": audio_ctx}


def _run(model: LTX2Model, inputs: dict, **switches) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return model(**inputs, **switches)


@pytest.fixture(params=list(CONFIGS))
def model(request) -> LTX2Model:
    return _model(CONFIGS[request.param])


def test_default_switches_change_nothing(model) -> None:
    inputs = _inputs(model)
    video, audio = _run(model, inputs)
    same = _run(model, inputs, ref_audio=None, stg_blocks=frozenset(), a2v=True, v2a=True)
    assert torch.equal(video, same[0]) and torch.equal(audio, same[1])


def _value_passthrough(attn) -> object:
    """A hand transcription of ComfyUI's stg_skip_self_attn: out = v (per head), the head gates, to_out."""
    def forward(x, context=None, rope=None, k_rope=None, bias=None, passthrough=False):
        out = torch.nn.functional.linear(x, attn.to_v.weight, attn.to_v.bias).unflatten(-1, (attn.heads, -1))
        if attn.to_gate_logits is not None:
            out = out * (2 * torch.sigmoid(attn.to_gate_logits(x)))[..., None]
        return attn.to_out[0](out.flatten(2))
    return forward


def test_stg_degrades_both_self_attentions_of_the_chosen_blocks_to_their_values(model) -> None:
    inputs = _inputs(model)
    baseline = _run(model, inputs)
    perturbed = _run(model, inputs, stg_blocks=frozenset({1}))
    block = model.transformer_blocks[1]
    block.attn1.forward, block.audio_attn1.forward = _value_passthrough(block.attn1), _value_passthrough(
        block.audio_attn1)
    try:
        expected = _run(model, inputs)
    finally:
        del block.attn1.forward, block.audio_attn1.forward
    for ours, theirs, before in zip(perturbed, expected, baseline, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=TOL, atol=TOL)
        assert (ours - before).abs().max() > 1e-3  # the passthrough changes the prediction
    assert torch.equal(_run(model, inputs, stg_blocks=frozenset({7}))[0], baseline[0])  # no such block: none


def _zero_output(_x, *_args, **_kwargs) -> Tensor:
    return torch.zeros_like(_x)


@pytest.mark.parametrize("severed", [("a2v",), ("v2a",), ("a2v", "v2a")])
def test_a_severed_cross_attention_adds_nothing(model, severed) -> None:
    inputs = _inputs(model)
    baseline = _run(model, inputs)
    ours = _run(model, inputs, **{name: False for name in severed})
    attns = {"a2v": "audio_to_video_attn", "v2a": "video_to_audio_attn"}
    patched = [getattr(block, attns[name]) for block in model.transformer_blocks for name in severed]
    for attn in patched:
        attn.forward = _zero_output
    try:
        expected = _run(model, inputs)
    finally:
        for attn in patched:
            del attn.forward
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])
    assert (ours[0] - baseline[0]).abs().max() > 1e-3 or (ours[1] - baseline[1]).abs().max() > 1e-3


def test_reference_audio_positions_end_one_latent_frame_before_zero() -> None:
    spans = reference_audio_positions(1, 3, tiny_config())
    # mel frames [0, 1), [1, 5), [5, 9) x 10 ms, shifted by the last end (90 ms) + 40 ms (160 x 4 / 16 kHz)
    expected = torch.tensor([[-0.13, -0.12], [-0.12, -0.08], [-0.08, -0.04]])
    torch.testing.assert_close(spans[0, 0], expected)


def test_reference_audio_tokens_go_first_at_level_zero_and_leave_the_output(model, monkeypatch) -> None:
    inputs = _inputs(model)
    g = torch.Generator().manual_seed(9)
    reference = torch.randn(1, 8, 3, 16, generator=g)
    tokens = reference_audio_tokens(reference)
    assert tokens.shape == (1, 3, 128)
    assert tokens[0, 2, 5 * 16 + 7] == reference[0, 5, 2, 7]  # features (channel, bin), as the audio's tokens
    video, audio = _run(model, inputs, ref_audio=tokens)
    assert video.shape == VIDEO and audio.shape == AUDIO
    baseline = _run(model, inputs)
    assert (audio - baseline[1]).abs().max() > 1e-3 and (video - baseline[0]).abs().max() > 1e-3

    # Transcription: one audio latent of the reference's frames then the audio's, the reference at level 0 and at
    # its own positions (ComfyUI's: before 0), the reference's frames cut from the output.
    original = ldm.ltx2.audio_positions
    shifted = torch.tensor([[-0.13, -0.12], [-0.12, -0.08], [-0.08, -0.04]])

    def positions(batch, frames, c, device="cpu"):
        own = original(batch, frames - 3, c, device)
        return torch.cat([shifted.expand(batch, 1, -1, -1).to(own), own], dim=2)

    monkeypatch.setattr(ldm.ltx2, "audio_positions", positions)
    joined = dict(inputs, audio_latent=torch.cat([reference, inputs["audio_latent"]], dim=2),
                  audio_timestep=torch.tensor([[0.0] * 3 + [SIGMA] * AUDIO[2]]))
    expected_video, expected_audio = _run(model, joined)
    torch.testing.assert_close(video, expected_video, rtol=TOL, atol=TOL)
    torch.testing.assert_close(audio, expected_audio[:, :, 3:], rtol=TOL, atol=TOL)


def test_the_perturbation_copies_the_denoiser_and_refuses_missing_blocks(model) -> None:
    unet = LTX2Denoiser(model)
    copy = LTX2Perturbation(stg_blocks=frozenset({0}), a2v=False)(unet)
    assert copy.model is unet.model and unet.stg_blocks == frozenset() and unet.a2v_cross_attention
    assert copy.stg_blocks == frozenset({0}) and not copy.a2v_cross_attention and copy.v2a_cross_attention
    with pytest.raises(ValueError, match="block 5 out of range; this model has 2 transformer blocks"):
        LTX2Perturbation(stg_blocks=frozenset({5}))(unet)
    with pytest.raises(ValueError, match="needs an LTX-2 model"):
        LTX2Perturbation()(torch.nn.Linear(2, 2))


def _every_switch(model: LTX2Model, batch: int, seed: int = 5) -> dict:
    """Inputs with every new input at once: an appended 2 x 2 guide frame of which a factor 2 lattice's one token
    is kept, its weight 0.4, reference audio tokens, per-token video levels (the items' alike: the audio<->video
    gates take the batch's largest level, as ComfyUI's); `batch` distinct items."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    with torch.no_grad():
        video_ctx, audio_ctx, _ = model.preprocess_text_embeds(torch.randn(batch, 6, c.context_dim, generator=g))
    keyframes = torch.tensor([[[[0.0, 1.0]] * 4, [[0.0, 64.0]] * 2 + [[32.0, 96.0]] * 2,
                               [[0.0, 64.0], [32.0, 96.0]] * 2]])
    return {"video_latent": torch.randn(batch, 16, 3, 2, 2, generator=g),
            "audio_latent": torch.randn(batch, *AUDIO[1:], generator=g),
            "video_timestep": torch.rand(1, 12, generator=g).expand(batch, -1),  # one mask for the batch
            "audio_timestep": torch.tensor([SIGMA] * batch),
            "video_context": video_ctx, "audio_context": audio_ctx, "keyframe_idxs": keyframes,
            "guide_attention": torch.tensor([[[0.0, 0.4]] * 4]).expand(batch, -1, -1),
            "kept_tokens": torch.tensor([True] * 9 + [False] * 3),
            "ref_audio": torch.randn(1, 3, 128, generator=g)}


def _item(inputs: dict, i: int) -> dict:
    shared = ("keyframe_idxs", "kept_tokens", "ref_audio")
    return {k: v if k in shared else v[i:i + 1] for k, v in inputs.items()}


@pytest.mark.parametrize("switches", [{}, {"stg_blocks": frozenset({0}), "a2v": False}])
def test_a_batch_is_its_items_alone(model, switches) -> None:
    """Two items at once (the reference audio given once, the guide attention and the kept tokens shared) give what
    each gives alone."""
    inputs = _every_switch(model, 2)
    video, audio = _run(model, inputs, **switches)
    for i in range(2):
        alone = _run(model, _item(inputs, i), **switches)
        torch.testing.assert_close(video[i:i + 1], alone[0], rtol=TOL, atol=TOL)
        torch.testing.assert_close(audio[i:i + 1], alone[1], rtol=TOL, atol=TOL)
    assert (video[0] - video[1]).abs().max() > 1e-3


def test_every_switch_runs_in_bfloat16(model) -> None:
    """A bfloat16 model takes float32 inputs with every switch set, answers in the latents' dtype, and stays near
    the float32 model."""
    inputs = _every_switch(model, 2)
    switches = {"stg_blocks": frozenset({1}), "v2a": False}
    expected = _run(model, inputs, **switches)
    got = _run(copy.deepcopy(model).to(torch.bfloat16), inputs, **switches)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        assert (ours - theirs).norm() < 0.05 * theirs.norm()


# ------------------------------------------------------------------------------------- through the real guider


class _Counted:
    """The model's passes: the batch of each call to the transformer, and the keywords it got."""

    def __init__(self, model: LTX2Model) -> None:
        self.calls: list[tuple[int, dict]] = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs) -> None:
        video = args[0] if args else kwargs["video_latent"]
        self.calls.append((video.shape[0], {k: kwargs.get(k) for k in ("ref_audio", "stg_blocks", "a2v", "v2a")}))


@pytest.fixture
def setup():
    model = _model(tiny_config)
    inputs = _inputs(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        negative_ctx = model.preprocess_text_embeds(torch.randn(1, 5, model.config.context_dim, generator=g))
    reference = reference_audio_tokens(torch.randn(1, 8, 3, 16, generator=g))
    positive = [(inputs["video_context"], {"ltx2_audio_context": inputs["audio_context"], REF_AUDIO: reference})]
    negative = [(negative_ctx[0], {"ltx2_audio_context": negative_ctx[1], REF_AUDIO: reference})]
    shapes = (VIDEO[1:], AUDIO[1:])
    x = pack([inputs["video_latent"], inputs["audio_latent"]])
    return model, inputs, positive, negative, shapes, x, reference, negative_ctx


def _guider(model, positive, negative, shapes, cfg, **kwargs) -> CFGGuider:
    unet = LTX2Denoiser(model)
    denoiser = Denoiser(PackedParts(unet, shapes), FlowSchedule(2.37), "flow")
    return CFGGuider(denoiser, positive, negative, cfg, module=unet, parts=shapes, **kwargs)


def _x0(model, inputs, x, video_ctx, audio_ctx, **switches) -> Tensor:
    """x - sigma * velocity of one prompt, by a direct call of the transformer, packed."""
    out = _run(model, dict(inputs, video_context=video_ctx, audio_context=audio_ctx), **switches)
    return x - SIGMA * pack(list(out))


def _call(guider: CFGGuider, x: Tensor) -> Tensor:
    with torch.no_grad():
        return guider(x, torch.tensor([SIGMA]))


CFG = 3.0


def _plain(setup_, model, inputs, x, negative_ctx, reference) -> tuple[Tensor, Tensor]:
    cond = _x0(model, inputs, x, inputs["video_context"], inputs["audio_context"], ref_audio=reference)
    uncond = _x0(model, inputs, x, *negative_ctx[:2], ref_audio=reference)
    return cond, uncond


@pytest.mark.parametrize("kind", ["stg", "modality", "reference"])
def test_each_guidance_pass_pushes_away_from_its_prediction_in_its_range(setup, kind) -> None:
    model, inputs, positive, negative, shapes, x, reference, negative_ctx = setup
    cond, uncond = _plain(setup, model, inputs, x, negative_ctx, reference)
    guided = uncond + CFG * (cond - uncond)
    pos = (inputs["video_context"], inputs["audio_context"])
    if kind == "stg":
        patch = SpatioTemporalGuidance(frozenset({0, 1}), 1.5, 0.9, 0.5)
        other = _x0(model, inputs, x, *pos, ref_audio=reference, stg_blocks=frozenset({0, 1}))
        expected = guided + (cond - other) * 1.5
        switches = {"ref_audio": reference, "stg_blocks": frozenset({0, 1}), "a2v": True, "v2a": True}
    elif kind == "modality":
        patch = ModalityGuidance(3.0, 0.9, 0.5)
        other = _x0(model, inputs, x, *pos, ref_audio=reference, a2v=False, v2a=False)
        expected = guided + (cond - other) * 2.0
        switches = {"ref_audio": reference, "stg_blocks": frozenset(), "a2v": False, "v2a": False}
    else:
        patch = ReferenceAudioGuidance(2.5, 0.9, 0.5)
        other = _x0(model, inputs, x, *pos)
        expected = guided + (cond - other) * 2.5
        switches = {"ref_audio": None, "stg_blocks": frozenset(), "a2v": True, "v2a": True}
    counted = _Counted(model)
    out = _call(_guider(model, positive, negative, shapes, CFG, post_cfg=(patch,)), x)
    torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)
    assert (out - guided).abs().max() > 1e-3
    assert [batch for batch, _ in counted.calls] == [2, 1]  # both prompts in one pass, then the extra one
    extra = counted.calls[1][1]
    assert {k: v for k, v in extra.items() if k != "ref_audio"} == {k: v for k, v in switches.items()
                                                                    if k != "ref_audio"}
    assert (extra["ref_audio"] is None) == (switches["ref_audio"] is None)

    # Outside the range (sigma 0.6 above 0.55), and at the scales that turn it off: the plain result, one pass.
    for off in (replace(patch, sigma_start=0.55, sigma_end=0.1), SpatioTemporalGuidance(frozenset({0}), 0.0, 1.0, 0.0),
                SpatioTemporalGuidance(frozenset(), 1.0, 1.0, 0.0), ModalityGuidance(1.0, 1.0, 0.0),
                ReferenceAudioGuidance(0.0, 1.0, 0.0)):
        counted.calls.clear()
        out = _call(_guider(model, positive, negative, shapes, CFG, post_cfg=(off,)), x)
        torch.testing.assert_close(out, guided, rtol=TOL, atol=TOL)
        assert len(counted.calls) == 1, off


def test_dual_cfg_guides_the_video_and_the_audio_each_at_its_scale(setup) -> None:
    model, inputs, positive, negative, shapes, x, reference, _ = setup
    video_size = torch.Size(VIDEO).numel()
    at = {cfg: _call(_guider(model, positive, negative, shapes, cfg), x) for cfg in (2.0, 6.0)}
    counted = _Counted(model)
    dual = _call(_guider(model, positive, negative, shapes, 2.0, cfg_function=DualModalityCfg(2.0, 6.0),
                         keep_negative=True), x)
    torch.testing.assert_close(dual[..., :video_size], at[2.0][..., :video_size], rtol=TOL, atol=TOL)
    torch.testing.assert_close(dual[..., video_size:], at[6.0][..., video_size:], rtol=TOL, atol=TOL)
    assert (at[2.0] - at[6.0])[..., video_size:].abs().max() > 1e-3

    # Equal scales, or a latent that is not packed: CFG at video_cfg; the negative still predicted at 1.
    for scales, parts in (((2.0, 2.0), shapes), ((2.0, 6.0), None)):
        guider = _guider(model, positive, negative, shapes, scales[0], cfg_function=DualModalityCfg(*scales),
                         keep_negative=True)
        guider.parts = parts
        torch.testing.assert_close(_call(guider, x), at[2.0], rtol=TOL, atol=TOL)
    counted.calls.clear()
    at_one = _call(_guider(model, positive, negative, shapes, 1.0, cfg_function=DualModalityCfg(1.0, 1.0),
                           keep_negative=True), x)
    assert [batch for batch, _ in counted.calls] == [2]
    cond, _ = _plain(setup, model, inputs, x, setup[7], reference)
    torch.testing.assert_close(at_one, cond, rtol=TOL, atol=TOL)
