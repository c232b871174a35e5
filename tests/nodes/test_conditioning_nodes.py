"""The conditioning nodes beyond text encoding (concat, average, masks, areas, timestep ranges) and
LoraLoaderModelOnly, on their own and through a KSampler."""

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd import conditioning as nodes
from tests.nodes.test_sd_workflows import write_lora


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditioning")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    (root / "models" / "loras").mkdir(parents=True)
    write_lora(root / "models" / "loras" / "lora.safetensors")
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def entry(length: int, value: float, width: int = 8, pooled: float | None = None) -> tuple:
    options = {} if pooled is None else {"pooled_output": torch.full((1, 4), pooled)}
    return torch.full((1, length, width), value), options


def test_concat_appends_the_first_from_entry_to_every_to_entry():
    [out] = nodes.ConditioningConcat().execute([entry(3, 1.0), entry(2, 2.0)], [entry(4, 5.0), entry(1, 9.0)])
    assert [e.shape[1] for e, _ in out] == [7, 6]
    assert out[0][0][0, :, 0].tolist() == [1, 1, 1, 5, 5, 5, 5] and out[1][0][0, 2:, 0].tolist() == [5] * 4
    with pytest.raises(ValueError, match="8 and 6 wide"):
        nodes.ConditioningConcat().execute([entry(3, 1.0)], [entry(3, 1.0, width=6)])
    with pytest.raises(ValueError, match="holds 2 prompts and conditioning_to 3"):
        nodes.ConditioningConcat().execute([(torch.zeros(3, 4, 8), {})], [(torch.zeros(2, 4, 8), {})])
    with pytest.raises(ValueError, match="conditioning_from is empty"):
        nodes.ConditioningConcat().execute([entry(3, 1.0)], [])


def test_average_blends_embeddings_and_pooled_outputs_padding_the_shorter():
    to, source = [entry(4, 1.0, pooled=1.0)], [entry(2, 3.0, pooled=3.0)]
    [[(emb, opts)]] = nodes.ConditioningAverage().execute(to, source, 0.25)
    assert emb.shape == (1, 4, 8)
    assert emb[0, :, 0].tolist() == pytest.approx([2.5, 2.5, 0.25, 0.25])  # 0.25 * 1 + 0.75 * (3, 3, 0, 0)
    assert opts["pooled_output"][0, 0].item() == pytest.approx(2.5)
    [[(same, _)]] = nodes.ConditioningAverage().execute(to, source, 1.0)
    assert torch.equal(same, to[0][0])


def test_area_mask_and_range_nodes_set_comfyuis_options():
    base = [entry(3, 1.0)]
    [[(_, area)]] = nodes.ConditioningSetAreaPercentage().execute(base, 0.5, 0.25, 0.5, 0.0, 2.0)
    assert area["area"] == ("percentage", 0.25, 0.5, 0.0, 0.5) and area["strength"] == 2.0
    [[(_, strength)]] = nodes.ConditioningSetAreaStrength().execute(base, 0.3)
    assert strength == {"strength": 0.3}
    [[(_, masked)]] = nodes.ConditioningSetMask().execute(base, torch.ones(8, 8), 0.7, "mask bounds")
    assert masked["mask"].shape == (1, 8, 8) and masked["mask_strength"] == 0.7 and masked["set_area_to_bounds"]
    [[(_, ranged)]] = nodes.ConditioningSetTimestepRange().execute(base, 0.2, 0.6)
    assert (ranged["start_percent"], ranged["end_percent"]) == (0.2, 0.6)
    assert base[0][1] == {}  # the input is left as it was


def graph(positive: list, model=("1", 0)) -> dict:
    """A 3-step KSampler "9" on 64x64 pixels; `positive` is the link its positive prompt comes from."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "9": {"class_type": "KSampler", "inputs": {
                "model": list(model), "seed": 3, "steps": 3, "cfg": 1.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": positive, "negative": ["3", 0], "latent_image": ["4", 0],
                "denoise": 1.0}},
            "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}


def sampled(engine, workflow: dict) -> torch.Tensor:
    result = engine.run(parse_api(workflow), keep=["9"])
    assert result.ok, result.error
    return result.values["9"][0]["samples"]


def ranged(node: str, start: float, end: float) -> dict:
    return {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": [node, 0], "start": start,
                                                                     "end": end}}


def test_timestep_ranges_switch_prompts_during_the_run(engine):
    first, second = sampled(engine, graph(["2", 0])), sampled(engine, graph(["3", 0]))
    whole = graph(["5", 0])
    whole["5"] = ranged("2", 0.0, 1.0)
    assert torch.equal(sampled(engine, whole), first)
    switched = graph(["7", 0])
    switched.update({"5": ranged("2", 0.0, 0.5), "6": ranged("3", 0.5, 1.0),
                     "7": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["5", 0],
                                                                           "conditioning_2": ["6", 0]}}})
    mixed = sampled(engine, switched)
    assert not torch.allclose(mixed, first) and not torch.allclose(mixed, second)


def test_lora_loader_model_only_is_lora_loader_without_the_clip(engine):
    only = graph(["2", 0], model=("5", 0))
    only["5"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "lora.safetensors",
                                                                 "strength_model": 1.5}}
    both = graph(["2", 0], model=("5", 0))
    both["5"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                        "lora_name": "lora.safetensors", "strength_model": 1.5,
                                                        "strength_clip": 0.0}}
    patched = sampled(engine, only)
    assert torch.equal(patched, sampled(engine, both))
    assert not torch.equal(patched, sampled(engine, graph(["2", 0])))
