"""The hook nodes through the engine: hooked prompts against LoraLoader, keyframes against a two-stage
KSamplerAdvanced, SetClipHooks against LoraLoader's CLIP, and the conditioning nodes by their definitions."""

import pytest
import safetensors.torch
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from ldm.sampling import DiscreteSchedule
from ldm.sampling.hooks import HookKeyframes, Hooks, Keyframe, WeightHook
from ldm.sampling.ksampler import compute_sigmas
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd import hook_conditioning as cond_nodes
from nodes.sd import hooks as nodes
from tests.nodes.test_sd_workflows import write_lora


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "other.safetensors", seed=2)
    make_checkpoint("tiny-sdxl", root / "models" / "checkpoints" / "sdxl.safetensors", seed=1)
    (root / "models" / "loras").mkdir(parents=True)
    write_lora(root / "models" / "loras" / "lora.safetensors")
    write_part_loras(root / "models" / "loras")
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def write_part_loras(folder) -> None:
    """unet_only: write_lora's UNet layer alone; sdxl_te: one layer of SDXL's second text encoder (bigG)."""
    g = torch.Generator().manual_seed(4)
    for name, key in (("unet_only", "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"),
                      ("sdxl_te", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj")):
        safetensors.torch.save_file({f"{key}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.1,
                                     f"{key}.lora_up.weight": torch.randn(32, 4, generator=g) * 0.1,
                                     f"{key}.alpha": torch.tensor(4.0)}, folder / f"{name}.safetensors")


def base() -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": "lora.safetensors",
                                                                      "strength_model": 3.0}}}


def ksampler(model: list, positive: list, negative: list, steps: int = 4, **advanced) -> dict:
    inputs = {"model": model, "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": positive, "negative": negative, "latent_image": ["4", 0]}
    if not advanced:
        return {"class_type": "KSampler", "inputs": {**inputs, "seed": 3, "denoise": 1.0}}
    return {"class_type": "KSamplerAdvanced", "inputs": {**inputs, "noise_seed": 3, **advanced}}


def on_cond(node: str, hooks: str = "5") -> dict:
    return {"class_type": "SetModelHooksOnCond", "inputs": {"conditioning": [node, 0], "hooks": [hooks, 0]}}


def run(engine, workflow: dict, node: str = "9"):
    workflow = {**workflow, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}
    result = engine.run(parse_api(workflow), keep=[node])
    assert result.ok, result.error
    return result.values[node]


def lora_model(strength: float = 3.0) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "lora.safetensors",
                                                            "strength_model": strength}}


def test_hooks_on_every_prompt_equal_the_lora_loaded_model(engine):
    hooked = {**base(), "6": on_cond("2"), "7": on_cond("3"), "9": ksampler(["1", 0], ["6", 0], ["7", 0])}
    loaded = {**base(), "8": lora_model(), "9": ksampler(["8", 0], ["2", 0], ["3", 0])}
    plain = {**base(), "9": ksampler(["1", 0], ["2", 0], ["3", 0])}
    out = run(engine, hooked)[0]["samples"]
    # The tiny random model's latents reach ~200 at cfg 4: equal to float32 rounding relative to that scale
    # (hooked prompts run in calls of their own, the plain ones in the fused CFG call).
    expected = run(engine, loaded)[0]["samples"]
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (out - run(engine, plain)[0]["samples"]).abs().max() > 1e-3


