"""Runs queued prompts one at a time on a thread of the server process (`main.py serve --workers thread`)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from executor import events as ev
from executor.executor import Executor, RunResult
from executor.services import Services
from web.affinity import held_models
from web.dispatch import Dispatcher, Run, prepare
from web.previews import PreviewEncoder
from web.state import ServerState
from web.store import PromptRecord

log = logging.getLogger("loom.web")


class Worker(Dispatcher):
    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.executor = Executor(state.registry, services=Services.create(state.paths))
        self.current: Run | None = None
        self.prompts_run = 0
        self._interrupt = threading.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-worker")
        self._task: asyncio.Task[None] | None = None
        self._outbox: deque[tuple[Run, ev.Event | bytes]] = deque()
        self._drain_scheduled = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def interrupt(self, prompt_id: str | None = None) -> bool:
        run = self.current
        if run is None or (prompt_id is not None and run.record.id != prompt_id):
            return False
        self._interrupt.set()
        return True

    def free(self, unload_models: bool, free_memory: bool) -> None:
        self.executor.free(unload_models, free_memory)

    def describe(self) -> list[dict[str, Any]]:
        run = self.current
        return [{"name": "local", "state": "busy" if run else "idle", "prompt_id": run.record.id if run else None,
                 "pid": os.getpid(), "node": "local",
                 "held_models": sorted(held_models(self.executor.services.models, self.state.paths)),
                 "prompts": self.prompts_run, "deaths": 0}]

    async def stop(self) -> None:
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
        run = self.begin(record)
        self.current = run
        self._interrupt.clear()
        loop = asyncio.get_running_loop()
        result: RunResult | None = None
        problem: dict[str, Any] | None = None
        try:
            checked, problem = prepare(record.prompt, record.outputs_to_execute, self.state.registry)
            if checked is not None:
                previews = PreviewEncoder(lambda frame: self._post(loop, run, frame))

                def execute() -> RunResult:
                    try:
                        return self.executor.run(checked, prompt_id=record.id,
                                                 on_event=lambda e: self._on_event(loop, run, e, previews),
                                                 interrupt=self._interrupt, extra=record.extra_data)
                    finally:
                        previews.close()  # the run's last frames go before its end

                result = await asyncio.wrap_future(self._thread.submit(execute))
        except asyncio.CancelledError:
            self.current = None
            await self.put_back(run)
            raise
        except Exception as exc:  # a bug must end this prompt, never the worker
            log.exception("prompt %s could not be run", record.id)
            problem = {"type": "server_error", "message": f"{type(exc).__name__}: {exc}"}
        self.current = None
        self.prompts_run += 1
        await self.finish(run, result, problem)

    def _on_event(self, loop: asyncio.AbstractEventLoop, run: Run, event: ev.Event, previews: PreviewEncoder) -> None:
        """Called on the worker thread: previews go to their encoder's thread, events hop to the loop."""
        if isinstance(event, ev.Progress) and event.preview is not None and run.throttle.ready():
            previews.submit(event.preview)
        self._post(loop, run, event)

    def _post(self, loop: asyncio.AbstractEventLoop, run: Run, item: ev.Event | bytes) -> None:
        """Queue an event or preview frame for the loop (from any thread).

        Items wait in a queue drained by one loop callback, so that a run of quick nodes wakes the
        event loop once per batch rather than once per event (each wake-up contends for the GIL).
        """
        self._outbox.append((run, item))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        while self._outbox:
            run, item = self._outbox.popleft()
            self.deliver(run, item)
