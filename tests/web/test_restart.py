"""The queue survives restarts: a clean shutdown, and a real `main.py serve` killed with SIGKILL mid-run."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.web.conftest import ADD, slow_prompt
from web.store import QueueStore, StoreInUse

ROOT = Path(__file__).resolve().parents[2]


async def test_pending_prompts_run_after_a_restart(make_app, aiohttp_client):
    client = await aiohttp_client(make_app(run_worker=False))
    ids = [(await (await client.post("/prompt", json={"prompt": ADD})).json())["prompt_id"] for _ in range(3)]
    await client.close()
    client = await aiohttp_client(make_app())
    for _ in range(500):
        history = await (await client.get("/history")).json()
        if len(history) == 3:
            break
        await asyncio.sleep(0.01)
    assert list(history) == ids
    assert all(h["status"]["status_str"] == "success" for h in history.values())


async def test_clean_shutdown_puts_the_running_prompt_back(make_app, aiohttp_client):
    client = await aiohttp_client(make_app())
    body = await (await client.post("/prompt", json={"prompt": slow_prompt(steps=5000, delay=0.002)})).json()
    for _ in range(500):
        if (await (await client.get(f"/prompt/{body['prompt_id']}")).json())["status"] == "running":
            break
        await asyncio.sleep(0.01)
    await client.close()
    client = await aiohttp_client(make_app(run_worker=False))
    status = await (await client.get(f"/prompt/{body['prompt_id']}")).json()
    assert status["status"] == "pending"


def test_crash_rule_reruns_once_then_fails(tmp_path):
    store = QueueStore(tmp_path / "q.sqlite3")
    store.add("a", ADD, {}, ["3"], None)
    assert store.claim_next().attempts == 1
    store.close()
    store = QueueStore(tmp_path / "q.sqlite3")  # as if killed mid-run
    assert store.recovered == ["a"] and store.get("a").state == "pending"
    assert store.claim_next().attempts == 2
    store.close()
    store = QueueStore(tmp_path / "q.sqlite3")
    record = store.get("a")
    assert record.state == "done" and record.status_str == "error"
    assert record.error["exception_type"] == "ServerStopped"
    assert [m[0] for m in record.messages] == ["execution_restarted", "execution_error"]


def test_one_server_per_data_folder(tmp_path):
    store = QueueStore(tmp_path / "q.sqlite3")
    with pytest.raises(StoreInUse, match="another Loom server"):
        QueueStore(tmp_path / "q.sqlite3")
    store.close()
    QueueStore(tmp_path / "q.sqlite3").close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path) -> None:
        self.base, self.port = base, free_port()
        self.log = open(base / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.web.serve_helper", "--port", str(self.port), "--base-dir", str(base),
             "--no-bundled-models"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def call(self, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url(path), data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def wait_ready(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {(self.base / f'server-{self.port}.log').read_text()}")
            try:
                self.call("/prompt")
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("server did not start")

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever adopted it, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sigkill_during_a_run_loses_nothing(tmp_path):
    marker = tmp_path / "marker.txt"
    long_run = {"1": {"class_type": "Marker", "inputs": {"path": str(marker), "seconds": 60}}}
    server = Server(tmp_path)
    try:
        killed_id = server.call("/prompt", {"prompt": long_run})["prompt_id"]
        queued_id = server.call("/prompt", {"prompt": ADD})["prompt_id"]
        wait_for(lambda: marker.exists() and marker.read_text().count("start") == 1)
        [worker] = server.call("/workers")["workers"]
        assert worker["pid"] != server.proc.pid  # prompts run in a child process
        server.kill()
        assert wait_for(lambda: not alive(worker["pid"]), timeout=10), "the worker process outlived its server"

        # First restart: the prompt that was running runs again (first in line), the queued one waits.
        server = Server(tmp_path)
        wait_for(lambda: marker.read_text().count("start") == 2)
        assert server.call(f"/prompt/{killed_id}")["status"] == "running"
        assert server.call(f"/prompt/{queued_id}")["status"] == "pending"
        server.kill()

        # Second restart: it was cut off twice, so it is failed with the reason; the queue goes on.
        server = Server(tmp_path)
        done = wait_for(lambda: server.call(f"/prompt/{queued_id}")["status"] == "success")
        assert done
        history = server.call("/history")
        failed = history[killed_id]
        assert failed["status"]["status_str"] == "error"
        assert "server stopped" in failed["meta"]["error"]["exception_message"]
        assert history[queued_id]["outputs"] == {"3": {"text": ["42"]}}
        assert marker.read_text().count("start") == 2
    finally:
        if server.proc.poll() is None:
            server.kill()


async def test_sigterm_exits_promptly_with_a_client_connected_and_requeues(tmp_path):
    import aiohttp

    marker = tmp_path / "marker.txt"
    server = Server(tmp_path)
    try:
        prompt_id = server.call("/prompt", {"prompt": {"1": {"class_type": "Marker",
                                                             "inputs": {"path": str(marker), "seconds": 60}}}})[
            "prompt_id"]
        wait_for(lambda: marker.exists())
        async with aiohttp.ClientSession() as session, session.ws_connect(server.url("/ws")) as ws:
            await ws.receive()
            began = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.proc.wait, 20)
            assert time.monotonic() - began < 10
        server.log.close()
        server = Server(tmp_path)
        wait_for(lambda: marker.read_text().count("start") == 2)
        status = server.call(f"/prompt/{prompt_id}")
        assert status["status"] == "running"
    finally:
        if server.proc.poll() is None:
            server.kill()
