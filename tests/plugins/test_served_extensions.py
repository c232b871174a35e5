"""The example pack seen through the server: its nodes, its plugin record and its editor files."""

from pathlib import Path

import pytest

from nodes.folders import FolderPaths
from nodes.plugins import load_plugin_path
from nodes.registry import builtin_registry

web_app = pytest.importorskip("web.app", reason="the server (web/) is not in this tree")
web_state = pytest.importorskip("web.state")

PACK = Path(__file__).resolve().parents[2] / "examples" / "plugins" / "loom_example_pack"


async def test_example_pack_editor_extension_is_served(aiohttp_client, tmp_path):
    registry = builtin_registry()
    assert load_plugin_path(registry, PACK).loaded
    config = web_state.ServerConfig(data_dir=tmp_path / "user", run_worker=False)
    client = await aiohttp_client(web_app.create_app(config, registry, FolderPaths(base=tmp_path)))
    assert "/extensions/loom_example_pack/swatch.js" in await (await client.get("/extensions")).json()
    script = await client.get("/extensions/loom_example_pack/swatch.js")
    assert script.status == 200 and "registerExtension" in await script.text()
    assert (await client.get("/extensions/loom_example_pack/swatch.css")).status == 200
    (plugin,) = await (await client.get("/plugins")).json()
    assert plugin["name"] == "loom_example_pack" and plugin["node_names"] == [
        "ExampleInvert", "ExampleSwatch", "ExampleSwatchImage"]
    info = await (await client.get("/object_info/ExampleSwatch")).json()
    assert info["ExampleSwatch"]["output"] == ["SWATCH"]
    assert info["ExampleSwatch"]["python_module"] == "custom_nodes.loom_example_pack"
