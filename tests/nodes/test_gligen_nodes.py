"""GLIGENLoader and GLIGENTextBoxApply through the engine as ComfyUI writes them: a whole graph on a tiny SD1
checkpoint and tiny GLIGEN files in ComfyUI's layout, the conditioning they give, and files that do not fit."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from PIL import Image

import nodes.sd.gligen
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_checkpoint
from ldm.presets import make_checkpoint, randomize_
from ldm.unet import UNetConfig, UNetModel
from nodes.comfy_compat import COMFY_CORE_NODES_MISSING
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_gligen import gligen_state


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("gligen")
    checkpoint = make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    loaded = load_checkpoint(checkpoint)
    folder = root / "models" / "gligen"
    folder.mkdir(parents=True)
    pooled_dim = loaded.text_encoder.config.pooled_dim
    safetensors.torch.save_file(gligen_state(loaded.unet, pooled_dim, seed=2),
                                folder / "gligen_sd14_textbox_pruned.safetensors")
    wider = randomize_(UNetModel(UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                                            transformer_depth=(1, 1), num_heads=4, context_dim=32)),
                       torch.Generator().manual_seed(3))
    safetensors.torch.save_file(gligen_state(wider, pooled_dim, seed=4), folder / "gligen_wide.safetensors")
    safetensors.torch.save_file({"input_blocks.1.1.proj_in.weight": torch.zeros(2, 2)},
                                folder / "not_gligen.safetensors")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base, force_cpu=True))


def workflow(gligen: str = "gligen_sd14_textbox_pruned.safetensors", grounded: bool = True) -> dict:
    """CheckpointLoaderSimple -> GLIGENLoader -> CLIPTextEncode -> GLIGENTextBoxApply (two boxes) -> KSampler ->
    VAEDecode -> SaveImage."""
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "10": {"class_type": "GLIGENLoader", "inputs": {"gligen_name": gligen}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat and a dog in a field", "clip": ["4", 1]}},
        "11": {"class_type": "GLIGENTextBoxApply", "inputs": {
            "conditioning_to": ["6", 0], "clip": ["4", 1], "gligen_textbox_model": ["10", 0], "text": "a cat",
            "width": 32, "height": 48, "x": 0, "y": 8}},
        "12": {"class_type": "GLIGENTextBoxApply", "inputs": {
            "conditioning_to": ["11", 0], "clip": ["4", 1], "gligen_textbox_model": ["10", 0], "text": "a dog",
            "width": 24, "height": 16, "x": 40, "y": 40}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 3, "steps": 3, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["12" if grounded else "6", 0],
                                                   "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "gligen"}},
    }
    if not grounded:
        for node in ("10", "11", "12"):
            del graph[node]
    return graph


def run(engine: Executor, graph: dict, keep: tuple[str, ...] = ("8",)):
    return engine.run(parse_api(graph), keep=list(keep))


def test_a_gligen_workflow_runs_end_to_end_and_its_boxes_change_the_picture(base, engine):
    result = run(engine, workflow(), keep=("8", "6", "12"))
    assert result.ok, result.error
    picture = result.values["8"][0]
    assert picture.shape == (1, 64, 64, 3) and picture.isfinite().all()
    saved = sorted(base.output.glob("gligen_*.png"))
    assert saved and Image.open(saved[-1]).size == (64, 64)
    [(cond, options)] = result.values["12"][0]
    [(plain, plain_options)] = result.values["6"][0]
    assert torch.equal(cond, plain) and "gligen" not in plain_options
    kind, model, phrases = options["gligen"]
    assert kind == "position" and model is not None and len(phrases) == 2
    assert [p[1:] for p in phrases] == [(6, 4, 1, 0), (2, 3, 5, 5)]  # (h, w, y, x) in latent pixels
    assert not torch.equal(phrases[0][0], phrases[1][0])  # each phrase's own pooled embedding
    ungrounded = run(engine, workflow(grounded=False))
    assert ungrounded.ok, ungrounded.error
    assert (ungrounded.values["8"][0] - picture).abs().max() > 1e-4


def test_files_that_do_not_fit_get_errors_that_say_why(engine):
    result = run(engine, workflow(gligen="gligen_wide.safetensors"))
    assert not result.ok and "64 wide" in str(result.error) and "another model" in str(result.error)
    result = run(engine, workflow(gligen="not_gligen.safetensors"))
    assert not result.ok and "not a GLIGEN" in str(result.error) and "not_gligen.safetensors" in str(result.error)


def test_schemas_are_comfyuis():
    loader = nodes.sd.gligen.GLIGENLoader.object_info()
    assert loader["input_order"]["required"] == ["gligen_name"] and loader["output"] == ["GLIGEN"]
    assert loader["category"] == "loaders"
    apply = nodes.sd.gligen.GLIGENTextBoxApply.object_info()
    assert apply["input_order"]["required"] == ["conditioning_to", "clip", "gligen_textbox_model", "text", "width",
                                                "height", "x", "y"]
    required = apply["input"]["required"]
    assert required["width"][1]["default"] == 64 and required["width"][1]["min"] == 8 and required["x"][1]["step"] == 8
    assert apply["output"] == ["CONDITIONING"] and apply["category"] == "conditioning/gligen"
    assert not {"GLIGENLoader", "GLIGENTextBoxApply"} & COMFY_CORE_NODES_MISSING
