"""ComfyUI's per-block merges of transformer models (Flux.1, SD3, LTX-Video and LTX-2, Wan, Qwen-Image), run through
the executor on tiny random-weight diffusion models loaded by UNETLoader, each weight checked against a transcription
of ComfyUI's ModelMergeBlocks.merge."""

import pytest
import safetensors
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from ldm.checkpoint import UNET_PREFIX, write_safetensors
from ldm.flux import config_metadata
from ldm.flux_presets import random_flux, tiny_flux_config
from ldm.ltx2_files import write_tiny_ltx2
from ldm.ltxv_files import write_tiny_ltxv
from ldm.qwen_image_files import write_tiny_qwen_image
from ldm.sd3_presets import VARIANTS, random_mmdit
from ldm.wan_files import write_tiny_wan
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

MODULES = ("nodes.builtin.utils", "nodes.sd.part_loaders", "nodes.sd.merge")
SPECIFIC = "advanced/model_merging/model_specific"


def numbered(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}." for i in range(count)]


SD3 = ["pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder."]
# ComfyUI's comfy_extras/nodes_model_merging_model_specific.py, transcribed: each node's ratio inputs in order.
COMFYUI = {
    "ModelMergeSD3_2B": [*SD3, *numbered("joint_blocks.", 24), "final_layer."],
    "ModelMergeFlux1": ["img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in.", *numbered("double_blocks.", 19),
                        *numbered("single_blocks.", 38), "final_layer."],
    "ModelMergeSD35_Large": [*SD3, *numbered("joint_blocks.", 38), "final_layer."],
    "ModelMergeLTXV": ["patchify_proj.", "adaln_single.", "caption_projection.",
                       *numbered("transformer_blocks.", 28), "scale_shift_table", "proj_out."],
    "ModelMergeWAN2_1": ["patch_embedding.", "time_embedding.", "time_projection.", "text_embedding.", "img_emb.",
                         *numbered("blocks.", 40), "head."],
    "ModelMergeQwenImage": ["pos_embeds.", "img_in.", "txt_norm.", "txt_in.", "time_text_embed.",
                            *numbered("transformer_blocks.", 60), "proj_out."],
}
WAN_DESCRIPTION = "1.3B model has 30 blocks, 14B model has 40 blocks. Image to video model has the extra img_emb."

# node, the tiny model files it merges (model1's, model2's), and the ComfyUI ratio inputs that name no weight of
# those models: the blocks past the tiny models' depth, Qwen-Image's weightless rotary embedding, and SD3's
# "pos_embed." (the weight is `pos_embed`, without a dot: in ComfyUI too it takes the first ratio, which is that one's).
CASES = {
    "flux": ("ModelMergeFlux1", "flux", {*numbered("double_blocks.", 19)[2:], *numbered("single_blocks.", 38)[2:]}),
    "sd3": ("ModelMergeSD3_2B", "sd3", {"pos_embed.", *numbered("joint_blocks.", 24)[2:]}),
    "sd35": ("ModelMergeSD35_Large", "sd35", {"pos_embed.", *numbered("joint_blocks.", 38)[3:]}),
    "ltxv": ("ModelMergeLTXV", "ltxv", set(numbered("transformer_blocks.", 28)[2:])),
    "ltx2": ("ModelMergeLTXV", "ltx2", set(numbered("transformer_blocks.", 28)[2:])),
    "wan": ("ModelMergeWAN2_1", "wan", set(numbered("blocks.", 40)[2:])),
    "qwen": ("ModelMergeQwenImage", "qwen", {"pos_embeds.", *numbered("transformer_blocks.", 60)[2:]}),
}


