"""CustomCombo, ComfyUI's dropdown of options typed in the editor: its declaration, API-format and UI-format
workflows (the option widgets its editor extension adds), the chosen option driving a real combo input, and the
refusal of a choice not among the options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph import errors as E
from graph.document import parse_api
from graph.load import graph_from_data
from graph.ui_format import ui_to_api
from graph.validate import validate
from nodes.comfy_compat import COMFY_CORE_NODES_MISSING
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

OPTIONS = {"option1": "nearest-exact", "option2": "bilinear", "option3": "area", "option4": ""}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    base = tmp_path_factory.mktemp("custom_combo")
    (base / "input").mkdir()
    checker = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([checker] * 3, axis=-1)).save(base / "input" / "checker.png")
    paths = FolderPaths(base=base)
    set_paths(paths)  # LoadImage lists the input folder
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def api_workflow(choice: str = "bilinear", **combo: object) -> dict:
    """A 4x4 image scaled to 8x8 with the method a CustomCombo chooses; its index goes through IntMath."""
    return {
        "1": {"class_type": "CustomCombo", "inputs": {"choice": choice, "index": 1, **OPTIONS, **combo}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": ["1", 0], "width": 8,
                                                     "height": 8, "crop": "disabled"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "IntMath", "inputs": {"a": ["1", 1], "b": 10, "operation": "add"}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }


def test_declaration_is_comfyuis(engine) -> None:
    info = engine.registry.get("CustomCombo").object_info()
    assert (info["display_name"], info["category"]) == ("Custom Combo", "utils")
    assert info["input_order"] == {"required": ["choice"], "optional": []}
    assert info["input"]["required"]["choice"][0] == []  # the options are the user's, typed in the editor
    assert (info["output"], info["output_name"]) == (["STRING", "INT"], ["STRING", "INDEX"])
    assert "CustomCombo" not in COMFY_CORE_NODES_MISSING


def test_api_workflow_outputs_the_choice_and_its_index(engine) -> None:
    result = engine.run(parse_api(api_workflow()), keep=["1"])
    assert result.ok, result.error
    assert result.values["1"] == ("bilinear", 1)
    assert result.outputs["6"] == {"text": ["11"]}


def test_the_chosen_method_is_the_one_applied(engine) -> None:
    """The method a CustomCombo chooses reaches ImageScale's combo: each equals ImageScale given that method as a
    constant, and nearest and bilinear upscales of a checkerboard differ."""
    def scaled(doc: dict) -> torch.Tensor:
        doc["2"] = {"class_type": "LoadImage", "inputs": {"image": "checker.png"}}
        result = engine.run(parse_api(doc), keep=["3"])
        assert result.ok, result.error
        return result.values["3"][0]

    outputs = {}
    for method in ("nearest-exact", "bilinear"):
        outputs[method] = scaled(api_workflow(method))
        constant = api_workflow(method)
        constant["3"]["inputs"]["upscale_method"] = method
        assert torch.equal(outputs[method], scaled(constant))
    assert outputs["bilinear"].shape == (1, 8, 8, 3)
    assert (outputs["nearest-exact"] - outputs["bilinear"]).abs().max() > 0.1


def test_a_choice_not_among_the_options_is_refused_at_validation(engine) -> None:
    [problem] = validate(parse_api(api_workflow("bicubic")), engine.registry).problems
    assert (problem.type, problem.node_id) == (E.CUSTOM_VALIDATION_FAILED, "1")
    assert problem.details == ("choice: 'bicubic' is not one of the options typed in the node (option1='nearest-"
                               "exact', option2='bilinear', option3='area'); choose one of them, or type it as an "
                               "option")
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(api_workflow("bicubic")))


def test_a_linked_choice_is_checked_as_the_node_runs(engine) -> None:
    doc = api_workflow()
    doc["8"] = {"class_type": "PrimitiveString", "inputs": {"value": "lanczos"}}
    doc["1"]["inputs"]["choice"] = ["8", 0]
    assert validate(parse_api(doc), engine.registry).ok
    result = engine.run(parse_api(doc))
    assert not result.ok and "choice: 'lanczos' is not one of the options typed in the node" in str(result.error)
    doc["8"]["inputs"]["value"] = "area"
    result = engine.run(parse_api(doc), keep=["1"])
    assert result.ok and result.values["1"] == ("area", 2)


def test_editing_the_options_reruns_the_node(engine) -> None:
    first = engine.run(parse_api(api_workflow("area")), keep=["1"])
    assert first.values["1"] == ("area", 2)
    moved = engine.run(parse_api(api_workflow("area", option1="area", option3="nearest-exact")), keep=["1"])
    assert moved.ok and moved.values["1"] == ("area", 0)


def test_an_api_prompt_without_options_takes_the_choice_as_it_is(engine) -> None:
    doc = {"1": {"class_type": "CustomCombo", "inputs": {"choice": "anything", "index": 3}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    result = engine.run(parse_api(doc), keep=["1"])
    assert result.ok and result.values["1"] == ("anything", 3)


def ui_workflow(widgets: list) -> dict:
    """ComfyUI's editor format: CustomCombo's widgets_values then IntMath fed by its INDEX, PreviewAny by IntMath."""
    return {
        "last_node_id": 3, "last_link_id": 2, "version": 0.4,
        "nodes": [
            {"id": 1, "type": "CustomCombo", "pos": [0, 0], "size": [270, 200], "mode": 0, "inputs": [],
             "outputs": [{"name": "STRING", "type": "STRING", "links": []},
                         {"name": "INDEX", "type": "INT", "links": [1]}],
             "widgets_values": widgets},
            {"id": 2, "type": "IntMath", "pos": [300, 0], "size": [270, 100], "mode": 0,
             "inputs": [{"name": "a", "type": "INT", "link": 1, "widget": {"name": "a"}}],
             "outputs": [{"name": "INT", "type": "INT", "links": [2]}], "widgets_values": [0, 100, "add"]},
            {"id": 3, "type": "PreviewAny", "pos": [600, 0], "size": [200, 100], "mode": 0,
             "inputs": [{"name": "source", "type": "*", "link": 2}], "outputs": [], "widgets_values": []},
        ],
        "links": [[1, 1, 1, 2, 0, "INT"], [2, 2, 0, 3, 0, "INT"]],
    }


def test_ui_format_widgets_map_to_the_choice_index_and_options(engine) -> None:
    # The editor's widgets in order: choice, the hidden index, option1.. and the empty one to type the next in.
    api = ui_to_api(ui_workflow(["beta", 1, "alpha", "beta", "gamma", ""]), engine.registry)
    assert api["1"]["inputs"] == {"choice": "beta", "index": 1, "option1": "alpha", "option2": "beta",
                                  "option3": "gamma", "option4": ""}
    # The editor's first versions saved no index.
    old = ui_to_api(ui_workflow(["gamma", "alpha", "beta", "gamma", ""]), engine.registry)
    assert old["1"]["inputs"] == {"choice": "gamma", "option1": "alpha", "option2": "beta", "option3": "gamma",
                                  "option4": ""}
    for widgets, shown in ((["beta", 1, "alpha", "beta", "gamma", ""], "101"),
                           (["gamma", "alpha", "beta", "gamma", ""], "102")):
        result = engine.run(graph_from_data(ui_workflow(widgets), engine.registry))
        assert result.ok, result.error
        assert result.outputs["3"] == {"text": [shown]}


def test_ui_format_choice_not_among_the_options_is_refused(engine) -> None:
    [problem] = validate(graph_from_data(ui_workflow(["delta", 0, "alpha", "beta", ""]), engine.registry),
                         engine.registry).problems
    assert problem.node_id == "1" and "choice: 'delta' is not one of the options typed in the node (option1=" \
                                      "'alpha', option2='beta')" in problem.details
