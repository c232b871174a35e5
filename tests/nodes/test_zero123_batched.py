"""StableZero123_Conditioning_Batched as ComfyUI runs it, on a tiny Stable Zero123 checkpoint: its declaration,
the camera move of each latent against a transcription of ComfyUI's camera_embeddings, each item sampled as the
single-view node at that item's angles, and a clear error for a batch of views."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.zero123 import make_zero123_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero123_batched")
    make_zero123_checkpoint(root / "models" / "checkpoints" / "zero123.safetensors", seed=4)
    (root / "input").mkdir()
    pixels = (torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(root / "input" / "a.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def comfy_camera(elevation: float, azimuth: float) -> torch.Tensor:
    """ComfyUI's camera_embeddings (nodes_stable3d.py), transcribed: float32 torch arithmetic in degrees."""
    elevation, azimuth = torch.as_tensor([elevation]), torch.as_tensor([azimuth])
    return torch.stack([torch.deg2rad((90 - elevation) - 90), torch.sin(torch.deg2rad(azimuth)),
                        torch.cos(torch.deg2rad(azimuth)), torch.deg2rad(90 - torch.zeros_like(elevation))],
                       dim=-1).unsqueeze(1)


def conditioning(node: str, batch_size: int, elevation: float, azimuth: float, **extra) -> dict:
    return {"1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "zero123.safetensors"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
            "3": {"class_type": node, "inputs": {
                "clip_vision": ["1", 1], "init_image": ["2", 0], "vae": ["1", 2], "width": 64, "height": 64,
                "batch_size": batch_size, "elevation": elevation, "azimuth": azimuth, **extra}},
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 7, "steps": 2, "cfg": 3.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["3", 2],
                "denoise": 1.0}},
            "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}


def run(engine, nodes: dict) -> dict:
    result = engine.run(parse_api(nodes), keep=["3", "5"])
    assert result.ok, result.error
    return result.values


def test_declaration_is_comfyuis(engine):
    info = engine.registry.object_info()["StableZero123_Conditioning_Batched"]
    assert info["category"] == "conditioning/3d_models"
    assert list(info["input"]["required"]) == [
        "clip_vision", "init_image", "vae", "width", "height", "batch_size", "elevation", "azimuth",
        "elevation_batch_increment", "azimuth_batch_increment"]
    required = info["input"]["required"]
    assert required["width"][1]["default"] == 256 and required["width"][1]["step"] == 8
    assert required["batch_size"][1]["max"] == 4096
    increment = required["azimuth_batch_increment"][1]
    assert (increment["default"], increment["min"], increment["max"], increment["step"]) == (0.0, -180.0, 180.0, 0.1)
    assert increment["advanced"] is True and increment["round"] is False
    assert info["output"] == ["CONDITIONING", "CONDITIONING", "LATENT"]
    assert info["output_name"] == ["positive", "negative", "latent"]


def test_each_latent_gets_its_own_camera_and_samples_as_the_single_view_node(engine):
    values = run(engine, conditioning("StableZero123_Conditioning_Batched", 3, 10.0, -20.0,
                                      elevation_batch_increment=5.5, azimuth_batch_increment=45.0))
    (cond, options), = values["3"][0]
    (negative, negative_options), = values["3"][1]
    assert cond.shape == (3, 1, 36) and negative.shape == (1, 1, 32) and not negative.any()
    assert not negative_options["concat_latent_image"].any()
    latent = values["3"][2]
    assert latent["samples"].shape == (3, 4, 8, 8) and latent["batch_index"] == [0, 0, 0]
    assert torch.equal(cond[0, :, :32], cond[2, :, :32])
    cameras = torch.cat([comfy_camera(10.0 + 5.5 * k, -20.0 + 45.0 * k) for k in range(3)])
    torch.testing.assert_close(cond[..., 32:], cameras, atol=1e-6, rtol=0)
    assert cond[1, 0, 32].item() == pytest.approx(-math.radians(15.5), abs=1e-6)

    # batch_index [0, 0, 0]: each item gets the seed's first noise, so item k is the single-view node's picture
    # at the k-th angles.
    for k in (0, 2):
        single = run(engine, conditioning("StableZero123_Conditioning", 1, 10.0 + 5.5 * k, -20.0 + 45.0 * k))
        assert torch.equal(single["3"][0][0][1]["concat_latent_image"], options["concat_latent_image"])
        torch.testing.assert_close(values["5"][0]["samples"][k:k + 1], single["5"][0]["samples"],
                                   atol=1e-3, rtol=1e-4)  # batched float rounding
    assert not torch.allclose(values["5"][0]["samples"][0], values["5"][0]["samples"][2], atol=1e-3)


def test_zero_increments_repeat_the_camera(engine):
    values = run(engine, conditioning("StableZero123_Conditioning_Batched", 2, 30.0, 60.0,
                                      elevation_batch_increment=0.0, azimuth_batch_increment=0.0))
    cond = values["3"][0][0][0]
    assert torch.equal(cond[0], cond[1])


def test_a_batch_of_views_is_refused(engine):
    nodes = conditioning("StableZero123_Conditioning_Batched", 2, 0.0, 0.0, elevation_batch_increment=0.0,
                         azimuth_batch_increment=10.0)
    nodes["4"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 2}}
    nodes["3"]["inputs"]["init_image"] = ["4", 0]
    del nodes["5"], nodes["6"]
    nodes["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}}
    result = engine.run(parse_api(nodes), keep=["3"])
    assert not result.ok
    assert "StableZero123_Conditioning_Batched" in str(result.error) and "one view" in str(result.error)
