"""`python -m benchmarks.samplers` (issue 4) runs and reports what the issue asks for."""

import json

import pytest
import torch

from benchmarks import samplers


@pytest.fixture
def torch_state():
    """The benchmark sets torch's thread count and seed for its own process: put them back for later tests."""
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.random.set_rng_state(rng)


def test_samplers_report_model_calls_and_overhead_and_the_summary_is_the_last_line(capsys, torch_state):
    summary = samplers.main(["--samplers", "euler", "heun", "dpmpp_2m_sde", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == summary
    assert [line.split()[0] for line in lines[:-1]] == ["euler", "heun", "dpmpp_2m_sde", "floor"]
    rows = summary["samplers"]
    # Heun makes two calls a step except the last, into sigma 0.
    assert [rows[name]["model_calls"] for name in ("euler", "heun", "dpmpp_2m_sde")] == [20, 39, 20]
    assert all(row["ms_per_model_call"] > 0 and row["overhead_pct"] >= 0 for row in rows.values())
    assert summary["overhead_pct_max"] == max(row["overhead_pct"] for row in rows.values())
    assert summary["keep_freed_memory"] is False
    assert lines[-2].startswith("floor ") and summary["floor_overhead_pct"] > 0 and "floor" not in rows
