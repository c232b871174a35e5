"""ComfyMathExpression: the LTX-2 templates' expressions, Python's own value for every allowed construct, ComfyUI's
outputs (FLOAT, INT truncated, BOOL), the refusals, and API and editor (UI-format) workflows run by the engine with
PrimitiveInt / PrimitiveFloat linked into `values.a` / `values.b`."""

from __future__ import annotations

import math

import pytest

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.load import graph_from_data
from graph.ui_format import ui_to_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.math_expression import ComfyMathExpression, MathExpressionError, evaluate, math_outputs


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    paths = FolderPaths(base=tmp_path_factory.mktemp("math_expression"))
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


# (expression, values, FLOAT, INT): the LTX-2.3 templates' (ia2v: duration 9.0 s x 25 fps, width / 2, fps as a
# float; flf2v: 5 s x 25 fps + 1) and the 8k + 1 length formula
TEMPLATES = [("a * b", {"a": 9.0, "b": 25}, 225.0, 225), ("a/2", {"a": 1280}, 640.0, 640),
             ("a/2", {"a": 720}, 360.0, 360), ("a", {"a": 25}, 25.0, 25), ("a * b + 1", {"a": 5, "b": 25}, 126.0, 126),
             ("1 + floor(a*b/8)*8", {"a": 9.0, "b": 25}, 225.0, 225), ("1 + floor(a*b/8)*8", {"a": 5, "b": 24}, 121.0,
                                                                       121)]


@pytest.mark.parametrize(("expression", "values", "as_float", "as_int"), TEMPLATES)
def test_template_expressions(expression, values, as_float, as_int) -> None:
    out = math_outputs(expression, values)
    assert out == (as_float, as_int, True)
    assert type(out[0]) is float and type(out[1]) is int and type(out[2]) is bool


# Every construct allowed, against Python's own value of the same text with math's functions
PYTHON = ["a + b * c - a / b", "a // b + c % b", "-a ** 2 + +b", "(a + b) ** 0.5", "a < b <= c", "a < b > c",
          "not a or b and c", "a and 0 or c", "a if a > b else c", "b in values", "a not in values",
          "values[0] + values[-1]", "max(values[1:])", "min(a, b, c) + max(a, b)", "abs(-a) + round(c / b, 2)",
          "round(2.5) + round(3.5)", "sqrt(b) + ceil(c / b) + floor(-c / b)", "log(b) + log(b, 2) + log2(c) + log10(c)",
          "sin(a) + cos(a) + tan(a)", "int(c / b) + float(a)", "int(b) & 6 | 8 ^ 3", "(int(b) << 3) >> 1", "~int(b)",
          "round(number=c / b, ndigits=1)", "True + a", "1e3 * a"]


@pytest.mark.parametrize("expression", PYTHON)
def test_allowed_constructs_give_pythons_value(expression) -> None:
    values = {"a": 1.5, "b": 4, "c": 10.0}
    scope = {**values, "values": list(values.values()), **{name: getattr(math, name) for name in
                                                           ("sqrt", "ceil", "floor", "log", "log2", "log10", "sin",
                                                            "cos", "tan")}}
    expected = eval(expression, {"__builtins__": {"min": min, "max": max, "abs": abs, "round": round, "int": int,
                                                  "float": float, "True": True}}, scope)
    assert evaluate(expression, values) == expected


def test_sum_and_pow_as_comfyui_defines_them() -> None:
    values = {"a": 1, "b": 2.5, "c": 4}
    assert evaluate("sum(values)", values) == 7.5 == evaluate("sum(a, b, c)", values)
    assert evaluate("pow(c, 3)", values) == 64
    with pytest.raises(MathExpressionError, match="exponent 5000 exceeds the 4000 allowed"):
        evaluate("pow(2, 5000)", values)
    with pytest.raises(MathExpressionError, match=r"\*\*: exponent 5000000 exceeds"):
        evaluate("2 ** 5000000", values)


def test_outputs_truncate_to_int_and_test_for_zero() -> None:
    assert math_outputs("a / b", {"a": 29, "b": 10}) == (2.9, 2, True)
    assert math_outputs("-a / b", {"a": 29, "b": 10}) == (-2.9, -2, True)  # toward zero, not floor
    assert math_outputs("a - a", {"a": 3}) == (0.0, 0, False)
    assert math_outputs("a > b", {"a": 3, "b": 1}) == (1.0, 1, True)  # a boolean result counts as a number
    assert math_outputs("a", {"a": False}) == (0.0, 0, False)  # BOOLEAN inputs too
    assert math_outputs("2 ** 100", {})[1] == 2**100  # INT of an exact integer result stays exact


@pytest.mark.parametrize(("expression", "message"), [
    ("", "the expression is empty"),
    ("   ", "the expression is empty"),
    ("a +", "not a valid expression"),
    ("c * 2", "unknown name 'c' \\(the names are those of the linked values and `values`: a, b, values\\)"),
    ("__import__('os')", "unknown function '__import__'"),
    ("a.real", "Attribute `a.real` is not allowed"),
    ("(lambda: 1)()", "unknown function"),
    ("[a, b][0]", "List `\\[a, b\\]` is not allowed"),
    ("'text'", "the constant 'text' is not a number"),
    ("values", "the result must be a number, got list"),
    ("sqrt", "sqrt is a function: call it"),
    ("a / 0", "ZeroDivisionError"),
    ("sqrt(-a)", "ValueError: math domain error"),
    ("max(*values)", "\\* and \\*\\* in a call are not allowed"),
    ("values[5]", "IndexError"),
    ("a is b", "the comparison Is is not allowed"),
    ("a @ b", "the operator MatMult is not allowed"),
    ("float('inf')", "the constant 'inf' is not a number"),
    ("a * 1e308 * 10", "the result is not finite"),
    ("10 ** 400 * 1", "the result is too large for a float"),
])
def test_bad_expressions_are_refused_clearly(expression, message) -> None:
    with pytest.raises(MathExpressionError, match=message):
        math_outputs(expression, {"a": 2, "b": 3})


