import pytest

from graph.document import DocumentError, parse_api, parse_api_json
from graph.errors import error_response
from graph.validate import validate


def problems(registry, doc, outputs=None):
    return validate(parse_api(doc), registry, outputs).problems


def types(registry, doc):
    return sorted((p.node_id, p.input_name, p.type) for p in problems(registry, doc))


def sink(source):
    return {"class_type": "Sink", "inputs": {"value": source}}


def test_valid_graph_plans_topological_order(registry):
    doc = {"9": sink(["2", 0]), "2": {"class_type": "Scale", "inputs": {"value": ["1", 0], "factor": 2}},
           "1": {"class_type": "Add", "inputs": {"a": 1}}}
    checked = validate(parse_api(doc), registry)
    assert checked.ok and checked.outputs == ["9"]
    assert checked.order == ["1", "2", "9"]
    assert checked.values["2"] == {"factor": 2.0}


def test_unknown_node_type(registry):
    assert types(registry, {"1": {"class_type": "Nope", "inputs": {}}, "2": sink(1)}) == [
        ("1", None, "invalid_prompt")]
    [typo] = problems(registry, {"1": {"class_type": "Scael", "inputs": {}}, "2": sink(1)})
    assert typo.message == "Cannot execute because node Scael does not exist."  # ComfyUI's words
    assert typo.details == "Node ID '#1'; did you mean Scale?; a custom node pack in custom_nodes/ may provide it"
    [core] = problems(registry, {"1": {"class_type": "CLIPTextEncodeHunyuanDiT", "inputs": {}}, "2": sink(1)})
    assert core.details.endswith("it is one of ComfyUI's built-in nodes, which Loom does not provide yet")
    # ... and no look-alike of Loom's is offered for one (ModelSamplingStableCascade is no ModelSamplingSD3)
    [hook] = problems(registry, {"1": {"class_type": "ModelSamplingStableCascade", "inputs": {}},
                                 "2": sink(1)})
    assert hook.details == "Node ID '#1'; it is one of ComfyUI's built-in nodes, which Loom does not provide yet"


def test_the_list_of_comfyuis_missing_built_in_nodes_names_none_that_loom_has():
    from nodes.comfy_compat import COMFY_CORE_NODES_MISSING
    from nodes.registry import builtin_registry

    assert not COMFY_CORE_NODES_MISSING & set(builtin_registry())


def test_no_outputs(registry):
    assert types(registry, {"1": {"class_type": "Add", "inputs": {"a": 1}}}) == [(None, None, "prompt_no_outputs")]


def test_required_input_missing(registry):
    assert types(registry, {"1": {"class_type": "Add", "inputs": {}}, "2": sink(["1", 0])}) == [
        ("1", "a", "required_input_missing")]


@pytest.mark.parametrize("link", [["7", 0], ["1", 3], ["1", 0, 1]])
def test_bad_linked_input(registry, link):
    doc = {"1": {"class_type": "Add", "inputs": {"a": 1}}, "2": {"class_type": "Scale",
           "inputs": {"value": link, "factor": 1.0}}, "3": sink(["2", 0])}
    assert types(registry, doc) == [("2", "value", "bad_linked_input")]


def test_return_type_mismatch(registry):
    doc = {"1": {"class_type": "PrimitiveString", "inputs": {"value": "x"}},
           "2": {"class_type": "Scale", "inputs": {"value": ["1", 0], "factor": 1.0}}, "3": sink(["2", 0])}
    [p] = problems(registry, doc)
    assert p.type == "return_type_mismatch" and "expects INT" in p.details and "STRING" in p.details


@pytest.mark.parametrize("value,kind", [("wide", "invalid_input_type"), (True, "invalid_input_type"),
                                        (1.5, "invalid_input_type"), (-1001, "value_smaller_than_min"),
                                        (1001, "value_bigger_than_max")])
def test_constant_checks(registry, value, kind):
    assert types(registry, {"1": {"class_type": "Add", "inputs": {"a": value}}, "2": sink(["1", 0])}) == [
        ("1", "a", kind)]


def test_numeric_strings_are_coerced_like_comfyui(registry):
    checked = validate(parse_api({"1": {"class_type": "Add", "inputs": {"a": "12"}}, "2": sink(["1", 0])}), registry)
    assert checked.ok and checked.values["1"]["a"] == 12


def test_value_not_in_list(registry):
    doc = {"1": {"class_type": "IntMath", "inputs": {"a": 1, "b": 2, "operation": "divide"}}, "2": sink(["1", 0])}
    [p] = problems(registry, doc)
    assert p.type == "value_not_in_list" and "'divide'" in p.details and "add" in p.details


def test_socket_input_given_a_constant(registry):
    doc = {"1": {"class_type": "Scale", "inputs": {"value": 3, "factor": 1.0}}, "2": sink(["1", 0])}
    # INT sockets read constants like widgets do; typed model sockets must be linked.
    assert problems(registry, doc) == []


def test_custom_validation(registry):
    doc = {"1": {"class_type": "IntMath", "inputs": {"a": 1, "b": 0, "operation": "modulo"}}, "2": sink(["1", 0])}
    [p] = problems(registry, doc)
    assert p.type == "custom_validation_failed" and "b must not be 0" in p.details


