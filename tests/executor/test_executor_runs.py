import threading

import pytest

from executor import events as ev
from executor.cache import OutputCache
from executor.executor import Executor, WorkflowInvalid
from graph.document import parse_api
from tests.support_nodes import CALLS, Slow


def chain_doc(a=1, factor=2.0):
    return {"1": {"class_type": "Add", "inputs": {"a": a, "b": 1}},
            "2": {"class_type": "Scale", "inputs": {"value": ["1", 0], "factor": factor}},
            "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}},
            "4": {"class_type": "Add", "inputs": {"a": 100}}}  # not needed by any output


def test_runs_only_what_outputs_need(registry):
    result = Executor(registry).run(parse_api(chain_doc()))
    assert result.ok and result.executed == ["1", "2", "3"]
    assert result.outputs == {"3": {"value": [4.0]}}


def test_rerun_of_unchanged_workflow_runs_nothing(registry):
    executor = Executor(registry)
    executor.run(parse_api(chain_doc()))
    CALLS.clear()
    again = executor.run(parse_api(chain_doc()))
    assert again.executed == [] and again.cached == ["1", "2", "3"] and not CALLS
    assert again.outputs == {"3": {"value": [4.0]}}  # cached output nodes still report their UI


def test_changing_one_value_reruns_that_node_and_what_follows(registry):
    executor = Executor(registry)
    executor.run(parse_api(chain_doc()))
    result = executor.run(parse_api(chain_doc(factor=3.0)))
    assert result.executed == ["2", "3"] and result.cached == ["1"]
    assert result.outputs["3"] == {"value": [6.0]}
    result = executor.run(parse_api(chain_doc(a=5, factor=3.0)))
    assert result.executed == ["1", "2", "3"]


def test_equal_values_from_different_upstream_share_nothing_wrongly(registry):
    executor = Executor(registry)
    first = executor.run(parse_api(chain_doc(a=1)))
    second = executor.run(parse_api(chain_doc(a=2)))
    assert first.keys["2"] != second.keys["2"]


def test_non_cacheable_nodes_always_run(registry):
    doc = {"1": {"class_type": "RandomInt", "inputs": {"low": 0, "high": 10}},
           "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    executor = Executor(registry)
    executor.run(parse_api(doc))
    assert executor.run(parse_api(doc)).executed == ["1", "2"]


def test_fingerprint_change_reruns_file_node(registry, tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("one")
    doc = {"1": {"class_type": "ReadFile", "inputs": {"path": str(path)}},
           "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    executor = Executor(registry)
    assert executor.run(parse_api(doc)).outputs["2"] == {"value": ["one"]}
    assert executor.run(parse_api(doc)).executed == []
    path.write_text("two")
    import os
    os.utime(path, ns=(1, 10**18))
    result = executor.run(parse_api(doc))
    assert result.executed == ["1", "2"] and result.outputs["2"] == {"value": ["two"]}


def test_events_in_order(registry):
    seen = []
    Executor(registry).run(parse_api(chain_doc()), prompt_id="p1", on_event=seen.append)
    kinds = [(e.kind, getattr(e, "node", None)) for e in seen]
    assert kinds == [("execution_start", None), ("execution_cached", None), ("executing", "1"),
                     ("executing", "2"), ("executing", "3"), ("executed", "3"), ("execution_success", None)]
    assert all(e.prompt_id == "p1" for e in seen)


def test_failing_node_names_itself_and_engine_survives(registry):
    doc = {"1": {"class_type": "Add", "inputs": {"a": 1, "b": 1}},
           "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
           "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    seen = []
    executor = Executor(registry)
    result = executor.run(parse_api(doc), on_event=seen.append)
    assert result.status == "error"
    err = result.error
    assert (err.node_id, err.node_type, err.exception_type) == ("2", "Fail", "RuntimeError")
    assert "always fails" in err.exception_message and any("raise RuntimeError" in line for line in err.traceback)
    assert isinstance(seen[-1], ev.ExecutionError)
    # The node that finished before the failure is cached; the engine keeps working.
    assert executor.run(parse_api(chain_doc())).cached == ["1"]


def test_wrong_number_of_outputs_is_an_error(registry):
    doc = {"1": {"class_type": "WrongArity", "inputs": {}}, "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    result = Executor(registry).run(parse_api(doc))
    assert result.status == "error" and "declares 2" in result.error.exception_message


def test_invalid_workflow_raises_before_running(registry):
    with pytest.raises(WorkflowInvalid) as err:
        Executor(registry).run(parse_api({"1": {"class_type": "Add", "inputs": {}},
                                          "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}))
    assert err.value.problems[0].type == "required_input_missing"
    assert not CALLS


def test_interrupt_inside_a_long_node(registry):
    doc = {"1": {"class_type": "Add", "inputs": {"a": 1}},
           "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 100000}},
           "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    stop = threading.Event()
    progress = []

    def on_event(event):
        if isinstance(event, ev.Progress):
            progress.append(event.value)
            if event.value == 5:
                stop.set()

    result = Executor(registry).run(parse_api(doc), interrupt=stop, on_event=on_event)
    assert result.status == "interrupted" and result.error.node_id == "2"
    assert progress[-1] == 5  # stopped at the next check, not at the end
    assert "Slow" not in CALLS


def test_interrupt_between_nodes_from_another_thread(registry):
    doc = {"1": {"class_type": "Add", "inputs": {"a": 1}},
           "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 200}},
           "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    stop = threading.Event()
    Slow.started.clear()
    executor = Executor(registry)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", executor.run(parse_api(doc), interrupt=stop)))
    worker.start()
    assert Slow.started.wait(5)
    stop.set()
    worker.join(10)
    assert out["r"].status == "interrupted"
    assert executor.run(parse_api(doc)).ok  # a fresh run (new flag) goes through


def test_cache_budget_keeps_run_correct_under_eviction(registry):
    executor = Executor(registry, cache=OutputCache(budget_bytes=200))
    for _ in range(3):
        result = executor.run(parse_api(chain_doc()))
        assert result.outputs == {"3": {"value": [4.0]}}
    assert executor.cache.total <= 200


def test_kept_values_are_returned_even_when_everything_is_cached(registry):
    executor = Executor(registry)
    executor.run(parse_api(chain_doc()))
    result = executor.run(parse_api(chain_doc()), keep=["1"])
    assert result.executed == [] and result.values["1"] == (2,)
