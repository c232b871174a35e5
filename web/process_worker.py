"""Runs queued prompts one at a time in a child process: the default of `main.py serve`.

The server process then only answers requests. With the executor on a thread of the same process,
its Python code (model loading, the sampling loop, event handling) held the GIL against the event
loop, and requests waited: a burst of POST /prompt beside a run took up to ~50 ms each. The child is
the same `PromptRunner` a Ray worker hosts, driven over a pipe; its events and preview frames come
back in batches and go through the same `Dispatcher` code, so clients see no difference.

If the child dies mid-run (killed, out of memory, a crash in native code), its prompt goes back in the
queue until it has been started `max_attempts` times, then fails with the reason; a new child is
started. If the server dies, the child sees its pipe close and exits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

from executor.allocator import keep_freed_memory
from web.dispatch import Dispatcher, Run
from web.runner import Outcome, PromptRunner, WorkerSpec
from web.state import ServerState
from web.store import MAX_ATTEMPTS, PromptRecord

log = logging.getLogger("loom.worker")

RESTART_DELAY_S = (0.5, 30.0)  # first and longest wait before starting a child again after it failed to start
STOP_TIMEOUT_S = 10.0


def child_main(conn: Connection, spec: WorkerSpec) -> None:
    """The child process: a PromptRunner that takes its orders from the server's end of `conn`.

    Orders: ("run", prompt_id, prompt, outputs, extra_data), ("interrupt", prompt_id), ("free", unload, memory),
    ("stop",). Answers: ("ready", info) once, ("batch", prompt_id, items) while a prompt runs (the last
    batch ends with its Outcome), ("held", model names) after a free.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group: the server stops us
    lock = threading.Lock()

    def send(*message: Any) -> None:
        with lock:
            conn.send(message)

    def run(prompt_id: str, *args: Any) -> None:
        for batch in runner.run(prompt_id, *args):
            send("batch", prompt_id, batch)

    runner = PromptRunner(spec)
    if runner.executor.services.devices.device.type == "cpu":
        keep_freed_memory()  # as main.py does for an engine on the CPU: freed model activations stay mapped
    send("ready", runner.ready())
    while True:
        try:
            kind, *args = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if kind == "run":
            threading.Thread(target=run, args=args, name=f"loom-send-{args[0][:8]}", daemon=True).start()
        elif kind == "interrupt":
            runner.interrupt(*args)
        elif kind == "free":
            send("held", runner.free(*args))
        elif kind == "stop":
            return


class Child:
    """One child process and the server's end of its pipe; what it sends arrives in `inbox` (None: it died)."""

    def __init__(self, spec: WorkerSpec, loop: asyncio.AbstractEventLoop) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=child_main, args=(child_end, spec), name="loom-worker", daemon=True)
        self.process.start()
        child_end.close()
        self.inbox: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()
        self._loop = loop
        threading.Thread(target=self._read, name="loom-worker-pipe", daemon=True).start()

    def _read(self) -> None:
        """Unpickles on this thread, so that the event loop only hands the messages on."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = None  # the child has gone
            try:
                self._loop.call_soon_threadsafe(self.inbox.put_nowait, message)
            except RuntimeError:  # the server's loop has closed (it is shutting down): no one to tell
                return
            if message is None:
                return

    def send(self, *message: Any) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):  # it died: the reader reports that
            pass

    async def close(self) -> None:
        self.send("stop")
        await asyncio.to_thread(self.process.join, STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, STOP_TIMEOUT_S)
        self.conn.close()


class ProcessWorker(Dispatcher):
    def __init__(self, state: ServerState, spec: WorkerSpec, max_attempts: int = MAX_ATTEMPTS) -> None:
        super().__init__(state)
        self.spec = spec
        self.max_attempts = max_attempts
        self.child: Child | None = None
        self.current: Run | None = None
        self.info: dict[str, Any] = {}  # the child's pid, device and loaded models, from its answers
        self.prompts_run = 0
        self.deaths = 0
        self._task: asyncio.Task[None] | None = None
        self._starting: Child | None = None  # the latest child started (it may still be loading)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def interrupt(self, prompt_id: str | None = None) -> bool:
        run = self.current
        if run is None or self.child is None or prompt_id not in (None, run.record.id):
            return False
        self.child.send("interrupt", run.record.id)
        return True

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if self.child is not None:
            self.child.send("free", unload_models, free_memory)

    def describe(self) -> list[dict[str, Any]]:
        run = self.current
        state = "busy" if run else "idle" if self.info else "starting"
        return [{"name": "local", "state": state, "prompt_id": run.record.id if run else None,
                 "pid": self.info.get("pid"), "node": self.info.get("node", "local"),
                 "device": self.info.get("device", ""), "held_models": sorted(self.info.get("held", [])),
                 "prompts": self.prompts_run, "deaths": self.deaths}]

    async def stop(self) -> None:
        self._stopping = True
        self.interrupt(None)
        self._wake.set()  # an idle loop sees _stopping and ends
        if self._task is not None:
            try:  # an interrupted run ends soon and is put back in the queue (Dispatcher.finish)
                await asyncio.wait_for(asyncio.shield(self._task), timeout=STOP_TIMEOUT_S)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        for child in {self.child, self._starting} - {None}:
            await child.close()

    # -- running prompts -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        db = self.state.db
        delay = RESTART_DELAY_S[0]
        while not self._stopping:
            if self.child is not None and not self.child.process.is_alive():  # died while idle
                log.warning("the worker process (pid %s) exited while idle; starting another", self.info.get("pid"))
                self.child, self.info = None, {}
                self.deaths += 1
            if self.child is None:
                if not await self._start_child():
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, RESTART_DELAY_S[1])
                    continue
                delay = RESTART_DELAY_S[0]
            self._wake.clear()
            record = await db.call(db.store.claim_next)
            if record is None:
                await self._wake.wait()
                continue
            await self._run(record)

    async def _start_child(self) -> bool:
        """Start a child and wait until it has loaded the engine (the prompts wait in the queue meanwhile)."""
        child = self._starting = Child(self.spec, asyncio.get_running_loop())
        while (message := await child.inbox.get()) is not None:
            if message[0] == "ready":
                self.child, self.info = child, message[1]
                log.info("worker process %s ready on %s", self.info["pid"], self.info["device"])
                return True
        log.error("the worker process exited while starting (exit code %s); starting another",
                  child.process.exitcode)
        return False

    async def _run(self, record: PromptRecord) -> None:
        child = self.child
        assert child is not None
        run = self.current = self.begin(record)
        child.send("run", record.id, record.prompt, record.outputs_to_execute, record.extra_data)
        outcome: Outcome | None = None
        try:
            while outcome is None:
                message = await child.inbox.get()
                if message is None:
                    await self._lost(run)
                    return
                if message[0] == "held":
                    self.info["held"] = message[1]
                    continue
                for item in message[2]:
                    if isinstance(item, Outcome):
                        outcome = item
                    else:
                        self.deliver(run, item)
        except asyncio.CancelledError:
            self.current = None
            await self.put_back(run)
            raise
        self.current = None
        self.prompts_run += 1
        self.info["held"] = sorted(outcome.held)
        await self.finish(run, outcome.result, outcome.problem)

    async def _lost(self, run: Run) -> None:
        """The child died during the run: it is replaced, and the prompt put back or failed (Dispatcher)."""
        reason = f"the worker process (pid {self.info.get('pid')}) died while running this prompt"
        self.current, self.child, self.info = None, None, {}
        self.deaths += 1
        await self.worker_died(run, reason, self.max_attempts)
