"""TomePatchModel and HypernetworkLoader in workflows on the tiny SD1 checkpoint: declarations as ComfyUI's, what
each does to the image, and clear errors for bad hypernetwork files."""

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.attention_patches import HypernetworkLoader, TomePatchModel
from tests.ldm.test_hypernetwork import write_hypernetwork


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention_patch_nodes")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    folder = root / "models" / "hypernetworks"
    folder.mkdir(parents=True)
    # tiny-sd1's attention layers take widths 32 (the first level and the 32-wide context) and 64.
    write_hypernetwork(folder / "style.pt", (32, 64), layers=(1, 2, 1), activation="relu", layer_norm=True)
    write_hypernetwork(folder / "prelu.pt", (32, 64), activation="relu", activation_func="prelu")
    write_hypernetwork(folder / "sd2_only.pt", (1024,))
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def graph(patch: dict | None = None, save: bool = False) -> dict:
    """CheckpointLoaderSimple "1" -> the patch "5" -> KSampler "6" -> VAEDecode "7" -> SaveImage or PreviewImage "8"."""
    nodes = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
             "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    model = ["1", 0]
    if patch is not None:
        nodes["5"] = {"class_type": patch["class_type"], "inputs": {"model": ["1", 0], **patch["inputs"]}}
        model = ["5", 0]
    nodes["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 5, "steps": 4, "cfg": 6.0, "sampler_name": "euler", "scheduler": "karras",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    nodes["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    nodes["8"] = ({"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "patched"}} if save
                  else {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}})
    return nodes


def run(engine, nodes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent, image)"""
    result = engine.run(parse_api(nodes), keep=["6", "7"])
    assert result.ok, result.error
    return result.values["6"][0]["samples"], result.values["7"][0]


def hypernetwork(name: str, strength: float = 1.0) -> dict:
    return {"class_type": "HypernetworkLoader", "inputs": {"hypernetwork_name": name, "strength": strength}}


def test_declared_as_comfyui_declares_them():
    tome = TomePatchModel.object_info()
    assert tome["category"] == "_for_testing" and tome["input_order"]["required"] == ["model", "ratio"]
    assert tome["input"]["required"]["ratio"] == ["FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01}]
    loader = HypernetworkLoader.object_info()
    assert loader["category"] == "loaders" and loader["output"] == ["MODEL"]
    assert loader["input_order"]["required"] == ["model", "hypernetwork_name", "strength"]
    assert loader["input"]["required"]["strength"] == ["FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                                                "step": 0.01}]


def test_hypernetwork_changes_the_image_and_strength_zero_does_not(engine):
    plain_latent, plain = run(engine, graph())
    latent, image = run(engine, graph(hypernetwork("style.pt", 10.0), save=True))
    # The tiny random model's attention adds little to its latents, and its VAE makes nearly uniform grey of any
    # latent: a change of a few percent of the latents' spread is a clear one (tests/ldm/test_hypernetwork.py
    # checks the arithmetic).
    assert (latent - plain_latent).abs().max() > 0.02 * plain_latent.std() and not torch.equal(image, plain)
    assert list((engine.services.paths.output).glob("patched_*.png"))
    zero_latent, zero = run(engine, graph(hypernetwork("style.pt", 0.0)))
    assert torch.equal(zero_latent, plain_latent) and torch.equal(zero, plain)


def test_bad_hypernetworks_fail_with_a_clear_error(engine):
    result = engine.run(parse_api(graph(hypernetwork("prelu.pt"))))
    assert not result.ok and "activation_func 'prelu' is not supported" in result.error.exception_message
    result = engine.run(parse_api(graph(hypernetwork("sd2_only.pt"))))
    assert not result.ok and "widths [1024]" in result.error.exception_message
    with pytest.raises(WorkflowInvalid, match="missing.pt"):
        engine.run(parse_api(graph(hypernetwork("missing.pt"))))


def test_tome_at_zero_changes_nothing_and_merging_is_reproducible(engine):
    plain, _ = run(engine, graph())
    assert torch.equal(run(engine, graph({"class_type": "TomePatchModel", "inputs": {"ratio": 0.0}}))[0], plain)
    merged, _ = run(engine, graph({"class_type": "TomePatchModel", "inputs": {"ratio": 0.5}}))
    change = ((merged - plain).norm() / plain.norm()).item()
    assert 1e-6 < change < 0.1, change  # by little: the tiny model's self-attention adds little to its latents
    engine.cache.clear()
    assert torch.equal(run(engine, graph({"class_type": "TomePatchModel", "inputs": {"ratio": 0.5}}))[0], merged)
