"""Routes for the example workflows in workflows/ (the editor's default graph and its Examples menu), the workflow
a dropped image, video or audio file carries, and the expansion of a workflow the editor opens (subgraphs, group
nodes, missing node types)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from graph.document import DocumentError
from graph.load import WORKFLOW_FIRST, read_file_workflow
from web.expand import expand_for_editor
from web.http import json_error, read_json
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


@routes.post("/workflow/expand")
async def expand_workflow(request: web.Request) -> web.Response:
    """{"workflow": W} -> W as the editor shows it: subgraph and group node instances expanded, with what was
    expanded and the node types this server lacks (web/expand.py)."""
    data = await read_json(request)
    workflow = data.get("workflow") if isinstance(data, dict) else None
    if not isinstance(workflow, dict):
        raise json_error(400, "invalid_workflow", "the body must be {'workflow': <a UI-format or API-format workflow>}")
    try:
        answer = await asyncio.to_thread(expand_for_editor, workflow, request.app[STATE].registry)
    except DocumentError as exc:
        raise json_error(400, "invalid_workflow", str(exc)) from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # odd files: say so, not a 500
        message = f"the workflow could not be read: {type(exc).__name__}: {exc}"
        raise json_error(400, "invalid_workflow", message) from None
    return web.json_response(answer)


@routes.post("/workflow/from_file")
async def workflow_from_file(request: web.Request) -> web.Response:
    """The body is a file (a WEBP, MP4, WebM, FLAC, Opus, Ogg or MP3, or a PNG) -> the workflow it carries: the
    editor `workflow`, else the API-format `prompt`, as the editor opens it. Read in memory; nothing is written."""
    limit = request.app[STATE].config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise json_error(413, "file_too_large", f"the file is larger than the limit of {limit} bytes")
    raw = await request.read()
    if not raw:
        raise json_error(400, "invalid_request", "send the file as the request body")
    try:
        return web.json_response(await asyncio.to_thread(read_file_workflow, raw, "", WORKFLOW_FIRST))
    except DocumentError as exc:
        raise json_error(400, "no_workflow", str(exc)) from None