def test_hooks_reach_the_patched_copies_guidance_patches_predict_with(engine):
    def pag(model: list) -> dict:
        return {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": model, "scale": 2.0}}

    hooked = {**base(), "6": on_cond("2"), "7": on_cond("3"), "8": pag(["1", 0]),
              "9": ksampler(["8", 0], ["6", 0], ["7", 0])}
    loaded = {**base(), "7": lora_model(), "8": pag(["7", 0]), "9": ksampler(["8", 0], ["2", 0], ["3", 0])}
    out, expected = run(engine, hooked)[0]["samples"], run(engine, loaded)[0]["samples"]
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_keyframed_hook_equals_two_stages_plain_then_lora(engine):
    steps, percent = 4, 0.5
    schedule = DiscreteSchedule()
    sigmas = compute_sigmas(schedule, "normal", steps).tolist()
    split = next(i for i, s in enumerate(sigmas) if s <= schedule.sigma_at_percent(percent))
    assert 0 < split < steps
    keyframed = {**base(),
                 "10": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 0.0, "start_percent": 0.0}},
                 "11": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 1.0,
                                                                      "start_percent": percent,
                                                                      "prev_hook_kf": ["10", 0]}},
                 "12": {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["5", 0], "hook_kf": ["11", 0]}},
                 "6": on_cond("2", "12"), "7": on_cond("3", "12"),
                 "9": ksampler(["1", 0], ["6", 0], ["7", 0], steps)}
    staged = {**base(), "8": lora_model(),
              "13": ksampler(["1", 0], ["2", 0], ["3", 0], steps, add_noise="enable", start_at_step=0,
                             end_at_step=split, return_with_leftover_noise="enable"),
              "9": ksampler(["8", 0], ["2", 0], ["3", 0], steps, add_noise="disable", start_at_step=split,
                            end_at_step=10000, return_with_leftover_noise="disable")}
    staged["9"]["inputs"]["latent_image"] = ["13", 0]
    # Relative to the largest value, as above: the hooked prompts run in calls of their own, whose float32 rounding
    # differs from the fused CFG call's by a few ulps of values in the hundreds.
    out, expected = run(engine, keyframed)[0]["samples"], run(engine, staged)[0]["samples"]
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_checkpoint_as_a_hook_runs_the_hooked_prompts_with_its_unet(engine):
    as_lora = {"class_type": "CreateHookModelAsLoraModelOnly", "inputs": {"ckpt_name": "other.safetensors",
                                                                           "strength_model": 1.0}}
    hooked = {**base(), "5": as_lora, "6": on_cond("2"), "7": on_cond("3"),
              "9": ksampler(["1", 0], ["6", 0], ["7", 0])}
    other = {**base(), "8": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.safetensors"}},
             "9": ksampler(["8", 0], ["2", 0], ["3", 0])}
    out, expected = run(engine, hooked)[0]["samples"], run(engine, other)[0]["samples"]
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    clip = {**base(), "5": {"class_type": "CreateHookModelAsLora", "inputs": {
        "ckpt_name": "other.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
        "6": {"class_type": "SetClipHooks", "inputs": {"clip": ["1", 1], "apply_to_conds": True,
                                                       "schedule_clip": False, "hooks": ["5", 0]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["6", 0]}}}
    [[(encoded, _)]] = run(engine, clip)
    [[(theirs, _)]] = run(engine, {**other, "9": {"class_type": "CLIPTextEncode", "inputs": {
        "text": "a red circle", "clip": ["8", 1]}}})
    assert torch.allclose(encoded, theirs, atol=1e-5)
    wrong = {**hooked, "5": {**as_lora, "inputs": {**as_lora["inputs"], "ckpt_name": "sdxl.safetensors"}}}
    result = engine.run(parse_api({**wrong, "99": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}))
    assert not result.ok and "sdxl.safetensors does not have this model's shape" in str(result.error)


def test_set_clip_hooks_encodes_with_the_lora_clip_and_tags_the_prompt(engine):
    workflow = {**base(),
                "5": {"class_type": "CreateHookLora", "inputs": {"lora_name": "lora.safetensors",
                                                                 "strength_model": 1.0, "strength_clip": 2.0}},
                "6": {"class_type": "SetClipHooks", "inputs": {"clip": ["1", 1], "apply_to_conds": True,
                                                               "schedule_clip": False, "hooks": ["5", 0]}},
                "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["6", 0]}}}
    [[(hooked, options)]] = run(engine, workflow)
    loaded = {**base(), "8": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "lora.safetensors", "strength_model": 1.0,
        "strength_clip": 2.0}}, "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle",
                                                                                 "clip": ["8", 1]}}}
    [[(expected, _)]] = run(engine, loaded)
    [[(plain, plain_options)]] = run(engine, {**base(), "9": base()["2"]})
    assert torch.allclose(hooked, expected, atol=1e-5) and (hooked - plain).abs().max() > 1e-4
    assert [h.strength_model for h in options["hooks"].hooks] == [1.0] and "hooks" not in plain_options
    workflow["6"]["inputs"]["apply_to_conds"] = False
    [[(untagged, options)]] = run(engine, workflow)
    assert torch.equal(untagged, hooked) and "hooks" not in options


