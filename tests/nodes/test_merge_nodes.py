"""ComfyUI's model merging and saving nodes, run through the executor on tiny random-weight checkpoints."""

import json
import shutil

import pytest
import safetensors
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import UNET_PREFIX, load_checkpoint, load_state_dict, load_vae, read_metadata
from ldm.presets import make_checkpoint
from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd import merge

# The packs these workflows use (the merge nodes and what loads, encodes, samples and previews around them).
MODULES = ("nodes.builtin.utils", "nodes.sd.loaders", "nodes.sd.conditioning", "nodes.sd.latent",
           "nodes.sd.sampling", "nodes.sd.vae", "nodes.sd.merge", "nodes.sd.patches")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    checkpoints = root / "models" / "checkpoints"
    make_checkpoint("tiny-sd1", checkpoints / "a.safetensors", seed=1)
    make_checkpoint("tiny-sd1", checkpoints / "b.safetensors", seed=2)
    make_checkpoint("tiny-sdxl", checkpoints / "xl.safetensors", seed=3)
    make_checkpoint("tiny-sdxl", checkpoints / "xl2.safetensors", seed=4)
    set_paths(FolderPaths(base=root))
    yield root
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(root):
    return Executor(builtin_registry(MODULES), services=Services.create(FolderPaths(base=root), force_cpu=True))


def loaders(*names: str) -> dict:
    """Checkpoint loaders "a", "b", ... for the files named."""
    return {chr(ord("a") + i): {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}
            for i, name in enumerate(names)}


def sampled(model: list, clip: list, tag: str) -> dict:
    """Prompt, latent and a KSampler on `model`; the KSampler is node `tag`."""
    return {f"{tag}p": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": clip}},
            f"{tag}n": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
            f"{tag}l": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            tag: {"class_type": "KSampler", "inputs": {
                "model": model, "seed": 3, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "karras",
                "positive": [f"{tag}p", 0], "negative": [f"{tag}n", 0], "latent_image": [f"{tag}l", 0],
                "denoise": 1.0}}}


