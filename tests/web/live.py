"""Helpers for the tests that run prompts on a live server's workers (the process worker, the Ray pool)."""

from __future__ import annotations

import asyncio
import inspect
import json

from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from tests.web.pack import web_registry
from web.app import create_app

WAIT_S = 240.0  # generous: a loaded 2-core machine may be slow, but never changes what must happen


async def start(config, folders):
    """A test client of a server made from `config`, with the web tests' node types."""
    client = TestClient(TestServer(create_app(config, web_registry(), folders)))
    await client.start_server()
    return client


async def until(predicate, timeout=WAIT_S, what="the condition"):
    """Poll `predicate` (plain or async) until it answers something true; fails after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.05)


async def queue(client, prompt, **extra):
    resp = await client.post("/prompt", json={"prompt": prompt, **extra})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["prompt_id"]


async def history_of(client, ids):
    async def check():
        history = await (await client.get("/history")).json()
        return history if all(i in history for i in ids) else None

    return await until(check, what=f"{len(ids)} prompts in the history")


def marker(path, seconds):
    """A prompt that appends "start" to `path` each time it starts, then waits `seconds` (interruptible)."""
    return {"1": {"class_type": "Marker", "inputs": {"path": str(path), "seconds": seconds}}}


async def collect_run(client, prompt, sid):
    """Queue `prompt` for websocket client `sid`; its messages (without status) and binary frames, in order."""
    async with client.ws_connect(f"/ws?clientId={sid}") as ws:
        await ws.receive_json()
        prompt_id = await queue(client, prompt, client_id=sid)
        messages, frames = [], 0
        async with asyncio.timeout(WAIT_S):
            while True:
                msg = await ws.receive()
                if msg.type == WSMsgType.BINARY:
                    frames += 1
                    continue
                item = msg.json()
                if item["type"] != "status":
                    messages.append(item)
                if item["type"] == "executing" and item["data"]["node"] is None:
                    return prompt_id, messages, frames


def shape(messages, prompt_id):
    """What must match between two ways of running one prompt: message types, keys, nodes and values."""
    return [(m["type"], sorted(m["data"]), m["data"].get("node"), m["data"].get("value"))
            for m in json.loads(json.dumps(messages).replace(prompt_id, "ID"))]
