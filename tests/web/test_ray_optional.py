"""Ray is optional: the engine and the server import and run without it, and `--workers ray` says what is missing."""

import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import main
from nodes.folders import FolderPaths, set_paths

ROOT = Path(__file__).resolve().parents[2]


def test_the_server_and_the_command_line_do_not_import_ray():
    code = ("import sys; import main, web.app, web.serve, web.worker, web.dispatch, web.runner; "
            "main.build_parser().parse_args(['serve']); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("flags", [["--workers", "ray"], ["--ray-address", "auto"]])
def test_workers_ray_without_ray_installed_is_a_clear_error(monkeypatch, tmp_path, capsys, flags):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "web.ray_pool", raising=False)
    try:
        with pytest.raises(SystemExit) as exit_:
            main.main(["serve", *flags, "--base-dir", str(tmp_path), "--no-custom-nodes", "--no-bundled-models"])
    finally:
        set_paths(FolderPaths())
    assert exit_.value.code == 2
    assert re.match(r"error: --workers ray needs Ray.*pip install 'ray", capsys.readouterr().err)


def test_serve_flags_make_ray_options_whose_registry_a_worker_can_rebuild(tmp_path):
    pytest.importorskip("ray")
    plugins = tmp_path / "custom_nodes"
    plugins.mkdir()
    (plugins / "triple.py").write_text(
        "from nodes.node import Node\nfrom nodes.spec import Int, Output\n\n"
        "class Triple(Node):\n    value = Int(1)\n    outputs = (Output('INT'),)\n\n"
        "    def execute(self, value):\n        return (3 * value,)\n\nNODES = [Triple]\n")
    args = main.build_parser().parse_args(["serve", "--ray-address", "auto", "--ray-workers", "3",
                                           "--ray-gpus-per-worker", "0.5", "--base-dir", str(tmp_path)])
    options = main._ray_options(args, FolderPaths(base=tmp_path))
    assert (options.address, options.workers, options.gpus_per_worker, options.cpus_per_worker,
            options.max_attempts) == ("auto", 3, 0.5, 1, 2)
    registry = pickle.loads(pickle.dumps(options.registry))()  # as a Ray worker receives it
    assert "Triple" in registry and "KSampler" in registry
    assert main._ray_options(main.build_parser().parse_args(["serve"]), FolderPaths(base=tmp_path)) is None
