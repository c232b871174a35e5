"""POST /workflow/expand: what the editor shows of a file with subgraphs, group nodes or missing node types."""

import copy

from graph.ui_format import ui_to_api
from tests.web.pack import web_registry
from tests.web.test_browser_compat import GROUP_FILE, SD_SUBGRAPH_FILE, SUBGRAPH_FILE

NESTED = "0c7e2f4a-1b3d-4e5f-8a9b-6c7d8e9f0a1b"


def nested_file():
    """SUBGRAPH_FILE's definition used inside another subgraph, whose instance is muted."""
    doc = copy.deepcopy(SUBGRAPH_FILE)
    inner = doc["definitions"]["subgraphs"][0]
    doc["definitions"]["subgraphs"].append({
        "id": NESTED, "name": "Outer", "inputs": [{"name": "a", "type": "INT", "linkIds": [1]}],
        "outputs": [{"name": "INT", "type": "INT", "linkIds": [2]}],
        "nodes": [{"id": 5, "type": inner["id"], "pos": [100, 50], "size": [240, 90], "mode": 0,
                   "inputs": [{"name": "a", "type": "INT", "link": 1, "widget": {"name": "a"}},
                              {"name": "b", "type": "INT", "link": None, "widget": {"name": "b"}}],
                   "outputs": [{"name": "INT", "type": "INT", "links": [2]}], "widgets_values": [0, 3]}],
        "links": [[1, -10, 0, 5, 0, "INT"], [2, 5, 0, -20, 0, "INT"]]})
    doc["nodes"][1]["type"] = NESTED
    doc["nodes"][1]["mode"] = 2
    return doc


async def expand(client, workflow):
    resp = await client.post("/workflow/expand", json={"workflow": workflow})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_subgraph_instance_expanded_in_place_with_the_prompt_unchanged(client):
    answer = await expand(client, SUBGRAPH_FILE)
    assert answer["expanded"] == [{"id": 2, "kind": "subgraph", "name": "Multiply and save",
                                   "title": "Multiply and save", "nodes": 2, "mode": 0}]
    flat = answer["workflow"]
    nodes = {n["id"]: n for n in flat["nodes"]}
    assert set(nodes) == {1, "2:10", "2:11", 3}
    # The definition's layout moved to the instance's place (380, 80): its top-left node lands there.
    assert nodes["2:10"]["pos"] == [380, 80] and nodes["2:11"]["pos"] == [740, 220]
    assert nodes[3]["pos"][0] == 680 + (740 + 280 - 380) - 240 + 40  # pushed right by the growth, plus a gap
    assert nodes["2:10"]["widgets_values"] == [0, 7, "multiply"]  # the promoted value, in the widget
    # Each output lists the links that leave it now (the definition's own ids are gone).
    leaving = [link[0] for link in flat["links"] if link[1] == "2:10"]
    assert len(leaving) == 2 and nodes["2:10"]["outputs"][0]["links"] == leaving
    assert flat["definitions"] == {}
    registry = web_registry()
    shown, run = (ui_to_api(d, registry) for d in (flat, SUBGRAPH_FILE))
    assert {k: (v["class_type"], v["inputs"]) for k, v in shown.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in run.items()}


async def test_nested_and_muted_instances_stay_in_view_muted(client):
    answer = await expand(client, nested_file())
    nodes = {n["id"]: n for n in answer["workflow"]["nodes"]}
    assert set(nodes) == {1, "2:5:10", "2:5:11", 3}
    assert nodes["2:5:10"]["title"] == "Outer › Multiply and save › Int Math"  # outer, inner, node
    assert {nodes[i]["mode"] for i in ("2:5:10", "2:5:11")} == {2}
    assert answer["expanded"][0]["mode"] == 2
    assert nodes["2:5:10"]["widgets_values"] == [0, 3, "multiply"]


async def test_group_node_and_missing_types_sorted_as_validation_sorts_them(client):
    doc = copy.deepcopy(GROUP_FILE)
    doc["nodes"].append({"id": 8, "type": "CLIPTextEncodeHunyuanDiT", "pos": [0, 400], "mode": 0})
    answer = await expand(client, doc)
    assert [n["id"] for n in answer["workflow"]["nodes"]] == ["5:0", "5:1", 6, 7, 8]
    assert answer["missing"] == {"CLIPTextEncodeHunyuanDiT": "built-in", "FancyCustomUpscaler": "custom"}
    assert answer["workflow"]["groups"][0]["title"] == "Add and save (group node, expanded)"
    assert "groupNodes" not in answer["workflow"]["extra"]


async def test_api_format_and_plain_files_come_back_as_they_are(client):
    api = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 1}},
           "2": {"class_type": "SomePluginNode", "inputs": {"x": ["1", 0]}}}
    assert await expand(client, api) == {"workflow": api, "expanded": [], "missing": {"SomePluginNode": "custom"}}
    plain = {"nodes": [{"id": 1, "type": "PrimitiveInt", "widgets_values": [3]}], "links": []}
    assert (await expand(client, plain))["workflow"] == plain
    resp = await client.post("/workflow/expand", json={"workflow": [1, 2]})
    assert resp.status == 400 and "UI-format or API-format" in (await resp.json())["error"]["message"]


def test_sd_file_promoted_seed_keeps_its_control_word():
    from web.expand import expand_for_editor

    flat = expand_for_editor(SD_SUBGRAPH_FILE, web_registry())["workflow"]
    (sampler,) = [n for n in flat["nodes"] if n["id"] == "20:3"]
    assert sampler["widgets_values"] == [1234, "fixed", 2, 8, "euler", "normal", 1]
