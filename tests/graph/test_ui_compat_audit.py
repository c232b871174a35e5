"""Regressions from the audit of real ComfyUI workflow files (session 14): each test is a minimal workflow in
the shape of a public file that failed to load or validate, named in its docstring."""

import json

import pytest

from graph import errors as E
from graph.document import DocumentError, parse_api
from graph.load import graph_from_data, load_workflow
from graph.ui_format import ui_to_api
from graph.validate import validate
from nodes.folders import FolderPaths, get_paths, set_paths


def node(id_, type_, widgets=None, inputs=(), outputs=(), mode=0, **extra):
    out = {"id": id_, "type": type_, "mode": mode, "inputs": list(inputs), "outputs": list(outputs), **extra}
    if widgets is not None:
        out["widgets_values"] = widgets
    return out


def sock(name, link, type_="INT"):
    return {"name": name, "type": type_, "link": link}


@pytest.fixture
def folders(tmp_path):
    before = get_paths()
    paths = FolderPaths(base=tmp_path, bundled_models=None)
    set_paths(paths)
    yield paths
    set_paths(before)


def test_a_model_file_that_is_not_one_is_a_validation_problem_not_a_crash(registry, folders):
    """ComfyUI's .github/workflows/json_examples/workflow_lora_api.json names a LoRA; a file of that name that is
    not a model made validation raise CheckpointError out of LoraLoader.check_links (a 500 from POST /prompt)."""
    (folders.base / "models" / "loras").mkdir(parents=True)
    (folders.base / "models" / "loras" / "epiNoiseoffset_v2.safetensors").write_bytes(b"not a model at all")
    api = {"4": {"class_type": "SomePackLoader", "inputs": {}},
           "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "epiNoiseoffset_v2.safetensors",
                                                        "strength_model": 1, "strength_clip": 1,
                                                        "model": ["4", 0], "clip": ["4", 1]}},
           "9": {"class_type": "Sink", "inputs": {"value": ["10", 0]}}}
    checked = validate(parse_api(api), registry)
    lora = [p for p in checked.problems if p.node_id == "10"]
    assert [p.type for p in lora] == [E.CUSTOM_VALIDATION_FAILED]
    assert "CheckpointError" in lora[0].details and "epiNoiseoffset_v2.safetensors" in lora[0].details
    assert checked.error_response()["node_errors"]["10"]["dependent_outputs"] == ["9"]


GROUP_NODE_UI = {
    # The shape of ComfyUI_frontend's browser_tests/assets/groupnodes/group_ksampler_external_latent.json: a
    # group node ("workflow>NAME") whose definition in extra.groupNodes links its nodes by index, with one input
    # left open (fed from outside) and the nodes' widget values laid end to end on the instance.
    "nodes": [node(10, "workflow>two_adds", [7, 8, 100, 1], inputs=[sock("b", 100)],
                   outputs=[{"name": "sum", "type": "INT", "links": [101]}]),
              node(20, "Add", [2, 3], outputs=[{"name": "sum", "type": "INT", "links": [100]}]),
              node(30, "Sink", inputs=[sock("value", 101, "*")])],
    "links": [[100, 20, 0, 10, 0, "INT"], [101, 10, 0, 30, 0, "INT"]],
    "extra": {"groupNodes": {"two_adds": {
        "nodes": [node(-1, "Add", [1, 1], inputs=[sock("b", None)], index=0,
                       outputs=[{"name": "sum", "type": "INT", "links": []}]),
                  node(-1, "Add", [5, 5], inputs=[sock("a", None), sock("b", None)], index=1,
                       outputs=[{"name": "sum", "type": "INT", "links": []}])],
        "links": [[0, 0, 1, 0, 4, "INT"]], "external": []}}},
    "version": 0.4,
}


def test_group_node_expands_into_its_nodes(registry):
    api = ui_to_api(GROUP_NODE_UI, registry)
    assert set(api) == {"10:0", "10:1", "20", "30"}
    # Node 0's open input b takes the instance's link; node 1's a is linked inside; widgets split 2 + 2.
    assert api["10:0"]["inputs"] == {"a": 7, "b": ["20", 0]}
    assert api["10:1"]["inputs"] == {"a": ["10:0", 0], "b": 1}
    assert api["30"]["inputs"] == {"value": ["10:1", 0]}  # the instance's output is node 1's unlinked one


def test_group_node_external_output_is_shown_beside_the_open_ones(registry):
    """A group definition's "external" entry ([index, slot, type]) exposes an output that is also linked inside."""
    data = json.loads(json.dumps(GROUP_NODE_UI))
    data["extra"]["groupNodes"]["two_adds"]["external"] = [[0, 0, "INT"]]
    data["nodes"][0]["outputs"].insert(0, {"name": "sum", "type": "INT", "links": [101]})
    data["nodes"][0]["outputs"][1]["links"] = []
    assert ui_to_api(data, registry)["30"]["inputs"] == {"value": ["10:0", 0]}


