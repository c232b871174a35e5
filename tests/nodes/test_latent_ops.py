"""Latent arithmetic, batch seed behaviour and ComfyUI's .latent files (nodes/sd/latent_ops.py)."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.latent_ops import (
    LatentAdd,
    LatentBatchSeedBehavior,
    LatentInterpolate,
    LatentMultiply,
    LatentSubtract,
    LoadLatent,
)


def run(cls, **inputs):
    node = cls()
    node.ctx = NodeContext()
    return node.execute(**inputs)


def latent(x, **extra):
    return {"samples": x, **extra}


# --- Interface ------------------------------------------------------------------------------------

# name: (required inputs in ComfyUI's order, category, outputs)
INTERFACES = {
    "LatentAdd": (["samples1", "samples2"], "latent/advanced", ["LATENT"]),
    "LatentSubtract": (["samples1", "samples2"], "latent/advanced", ["LATENT"]),
    "LatentMultiply": (["samples", "multiplier"], "latent/advanced", ["LATENT"]),
    "LatentInterpolate": (["samples1", "samples2", "ratio"], "latent/advanced", ["LATENT"]),
    "LatentBatchSeedBehavior": (["samples", "seed_behavior"], "latent/advanced", ["LATENT"]),
    "SaveLatent": (["samples", "filename_prefix"], "_for_testing", []),
    "LoadLatent": (["latent"], "_for_testing", ["LATENT"]),
}


@pytest.fixture(scope="module")
def registry():
    return builtin_registry()


@pytest.mark.parametrize("name", sorted(INTERFACES))
def test_object_info_has_comfyui_inputs_in_order(registry, name):
    required, category, outputs = INTERFACES[name]
    info = registry.get(name).object_info()
    assert info["name"] == name and info["category"] == category
    assert info["input_order"] == {"required": required, "optional": []}
    assert info["output"] == outputs and info["description"]
    assert info["output_node"] == (name == "SaveLatent")


def test_object_info_widget_options_match_comfyui(registry):
    def options(name, key):
        return registry.get(name).object_info()["input"]["required"][key]

    assert options("LatentMultiply", "multiplier") == ["FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                                                 "step": 0.01}]
    assert options("LatentInterpolate", "ratio") == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]
    assert options("LatentBatchSeedBehavior", "seed_behavior") == [["random", "fixed"], {"default": "fixed"}]
    assert options("SaveLatent", "filename_prefix") == ["STRING", {"default": "latents/ComfyUI"}]
    assert registry.get("SaveLatent").object_info()["output"] == []  # ComfyUI's declares none


# --- Arithmetic -----------------------------------------------------------------------------------


def test_add_and_subtract_fit_the_second_latent_to_the_first_and_keep_the_firsts_extras():
    s1 = latent(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 4, 4, 4), noise_mask=torch.ones(1, 1, 4, 4),
                batch_index=[4, 5, 6])
    # Another size (resized: a constant stays constant) and a shorter batch (cycled: 10, 20, 10).
    s2 = latent(torch.tensor([10.0, 20.0]).view(2, 1, 1, 1).expand(2, 4, 2, 2))
    added = run(LatentAdd, samples1=s1, samples2=s2)[0]
    assert added["samples"][:, 0, 0, 0].tolist() == [10, 21, 12] and added["samples"].shape == (3, 4, 4, 4)
    assert added["batch_index"] == [4, 5, 6] and added["noise_mask"] is s1["noise_mask"]
    subtracted = run(LatentSubtract, samples1=s1, samples2=s2)[0]
    assert subtracted["samples"][:, 3, 3, 3].tolist() == [-10, -19, -8]
    # A longer second batch is cut to the first's.
    long = latent(torch.ones(5, 4, 4, 4))
    assert run(LatentAdd, samples1=s1, samples2=long)[0]["samples"].shape == (3, 4, 4, 4)


def test_latents_of_other_families_are_refused_by_name():
    with pytest.raises(ValueError, match=r"LatentAdd: the latents have shapes \(1, 4, 4, 4\) and \(1, 16, 4, 4\);"
                                         r" their channels differ"):
        run(LatentAdd, samples1=latent(torch.zeros(1, 4, 4, 4)), samples2=latent(torch.zeros(1, 16, 4, 4)))
    with pytest.raises(ValueError, match="LatentInterpolate: .*channels differ"):
        run(LatentInterpolate, samples1=latent(torch.zeros(1, 4, 4, 4)), samples2=latent(torch.zeros(1, 4, 2, 4, 4)),
            ratio=0.5)


def test_multiply():
    out = run(LatentMultiply, samples=latent(torch.full((1, 4, 2, 2), 3.0), batch_index=[2]), multiplier=-1.5)[0]
    assert torch.equal(out["samples"], torch.full((1, 4, 2, 2), -4.5)) and out["batch_index"] == [2]


def test_interpolate_blends_directions_and_lengths_separately():
    """By hand, at one pixel: (3, 4, 0, 0) (length 5) with (0, 0, 0, 2) (length 2) at ratio 0.25."""
    s1 = torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 4, 1, 1)
    s2 = torch.tensor([0.0, 0.0, 0.0, 2.0]).view(1, 4, 1, 1)
    out = run(LatentInterpolate, samples1=latent(s1), samples2=latent(s2), ratio=0.25)[0]["samples"].flatten()
    direction = [0.25 * 0.6, 0.25 * 0.8, 0.0, 0.75 * 1.0]
    length = math.sqrt(sum(d * d for d in direction))
    expected = [d / length * (0.25 * 5 + 0.75 * 2) for d in direction]
    torch.testing.assert_close(out, torch.tensor(expected))
    # The ends give the inputs; a zero vector gives no NaN.
    for ratio, end in ((1.0, s1), (0.0, s2)):
        out = run(LatentInterpolate, samples1=latent(s1), samples2=latent(s2), ratio=ratio)[0]["samples"]
        torch.testing.assert_close(out, end)
    zero = run(LatentInterpolate, samples1=latent(torch.zeros(1, 4, 1, 1)), samples2=latent(s2), ratio=0.5)[0]
    assert not zero["samples"].isnan().any()


def test_interpolate_treats_each_latent_of_a_batch_on_its_own():
    """Each item of a batch is interpolated with its partner alone (ComfyUI's norms mix items past a batch of 1)."""
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    batch = run(LatentInterpolate, samples1=latent(s1), samples2=latent(s2), ratio=0.3)[0]["samples"]
    for i in range(3):
        alone = run(LatentInterpolate, samples1=latent(s1[i:i + 1]), samples2=latent(s2[i:i + 1]), ratio=0.3)[0]
        torch.testing.assert_close(batch[i:i + 1], alone["samples"])


def test_batch_seed_behavior_fixes_or_frees_the_batch_index():
    source = latent(torch.zeros(3, 4, 2, 2), batch_index=[5, 6, 7])
    assert run(LatentBatchSeedBehavior, samples=source, seed_behavior="fixed")[0]["batch_index"] == [5, 5, 5]
    assert "batch_index" not in run(LatentBatchSeedBehavior, samples=source, seed_behavior="random")[0]
    assert source["batch_index"] == [5, 6, 7]  # the input is not changed
    plain = latent(torch.zeros(2, 4, 2, 2))
    assert run(LatentBatchSeedBehavior, samples=plain, seed_behavior="fixed")[0]["batch_index"] == [0, 0]


# --- Through the executor -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_ops")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=3)
    (root / "input").mkdir()
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True)), root
    set_paths(FolderPaths())


