"""`python -m benchmarks.memory` (issue 10) runs end to end, so the GPU check does not find it broken."""

import json

from benchmarks import memory
from nodes.folders import get_paths, set_paths


def test_varied_workflows_run_and_the_summary_is_the_last_line(capsys):
    before = get_paths()
    try:
        summary = memory.main(["--runs", "20", "--every", "10", "--cpu", "--weights-dtype", "fp8"])
    finally:
        set_paths(before)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == summary
    assert summary["runs"] == 20 and summary["oom_recoveries"] == 0
    assert [line.split()[0] for line in lines[1:-1]] == ["10", "20"]  # a row after every 10 runs
