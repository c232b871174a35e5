"""The body of a Ray worker (web.runner.PromptRunner), driven directly in this process: no Ray needed."""

import pickle

import pytest

from executor import events as ev
from nodes.folders import FolderPaths, set_paths
from tests.web.conftest import slow_prompt
from tests.web.pack import web_registry
from web.runner import Outcome, PromptRunner, WorkerSpec


@pytest.fixture
def runner(tmp_path):
    made = PromptRunner(WorkerSpec(FolderPaths(base=tmp_path, bundled_models=None), web_registry,
                                   preview_interval_s=0.0))
    yield made
    set_paths(FolderPaths())


def test_events_stream_in_order_in_batches_that_end_with_the_outcome(runner):
    batches = list(runner.run("p1", slow_prompt(steps=3), ["3"], {}))
    items = [item for batch in batches for item in batch]
    outcome = items.pop()
    assert isinstance(outcome, Outcome) and outcome.result.status == "success" and outcome.problem is None
    assert outcome.result.outputs == {"3": {"value": [1]}} and outcome.result.values == {}
    assert not any(isinstance(item, Outcome) for item in items)
    events = [item for item in items if isinstance(item, ev.Event)]
    assert [e.kind for e in events][:2] == ["execution_start", "execution_cached"]
    assert events[-1].kind == "execution_success"
    progress = [e for e in events if isinstance(e, ev.Progress)]
    assert [p.value for p in progress] == [1, 2, 3] and all(p.preview is None for p in progress)
    assert sum(isinstance(item, bytes) for item in items) == 3  # previews travel as encoded frames
    assert pickle.loads(pickle.dumps(batches))[-1][-1].result.status == "success"  # what Ray ships


def test_an_interrupt_that_overtakes_its_prompt_still_stops_it(runner, tmp_path):
    marker = {"1": {"class_type": "Marker", "inputs": {"path": str(tmp_path / "m.txt"), "seconds": 120}}}
    assert runner.interrupt("p1") is False  # not running here yet
    [*_, last] = runner.run("p1", marker, ["1"], {})
    assert last[-1].result.status == "interrupted"
    [*_, last] = runner.run("p2", slow_prompt(steps=2, value=5), ["3"], {})
    assert last[-1].result.status == "success"


def test_a_prompt_that_no_longer_validates_ends_with_the_problem(runner):
    [[outcome]] = runner.run("p1", {"1": {"class_type": "NoSuchNode", "inputs": {}}}, [], {})
    assert outcome.result is None and outcome.problem["type"] == "invalid_prompt"
    assert "NoSuchNode does not exist" in outcome.problem["message"]