def test_a_hook_lora_of_another_family_is_refused_as_lora_loader_refuses_it(engine):
    # lora.safetensors is an SD1 LoRA: on SDXL it patches no UNet layer and no text-encoder layer (kohya's
    # lora_te_ names SD1's one encoder); it used to sample as if unhooked.
    sdxl = {**base(), "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}}}
    unet = {**sdxl, "6": on_cond("2"), "9": ksampler(["1", 0], ["6", 0], ["3", 0])}
    result = engine.run(parse_api({**unet, "99": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}))
    assert not result.ok and result.error.node_id == "9"
    assert "lora.safetensors patches no layer of this UNet" in str(result.error)
    # The family is checked before sampling even for a LoRA with no UNet layers at all (sdxl_te's are the text
    # encoders'), which would otherwise leave the prompt's UNet unpatched without a word.
    te_only = {**base(), "5": {**base()["5"], "inputs": {**base()["5"]["inputs"], "lora_name": "sdxl_te.safetensors"}},
               "6": on_cond("2"), "9": ksampler(["1", 0], ["6", 0], ["3", 0])}
    result = engine.run(parse_api({**te_only, "99": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}))
    assert not result.ok and result.error.node_id == "9"
    assert "sdxl_te.safetensors is a SDXL LoRA; it does not fit a SD1 model" in str(result.error)

    def set_clip(lora: str, clip: list) -> dict:
        return {"5": {"class_type": "CreateHookLora", "inputs": {"lora_name": lora, "strength_model": 1.0,
                                                                 "strength_clip": 1.0}},
                "6": {"class_type": "SetClipHooks", "inputs": {"clip": clip, "apply_to_conds": True,
                                                               "schedule_clip": False, "hooks": ["5", 0]}},
                "99": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}
    for lora, ckpt, message in (("lora.safetensors", sdxl, "lora.safetensors patches no layer of this text encoder"),
                                ("sdxl_te.safetensors", base(), "sdxl_te.safetensors is a SDXL LoRA; it does not "
                                                                "fit a SD1 model")):
        result = engine.run(parse_api({**ckpt, **set_clip(lora, ["1", 1])}))
        assert not result.ok and result.error.node_id == "6" and message in str(result.error), result.error
    # A LoRA without layers for a part is no error there: a UNet-only LoRA on the CLIP (strength_clip 1, the
    # default), as in ComfyUI; the UNet then runs with it.
    assert engine.run(parse_api({**base(), **set_clip("unet_only.safetensors", ["1", 1])})).ok
    only = {**base(), "5": {**base()["5"], "inputs": {"lora_name": "unet_only.safetensors", "strength_model": 3.0}},
            "6": on_cond("2"), "7": on_cond("3"), "9": ksampler(["1", 0], ["6", 0], ["7", 0])}
    loader = lora_model()
    loader["inputs"]["lora_name"] = "unet_only.safetensors"
    loaded = {**base(), "8": loader, "9": ksampler(["8", 0], ["2", 0], ["3", 0])}
    out, expected = run(engine, only)[0]["samples"], run(engine, loaded)[0]["samples"]
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_unset_clip_hooks_and_a_zero_hook_change_nothing(engine):
    clip = object()
    assert nodes.SetClipHooks().execute(clip, True, False) == (clip,)
    # CombineHooks with nothing connected gives an empty group, which ComfyUI gives as None: no hooks on the
    # prompts (it tagged them, sending them through the hooked UNet calls, one per entry, uncompiled)
    [empty] = nodes.CombineHooks8().execute()
    assert nodes.SetClipHooks().execute(clip, True, False, empty) == (clip,)
    [[(_, options)]] = cond_nodes.ConditioningSetProperties().execute([entry(1.0)], 1.0, "default", hooks=empty)
    assert options == {}
    [[(_, options)]] = cond_nodes.SetModelHooksOnCond().execute([(torch.zeros(1, 2, 4), {"hooks": hook("a")})],
                                                                empty)
    assert [h.name for h in options["hooks"].hooks] == ["a"]
    prev = Hooks()
    assert nodes.CreateHookLora().execute("lora.safetensors", 0.0, 0.0, prev) == (prev,)


def entry(value: float, **options) -> tuple:
    return torch.full((1, 2, 4), value), options


def hook(name: str) -> Hooks:
    return Hooks((WeightHook(None, 1.0, 1.0, name),))


def test_combine_hooks_is_the_union_in_order():
    a, b, c = hook("a"), hook("b"), hook("c")
    [two] = nodes.CombineHooks2().execute(hooks_A=a, hooks_B=b)
    assert [h.name for h in two.hooks] == ["a", "b"]
    [four] = nodes.CombineHooks4().execute(hooks_A=two, hooks_C=c, hooks_D=a)
    assert [h.name for h in four.hooks] == ["a", "b", "c"]
    [eight] = nodes.CombineHooks8().execute(hooks_H=c)
    assert eight.hooks == c.hooks
    assert nodes.CombineHooks2().execute() == (Hooks(),)


def test_set_properties_nodes_follow_comfyuis_definitions():
    a, b = hook("a"), hook("b")
    mask = torch.ones(4, 4)
    [[(emb, opts)]] = cond_nodes.ConditioningSetProperties().execute([entry(1.0, hooks=a)], 0.5, "mask bounds", mask, b,
                                                                (0.2, 0.7))
    assert [h.name for h in opts["hooks"].hooks] == ["a", "b"]
    assert opts["mask"].shape == (1, 4, 4) and opts["mask_strength"] == 0.5 and opts["set_area_to_bounds"]
    assert (opts["start_percent"], opts["end_percent"]) == (0.2, 0.7)
    [[(_, bare)]] = cond_nodes.ConditioningSetProperties().execute([entry(1.0)], 0.5, "default")
    assert bare == {}  # the strength acts with a mask only, as in ComfyUI
    [combined] = cond_nodes.ConditioningSetPropertiesAndCombine().execute([entry(1.0)], [entry(2.0)], 1.0, "default",
                                                                     hooks=a)
    assert [o.get("hooks") for _, o in combined] == [None, a]
    pos, neg = cond_nodes.PairConditioningSetProperties().execute([entry(1.0)], [entry(2.0)], 1.0, "default",
                                                             timesteps=(0.0, 0.5))
    assert pos[0][1] == neg[0][1] == {"start_percent": 0.0, "end_percent": 0.5}
    pos, neg = cond_nodes.PairConditioningSetPropertiesAndCombine().execute([entry(1.0)], [entry(2.0)], [entry(3.0)],
                                                                       [entry(4.0)], 1.0, "default", hooks=b)
    assert [o.get("hooks") for _, o in pos + neg] == [None, b, None, b]
    pos, neg = cond_nodes.PairConditioningCombine().execute([entry(1.0)], [entry(2.0)], [entry(3.0)], [entry(4.0)])
    assert [e[0, 0, 0].item() for e, _ in pos + neg] == [1.0, 3.0, 2.0, 4.0]
    [[(emb, opts)]] = cond_nodes.SetModelHooksOnCond().execute([entry(1.0)], a)
    assert opts == {"hooks": a}


def test_default_nodes_mark_the_new_entries():
    a = hook("a")
    [cond] = cond_nodes.ConditioningSetDefaultCombine().execute([entry(1.0)], [entry(2.0)], a)
    assert cond[0][1] == {} and cond[1][1] == {"hooks": a, "default": True}
    pos, neg = cond_nodes.PairConditioningSetDefaultCombine().execute([entry(1.0)], [entry(2.0)], [entry(3.0)],
                                                                 [entry(4.0)])
    assert pos[1][1] == neg[1][1] == {"default": True}


def test_keyframe_and_range_nodes():
    [kf] = nodes.CreateHookKeyframe().execute(2.0, 0.6)
    [kf] = nodes.CreateHookKeyframe().execute(0.5, 0.1, kf)
    assert kf == HookKeyframes((Keyframe(0.5, 0.1), Keyframe(2.0, 0.6)))
    hooks = hook("a")
    [scheduled] = nodes.SetHookKeyframes().execute(hooks, kf)
    assert scheduled.hooks[0].keyframes == kf and hooks.hooks[0].keyframes == HookKeyframes()
    assert nodes.SetHookKeyframes().execute(hooks) == (hooks,)
    assert cond_nodes.ConditioningTimestepsRange().execute(0.25, 0.75) == ((0.25, 0.75), (0.0, 0.25), (0.75, 1.0))


def test_declarations_follow_comfyuis_inputs_and_outputs():
    info = cond_nodes.ConditioningSetProperties.object_info()
    assert info["input_order"] == {"required": ["cond_NEW", "strength", "set_cond_area"],
                                   "optional": ["mask", "hooks", "timesteps"]}
    clip = nodes.SetClipHooks.object_info()
    assert clip["input_order"] == {"required": ["clip", "apply_to_conds", "schedule_clip"], "optional": ["hooks"]}
    assert clip["input"]["required"]["apply_to_conds"] == ["BOOLEAN", {"default": True}]
    assert nodes.CreateHookKeyframe.object_info()["output_name"] == ["HOOK_KF"]
    assert cond_nodes.ConditioningTimestepsRange.object_info()["output"] == ["TIMESTEPS_RANGE"] * 3
    assert cond_nodes.PairConditioningCombine.object_info()["output_name"] == ["positive", "negative"]


def test_interpolated_keyframes_follow_the_curve_over_the_range(capsys):
    [kf] = nodes.CreateHookKeyframesInterpolated().execute(0.0, 2.0, "ease_in", 0.2, 0.6, 5)
    assert capsys.readouterr().out == ""
    nodes.CreateHookKeyframesInterpolated().execute(0.0, 2.0, "ease_in", 0.2, 0.6, 2, print_keyframes=True)
    # print_keyframes shows them on the console (it logged them at INFO, which neither `run` nor a worker shows)
    assert capsys.readouterr().out == ("Hook Keyframe - start_percent:0.2 = 0.0\n"
                                       "Hook Keyframe - start_percent:0.6 = 2.0\n")
    assert [k.start_percent for k in kf.keyframes] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])
    assert [k.strength for k in kf.keyframes] == pytest.approx([0.0, 0.125, 0.5, 1.125, 2.0])  # 2 t^2
    assert [k.guarantee_steps for k in kf.keyframes] == [1, 0, 0, 0, 0]
    assert nodes.interpolated(1.0, 3.0, 3, "ease_out") == pytest.approx([1.0, 2.5, 3.0])  # 1 + 2 (1 - (1 - t)^2)
    assert nodes.interpolated(0.0, 1.0, 3, "ease_in_out") == pytest.approx([0.0, 0.5, 1.0])
    [more] = nodes.CreateHookKeyframesInterpolated().execute(1.0, 1.0, "linear", 0.0, 0.1, 2, prev_hook_kf=kf)
    assert len(more.keyframes) == 7 and more.keyframes[0].start_percent == 0.0


