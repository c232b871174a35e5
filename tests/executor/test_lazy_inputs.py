"""Lazy inputs (ComfyUI's `lazy` and `check_lazy_status`) and the Switch built on them: a branch runs only when the
node that takes it asks for it."""

from typing import Any

from executor import events as ev
from executor.executor import Executor
from graph.document import parse_api
from nodes.comfy_compat import adapt_classic
from tests.support_nodes import CALLS


def switch_doc(switch: Any = False, a: int = 1, b: int = 10) -> dict:
    """Add(a) on the false side, Add(b) scaled by 2 on the true side, through a Switch into a Sink."""
    return {"1": {"class_type": "Add", "inputs": {"a": a}},
            "2": {"class_type": "Add", "inputs": {"a": b}},
            "3": {"class_type": "Scale", "inputs": {"value": ["2", 0], "factor": 2.0}},
            "4": {"class_type": "ComfySwitchNode", "inputs": {"switch": switch, "on_false": ["1", 0],
                                                             "on_true": ["3", 0]}},
            "5": {"class_type": "Sink", "inputs": {"value": ["4", 0]}}}


def test_switch_runs_only_the_side_it_passes_on(registry):
    events: list[ev.Event] = []
    result = Executor(registry).run(parse_api(switch_doc(False)), on_event=events.append)
    assert result.ok and result.outputs["5"] == {"value": [1]}
    assert result.executed == ["1", "4", "5"] and result.cached == []
    assert CALLS == {"Add": 1, "Sink": 1}  # the true side (Add 10, Scale) never ran
    assert [e.node for e in events if isinstance(e, ev.Executing)] == ["1", "4", "5"]

    CALLS.clear()
    result = Executor(registry).run(parse_api(switch_doc(True)))
    assert result.ok and result.outputs["5"] == {"value": [20.0]}
    assert result.executed == ["2", "3", "4", "5"] and CALLS["Add"] == 1 and CALLS["Scale"] == 1


def test_flipping_the_switch_back_is_served_from_the_cache(registry):
    executor = Executor(registry)
    executor.run(parse_api(switch_doc(False)))
    executor.run(parse_api(switch_doc(True)))
    CALLS.clear()
    result = executor.run(parse_api(switch_doc(False)))
    assert result.ok and result.outputs["5"] == {"value": [1]} and result.executed == [] and not CALLS
    assert result.cached == ["1", "2", "3", "4", "5"]  # all behind the cached switch, as without lazy inputs


def test_the_side_taken_comes_from_the_cache_when_it_holds_it(registry):
    executor = Executor(registry)
    executor.run(parse_api({"1": {"class_type": "Add", "inputs": {"a": 1}},
                            "9": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}))
    CALLS.clear()
    events: list[ev.Event] = []
    result = executor.run(parse_api(switch_doc(False)), on_event=events.append)
    assert result.ok and result.outputs["5"] == {"value": [1]}
    assert result.executed == ["4", "5"] and not CALLS["Add"] and result.cached == ["1"]
    assert [e.nodes for e in events if isinstance(e, ev.ExecutionCached)] == [[], ["1"]]


def test_a_change_on_the_side_not_taken_runs_nothing_there(registry):
    executor = Executor(registry)
    executor.run(parse_api(switch_doc(False, b=10)))
    CALLS.clear()
    result = executor.run(parse_api(switch_doc(False, b=11)))
    assert result.ok and result.outputs["5"] == {"value": [1]}
    assert not CALLS["Add"] and not CALLS["Scale"]


def test_switch_driven_by_a_linked_boolean(registry):
    doc = switch_doc(["9", 0])
    doc["9"] = {"class_type": "PrimitiveBoolean", "inputs": {"value": True}}
    result = Executor(registry).run(parse_api(doc))
    assert result.ok and result.outputs["5"] == {"value": [20.0]} and "1" not in result.executed


def test_switches_nest(registry):
    doc = switch_doc(True)
    doc["6"] = {"class_type": "Add", "inputs": {"a": 100}}
    doc["7"] = {"class_type": "ComfySwitchNode", "inputs": {"switch": False, "on_false": ["6", 0],
                                                           "on_true": ["4", 0]}}
    doc["5"]["inputs"]["value"] = ["7", 0]
    result = Executor(registry).run(parse_api(doc))
    assert result.ok and result.outputs["5"] == {"value": [100]}
    assert result.executed == ["6", "7", "5"]  # neither side of the inner switch ran
    doc["7"]["inputs"]["switch"] = True
    result = Executor(registry).run(parse_api(doc))
    assert result.ok and result.outputs["5"] == {"value": [20.0]}
    assert result.executed == ["2", "3", "4", "7", "5"]


