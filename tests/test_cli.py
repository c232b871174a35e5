import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 6}},
        "2": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": 7, "operation": "multiply"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.fixture
def workflow(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(GOOD))
    return path


def test_help_lists_subcommands():
    out = cli("--help").stdout
    for command in ("run", "validate", "convert", "nodes", "schema"):
        assert command in out


def test_run_prints_result(workflow, tmp_path):
    proc = cli("run", workflow, "--base-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "node 3: 42" in proc.stdout


def test_run_with_set_and_json(workflow, tmp_path):
    proc = cli("run", workflow, "--set", "2.b=10", "--json", "--base-dir", tmp_path)
    body = json.loads(proc.stdout)
    assert proc.returncode == 0 and body["status"] == "success"
    assert body["outputs"]["3"] == {"text": ["60"]}


def test_validation_errors_exit_2_and_list_all(workflow, tmp_path):
    proc = cli("run", workflow, "--set", "2.b=\"x\"", "--set", "2.operation=div", "--json", "--base-dir", tmp_path)
    assert proc.returncode == 2
    errors = json.loads(proc.stdout)["node_errors"]["2"]["errors"]
    assert {e["type"] for e in errors} == {"invalid_input_type", "value_not_in_list"}
    proc = cli("validate", workflow, "--set", "2.b=\"x\"")
    assert proc.returncode == 2 and "invalid_input_type" in proc.stderr


def test_execution_error_exits_1(tmp_path):
    path = tmp_path / "wf.json"
    doc = dict(GOOD, **{"2": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": 9999, "operation": "power"}}})
    path.write_text(json.dumps(doc))
    proc = cli("run", path, "--base-dir", tmp_path)
    assert proc.returncode == 1 and "node 2 (IntMath)" in proc.stderr and "too large" in proc.stderr


@pytest.mark.parametrize("content", ["{", "[]", "not json at all"])
def test_malformed_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    proc = cli("validate", path)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_missing_file(tmp_path):
    proc = cli("run", tmp_path / "nope.json")
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_convert_ui_to_api(tmp_path):
    ui = {"nodes": [{"id": 1, "type": "PrimitiveInt", "widgets_values": [4], "inputs": [], "mode": 0},
                    {"id": 2, "type": "PreviewAny", "inputs": [{"name": "source", "type": "*", "link": 1}],
                     "mode": 0}],
          "links": [[1, 1, 0, 2, 0, "INT"]]}
    src = tmp_path / "ui.json"
    src.write_text(json.dumps(ui))
    proc = cli("convert", src, "-o", tmp_path / "api.json")
    assert proc.returncode == 0
    api = json.loads((tmp_path / "api.json").read_text())
    assert api["1"]["inputs"] == {"value": 4} and api["2"]["inputs"] == {"source": ["1", 0]}
    assert cli("run", src, "--base-dir", tmp_path).stdout.strip() == "node 2: 4"
    nowhere = cli("convert", src, "-o", tmp_path / "missing" / "api.json")
    assert nowhere.returncode == 2 and nowhere.stderr.startswith("error: -o ") and "Traceback" not in nowhere.stderr


def test_convert_keeps_the_widget_values_of_a_node_type_it_lacks_and_says_so(tmp_path):
    ui = {"nodes": [{"id": 18, "type": "CannyEdgePreprocessor", "widgets_values": [100, 200, 512], "inputs": [],
                     "mode": 0}], "links": []}
    src = tmp_path / "ui.json"
    src.write_text(json.dumps(ui))
    proc = cli("convert", src, "-o", tmp_path / "api.json")
    assert proc.returncode == 0
    api = json.loads((tmp_path / "api.json").read_text())
    assert api["18"]["_meta"]["widgets_values"] == [100, 200, 512] and api["18"]["inputs"] == {}
    assert ("note: node 18 (CannyEdgePreprocessor) is not a node type this engine has; its widget values "
            "[100, 200, 512] are kept in _meta.widgets_values") in proc.stderr


def test_nodes_and_schema():
    info = json.loads(cli("nodes", "--json").stdout)
    assert info["IntMath"]["input_order"]["required"] == ["a", "b", "operation"]
    schema = json.loads(cli("schema").stdout)
    assert schema["additionalProperties"]["$ref"].endswith("ApiNode")


def test_default_workflow_runs_on_the_bundled_demo_model(tmp_path):
    """A fresh base folder, no models of one's own: txt2img runs on the checkpoint the project ships."""
    proc = cli("run", ROOT / "workflows" / "txt2img.json", "--base-dir", tmp_path, "--set", "3.steps=4", "--json")
    body = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    [saved] = body["files"]
    from PIL import Image
    with Image.open(saved) as image:
        assert image.size == (64, 64)
    hidden = cli("validate", ROOT / "workflows" / "txt2img.json", "--base-dir", tmp_path, "--no-bundled-models")
    assert hidden.returncode == 2 and "loom-demo.safetensors" in hidden.stderr


def test_lora_for_another_family_exits_2_before_running(tmp_path):
    """An SDXL LoRA on the bundled SD1 demo model: refused at validation, from the two files' headers."""
    import safetensors.torch
    import torch

    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.zeros(4, 2048),
                                 f"{key}.lora_up.weight": torch.zeros(640, 4)}, loras / "xl.safetensors")
    proc = cli("run", ROOT / "workflows" / "lora.json", "--base-dir", tmp_path,
               "--set", '10.lora_name="xl.safetensors"', "--set", '4.ckpt_name="loom-demo.safetensors"')
    assert proc.returncode == 2, proc.stderr
    assert "xl.safetensors is a SDXL LoRA; it does not fit the SD1 model" in proc.stderr
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").iterdir())


def test_set_with_an_input_the_node_lacks_is_an_error_not_ignored(workflow, tmp_path):
    proc = cli("run", workflow, "--set", "2.bb=10", "--base-dir", tmp_path)
    assert proc.returncode == 2
    assert "node 2 (IntMath) has no input 'bb'; its inputs are a, b, operation" in proc.stderr


def test_set_on_an_editor_only_node_names_the_inputs_it_feeds(tmp_path):
    """A UI-format file's PrimitiveNode is not in the workflow that runs (its value is copied into the inputs it
    feeds): --set on it says so, and names those inputs."""
    primitive = {"id": 9, "type": "PrimitiveNode", "pos": [0, 0], "size": [200, 80], "mode": 0, "inputs": [],
                 "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "a"}, "links": [1]}],
                 "widgets_values": [7, "fixed"]}
    math_node = {"id": 2, "type": "IntMath", "pos": [300, 0], "size": [200, 100], "mode": 0,
                 "inputs": [{"name": "a", "type": "INT", "widget": {"name": "a"}, "link": 1}],
                 "outputs": [{"name": "INT", "type": "INT", "links": []}], "widgets_values": [7, 3, "add"]}
    path = tmp_path / "ui.json"
    path.write_text(json.dumps({"nodes": [primitive, math_node], "links": [[1, 9, 0, 2, 0, "INT"]], "version": 0.4}))
    proc = cli("run", path, "--set", "9.value=4", "--base-dir", tmp_path)
    assert proc.returncode == 2
    assert ("node '9' is not in the workflow (node 9 is a PrimitiveNode, which only the editor has; set the inputs "
            "it feeds instead: 2.a)") in proc.stderr


@pytest.mark.parametrize("content, says", [
    (None, "No such file or directory"),
    ("{bad", "Expecting property name"),
    ('{"checkpoints": 5}', "'checkpoints' must be a folder or a list of folders, not 5"),
])
def test_unusable_options_are_one_line_and_exit_2(workflow, tmp_path, content, says):
    paths_file = tmp_path / "extra.json"
    if content is not None:
        paths_file.write_text(content)
    proc = cli("run", workflow, "--extra-model-paths", paths_file, "--base-dir", tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --extra-model-paths") and says in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("run", workflow, "--set", "b=1", "--base-dir", tmp_path)
    assert proc.returncode == 2 and "--set expects NODE_ID.INPUT=VALUE" in proc.stderr


def test_a_reader_that_stops_early_is_not_an_error():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a terminal
    for reader in ("head -1", "true"):
        proc = subprocess.run(["bash", "-c", f"set -o pipefail; '{sys.executable}' main.py nodes --json | {reader}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
        assert proc.returncode == 0 and proc.stderr == "", (reader, proc.stderr)


def test_set_reaches_a_widget_a_subgraph_shows(tmp_path):
    """`--set 5.b=10` on an editor file whose node 5 is a subgraph showing its input `b` (as Comfy-Org's templates
    show their sizes): the value goes to the inner node it feeds; a name it does not show is refused with the ones
    it does."""
    definition = {
        "id": "sg-math", "name": "Math", "inputNode": {"id": -10}, "outputNode": {"id": -20},
        "inputs": [{"id": "i0", "name": "b", "type": "INT", "linkIds": [1]}],
        "outputs": [{"id": "o0", "name": "INT", "type": "INT", "linkIds": [2]}], "widgets": [],
        "nodes": [{"id": 1, "type": "IntMath", "mode": 0, "widgets_values": [6, 7, "multiply"],
                   "inputs": [{"name": "b", "type": "INT", "link": 1, "widget": {"name": "b"}}],
                   "outputs": [{"name": "INT", "type": "INT", "links": [2]}]}],
        "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "INT"},
                  {"id": 2, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "INT"}],
    }
    doc = {"nodes": [{"id": 5, "type": "sg-math", "mode": 0, "widgets_values": [7],
                      "properties": {"proxyWidgets": [["-1", "b"]]}, "inputs": [],
                      "outputs": [{"name": "INT", "type": "INT", "links": [11]}]},
                     {"id": 9, "type": "PreviewAny", "mode": 0, "widgets_values": [],
                      "inputs": [{"name": "source", "type": "*", "link": 11}], "outputs": []}],
           "links": [[11, 5, 0, 9, 0, "INT"]], "definitions": {"subgraphs": [definition]}, "version": 0.4}
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(doc))
    proc = cli("run", path, "--base-dir", tmp_path)
    assert proc.returncode == 0 and "42" in proc.stdout, proc.stderr + proc.stdout
    proc = cli("run", path, "--set", "5.b=10", "--base-dir", tmp_path)
    assert proc.returncode == 0 and "60" in proc.stdout, proc.stderr + proc.stdout
    proc = cli("run", path, "--set", "5.a=10", "--base-dir", tmp_path)
    assert proc.returncode == 2 and "the widgets it shows are 5.b" in proc.stderr


def test_a_missing_input_file_names_the_input_folder(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
                                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}))
    proc = cli("run", path, "--base-dir", tmp_path)
    assert proc.returncode == 2 and "'nope.png' is not one of [" in proc.stderr
    assert "(the files in input)" in proc.stderr and str(tmp_path) not in proc.stderr


