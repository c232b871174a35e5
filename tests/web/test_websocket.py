"""GET /ws: events addressed to the client that queued the prompt, status broadcasts, binary previews."""

import asyncio
import io
import struct

import numpy as np
from aiohttp import WSMsgType
from PIL import Image

from tests.web.conftest import slow_prompt
from web.previews import Throttle, encode_preview, preview_rgb


async def collect_until_done(ws, prompt_id, timeout=10.0):
    messages, frames = [], []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                frames.append(msg.data)
                continue
            item = msg.json()
            messages.append(item)
            if item["type"] == "executing" and item["data"]["node"] is None \
                    and item["data"]["prompt_id"] == prompt_id:
                return messages, frames


async def test_events_previews_and_addressing(client):
    async with client.ws_connect("/ws?clientId=me") as mine, client.ws_connect("/ws?clientId=other") as other:
        hello = await mine.receive_json()
        assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"}}
        await other.receive_json()
        body = await (await client.post("/prompt", json={"prompt": slow_prompt(steps=3), "client_id": "me"})).json()
        messages, frames = await collect_until_done(mine, body["prompt_id"])
        kinds = [m["type"] for m in messages]
        run = [k for k in kinds if k != "status"]
        assert run == ["execution_start", "execution_cached", "executing", "executing", "progress", "progress",
                       "progress", "executing", "executed", "execution_success", "executing"]
        progress = [m["data"] for m in messages if m["type"] == "progress"]
        assert progress[-1] == {"prompt_id": body["prompt_id"], "node": "2", "value": 3, "max": 3}
        executed = next(m["data"] for m in messages if m["type"] == "executed")
        assert executed["node"] == "3" and executed["output"] == {"value": [1]}
        assert len(frames) == 3
        kind, fmt = struct.unpack(">II", frames[0][:8])
        assert (kind, fmt) == (1, 1)
        assert Image.open(io.BytesIO(frames[0][8:])).format == "JPEG"
        # the other client sees queue status only, ending with the empty queue
        await asyncio.sleep(0.2)
        seen = []
        while True:
            try:
                msg = await other.receive(timeout=0.05)
            except TimeoutError:
                break
            seen.append(msg.json())
        assert seen and {m["type"] for m in seen} == {"status"}
        assert seen[-1]["data"]["status"]["exec_info"]["queue_remaining"] == 0


async def test_status_bursts_are_coalesced_and_end_with_the_current_size(make_app, aiohttp_client):
    client = await aiohttp_client(make_app(run_worker=False, status_interval_s=0.05))
    async with client.ws_connect("/ws?clientId=watcher") as ws:
        await ws.receive_json()
        for _ in range(20):
            await client.post("/prompt", json={"prompt": slow_prompt()})
        await asyncio.sleep(0.3)
        sizes = []
        while True:
            try:
                sizes.append((await ws.receive_json(timeout=0.05))["data"]["status"]["exec_info"]["queue_remaining"])
            except TimeoutError:
                break
        assert 1 <= len(sizes) < 20 and sizes[-1] == 20


async def test_prompt_without_client_id_is_broadcast(client):
    async with client.ws_connect("/ws") as ws:
        assert (await ws.receive_json())["data"]["sid"]
        body = await (await client.post("/prompt", json={"prompt": slow_prompt(steps=1)})).json()
        messages, _ = await collect_until_done(ws, body["prompt_id"])
        assert "execution_success" in [m["type"] for m in messages]


async def test_error_event_reaches_the_client(client):
    prompt = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 1}},
              "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}
    async with client.ws_connect("/ws?clientId=c") as ws:
        await ws.receive_json()
        body = await (await client.post("/prompt", json={"prompt": prompt, "client_id": "c"})).json()
        messages, _ = await collect_until_done(ws, body["prompt_id"])
        error = next(m["data"] for m in messages if m["type"] == "execution_error")
        assert error["node_id"] == "2" and error["node_type"] == "Fail"
        assert error["exception_message"] == "this node always fails" and error["traceback"]


def test_preview_projection_of_latents_and_images():
    latent = np.zeros((1, 4, 8, 16), dtype=np.float32)
    rgb = preview_rgb(latent)
    assert rgb.shape == (8, 16, 3) and rgb.dtype == np.uint8
    assert preview_rgb(np.ones((1, 16, 16, 3))).max() == 255
    assert preview_rgb(np.zeros((1, 16, 4, 4))).shape == (4, 4, 3)  # other latent widths: grey
    assert preview_rgb(np.zeros(3)) is None
    frame = encode_preview(latent)
    assert Image.open(io.BytesIO(frame[8:])).size == (128, 64)


def test_preview_of_a_torch_tensor():
    import torch

    frame = encode_preview(torch.randn(2, 4, 8, 8))
    assert frame[:8] == struct.pack(">II", 1, 1)


def test_throttle():
    throttle = Throttle(60.0)
    assert throttle.ready() and not throttle.ready()


async def test_history_holds_the_run_when_executing_null_arrives(client):
    async with client.ws_connect("/ws?clientId=poller") as ws:
        await ws.receive_json()
        for i in range(5):
            body = await (await client.post("/prompt", json={"prompt": slow_prompt(steps=1, value=i),
                                                            "client_id": "poller"})).json()
            await collect_until_done(ws, body["prompt_id"])
            history = await (await client.get(f"/history/{body['prompt_id']}")).json()
            assert body["prompt_id"] in history
