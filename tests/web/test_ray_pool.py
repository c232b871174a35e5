"""The server with `--workers ray`: a local Ray instance, 2 CPU workers (one thread each), the tiny checkpoint.

One Ray instance and one server with its pool of workers serve the whole module, in file order
(starting workers is the slow part). Waits are generous and nothing is timed: a loaded 2-core
machine may take a while, but never changes what must happen.
"""

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from tests.web.conftest import ADD
from tests.web.live import collect_run, history_of, marker, queue, shape, start, until
from tests.web.pack import web_registry
from web.state import STATE, ServerConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.asyncio(loop_scope="module")

from web.ray_pool import RayOptions  # noqa: E402  (needs Ray)

TXT2IMG = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "txt2img.json").read_text())


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False, namespace="loom-tests")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "tiny-a.safetensors", seed=1)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "tiny-b.safetensors", seed=2)
    paths = FolderPaths(base=root, bundled_models=None)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(ray_instance, folders):
    """One server with a pool of 2 workers for the whole module: starting workers is the slow part."""
    config = ServerConfig(data_dir=folders.base / "user", preview_interval_s=0.0,
                          ray=RayOptions(workers=2, registry=web_registry))
    client = await start(config, folders)
    yield client
    await client.close()


def txt2img(seed, ckpt="tiny-a.safetensors", steps=4):
    doc = json.loads(json.dumps(TXT2IMG))
    doc["4"]["inputs"]["ckpt_name"] = ckpt
    for node in doc.values():
        if node["class_type"] == "KSampler":
            node["inputs"].update(seed=seed, steps=steps)
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = "ray"
    return doc


async def workers(client):
    return (await (await client.get("/workers")).json())["workers"]


async def all_idle(client):
    async def check():
        found = await workers(client)
        return found if len(found) == 2 and all(w["state"] == "idle" for w in found) else None

    return await until(check, what="both workers started")


def pool(client):
    return client.app[STATE].worker


def saved_files(history, ids, folders):
    return {folders.output / image["subfolder"] / image["filename"]
            for i in ids for ui in history[i]["outputs"].values() for image in ui.get("images", [])}


async def test_affinity_sends_each_checkpoint_to_the_worker_that_has_it(client):
    """First of the pool's tests: both workers start with nothing loaded and no prompt run."""
    assert [(w["prompts"], w["held_models"]) for w in await all_idle(client)] == [(0, []), (0, [])]
    ran = {}
    for seed, name in enumerate(["tiny-a", "tiny-b", "tiny-a", "tiny-a", "tiny-b", "tiny-a", "tiny-b"]):
        resp = await client.post("/prompt?wait=true", json={"prompt": txt2img(seed, f"{name}.safetensors")})
        body = await resp.json()
        assert body["status"] == "success", body
        ran.setdefault(name, []).extend(pool(client).ran_on[body["prompt_id"]])
    # The fourth prompt (tiny-a) would go to the less used worker without affinity.
    assert set(ran["tiny-a"]) == {"ray-0"} and set(ran["tiny-b"]) == {"ray-1"}
    held = {w["name"]: w["held_models"] for w in await workers(client)}
    assert held == {"ray-0": ["checkpoints/tiny-a.safetensors"], "ray-1": ["checkpoints/tiny-b.safetensors"]}
    await client.post("/free", json={"unload_models": True})
    await until(lambda: unloaded(client), what="models unloaded on every worker")


async def test_prompts_spread_over_two_workers_into_the_server_output_folder(client, folders):
    await all_idle(client)
    before = set(folders.output.glob("*.png"))
    ids = await asyncio.gather(*(queue(client, txt2img(seed)) for seed in range(20, 26)))
    history = await history_of(client, ids)
    assert all(history[i]["status"]["status_str"] == "success" for i in ids)
    ran_on = pool(client).ran_on
    assert {name for i in ids for name in ran_on[i]} == {"ray-0", "ray-1"}
    files = saved_files(history, ids, folders)
    assert len(files) == 6 and set(folders.output.glob("*.png")) - before == set(files)
    with Image.open(min(files)) as image:
        assert json.loads(image.text["prompt"])["3"]["class_type"] == "KSampler"
    pids = {w["pid"] for w in await workers(client)}
    assert len(pids) == 2 and os.getpid() not in pids


async def unloaded(client):
    return all(not w["held_models"] for w in await workers(client))


async def warm(client, seeds):
    """Run prompts at once (one per idle worker), so that the loader and text encoders are cached everywhere."""
    for body in await asyncio.gather(*(client.post("/prompt?wait=true", json={"prompt": txt2img(seed)})
                                       for seed in seeds)):
        assert (await body.json())["status"] == "success"


async def test_progress_events_arrive_in_order_as_in_single_process_mode(client, folders):
    await all_idle(client)
    await warm(client, [30, 31])
    prompt = txt2img(7, steps=6)
    prompt_id, on_ray, ray_frames = await collect_run(client, prompt, "viewer")
    assert [m["data"]["value"] for m in on_ray if m["type"] == "progress"] == [1, 2, 3, 4, 5, 6]
    assert all(m["data"]["prompt_id"] == prompt_id for m in on_ray)

    local = await start(ServerConfig(data_dir=folders.base / "local", preview_interval_s=0.0), folders)
    try:
        await warm(local, [32])
        local_id, in_process, local_frames = await collect_run(local, prompt, "viewer")
    finally:
        await local.close()

    assert shape(on_ray, prompt_id) == shape(in_process, local_id)
    assert ray_frames == local_frames == 6