def test_legacy_group_node_exposes_every_open_input_in_order(registry):
    """The shape of ComfyUI_frontend's browser_tests/assets/legacy_group_node.json ("workflow/NAME", two
    samplers side by side, all inputs open): instance inputs map to the nodes' inputs node by node, and a
    widget list whose length does not split over the nodes leaves their own values."""
    data = {
        "nodes": [node(1, "Add", [4, 0], outputs=[{"name": "sum", "type": "INT", "links": [1]}]),
                  node(15, "workflow/pair", [9, 9, 9], inputs=[sock("value", None), sock("Scale value", 1)],
                       outputs=[{"name": "FLOAT", "links": None}, {"name": "Scale FLOAT", "links": [2]}]),
                  node(30, "Sink", inputs=[sock("value", 2, "*")])],
        "links": [[1, 1, 0, 15, 1, "INT"], [2, 15, 1, 30, 0, "FLOAT"]],
        "extra": {"groupNodes": {"pair": {"nodes": [
            node(-1, "Scale", [2.0], inputs=[sock("value", None)], index=0, outputs=[{"name": "FLOAT"}]),
            node(-1, "Scale", [3.0], inputs=[sock("value", None)], index=1, outputs=[{"name": "FLOAT"}])],
            "links": []}}},
    }
    api = ui_to_api(data, registry)
    assert api["15:1"]["inputs"] == {"factor": 3.0, "value": ["1", 0]}
    assert api["15:0"]["inputs"] == {"factor": 2.0}  # its input is left open on the instance
    assert api["30"]["inputs"] == {"value": ["15:1", 0]}


def test_group_node_widget_converted_to_an_input_takes_its_link(registry):
    """Group node instances carry converted widgets as inputs named after the widget, or "<node title> <widget>"
    where two nodes share the name (the editor's naming); a PrimitiveNode's value reaches that widget."""
    data = json.loads(json.dumps(GROUP_NODE_UI))
    data["nodes"][0]["inputs"].append({"name": "Add a", "type": "INT", "link": 102, "widget": {"name": "Add a"}})
    data["nodes"].append(node(40, "PrimitiveNode", [33, "fixed"], outputs=[{"name": "INT", "links": [102]}]))
    data["links"].append([102, 40, 0, 10, 1, "INT"])
    assert ui_to_api(data, registry)["10:0"]["inputs"] == {"a": 33, "b": ["20", 0]}


def test_group_node_workflow_runs(registry):
    from executor.executor import Executor

    result = Executor(registry).run(graph_from_data(GROUP_NODE_UI, registry))
    assert result.ok, result.error
    assert result.outputs["30"]["value"] == [(7 + 5) + 1]


PROMPT = {"3": {"class_type": "Add", "inputs": {"a": 2, "b": 40}},
          "4": {"class_type": "Sink", "inputs": {"value": ["3", 0]}}}
WORKFLOW = {"nodes": [node(3, "Add", [1, 1], outputs=[{"name": "sum", "links": [1]}]),
                      node(4, "Sink", inputs=[sock("value", 1, "*")])], "links": [[1, 3, 0, 4, 0, "INT"]]}


def test_png_text_chunks_saved_as_json_load(registry, tmp_path):
    """ComfyUI_frontend's tests-ui/workflows/examples/*.png.json hold a PNG's text chunks as JSON strings
    ({"prompt": "...", "workflow": "..."}); the prompt is used, as for the PNG itself, else the workflow."""
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"prompt": json.dumps(PROMPT), "workflow": json.dumps(WORKFLOW)}))
    assert load_workflow(both, registry).to_api()["3"]["inputs"] == {"a": 2, "b": 40}
    only_ui = graph_from_data({"workflow": json.dumps(WORKFLOW)}, registry)
    assert only_ui.to_api()["3"]["inputs"] == {"a": 1, "b": 1}
    with pytest.raises(DocumentError, match="'prompt' entry is not valid JSON"):
        graph_from_data({"prompt": "{not json"}, registry)


def test_old_boolean_control_value_after_seed_is_skipped(registry):
    """ComfyUI_examples' lora_multiple workflow (2023) stores `true` where later files store "randomize"."""
    data = {"nodes": [node(3, "KSampler", [513173432917412, True, 20, 8, "euler", "normal", 1])], "links": []}
    assert ui_to_api(data, registry)["3"]["inputs"] == {"seed": 513173432917412, "steps": 20, "cfg": 8,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1}
