"""Control-LoRA workflows through the engine, as ComfyUI's API format writes them: CheckpointLoaderSimple ->
ControlNetLoader (a Control-LoRA derived exactly from a tiny SDXL ControlNet and the checkpoint's UNet) ->
ControlNetApplyAdvanced -> KSampler -> VAEDecode, against the same graph with the full ControlNet."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from executor.devices import EngineOptions
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_checkpoint, load_state_dict
from ldm.controlnet import ControlNet, save_controlnet
from ldm.presets import make_checkpoint, make_controlnet
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_control_lora import control_lora_tensors, random_controlnet, unet
from tests.nodes.test_device_options import txt2img


def _unet(path) -> torch.nn.Module:
    return load_checkpoint(path, text_encoder=False).unet


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("control_lora")
    checkpoints, controlnets = root / "models" / "checkpoints", root / "models" / "controlnet"
    tiny = _unet(make_checkpoint("tiny-sdxl", checkpoints / "tiny_xl.safetensors", seed=2))
    other = _unet(make_checkpoint("tiny-sdxl", checkpoints / "other_xl.safetensors", seed=4))
    mine, theirs = tiny.state_dict(), other.state_dict()
    full = load_state_dict(make_controlnet("tiny-sdxl", controlnets / "full_xl.safetensors", seed=6))
    full = {k: v.float() for k, v in full.items()}
    safetensors.torch.save_file(control_lora_tensors(full, mine), controlnets / "control-lora-canny.safetensors")
    # The full ControlNet the Control-LoRA makes on the other checkpoint: its UNet plus the same offsets.
    moved = ControlNet(other.config)
    moved.load_state_dict({k: theirs[k] + (v - mine[k]) if k in mine and v.ndim >= 2 else v for k, v in full.items()})
    save_controlnet(controlnets / "moved_xl.safetensors", moved, torch.float32)
    # One made for a UNet twice as wide.
    wide = unet(0, dataclasses.replace(tiny.config, model_channels=64))
    safetensors.torch.save_file(control_lora_tensors(random_controlnet(wide, 3).state_dict(), wide.state_dict()),
                                controlnets / "control-lora-wide.safetensors")
    (root / "input").mkdir()
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle((8, 8, 40, 40), outline="white", width=2)
    image.save(root / "input" / "edges.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def workflow(control_net: str | None, ckpt: str = "tiny_xl.safetensors", diff: bool = False) -> dict:
    """txt2img at 64 px with a tiny SDXL checkpoint and, unless None, a ControlNet file on both prompts."""
    graph = txt2img(ckpt)
    if control_net is None:
        return graph
    graph["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": control_net}}
    if diff:
        graph["10"] = {"class_type": "DiffControlNetLoader", "inputs": {"model": ["4", 0], **graph["10"]["inputs"]}}
    graph["11"] = {"class_type": "LoadImage", "inputs": {"image": "edges.png"}}
    graph["12"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["10", 0], "image": ["11", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    graph["3"]["inputs"]["positive"] = ["12", 0]
    graph["3"]["inputs"]["negative"] = ["12", 1]
    return graph


def new_engine(base, options: EngineOptions | None = None) -> Executor:
    return Executor(builtin_registry(), services=Services.create(base, force_cpu=True, options=options))


@pytest.fixture(scope="module")
def engine(base):
    """One engine for the comparisons: the checkpoints load and the prompts are encoded once."""
    return new_engine(base)


def run(engine: Executor, graph: dict):
    return engine.run(parse_api(graph), keep=["8", "10"])


def image(engine: Executor, graph: dict) -> torch.Tensor:
    result = run(engine, graph)
    assert result.ok, result.error
    return result.values["8"][0]


def test_a_control_lora_makes_the_full_controlnets_image(engine):
    expected = image(engine, workflow("full_xl.safetensors"))
    got = image(engine, workflow("control-lora-canny.safetensors"))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (got - image(engine, workflow(None))).abs().max() > 1e-2  # the control matters


def test_on_another_checkpoint_it_is_made_from_that_ones_unet(engine):
    got = image(engine, workflow("control-lora-canny.safetensors", ckpt="other_xl.safetensors"))
    expected = image(engine, workflow("moved_xl.safetensors", ckpt="other_xl.safetensors"))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    unmoved = image(engine, workflow("full_xl.safetensors", ckpt="other_xl.safetensors"))
    assert (got - unmoved).abs().max() > 1e-3


def test_the_made_controlnet_is_kept_for_the_same_model_and_not_for_another(engine):
    def sample(seed: int, ckpt: str = "tiny_xl.safetensors"):
        graph = workflow("control-lora-canny.safetensors", ckpt=ckpt)
        graph["3"]["inputs"]["seed"] = seed  # a new seed: the KSampler runs again
        result = run(engine, graph)
        assert result.ok, result.error
        return result.values["10"][0].model

    lora = sample(5)
    made = lora._made
    assert sample(6) is lora and lora._made is made
    assert sample(5, "other_xl.safetensors") is lora and lora._made is not None and lora._made is not made


def test_through_the_diff_loader_it_is_made_from_the_models_unet_at_once(engine):
    expected = image(engine, workflow("full_xl.safetensors"))
    result = run(engine, workflow("control-lora-canny.safetensors", diff=True))
    assert result.ok, result.error
    assert isinstance(result.values["10"][0].model, ControlNet)
    torch.testing.assert_close(result.values["8"][0], expected, rtol=0, atol=1e-4)


def test_low_vram_streams_the_made_controlnet_and_fp8_weights_are_dequantized_for_it(base, engine):
    expected = image(engine, workflow("control-lora-canny.safetensors"))
    streamed = image(new_engine(base, EngineOptions(lowvram=True)), workflow("control-lora-canny.safetensors"))
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-5)
    fp8_engine = new_engine(base, EngineOptions(weights_dtype="fp8"))  # held: it holds the fp8 model
    fp8 = run(fp8_engine, workflow("control-lora-canny.safetensors"))
    assert fp8.ok, fp8.error
    made = fp8.values["10"][0].model._made
    assert {t.dtype for t in made.state_dict().values()} == {torch.float32}
    assert float(((fp8.values["8"][0] - expected) ** 2).mean()) < 1e-3  # fp8 weights: close, not equal


def test_a_control_lora_for_another_width_is_refused_naming_both(engine):
    result = run(engine, workflow("control-lora-wide.safetensors"))
    assert not result.ok
    assert ("control-lora-wide.safetensors does not fit the model tiny_xl.safetensors: the ControlNet was made for "
            "a UNet with model_channels 64, and this one has 32") in str(result.error)
