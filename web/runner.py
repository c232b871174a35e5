"""The body of one worker process: the same executor as the server's thread worker, on the device it was given.

A plain class: web.ray_pool wraps it as a Ray actor, web.process_worker drives it in a child process.
`run` is a generator: Ray streams each yielded batch of events back to the server as it is made,
and the last batch ends with the run's `Outcome`.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from executor import events as ev
from executor.devices import EngineOptions, set_default_options
from executor.executor import Executor, RunResult
from executor.services import Services
from nodes.folders import FolderPaths, set_paths
from nodes.registry import NodeRegistry
from web.affinity import held_models
from web.dispatch import prepare
from web.previews import PreviewEncoder, Throttle

log = logging.getLogger("loom.worker")

# Longest an event waits on the worker for others to travel with it (progress reaches clients this late at most).
BATCH_S = 0.1


@dataclass
class Outcome:
    """How a run ended, and what the worker holds loaded after it (for the pool's cache affinity)."""

    result: RunResult | None
    problem: dict[str, Any] | None
    held: frozenset[str] = field(default_factory=frozenset)


@dataclass
class WorkerSpec:
    """What a worker needs to build the same engine as the server: its folders and node types.

    `registry` must be picklable by reference (a module-level function, or a functools.partial of
    one) and importable on every machine: the node types of plugins are loaded there again.
    """

    paths: FolderPaths
    registry: Callable[[], NodeRegistry]
    threads: int | None = 1  # torch's CPU threads; None leaves torch's default (all cores)
    preview_interval_s: float = 0.25
    options: EngineOptions | None = None  # the device options of the command line (--lowvram, ...)


def _slim(result: RunResult) -> RunResult:
    """The result without the node values (tensors, models) that the server has no use for."""
    return replace(result, values={}, keys={})


class PromptRunner:
    """Runs one prompt at a time; `interrupt`, `free` and `ready` answer while it runs (a threaded actor)."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        if spec.threads is not None:
            torch.set_num_threads(max(1, spec.threads))
        if spec.options is not None:
            set_default_options(spec.options)
        set_paths(spec.paths)
        self.spec = spec
        self.registry = spec.registry()
        self.executor = Executor(self.registry, services=Services.create(spec.paths, options=spec.options))
        self._interrupt = threading.Event()
        self._lock = threading.Lock()
        self._running: str | None = None
        self._stop_ids: set[str] = set()

    def ready(self) -> dict[str, Any]:
        """Who and where this worker is (a restarted worker answers with its new pid)."""
        device = self.executor.services.devices.device
        name = str(device)
        if device.type == "cuda":
            import torch

            name = f"{name} ({torch.cuda.get_device_name(device)})"
        return {"pid": os.getpid(), "node": socket.gethostname(), "device": name, "held": sorted(self._held())}

    def _held(self) -> frozenset[str]:
        return held_models(self.executor.services.models, self.spec.paths)

    def interrupt(self, prompt_id: str) -> bool:
        """Stop `prompt_id`, now if it runs, or as soon as it starts (the request may overtake the prompt)."""
        with self._lock:
            self._stop_ids.add(prompt_id)
            if self._running == prompt_id:
                self._interrupt.set()
                return True
        return False

    def free(self, unload_models: bool, free_memory: bool) -> list[str]:
        self.executor.free(unload_models, free_memory)
        return sorted(self._held())

    def run(self, prompt_id: str, prompt: dict[str, Any], outputs: list[str],
            extra_data: dict[str, Any]) -> Iterator[list[Any]]:
        """Run a prompt, yielding batches of events and preview frames (bytes); the last ends with an Outcome.

        The executor runs on its own thread; this generator gathers what it makes for up to `BATCH_S`
        after the first event of a batch, so that Ray's per-item cost (on the worker, the server and
        Ray's own daemons, all sharing the machine's cores) is paid a few times per prompt rather
        than once per sampling step; the run's end is sent at once.
        """
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        throttle = Throttle(self.spec.preview_interval_s)
        with self._lock:
            self._running = prompt_id
            self._interrupt.clear()
            if prompt_id in self._stop_ids:
                self._interrupt.set()
            self._stop_ids.clear()  # others are late requests for prompts that have ended here

        previews = PreviewEncoder(items.put)

        def on_event(event: ev.Event) -> None:
            if isinstance(event, ev.Progress) and event.preview is not None:
                if throttle.ready():
                    previews.submit(event.preview)
                event = replace(event, preview=None)
            items.put(event)

        def work() -> None:
            try:
                outcome = self._execute(prompt_id, prompt, outputs, extra_data, on_event)
            except BaseException as exc:  # a bug must end this prompt, never the worker
                log.exception("prompt %s could not be run", prompt_id)
                outcome = Outcome(None, {"type": "server_error", "message": f"{type(exc).__name__}: {exc}"})
            previews.close()  # the run's last frames go before its end
            items.put(outcome)

        threading.Thread(target=work, name=f"loom-run-{prompt_id[:8]}", daemon=True).start()
        while True:
            batch = [items.get()]
            flush_at = time.monotonic() + BATCH_S
            while not isinstance(batch[-1], Outcome) and (wait := flush_at - time.monotonic()) > 0:
                try:
                    batch.append(items.get(timeout=wait))
                except queue.Empty:
                    break
            if isinstance(batch[-1], Outcome):
                with self._lock:
                    self._running = None
                yield batch
                return
            yield batch

    def _execute(self, prompt_id: str, prompt: dict[str, Any], outputs: list[str], extra_data: dict[str, Any],
                 on_event: Callable[[ev.Event], None]) -> Outcome:
        checked, problem = prepare(prompt, outputs, self.registry)
        if checked is None:
            return Outcome(None, problem, self._held())
        result = self.executor.run(checked, prompt_id=prompt_id, on_event=on_event, interrupt=self._interrupt,
                                   extra=extra_data)
        return Outcome(_slim(result), None, self._held())
