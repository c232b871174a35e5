"""GET /workers: who runs the prompts (the local worker, or each Ray worker) and what each is doing."""

from __future__ import annotations

from aiohttp import web

from web.http import dumps
from web.state import STATE

routes = web.RouteTableDef()


@routes.get("/workers")
async def get_workers(request: web.Request) -> web.Response:
    worker = request.app[STATE].worker
    return web.json_response({"workers": worker.describe() if worker is not None else []}, dumps=dumps)
