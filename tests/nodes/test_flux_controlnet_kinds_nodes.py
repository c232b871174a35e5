"""XLabs' and Union Flux ControlNets through ControlNetLoader, SetUnionControlNetType and ControlNetApplyAdvanced
on tiny Flux files: an XLabs ControlNet runs without a VAE (its hint is the picture) and steers sampling; a Union's
mode reaches the model (the residuals differ by mode) and a mode it has not is refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.controlnet_flux_xlabs import XLabsControlNet
from ldm.flux_presets import TINY_FLUX, distinct_random_, make_flux_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_controlnet_flux import diffusers_controlnet


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-cn")
    models = root / "models"
    make_flux_files(models, "dev", seed=3, dtype=torch.float32)
    (models / "controlnet").mkdir()
    xlabs = distinct_random_(XLabsControlNet(dataclasses.replace(TINY_FLUX, depth=2, depth_single_blocks=0)), 5)
    union = diffusers_controlnet(seed=6, config=TINY_FLUX, num_mode=7)
    for name, model in (("flux-canny-controlnet-v3.safetensors", xlabs),
                        ("FLUX.1-dev-ControlNet-Union.safetensors", union)):
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    models / "controlnet" / name)
    (root / "input").mkdir()
    picture = Image.new("RGB", (64, 48), "black")
    ImageDraw.Draw(picture).rectangle((10, 10, 50, 38), outline="white", width=2)
    picture.save(root / "input" / "edges.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def workflow(control_net: str, strength: float = 0.8, mode: str | None = None) -> dict:
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-dev.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                         "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-tiny.safetensors"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "a box", "t5xxl": "a box",
                                                              "guidance": 3.5}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
        "12": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": control_net}},
        "13": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["12", 0], "image": ["11", 0],
            "strength": strength, "start_percent": 0.0, "end_percent": 1.0}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 4, "steps": 3, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["13", 0], "negative": ["13", 1],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    if mode is not None:
        graph["14"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["12", 0], "type": mode}}
        graph["13"]["inputs"]["control_net"] = ["14", 0]
        graph["13"]["inputs"]["vae"] = ["3", 0]
    return graph


def samples(engine: Executor, graph: dict) -> torch.Tensor:
    result = engine.run(parse_api(graph), keep=["8"])
    assert result.ok, result.error
    return result.values["8"][0]["samples"]


def test_an_xlabs_controlnet_needs_no_vae_and_steers_sampling(engine):
    guided = samples(engine, workflow("flux-canny-controlnet-v3.safetensors"))
    plain = samples(engine, workflow("flux-canny-controlnet-v3.safetensors", strength=0.0))
    assert torch.isfinite(guided).all() and (guided - plain).abs().mean() > 1e-3


def test_a_union_takes_the_mode_set_union_controlnet_type_picks(engine):
    union = "FLUX.1-dev-ControlNet-Union.safetensors"
    depth, tile, auto = (samples(engine, workflow(union, mode=m)) for m in ("depth", "tile", "auto"))
    assert (depth - tile).abs().max() > 1e-4 and (depth - auto).abs().max() > 1e-4
    refused = engine.run(parse_api(workflow(union, mode="repaint")))
    assert not refused.ok and "control mode 7 is not one of this Flux ControlNet Union's 7" in str(refused.error)
