"""The aiohttp application: routes (each also under /api), middlewares, the editor's files, and start-up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from nodes.folders import FolderPaths, get_paths
from nodes.registry import NodeRegistry
from web import files, history, info, prompts, workers, workflows, ws
from web.dispatch import Dispatcher
from web.http import json_errors
from web.process_worker import ProcessWorker
from web.security import guard
from web.state import STATE, Database, ServerConfig, ServerState
from web.store import QueueStore
from web.worker import Worker

log = logging.getLogger("loom.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
ROUTE_MODULES = (prompts, history, files, info, workflows, ws, workers)


async def index(request: web.Request) -> web.Response:
    # Read per request (it is small) so that the token cookie can be set on this response.
    return web.Response(text=(STATIC_DIR / "index.html").read_text(), content_type="text/html",
                        headers={"Cache-Control": "no-cache"})


def _api_routes() -> list[web.RouteDef]:
    defs = [d for module in ROUTE_MODULES for d in module.routes if isinstance(d, web.RouteDef)]
    return defs + [web.RouteDef(d.method, "/api" + d.path, d.handler, d.kwargs) for d in defs]


async def _close_websockets(app: web.Application) -> None:
    # On shutdown, before aiohttp waits for open handlers: a connected editor must not hold the exit.
    await app[STATE].hub.close_all()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    if state.db.store.recovered:
        log.warning("prompts cut off by the last shutdown, handled by the crash rule: %s",
                    ", ".join(state.db.store.recovered))
    if state.config.run_worker:
        state.worker = _dispatcher(state)
        await state.worker.start()
    yield
    if state.worker is not None:
        await state.worker.stop()
    await state.close()
    state.db.close()


def _dispatcher(state: ServerState) -> Dispatcher:
    """The Ray pool (Ray is imported only then), the child-process worker, or the thread worker, as configured."""
    if state.config.ray is not None:
        from web.ray_pool import RayPool

        return RayPool(state, state.config.ray)
    if state.config.worker_process is not None:
        return ProcessWorker(state, state.config.worker_process)
    return Worker(state)


def create_app(config: ServerConfig, registry: NodeRegistry, paths: FolderPaths | None = None) -> web.Application:
    """A ready-to-run application; the queue is opened now, the worker starts with the app."""
    app = web.Application(middlewares=[json_errors, guard], client_max_size=config.max_upload_bytes + 256 * 1024)
    store = QueueStore(config.db_path, history_cap=config.history_cap)
    app[STATE] = ServerState(config=config, registry=registry, paths=paths or get_paths(), db=Database(store))
    app.router.add_routes(_api_routes())
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_websockets)
    return app