def outputs(executor, graph, *nodes, **extra):
    """The outputs of `nodes`, after running the graph with a PreviewAny on each."""
    graph = {**graph, **{f"show{node}": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
                         for node in nodes}}
    result = executor.run(parse_api(graph), keep=list(nodes), **extra)
    assert result.ok, result.error
    return [result.values[node] for node in nodes], result


def sampling(latent_link) -> dict:
    """A tiny SD1 model, prompts, and an euler KSampler "9" (its only noise is the initial noise) on `latent_link`."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
            "9": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 11, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": latent_link,
                "denoise": 1.0}}}


def test_seed_behavior_decides_the_noise_of_each_latent_in_a_sampler(engine):
    executor, _ = engine
    [(full,)], _ = outputs(executor, sampling(["4", 0]), "9")
    assert not torch.allclose(full["samples"][0], full["samples"][1], atol=1e-2)  # each its own noise
    # Latents 1 and 2 of the batch, then both given latent 1's noise: both sample as latent 1 did.
    picked = {"5": {"class_type": "LatentFromBatch", "inputs": {"samples": ["4", 0], "batch_index": 1, "length": 2}},
              "6": {"class_type": "LatentBatchSeedBehavior", "inputs": {"samples": ["5", 0],
                                                                        "seed_behavior": "fixed"}}}
    [(fixed,)], _ = outputs(executor, {**sampling(["6", 0]), **picked}, "9")
    torch.testing.assert_close(fixed["samples"], full["samples"][1:2].expand(2, -1, -1, -1), atol=1e-4, rtol=1e-4)
    # Random: the batch index is dropped, so the two draw the noise of positions 0 and 1 of a fresh batch.
    picked["6"]["inputs"]["seed_behavior"] = "random"
    [(free,)], _ = outputs(executor, {**sampling(["6", 0]), **picked}, "9")
    torch.testing.assert_close(free["samples"], full["samples"][:2], atol=1e-4, rtol=1e-4)


def test_arithmetic_nodes_run_in_a_workflow(engine):
    executor, _ = engine
    graph = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 2}},
             "2": {"class_type": "LatentMultiply", "inputs": {"samples": ["1", 0], "multiplier": 2.0}},
             "3": {"class_type": "LatentAdd", "inputs": {"samples1": ["1", 0], "samples2": ["2", 0]}},
             "4": {"class_type": "LatentSubtract", "inputs": {"samples1": ["3", 0], "samples2": ["1", 0]}},
             "5": {"class_type": "LatentInterpolate", "inputs": {"samples1": ["4", 0], "samples2": ["3", 0],
                                                                 "ratio": 0.5}},
             "6": {"class_type": "LatentBatchSeedBehavior", "inputs": {"samples": ["5", 0], "seed_behavior": "fixed"}}}
    [(out,)], _ = outputs(executor, graph, "6")
    assert torch.equal(out["samples"], torch.zeros(2, 4, 2, 2)) and out["batch_index"] == [0, 0]


def test_save_latent_writes_comfyuis_file_and_load_latent_reads_it_back_exactly(engine):
    executor, root = engine
    graph = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 40, "height": 24, "batch_size": 2}},
             "2": {"class_type": "LatentAdd", "inputs": {"samples1": ["1", 0], "samples2": ["1", 0]}},
             "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "lat/run"}}}
    # The saved latent is the zeros of node 1; the file format is checked on it, the values on x below.
    result = executor.run(parse_api(graph), extra={"extra_pnginfo": {"workflow": {"nodes": [1]}}})
    assert result.ok, result.error
    assert result.outputs["3"] == {"latents": [{"filename": "run_00001_.latent", "subfolder": "lat",
                                                "type": "output"}]}
    path = root / "output" / "lat" / "run_00001_.latent"
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert f.get_tensor("latent_format_version_0").numel() == 0
        assert torch.equal(f.get_tensor("latent_tensor"), torch.zeros(2, 4, 3, 5))
        metadata = f.metadata()
    assert json.loads(metadata["prompt"])["3"]["class_type"] == "SaveLatent"
    assert json.loads(metadata["workflow"]) == {"nodes": [1]}

    # Random values: LoadLatent -> SaveLatent -> copied into input/ -> LoadLatent come back bit for bit.
    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    save_file({"latent_tensor": x, "latent_format_version_0": torch.tensor([])}, str(root / "input" / "x.latent"))
    loaded = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "x.latent"}},
              "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "lat/run"}}}
    [(first,)], result = outputs(executor, loaded, "1")
    assert torch.equal(first["samples"], x)
    assert result.outputs["2"]["latents"][0]["filename"] == "run_00002_.latent"  # numbered on
    shutil.copy(root / "output" / "lat" / "run_00002_.latent", root / "input" / "again.latent")
    [(again,)], _ = outputs(executor, {"1": {"class_type": "LoadLatent", "inputs": {"latent": "again.latent"}}}, "1")
    assert torch.equal(again["samples"], x)


def test_load_latent_reads_the_old_format_scaled_by_sd1s_factor(engine):
    _, root = engine
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    save_file({"latent_tensor": (x * 0.18215).half()}, str(root / "input" / "old.latent"))  # no version marker
    out = run(LoadLatent, latent="old.latent")[0]
    assert out["samples"].dtype == torch.float32
    torch.testing.assert_close(out["samples"], x, atol=2e-3, rtol=2e-3)


def test_load_latent_lists_the_input_folder_and_refuses_missing_and_corrupt_files(engine):
    executor, root = engine
    (root / "input" / "sub").mkdir(exist_ok=True)
    save_file({"latent_tensor": torch.zeros(1, 4, 1, 1)}, str(root / "input" / "sub" / "deep.latent"))
    (root / "input" / "broken.latent").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"other": torch.zeros(1)}, str(root / "input" / "foreign.latent"))
    (root / "input" / "photo.png").write_bytes(b"")
    choices = executor.registry.get("LoadLatent").object_info()["input"]["required"]["latent"][0]
    assert "sub/deep.latent" in choices and "broken.latent" in choices and "photo.png" not in choices

    def problems(name):
        with pytest.raises(WorkflowInvalid) as err:
            executor.run(parse_api({"1": {"class_type": "LoadLatent", "inputs": {"latent": name}},
                                    "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}))
        return [(p.type, p.details) for p in err.value.problems]

    [(kind, details)] = problems("nope.latent")
    assert kind == "value_not_in_list" and "'nope.latent' is not one of" in details
    assert "(the files in input)" in details and str(root) not in details  # relative: no server paths to clients
    [(kind, details)] = problems("broken.latent")
    assert kind == "custom_validation_failed" and "broken.latent is not a readable .latent file" in details
    [(kind, details)] = problems("foreign.latent")
    assert details == "foreign.latent holds no 'latent_tensor' tensor, so it is not a ComfyUI .latent file"
    # Run directly (as after the file vanished), the node names the file and the folder.
    with pytest.raises(FileNotFoundError, match="latent file 'gone.latent' not found in"):
        run(LoadLatent, latent="gone.latent")
    with pytest.raises(ValueError, match="broken.latent is not a readable"):
        run(LoadLatent, latent="broken.latent")


def test_load_latent_reruns_when_the_file_changes(engine):
    _, root = engine
    path = root / "input" / "changing.latent"
    save_file({"latent_tensor": torch.zeros(1, 4, 1, 1)}, str(path))
    before = LoadLatent.fingerprint({"latent": "changing.latent"})
    save_file({"latent_tensor": torch.ones(1, 4, 1, 1)}, str(path))
    assert LoadLatent.fingerprint({"latent": "changing.latent"}) != before
    assert LoadLatent.fingerprint({"latent": "../escape.latent"}) is None


@pytest.mark.parametrize("saver, inputs", [
    ("SaveLatent", {"samples": ["1", 0]}), ("SaveImage", {"images": ["2", 0]}),
    ("SaveAnimatedWEBP", {"images": ["2", 0], "fps": 6.0, "lossless": True, "quality": 80, "method": "default"}),
    ("CheckpointSave", {"model": ["3", 0], "clip": ["3", 1], "vae": ["3", 2]}), ("ModelSave", {"model": ["3", 0]})])
def test_a_prefix_outside_the_output_folder_is_refused_before_anything_runs(engine, saver, inputs):
    executor, _ = engine
    graph = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "4": {"class_type": saver, "inputs": {**inputs, "filename_prefix": "../escape"}}}
    with pytest.raises(WorkflowInvalid, match="must be a relative name inside the output folder"):
        executor.run(parse_api(graph))
