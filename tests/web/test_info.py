"""Node, model, plugin and system information routes, and the JSON shape of unknown routes."""

import json

from nodes.registry import PluginInfo


async def test_object_info(client):
    info = await (await client.get("/object_info")).json()
    assert info["IntMath"]["input"]["required"]["operation"][0][0] == "add"
    assert info["SaveTestImage"]["output_node"] is True
    one = await (await client.get("/api/object_info/IntMath")).json()
    assert list(one) == ["IntMath"]
    missing = await client.get("/object_info/Nope")  # as ComfyUI answers it
    assert missing.status == 200 and await missing.json() == {}


async def test_models(client, paths):
    (paths.base / "models" / "checkpoints" / "sub").mkdir(parents=True)
    (paths.base / "models" / "checkpoints" / "sub" / "tiny.safetensors").write_bytes(b"x")
    (paths.base / "models" / "checkpoints" / "notes.txt").write_text("x")
    assert "checkpoints" in await (await client.get("/models")).json()
    assert await (await client.get("/models/checkpoints")).json() == ["sub/tiny.safetensors"]
    assert await (await client.get("/api/models/loras")).json() == []
    for folder in ("nope", "checkpoints..", "%2e%2e%2fcheckpoints"):
        assert (await client.get(f"/models/{folder}")).status == 404
    assert await (await client.get("/embeddings")).json() == []


async def test_system_stats(client):
    stats = await (await client.get("/system_stats")).json()
    assert stats["system"]["python_version"] and stats["system"]["ram_total"] > 0
    assert stats["devices"][0]["type"] in ("cpu", "cuda")


async def test_plugins_and_their_extensions(make_app, aiohttp_client, tmp_path):
    web_dir = tmp_path / "plugin_web"
    (web_dir / "js").mkdir(parents=True)
    (web_dir / "js" / "ext.js").write_text("console.log('hi')")
    (tmp_path / "secret.js").write_text("secret")
    app = make_app()
    from web.state import STATE

    app[STATE].registry.plugins = [
        PluginInfo("fancy", str(tmp_path), True, node_names=["X"], web_dir=web_dir),
        PluginInfo("broken", "/x", False, error="ImportError: no module y"),
    ]
    client = await aiohttp_client(app)
    plugins = await (await client.get("/plugins")).json()
    assert plugins[1] == {"name": "broken", "source": "/x", "loaded": False, "error": "ImportError: no module y",
                          "import_s": 0.0, "node_names": [], "web_dir": None}
    assert await (await client.get("/extensions")).json() == ["/extensions/fancy/js/ext.js"]
    assert await (await client.get("/extensions/fancy/js/ext.js")).text() == "console.log('hi')"
    assert (await client.get("/extensions/fancy/../secret.js")).status in (400, 404)
    assert (await client.get("/extensions/fancy/%2e%2e/secret.js")).status in (400, 404)
    assert (await client.get("/extensions/other/js/ext.js")).status == 404


async def test_unknown_route_and_method_answer_json(client):
    resp = await client.get("/no/such/route")
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"
    resp = await client.delete("/prompt")
    assert resp.status == 405 and (await resp.json())["error"]["type"] == "method_not_allowed"


async def test_editor_is_served(client):
    page = await client.get("/")
    assert page.status == 200 and "<title>Loom" in await page.text()
    for path in ("/static/js/app.js", "/static/vendor/litegraph/litegraph.core.js", "/static/style.css"):
        assert (await client.get(path)).status == 200, path
    assert (await client.get("/static/../web/app.py")).status == 404
    assert (await client.get("/static/%2e%2e/app.py")).status in (403, 404)


async def test_example_workflows(client):
    from web.state import EXAMPLE_WORKFLOWS

    names = await (await client.get("/workflows")).json()
    assert "txt2img" in names and names == sorted(names)
    for path in ("/workflows/txt2img", "/api/workflows/txt2img.json"):
        resp = await client.get(path)
        assert resp.status == 200
        assert await resp.json() == json.loads((EXAMPLE_WORKFLOWS / "txt2img.json").read_text())
    for name in ("nope", "..%2Ftxt2img", "%2e%2e%2fREADME.md", "README.md"):
        resp = await client.get(f"/workflows/{name}")
        assert resp.status == 404 and (await resp.json())["error"]["type"] == "not_found"


async def test_example_workflows_folder_missing(make_app, aiohttp_client, tmp_path):
    client = await aiohttp_client(make_app(workflows_dir=tmp_path / "none"))
    assert await (await client.get("/workflows")).json() == []
    assert (await client.get("/workflows/txt2img")).status == 404
