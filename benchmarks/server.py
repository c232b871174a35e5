"""Server under load: websocket clients on loopback, prompts queued while the worker is busy.

    python -m benchmarks.server [--clients 50] [--prompts 200] [--workflow txt2img|math|chain|FILE.json] [--steps 2]

Starts `main.py serve` in a subprocess on a free port (with a fresh base folder), connects the
clients, queues the prompts from them, polls GET /queue while the worker is busy, and waits until
every prompt has finished. `--workflow txt2img` (the default) is workflows/txt2img.json on a tiny
random-weight checkpoint written as the demo model (`loom-demo.safetensors`), at 64x64 with
`--steps` sampling steps; `math` and `chain` are graphs of built-in nodes; a JSON file (API or UI
format) runs with the same demo model. Each prompt gets its own seed, so every one samples (the
loader and the text encoders come from the cache after the first).
The last line is one JSON object: completed, lost, queue_p99_ms, prompt_p99_ms and more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = "loom-demo.safetensors"


def math_workflow(i: int) -> dict[str, Any]:
    return {"1": {"class_type": "PrimitiveInt", "inputs": {"value": i}},
            "2": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": i + 1, "operation": "multiply"}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def chain_workflow(i: int, length: int = 60) -> dict[str, Any]:
    """A longer run per prompt (one `executing` event per node), to keep the worker busy for longer."""
    doc: dict[str, Any] = {"0": {"class_type": "PrimitiveInt", "inputs": {"value": i}}}
    for n in range(1, length):
        doc[str(n)] = {"class_type": "IntMath", "inputs": {"a": [str(n - 1), 0], "b": 1, "operation": "add"}}
    doc["out"] = {"class_type": "PreviewAny", "inputs": {"source": [str(length - 1), 0]}}
    return doc


def file_workflow(doc: dict[str, Any], i: int, steps: int | None = None) -> dict[str, Any]:
    """The document with every seed set to `i`, so that no prompt is a cache hit (and `steps` steps if given)."""
    doc = json.loads(json.dumps(doc))
    for node in doc.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for name in ("seed", "noise_seed"):
            if name in inputs:
                inputs[name] = i
        if steps is not None and isinstance(inputs.get("steps"), int):
            inputs["steps"] = steps
    return doc


BUILT_IN = {"math": math_workflow, "chain": chain_workflow}


def prompt_factory(args: argparse.Namespace) -> Callable[[int], dict[str, Any]]:
    if args.workflow in BUILT_IN:
        return BUILT_IN[args.workflow]
    path = ROOT / "workflows" / "txt2img.json" if args.workflow == "txt2img" else Path(args.workflow)
    doc = json.loads(path.read_text())
    return lambda i: file_workflow(doc, i, args.steps)


def write_demo_model(base: Path) -> None:
    """The tiny SD1 checkpoint under the name the example workflows use, written by a child process: torch
    imported here would make this process's garbage collections slow (a full one walks every torch object), and
    those pauses of the measuring client were counted as server latency."""
    path = base / "models" / "checkpoints" / DEMO_MODEL
    code = "import sys; from ldm.presets import make_checkpoint; make_checkpoint('tiny-sd1', sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=True)


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class Client:
    """One websocket client: the run events it received, by prompt id (to check their addressing later)."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.owned: set[str] = set()
        self.ended: set[str] = set()
        self.seen: set[str] = set()
        self.messages = 0

    def finished(self) -> int:
        return len(self.owned & self.ended)

    def foreign(self) -> int:
        return len(self.seen - self.owned)

    async def listen(self, session: aiohttp.ClientSession, base: str, ready: asyncio.Event) -> None:
        async with session.ws_connect(f"{base}/ws?clientId={self.sid}") as ws:
            ready.set()
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                self.messages += 1
                item = json.loads(msg.data)
                prompt_id = item["data"].get("prompt_id")
                if prompt_id is not None:
                    self.seen.add(prompt_id)
                    if item["type"] in END_EVENTS:
                        self.ended.add(prompt_id)


async def poll_queue(session: aiohttp.ClientSession, base: str, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        async with session.get(f"{base}/queue") as resp:
            raw = await resp.read()
        samples.append((time.perf_counter() - began) * 1000)
        # Only a small body can be an empty queue: parsing every 400 kB answer would stall this loop, and
        # with it the timing of the other requests.
        if len(raw) < 200 and not any(json.loads(raw).values()):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)


