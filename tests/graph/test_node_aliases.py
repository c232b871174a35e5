"""Old node ids ComfyUI's editor replaces as it loads a workflow (its nodes_replacements.py): T2IAdapterLoader,
SDV_img2vid_Conditioning and "ConditioningAverage " (with a trailing space) load as ControlNetLoader,
SVD_img2vid_Conditioning and ConditioningAverage, from API-format and UI-format workflows."""

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import RENAMED_NODES, parse_api
from graph.ui_format import ui_to_api
from graph.validate import validate
from ldm.presets import PRESETS, make_checkpoint
from ldm.t2i_adapter import T2IAdapter, adapter_config_for, save_t2i_adapter
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

MODULES = ("nodes.builtin.utils", "nodes.sd.loaders", "nodes.sd.conditioning", "nodes.sd.controlnet", "nodes.sd.svd")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("aliases")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "tiny.safetensors", seed=2)
    folder = root / "models" / "controlnet"
    folder.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        adapter = T2IAdapter(adapter_config_for(PRESETS["tiny-sd1"][2]))
    save_t2i_adapter(folder / "t2iadapter_tiny.safetensors", adapter, torch.float16)
    set_paths(FolderPaths(base=root))
    yield root
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def registry():
    return builtin_registry(MODULES)


@pytest.fixture(scope="module")
def engine(root, registry):
    return Executor(registry, services=Services.create(FolderPaths(base=root), force_cpu=True))


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def run(engine, graph: dict, *nodes: str) -> list:
    graph = {**graph, **{f"show_{n}": node("PreviewAny", source=[n, 0]) for n in nodes}}
    result = engine.run(parse_api(graph), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[n] for n in nodes]


PROMPTS = {"ckpt": node("CheckpointLoaderSimple", ckpt_name="tiny.safetensors"),
           "to": node("CLIPTextEncode", text="a red circle", clip=["ckpt", 1]),
           "from": node("CLIPTextEncode", text="a blue square on grass", clip=["ckpt", 1])}


def test_the_old_ids_are_comfyuis_and_not_listed_as_nodes(registry):
    assert {old: new for old, (new, _) in RENAMED_NODES.items()} == {
        "T2IAdapterLoader": "ControlNetLoader", "SDV_img2vid_Conditioning": "SVD_img2vid_Conditioning",
        "ConditioningAverage ": "ConditioningAverage"}
    assert not set(RENAMED_NODES) & set(builtin_registry().object_info())


def test_api_workflow_with_old_ids_runs_the_new_nodes(engine):
    graph = {**PROMPTS,
             "old_avg": node("ConditioningAverage ", conditioning_to=["to", 0], conditioning_from=["from", 0],
                             conditioning_to_strength=0.25),
             "old_adapter": node("T2IAdapterLoader", t2i_adapter_name="t2iadapter_tiny.safetensors"),
             "adapter": node("ControlNetLoader", control_net_name="t2iadapter_tiny.safetensors")}
    [(to, _)], [(source, _)], [(embedding, _)], old_adapter, adapter = [
        value[0] for value in run(engine, graph, "to", "from", "old_avg", "old_adapter", "adapter")]
    assert torch.allclose(embedding, 0.25 * to + 0.75 * source, atol=1e-6)  # ConditioningAverage's blend, by hand
    # ControlNetLoader's output for the same file: the adapter, with the same weights.
    assert type(old_adapter.model) is T2IAdapter and old_adapter.source == adapter.source
    old_weights, weights = old_adapter.model.state_dict(), adapter.model.state_dict()
    assert old_weights.keys() == weights.keys() and all(torch.equal(old_weights[k], weights[k]) for k in weights)


def test_sdv_img2vid_is_checked_as_svd_img2vid(registry):
    checked = validate(parse_api({"c": node("SDV_img2vid_Conditioning", width=1024, height=576, video_frames=14,
                                            motion_bucket_id=127, fps=6, augmentation_level=0.0)}),
                       registry, outputs=["c"])
    assert checked.graph.nodes["c"].class_type == "SVD_img2vid_Conditioning"
    missing = {(p.class_type, p.input_name) for p in checked.problems if p.type == "required_input_missing"}
    assert missing == {("SVD_img2vid_Conditioning", name) for name in ("clip_vision", "init_image", "vae")}


def test_ui_workflow_with_old_ids_converts_to_the_new_nodes_and_runs(engine, registry):
    document = {"links": [[1, 1, 1, 2, 0, "CLIP"], [2, 1, 1, 3, 0, "CLIP"], [3, 2, 0, 4, 0, "CONDITIONING"],
                          [4, 3, 0, 4, 1, "CONDITIONING"]], "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["tiny.safetensors"],
         "outputs": [{"name": "MODEL", "type": "MODEL"}, {"name": "CLIP", "type": "CLIP", "links": [1, 2]}]},
        {"id": 2, "type": "CLIPTextEncode", "widgets_values": ["a red circle"],
         "inputs": [{"name": "clip", "type": "CLIP", "link": 1}]},
        {"id": 3, "type": "CLIPTextEncode", "widgets_values": ["a blue square on grass"],
         "inputs": [{"name": "clip", "type": "CLIP", "link": 2}]},
        {"id": 4, "type": "ConditioningAverage ", "widgets_values": [0.25],
         "inputs": [{"name": "conditioning_to", "type": "CONDITIONING", "link": 3},
                    {"name": "conditioning_from", "type": "CONDITIONING", "link": 4}]},
        {"id": 5, "type": "T2IAdapterLoader", "widgets_values": ["t2iadapter_tiny.safetensors"]},
        {"id": 6, "type": "T2IAdapterLoader", "widgets_values": {"t2i_adapter_name": "t2iadapter_tiny.safetensors"}}]}
    api = ui_to_api(document, registry)
    assert api["4"]["class_type"] == "ConditioningAverage"
    assert api["4"]["inputs"] == {"conditioning_to": ["2", 0], "conditioning_from": ["3", 0],
                                  "conditioning_to_strength": 0.25}
    for adapter in ("5", "6"):
        assert api[adapter]["class_type"] == "ControlNetLoader"
        assert api[adapter]["inputs"] == {"control_net_name": "t2iadapter_tiny.safetensors"}
    graph = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    [(to, _)], [(source, _)], [(averaged, _)] = [value[0] for value in run(engine, graph, "2", "3", "4")]
    assert torch.allclose(averaged, 0.25 * to + 0.75 * source, atol=1e-6)


def test_an_old_id_a_plugin_registers_keeps_its_node_and_one_without_its_new_node_is_unknown(registry):
    from graph.document import Graph, GraphNode, current_id

    assert current_id("T2IAdapterLoader", {"T2IAdapterLoader", "ControlNetLoader"}) == ("T2IAdapterLoader", {})
    assert current_id("T2IAdapterLoader", {"LoadImage"}) == ("T2IAdapterLoader", {})
    assert current_id("KSampler", {"KSampler"}) == ("KSampler", {})
    graph = Graph({"1": GraphNode("1", "KSampler", {})})
    assert graph.with_current_ids(registry) is graph
    checked = validate(parse_api({"c": node("SDV_img2vid_Conditioning")}), builtin_registry(["nodes.builtin.utils"]),
                       outputs=["c"])
    assert any("node SDV_img2vid_Conditioning does not exist" in p.message for p in checked.problems)