def test_cycle_names_every_node_in_it(registry):
    doc = {"1": {"class_type": "Scale", "inputs": {"value": ["3", 0], "factor": 1.0}},
           "2": {"class_type": "Add", "inputs": {"a": 1}},
           "3": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": ["2", 0], "operation": "add"}},
           "4": sink(["3", 0])}
    found = problems(registry, doc)
    cycle = [p for p in found if p.type == "dependency_cycle"]
    assert {p.node_id for p in cycle} == {"1", "3"}
    assert all(p.extra["cycle"] == ["1", "3"] for p in cycle)


def test_every_problem_is_reported_at_once(registry):
    doc = {"1": {"class_type": "Add", "inputs": {"a": "x"}},
           "2": {"class_type": "Scale", "inputs": {"factor": 99}},
           "3": {"class_type": "Nope", "inputs": {}},
           "4": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": ["2", 0], "operation": "?"}},
           "5": sink(["4", 0])}
    assert {p.type for p in problems(registry, doc)} == {
        "invalid_prompt", "invalid_input_type", "required_input_missing", "value_bigger_than_max",
        "value_not_in_list", "return_type_mismatch"}


def test_nodes_no_output_needs_are_not_checked(registry):
    doc = {"1": {"class_type": "Add", "inputs": {"a": "broken"}}, "2": {"class_type": "Add", "inputs": {"a": 1}},
           "3": sink(["2", 0])}
    assert problems(registry, doc) == []
    # Asking for node 1 explicitly brings it into the run, and so into validation.
    assert [p.type for p in problems(registry, doc, outputs=["3", "1"])] == ["invalid_input_type"]
    assert [p.type for p in problems(registry, doc, outputs=["3", "99"])] == ["invalid_prompt"]


def test_error_response_has_comfyui_shape(registry):
    body = error_response(problems(registry, {"6": {"class_type": "Add", "inputs": {}}, "7": sink(["6", 0])}))
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    err = body["node_errors"]["6"]["errors"][0]
    assert body["node_errors"]["6"]["class_type"] == "Add"
    assert err == {"type": "required_input_missing", "message": "Required input is missing", "details": "a",
                   "extra_info": {"input_name": "a"}}


def test_each_node_error_lists_the_outputs_that_need_that_node(registry):
    # ComfyUI's `dependent_outputs`: a missing input of node 6 fails both outputs that lead back to it.
    doc = {"6": {"class_type": "Add", "inputs": {}}, "2": {"class_type": "Scale", "inputs": {"value": ["6", 0]}},
           "7": sink(["2", 0]), "8": sink(["6", 0]), "9": sink(1)}
    body = validate(parse_api(doc), registry).error_response()
    assert list(body["node_errors"]) == ["6", "2"]
    assert body["node_errors"]["6"]["dependent_outputs"] == ["7", "8"]
    assert body["node_errors"]["2"]["dependent_outputs"] == ["7"]


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '"x"', '{"1": 5}', '{"1": {"inputs": {}}}',
                                  '{"1": {"class_type": 3}}', '{"1": {"class_type": "Add", "inputs": []}}',
                                  '{"1": {"class_type": ""}}'])
def test_malformed_documents_get_one_clear_error(text):
    with pytest.raises(DocumentError) as err:
        parse_api_json(text)
    assert str(err.value) and "Traceback" not in str(err.value)


def test_list_constants_are_wrapped_and_round_trip():
    graph = parse_api({"1": {"class_type": "X", "inputs": {"v": {"__value__": [1, 2]}, "l": ["2", 1]}}})
    assert graph.nodes["1"].inputs["v"] == [1, 2]
    assert graph.to_api()["1"]["inputs"] == {"v": {"__value__": [1, 2]}, "l": ["2", 1]}


def test_a_problem_names_a_node_whose_id_is_empty(registry):
    [problem] = problems(registry, {"": {"class_type": "Add", "inputs": {}}, "7": sink(["", 0])})
    assert str(problem).startswith("node '' (Add), input 'a': Required input is missing")


def test_a_check_inputs_that_raises_is_that_nodes_problem(registry):
    """A node's own input check (a plugin's, say) that raises gives a custom_validation_failed problem for that
    node, so POST /prompt answers 400 naming it rather than a server error."""
    from nodes.node import Node
    from nodes.spec import Int, Output

    class Fragile(Node):
        value = Int(1)
        outputs = (Output("INT"),)

        @classmethod
        def check_inputs(cls, inputs):
            raise RuntimeError("the check itself broke")

        def execute(self, value):
            return (value,)

    registry.register(Fragile)
    [problem] = problems(registry, {"1": {"class_type": "Fragile", "inputs": {"value": 2}}, "2": sink(["1", 0])})
    assert (problem.node_id, problem.type) == ("1", "custom_validation_failed")
    assert problem.details == "Fragile could not check its inputs: RuntimeError: the check itself broke"


def test_a_link_into_an_input_the_node_lacks_is_named(registry):
    """A link into an undeclared input (an old input name) is a problem of that node, not a run-time TypeError."""
    doc = {"1": {"class_type": "Add", "inputs": {"a": 1}},
           "2": {"class_type": "Scale", "inputs": {"value": ["1", 0], "factor": 2, "opt_factor": ["1", 0]}},
           "3": sink(["2", 0])}
    [problem] = problems(registry, doc)
    assert (problem.node_id, problem.input_name, problem.type) == ("2", "opt_factor", "bad_linked_input")
    assert problem.details == "opt_factor: Scale has no input of this name (its inputs: value, factor)"
    # A constant of an unknown name is left out, as ComfyUI leaves it out.
    doc["2"]["inputs"] = {"value": ["1", 0], "factor": 2, "note": "ignored"}
    assert problems(registry, doc) == []
