"""ComfyUI's Not, And, Or and Pass or None (nodes_logic.py) run by the engine as a user's workflow: Python's truthiness
of booleans, numbers, texts and tensors, And / Or's autogrow sockets in API and editor files (stopping at the value
that decides, as all() / any()), Pass or None's fallbacks, their declarations, and the refusals."""

from __future__ import annotations

from typing import Any

import pytest

from executor.executor import Executor, WorkflowInvalid
from graph.document import parse_api
from graph.load import graph_from_data
from graph.ui_format import ui_to_api
from nodes.registry import builtin_registry

# Sources whose values have a known truth: (class_type, inputs) -> Python's bool of the value it gives
SOURCES = {
    "true": ({"class_type": "PrimitiveBoolean", "inputs": {"value": True}}, True),
    "false": ({"class_type": "PrimitiveBoolean", "inputs": {"value": False}}, False),
    "zero": ({"class_type": "PrimitiveInt", "inputs": {"value": 0}}, False),
    "seven": ({"class_type": "PrimitiveInt", "inputs": {"value": 7}}, True),
    "half": ({"class_type": "PrimitiveFloat", "inputs": {"value": 0.5}}, True),
    "nothing": ({"class_type": "PrimitiveString", "inputs": {"value": ""}}, False),
    "text": ({"class_type": "PrimitiveString", "inputs": {"value": "no"}}, True),  # any non-empty text is true
    "mask1": ({"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 1, "height": 1}}, True),
    "mask0": ({"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 1, "height": 1}}, False),
}
# an IMAGE of 1x2x2x3 zeros: a tensor of several elements, neither true nor false
IMAGE = {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 2, "batch_size": 1, "color": 0}}


@pytest.fixture(scope="module")
def engine():
    return Executor(builtin_registry())


def workflow(node: dict[str, Any], sources: dict[str, dict]) -> dict:
    return {**sources, "9": node, "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}


def run_values(engine: Executor, node: dict[str, Any], sources: dict[str, dict]) -> tuple:
    result = engine.run(parse_api(workflow(node, sources)), keep=["9"])
    assert result.ok, result.error
    return result.values["9"]


def run_error(engine: Executor, node: dict[str, Any], sources: dict[str, dict]) -> str:
    result = engine.run(parse_api(workflow(node, sources)))
    assert not result.ok and result.error.node_id == "9" and result.error.exception_type == "ValueError"
    return result.error.exception_message


def test_declarations_are_comfyuis(engine) -> None:
    registry = engine.registry
    for name, display in [("ComfyNotNode", "Not"), ("ComfyAndNode", "And"), ("ComfyOrNode", "Or"),
                          ("ComfyPassOrNoneNode", "Pass or None"), ("ComfySwitchNode", "If/Else Switch")]:
        info = registry.get(name).object_info()
        assert (info["display_name"], info["category"]) == (display, "utilities/logic")
    assert registry.get("ComfyNotNode").object_info()["input"]["required"] == {"value": ["*", {}]}
    assert registry.get("ComfyNotNode").object_info()["output"] == ["BOOLEAN"]
    for name in ("ComfyAndNode", "ComfyOrNode"):
        info = registry.get(name).object_info()
        assert info["input"]["required"] == {"values.value0": ["*", {}]}  # ComfyUI's autogrow: min 1, max 10
        assert info["input_order"]["optional"] == [f"values.value{slot}" for slot in range(1, 10)]
        assert info["input"]["optional"]["values.value9"] == ["*", {"autogrow": True}]
        assert info["output"] == ["BOOLEAN"]
    info = registry.get("ComfyPassOrNoneNode").object_info()
    assert info["input_order"] == {"required": [], "optional": ["anything", "default"]}
    assert info["input"]["optional"]["default"] == ["*", {"tooltip": "Optional fallback value to use when the "
                                                                     "input is None/not provided."}]
    assert (info["output"], info["output_name"]) == (["*", "BOOLEAN"], ["output", "is_none"])
    assert info["description"].startswith("Passes the input through, or a default value")


@pytest.mark.parametrize("source", SOURCES)
def test_not_is_pythons_not(engine, source) -> None:
    node, truth = SOURCES[source]
    assert run_values(engine, {"class_type": "ComfyNotNode", "inputs": {"value": ["1", 0]}}, {"1": node}) == (
        not truth,)


def test_not_of_a_constant(engine) -> None:
    assert run_values(engine, {"class_type": "ComfyNotNode", "inputs": {"value": False}}, {}) == (True,)


def test_not_of_a_tensor_of_several_elements_is_refused_naming_the_node(engine) -> None:
    message = run_error(engine, {"class_type": "ComfyNotNode", "inputs": {"value": ["1", 0]}}, {"1": IMAGE})
    assert message.startswith("ComfyNotNode: value (Tensor) is neither true nor false: Boolean value of Tensor with "
                              "more than one value is ambiguous")


COMBINATIONS = [["true"], ["false"], ["true", "seven", "text"], ["true", "zero", "text"], ["nothing", "mask0"],
                ["nothing", "mask1", "false"], ["half", "mask1", "seven", "text", "true", "true", "seven", "half",
                                                "mask1", "text"]]


@pytest.mark.parametrize("names", COMBINATIONS)
@pytest.mark.parametrize(("class_type", "combine"), [("ComfyAndNode", all), ("ComfyOrNode", any)])
def test_and_or_are_all_and_any_of_the_truths(engine, names, class_type, combine) -> None:
    sources = {f"s{i}": SOURCES[name][0] for i, name in enumerate(names)}
    inputs = {f"values.value{i}": [f"s{i}", 0] for i in range(len(names))}
    expected = combine(SOURCES[name][1] for name in names)
    assert run_values(engine, {"class_type": class_type, "inputs": inputs}, sources) == (expected,)


def test_and_or_need_not_be_linked_in_order(engine) -> None:
    # value0 is required; the others may be linked with gaps
    inputs = {"values.value0": ["1", 0], "values.value7": ["2", 0]}
    sources = {"1": SOURCES["true"][0], "2": SOURCES["zero"][0]}
    assert run_values(engine, {"class_type": "ComfyAndNode", "inputs": inputs}, sources) == (False,)
    assert run_values(engine, {"class_type": "ComfyOrNode", "inputs": inputs}, sources) == (True,)


def test_and_or_stop_at_the_value_that_decides(engine) -> None:
    # as ComfyUI's all() / any(): a tensor after the deciding value is never asked for its truth
    assert run_values(engine, {"class_type": "ComfyAndNode", "inputs": {"values.value0": ["1", 0],
                                                                        "values.value1": ["2", 0]}},
                      {"1": SOURCES["false"][0], "2": IMAGE}) == (False,)
    assert run_values(engine, {"class_type": "ComfyOrNode", "inputs": {"values.value0": ["1", 0],
                                                                       "values.value1": ["2", 0]}},
                      {"1": SOURCES["true"][0], "2": IMAGE}) == (True,)
    message = run_error(engine, {"class_type": "ComfyAndNode", "inputs": {"values.value0": ["1", 0],
                                                                         "values.value1": ["2", 0]}},
                        {"1": SOURCES["true"][0], "2": IMAGE})
    assert message.startswith("ComfyAndNode: values.value1 (Tensor) is neither true nor false")


def test_and_needs_its_first_value_and_refuses_undeclared_sockets(engine) -> None:
    doc = workflow({"class_type": "ComfyAndNode", "inputs": {"values.value1": ["1", 0]}}, {"1": SOURCES["true"][0]})
    with pytest.raises(WorkflowInvalid, match=r"input 'values.value0': Required input is missing"):
        engine.run(parse_api(doc))
    doc = workflow({"class_type": "ComfyOrNode", "inputs": {"values.value0": ["1", 0], "values.value10": ["1", 0]}},
                   {"1": SOURCES["true"][0]})
    with pytest.raises(WorkflowInvalid, match=r"ComfyOrNode has no input values.value10 \(values.value0 to "
                                              r"values.value9\)"):
        engine.run(parse_api(doc))


def ui_workflow() -> dict:
    """As ComfyUI's editor saves an And: two linked sockets and the empty one it shows next; And into a Not."""
    return {
        "last_node_id": 5, "last_link_id": 4,
        "nodes": [
            {"id": 1, "type": "PrimitiveBoolean", "pos": [0, 0], "size": [200, 60], "mode": 0, "inputs": [],
             "outputs": [{"name": "BOOLEAN", "type": "BOOLEAN", "links": [1]}], "widgets_values": [True]},
            {"id": 2, "type": "PrimitiveString", "pos": [0, 100], "size": [200, 60], "mode": 0, "inputs": [],
             "outputs": [{"name": "STRING", "type": "STRING", "links": [2]}], "widgets_values": [""]},
            {"id": 3, "type": "ComfyAndNode", "pos": [300, 0], "size": [230, 100], "mode": 0,
             "inputs": [{"label": "value0", "localized_name": "values.value0", "name": "values.value0", "type": "*",
                         "link": 1},
                        {"label": "value1", "localized_name": "values.value1", "name": "values.value1", "type": "*",
                         "shape": 7, "link": 2},
                        {"label": "value2", "localized_name": "values.value2", "name": "values.value2", "type": "*",
                         "shape": 7, "link": None}],
             "outputs": [{"name": "BOOLEAN", "type": "BOOLEAN", "links": [3]}], "widgets_values": []},
            {"id": 4, "type": "ComfyNotNode", "pos": [600, 0], "size": [200, 60], "mode": 0,
             "inputs": [{"name": "value", "type": "*", "link": 3}],
             "outputs": [{"name": "BOOLEAN", "type": "BOOLEAN", "links": [4]}], "widgets_values": []},
            {"id": 5, "type": "PreviewAny", "pos": [900, 0], "size": [200, 100], "mode": 0,
             "inputs": [{"name": "source", "type": "*", "link": 4}], "outputs": [], "widgets_values": []},
        ],
        "links": [[1, 1, 0, 3, 0, "BOOLEAN"], [2, 2, 0, 3, 1, "STRING"], [3, 3, 0, 4, 0, "BOOLEAN"],
                  [4, 4, 0, 5, 0, "BOOLEAN"]],
    }


def test_ui_format_workflow_links_values_by_name_and_runs(engine) -> None:
    api = ui_to_api(ui_workflow(), engine.registry)
    assert api["3"]["inputs"] == {"values.value0": ["1", 0], "values.value1": ["2", 0]}
    result = engine.run(graph_from_data(ui_workflow(), engine.registry), keep=["3", "4"])
    assert result.ok, result.error
    assert result.values["3"] == (False,) and result.values["4"] == (True,)  # True and "" is False
    assert result.outputs["5"] == {"text": ["True"]}


NONE = {"class_type": "ComfyPassOrNoneNode", "inputs": {}}  # nothing linked: gives None


@pytest.mark.parametrize(("inputs", "sources", "expected"), [
    ({}, {}, (None, True)),
    ({"default": ["2", 0]}, {"2": SOURCES["seven"][0]}, (7, False)),
    ({"anything": ["1", 0]}, {"1": SOURCES["text"][0]}, ("no", False)),
    ({"anything": ["1", 0], "default": ["2", 0]}, {"1": SOURCES["false"][0], "2": SOURCES["seven"][0]},
     (False, False)),  # a false value is passed on: only None falls back
    ({"anything": ["1", 0], "default": ["2", 0]}, {"1": SOURCES["nothing"][0], "2": SOURCES["seven"][0]},
     ("", False)),
    ({"anything": ["1", 0], "default": ["2", 0]}, {"1": NONE, "2": SOURCES["seven"][0]}, (7, False)),
    ({"anything": ["1", 0], "default": ["2", 0]}, {"1": NONE, "2": NONE}, (None, True)),
    ({"anything": ["1", 0]}, {"1": NONE}, (None, True)),
])
def test_pass_or_none(engine, inputs, sources, expected) -> None:
    assert run_values(engine, {"class_type": "ComfyPassOrNoneNode", "inputs": inputs}, sources) == expected


def test_pass_or_none_passes_a_tensor_on_and_says_so(engine) -> None:
    doc = {"1": IMAGE, "2": {"class_type": "ComfyPassOrNoneNode", "inputs": {"anything": ["1", 0]}},
           "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
           "4": {"class_type": "ComfyNotNode", "inputs": {"value": ["2", 1]}},
           "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
           "6": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
    result = engine.run(parse_api(doc), keep=["1", "2", "3"])
    assert result.ok, result.error
    assert result.values["2"][0] is result.values["1"][0] and result.values["2"][1] is False
    assert bool((result.values["3"][0] == 1.0).all()) and result.outputs["5"] == {"text": ["True"]}
