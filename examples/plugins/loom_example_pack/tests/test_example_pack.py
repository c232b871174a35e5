"""The example pack's own tests: load it as Loom would, then run its nodes in workflows."""

from pathlib import Path

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from graph.document import parse_api
from nodes.context import Interrupted, NodeContext
from nodes.plugins import load_plugin_path
from nodes.registry import builtin_registry

PACK = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry():
    registry = builtin_registry()
    info = load_plugin_path(registry, PACK)
    assert info.loaded and info.error is None, info.error
    assert info.web_dir == PACK / "js"
    return registry


def swatch_workflow(hex_colour="#ff0000", strength=1.0):
    return {"1": {"class_type": "ExampleSwatch", "inputs": {"hex_colour": hex_colour}},
            "2": {"class_type": "ExampleSwatchImage",
                  "inputs": {"swatch": ["1", 0], "width": 8, "height": 4, "batch_size": 2}},
            "3": {"class_type": "ExampleInvert", "inputs": {"image": ["2", 0], "strength": strength}},
            "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}


def test_swatch_image_inverted(registry):
    result = Executor(registry).run(parse_api(swatch_workflow()), keep=["2", "3"])
    assert result.ok, result.error
    image = result.values["2"][0]
    assert image.shape == (2, 4, 8, 3) and image.dtype == torch.float32
    assert image[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert result.values["3"][0][1, 3, 7].tolist() == [0.0, 1.0, 1.0]


def test_half_strength_is_grey(registry):
    result = Executor(registry).run(parse_api(swatch_workflow(strength=0.5)), keep=["3"])
    assert torch.allclose(result.values["3"][0], torch.tensor(0.5))


def test_bad_colour_and_wrong_socket_are_refused(registry):
    doc = swatch_workflow(hex_colour="orange")
    doc["3"]["inputs"]["image"] = ["1", 0]  # a SWATCH where an IMAGE goes
    with pytest.raises(WorkflowInvalid) as caught:
        Executor(registry).run(parse_api(doc))
    assert sorted(p.type for p in caught.value.problems) == ["custom_validation_failed", "return_type_mismatch"]


def test_invert_reports_progress_and_stops_when_asked(registry):
    node = registry.get("ExampleInvert")()
    steps = []
    node.ctx = NodeContext(report=lambda value, total, preview: steps.append((value, total)))
    node.execute(image=torch.zeros(3, 2, 2, 3), strength=1.0)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    node.ctx = NodeContext(interrupted=lambda: True)
    with pytest.raises(Interrupted):
        node.execute(image=torch.zeros(3, 2, 2, 3), strength=1.0)