def test_keyframes_from_floats_take_a_constant_as_comfyui_does(engine):
    # No core node outputs FLOATS: ComfyUI takes the strengths as a constant (a number, or a list wrapped as
    # {"__value__": [...]}); Loom refused any constant ("Input must be linked").
    def workflow(floats) -> dict:
        return {"20": {"class_type": "CreateHookKeyframesFromFloats", "inputs": {
            "floats_strength": floats, "start_percent": 0.0, "end_percent": 0.5, "print_keyframes": False}}}
    [kf] = run(engine, workflow({"__value__": [0.5, 1.0, 0.0]}), "20")
    assert [(k.strength, k.start_percent) for k in kf.keyframes] == [(0.5, 0.0), (1.0, 0.25), (0.0, 0.5)]
    assert [(k.strength, k.start_percent) for k in run(engine, workflow(2), "20")[0].keyframes] == [(2.0, 0.0)]
    for bad, message in (("0.5", "a number or a list of numbers, not str"), ({"__value__": []}, "is empty")):
        with pytest.raises(WorkflowInvalid, match=message):  # at validation: the server answers 400
            engine.run(parse_api({**workflow(bad), "99": {"class_type": "PreviewAny",
                                                          "inputs": {"source": ["20", 0]}}}))
    options = nodes.CreateHookKeyframesFromFloats.object_info()["input"]["required"]["floats_strength"]
    assert options == ["FLOATS", {"default": -1, "min": -1, "step": 0.001, "tooltip": "a list of strengths (or one)",
                                  "forceInput": True}]


def test_keyframes_from_floats_spread_the_values_evenly():
    [kf] = nodes.CreateHookKeyframesFromFloats().execute([0.5, 1.0, 0.0], 0.0, 0.5)
    assert [(k.start_percent, k.strength) for k in kf.keyframes] == [(0.0, 0.5), (0.25, 1.0), (0.5, 0.0)]
    [one] = nodes.CreateHookKeyframesFromFloats().execute(0.7, 0.3, 1.0)
    assert one.keyframes == (Keyframe(0.7, 0.3),)
    with pytest.raises(ValueError, match="a number or a list of numbers"):
        nodes.CreateHookKeyframesFromFloats().execute("abc", 0.0, 1.0)


def test_every_hook_node_is_off_comfyuis_missing_list():
    from nodes.comfy_compat import COMFY_CORE_NODES_MISSING

    names = {cls.name for cls in nodes.NODES}
    assert len(names) == 21 and not names & COMFY_CORE_NODES_MISSING
