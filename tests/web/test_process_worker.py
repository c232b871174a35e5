"""The server's default worker: prompts run in a child process (web.process_worker), driven over a pipe.

One server and its worker process serve the module, in file order (starting a child that imports torch
is the slow part). Nothing is timed; waits are generous for a loaded 2-core machine.
"""

import os
import signal

import pytest
import pytest_asyncio

from nodes.folders import FolderPaths, set_paths
from tests.web.conftest import ADD, slow_prompt
from tests.web.live import collect_run, history_of, marker, queue, shape, start, until
from tests.web.pack import web_registry
from web.runner import WorkerSpec
from web.state import STATE, ServerConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    paths = FolderPaths(base=tmp_path_factory.mktemp("process"), bundled_models=None)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def config(folders, name="user", **options):
    spec = WorkerSpec(paths=folders, registry=web_registry, threads=1, preview_interval_s=0.0)
    return ServerConfig(data_dir=folders.base / name, preview_interval_s=0.0, worker_process=spec, **options)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(folders):
    client = await start(config(folders), folders)
    yield client
    await client.close()


async def worker(client):
    [found] = (await (await client.get("/workers")).json())["workers"]
    return found


async def ready(client):
    return await until(lambda: _idle(client), what="the worker process started")


async def _idle(client):
    found = await worker(client)
    return found if found["state"] == "idle" else None


async def test_prompts_run_in_a_child_process_with_the_same_messages_as_on_a_thread(client, folders):
    found = await ready(client)
    assert found["pid"] != os.getpid() and found["device"] == "cpu"
    prompt_id, in_child, child_frames = await collect_run(client, slow_prompt(steps=4), "viewer")
    assert [m["data"]["value"] for m in in_child if m["type"] == "progress"] == [1, 2, 3, 4]

    threaded = await start(ServerConfig(data_dir=folders.base / "thread", preview_interval_s=0.0), folders)
    try:
        local_id, on_thread, thread_frames = await collect_run(threaded, slow_prompt(steps=4), "viewer")
    finally:
        await threaded.close()

    assert shape(in_child, prompt_id) == shape(on_thread, local_id)
    assert child_frames == thread_frames == 4
    history = await history_of(client, [prompt_id])
    assert history[prompt_id]["status"]["status_str"] == "success"


async def test_wait_true_answers_with_the_outputs(client):
    await ready(client)
    resp = await client.post("/prompt?wait=true", json={"prompt": ADD})
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "success"
    assert body["outputs"] == {"3": {"text": ["42"]}}


async def test_interrupt_reaches_the_child(client, tmp_path):
    await ready(client)
    prompt_id = await queue(client, marker(tmp_path / "long.txt", 120))
    await until((tmp_path / "long.txt").exists, what="the prompt started")
    assert await (await client.post("/interrupt", json={"prompt_id": "someone-else"})).json() == {"interrupted": False}
    assert await (await client.post("/interrupt", json={"prompt_id": prompt_id})).json() == {"interrupted": True}
    history = await history_of(client, [prompt_id])
    assert history[prompt_id]["status"]["status_str"] == "interrupted"


async def test_a_child_killed_mid_run_is_replaced_and_its_prompt_runs_again(client, tmp_path):
    before = await ready(client)
    path = tmp_path / "marker.txt"
    victim = await queue(client, marker(path, 6))  # still running when the kill lands, on a loaded machine too
    after = await queue(client, ADD)
    await until(path.exists, what="the prompt started")
    os.kill(before["pid"], signal.SIGKILL)

    history = await history_of(client, [victim, after])
    assert history[victim]["status"]["status_str"] == "success"
    assert history[victim]["meta"]["attempts"] == 2
    assert path.read_text().count("start") == 2
    [restarted] = [m for m in history[victim]["status"]["messages"] if m[0] == "execution_restarted"]
    assert f"the worker process (pid {before['pid']}) died while running this prompt" in restarted[1]["reason"]
    assert history[after]["outputs"] == {"3": {"text": ["42"]}}
    now = await ready(client)
    assert now["pid"] != before["pid"] and now["deaths"] == before["deaths"] + 1


async def test_a_prompt_is_failed_with_the_reason_when_its_attempts_are_used_up(client, tmp_path):
    await ready(client)
    path = tmp_path / "marker.txt"
    doomed = await queue(client, marker(path, 120))
    for attempt in (1, 2):
        await until(lambda n=attempt: path.exists() and path.read_text().count("start") == n, what="it started")
        os.kill((await worker(client))["pid"], signal.SIGKILL)
    after = await queue(client, ADD)
    history = await history_of(client, [doomed, after])
    error = history[doomed]["meta"]["error"]
    assert history[doomed]["status"]["status_str"] == "error" and error["exception_type"] == "WorkerDied"
    assert "died while running this prompt (started 2 times); not run again" in error["exception_message"]
    assert history[after]["status"]["status_str"] == "success"


async def test_a_clean_shutdown_puts_the_running_prompt_back_and_stops_the_child(client, folders, tmp_path):
    """Last: it stops the module's server."""
    child = (await ready(client))["pid"]
    path = tmp_path / "marker.txt"
    prompt_id = await queue(client, marker(path, 120))
    await until(path.exists, what="the prompt started")
    assert client.app[STATE].worker.current.record.id == prompt_id
    await client.close()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # joined: gone, not a zombie
    after = await start(ServerConfig(data_dir=folders.base / "user", run_worker=False), folders)
    try:
        assert (await (await after.get(f"/prompt/{prompt_id}")).json())["status"] == "pending"
    finally:
        await after.close()
