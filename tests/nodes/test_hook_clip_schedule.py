"""SetClipHooks with schedule_clip through the engine: one entry per keyframe range, each equal to LoraLoader's
CLIP at that range's strength, and sampling with them equal to the same encodings put on timestep ranges."""

import pytest
import safetensors.torch
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_hook_nodes import base, ksampler, run, write_part_loras
from tests.nodes.test_sd_workflows import write_lora

# The hook's clip strength 2 times the keyframes' 0.5 (from the start) and 1.5 (from 0.4): LoraLoader at 1 and 3.
PERCENT = 0.4
STRENGTHS = (1.0, 3.0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_schedule")
    for name, preset in (("sd1", "tiny-sd1"), ("sdxl", "tiny-sdxl")):
        make_checkpoint(preset, root / "models" / "checkpoints" / f"{name}.safetensors", seed=1)
    (root / "models" / "loras").mkdir(parents=True)
    write_lora(root / "models" / "loras" / "lora.safetensors")
    write_part_loras(root / "models" / "loras")
    write_clip_loras(root / "models" / "loras")
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def write_clip_loras(folder) -> None:
    """LoRAs whose text-encoder layers change the encodings as much as another prompt does (the tiny UNet
    reacts little to its context): clip_lora for SD1 (with a UNet layer), sdxl_clip_lora for both SDXL encoders."""
    g = torch.Generator().manual_seed(5)
    layers = {"clip_lora": {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": 32,
                            **{f"lora_te_text_model_encoder_layers_{i}_self_attn_out_proj": 32 for i in (0, 1)}},
              "sdxl_clip_lora": {"lora_te1_text_model_encoder_layers_0_self_attn_out_proj": 32,
                                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": 48}}
    for name, keys in layers.items():
        tensors = {}
        for key, width in keys.items():
            tensors |= {f"{key}.lora_down.weight": torch.randn(4, width, generator=g) * 0.3,
                        f"{key}.lora_up.weight": torch.randn(width, 4, generator=g) * 0.3,
                        f"{key}.alpha": torch.tensor(4.0)}
        safetensors.torch.save_file(tensors, folder / f"{name}.safetensors")


def scheduled(schedule_clip: bool = True, apply_to_conds: bool = False, keyframes: bool = True) -> dict:
    """base() with node 6 a CLIP set to the keyframed hook (node 12), and 9 the first prompt encoded by it."""
    hooks = ["12", 0] if keyframes else ["5", 0]
    return {**base(),
            "5": {"class_type": "CreateHookLora", "inputs": {"lora_name": "clip_lora.safetensors",
                                                             "strength_model": 1.0, "strength_clip": 2.0}},
            "10": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 0.5, "start_percent": 0.0}},
            "11": {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": 1.5, "start_percent": PERCENT,
                                                                 "prev_hook_kf": ["10", 0]}},
            "12": {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["5", 0], "hook_kf": ["11", 0]}},
            "6": {"class_type": "SetClipHooks", "inputs": {"clip": ["1", 1], "apply_to_conds": apply_to_conds,
                                                           "schedule_clip": schedule_clip, "hooks": hooks}},
            "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["6", 0]}}}


def lora_encoded(text: str = "a red circle", tag: str = "") -> dict:
    """enc0, enc1: `text` encoded by LoraLoader's CLIP at each range's strength; range0, range1: those on their
    ranges (ConditioningSetTimestepRange), both: the two together. `tag` ends every node id."""
    nodes = {}
    for i, (strength, (start, end)) in enumerate(zip(STRENGTHS, ((0.0, PERCENT), (PERCENT, 1.0)), strict=True)):
        nodes[f"lora{i}{tag}"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": "clip_lora.safetensors", "strength_model": 1.0,
            "strength_clip": strength}}
        nodes[f"enc{i}{tag}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": [f"lora{i}{tag}", 1]}}
        nodes[f"range{i}{tag}"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {
            "conditioning": [f"enc{i}{tag}", 0], "start": start, "end": end}}
    nodes[f"both{tag}"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": [f"range0{tag}", 0],
                                                                           "conditioning_2": [f"range1{tag}", 0]}}
    return nodes


def close(out: torch.Tensor, expected: torch.Tensor) -> bool:
    # Latents of the tiny random model reach ~200 at cfg 4: equal to float32 rounding relative to that scale.
    return bool((out - expected).abs().max() <= 1e-5 * expected.abs().max())


def test_one_entry_per_keyframe_range_each_as_lora_loaders_clip_encodes_it(engine):
    [plain_before] = run(engine, {**base(), "9": base()["2"]})
    entries = run(engine, scheduled(apply_to_conds=True))[0]
    assert [(o["clip_start_percent"], o["clip_end_percent"]) for _, o in entries] == [(0.0, PERCENT), (PERCENT, 1.0)]
    workflow = {**base(), **lora_encoded()}
    for (encoded, options), node in zip(entries, ("enc0", "enc1"), strict=True):
        [[(expected, _)]] = run(engine, workflow, node)
        assert torch.allclose(encoded, expected, atol=1e-6)
        # apply_to_conds: each entry carries the keyframed hook for the UNet
        assert [h.keyframes.keyframes[1].strength for h in options["hooks"].hooks] == [1.5]
    assert (entries[0][0] - entries[1][0]).abs().max() > 1e-4
    # The loaded CLIP is as it was: the patched copies were the encoder's own.
    [plain_after] = run(engine, {**base(), "9": base()["2"]})
    assert torch.equal(plain_before[0][0], plain_after[0][0])