def write_pair(folder, kind: str) -> None:
    """Two tiny diffusion models of one kind, seeds 1 and 2, as `{kind}-1.safetensors` and `{kind}-2...`."""
    for seed in (1, 2):
        path = folder / f"{kind}-{seed}.safetensors"
        if kind == "flux":
            config = tiny_flux_config("dev")
            write_safetensors(random_flux(config, seed).state_dict(), path, config_metadata(config), torch.float16)
        elif kind in ("sd3", "sd35"):
            mmdit = random_mmdit(VARIANTS["sd3-medium" if kind == "sd3" else "sd3.5-large"], seed)
            write_safetensors({UNET_PREFIX + k: v for k, v in mmdit.state_dict().items()}, path, {}, torch.float16)
        elif kind == "ltxv":
            write_tiny_ltxv(path, seed)
        elif kind == "ltx2":
            write_tiny_ltx2(path, seed)
        elif kind == "wan":
            write_tiny_wan(path, "i2v", seed=seed)  # image-to-video: with img_emb
        else:
            write_tiny_qwen_image(path, seed=seed)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_families")
    folder = root / "models" / "diffusion_models"
    folder.mkdir(parents=True)
    for kind in ("flux", "sd3", "sd35", "ltxv", "ltx2", "wan", "qwen"):
        write_pair(folder, kind)
    write_tiny_wan(folder / "wan-t2v.safetensors", "t2v", seed=3)
    set_paths(FolderPaths(base=root))
    yield root
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(root):
    return Executor(builtin_registry(MODULES), services=Services.create(FolderPaths(base=root), force_cpu=True))


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def loaders(first: str, second: str) -> dict:
    return {"a": node("UNETLoader", unet_name=f"{first}.safetensors", weight_dtype="default"),
            "b": node("UNETLoader", unet_name=f"{second}.safetensors", weight_dtype="default")}


def run(engine, graph: dict, *nodes: str) -> list:
    graph = {**graph, **{f"show_{n}": node("PreviewAny", source=[n, 0]) for n in nodes}}
    result = engine.run(parse_api(graph), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[n][0] for n in nodes]


def comfyui_ratio(key: str, ratios: dict[str, float]) -> float:
    """ComfyUI's ModelMergeBlocks.merge: the ratio of the longest input name the key starts with, else the first
    ratio it was given."""
    ratio, longest = next(iter(ratios.values())), 0
    for prefix, value in ratios.items():
        if key.startswith(prefix) and len(prefix) > longest:
            ratio, longest = value, len(prefix)
    return ratio


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict(keep_vars=True)


def comfyui_keys(root, kind: str, loom_keys) -> dict[str, str]:
    """Loom's key -> ComfyUI's (the file's, without `model.diffusion_model.`): LTX-2's transformer is wrapped in a
    denoiser as `model`; each ComfyUI key is checked to be one the file holds."""
    with safetensors.safe_open(root / "models" / "diffusion_models" / f"{kind}-1.safetensors", "pt") as f:
        held = {key.removeprefix(UNET_PREFIX) for key in f.keys()}
    keys = {key: key.removeprefix("model.") if kind == "ltx2" else key for key in loom_keys}
    assert set(keys.values()) <= held
    return keys


# --- declarations --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(COMFYUI))
def test_declarations_are_comfyuis(name):
    info = builtin_registry(["nodes.sd.merge"]).get(name).object_info()
    ratio = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]
    expected = {"model1": ["MODEL", {}], "model2": ["MODEL", {}], **dict.fromkeys(COMFYUI[name], ratio)}
    required = {key: [kind, {k: v for k, v in opts.items() if k != "tooltip"}]
                for key, (kind, opts) in info["input"]["required"].items()}
    assert list(required.items()) == list(expected.items())
    assert info["input"]["optional"] == {}
    assert (info["output"], info["category"], info["output_node"]) == (["MODEL"], SPECIFIC, False)
    if name == "ModelMergeWAN2_1":
        assert info["description"] == WAN_DESCRIPTION