def test_declaration_is_comfyuis(engine) -> None:
    info = engine.registry.get("ComfyMathExpression").object_info()
    assert (info["display_name"], info["category"]) == ("Math Expression", "utilities")
    assert (info["output"], info["output_name"]) == (["FLOAT", "INT", "BOOLEAN"], ["FLOAT", "INT", "BOOL"])
    assert info["input"]["required"]["expression"][1]["default"] == "a + b"
    optional = info["input"]["optional"]
    assert list(optional) == [f"values.{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    assert optional["values.a"][0] == "FLOAT,INT,BOOLEAN" and optional["values.z"][1]["autogrow"] is True
    assert ComfyMathExpression.widget_names() == ["expression"]


def api_workflow(expression: str) -> dict:
    return {
        "1": {"class_type": "PrimitiveFloat", "inputs": {"value": 9.0}},
        "2": {"class_type": "PrimitiveInt", "inputs": {"value": 25}},
        "3": {"class_type": "ComfyMathExpression", "inputs": {"expression": expression, "values.a": ["1", 0],
                                                              "values.b": ["2", 0]}},
        "4": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 64, "length": ["3", 1],
                                                               "batch_size": 1}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }


def test_api_workflow_feeds_the_int_into_a_length(engine) -> None:
    result = engine.run(parse_api(api_workflow("a * b")), keep=["3", "4"])
    assert result.ok, result.error
    assert result.values["3"] == (225.0, 225, True)
    assert result.values["4"][0]["samples"].shape[2] == (225 - 1) // 8 + 1


def test_a_failing_expression_fails_the_run_naming_it(engine) -> None:
    result = engine.run(parse_api(api_workflow("a * c")))
    assert not result.ok and "Math Expression 'a * c': unknown name 'c'" in str(result.error)


def ui_workflow(expression: str) -> dict:
    """As the LTX-2.3 ia2v template wires it: a PrimitiveFloat (duration) into `values.a`, a PrimitiveInt (fps)
    into `values.b` and, as the editor saves it, an empty `values.c` socket; INT and FLOAT each to a PreviewAny."""
    socket = {"type": "FLOAT,INT", "shape": 7}
    return {
        "last_node_id": 5, "last_link_id": 4,
        "nodes": [
            {"id": 1, "type": "PrimitiveFloat", "pos": [0, 0], "size": [200, 60], "mode": 0, "inputs": [],
             "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [1]}], "widgets_values": [9.0]},
            {"id": 2, "type": "PrimitiveInt", "pos": [0, 100], "size": [200, 60], "mode": 0, "inputs": [],
             "outputs": [{"name": "INT", "type": "INT", "links": [2]}], "widgets_values": [25, "fixed"]},
            {"id": 3, "type": "ComfyMathExpression", "pos": [300, 0], "size": [230, 170], "mode": 0,
             "inputs": [{"label": "a", "localized_name": "values.a", "name": "values.a", "type": "FLOAT,INT",
                         "link": 1},
                        {"label": "b", "localized_name": "values.b", "name": "values.b", **socket, "link": 2},
                        {"label": "c", "localized_name": "values.c", "name": "values.c", **socket, "link": None}],
             "outputs": [{"name": "FLOAT", "type": "FLOAT", "links": [3]}, {"name": "INT", "type": "INT",
                                                                           "links": [4]}],
             "widgets_values": [expression]},
            {"id": 4, "type": "PreviewAny", "pos": [600, 0], "size": [200, 100], "mode": 0,
             "inputs": [{"name": "source", "type": "*", "link": 3}], "outputs": [], "widgets_values": []},
            {"id": 5, "type": "PreviewAny", "pos": [600, 150], "size": [200, 100], "mode": 0,
             "inputs": [{"name": "source", "type": "*", "link": 4}], "outputs": [], "widgets_values": []},
        ],
        "links": [[1, 1, 0, 3, 0, "FLOAT"], [2, 2, 0, 3, 1, "INT"], [3, 3, 0, 4, 0, "FLOAT"], [4, 3, 1, 5, 0, "INT"]],
    }


def test_ui_format_workflow_links_values_by_name_and_runs(engine) -> None:
    api = ui_to_api(ui_workflow("1 + floor(a*b/8)*8"), engine.registry)
    assert api["3"]["inputs"] == {"expression": "1 + floor(a*b/8)*8", "values.a": ["1", 0], "values.b": ["2", 0]}
    result = engine.run(graph_from_data(ui_workflow("a * b / 2"), engine.registry), keep=["3"])
    assert result.ok, result.error
    assert result.values["3"] == (112.5, 112, True)
    assert result.outputs["4"] == {"text": ["112.5"]} and result.outputs["5"] == {"text": ["112"]}


def test_undeclared_value_sockets_are_refused(engine) -> None:
    doc = api_workflow("a")
    doc["3"]["inputs"]["values.A"] = ["2", 0]
    with pytest.raises(WorkflowInvalid, match="ComfyMathExpression has no input values.A"):
        engine.run(parse_api(doc), keep=["3"])
