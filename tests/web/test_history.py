"""GET/POST /history: the entry shape, max_items, offset paging, delete, clear and the cap."""

from tests.web.conftest import ADD, image_prompt


async def run(client, prompt):
    body = await (await client.post("/prompt/wait", json={"prompt": prompt, "client_id": "me"})).json()
    return body["prompt_id"]


async def test_history_entry_shape(client):
    prompt_id = await run(client, image_prompt(7))
    history = await (await client.get("/history")).json()
    entry = history[prompt_id]
    number, pid, prompt, extra, outputs = entry["prompt"]
    assert pid == prompt_id and prompt["1"]["class_type"] == "SaveTestImage"
    assert extra == {"client_id": "me"} and outputs == ["1"]
    assert entry["outputs"]["1"]["images"][0]["filename"].startswith("t_007_")
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert kinds == ["execution_start", "execution_cached", "execution_success"]
    assert entry["meta"]["duration_s"] >= 0
    one = await (await client.get(f"/api/history/{prompt_id}")).json()
    assert one == {prompt_id: entry}


async def test_max_items_delete_and_clear(client):
    ids = [await run(client, ADD) for _ in range(3)]
    recent = await (await client.get("/history?max_items=2")).json()
    assert list(recent) == ids[1:]
    assert (await client.get("/history?max_items=x")).status == 400
    assert (await client.get("/history?max_items=0")).status == 400
    deleted = await (await client.post("/history", json={"delete": [ids[0]]})).json()
    assert deleted == {"deleted": [ids[0]]}
    assert list(await (await client.get("/history")).json()) == ids[1:]
    deleted_entry = await client.get(f"/history/{ids[0]}")  # ComfyUI's answer for an id it does not know
    assert deleted_entry.status == 200 and await deleted_entry.json() == {}
    await client.post("/history", json={"clear": True})
    assert await (await client.get("/history")).json() == {}
    assert (await client.post("/history", json={"delete": 3})).status == 400


async def test_offset_pages_from_the_oldest_as_comfyui_does(client):
    ids = [await run(client, ADD) for _ in range(5)]
    page = await client.get("/history?offset=1&max_items=2")
    assert list(await page.json()) == ids[1:3]
    assert page.headers["X-Total-Count"] == "5"
    assert list(await (await client.get("/history?offset=3")).json()) == ids[3:]
    assert list(await (await client.get("/history?offset=0&max_items=2")).json()) == ids[:2]
    assert await (await client.get("/history?offset=5")).json() == {}
    newest = await client.get("/history?max_items=2")
    assert list(await newest.json()) == ids[3:] and newest.headers["X-Total-Count"] == "5"
    for default in ("-1", "-7", "-" + "9" * 30):  # ComfyUI's default offset is -1: the newest max_items
        assert list(await (await client.get(f"/history?offset={default}&max_items=2")).json()) == ids[3:]
    for bad in ("x", "1.5"):
        answer = await client.get(f"/history?offset={bad}&max_items=2")
        assert answer.status == 400
        assert "'offset'" in (await answer.json())["error"]["message"]
    huge = "9" * 30  # past SQLite's 64-bit integers: all of them, or none after the end
    assert list(await (await client.get(f"/history?max_items={huge}")).json()) == ids
    assert await (await client.get(f"/history?offset={huge}&max_items=1")).json() == {}


async def test_history_cap_keeps_the_newest(make_app, aiohttp_client):
    client = await aiohttp_client(make_app(history_cap=2))
    ids = [await run(client, ADD) for _ in range(4)]
    assert list(await (await client.get("/history")).json()) == ids[2:]
