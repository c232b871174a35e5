"""ControlNet Union workflows through the engine, as ComfyUI's API format writes them: a tiny SDXL checkpoint,
tiny union files (eight control types like promax, six like the first release), SetUnionControlNetType
between Load ControlNet Model and Apply ControlNet."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint, make_controlnet
from nodes.comfy_compat import COMFY_CORE_NODES_MISSING
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_device_options import txt2img


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet_union")
    make_checkpoint("tiny-sdxl", root / "models" / "checkpoints" / "tiny_xl.safetensors", seed=2)
    controlnets = root / "models" / "controlnet"
    make_controlnet("tiny-sdxl", controlnets / "union_promax.safetensors", seed=7, union_types=8)
    make_controlnet("tiny-sdxl", controlnets / "union.safetensors", seed=8, union_types=6)
    make_controlnet("tiny-sdxl", controlnets / "plain_xl.safetensors", seed=9)
    (root / "input").mkdir()
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), outline="white", width=3)
    image.save(root / "input" / "pose.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def workflow(control_net: str | None = "union_promax.safetensors", union_type: str | None = None) -> dict:
    """txt2img at 64 px with the tiny SDXL checkpoint; `union_type` puts SetUnionControlNetType in."""
    graph = txt2img("tiny_xl.safetensors")
    if control_net is None:
        return graph
    graph["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": control_net}}
    graph["11"] = {"class_type": "LoadImage", "inputs": {"image": "pose.png"}}
    loaded = ["10", 0]
    if union_type is not None:
        graph["14"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": loaded, "type": union_type}}
        loaded = ["14", 0]
    graph["12"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": loaded, "image": ["11", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    graph["3"]["inputs"]["positive"] = ["12", 0]
    graph["3"]["inputs"]["negative"] = ["12", 1]
    return graph


def run(base, graph: dict):
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    return engine.run(parse_api(graph), keep=["8"])


def image(base, graph: dict) -> torch.Tensor:
    result = run(base, graph)
    assert result.ok, result.error
    return result.values["8"][0]


def test_the_control_type_changes_the_image_and_the_same_type_gives_the_same_one(base):
    plain = image(base, workflow(None))
    images = {kind: image(base, workflow(union_type=kind))
              for kind in ("auto", "openpose", "canny/lineart/anime_lineart/mlsd", "tile", "repaint")}
    for kind, picture in images.items():
        assert (picture - plain).abs().max() > 1e-3, kind
    kinds = list(images)
    for i, kind in enumerate(kinds):
        for other in kinds[i + 1:]:
            assert (images[kind] - images[other]).abs().max() > 1e-3, (kind, other)
    assert torch.equal(image(base, workflow(union_type="openpose")), images["openpose"])
    # Without SetUnionControlNetType a Union runs as "auto", as in ComfyUI.
    assert torch.equal(image(base, workflow()), images["auto"])


def test_a_type_the_file_was_not_trained_with_is_refused_naming_the_file(base):
    assert run(base, workflow("union.safetensors", "segment")).ok
    result = run(base, workflow("union.safetensors", "tile"))
    assert not result.ok
    assert ("union.safetensors: control type 'tile' needs a ControlNet Union with at least 7 control types"
            in str(result.error))


def test_a_plain_controlnet_passes_through_unchanged(base):
    plain = image(base, workflow("plain_xl.safetensors"))
    assert torch.equal(image(base, workflow("plain_xl.safetensors", "depth")), plain)


def test_low_vram_streams_a_union_as_it_does_a_plain_controlnet(base):
    from executor.devices import EngineOptions

    engine = Executor(builtin_registry(), services=Services.create(
        base, force_cpu=True, options=EngineOptions(lowvram=True)))
    result = engine.run(parse_api(workflow(union_type="depth")), keep=["8"])
    assert result.ok, result.error
    torch.testing.assert_close(result.values["8"][0], image(base, workflow(union_type="depth")), rtol=0, atol=1e-5)


def test_the_node_is_comfyuis():
    assert "SetUnionControlNetType" not in COMFY_CORE_NODES_MISSING
    info = builtin_registry().get("SetUnionControlNetType").object_info()
    assert info["category"] == "conditioning/controlnet" and info["output"] == ["CONTROL_NET"]
    assert info["input"]["required"]["control_net"][0] == "CONTROL_NET"
    assert info["input"]["required"]["type"][0] == [
        "auto", "openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal",
        "segment", "tile", "repaint"]