def test_set_reaches_an_inner_widget_a_subgraph_shows_without_holding_its_value(tmp_path):
    """`--set 5.a=10` where node 5 shows its inner node 1's widget `a` (`proxyWidgets` [["1", "a"]]) and keeps no
    value of its own (Comfy-Org's HunyuanVideo 1.5 templates' sampler subgraphs): it sets the inner node's."""
    definition = {
        "id": "sg-math", "name": "Math", "inputNode": {"id": -10}, "outputNode": {"id": -20}, "inputs": [],
        "outputs": [{"id": "o0", "name": "INT", "type": "INT", "linkIds": [2]}], "widgets": [],
        "nodes": [{"id": 1, "type": "IntMath", "mode": 0, "widgets_values": [6, 7, "multiply"], "inputs": [],
                   "outputs": [{"name": "INT", "type": "INT", "links": [2]}]}],
        "links": [{"id": 2, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "INT"}],
    }
    doc = {"nodes": [{"id": 5, "type": "sg-math", "mode": 0, "widgets_values": [],
                      "properties": {"proxyWidgets": [["1", "a"]]}, "inputs": [],
                      "outputs": [{"name": "INT", "type": "INT", "links": [11]}]},
                     {"id": 9, "type": "PreviewAny", "mode": 0, "widgets_values": [],
                      "inputs": [{"name": "source", "type": "*", "link": 11}], "outputs": []}],
           "links": [[11, 5, 0, 9, 0, "INT"]], "definitions": {"subgraphs": [definition]}, "version": 0.4}
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(doc))
    proc = cli("run", path, "--set", "5.a=10", "--base-dir", tmp_path)
    assert proc.returncode == 0 and "70" in proc.stdout, proc.stderr + proc.stdout
