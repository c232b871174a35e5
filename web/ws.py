"""The websocket route: GET /ws?clientId= registers a client for its prompts' events and status broadcasts."""

from __future__ import annotations

import uuid

from aiohttp import WSMsgType, web

from web.hub import Client
from web.state import STATE

routes = web.RouteTableDef()

MAX_CLIENT_ID = 256


@routes.get("/ws")
async def websocket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    sid = request.query.get("clientId", "")[:MAX_CLIENT_ID] or uuid.uuid4().hex
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
    await ws.prepare(request)
    client = Client(sid, ws)
    state.hub.add(client)
    try:
        await state.broadcast_status(sid)
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break  # clients have nothing to say yet (ComfyUI's feature flags are ignored)
    finally:
        state.hub.remove(client)
        await client.close()
    return ws
