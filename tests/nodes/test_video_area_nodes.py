"""ConditioningSetAreaPercentageVideo: ComfyUI's declaration and area layout, and a tiny Wan 2.1 text-to-video run
where the prompt reaches only the frames of its area."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from ldm.wan_presets import make_wan_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

# 13 frames: 4 latent frames. ComfyUI's inputs in order, with their defaults.
FRAMES = 13
MODULES = ("nodes.builtin.utils", "nodes.sd.part_loaders", "nodes.sd.conditioning", "nodes.sd.wan", "nodes.sd.sampling")
COMFY_INPUTS = [("width", 1.0), ("height", 1.0), ("temporal", 1.0), ("x", 0.0), ("y", 0.0), ("z", 0.0),
                ("strength", 1.0)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_area")
    make_wan_files(root / "models", seed=3, dtype=torch.float32)
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(MODULES), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def test_declaration_is_comfyuis():
    info = builtin_registry(MODULES).get("ConditioningSetAreaPercentageVideo").object_info()
    assert info["category"] == "conditioning" and info["output"] == ["CONDITIONING"]
    assert info["input_order"]["required"] == ["conditioning", *[name for name, _ in COMFY_INPUTS]]
    assert info["input"]["required"]["conditioning"] == ["CONDITIONING", {}]
    for name, default in COMFY_INPUTS:
        kind, options = info["input"]["required"][name]
        high = 10.0 if name == "strength" else 1.0
        assert (kind, options["default"], options["min"], options["max"], options["step"]) == \
            ("FLOAT", default, 0.0, high, 0.01), name


def test_editor_files_load_by_widget_position():
    ui = {"nodes": [{"id": 1, "type": "ConditioningSetAreaPercentageVideo", "inputs": [
        {"name": "conditioning", "link": None}], "widgets_values": [0.5, 0.25, 0.75, 0.1, 0.2, 0.3, 1.5]}],
        "links": []}
    assert ui_to_api(ui, builtin_registry(MODULES))["1"]["inputs"] == {
        "width": 0.5, "height": 0.25, "temporal": 0.75, "x": 0.1, "y": 0.2, "z": 0.3, "strength": 1.5}


def workflow(area: dict | None) -> dict:
    doc = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_t2v-tiny.safetensors",
                                                        "weight_dtype": "default"}},
           "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl-tiny.safetensors", "type": "wan"}},
           "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a fox in the snow"}},
           "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry"}},
           "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red kite in the sky"}},
           "7": {"class_type": "EmptyHunyuanLatentVideo",
                 "inputs": {"width": 32, "height": 32, "length": FRAMES, "batch_size": 1}},
           "8": {"class_type": "KSampler", "inputs": {
               "model": ["1", 0], "seed": 5, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
               "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}}}
    if area is not None:
        doc["11"] = {"class_type": "ConditioningSetAreaPercentageVideo", "inputs": {
            "conditioning": ["10", 0], "width": 1.0, "height": 1.0, "x": 0.0, "y": 0.0, "strength": 1.0, **area}}
        doc["12"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["5", 0],
                                                                      "conditioning_2": ["11", 0]}}
        doc["8"]["inputs"]["positive"] = ["12", 0]
    return doc


def run(engine, doc: dict, node: str = "8"):
    doc = {**doc, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}
    result = engine.run(parse_api(doc), keep=[node])
    assert result.ok, result.error
    return result.values[node][0]


def test_the_area_carries_comfyuis_layout(engine):
    [(_, options)] = run(engine, workflow({"temporal": 0.5, "z": 0.5}), "11")
    assert options["area"] == ("percentage", 0.5, 1.0, 1.0, 0.5, 0.0, 0.0)
    assert options["strength"] == 1.0 and options["set_area_to_bounds"] is False


def test_a_video_area_prompt_reaches_only_its_frames(engine):
    """One step from pure noise returns the model's prediction: frames outside the area are the plain run's
    (the added prompt is not predicted there), frames inside are not."""
    plain = run(engine, workflow(None))["samples"]
    later = run(engine, workflow({"temporal": 0.5, "z": 0.5}))["samples"]
    assert plain.shape == (1, 16, 4, 4, 4)
    torch.testing.assert_close(later[:, :, :2], plain[:, :, :2], rtol=1e-5, atol=1e-5)
    assert (later[:, :, 2:] - plain[:, :, 2:]).abs().mean() > 1e-3
    everywhere = run(engine, workflow({"temporal": 1.0, "z": 0.0}))["samples"]
    assert (everywhere[:, :, :2] - plain[:, :, :2]).abs().mean() > 1e-3
