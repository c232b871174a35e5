"""Routes for the example workflows in workflows/: the editor's default graph and its Examples menu."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from web.http import json_error
from web.state import STATE

routes = web.RouteTableDef()


def _names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []


@routes.get("/workflows")
async def list_workflows(request: web.Request) -> web.Response:
    folder = request.app[STATE].config.workflows_dir
    return web.json_response(await asyncio.to_thread(_names, folder))


@routes.get("/workflows/{name}")
async def workflow(request: web.Request) -> web.Response:
    folder = request.app[STATE].config.workflows_dir
    name = request.match_info["name"].removesuffix(".json")
    # Only names from the listing are served, so a request can never reach outside the folder.
    if name not in await asyncio.to_thread(_names, folder):
        raise json_error(404, "not_found", f"no example workflow named {name!r}")
    text = await asyncio.to_thread((folder / f"{name}.json").read_text)
    return web.Response(text=text, content_type="application/json", headers={"Cache-Control": "no-cache"})