def test_the_side_taken_left_unconnected_passes_on_none(registry):
    """As ComfyUI's switch does (its MISSING side gives None), so a Pass or None after it can give a fallback."""
    doc = switch_doc(True)
    del doc["4"]["inputs"]["on_true"]
    result = Executor(registry).run(parse_api(doc))
    assert result.ok and result.outputs["5"] == {"value": [None]} and result.executed == ["4", "5"]
    doc["6"] = {"class_type": "ComfyPassOrNoneNode", "inputs": {"anything": ["4", 0], "default": ["1", 0]}}
    doc["5"]["inputs"]["value"] = ["6", 0]
    doc["7"] = {"class_type": "Sink", "inputs": {"value": ["6", 1]}}
    result = Executor(registry).run(parse_api(doc))
    assert result.ok and result.outputs["5"] == {"value": [1]} and result.outputs["7"] == {"value": [False]}
    doc["4"]["inputs"]["switch"] = False  # the side connected: passed on as before
    doc["4"]["inputs"]["on_false"] = ["2", 0]
    result = Executor(registry).run(parse_api(doc))
    assert result.ok and result.outputs["5"] == {"value": [10]} and "1" in result.executed


def test_a_failure_on_the_side_taken_names_that_node(registry):
    doc = switch_doc(True)
    doc["3"] = {"class_type": "Fail", "inputs": {"value": ["2", 0]}}
    result = Executor(registry).run(parse_api(doc))
    assert result.status == "error" and result.error.node_id == "3" and result.error.executed == ["2"]
    assert Executor(registry).run(parse_api(switch_doc(False))).ok


class LazyMix:
    """ComfyUI's documented lazy example: a blend that needs neither image when the factor makes one irrelevant."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"lazy": True, "forceInput": True}),
                             "b": ("INT", {"lazy": True, "forceInput": True}),
                             "factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "mix"
    CATEGORY = "test"

    def check_lazy_status(self, factor, a=None, b=None):
        needed = []
        if a is None and factor < 1.0:
            needed.append("a")
        if b is None and factor > 0.0:
            needed.append("b")
        return needed

    def mix(self, a, b, factor):
        return ((a or 0) * (1 - factor) + (b or 0) * factor,)


def mix_doc(factor: float) -> dict:
    return {"1": {"class_type": "Add", "inputs": {"a": 4}},
            "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},  # would fail if it ran
            "3": {"class_type": "LazyMix", "inputs": {"a": ["1", 0], "b": ["2", 0], "factor": factor}},
            "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}}}


def test_classic_node_with_lazy_inputs(registry):
    registry.register(adapt_classic("LazyMix", LazyMix))
    info = registry.get("LazyMix").object_info()["input"]["required"]
    assert info["a"][1]["lazy"] is True and "lazy" not in info["factor"][1]
    result = Executor(registry).run(parse_api(mix_doc(0.0)))
    assert result.ok and result.outputs["4"] == {"value": [4.0]} and "2" not in result.executed
    failed = Executor(registry).run(parse_api(mix_doc(0.5)))  # now it needs b, whose node fails
    assert failed.status == "error" and failed.error.node_id == "2"


def test_a_lazy_input_the_cache_holds_is_given_without_asking(registry):
    registry.register(adapt_classic("LazyMix", LazyMix))
    executor = Executor(registry)
    executor.run(parse_api({"1": {"class_type": "Add", "inputs": {"a": 4}},
                            "2": {"class_type": "Add", "inputs": {"a": 6}},
                            "9": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}))
    doc = mix_doc(0.0)
    doc["2"] = {"class_type": "Add", "inputs": {"a": 6}}  # cached from the run above; factor 0 never asks for it
    result = executor.run(parse_api(doc))
    assert result.ok and result.outputs["4"] == {"value": [4.0]}
    assert result.cached == ["2"] and result.executed == ["1", "3", "4"]


def test_switch_declares_lazy_optional_sides(registry):
    info = registry.get("ComfySwitchNode").object_info()
    assert info["input"]["required"] == {"switch": ["BOOLEAN", {"default": False}]}
    assert info["input"]["optional"] == {"on_false": ["*", {"lazy": True}], "on_true": ["*", {"lazy": True}]}
    assert info["output"] == ["*"] and info["output_name"] == ["output"]
    assert (info["display_name"], info["category"]) == ("If/Else Switch", "utilities/logic")
