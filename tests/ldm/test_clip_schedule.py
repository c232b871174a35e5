"""The scheduled CLIP: ComfyUI's keyframe ranges, one patched encoder per range against apply_lora, the guider's
reading of the ranges, and a LoRA'd copy that encodes first leaving its base's hidden states as they were."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from ldm.lora import apply_lora, load_lora, shallow_copy
from ldm.presets import PRESETS, randomize_
from ldm.sampling import CFGGuider, Denoiser, DiscreteSchedule
from ldm.sampling.clip_schedule import ClipRange, clip_ranges, encode_scheduled, keyframe_spans
from ldm.sampling.hooks import HookKeyframes, Hooks, Keyframe, WeightHook
from ldm.text_encoders import build_text_encoder, random_text_encoder_config
from ldm.unet import UNetModel

PROMPT = ["a red circle"]


def keyframes(*frames: tuple[float, float]) -> HookKeyframes:
    """(strength, start) pairs, added in order as CreateHookKeyframe chains add them."""
    out = HookKeyframes()
    for strength, start in frames:
        out = out.add(Keyframe(strength, start))
    return out


def hook(strength_clip: float, *frames: tuple[float, float], lora=None) -> WeightHook:
    return WeightHook(lora, 1.0, strength_clip, "hook", keyframes(*frames))


def test_each_keyframe_holds_until_the_next_with_another_strength():
    assert keyframe_spans(HookKeyframes()) == [(0.0, 1.0, 1.0)]
    # Two keyframes at one start: the one added last; an equal strength later extends the span.
    assert keyframe_spans(keyframes((0.5, 0.0), (2.0, 0.0), (2.0, 0.3), (0.0, 0.6))) == [(0.0, 0.6, 2.0),
                                                                                        (0.6, 1.0, 0.0)]
    # Nothing before the first keyframe; a last keyframe at the very end adds no span.
    assert keyframe_spans(keyframes((0.0, 0.5), (3.0, 1.0))) == [(0.5, 1.0, 0.0)]
    assert keyframe_spans(keyframes((3.0, 1.0))) == []


def test_ranges_cut_at_every_hooks_bounds_with_full_strength_before_a_first_keyframe():
    late = hook(2.0, (0.0, 0.5))  # strength 0 from half-way: full clip strength before (ComfyUI's schedule)
    steps = hook(1.0, (0.5, 0.0), (1.5, 0.25), (0.5, 0.75))
    plain = hook(3.0)
    assert clip_ranges(Hooks((late, steps, plain))) == [
        ClipRange(0.0, 0.25, (2.0, 0.5, 3.0)), ClipRange(0.25, 0.5, (2.0, 1.5, 3.0)),
        ClipRange(0.5, 0.75, (0.0, 1.5, 3.0)), ClipRange(0.75, 1.0, (0.0, 0.5, 3.0))]
    assert clip_ranges(Hooks((plain,))) == [ClipRange(0.0, 1.0, (3.0,))]
    assert clip_ranges(Hooks((hook(1.0, (2.0, 1.0)),))) == []  # nothing left to encode for


@pytest.fixture(scope="module")
def sdxl_parts(tmp_path_factory):
    encoder = build_text_encoder(random_text_encoder_config("tiny-sdxl"))
    encoder.init_random_weights(seed=3)
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for key, width in (("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", 32),
                       ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 48)):
        tensors |= {f"{key}.lora_down.weight": torch.randn(4, width, generator=g) * 0.3,
                    f"{key}.lora_up.weight": torch.randn(width, 4, generator=g) * 0.3,
                    f"{key}.alpha": torch.tensor(4.0)}
    path = tmp_path_factory.mktemp("clip_schedule") / "te.safetensors"
    safetensors.torch.save_file(tensors, path)
    return encoder, load_lora(path)


@torch.inference_mode()
def test_each_range_is_encoded_by_the_encoder_with_the_lora_at_its_strength(sdxl_parts):
    encoder, lora = sdxl_parts
    hooks = Hooks((hook(2.0, (0.5, 0.0), (1.5, 0.4), (0.5, 0.8), lora=lora),))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    calls = []

    def encode(module):
        calls.append(module)
        return module.encode(PROMPT).cond

    out = encode_scheduled(encoder, hooks, encode)
    assert [(r.start_percent, r.end_percent, r.strengths) for r, _ in out] == [
        (0.0, 0.4, (1.0,)), (0.4, 0.8, (3.0,)), (0.8, 1.0, (1.0,))]
    assert len(calls) == 2 and out[2][1] is out[0][1]  # equal strengths: one encoding
    for clip_range, encoded in out:
        expected = apply_lora(encoder, lora, clip_range.strengths[0]).encode(PROMPT).cond
        assert torch.allclose(encoded, expected, atol=1e-6)
    assert (out[0][1] - out[1][1]).abs().max() > 1e-2
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())  # the base is as it was


@torch.inference_mode()
def test_a_copy_encoding_first_leaves_the_base_encoders_hidden_states_alone():
    # transformers 5 installs its hidden-state hooks at the first forward; a copy that shares the hook lists
    # installed them for the base too, which then collected every layer twice (SDXL reads the penultimate).
    def fresh():
        encoder = build_text_encoder(random_text_encoder_config("tiny-sdxl"))
        encoder.init_random_weights(seed=3)
        return encoder

    expected = fresh().encode(PROMPT).cond
    encoder = fresh()
    shallow_copy(encoder).encode(PROMPT)
    assert torch.equal(encoder.encode(PROMPT).cond, expected)


@torch.no_grad()
def test_the_guider_takes_an_entrys_keyframe_range_within_its_timestep_range():
    schedule = DiscreteSchedule()
    unet = randomize_(UNetModel(PRESETS["tiny-sd1"][2]), torch.Generator().manual_seed(0)).eval()
    denoiser = Denoiser(unet, schedule)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=g)
    a, b = (torch.randn(1, 77, 32, generator=g) for _ in range(2))

    def at(percent: float, positive: list) -> torch.Tensor:
        return CFGGuider(denoiser, positive, [], 1.0)(x, torch.tensor([schedule.sigma_at_percent(percent)]))

    scheduled = [(a, {"clip_start_percent": 0.0, "clip_end_percent": 0.5}),
                 (b, {"clip_start_percent": 0.5, "clip_end_percent": 1.0})]
    assert torch.equal(at(0.3, scheduled), at(0.3, [(a, {})]))
    assert torch.equal(at(0.7, scheduled), at(0.7, [(b, {})]))
    # ConditioningSetTimestepRange(0.4, 1) on both: a acts in 0.4-0.5 only, b in 0.5-1 (ComfyUI intersects).
    ranged = [(emb, {**opts, "start_percent": 0.4, "end_percent": 1.0}) for emb, opts in scheduled]
    assert torch.equal(at(0.45, ranged), at(0.45, [(a, {})]))
    assert torch.equal(at(0.3, ranged + [(b, {"start_percent": 0.0, "end_percent": 0.4})]), at(0.3, [(b, {})]))
