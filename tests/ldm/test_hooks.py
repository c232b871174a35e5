"""Hooks at the denoiser level: hooked entries predicted by a LoRA'd copy, default entries, keyframes, the cache."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from ldm.lora import apply_lora, load_lora
from ldm.presets import PRESETS, randomize_
from ldm.sampling import CFGGuider, Conditioning, Denoiser, DiscreteSchedule
from ldm.sampling.hooks import HookedUNets, HookKeyframes, Hooks, Keyframe, WeightHook
from ldm.unet import UNetModel

SCHEDULE = DiscreteSchedule()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    unet = randomize_(UNetModel(PRESETS["tiny-sd1"][2]), torch.Generator().manual_seed(0)).eval()
    path = tmp_path_factory.mktemp("hooks") / "lora.safetensors"
    g = torch.Generator().manual_seed(1)
    # The output conv, whose change shows in every prediction, and an attention projection.
    safetensors.torch.save_file({"lora_unet_out_2.lora_down.weight": torch.randn(4, 32, 3, 3, generator=g) * 0.1,
                                 "lora_unet_out_2.lora_up.weight": torch.randn(4, 4, 1, 1, generator=g) * 0.1,
                                 "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight":
                                 torch.randn(4, 32, generator=g), "lora_unet_input_blocks_1_1_transformer_blocks_0_"
                                 "attn1_to_q.lora_up.weight": torch.randn(32, 4, generator=g)}, path)
    x = torch.randn(1, 4, 16, 16, generator=g) * 2
    ctx = [torch.randn(1, 77, 32, generator=g) for _ in range(3)]
    return unet, load_lora(path), x, ctx


def hooked_unets(unet: UNetModel) -> HookedUNets:
    return HookedUNets(unet, SCHEDULE.sigma_at_percent, lambda m: Denoiser(m, SCHEDULE))


def predict(unet, x, sigma, context) -> torch.Tensor:
    return Denoiser(unet, SCHEDULE)(x, torch.tensor([sigma]), Conditioning(context))


@torch.no_grad()
def test_only_the_hooked_positive_runs_with_the_lora(parts):
    unet, lora, x, ctx = parts
    hooks = Hooks((WeightHook(lora, 0.8, 1.0, "lora"),))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    guider = CFGGuider(Denoiser(unet, SCHEDULE), [(ctx[0], {"hooks": hooks})], [(ctx[1], {})], 5.0,
                       hooked=hooked_unets(unet))
    out = guider(x, torch.tensor([2.0]))
    lora_unet = apply_lora(unet, lora, 0.8)
    cond, uncond = predict(lora_unet, x, 2.0, ctx[0]), predict(unet, x, 2.0, ctx[1])
    assert torch.allclose(out, uncond + 5.0 * (cond - uncond), atol=1e-5)
    assert (cond - predict(unet, x, 2.0, ctx[0])).abs().max() > 1e-2  # the LoRA changes it
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())  # the base UNet is untouched


@torch.no_grad()
def test_entries_of_different_hook_groups_never_share_a_call(parts):
    unet, lora, x, ctx = parts
    calls = []
    hooks = Hooks((WeightHook(lora, 1.0, 1.0, "lora"),))
    made = hooked_unets(unet)
    wrapped = HookedUNets(unet, SCHEDULE.sigma_at_percent,
                          lambda m: Denoiser(lambda *a, **k: calls.append(("hooked", a[0].shape[0])) or m(*a, **k),
                                             SCHEDULE))
    denoiser = Denoiser(lambda *a, **k: calls.append(("plain", a[0].shape[0])) or unet(*a, **k), SCHEDULE)
    both = [(ctx[0], {"hooks": hooks}), (ctx[2], {"hooks": hooks})]
    CFGGuider(denoiser, both, [(ctx[1], {})], 3.0, hooked=wrapped)(x, torch.tensor([1.0]))
    assert sorted(calls) == [("hooked", 2), ("plain", 1)]
    assert made.get(hooks, 1.0) is made.get(hooks, 0.5)  # same strengths: the same copy


def test_keyframes_hold_from_their_start_and_the_first_from_the_beginning():
    kf = HookKeyframes().add(Keyframe(1.0, 0.5)).add(Keyframe(0.0, 0.0)).add(Keyframe(2.0, 0.8))
    assert [k.start_percent for k in kf.keyframes] == [0.0, 0.5, 0.8]
    at = SCHEDULE.sigma_at_percent
    assert [kf.strength_at(at(p), at) for p in (0.0, 0.3, 0.5, 0.7, 0.9)] == [0.0, 0.0, 1.0, 1.0, 2.0]
    late = HookKeyframes().add(Keyframe(0.25, 0.6))
    assert late.strength_at(at(0.1), at) == 0.25  # the only keyframe holds before its start too (ComfyUI)
    assert HookKeyframes().strength_at(5.0, at) == 1.0


def test_hooked_copies_are_remade_only_when_a_keyframe_changes_the_strength(parts):
    unet, lora, _, _ = parts
    hooks = Hooks((WeightHook(lora, 2.0, 1.0, "lora"),)).with_keyframes(
        HookKeyframes().add(Keyframe(0.5, 0.0)).add(Keyframe(1.0, 0.5)))
    made = hooked_unets(unet)
    at = SCHEDULE.sigma_at_percent
    first = made.get(hooks, at(0.1))
    assert made.get(hooks, at(0.3)) is first
    second = made.get(hooks, at(0.6))
    assert second is not first
    q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    expected = apply_lora(unet, lora, 2.0).state_dict()[q]
    assert torch.allclose(second.unet.state_dict()[q], expected, atol=1e-6)
    assert torch.allclose(first.unet.state_dict()[q], apply_lora(unet, lora, 1.0).state_dict()[q], atol=1e-6)
    made.close()
    assert made.get(hooks, at(0.6)) is not second


def test_combine_keeps_each_hook_once_in_order(parts):
    _, lora, _, _ = parts
    a, b = WeightHook(lora, 1.0, 1.0, "a"), WeightHook(lora, 0.5, 0.0, "b")
    combined = Hooks.combine([Hooks((a,)), None, Hooks((b, a))])
    assert combined.hooks == (a, b)
    assert Hooks.combine([]) == Hooks()


@torch.no_grad()
def test_default_entries_fill_what_the_others_leave(parts):
    unet, _, x, ctx = parts
    denoiser, sigma = Denoiser(unet, SCHEDULE), torch.tensor([1.5])
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1.0

    def positive(conds):
        return CFGGuider(denoiser, conds, [], 1.0)(x, sigma)

    a, d = positive([(ctx[0], {})]), positive([(ctx[2], {})])
    mixed = positive([(ctx[0], {"mask": mask}), (ctx[2], {"default": True})])
    assert torch.allclose(mixed, torch.where(mask[:, None].bool(), a, d), atol=1e-5)
    # A whole-image entry leaves no room: the default is not run at all.
    assert torch.allclose(positive([(ctx[0], {}), (ctx[2], {"default": True})]), a, atol=1e-6)
    # Outside the other entry's timestep range, the default alone acts.
    ranged = positive([(ctx[0], {"start_percent": 0.0, "end_percent": 0.1}), (ctx[2], {"default": True})])
    assert torch.allclose(ranged, d, atol=1e-6)
