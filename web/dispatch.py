"""What every way of running queued prompts shares: waiters, events turned into messages, finishing a run.

The thread worker (web.worker), the process worker (web.process_worker) and the Ray pool
(web.ray_pool) differ only in where the executor runs. Each hands every executor event (or encoded
preview frame) to `Dispatcher.deliver` and ends each run with `Dispatcher.finish`, so the websocket
messages and the history entries are made in one place and a client cannot tell them apart.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from typing import Any

from executor import events as ev
from executor.executor import RunResult
from graph.document import DocumentError
from graph.load import graph_from_data
from graph.validate import ValidatedWorkflow, validate
from nodes.registry import NodeRegistry
from web.previews import Throttle
from web.state import ServerState
from web.store import PromptRecord

log = logging.getLogger("loom.web")

# Events kept in a history entry's `status.messages`, as ComfyUI keeps them.
RECORDED = {"execution_start", "execution_cached", "execution_success", "execution_error", "execution_interrupted"}


class StartError(RuntimeError):
    """The dispatcher could not start (e.g. no Ray cluster answers at the address given)."""


class Run:
    """One prompt in flight: its record, the messages for history, and its preview throttle."""

    def __init__(self, record: PromptRecord, interval: float) -> None:
        self.record = record
        self.messages: list[Any] = list(record.messages)
        self.throttle = Throttle(interval)


def prepare(prompt: dict[str, Any], outputs: list[str], registry: NodeRegistry
            ) -> tuple[ValidatedWorkflow | None, dict[str, Any] | None]:
    """Validate a stored prompt again where it runs: the workflow, or the problem that stops it.

    It validated when queued, but a model file may have gone since, or a worker may lack a plugin.
    """
    try:
        checked = validate(graph_from_data(prompt, registry), registry, outputs or None)
    except DocumentError as exc:
        return None, {"type": "invalid_prompt", "message": str(exc)}
    if not checked.ok:
        return None, checked.error_response()["error"]
    return checked, None


def message(event: ev.Event) -> tuple[str, dict[str, Any]]:
    """The websocket message `(type, data)` of an executor event, shaped as ComfyUI sends it."""
    if isinstance(event, ev.Executed):
        return event.kind, {"node": event.node, "display_node": event.node, "output": event.output or {},
                            "prompt_id": event.prompt_id}
    if isinstance(event, ev.Executing):
        return event.kind, {"node": event.node, "display_node": event.node, "prompt_id": event.prompt_id}
    return event.kind, event.data()


class Dispatcher(abc.ABC):
    """Takes prompts from the store, runs them somewhere, and reports them; what the routes call."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._waiters: dict[str, list[asyncio.Future[PromptRecord | None]]] = {}
        self._stopping = False
        self._wake = asyncio.Event()

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin taking prompts from the queue (called once the app starts)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Clean shutdown: interrupt the running prompts and put them back in the queue."""

    def wake(self) -> None:
        """A prompt was queued: look at the queue again (the dispatching loop waits on `_wake` when idle)."""
        self._wake.set()

    @abc.abstractmethod
    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop the running prompt `prompt_id` (every running prompt when None); False if nothing matched."""

    @abc.abstractmethod
    def free(self, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's POST /free: drop loaded models and/or cached node outputs."""

    @abc.abstractmethod
    def describe(self) -> list[dict[str, Any]]:
        """The workers for GET /workers: name, state, running prompt, loaded models, prompts run."""

    def wait_for(self, prompt_id: str) -> asyncio.Future[PromptRecord | None]:
        future: asyncio.Future[PromptRecord | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(prompt_id, []).append(future)
        return future

    def cancel_waiters(self, prompt_id: str, record: PromptRecord | None) -> None:
        """Answer those waiting for a prompt: its finished record, or None when it was deleted."""
        for future in self._waiters.pop(prompt_id, []):
            if not future.done():
                future.set_result(record)

    def begin(self, record: PromptRecord) -> Run:
        """A claimed prompt is about to run."""
        run = Run(record, self.state.config.preview_interval_s)
        self.state.queue_changed()
        return run

    def deliver(self, run: Run, item: ev.Event | bytes) -> None:
        """Forward one event (or a binary preview frame) to the client that queued the prompt."""
        if isinstance(item, bytes):
            self.state.hub.send_bytes(item, run.record.client_id)
            return
        kind, data = message(item)
        if kind in RECORDED:
            run.messages.append([kind, {**data, "timestamp": int(time.time() * 1000)}])
        self.state.hub.send(kind, data, run.record.client_id)

    async def put_back(self, run: Run) -> None:
        """Return a prompt stopped by a clean shutdown to the queue, not counting that attempt."""
        db = self.state.db
        await db.call(db.store.requeue, run.record.id)

    async def worker_died(self, run: Run, reason: str, max_attempts: int) -> None:
        """The worker running `run` died: put the prompt back in the queue, or fail it with `reason` once it
        has been started `max_attempts` times."""
        record, db = run.record, self.state.db
        log.warning("%s: %s (attempt %d of %d)", record.id, reason, record.attempts, max_attempts)
        if record.attempts >= max_attempts:
            message = f"{reason} (started {record.attempts} times); not run again"
            await self.finish(run, None, {"type": "WorkerDied", "message": message})
        else:
            await db.call(db.store.retry, record.id, reason)
            self.state.queue_changed()

    async def finish(self, run: Run, result: RunResult | None, problem: dict[str, Any] | None) -> None:
        """Store the run in the history, tell the client, answer the waiters."""
        record, db, hub = run.record, self.state.db, self.state.hub
        if self._stopping and result is not None and result.status == "interrupted":
            await self.put_back(run)
            return
        if result is None:
            # The prompt validated when queued but no longer does (e.g. a model file was removed), or it
            # could not be run at all (its worker died too often).
            problem = problem or {"type": "server_error", "message": "the prompt did not run"}
            status, outputs = "error", {}
            data = {"prompt_id": record.id, "node_id": None, "node_type": None, "executed": [],
                    "exception_message": problem["message"], "exception_type": problem["type"], "traceback": []}
            error = {**data, "details": problem.get("details", "")}
            run.messages.append(["execution_error", {**data, "timestamp": int(time.time() * 1000)}])
            hub.send("execution_error", data, record.client_id)
        else:
            status, outputs = result.status, result.outputs
            error = result.error.data() if result.error is not None else None
        await db.call(db.store.finish, record.id, status, outputs, run.messages, error)
        # Sent once the history holds the run: clients fetch /history/{id} when they see it.
        hub.send("executing", {"node": None, "display_node": None, "prompt_id": record.id}, record.client_id)
        finished = await db.call(db.store.get, record.id)
        self.cancel_waiters(record.id, finished)
        self.state.queue_changed()