async def test_interrupt_reaches_the_worker_running_that_prompt(client, tmp_path):
    await all_idle(client)
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    keep = await queue(client, marker(short, 4))
    stop = await queue(client, marker(long, 120))
    await until(lambda: short.exists() and long.exists(), what="both prompts started")
    body = await (await client.post("/interrupt", json={"prompt_id": stop})).json()
    assert body == {"interrupted": True}
    history = await history_of(client, [keep, stop])
    assert history[stop]["status"]["status_str"] == "interrupted"
    assert history[keep]["status"]["status_str"] == "success"
    assert pool(client).ran_on[keep] != pool(client).ran_on[stop]


async def running_on(client, prompt_id):
    [worker] = await until(lambda: running(client, prompt_id), what=f"{prompt_id} running")
    return worker


async def running(client, prompt_id):
    return [w for w in await workers(client) if w["prompt_id"] == prompt_id and w["pid"]]


def _diagnose(extra, history, ids, victim, worker, ran_on) -> str:
    """What a failure needs to be understood: each extra file's seed and each prompt's attempts and workers."""
    from PIL import Image

    def seed(path):
        prompt = json.loads(Image.open(path).text.get("prompt", "{}"))
        return [n["inputs"].get("seed") for n in prompt.values() if n.get("class_type") == "KSampler"]

    lines = [f"victim {victim[:8]} on {worker['name']} pid {worker['pid']}"]
    lines += [f"extra {p.name}: seed {seed(p)}" for p in sorted(extra)]
    lines += [f"{i[:8]}: attempts {history[i]['meta'].get('attempts')} ran_on {ran_on.get(i)} "
              f"messages {[m[0] for m in history[i]['status']['messages']]}" for i in ids]
    return "\n".join(lines)


async def test_a_worker_killed_mid_run_loses_no_prompt_and_runs_none_twice(client, folders, tmp_path):
    await all_idle(client)
    before = set(folders.output.glob("*.png"))
    # The victim is surely mid-run when the kill lands: it has written its start to a file and runs on for seconds.
    # (Choosing it by its progress events failed in full-suite runs: those events reached the server only after the
    # worker had saved the run's image, so the kill re-ran a prompt that had finished.)
    path = tmp_path / "victim.txt"
    victim = await queue(client, marker(path, 5))
    ids = [await queue(client, txt2img(seed, steps=20)) for seed in range(100, 104)]
    await until(lambda: path.exists(), what="the victim started")
    worker = await running_on(client, victim)
    os.kill(worker["pid"], signal.SIGKILL)

    history = await history_of(client, [victim, *ids])
    assert all(history[i]["status"]["status_str"] == "success" for i in [victim, *ids])
    assert path.read_text().count("start") == 2  # killed once, run again once
    files = saved_files(history, ids, folders)
    extra = set(folders.output.glob("*.png")) - before - set(files)
    assert len(files) == 4 and not extra, _diagnose(extra, history, ids, victim, worker, pool(client).ran_on)
    killed = history[victim]
    assert killed["meta"]["attempts"] == 2 and pool(client).ran_on[victim][0] == worker["name"]
    [restarted] = [m for m in killed["status"]["messages"] if m[0] == "execution_restarted"]
    assert f"worker {worker['name']} (pid {worker['pid']}" in restarted[1]["reason"]
    assert [m[0] for m in killed["status"]["messages"]].count("execution_success") == 1
    assert all(len(pool(client).ran_on[i]) == 1 for i in ids)

    async def back():
        found = {w["name"]: w for w in await workers(client)}[worker["name"]]
        return found["state"] == "idle" and found["deaths"] == 1 and found["pid"] != worker["pid"]

    await until(back, what="the killed worker restarted")


async def test_a_prompt_is_failed_with_the_reason_when_its_attempts_are_used_up(client, tmp_path):
    await all_idle(client)
    path = tmp_path / "marker.txt"
    doomed = await queue(client, marker(path, 120))
    for attempt in (1, 2):  # the default max_attempts is 2: a worker dies under it twice
        await until(lambda n=attempt: path.exists() and path.read_text().count("start") == n, what="it started")
        os.kill((await running_on(client, doomed))["pid"], signal.SIGKILL)
    after = await queue(client, ADD)
    history = await history_of(client, [doomed, after])
    failed = history[doomed]
    assert failed["status"]["status_str"] == "error"
    error = failed["meta"]["error"]
    assert error["exception_type"] == "WorkerDied"
    assert "died while running this prompt (started 2 times); not run again" in error["exception_message"]
    assert [m[0] for m in failed["status"]["messages"]].count("execution_restarted") == 1
    assert path.read_text().count("start") == 2
    assert history[after]["status"]["status_str"] == "success"


async def test_a_clean_shutdown_puts_the_running_prompt_back(client, folders, tmp_path):
    """Last: it stops the module's server."""
    await all_idle(client)
    path = tmp_path / "marker.txt"
    prompt_id = await queue(client, marker(path, 120))
    await until(path.exists, what="the prompt started")
    await client.close()
    after = await start(ServerConfig(data_dir=folders.base / "user", run_worker=False), folders)
    try:
        assert (await (await after.get(f"/prompt/{prompt_id}")).json())["status"] == "pending"
    finally:
        await after.close()
