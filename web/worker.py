"""Runs queued prompts one at a time on a worker thread and turns the executor's events into messages."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from executor import events as ev
from executor.cache import OutputCache
from executor.executor import Executor, RunResult
from executor.services import Services
from graph.document import DocumentError
from graph.errors import error_response
from graph.load import graph_from_data
from graph.validate import validate
from web.previews import Throttle, encode_preview
from web.state import ServerState
from web.store import PromptRecord

log = logging.getLogger("loom.web")

# Events kept in a history entry's `status.messages`, as ComfyUI keeps them.
_RECORDED = {"execution_start", "execution_cached", "execution_success", "execution_error",
             "execution_interrupted"}


class _Run:
    """One prompt in flight: its record, the messages for history, and its preview throttle."""

    def __init__(self, record: PromptRecord, interval: float) -> None:
        self.record = record
        self.messages: list[Any] = list(record.messages)
        self.throttle = Throttle(interval)


class Worker:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.executor = Executor(state.registry, services=Services.create(state.paths))
        self.current: _Run | None = None
        self._interrupt = threading.Event()
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-worker")
        self._waiters: dict[str, list[asyncio.Future[PromptRecord | None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._outbox: deque[tuple[_Run, ev.Event | bytes]] = deque()
        self._drain_scheduled = False
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def wake(self) -> None:
        self._wake.set()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Stop the running prompt (only if it is `prompt_id`, when given); False if nothing matched."""
        run = self.current
        if run is None or (prompt_id is not None and run.record.id != prompt_id):
            return False
        self._interrupt.set()
        return True

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's POST /free: drop loaded models and/or cached node outputs (used by the next prompt)."""
        if unload_models:
            self.executor.services.models.clear()
            self.executor.services.devices.free()  # off the GPU now, not when the last reference goes
        if free_memory:
            self.executor.cache = OutputCache()

    def wait_for(self, prompt_id: str) -> asyncio.Future[PromptRecord | None]:
        future: asyncio.Future[PromptRecord | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(prompt_id, []).append(future)
        return future

    def cancel_waiters(self, prompt_id: str, record: PromptRecord | None) -> None:
        """Answer those waiting for a prompt: its finished record, or None when it was deleted."""
        for future in self._waiters.pop(prompt_id, []):
            if not future.done():
                future.set_result(record)

    async def stop(self) -> None:
        """Clean shutdown: interrupt the running prompt and put it back in the queue."""
        self._stopping = True
        self._interrupt.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=10)
            except (asyncio.CancelledError, TimeoutError):
                pass
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        db = self.state.db
        while not self._stopping:
            self._wake.clear()
            record = await db.call(db.store.claim_next)
            if record is None:
                await self._wake.wait()
                continue
            await self._run(record)

    async def _run(self, record: PromptRecord) -> None:
        run = _Run(record, self.state.config.preview_interval_s)
        self.current = run
        self._interrupt.clear()
        loop = asyncio.get_running_loop()
        self.state.queue_changed()
        result: RunResult | None = None
        problem: dict[str, Any] | None = None
        try:
            checked = validate(graph_from_data(record.prompt, self.state.registry), self.state.registry,
                               record.outputs_to_execute or None)
            if checked.ok:
                job = self._thread.submit(self.executor.run, checked, prompt_id=record.id,
                                          on_event=lambda e: self._on_event(loop, run, e),
                                          interrupt=self._interrupt, extra=record.extra_data)
                result = await asyncio.wrap_future(job)
            else:
                problem = error_response(checked.problems)["error"]
        except DocumentError as exc:
            problem = {"type": "invalid_prompt", "message": str(exc)}
        except asyncio.CancelledError:
            await self._requeue(run)
            raise
        except Exception as exc:  # a bug must end this prompt, never the worker
            log.exception("prompt %s could not be run", record.id)
            problem = {"type": "server_error", "message": f"{type(exc).__name__}: {exc}"}
        await self._finish(run, result, problem)

    def _on_event(self, loop: asyncio.AbstractEventLoop, run: _Run, event: ev.Event) -> None:
        """Called on the worker thread: previews are encoded here, everything else hops to the loop.

        Events wait in a queue drained by one loop callback, so that a run of quick nodes wakes the
        event loop once per batch rather than once per event (each wake-up contends for the GIL).
        """
        if isinstance(event, ev.Progress) and event.preview is not None and run.throttle.ready():
            frame = encode_preview(event.preview)
            if frame is not None:
                self._outbox.append((run, frame))
        self._outbox.append((run, event))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        while self._outbox:
            run, item = self._outbox.popleft()
            if isinstance(item, bytes):
                self.state.hub.send_bytes(item, run.record.client_id)
            else:
                self._emit(run, item)

    def _emit(self, run: _Run, event: ev.Event) -> None:
        data = event.data()
        if isinstance(event, ev.Executed):
            data = {"node": event.node, "display_node": event.node, "output": event.output or {},
                    "prompt_id": event.prompt_id}
        elif isinstance(event, ev.Executing):
            data = {"node": event.node, "display_node": event.node, "prompt_id": event.prompt_id}
        if event.kind in _RECORDED:
            run.messages.append([event.kind, {**data, "timestamp": int(time.time() * 1000)}])
        self.state.hub.send(event.kind, data, run.record.client_id)

    async def _requeue(self, run: _Run) -> None:
        db = self.state.db
        await db.call(db.store.requeue, run.record.id)
        self.current = None

    async def _finish(self, run: _Run, result: RunResult | None, problem: dict[str, Any] | None) -> None:
        record, db, hub = run.record, self.state.db, self.state.hub
        if self._stopping and result is not None and result.status == "interrupted":
            await self._requeue(run)
            return
        if result is None:
            # The prompt validated when queued but no longer does (e.g. a model file was removed).
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
        self.current = None
        finished = await db.call(db.store.get, record.id)
        self.cancel_waiters(record.id, finished)
        self.state.queue_changed()
