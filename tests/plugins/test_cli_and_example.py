import json
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

import main
from nodes import folders
from nodes.plugins import load_plugins
from nodes.registry import builtin_registry
from tests.plugins.helpers import write

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "plugins"


@pytest.fixture
def cli(capsys, monkeypatch):
    """main.py in this process (a subprocess per call would cost a second of start-up each)."""
    monkeypatch.setattr(folders, "_paths", folders.get_paths())

    def run(*args):
        try:
            code = main.main([str(a) for a in args])
        except SystemExit as exc:
            if isinstance(exc.code, str):  # what Python prints when a message ends the program
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def test_nodes_plugins_lists_loaded_and_failed(cli, tmp_path):
    write(tmp_path / "custom_nodes" / "broken.py", "import surely_not_installed_pkg\n")
    proc = cli("nodes", "--plugins", "--base-dir", tmp_path, "--custom-nodes-dir", EXAMPLES)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "1 plugin(s) loaded, 1 failed"
    assert lines[1].split()[0] == "FAILED" and "broken" in lines[1] and lines[1].split()[1].endswith("s")
    assert "missing dependency" in lines[2] and "surely_not_installed_pkg" in lines[2]
    assert lines[3].split()[0] == "ok" and "loom_example_pack  (3 nodes)" in lines[3]
    assert lines[4].strip() == f"editor extensions: {EXAMPLES / 'loom_example_pack' / 'js'}"


def test_plugins_as_json_and_config_file_folders(cli, tmp_path):
    config = write(tmp_path / "paths.json", json.dumps({"custom_nodes": [str(EXAMPLES)]}))
    proc = cli("nodes", "--plugins", "--json", "--base-dir", tmp_path, "--extra-model-paths", config)
    (pack,) = json.loads(proc.stdout)
    assert pack["name"] == "loom_example_pack" and pack["loaded"] and pack["error"] is None
    assert pack["node_names"] == ["ExampleInvert", "ExampleSwatch", "ExampleSwatchImage"] and pack["import_s"] >= 0
    proc = cli("nodes", "--json", "--base-dir", tmp_path, "--extra-model-paths", config, "--no-custom-nodes")
    assert "ExampleInvert" not in json.loads(proc.stdout)


def test_example_pack_is_not_loaded_by_default_and_runs_when_asked(cli, tmp_path):
    workflow = write(tmp_path / "wf.json", json.dumps({
        "1": {"class_type": "ExampleSwatch", "inputs": {"hex_colour": "#000000"}},
        "2": {"class_type": "ExampleSwatchImage", "inputs": {"swatch": ["1", 0], "width": 8, "height": 8,
                                                             "batch_size": 1}},
        "3": {"class_type": "ExampleInvert", "inputs": {"image": ["2", 0], "strength": 1.0}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}))
    proc = cli("validate", workflow, "--base-dir", tmp_path)
    assert proc.returncode == 2 and "ExampleSwatch does not exist" in proc.stderr
    proc = cli("run", workflow, "--json", "--base-dir", tmp_path, "--custom-nodes-dir", EXAMPLES)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["executed"] == ["1", "2", "3", "4"]
    proc = cli("run", workflow, "--base-dir", tmp_path, "--custom-nodes-dir", tmp_path / "nowhere")
    assert proc.returncode != 0 and "not a folder" in proc.stderr


def test_example_pack_installs_through_its_entry_point(tmp_path, monkeypatch):
    """What `pip install examples/plugins/loom_example_pack` leaves behind, without the network."""
    project = tomllib.loads((EXAMPLES / "loom_example_pack" / "pyproject.toml").read_text())["project"]
    entry_points = project["entry-points"]["loom.nodes"]
    site = tmp_path / "site"
    site.mkdir()
    (site / "loom_example_pack").symlink_to(EXAMPLES / "loom_example_pack", target_is_directory=True)
    dist = site / "loom_example_pack-0.1.0.dist-info"
    write(dist / "METADATA", f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    write(dist / "entry_points.txt", "[loom.nodes]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    monkeypatch.syspath_prepend(str(site))
    registry = builtin_registry()
    (info,) = load_plugins(registry, [], entry_points=True)
    assert info.loaded and info.name == "loom_example_pack" and info.source.startswith("entry point loom-example-pack")
    assert info.web_dir == (EXAMPLES / "loom_example_pack" / "js").resolve()
    assert {"ExampleInvert", "ExampleSwatch", "ExampleSwatchImage"} <= set(registry)
