"""The server's configuration and shared state, reached by every route through `request.app[STATE]`."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from nodes.folders import FolderPaths
from nodes.registry import NodeRegistry
from web.hub import Hub
from web.store import QueueStore

T = TypeVar("T")

EXAMPLE_WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None
    data_dir: Path = Path("user")
    history_cap: int = 10000
    max_upload_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 64 * 1024 * 1024
    allowed_origins: list[str] = field(default_factory=list)
    run_worker: bool = True
    preview_interval_s: float = 0.25
    status_interval_s: float = 0.05
    workflows_dir: Path = EXAMPLE_WORKFLOWS
    # Where prompts run: web.ray_pool.RayOptions for a Ray cluster; else a web.runner.WorkerSpec for a child
    # process (web.process_worker, what `main.py serve` does); else a thread of this process.
    ray: Any = None
    worker_process: Any = None

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.listen)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "loom.sqlite3"


class Database:
    """The queue store behind one thread, so that SQLite never blocks the event loop."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-db")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.store.close()


@dataclass
class ServerState:
    config: ServerConfig
    registry: NodeRegistry
    paths: FolderPaths
    db: Database
    hub: Hub = field(default_factory=Hub)
    worker: Any = None  # web.dispatch.Dispatcher (the local worker or the Ray pool), set when the app starts
    _status_dirty: bool = field(default=False, repr=False)
    _status_task: asyncio.Task[None] | None = field(default=None, repr=False)

    def queue_changed(self) -> None:
        """Broadcast the queue size soon: a burst of changes (200 prompts queued at once) sends one message
        per `status_interval_s`, always ending with the current size, instead of one per change to every client."""
        self._status_dirty = True
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.create_task(self._flush_status())

    async def _flush_status(self) -> None:
        while self._status_dirty:
            await asyncio.sleep(self.config.status_interval_s)
            self._status_dirty = False
            await self.broadcast_status()

    async def queue_remaining(self) -> int:
        return await self.db.call(self.db.store.remaining)

    async def close(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task

    async def broadcast_status(self, sid: str | None = None) -> None:
        """The `status` message ComfyUI sends on every queue change (to all) and on connect (to one)."""
        remaining = await self.queue_remaining()
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
        if sid is not None:
            data["sid"] = sid
        self.hub.send("status", data, sid)


STATE = web.AppKey("loom_state", ServerState)
