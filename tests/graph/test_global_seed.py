"""ComfyUI's GlobalSeedNode: before a workflow runs, its seed goes to the constant `seed` inputs in its scope (every
node, or those linked to it), those at 0 or all of them; a node one seeder set, later ones leave; a linked seed sets
none. Checked on the graph and through the executor (ImageAddNoise's seeded noise) and a ComfyUI editor file."""

from __future__ import annotations

import logging

import torch

from executor.executor import Executor
from graph.document import parse_api
from graph.ui_format import ui_to_api
from nodes.registry import builtin_registry


def seeder(seed, mode="placeholders only", is_global=True) -> dict:
    return {"class_type": "GlobalSeedNode", "inputs": {"seed": seed, "mode": mode, "global": is_global}}


def noise(seed, source="img") -> dict:
    return {"class_type": "ImageAddNoise", "inputs": {"image": [source, 0], "seed": seed, "strength": 0.5}}


def image() -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}


def seeds(api: dict) -> dict[str, object]:
    graph = parse_api(api).with_global_seeds()
    return {nid: node.inputs.get("seed") for nid, node in graph.nodes.items() if nid != "g" and "seed" in node.inputs}


def test_placeholders_only_sets_the_zero_seeds_and_overwrite_all_every_one() -> None:
    api = {"g": seeder(7), "img": image(), "a": noise(0), "b": noise(5)}
    assert seeds(api) == {"a": 7, "b": 5}
    api["g"] = seeder(7, "overwrite all")
    assert seeds(api) == {"a": 7, "b": 7}


def test_local_scope_is_what_links_join_to_the_node_either_way() -> None:
    """A local seeder linked into `a`'s chain (a PreviewAny of its seed) reaches `a` and the nodes linked to it,
    not the separate chain of `b`."""
    api = {"g": seeder(9, "overwrite all", False), "img": image(), "img2": image(), "a": noise(1),
           "b": noise(2, "img2"), "show": {"class_type": "PreviewAny", "inputs": {"source": ["g", 0]}},
           "a2": {"class_type": "ImageAddNoise", "inputs": {"image": ["a", 0], "seed": 3, "strength": 0.1}}}
    assert seeds(api) == {"a": 1, "b": 2, "a2": 3}  # `show` joins g to nothing with a seed
    api["a"]["inputs"]["strength"] = 0.5
    api["mix"] = {"class_type": "ImageBlend", "inputs": {"image1": ["a", 0], "image2": ["show", 0],
                                                          "blend_factor": 0.5, "blend_mode": "normal"}}
    assert seeds(api) == {"a": 9, "b": 2, "a2": 9}


def test_the_first_seeder_wins_and_a_linked_seed_sets_none(caplog) -> None:
    api = {"g": seeder(7, "overwrite all"), "h": seeder(8, "overwrite all"), "img": image(), "a": noise(0)}
    graph = parse_api(api).with_global_seeds()
    assert graph.nodes["a"].inputs["seed"] == 7 and graph.nodes["h"].inputs["seed"] == 7  # g's scope holds h
    api = {"int": {"class_type": "PrimitiveInt", "inputs": {"value": 4}}, "g": seeder(["int", 0], "overwrite all"),
           "img": image(), "a": noise(0)}
    with caplog.at_level(logging.WARNING, logger="graph.document"):
        assert seeds(api) == {"a": 0}
    assert "its seed is linked" in caplog.text
    api = {"img": image(), "a": noise(0)}
    assert parse_api(api).with_global_seeds().nodes["a"].inputs["seed"] == 0


def test_a_workflow_runs_with_the_seeds_it_sets() -> None:
    """ImageAddNoise at seed 0 under a GlobalSeedNode of seed 11 draws the noise of seed 11; the seeder outputs it."""
    engine = Executor(builtin_registry())
    ran = engine.run(parse_api({"g": seeder(11), "img": image(), "a": noise(0),
                                "show": {"class_type": "PreviewAny", "inputs": {"source": ["g", 0]}},
                                "p": {"class_type": "PreviewImage", "inputs": {"images": ["a", 0]}}}), keep=["a", "g"])
    direct = engine.run(parse_api({"img": image(), "a": noise(11),
                                   "p": {"class_type": "PreviewImage", "inputs": {"images": ["a", 0]}}}), keep=["a"])
    assert ran.ok and direct.ok, (ran.error, direct.error)
    assert torch.equal(ran.values["a"][0], direct.values["a"][0]) and ran.values["g"] == (11,)
    zero = engine.run(parse_api({"img": image(), "a": noise(0),
                                 "p": {"class_type": "PreviewImage", "inputs": {"images": ["a", 0]}}}), keep=["a"])
    assert not torch.equal(zero.values["a"][0], direct.values["a"][0])


def test_a_comfyui_editor_file_and_the_declaration() -> None:
    registry = builtin_registry()
    info = registry.get("GlobalSeedNode").object_info()
    assert list(info["input"]["required"]) == ["seed", "mode", "global"]
    assert info["input"]["required"]["seed"][1]["control_after_generate"] == "fixed"
    assert info["category"] == "utils/seed" and info["output"] == ["INT"]
    ui = {"nodes": [{"id": 1, "type": "GlobalSeedNode", "inputs": [], "outputs": [],
                     "widgets_values": [42, "fixed", "overwrite all", False]}], "links": []}
    assert ui_to_api(ui, registry)["1"]["inputs"] == {"seed": 42, "mode": "overwrite all", "global": False}