def run(engine, graph: dict, *nodes: str) -> list:
    """The outputs of `nodes` (each previewed, so that it runs)."""
    graph = {**graph, **{f"show_{node}": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
                         for node in nodes}}
    result = engine.run(parse_api(graph), keep=list(nodes))
    assert result.ok, result.error
    return [result.values[node] for node in nodes]


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def expected(w1: torch.Tensor, w2: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """By hand: a * w1 + b * w2 in float32, rounded once to w1's dtype."""
    return (w1.float() * a + w2.float() * b).to(w1.dtype)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict(keep_vars=True)


# --- declarations --------------------------------------------------------------------------------------

RATIO = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]
MULTIPLIER = ["FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}]
SD1_BLOCKS = ["time_embed.", "label_emb.", *(f"input_blocks.{i}." for i in range(12)),
              *(f"middle_block.{i}." for i in range(3)), *(f"output_blocks.{i}." for i in range(12)), "out."]
SDXL_BLOCKS = ["time_embed.", "label_emb.", *(f"input_blocks.{i}" for i in range(9)),
               *(f"middle_block.{i}" for i in range(3)), *(f"output_blocks.{i}" for i in range(9)), "out."]
MODELS = {"model1": ["MODEL", {}], "model2": ["MODEL", {}]}
CLIPS = {"clip1": ["CLIP", {}], "clip2": ["CLIP", {}]}
# ComfyUI's comfy_extras/nodes_model_merging*.py: inputs in order, outputs, category, output node.
COMFYUI = {
    "ModelMergeSimple": ({**MODELS, "ratio": RATIO}, ["MODEL"], "advanced/model_merging", False),
    "ModelMergeBlocks": ({**MODELS, "input": RATIO, "middle": RATIO, "out": RATIO}, ["MODEL"],
                         "advanced/model_merging", False),
    "ModelMergeSubtract": ({**MODELS, "multiplier": MULTIPLIER}, ["MODEL"], "advanced/model_merging", False),
    "ModelMergeAdd": (MODELS, ["MODEL"], "advanced/model_merging", False),
    "CLIPMergeSimple": ({**CLIPS, "ratio": RATIO}, ["CLIP"], "advanced/model_merging", False),
    "CLIPMergeSubtract": ({**CLIPS, "multiplier": MULTIPLIER}, ["CLIP"], "advanced/model_merging", False),
    "CLIPMergeAdd": (CLIPS, ["CLIP"], "advanced/model_merging", False),
    "ModelMergeSD1": ({**MODELS, **dict.fromkeys(SD1_BLOCKS, RATIO)}, ["MODEL"],
                      "advanced/model_merging/model_specific", False),
    "ModelMergeSD2": ({**MODELS, **dict.fromkeys(SD1_BLOCKS, RATIO)}, ["MODEL"],
                      "advanced/model_merging/model_specific", False),
    "ModelMergeSDXL": ({**MODELS, **dict.fromkeys(SDXL_BLOCKS, RATIO)}, ["MODEL"],
                       "advanced/model_merging/model_specific", False),
    "CheckpointSave": ({"model": ["MODEL", {}], "clip": ["CLIP", {}], "vae": ["VAE", {}],
                        "filename_prefix": ["STRING", {"default": "checkpoints/ComfyUI"}]}, [],
                       "advanced/model_merging", True),
    "CLIPSave": ({"clip": ["CLIP", {}], "filename_prefix": ["STRING", {"default": "clip/ComfyUI"}]}, [],
                 "advanced/model_merging", True),
    "VAESave": ({"vae": ["VAE", {}], "filename_prefix": ["STRING", {"default": "vae/ComfyUI_vae"}]}, [],
                "advanced/model_merging", True),
    "ModelSave": ({"model": ["MODEL", {}], "filename_prefix": ["STRING", {"default": "diffusion_models/ComfyUI"}]},
                  [], "advanced/model_merging", True),
}


@pytest.mark.parametrize("name", sorted(COMFYUI))
def test_declarations_are_comfyuis(name):
    inputs, outputs, category, output_node = COMFYUI[name]
    info = builtin_registry(["nodes.sd.merge"]).get(name).object_info()
    required = {key: [kind, {k: v for k, v in opts.items() if k != "tooltip"}]
                for key, (kind, opts) in info["input"]["required"].items()}
    assert list(required.items()) == list(inputs.items())
    assert info["input"]["optional"] == {}
    assert (info["output"], info["category"], info["output_node"]) == (outputs, category, output_node)


def test_the_module_lists_every_node():
    families = ["ModelMergeSD3_2B", "ModelMergeFlux1", "ModelMergeSD35_Large", "ModelMergeLTXV", "ModelMergeWAN2_1",
                "ModelMergeQwenImage"]  # tests/nodes/test_model_merge_families.py
    assert sorted(cls.name for cls in merge.NODES) == sorted([*COMFYUI, "LoraSave", *families])


def test_lora_save_extracts_a_lora_that_load_lora_reads_back(engine, root):
    """ComfyUI's LoraSave on ModelMergeSubtract's difference of a LoRA'd model and its base: the file, moved to
    models/loras, makes nearly the LoRA'd model's image; its declaration is ComfyUI's."""
    import safetensors.torch

    info = builtin_registry(["nodes.sd.merge"]).get("LoraSave").object_info()
    assert list(info["input"]["required"]) == ["filename_prefix", "rank", "lora_type", "bias_diff"]
    assert list(info["input"]["optional"]) == ["model_diff", "text_encoder_diff"]
    assert info["input"]["required"]["lora_type"][0] == ["standard", "full_diff"] and info["output_node"]
    g = torch.Generator().manual_seed(7)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    loras = root / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({f"{name}.lora_down.weight": torch.randn(2, 32, generator=g) * 0.05,
                                 f"{name}.lora_up.weight": torch.randn(32, 2, generator=g) * 0.05},
                                loras / "tuned.safetensors")
    tuned = node("LoraLoaderModelOnly", model=["a", 0], lora_name="tuned.safetensors", strength_model=1.0)
    graph = {**loaders("a.safetensors"), "tuned": tuned,
             "diff": node("ModelMergeSubtract", model1=["tuned", 0], model2=["a", 0], multiplier=1.0),
             "save": node("LoraSave", filename_prefix="loras/extracted", rank=4, lora_type="full_diff",
                          bias_diff=True, model_diff=["diff", 0])}
    result = engine.run(parse_api(graph))
    assert result.ok, result.error
    [entry] = result.outputs["save"]["files"]
    shutil.copy(root / "output" / entry["subfolder"] / entry["filename"], loras / "extracted.safetensors")
    again = node("LoraLoaderModelOnly", model=["a", 0], lora_name="extracted.safetensors", strength_model=1.0)
    [(want,), (got,)] = run(engine, {**loaders("a.safetensors"), "tuned": tuned, "again": again,
                                     **sampled(["tuned", 0], ["a", 1], "k1"), **sampled(["again", 0], ["a", 1], "k2")},
                            "k1", "k2")
    torch.testing.assert_close(got["samples"], want["samples"], atol=1e-2, rtol=1e-3)
    empty = node("LoraSave", filename_prefix="loras/none", rank=4, lora_type="standard", bias_diff=True)
    nothing = engine.run(parse_api({"save": empty}))
    assert not nothing.ok and "nothing to extract: connect model_diff or text_encoder_diff" in str(nothing.error)


def test_a_comfyui_ui_workflow_sets_the_block_ratios_by_widget_position():
    from graph.ui_format import ui_to_api

    ratios = [round(i / 100, 2) for i in range(len(SD1_BLOCKS))]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 0, 2, 1, "MODEL"]]
    document = {"links": links, "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "inputs": [], "widgets_values": ["a.safetensors"],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1, 2]}]},
        {"id": 2, "type": "ModelMergeSD1", "widgets_values": ratios,
         "inputs": [{"name": "model1", "type": "MODEL", "link": 1}, {"name": "model2", "type": "MODEL", "link": 2}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": []}]}]}
    inputs = ui_to_api(document, builtin_registry(["nodes.sd.loaders", "nodes.sd.merge"]))["2"]["inputs"]
    assert {name: inputs[name] for name in SD1_BLOCKS} == dict(zip(SD1_BLOCKS, ratios, strict=True))
    assert (inputs["model1"], inputs["model2"]) == (["1", 0], ["1", 0])


# --- merging -------------------------------------------------------------------------------------------

def test_ratio_one_samples_model1s_latent_bit_for_bit(engine):
    graph = {**loaders("a.safetensors", "b.safetensors"),
             "m": node("ModelMergeSimple", model1=["a", 0], model2=["b", 0], ratio=1.0),
             **sampled(["m", 0], ["a", 1], "merged"), **sampled(["a", 0], ["a", 1], "plain")}
    (merged,), (plain,) = run(engine, graph, "merged", "plain")
    assert torch.equal(merged["samples"], plain["samples"])


def test_simple_merge_is_the_hand_computed_mix_and_leaves_the_loaded_models_alone(engine, root):
    graph = {**loaders("a.safetensors", "b.safetensors"),
             "m": node("ModelMergeSimple", model1=["a", 0], model2=["b", 0], ratio=0.25),
             **sampled(["m", 0], ["a", 1], "merged"), **sampled(["a", 0], ["a", 1], "plain")}
    (model1, _, _), (model2, _, _), (merged,), (latent,), (plain,) = run(engine, graph, "a", "b", "m", "merged",
                                                                         "plain")
    first, second, result = weights(model1.unet), weights(model2.unet), weights(merged.unet)
    for key in first:
        assert torch.equal(result[key], expected(first[key], second[key], 0.25, 0.75)), key
    for which, model in (("a", model1), ("b", model2)):
        fresh = load_checkpoint(root / "models" / "checkpoints" / f"{which}.safetensors").unet.state_dict()
        assert all(torch.equal(model.unet.state_dict()[k], fresh[k]) for k in fresh), which
    assert not torch.equal(latent["samples"], plain["samples"])
    assert merged.family is model1.family and merged.schedule is model1.schedule
    assert merged.source == "a.safetensors" and "b.safetensors" in merged.loras[-1]


def test_block_merges_take_each_keys_ratio_by_its_longest_prefix(engine):
    graph = {**loaders("a.safetensors", "b.safetensors"),
             "blocks": node("ModelMergeBlocks", model1=["a", 0], model2=["b", 0], input=1.0, middle=0.0, out=0.5),
             "sd1": node("ModelMergeSD1", model1=["a", 0], model2=["b", 0],
                         **{**dict.fromkeys(SD1_BLOCKS, 1.0), "input_blocks.1.": 0.0, "out.": 0.5})}
    (model1, _, _), (model2, _, _), (blocks,), (sd1,) = run(engine, graph, "a", "b", "blocks", "sd1")
    first, second = weights(model1.unet), weights(model2.unet)
    by_blocks, by_sd1 = weights(blocks.unet), weights(sd1.unet)
    for key in first:
        if key.startswith("middle_block."):
            assert torch.equal(by_blocks[key], second[key]), key
        elif key.startswith("out"):  # the output blocks and the final layer: "out" is a prefix of both
            assert torch.equal(by_blocks[key], expected(first[key], second[key], 0.5, 0.5)), key
        else:  # the input blocks, and the embeddings, which take the first ratio
            assert by_blocks[key] is first[key], key
        if key.startswith("input_blocks.1."):
            assert torch.equal(by_sd1[key], second[key]), key
        elif key.startswith("out."):
            assert torch.equal(by_sd1[key], expected(first[key], second[key], 0.5, 0.5)), key
        else:
            assert by_sd1[key] is first[key], key


def test_subtract_is_comfyuis_scaled_difference_and_add_puts_it_back(engine):
    graph = {**loaders("a.safetensors", "b.safetensors"),
             "sub": node("ModelMergeSubtract", model1=["a", 0], model2=["b", 0], multiplier=0.5),
             "add": node("ModelMergeAdd", model1=["sub", 0], model2=["b", 0])}
    (model1, _, _), (model2, _, _), (difference,), (total,) = run(engine, graph, "a", "b", "sub", "add")
    first, second = weights(model1.unet), weights(model2.unet)
    for key in first:
        halved = expected(first[key], second[key], 0.5, -0.5)
        assert torch.equal(weights(difference.unet)[key], halved), key
        assert torch.equal(weights(total.unet)[key], expected(halved, second[key], 1.0, 1.0)), key


def test_clip_merges_mix_the_encoders_and_keep_clip1s_settings(engine):
    graph = {**loaders("a.safetensors", "b.safetensors"),
             "skip": node("CLIPSetLastLayer", clip=["a", 1], stop_at_clip_layer=-2),
             "simple": node("CLIPMergeSimple", clip1=["skip", 0], clip2=["b", 1], ratio=0.25),
             "sub": node("CLIPMergeSubtract", clip1=["a", 1], clip2=["b", 1], multiplier=2.0),
             "add": node("CLIPMergeAdd", clip1=["a", 1], clip2=["b", 1]),
             "encoded": node("CLIPTextEncode", text="a red circle", clip=["simple", 0])}
    (_, clip1, _), (_, clip2, _), (simple,), (sub,), (add,), (encoded,) = run(
        engine, graph, "a", "b", "simple", "sub", "add", "encoded")
    first, second = weights(clip1.encoder), weights(clip2.encoder)
    for key in first:
        assert torch.equal(weights(simple.encoder)[key], expected(first[key], second[key], 0.25, 0.75)), key
        assert torch.equal(weights(sub.encoder)[key], expected(first[key], second[key], 2.0, -2.0)), key
        assert torch.equal(weights(add.encoder)[key], expected(first[key], second[key], 1.0, 1.0)), key
    assert simple.clip_skip == -2 and simple.family_name == "sd1"
    assert torch.isfinite(encoded[0][0]).all()


@pytest.mark.parametrize(("merge", "sockets"), [
    ("ModelMergeSimple", {"model1": ["a", 0], "model2": ["b", 0], "ratio": 0.5}),
    ("ModelMergeAdd", {"model1": ["b", 0], "model2": ["a", 0]}),
    ("CLIPMergeSimple", {"clip1": ["a", 1], "clip2": ["b", 1], "ratio": 0.5}),
])
def test_an_sd1_and_an_sdxl_model_are_refused_before_anything_runs(engine, merge, sockets):
    graph = {**loaders("a.safetensors", "xl.safetensors"), "m": node(merge, **sockets),
             "show": node("PreviewAny", source=["m", 0])}
    with pytest.raises(WorkflowInvalid) as refused:
        engine.run(parse_api(graph))
    assert "only models of the same family can be merged" in str(refused.value.problems)
    assert "SDXL" in str(refused.value.problems) and "SD1" in str(refused.value.problems)


def test_a_merge_of_values_of_two_families_is_refused_when_it_runs(engine):
    """Facts may be unknown before the run (a .ckpt has no header to read): the node still refuses."""
    (sd1, clip, _), (sdxl, clip_xl, _) = run(engine, loaders("a.safetensors", "xl.safetensors"), "a", "b")
    simple = merge.ModelMergeSimple()
    simple.ctx = NodeContext()
    with pytest.raises(ValueError, match="model2 is an SDXL model and model1 an SD1 one"):
        simple.execute(model1=sd1, model2=sdxl, ratio=0.5)
    add = merge.CLIPMergeAdd()
    add.ctx = NodeContext()
    with pytest.raises(ValueError, match="clip2 is an SD1 model and clip1 an SDXL one"):
        add.execute(clip1=clip_xl, clip2=clip)


def test_sdxl_block_merge_runs_on_sdxl_models(engine):
    graph = {**loaders("xl.safetensors", "xl2.safetensors"),
             "m": node("ModelMergeSDXL", model1=["a", 0], model2=["b", 0],
                       **{**dict.fromkeys(SDXL_BLOCKS, 1.0), "label_emb.": 0.0, "input_blocks.1": 0.5})}
    (model1, _, _), (model2, _, _), (merged,) = run(engine, graph, "a", "b", "m")
    first, second, result = weights(model1.unet), weights(model2.unet), weights(merged.unet)
    assert any(key.startswith("label_emb.") for key in first)
    for key in first:
        if key.startswith("label_emb."):
            assert torch.equal(result[key], second[key]), key
        elif key.startswith("input_blocks.1"):
            assert torch.equal(result[key], expected(first[key], second[key], 0.5, 0.5)), key
        else:
            assert result[key] is first[key], key


# --- saving --------------------------------------------------------------------------------------------

def test_a_saved_merge_loads_again_and_samples_the_same_latent(engine, root):
    graph = {**loaders("a.safetensors", "b.safetensors"),
             "m": node("ModelMergeSimple", model1=["a", 0], model2=["b", 0], ratio=0.4),
             "c": node("CLIPMergeSimple", clip1=["a", 1], clip2=["b", 1], ratio=0.6),
             "save": node("CheckpointSave", model=["m", 0], clip=["c", 0], vae=["b", 2],
                          filename_prefix="checkpoints/merged"),
             **sampled(["m", 0], ["c", 0], "before"), "show": node("PreviewAny", source=["before", 0])}
    result = engine.run(parse_api(graph), keep=["before"])
    assert result.ok, result.error
    assert result.outputs["save"] == {"files": [{"filename": "merged_00001_.safetensors", "subfolder": "checkpoints",
                                                 "type": "output"}]}
    saved = root / "output" / "checkpoints" / "merged_00001_.safetensors"
    original = root / "models" / "checkpoints" / "a.safetensors"
    assert load_state_dict(saved).keys() == load_state_dict(original).keys()  # the LDM layout ComfyUI writes
    metadata = read_metadata(saved)
    assert json.loads(metadata["prompt"])["m"]["class_type"] == "ModelMergeSimple"
    assert (metadata["loom.prediction"], metadata["modelspec.predict_key"]) == ("eps", "epsilon")
    shutil.copy(saved, root / "models" / "checkpoints" / "reloaded.safetensors")
    (after,) = run(engine, {**loaders("reloaded.safetensors"), **sampled(["a", 0], ["a", 1], "after")}, "after")
    assert torch.equal(after[0]["samples"], result.values["before"][0]["samples"])


def test_v_prediction_and_zero_snr_are_saved_as_comfyuis_marker_tensors_and_read_back(engine, root):
    """ModelSamplingDiscrete(v_prediction, zsnr) then CheckpointSave: the file carries `v_pred` and `ztsnr`, as
    ComfyUI writes them, so that it samples the same when loaded again here or in ComfyUI."""
    graph = {**loaders("a.safetensors"),
             "m": node("ModelSamplingDiscrete", model=["a", 0], sampling="v_prediction", zsnr=True),
             "save": node("CheckpointSave", model=["m", 0], clip=["a", 1], vae=["a", 2], filename_prefix="vz/x"),
             **sampled(["m", 0], ["a", 1], "before"), "show": node("PreviewAny", source=["before", 0])}
    result = engine.run(parse_api(graph), keep=["before"])
    assert result.ok, result.error
    saved = root / "output" / "vz" / "x_00001_.safetensors"
    state = load_state_dict(saved)
    assert state["v_pred"].numel() == 0 and state["ztsnr"].numel() == 0
    loaded = load_checkpoint(saved, text_encoder=False)
    assert (loaded.family.prediction, loaded.family.zero_snr) == ("v", True)
    assert not {"v_pred", "ztsnr"} & set(loaded.unused_keys)
    shutil.copy(saved, root / "models" / "checkpoints" / "vz.safetensors")
    (after,) = run(engine, {**loaders("vz.safetensors"), **sampled(["a", 0], ["a", 1], "after")}, "after")
    assert torch.equal(after[0]["samples"], result.values["before"][0]["samples"])
    # A file with the marker and no metadata of ours (ComfyUI's own save) is read as v-prediction too.
    plain = {k: v for k, v in load_state_dict(root / "models" / "checkpoints" / "a.safetensors").items()}
    plain["v_pred"] = torch.zeros(0)
    from safetensors.torch import save_file

    save_file(plain, root / "models" / "checkpoints" / "marked.safetensors")
    assert load_checkpoint(root / "models" / "checkpoints" / "marked.safetensors", text_encoder=False).family \
        .prediction == "v"


def test_a_checkpoint_of_two_families_parts_is_refused(engine, root):
    graph = {**loaders("a.safetensors", "xl.safetensors"),
             "save": node("CheckpointSave", model=["a", 0], clip=["b", 1], vae=["a", 2], filename_prefix="mixed/x")}
    with pytest.raises(WorkflowInvalid, match="Custom validation failed") as refused:
        engine.run(parse_api(graph))
    assert "the CLIP is an SDXL text encoder and the MODEL an SD1 UNet" in str(refused.value.problems)
    (model, _, vae), (_, clip, _) = checkpoint("a.safetensors"), checkpoint("xl.safetensors")
    saver = merge.CheckpointSave()
    saver.ctx = NodeContext()
    with pytest.raises(ValueError, match="a checkpoint holds the parts of one family"):
        saver.execute(model, clip, vae, "mixed/x")
    assert not (root / "output" / "mixed").exists()


def test_saves_are_numbered_and_never_overwrite(root):
    model, clip, vae = checkpoint("a.safetensors")
    names = []
    for _ in range(2):
        saver = merge.CheckpointSave()
        saver.ctx = NodeContext()
        names += [f["filename"] for f in saver.execute(model, clip, vae, "numbered/model").ui["files"]]
    assert names == ["model_00001_.safetensors", "model_00002_.safetensors"]
    with pytest.raises(ValueError, match="relative name inside the output folder"):
        saver.execute(model, clip, vae, "../outside")


def checkpoint(name: str) -> tuple:
    """MODEL, CLIP and VAE of a checkpoint, loaded outside an engine."""
    from nodes.sd.loaders import CheckpointLoaderSimple

    loader = CheckpointLoaderSimple()
    loader.ctx = NodeContext()
    return loader.execute(name)


def test_an_fp8_model_is_saved_in_full_precision_and_loads_back(engine, root):
    graph = {"a": node("CheckpointLoaderWeightDtype", ckpt_name="a.safetensors", weight_dtype="fp8_e4m3fn"),
             "save": node("CheckpointSave", model=["a", 0], clip=["a", 1], vae=["a", 2], filename_prefix="fp8/x")}
    result = engine.run(parse_api(graph), keep=["a"])
    assert result.ok, result.error
    saved = load_state_dict(root / "output" / "fp8" / "x_00001_.safetensors")
    assert not any(key.endswith("weight_scale") for key in saved)
    assert all(t.dtype == torch.float32 for t in saved.values())
    quantized = result.values["a"][0].unet
    layer = quantized.get_submodule("middle_block.1.proj_in")
    assert layer.weight.dtype == torch.float8_e4m3fn  # the loaded model is still fp8
    dense = layer.weight.float() * layer.weight_scale.float()
    assert torch.equal(saved[UNET_PREFIX + "middle_block.1.proj_in.weight"], dense)
    shutil.copy(root / "output" / "fp8" / "x_00001_.safetensors", root / "models" / "checkpoints" / "fp8.safetensors")
    assert load_checkpoint(root / "models" / "checkpoints" / "fp8.safetensors").unused_keys == []


def test_vae_save_writes_the_unprefixed_layout_load_vae_reads_with_its_scale(engine, root):
    graph = {**loaders("xl.safetensors"), "save": node("VAESave", vae=["a", 2], filename_prefix="vae/xl")}
    result = engine.run(parse_api(graph), keep=["a"])
    assert result.ok, result.error
    vae = result.values["a"][2].vae
    path = root / "output" / "vae" / "xl_00001_.safetensors"
    assert load_state_dict(path).keys() == vae.state_dict().keys()
    loaded = load_vae(path)
    assert loaded.unused_keys == [] and loaded.vae.scaling_factor == pytest.approx(0.13025)
    assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_clip_save_writes_one_transformers_file_per_encoder_that_loads_back(engine, root):
    from ldm.parts import load_text_encoders

    graph = {**loaders("xl.safetensors"), "save": node("CLIPSave", clip=["a", 1], filename_prefix="clip/xl")}
    result = engine.run(parse_api(graph), keep=["a"])
    assert result.ok, result.error
    assert [f["filename"] for f in result.outputs["save"]["files"]] == ["xl_clip_l_00001_.safetensors",
                                                                         "xl_clip_g_00001_.safetensors"]
    encoder = result.values["a"][1].encoder
    paths = [root / "output" / "clip" / f"xl_{name}_00001_.safetensors" for name in ("clip_l", "clip_g")]
    for path, name in zip(paths, ("clip_l", "clip_g"), strict=True):
        saved, own = load_state_dict(path), encoder.encoders[name].state_dict()
        assert saved.keys() == own.keys() and all(k.startswith(("text_model.", "text_projection.")) for k in saved)
        assert all(torch.equal(saved[k], own[k]) for k in own)
    assert "text_projection.weight" in load_state_dict(paths[1])
    loaded = load_text_encoders(paths)
    assert loaded.family == "sdxl"
    expected_encoding, encoding = encoder.encode(["a red circle"]), loaded.encoder.encode(["a red circle"])
    assert torch.equal(encoding.cond, expected_encoding.cond) and torch.equal(encoding.pooled, expected_encoding.pooled)


def test_model_save_writes_the_unet_under_checkpoint_keys_that_load_unet_reads(engine, root):
    from ldm.parts import load_unet

    graph = {**loaders("a.safetensors", "b.safetensors"),
             "m": node("ModelMergeSimple", model1=["a", 0], model2=["b", 0], ratio=0.5),
             "save": node("ModelSave", model=["m", 0], filename_prefix="diffusion_models/unet")}
    result = engine.run(parse_api(graph), keep=["m"])
    assert result.ok, result.error
    unet = result.values["m"][0].unet
    path = root / "output" / "diffusion_models" / "unet_00001_.safetensors"
    with safetensors.safe_open(path, framework="pt") as f:
        assert set(f.keys()) == {UNET_PREFIX + k for k in unet.state_dict()}
    loaded = load_unet(path)
    assert (loaded.family.name, loaded.family.prediction, loaded.unused_keys) == ("sd1", "eps", [])
    assert loaded.family.unet_config == unet.config
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in unet.state_dict().items())


def test_a_merge_counts_its_own_weights_in_the_output_cache(engine):
    """A merged UNet's new tensors live only in the merge node's output: the cache budgets them."""
    (loaded, _, _), (merged,), (whole,) = run(engine, {**loaders("a.safetensors", "b.safetensors"),
                                                  "m": node("ModelMergeBlocks", model1=["a", 0], model2=["b", 0],
                                                            input=0.5, middle=1.0, out=1.0),
                                                  "w": node("ModelMergeSimple", model1=["a", 0], model2=["b", 0],
                                                            ratio=0.5)}, "a", "m", "w")
    unet_bytes = sum(t.numel() * t.element_size() for t in loaded.unet.state_dict().values())
    assert loaded.cache_size() < 2048  # the loader's model belongs to the model cache
    assert 0 < merged.cache_size() < whole.cache_size() <= unet_bytes + 2048  # only the input blocks are new
