"""Scale-out on Ray: throughput of `main.py serve --workers ray` with 1, 2 and 4 CPU workers, and a worker killed.

    python -m benchmarks.scale_out [--prompts 100] [--steps 12] [--size 128] [--counts 1,2,4]

Starts one local Ray instance (as many CPUs as the largest count); then, for each worker count,
`main.py serve --ray-address ... --ray-workers N --ray-cpus-per-worker 1` joins it (each worker
one torch thread) on a base folder holding a tiny random-weight SD1 checkpoint, every worker is
warmed up (one prompt each, so that loading the checkpoint is not timed), and `--prompts` txt2img
prompts (each its own seed, SIZExSIZE, `--steps` steps) are queued from a websocket client and
timed until the last one has finished. Then, with 2 workers, the prompts are queued again, the
worker running one of them is SIGKILLed once a tenth have finished, and the prompts that did not
reach the history as a success are counted (`lost`).

Throughput is prompts per second; efficiency_N is throughput_N / (N x throughput_1). On a machine
with C cores, counts above C share cores and cannot scale. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import ray

from benchmarks.server import ROOT, free_port, wait_ready, write_demo_model

TXT2IMG = ROOT / "workflows" / "txt2img.json"


def prompt(seed: int, steps: int, size: int) -> dict[str, Any]:
    doc = json.loads(TXT2IMG.read_text())
    for node in doc.values():
        inputs = node["inputs"]
        if node["class_type"] == "KSampler":
            inputs.update(seed=seed, steps=steps)
        elif node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
    return doc


class Server:
    """`main.py serve --workers ray` in a subprocess on its own data folder."""

    def __init__(self, base: Path, workers: int, address: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / f"server-{workers}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "serve", "--port", str(self.port), "--base-dir", str(base),
             "--data-dir", str(base / f"user-{workers}"), "--no-bundled-models", "--no-custom-nodes",
             "--ray-address", address, "--ray-workers", str(workers), "--ray-cpus-per-worker", "1"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


async def workers(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with session.get(f"{url}/workers") as resp:
        return (await resp.json())["workers"]


async def all_idle(session: aiohttp.ClientSession, url: str, count: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await workers(session, url)
        if len(found) == count and all(w["state"] == "idle" for w in found):
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"the {count} workers did not start within {timeout:.0f} s")


async def run_batch(session: aiohttp.ClientSession, url: str, seeds: range, args: argparse.Namespace,
                    kill_after: int | None = None) -> dict[str, Any]:
    """Queue one prompt per seed and wait until each has ended; optionally SIGKILL a busy worker midway."""
    sid = f"bench-{seeds.start}"
    ended: set[str] = set()
    killed: dict[str, Any] | None = None
    async with session.ws_connect(f"{url}/ws?clientId={sid}") as ws:
        await ws.receive()
        began = time.perf_counter()
        ids = []
        for seed in seeds:
            async with session.post(f"{url}/prompt", json={"prompt": prompt(seed, args.steps, args.size),
                                                           "client_id": sid}) as resp:
                ids.append((await resp.json())["prompt_id"])
        deadline = time.monotonic() + args.timeout
        while len(ended) < len(ids) and time.monotonic() < deadline:
            try:
                msg = await ws.receive(timeout=5)
            except TimeoutError:
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            item = json.loads(msg.data)
            if item["type"] == "executing" and item["data"]["node"] is None:
                ended.add(item["data"]["prompt_id"])
                if kill_after is not None and killed is None and len(ended) >= kill_after:
                    killed = await kill_a_busy_worker(session, url)
        wall = time.perf_counter() - began
    async with session.get(f"{url}/history") as resp:
        history = await resp.json()
    succeeded = [i for i in ids if history.get(i, {}).get("status", {}).get("status_str") == "success"]
    return {"prompts": len(ids), "wall_s": wall, "succeeded": len(succeeded), "lost": len(ids) - len(succeeded),
            "rerun": sum(1 for i in ids if history.get(i, {}).get("meta", {}).get("attempts", 1) > 1),
            "killed": killed}


async def kill_a_busy_worker(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    for worker in await workers(session, url):
        if worker["state"] == "busy" and worker["pid"]:
            os.kill(worker["pid"], signal.SIGKILL)
            return worker
    return None


async def measure(base: Path, address: str, count: int, args: argparse.Namespace,
                  kill: bool = False) -> dict[str, Any]:
    server = Server(base, count, address)
    try:
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_ready(server.url, server.proc)
            await all_idle(session, server.url, count)
            offset = 1_000_000 * (count + (10 if kill else 0))
            await run_batch(session, server.url, range(offset, offset + count), args)  # one warm-up per worker
            result = await run_batch(session, server.url, range(offset + count, offset + count + args.prompts), args,
                                     kill_after=max(1, args.prompts // 10) if kill else None)
    finally:
        server.stop()
    result["throughput"] = result["succeeded"] / result["wall_s"]
    return result


def start_ray(cpus: int) -> str:
    """A local Ray instance for the servers to join (one start instead of one per server); its address."""
    context = ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                       logging_level="ERROR", log_to_driver=False)
    return context.address_info["gcs_address"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--steps", type=int, default=12, help="sampling steps per prompt")
    parser.add_argument("--size", type=int, default=128, help="image width and height")
    parser.add_argument("--counts", default="1,2,4", help="worker counts to measure (must include 1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for one batch")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    load_before = os.getloadavg()[0]
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="loom-scale-") as tmp:
        base = Path(tmp)
        write_demo_model(base)
        address = start_ray(max(counts))
        for count in counts:
            results[count] = asyncio.run(measure(base, address, count, args))
            r = results[count]
            print(f"{count} worker(s): {r['succeeded']}/{r['prompts']} prompts in {r['wall_s']:.1f} s = "
                  f"{r['throughput']:.3f} prompts/s ({r['wall_s'] / max(1, r['succeeded']) * count:.3f} s per "
                  f"prompt per worker)", flush=True)
        killed = asyncio.run(measure(base, address, 2, args, kill=True))
        ray.shutdown()
    worker = killed["killed"] or {}
    print(f"2 workers, {worker.get('name')} (pid {worker.get('pid')}) SIGKILLed mid-run: "
          f"{killed['succeeded']}/{killed['prompts']} succeeded, {killed['lost']} lost, {killed['rerun']} re-run, "
          f"{killed['throughput']:.3f} prompts/s")
    one = results[1]["throughput"]
    summary: dict[str, Any] = {f"throughput_{c}": round(r["throughput"], 4) for c, r in results.items()}
    summary.update({f"efficiency_{c}": round(r["throughput"] / (c * one), 3) for c, r in results.items() if c > 1})
    for count in counts:
        if count > 1:
            print(f"scaling efficiency at {count} workers: {summary[f'efficiency_{count}']:.3f}")
    summary.update(lost=killed["lost"], rerun_after_kill=killed["rerun"], killed=worker.get("name"),
                   prompts=args.prompts, steps=args.steps, size=args.size, cores=os.cpu_count(),
                   load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
