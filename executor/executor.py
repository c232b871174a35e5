"""Runs a validated workflow: keys every node, skips what the cache holds, runs the rest in order."""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from executor import events as ev
from executor.cache import OutputCache, node_key
from executor.lists import calls_for, merge_outputs, merge_ui
from graph.document import Graph, Link
from graph.errors import Problem
from graph.validate import ValidatedWorkflow, validate
from nodes.context import Interrupted, NodeContext
from nodes.node import Node, NodeResult
from nodes.registry import NodeRegistry

EventHandler = Callable[[ev.Event], None]


class WorkflowInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("workflow failed validation:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class NodeOutputError(Exception):
    """A node returned something other than what it declares."""


class OutOfMemory(RuntimeError):
    """A node ran out of (GPU) memory again after the engine freed what it could and retried it."""


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # output node id -> UI data
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # outputs of the nodes asked to keep
    error: ev.ExecutionError | ev.ExecutionInterrupted | None = None
    duration_s: float = 0.0
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"


@dataclass
class _Plan:
    keys: dict[str, str]
    run: list[str]  # nodes to execute, in order
    cached: list[str]  # nodes whose outputs come from the cache
    values: dict[str, tuple[Any, ...]]
    ui: dict[str, dict[str, Any]]


@dataclass
class _Run:
    """One run in progress: what the nodes so far produced, and where its events go."""

    wf: ValidatedWorkflow
    keys: dict[str, str]
    values: dict[str, tuple[Any, ...]]
    ui: dict[str, dict[str, Any]]
    prompt_id: str
    emit: EventHandler
    stop: threading.Event
    extra: dict[str, Any]
    result: RunResult
    current: str | None = None


def _normalise(cls: type[Node], result: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    if isinstance(result, NodeResult):
        outputs, ui = tuple(result.outputs), result.ui
    elif isinstance(result, dict) and ("ui" in result or "result" in result):
        outputs, ui = tuple(result.get("result") or ()), result.get("ui")
    elif result is None:
        outputs, ui = (), None
    elif isinstance(result, tuple | list):
        outputs, ui = tuple(result), None
    else:
        raise NodeOutputError(f"{cls.name}.execute returned {type(result).__name__}; expected a tuple")
    if len(outputs) != len(cls.outputs):
        raise NodeOutputError(f"{cls.name} returned {len(outputs)} outputs but declares {len(cls.outputs)}")
    return outputs, ui


class Executor:
    """One engine for the CLI, the server, the Python API and the tests."""

    def __init__(self, registry: NodeRegistry, cache: OutputCache | None = None, services: Any = None) -> None:
        self.registry = registry
        self.cache = cache if cache is not None else OutputCache()
        self.services = services
        self._lock = threading.Lock()

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's POST /free: drop loaded models (and take them off the GPU now, not when the last
        reference goes) and/or the cached node outputs; the next run loads and computes afresh."""
        if unload_models and self.services is not None:
            self.services.models.clear()
            self.services.devices.free()
        if free_memory:
            self.cache = OutputCache(self.cache.budget)

    def prepare(self, workflow: ValidatedWorkflow | Graph, outputs: list[str] | None = None) -> ValidatedWorkflow:
        if isinstance(workflow, Graph):
            workflow = validate(workflow, self.registry, outputs)
        if not workflow.ok:
            raise WorkflowInvalid(workflow.problems)
        return workflow

    def _plan(self, wf: ValidatedWorkflow, run_nonce: str, keep: Iterable[str] = ()) -> _Plan:
        keys: dict[str, str] = {}
        nodes = wf.graph.nodes
        for nid in wf.order:
            node = nodes[nid]
            cls = self.registry.get(node.class_type)
            assert cls is not None
            constants = wf.values[nid]
            if not cls.cacheable:
                keys[nid] = f"{run_nonce}:{nid}"
                continue
            inputs = {k: (keys[v.node], v.output) for k, v in node.inputs.items() if isinstance(v, Link)}
            keys[nid] = node_key(cls.name, cls.version, constants, cls.fingerprint(constants), inputs)

        values: dict[str, tuple[Any, ...]] = {}
        ui: dict[str, dict[str, Any]] = {}
        wanted = set(wf.outputs) | {nid for nid in keep if nid in keys}  # kept values must be at hand
        run = self._to_run(wf, keys, wanted, values, ui)
        # Everything the outputs need that does not run is served by the cache, directly or through a
        # cached descendant; the editor marks all of these as cached, as ComfyUI's clients expect. A branch
        # behind a lazy input is neither: it runs, or is served, only if its node asks for it.
        will_run = set(run)
        reached, stack = set(wanted), list(wanted)
        while stack:
            nid = stack.pop()
            for source in self._sources(wf, nid, skip_lazy=nid in will_run):
                if source not in reached:
                    reached.add(source)
                    stack.append(source)
        cached = [nid for nid in wf.order if nid in reached and nid not in will_run]
        return _Plan(keys, run, cached, values, ui)

    def _sources(self, wf: ValidatedWorkflow, nid: str, skip_lazy: bool) -> list[str]:
        """The nodes linked into `nid`'s inputs; with `skip_lazy`, not those behind its lazy inputs."""
        node = wf.graph.nodes[nid]
        specs = self.registry.get(node.class_type).inputs
        return [v.node for k, v in node.inputs.items()
                if isinstance(v, Link) and not (skip_lazy and k in specs and specs[k].lazy)]

    def _to_run(self, wf: ValidatedWorkflow, keys: dict[str, str], wanted: set[str],
                values: dict[str, tuple[Any, ...]], ui: dict[str, dict[str, Any]]) -> list[str]:
        """The nodes to execute, in order, for the outputs of `wanted`: what `values` and the cache lack, and what
        those need. Cache hits go into `values` (held for the run even if the cache evicts them) and `ui`."""
        needed = {nid for nid in wanted if nid not in values}
        run: list[str] = []
        for nid in reversed(wf.order):
            if nid not in needed:
                continue
            entry = self.cache.get(keys[nid])
            if entry is not None:
                values[nid] = entry.outputs
                if entry.ui:
                    ui[nid] = entry.ui
                continue
            run.append(nid)
            needed.update(s for s in self._sources(wf, nid, skip_lazy=True) if s not in values)
        run.reverse()
        return run

    def run(
        self,
        workflow: ValidatedWorkflow | Graph,
        *,
        prompt_id: str | None = None,
        on_event: EventHandler | None = None,
        interrupt: threading.Event | None = None,
        outputs: list[str] | None = None,
        keep: Iterable[str] = (),
        extra: dict[str, Any] | None = None,
    ) -> RunResult:
        """Run a workflow; raises WorkflowInvalid before anything runs if it does not validate.

        Node failures and interrupts do not raise: they end the run and are reported in the
        result and the events. Only successfully finished nodes enter the cache.
        """
        wf = self.prepare(workflow, outputs)
        prompt_id = prompt_id or uuid.uuid4().hex
        # Nodes may read the workflow they run in (ComfyUI's hidden PROMPT input, PNG metadata).
        extra = {"prompt": wf.graph.to_api(), **(extra or {})}
        emit: EventHandler = on_event or (lambda e: None)
        stop = interrupt or threading.Event()
        started = time.perf_counter()
        with self._lock:
            keep = list(keep)
            plan = self._plan(wf, uuid.uuid4().hex, keep)
            result = RunResult(prompt_id, "success", cached=plan.cached, keys=plan.keys)
            emit(ev.ExecutionStart(prompt_id))
            emit(ev.ExecutionCached(prompt_id, list(plan.cached)))
            for nid in plan.cached:
                if nid in plan.ui:
                    node = wf.graph.nodes[nid]
                    emit(ev.Executed(prompt_id, nid, node.class_type, plan.ui[nid], cached=True))
            state = _Run(wf, plan.keys, plan.values, plan.ui, prompt_id, emit, stop, extra, result)
            try:
                self._execute(state, plan.run)
            except Interrupted:
                current = state.current
                node_type = wf.graph.nodes[current].class_type if current else ""
                result.status = "interrupted"
                result.error = ev.ExecutionInterrupted(prompt_id, current, node_type, list(result.executed))
                emit(result.error)
            except Exception as exc:  # a node's failure ends the run, never the engine
                current = state.current
                node_type = wf.graph.nodes[current].class_type if current else ""
                result.status = "error"
                result.error = ev.ExecutionError(
                    prompt_id, current or "", node_type, type(exc).__name__, str(exc),
                    traceback.format_exception(exc), list(result.executed),
                )
                emit(result.error)
            values, ui = state.values, state.ui
            result.outputs = {nid: ui[nid] for nid in wf.outputs if nid in ui}
            result.values = {nid: values[nid] for nid in (*wf.outputs, *keep) if nid in values}
            result.duration_s = time.perf_counter() - started
            if result.ok:
                emit(ev.ExecutionSuccess(prompt_id, result.duration_s, list(result.executed), list(plan.cached)))
            return result

    def _execute(self, state: _Run, nids: list[str]) -> None:
        """Run `nids` in order; a node with lazy inputs first has the sources it asks for run (or served)."""
        for nid in nids:
            state.current = nid
            if state.stop.is_set():
                raise Interrupted("interrupted between nodes")
            cls = self.registry.get(state.wf.graph.nodes[nid].class_type)
            if any(spec.lazy for spec in cls.inputs.values()):
                self._resolve_lazy(state, nid, cls)
                state.current = nid
            self._run_node_retrying(state, nid)
            state.result.executed.append(nid)

    def _resolve_lazy(self, state: _Run, nid: str, cls: type[Node]) -> None:
        """Ask the node which lazy inputs it needs (ComfyUI's check_lazy_status) and run their sources, until it asks
        for nothing more. A lazy input whose source the cache holds is at hand without asking, as in ComfyUI."""
        lazy = {k: v for k, v in state.wf.graph.nodes[nid].inputs.items()
                if isinstance(v, Link) and k in cls.inputs and cls.inputs[k].lazy}
        self._serve_cached(state, {link.node for link in lazy.values()})
        instance = self._instance(state, nid, cls)
        while True:
            calls, _ = calls_for(self._inputs(state, nid), cls.input_is_list)
            asked = {name for call in calls for name in (instance.check_lazy_status(**call) or ())}
            missing = {lazy[name].node for name in asked if name in lazy and lazy[name].node not in state.values}
            if not missing:
                return
            before = set(state.values)
            self._execute(state, self._to_run(state.wf, state.keys, missing, state.values, state.ui))
            self._report_cached(state, set(state.values) - before - set(state.result.executed))

    def _serve_cached(self, state: _Run, nids: set[str]) -> None:
        """Take the outputs of `nids` from the cache where it holds them."""
        served = []
        for nid in nids - set(state.values):
            entry = self.cache.get(state.keys[nid])
            if entry is not None:
                state.values[nid] = entry.outputs
                served.append(nid)
        self._report_cached(state, set(served))

    def _report_cached(self, state: _Run, nids: set[str]) -> None:
        """Tell the clients about nodes a lazy input had served from the cache while the run went on."""
        fresh = [nid for nid in state.wf.order if nid in nids and nid not in state.result.cached]
        if fresh:
            state.result.cached.extend(fresh)
            state.emit(ev.ExecutionCached(state.prompt_id, fresh))

    def _inputs(self, state: _Run, nid: str) -> dict[str, Any]:
        """The node's keyword arguments: its constants and the values of its links (None for a lazy input's source
        that has not run)."""
        node = state.wf.graph.nodes[nid]
        kwargs = dict(state.wf.values[nid])
        for name, value in node.inputs.items():
            if isinstance(value, Link):
                source = state.values.get(value.node)
                kwargs[name] = None if source is None else source[value.output]
        return kwargs

    def _instance(self, state: _Run, nid: str, cls: type[Node]) -> Node:
        def report(value: int, total: int, preview: Any = None) -> None:
            state.emit(ev.Progress(state.prompt_id, nid, value, total, preview))

        instance = cls()
        instance.ctx = NodeContext(nid, state.prompt_id, self.services, report, state.stop.is_set, state.extra)
        return instance

    def _run_node_retrying(self, state: _Run, nid: str) -> None:
        """Run a node; after an out-of-memory error, let the services free memory and run it once more.

        A second out-of-memory error fails the run with a message saying what to try; the memory is
        freed again either way, so the engine goes on serving the next prompt.
        """
        recover = getattr(self.services, "recover_from_oom", None)
        for attempt in (1, 2):
            try:
                self._run_node(state, nid)
                return
            except Interrupted:
                raise
            except Exception as exc:
                if recover is None or not recover(exc):
                    raise
                if attempt == 2:
                    node_type = state.wf.graph.nodes[nid].class_type
                    raise OutOfMemory(
                        f"{node_type} (node {nid}) ran out of memory twice, the second time after every model was "
                        f"moved off the device: {exc}. Try a smaller image or batch, the tiled VAE nodes, or --lowvram."
                    ) from exc

    def _run_node(self, state: _Run, nid: str) -> None:
        node = state.wf.graph.nodes[nid]
        cls = self.registry.get(node.class_type)
        assert cls is not None
        kwargs = self._inputs(state, nid)
        state.emit(ev.Executing(state.prompt_id, nid, node.class_type))
        instance = self._instance(state, nid, cls)
        began = time.perf_counter()
        # One call, or one per item when a linked output carries a list (ComfyUI's list semantics).
        calls, per_item = calls_for(kwargs, cls.input_is_list)
        results, uis = [], []
        for call in calls:
            if state.stop.is_set():
                raise Interrupted(f"interrupted in node {nid}")
            call_outputs, call_ui = _normalise(cls, instance.execute(**call))
            results.append(call_outputs)
            uis.append(call_ui)
        outputs, node_ui = merge_outputs(cls.outputs, results, per_item), merge_ui(uis)
        state.values[nid] = outputs
        if node_ui:
            state.ui[nid] = node_ui
        if cls.cacheable:
            self.cache.put(state.keys[nid], outputs, node_ui)
        if node_ui or cls.output_node:
            state.emit(ev.Executed(state.prompt_id, nid, node.class_type, node_ui or {},
                                   duration_s=time.perf_counter() - began))