def test_a_ui_workflow_sets_the_ratios_by_widget_position():
    names = COMFYUI["ModelMergeFlux1"]
    ratios = [round(i / 100, 2) for i in range(len(names))]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 0, 2, 1, "MODEL"]]
    document = {"links": links, "nodes": [
        {"id": 1, "type": "UNETLoader", "inputs": [], "widgets_values": ["flux-1.safetensors", "default"],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1, 2]}]},
        {"id": 2, "type": "ModelMergeFlux1", "widgets_values": ratios,
         "inputs": [{"name": "model1", "type": "MODEL", "link": 1}, {"name": "model2", "type": "MODEL", "link": 2}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": []}]}]}
    inputs = ui_to_api(document, builtin_registry(MODULES))["2"]["inputs"]
    assert {name: inputs[name] for name in names} == dict(zip(names, ratios, strict=True))


# --- merging -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_every_weight_takes_the_ratio_comfyui_gives_its_key(engine, root, case):
    """Each input a different ratio: every merged weight is model1 * r + model2 * (1 - r) with ComfyUI's r for
    its key, and each ComfyUI prefix names weights of Loom's model but those the tiny model lacks."""
    name, kind, unmatched = CASES[case]
    names = COMFYUI[name]
    ratios = {prefix: round((7 + 13 * i) % 101 / 100, 2) for i, prefix in enumerate(names)}
    graph = {**loaders(f"{kind}-1", f"{kind}-2"), "m": node(name, model1=["a", 0], model2=["b", 0], **ratios)}
    model1, model2, merged = run(engine, graph, "a", "b", "m")
    first, second, result = weights(model1.unet), weights(model2.unet), weights(merged.unet)
    assert result.keys() == first.keys()
    comfyui = comfyui_keys(root, kind, first)
    for key, w1 in first.items():
        r = comfyui_ratio(comfyui[key], ratios)
        expected = (w1.float() * r + second[key].float() * (1 - r)).to(w1.dtype)
        assert torch.equal(result[key], expected), key
    assert {prefix for prefix in names if not any(key.startswith(prefix) for key in comfyui.values())} == unmatched
    assert merged.family is model1.family and "merged by blocks" in merged.loras[-1]


@pytest.mark.parametrize(("case", "block"), [("flux", "double_blocks.1."), ("flux", "single_blocks.0."),
                                             ("flux", "guidance_in"), ("sd3", "joint_blocks.1."),
                                             ("sd35", "y_embedder."), ("ltxv", "transformer_blocks.0."),
                                             ("ltxv", "scale_shift_table"), ("ltx2", "transformer_blocks.1."),
                                             ("wan", "blocks.1."), ("wan", "img_emb."),
                                             ("qwen", "transformer_blocks.0."), ("qwen", "txt_norm.")])
def test_one_input_at_zero_takes_exactly_its_weights_from_model2(engine, root, case, block):
    name, kind, _ = CASES[case]
    ratios = {**dict.fromkeys(COMFYUI[name], 1.0), block: 0.0}
    graph = {**loaders(f"{kind}-1", f"{kind}-2"), "m": node(name, model1=["a", 0], model2=["b", 0], **ratios)}
    model1, model2, merged = run(engine, graph, "a", "b", "m")
    first, second, result = weights(model1.unet), weights(model2.unet), weights(merged.unet)
    comfyui = comfyui_keys(root, kind, first)
    taken = [key for key in first if comfyui[key].startswith(block)]
    assert taken
    for key in first:
        if key in taken:
            assert torch.equal(result[key], second[key]) and not torch.equal(result[key], first[key]), key
        else:
            assert result[key] is first[key], key


def test_models_of_two_families_are_refused_before_anything_runs(engine):
    graph = {**loaders("flux-1", "wan-1"),
             "m": node("ModelMergeFlux1", model1=["a", 0], model2=["b", 0], **dict.fromkeys(COMFYUI["ModelMergeFlux1"],
                                                                                           0.5)),
             "show": node("PreviewAny", source=["m", 0])}
    with pytest.raises(WorkflowInvalid) as refused:
        engine.run(parse_api(graph))
    assert "model2 is an WAN21 model and model1 an FLUX one: only models of the same family can be merged" in str(
        refused.value.problems)


def test_two_wan_models_of_different_shapes_are_refused_by_name(engine):
    graph = {**loaders("wan-1", "wan-t2v"),
             "m": node("ModelMergeWAN2_1", model1=["a", 0], model2=["b", 0],
                       **dict.fromkeys(COMFYUI["ModelMergeWAN2_1"], 0.5)),
             "show": node("PreviewAny", source=["m", 0])}
    result = engine.run(parse_api(graph))
    assert not result.ok and (result.error.node_type, result.error.exception_type) == ("ModelMergeWAN2_1", "MergeError")
    message = result.error.exception_message
    assert "the models have different architectures" in message and "weights of model1 are missing" in message
    assert "cross_attn.k_img" in message  # the image-to-video model's own weights
