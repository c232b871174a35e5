import pytest

from executor.executor import Executor, WorkflowInvalid
from executor.lists import ItemList, calls_for, merge_ui
from graph.document import parse_api
from graph.validate import validate
from nodes.node import Node, NodeResult
from nodes.registry import builtin_registry
from nodes.spec import ANY_TYPE, Int, Output, Socket, String

CALLS: list[tuple] = []


class Range(Node):
    count = Int(3, min=0, max=100)
    outputs = (Output("INT", "numbers", is_list=True), Output("INT", "count"))

    def execute(self, count):
        return (list(range(count)), count)


class Square(Node):
    value = Socket("INT")
    outputs = (Output("INT"),)

    def execute(self, value):
        CALLS.append(("Square", value))
        return (value * value,)


class Sum(Node):
    input_is_list = True
    values = Socket("INT")
    outputs = (Output("INT"),)

    def execute(self, values):
        CALLS.append(("Sum", tuple(values)))
        return (sum(values),)


class Show(Node):
    output_node = True
    value = Socket(ANY_TYPE)

    def execute(self, value):
        return NodeResult(ui={"text": [str(value)]})


class MakePalette(Node):
    """A plugin-defined socket type: PALETTE is just a new type name."""

    colours = String("red,green")
    outputs = (Output("PALETTE"),)

    def execute(self, colours):
        return (colours.split(","),)


class PaletteSize(Node):
    palette = Socket("PALETTE")
    outputs = (Output("INT"),)

    def execute(self, palette):
        return (len(palette),)


class TakesPaletteOrInt(Node):
    source = Socket("PALETTE,INT")
    outputs = (Output("STRING"),)

    def execute(self, source):
        return (type(source).__name__,)


@pytest.fixture
def registry():
    CALLS.clear()
    registry = builtin_registry()
    registry.register_all([Range, Square, Sum, Show, MakePalette, PaletteSize, TakesPaletteOrInt], "tests")
    return registry


def run(registry, doc, **kw):
    result = Executor(registry).run(parse_api(doc), **kw)
    assert result.ok, result.error
    return result


def test_native_list_output_runs_the_next_node_per_item(registry):
    doc = {"1": {"class_type": "Range", "inputs": {"count": 4}},
           "2": {"class_type": "Square", "inputs": {"value": ["1", 0]}},
           "3": {"class_type": "Sum", "inputs": {"values": ["2", 0]}},
           "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
           "5": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = run(registry, doc, keep=["2"])
    assert result.values["2"] == ([0, 1, 4, 9],) and isinstance(result.values["2"][0], ItemList)
    assert CALLS == [("Square", 0), ("Square", 1), ("Square", 2), ("Square", 3), ("Sum", (0, 1, 4, 9))]
    assert result.outputs["4"] == {"text": ["14"]}
    assert result.outputs["5"] == {"text": ["0", "1", "4", "9"]}


def test_single_value_into_a_list_taking_node_is_a_list_of_one(registry):
    doc = {"1": {"class_type": "Range", "inputs": {"count": 4}},
           "2": {"class_type": "Sum", "inputs": {"values": ["1", 1]}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    assert run(registry, doc).outputs["3"] == {"text": ["4"]} and CALLS == [("Sum", (4,))]


def test_empty_list_runs_the_next_node_zero_times(registry):
    doc = {"1": {"class_type": "Range", "inputs": {"count": 0}},
           "2": {"class_type": "Square", "inputs": {"value": ["1", 0]}},
           "3": {"class_type": "Sum", "inputs": {"values": ["2", 0]}},
           "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    assert run(registry, doc).outputs["4"] == {"text": ["0"]} and CALLS == [("Sum", ())]


def test_calls_for_repeats_the_last_item_of_shorter_lists():
    calls, per_item = calls_for({"a": ItemList([1, 2, 3]), "b": ItemList(["x"]), "c": 7}, takes_lists=False)
    assert per_item and calls == [{"a": 1, "b": "x", "c": 7}, {"a": 2, "b": "x", "c": 7}, {"a": 3, "b": "x", "c": 7}]
    assert calls_for({"a": 1}, takes_lists=False) == ([{"a": 1}], False)
    assert merge_ui([{"images": [1]}, None, {"images": [2], "text": "t"}]) == {"images": [1, 2], "text": ["t"]}


def test_custom_socket_type_connects_and_wrong_types_are_refused(registry):
    good = {"1": {"class_type": "MakePalette", "inputs": {"colours": "red,green,blue"}},
            "2": {"class_type": "PaletteSize", "inputs": {"palette": ["1", 0]}},
            "3": {"class_type": "TakesPaletteOrInt", "inputs": {"source": ["1", 0]}},
            "4": {"class_type": "TakesPaletteOrInt", "inputs": {"source": ["2", 0]}},
            "5": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
            "6": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
            "7": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    result = run(registry, good)
    assert [result.outputs[n]["text"] for n in "567"] == [["3"], ["list"], ["int"]]
    bad = {"1": {"class_type": "PrimitiveString", "inputs": {"value": "red"}},
           "2": {"class_type": "PaletteSize", "inputs": {"palette": ["1", 0]}},
           "3": {"class_type": "MakePalette", "inputs": {"colours": "red"}},
           "4": {"class_type": "Square", "inputs": {"value": ["3", 0]}},
           "5": {"class_type": "PaletteSize", "inputs": {"palette": "red,green"}},
           "6": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
           "7": {"class_type": "Show", "inputs": {"value": ["4", 0]}},
           "8": {"class_type": "Show", "inputs": {"value": ["5", 0]}}}
    problems = validate(parse_api(bad), registry).problems
    assert sorted((p.node_id, p.type) for p in problems) == [
        ("2", "return_type_mismatch"), ("4", "return_type_mismatch"), ("5", "invalid_input_type")]
    mismatch = next(p for p in problems if p.node_id == "2")
    assert "expects PALETTE, but node 1 (PrimitiveString) output 0 is STRING" in mismatch.details
    with pytest.raises(WorkflowInvalid):
        Executor(registry).run(parse_api(bad))
