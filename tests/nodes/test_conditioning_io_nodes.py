"""SaveConditioning and ConditioningLoader (ComfyUI's safetensors layout: the embedding, tensor options, lists as
NAME.0, NAME.1, plain options as JSON metadata), and CLIPTextEncodeControlnet's ControlNet prompt options."""

import json
import shutil

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.conditioning import ConditioningLoader, SaveConditioning

# name: (display name, category, required inputs, outputs, output node)
INTERFACES = {
    "CLIPTextEncodeControlnet": ("CLIP Text Encode (Controlnet)", "model/conditioning",
                                 ["clip", "conditioning", "text"], ["CONDITIONING"], False),
    "SaveConditioning": ("Save Conditioning", "model/conditioning", ["conditioning", "filename_prefix"], [], True),
    "ConditioningLoader": ("Load Conditioning", "model/loaders", ["conditioning_name"], ["CONDITIONING"], False),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditioning_io")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    (root / "models" / "embeddings").mkdir(parents=True)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def run(engine, wf: dict, *keep: str):
    result = engine.run(parse_api(wf), keep=list(keep), outputs=list(keep))
    assert result.ok, result.error
    return result


@pytest.mark.parametrize("name", sorted(INTERFACES))
def test_declarations_match_comfyui(engine, name):
    display, category, required, outputs, output_node = INTERFACES[name]
    info = engine.registry.get(name).object_info()
    assert (info["display_name"], info["category"], info["output_node"]) == (display, category, output_node)
    assert info["input_order"] == {"required": required, "optional": []}
    assert info["output"] == outputs
    if name == "SaveConditioning":
        assert info["input"]["required"]["filename_prefix"][1]["default"] == "conditioning/ComfyUI"
    if name == "CLIPTextEncodeControlnet":
        assert info["input"]["required"]["text"][1]["multiline"] is True


def test_a_conditioning_saved_and_loaded_back_is_the_same(engine):
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
          "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
          "3": {"class_type": "ConditioningSetAreaStrength", "inputs": {"conditioning": ["2", 0], "strength": 0.5}},
          "4": {"class_type": "SaveConditioning", "inputs": {"conditioning": ["3", 0], "filename_prefix": "cond/cat"}}}
    result = run(engine, wf, "3", "4")
    assert result.outputs["4"]["files"] == [{"filename": "cat_00001_.safetensors", "subfolder": "cond",
                                             "type": "output"}]
    saved = engine.services.paths.output / "cond" / "cat_00001_.safetensors"
    [(embedding, options)] = result.values["3"][0]
    with safetensors.safe_open(saved, framework="pt") as f:  # ComfyUI's layout, read independently
        assert sorted(f.keys()) == ["conditioning", "pooled_output"]
        assert torch.equal(f.get_tensor("conditioning"), embedding)
        assert torch.equal(f.get_tensor("pooled_output"), options["pooled_output"])
        assert json.loads(f.metadata()["conditioning_options"]) == {"strength": 0.5}

    shutil.copy(saved, engine.services.paths.base / "models" / "embeddings" / "cat.safetensors")
    loader = {"class_type": "ConditioningLoader", "inputs": {"conditioning_name": "cat.safetensors"}}
    loaded = run(engine, {"5": loader}, "5")
    [(back, back_options)] = loaded.values["5"][0]
    assert torch.equal(back, embedding) and sorted(back_options) == ["pooled_output", "strength"]
    assert torch.equal(back_options["pooled_output"], options["pooled_output"]) and back_options["strength"] == 0.5


def test_lists_of_tensors_are_numbered_and_rebuilt_in_order(engine, tmp_path):
    first, second, third = (torch.full((1, 4, 2, 2), float(v)) for v in (1, 2, 3))
    entry = (torch.ones(1, 5, 8), {"reference_latents": [first, second, third], "guidance": 3.5, "label": "x",
                                   "flag": True, "absent": None})
    SaveConditioning().execute([entry], "lists")
    saved = engine.services.paths.output / "lists_00001_.safetensors"
    with safetensors.safe_open(saved, framework="pt") as f:
        assert sorted(f.keys()) == ["conditioning", "reference_latents.0", "reference_latents.1",
                                    "reference_latents.2"]
        assert json.loads(f.metadata()["conditioning_options"]) == {"guidance": 3.5, "label": "x", "flag": True}
    # A file written elsewhere (the numbered keys in another order, a tensor option of its own) loads the same way.
    embeddings = engine.services.paths.base / "models" / "embeddings"
    save_file({"conditioning": torch.zeros(1, 3, 8), "reference_latents.10": third, "reference_latents.2": first,
               "y_extra": torch.ones(1, 2)}, embeddings / "other.safetensors",
              metadata={"conditioning_options": json.dumps({"guidance": 2.0})})
    [(cond, options)] = ConditioningLoader().execute("other.safetensors")[0]
    assert cond.shape == (1, 3, 8) and options["guidance"] == 2.0 and torch.equal(options["y_extra"], torch.ones(1, 2))
    assert [t[0, 0, 0, 0].item() for t in options["reference_latents"]] == [1.0, 3.0]  # by index: 2, then 10


def test_bad_conditionings_and_files_are_refused(engine):
    entry = (torch.ones(1, 5, 8), {})
    with pytest.raises(ValueError, match="single conditioning entry and got 2"):
        SaveConditioning().execute([entry, entry], "two")
    with pytest.raises(ValueError, match="option 'area' \\(tuple\\) cannot be saved"):
        SaveConditioning().execute([(entry[0], {"area": ("percentage", 0.5, 0.5, 0, 0)})], "area")
    with pytest.raises(WorkflowInvalid, match="relative name inside the output folder"):
        engine.run(parse_api({"1": {"class_type": "SaveConditioning", "inputs": {
            "conditioning": ["2", 0], "filename_prefix": "../out"}},
            "2": {"class_type": "ConditioningLoader", "inputs": {"conditioning_name": "cat.safetensors"}}}),
            outputs=["1"])
    embeddings = engine.services.paths.base / "models" / "embeddings"
    save_file({"emb_params": torch.zeros(2, 8)}, embeddings / "ti.safetensors")
    with pytest.raises(ValueError, match="holds no 'conditioning' tensor"):
        ConditioningLoader().execute("ti.safetensors")


def test_controlnet_text_is_encoded_into_every_entry(engine):
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
          "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
          "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["1", 1]}},
          "4": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0],
                                                                "conditioning_2": ["3", 0]}},
          "5": {"class_type": "CLIPTextEncodeControlnet", "inputs": {
              "clip": ["1", 1], "conditioning": ["4", 0], "text": "edges of a house"}},
          "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "edges of a house", "clip": ["1", 1]}}}
    result = run(engine, wf, "4", "5", "6")
    combined, out = result.values["4"][0], result.values["5"][0]
    [(house, house_options)] = result.values["6"][0]
    assert len(out) == 2
    for (emb, opts), (source, source_opts) in zip(out, combined, strict=True):
        assert torch.equal(emb, source) and torch.equal(opts["pooled_output"], source_opts["pooled_output"])
        assert torch.equal(opts["cross_attn_controlnet"], house)
        assert torch.equal(opts["pooled_output_controlnet"], house_options["pooled_output"])
        assert "cross_attn_controlnet" not in source_opts  # the input is not changed