def test_without_keyframes_schedule_clip_changes_nothing(engine):
    [[(on, on_options)]] = run(engine, scheduled(keyframes=False))
    [[(off, off_options)]] = run(engine, scheduled(schedule_clip=False, keyframes=False))
    assert torch.equal(on, off) and on_options.keys() == off_options.keys() == {"pooled_output"}


def test_sampling_a_scheduled_prompt_equals_its_encodings_on_timestep_ranges(engine):
    steps = 6
    out = run(engine, {**scheduled(), "98": ksampler(["1", 0], ["9", 0], ["3", 0], steps)}, "98")[0]["samples"]
    expected = run(engine, {**base(), **lora_encoded(), "98": ksampler(["1", 0], ["both", 0], ["3", 0], steps)},
                   "98")[0]["samples"]
    assert close(out, expected)
    constant = run(engine, {**scheduled(schedule_clip=False), "98": ksampler(["1", 0], ["9", 0], ["3", 0], steps)},
                   "98")[0]["samples"]
    # schedule_clip makes a difference far beyond the tolerance (the constant strength 2 lies between 1 and 3)
    assert (out - constant).abs().max() > 1e-4 * constant.abs().max()


def test_scheduled_prompts_carry_the_keyframed_hooks_to_the_unet(engine):
    # Both prompts through the scheduled CLIP with apply_to_conds: its entries run the UNet with the hook at
    # its keyframed model strength, as SetModelHooksOnCond puts it on the encodings.
    steps = 6
    workflow = {**scheduled(apply_to_conds=True), "7": {"class_type": "CLIPTextEncode", "inputs": {
        "text": "a blue square", "clip": ["6", 0]}}, "98": ksampler(["1", 0], ["9", 0], ["7", 0], steps)}
    out = run(engine, workflow, "98")[0]["samples"]
    on_cond = {f"hooked{tag}": {"class_type": "SetModelHooksOnCond", "inputs": {"conditioning": [f"both{tag}", 0],
                                                                              "hooks": ["12", 0]}}
               for tag in ("", "-")}
    staged = {**scheduled(), **lora_encoded(), **lora_encoded("a blue square", "-"), **on_cond,
              "98": ksampler(["1", 0], ["hooked", 0], ["hooked-", 0], steps)}
    assert close(out, run(engine, staged, "98")[0]["samples"])


def test_a_timestep_range_set_afterwards_meets_the_keyframe_ranges(engine):
    # ComfyUI intersects: the scheduled entries act from 0.2 on, each within its keyframe range.
    steps = 8
    ranged = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["9", 0], "start": 0.2,
                                                                       "end": 1.0}}
    early = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["3", 0], "start": 0.0,
                                                                      "end": 0.2}}

    def combine(a: str, b: str) -> dict:
        return {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": [a, 0], "conditioning_2": [b, 0]}}

    workflow = {**scheduled(), "60": ranged, "61": early, "62": combine("60", "61"),
                "98": ksampler(["1", 0], ["62", 0], ["3", 0], steps)}
    out = run(engine, workflow, "98")[0]["samples"]
    manual = {**base(), **lora_encoded(), "61": early, "62": combine("both", "61"),
              "98": ksampler(["1", 0], ["62", 0], ["3", 0], steps)}
    manual["range0"]["inputs"]["start"] = 0.2
    assert close(out, run(engine, manual, "98")[0]["samples"])


def test_the_sdxl_encoders_give_one_entry_per_range_with_their_options(engine):
    sdxl = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}}}
    workflow = {**scheduled(), **sdxl}
    workflow["5"]["inputs"]["lora_name"] = "sdxl_clip_lora.safetensors"
    workflow["9"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024,
        "text_g": "a red circle", "clip": ["6", 0], "text_l": "a red circle"}}
    entries = run(engine, workflow)[0]
    expected = {**sdxl, **lora_encoded()}
    for i in (0, 1):
        expected[f"lora{i}"]["inputs"]["lora_name"] = "sdxl_clip_lora.safetensors"
        expected[f"enc{i}"] = {**workflow["9"], "inputs": {**workflow["9"]["inputs"], "clip": [f"lora{i}", 1]}}
    for (encoded, options), node in zip(entries, ("enc0", "enc1"), strict=True):
        [[(theirs, their_options)]] = run(engine, expected, node)
        assert torch.allclose(encoded, theirs, atol=1e-6)
        assert torch.allclose(options["pooled_output"], their_options["pooled_output"], atol=1e-6)
        assert options["target_width"] == 1024
    assert (entries[0][0] - entries[1][0]).abs().max() > 1e-5


def test_schedules_that_cannot_encode_are_refused_at_set_clip_hooks(engine):
    def refused(workflow: dict) -> str:
        result = engine.run(parse_api({**workflow, "99": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}))
        assert not result.ok and result.error.node_id == "6", result.error
        return str(result.error)

    at_end = scheduled()
    at_end["10"]["inputs"]["start_percent"] = 1.0
    at_end["12"]["inputs"]["hook_kf"] = ["10", 0]
    assert "every hook keyframe starts at the end of the run" in refused(at_end)
    wrong = {**scheduled(), "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}}}
    assert "clip_lora.safetensors patches no layer of this text encoder" in refused(wrong)
    sdxl_lora = scheduled()
    sdxl_lora["5"]["inputs"]["lora_name"] = "sdxl_te.safetensors"
    assert "is a SDXL LoRA; it does not fit a SD1 model" in refused(sdxl_lora)