async def run(args: argparse.Namespace, base: str) -> dict[str, Any]:
    make_prompt = prompt_factory(args)
    clients = [Client(f"bench-{i}") for i in range(args.clients)]
    prompt_ms: list[float] = []
    prompt_order: list[int] = []  # which prompt (in sending order) each latency is of
    queue_ms: list[float] = []
    accepted: list[str] = []
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        readies = [asyncio.Event() for _ in clients]
        listeners = [asyncio.create_task(c.listen(session, base, r)) for c, r in zip(clients, readies, strict=True)]
        await asyncio.gather(*(r.wait() for r in readies))
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_queue(session, base, queue_ms, stop))
        started = time.perf_counter()
        gate = asyncio.Semaphore(args.concurrency)

        async def submit(i: int) -> None:
            client = clients[i % len(clients)]
            prompt = make_prompt(i)
            async with gate:
                began = time.perf_counter()
                async with session.post(f"{base}/prompt", json={"prompt": prompt, "client_id": client.sid}) as resp:
                    body = await resp.json()
                prompt_ms.append((time.perf_counter() - began) * 1000)
                prompt_order.append(i)
            if resp.status != 200:
                raise SystemExit(f"POST /prompt failed: {resp.status} {body}")
            client.owned.add(body["prompt_id"])
            accepted.append(body["prompt_id"])

        await asyncio.gather(*(submit(i) for i in range(args.prompts)))
        queued_s = time.perf_counter() - started
        deadline = time.monotonic() + args.timeout
        while sum(c.finished() for c in clients) < len(accepted) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        wall_s = time.perf_counter() - started
        stop.set()
        await poller
        async with session.get(f"{base}/history") as resp:
            history = await resp.json()
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
    succeeded = [pid for pid in accepted if history.get(pid, {}).get("status", {}).get("status_str") == "success"]
    return {
        "workflow": args.workflow, "steps": args.steps if args.workflow not in BUILT_IN else None,
        "clients": args.clients, "prompts": args.prompts,
        "completed": len(succeeded),
        "lost": len([pid for pid in accepted if pid not in history]) + (args.prompts - len(accepted)),
        "failed": len(accepted) - len(succeeded) - len([pid for pid in accepted if pid not in history]),
        "events_missing": len(accepted) - sum(c.finished() for c in clients),
        "misaddressed": sum(c.foreign() for c in clients),
        "ws_messages": sum(c.messages for c in clients),
        "queue_samples": len(queue_ms),
        "queue_p50_ms": round(percentile(queue_ms, 0.5), 2), "queue_p99_ms": round(percentile(queue_ms, 0.99), 2),
        "prompt_p50_ms": round(percentile(prompt_ms, 0.5), 2),
        "prompt_p99_ms": round(percentile(prompt_ms, 0.99), 2),
        # The five slowest POSTs as [sending order, ms]: a cold start shows as small numbers.
        "prompt_slowest": sorted(([i, round(ms, 1)] for i, ms in zip(prompt_order, prompt_ms, strict=True)),
                                 key=lambda pair: -pair[1])[:5],
        "queued_s": round(queued_s, 2), "wall_s": round(wall_s, 2),
        "prompts_per_s": round(len(succeeded) / wall_s, 1) if wall_s else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8, help="POST /prompt requests in flight at once")
    parser.add_argument("--workflow", default="txt2img",
                        help="'txt2img' (the example on a tiny checkpoint, 64x64), 'math' or 'chain' (built-in "
                             "nodes: 3 or 61 per prompt), or an API/UI workflow file (run on the same tiny checkpoint)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps for txt2img and workflow files")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the prompts to finish")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for `main.py serve`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loom-bench-") as tmp:
        if args.workflow not in BUILT_IN:
            write_demo_model(Path(tmp))
        port = free_port()
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "serve", "--port", str(port), "--base-dir", tmp, *args.server_arg],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            base = f"http://127.0.0.1:{port}"
            asyncio.run(wait_ready(base, server))
            result = asyncio.run(run(args, base))
        finally:
            server.terminate()
            server.wait(30)
            log.close()
    print(f"{result['completed']}/{result['prompts']} prompts completed by {result['clients']} clients "
          f"in {result['wall_s']} s ({result['prompts_per_s']} prompts/s), lost {result['lost']}")
    print(f"GET /queue  p50 {result['queue_p50_ms']} ms  p99 {result['queue_p99_ms']} ms "
          f"({result['queue_samples']} samples while busy)")
    print(f"POST /prompt p50 {result['prompt_p50_ms']} ms  p99 {result['prompt_p99_ms']} ms")
    print(json.dumps(result))


async def wait_ready(base: str, server: subprocess.Popen[bytes]) -> None:
    """Until the server answers and its workers have started (a worker process loads torch and the node
    types first): the figures are of a running server, not of its start-up."""
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit("the server exited during start-up")
            try:
                async with session.get(f"{base}/workers") as resp:
                    if resp.status == 200 and all(w["state"] != "starting" for w in (await resp.json())["workers"]):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("the server and its workers did not start within 60 s")


if __name__ == "__main__":
    main()
