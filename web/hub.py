"""Connected websocket clients by session id, each fed in order by its own sender task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger("loom.web")

# A client that falls this far behind is dropped rather than let the server's memory grow.
MAX_BACKLOG = 4096


class Client:
    def __init__(self, sid: str, ws: web.WebSocketResponse) -> None:
        self.sid = sid
        self.ws = ws
        self.backlog: asyncio.Queue[str | bytes | None] = asyncio.Queue(MAX_BACKLOG)
        self.sender = asyncio.create_task(self._send_all())

    def put(self, message: str | bytes) -> None:
        try:
            self.backlog.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("websocket client %s is too slow; disconnecting it", self.sid)
            self.sender.cancel()
            asyncio.create_task(self.ws.close())

    async def _send_all(self) -> None:
        while (message := await self.backlog.get()) is not None:
            try:
                if isinstance(message, bytes):
                    await self.ws.send_bytes(message)
                else:
                    await self.ws.send_str(message)
            except (ConnectionError, RuntimeError):
                return

    async def close(self) -> None:
        self.sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sender


class Hub:
    def __init__(self) -> None:
        self.clients: dict[str, set[Client]] = {}

    def add(self, client: Client) -> None:
        self.clients.setdefault(client.sid, set()).add(client)

    def remove(self, client: Client) -> None:
        group = self.clients.get(client.sid)
        if group is not None:
            group.discard(client)
            if not group:
                del self.clients[client.sid]

    def _targets(self, sid: str | None) -> list[Client]:
        if sid is None:
            return [c for group in self.clients.values() for c in group]
        return list(self.clients.get(sid, ()))

    def send(self, kind: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Send `{"type", "data"}` to one session's sockets, or to everyone when `sid` is None."""
        targets = self._targets(sid)
        if targets:
            text = json.dumps({"type": kind, "data": data}, default=str)
            for client in targets:
                client.put(text)

    def send_bytes(self, payload: bytes, sid: str | None = None) -> None:
        for client in self._targets(sid):
            client.put(payload)

    async def close_all(self) -> None:
        for client in self._targets(None):
            await client.close()
            await client.ws.close()
        self.clients.clear()
