"""Routes for finished prompts: GET /history[/{id}], POST /history {clear | delete}."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from web.http import dumps, query_int, read_body
from web.state import STATE

routes = web.RouteTableDef()


class HistoryAction(BaseModel):
    clear: bool = False
    delete: list[str] = Field(default_factory=list)


@routes.get("/history")
async def get_history(request: web.Request) -> web.Response:
    """`max_items` and `offset` as ComfyUI reads them (offset counts from the oldest run; without one, max_items
    gives the newest); the X-Total-Count header says how many runs there are, so that a client can page."""
    db = request.app[STATE].db
    max_items = query_int(request, "max_items", None, minimum=1)
    offset = query_int(request, "offset", None, minimum=None)
    if offset is not None and offset < 0:
        offset = None  # ComfyUI's default offset is -1: the newest max_items
    records, total = await db.call(db.store.history, max_items, offset)
    return web.json_response({r.id: r.history_entry() for r in records}, dumps=dumps,
                             headers={"X-Total-Count": str(total)})


@routes.get("/history/{prompt_id}")
async def get_history_item(request: web.Request) -> web.Response:
    db = request.app[STATE].db
    prompt_id = request.match_info["prompt_id"]
    record = await db.call(db.store.get, prompt_id)
    if record is None or record.state != "done":
        # ComfyUI answers {} for a prompt that has not finished, or that it does not know (never queued, or
        # deleted): clients poll until their id appears. GET /prompt/{id} tells the cases apart.
        return web.json_response({})
    return web.json_response({record.id: record.history_entry()}, dumps=dumps)


@routes.post("/history")
async def post_history(request: web.Request) -> web.Response:
    db = request.app[STATE].db
    action = await read_body(request, HistoryAction)
    deleted = await db.call(db.store.delete_history, None if action.clear else action.delete)
    return web.json_response({"deleted": deleted})
