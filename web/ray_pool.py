"""Runs queued prompts on a pool of Ray actors, one prompt per device at a time, nothing lost when one dies.

The server's SQLite store stays the single source of truth: the pool claims the first pending
prompt, picks an idle worker for it (the one that already holds its checkpoint, else the one that
has run the fewest prompts), and streams the worker's events into the same `Dispatcher` code the
single-process worker uses. A worker that dies mid-run (killed process, lost node) has its prompt
put back in the queue, to be run by whichever worker is free next, until the prompt has been
started `max_attempts` times; then it is finished as an error that says why. Ray restarts the dead
actor, which takes prompts again once it answers. Imported only for `--workers ray`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodes.registry import NodeRegistry, builtin_registry
from web.affinity import prompt_models
from web.dispatch import Dispatcher, Run, StartError
from web.runner import Outcome, PromptRunner, WorkerSpec
from web.state import ServerState
from web.store import MAX_ATTEMPTS, PromptRecord

try:
    import ray
    from ray.exceptions import ActorDiedError, RayActorError
except ImportError as exc:  # Ray is an optional extra
    raise ImportError("--workers ray needs Ray, an optional dependency: pip install 'ray>=2.40,<3'") from exc

log = logging.getLogger("loom.ray")

# Actor methods that may run while a prompt runs: run, interrupt, free, ready.
ACTOR_CONCURRENCY = 4
READY_WARNING_S = 60.0


@dataclass
class RayOptions:
    """`main.py serve --workers ray` settings."""

    address: str | None = None  # an existing cluster ("auto", "HOST:6379", "ray://HOST:10001"); None starts one
    workers: int | None = None  # None: one per GPU of the cluster, or one per `cpus_per_worker` CPUs
    cpus_per_worker: int = 1  # CPUs each worker reserves, and its torch threads
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_attempts: int = MAX_ATTEMPTS  # starts of one prompt before a dying worker fails it
    registry: Callable[[], NodeRegistry] = builtin_registry  # builds the node types on each worker
    local_cpus: int | None = None  # CPUs a locally started Ray offers (default: what the workers need, or all)
    object_store_mb: int = 256  # object store of a locally started Ray (events and results are small)


@dataclass
class Slot:
    """One Ray actor and what the pool knows of it."""

    name: str
    actor: Any
    state: str = "starting"  # starting | idle | busy | recovering
    run: Run | None = None
    held: frozenset[str] = frozenset()
    pid: int | None = None
    node: str = ""
    device: str = ""
    prompts: int = 0
    deaths: int = 0
    task: asyncio.Task[None] | None = None  # the run in flight

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "prompt_id": self.run.record.id if self.run else None,
                "pid": self.pid, "node": self.node, "device": self.device, "held_models": sorted(self.held),
                "prompts": self.prompts, "deaths": self.deaths}


def choose(record: PromptRecord, idle: list[Slot]) -> Slot:
    """Cache affinity first (most of the prompt's model files loaded), then the worker that has run the fewest."""
    wanted = prompt_models(record.prompt)
    return max(idle, key=lambda slot: (len(wanted & slot.held), -slot.prompts))


class RayPool(Dispatcher):
    def __init__(self, state: ServerState, options: RayOptions) -> None:
        super().__init__(state)
        self.options = options
        self.slots: list[Slot] = []
        # Prompt id -> the workers that started it, in order (the latest `history_cap` prompts).
        self.ran_on: OrderedDict[str, list[str]] = OrderedDict()
        self._owns_ray = False
        self._task: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()  # waiting for workers to start, freeing memory

    # -- start and stop ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._connect()
        spec = WorkerSpec(paths=self.state.paths, registry=self.options.registry,
                          threads=self.options.cpus_per_worker,
                          preview_interval_s=self.state.config.preview_interval_s)
        self._actor_class = ray.remote(PromptRunner)
        self._spec_ref = ray.put(spec)
        count, gpus = self._size()
        self._gpus = gpus
        log.info("Ray pool: %d workers, %d CPU and %g GPU each", count, self.options.cpus_per_worker, gpus)
        for index in range(count):
            slot = Slot(f"ray-{index}", self._spawn())
            self.slots.append(slot)
            self._chore(self._await_ready(slot))
        self._task = asyncio.create_task(self._loop())

    def _connect(self) -> None:
        """Join the given cluster, or start a small local Ray; reuse a connection the process already has."""
        if ray.is_initialized():
            return
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "namespace": "loom"}
        try:
            if self.options.address:
                ray.init(address=self.options.address, **quiet)
            else:
                cpus = self.options.local_cpus
                if cpus is None and self.options.workers is not None:
                    cpus = self.options.workers * self.options.cpus_per_worker
                ray.init(num_cpus=cpus, include_dashboard=False,
                         object_store_memory=self.options.object_store_mb * 1024 * 1024, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.options.address}" if self.options.address else "a local Ray instance"
            raise StartError(f"could not start {where}: {exc}") from exc
        self._owns_ray = True

    def _size(self) -> tuple[int, float]:
        resources = ray.cluster_resources()
        gpus = self.options.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        count = self.options.workers
        if count is None:
            count = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1)
                                                                            // self.options.cpus_per_worker)
        return max(1, count), gpus

    def _spawn(self) -> Any:
        return self._actor_class.options(
            num_cpus=self.options.cpus_per_worker, num_gpus=self._gpus, max_concurrency=ACTOR_CONCURRENCY,
            max_restarts=-1, max_task_retries=0).remote(self._spec_ref)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        for chore in self._chores:
            chore.cancel()
        self.interrupt(None)
        running = [slot.task for slot in self.slots if slot.task is not None and not slot.task.done()]
        if running:
            # Interrupted runs come back as such and are put back in the queue (see Dispatcher.finish).
            _, late = await asyncio.wait(running, timeout=10)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for slot in self.slots:
            ray.kill(slot.actor, no_restart=True)
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)

    # -- the routes' calls -------------------------------------------------------------------------

    def interrupt(self, prompt_id: str | None = None) -> bool:
        matched = False
        for slot in self.slots:
            if slot.run is not None and prompt_id in (None, slot.run.record.id):
                slot.actor.interrupt.remote(slot.run.record.id)
                matched = True
        return matched

    def free(self, unload_models: bool, free_memory: bool) -> None:
        for slot in self.slots:
            if slot.state in ("idle", "busy"):
                self._chore(self._free(slot, unload_models, free_memory))

    async def _free(self, slot: Slot, unload_models: bool, free_memory: bool) -> None:
        try:
            slot.held = frozenset(await slot.actor.free.remote(unload_models, free_memory))
        except RayActorError:
            pass  # a dead worker holds nothing; its recovery is under way

    def describe(self) -> list[dict[str, Any]]:
        return [slot.describe() for slot in self.slots]

    # -- dispatching -------------------------------------------------------------------------------

    def _chore(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _loop(self) -> None:
        db = self.state.db
        while not self._stopping:
            self._wake.clear()
            idle = [slot for slot in self.slots if slot.state == "idle"]
            record = await db.call(db.store.claim_next) if idle else None
            if record is None:
                await self._wake.wait()
                continue
            slot = choose(record, idle)
            slot.state = "busy"
            slot.run = self.begin(record)
            self.ran_on.setdefault(record.id, []).append(slot.name)
            while len(self.ran_on) > self.state.config.history_cap:
                self.ran_on.popitem(last=False)
            slot.task = asyncio.create_task(self._run_on(slot, slot.run))

    async def _run_on(self, slot: Slot, run: Run) -> None:
        record = run.record
        outcome: Outcome | None = None
        try:
            stream = slot.actor.run.options(num_returns="streaming").remote(
                record.id, record.prompt, record.outputs_to_execute, record.extra_data)
            async for ref in stream:
                for item in await ref:
                    if isinstance(item, Outcome):
                        outcome = item
                    else:
                        self.deliver(run, item)
        except asyncio.CancelledError:
            slot.run = None
            await self.put_back(run)
            raise
        except RayActorError as exc:
            await self._lost(slot, run, exc)
            return
        except Exception as exc:  # a failure of Ray's or a bug here, not the worker's death: end this prompt only
            log.exception("prompt %s failed on %s", record.id, slot.name)
            outcome = Outcome(None, {"type": "server_error", "message": f"{type(exc).__name__}: {exc}"}, slot.held)
        slot.run = None
        slot.prompts += 1
        if outcome is None:
            outcome = Outcome(None, {"type": "server_error", "message": "the worker ended the run without a result"})
        slot.held = outcome.held
        await self.finish(run, outcome.result, outcome.problem)
        slot.state = "idle"
        self.wake()

    async def _lost(self, slot: Slot, run: Run, exc: RayActorError) -> None:
        """The worker died during the run: put the prompt back, or fail it when it has been started enough."""
        slot.run, slot.state, slot.held = None, "recovering", frozenset()
        slot.deaths += 1
        log.debug("Ray says: %s", exc)
        reason = f"worker {slot.name} (pid {slot.pid} on {slot.node}) died while running this prompt"
        await self.worker_died(run, reason, self.options.max_attempts)
        self._chore(self._await_ready(slot))
        self.wake()

    async def _await_ready(self, slot: Slot) -> None:
        """Wait until the worker answers (it starts, or Ray restarts it), then let it take prompts."""
        waited = 0.0
        while not self._stopping:
            try:
                info = await asyncio.wait_for(_result(slot.actor.ready.remote()), timeout=READY_WARNING_S)
            except TimeoutError:
                waited += READY_WARNING_S
                log.warning("%s has not started after %.0f s; does the cluster have the resources it asks for?"
                            " (%d CPU, %g GPU)", slot.name, waited, self.options.cpus_per_worker, self._gpus)
                continue
            except ActorDiedError:
                log.warning("%s is gone for good; starting a new worker in its place", slot.name)
                slot.actor = self._spawn()
                continue
            except RayActorError:
                await asyncio.sleep(0.5)  # restarting: ask again
                continue
            slot.pid, slot.node, slot.device = info["pid"], info["node"], info["device"]
            slot.held = frozenset(info["held"])
            slot.state = "idle"
            self.wake()
            return


async def _result(ref: Any) -> Any:
    return await ref
