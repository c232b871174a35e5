"""T2I-Adapter workflows through the engine as ComfyUI writes them: Load ControlNet Model reads the adapter file,
Apply ControlNet attaches it, with a tiny checkpoint and tiny adapters that fit it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import PRESETS, make_checkpoint, make_controlnet
from ldm.t2i_adapter import T2IAdapter, adapter_config_for, save_t2i_adapter
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_device_options import txt2img


def _adapter(path, unet, seed: int, **options):
    """A random-weight adapter file (torch's default initialisation, seeded) fitting `unet`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T2IAdapter(adapter_config_for(unet, **options))
    if path.suffix == ".pth":  # TencentARC's releases are pickles of the state dict
        torch.save(model.state_dict(), path)
        return path
    return save_t2i_adapter(path, model, torch.float16)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_adapter")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "tiny.safetensors", seed=2)
    folder = root / "models" / "controlnet"
    folder.mkdir(parents=True)
    tiny_sd1, tiny_sdxl = PRESETS["tiny-sd1"][2], PRESETS["tiny-sdxl"][2]
    _adapter(folder / "t2iadapter_tiny_sd14v1.pth", tiny_sd1, seed=5)
    _adapter(folder / "t2iadapter_tiny_canny.safetensors", tiny_sd1, seed=6, hint_channels=1)
    _adapter(folder / "t2i-adapter-tiny-sdxl.safetensors", tiny_sdxl, seed=7, xl=True)
    _adapter(folder / "t2iadapter_wide.safetensors", dataclasses.replace(tiny_sd1, model_channels=64), seed=8)
    make_controlnet("tiny-sd1", folder / "tiny_controlnet.safetensors", seed=9)
    (root / "input").mkdir()
    for name, box in (("edges.png", (8, 8, 40, 40)), ("other.png", (30, 2, 62, 20))):
        image = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(image).rectangle(box, outline="white", width=2)
        image.save(root / "input" / name)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def workflow(*controls: dict, hint: str = "edges.png", old: bool = False) -> dict:
    """txt2img at 64 px with an Apply ControlNet node per entry of `controls` (its widget values and the file's
    `name`), each chained after the one before."""
    graph = txt2img()
    graph["11"] = {"class_type": "LoadImage", "inputs": {"image": hint}}
    positive, negative = ["6", 0], ["7", 0]
    for i, control in enumerate(controls):
        loader, apply = str(20 + 2 * i), str(21 + 2 * i)
        control = dict(control)
        graph[loader] = {"class_type": "ControlNetLoader",
                         "inputs": {"control_net_name": control.pop("name", "t2iadapter_tiny_sd14v1.pth")}}
        if old:
            graph[apply] = {"class_type": "ControlNetApply", "inputs": {
                "conditioning": positive, "control_net": [loader, 0], "image": ["11", 0], **control}}
            positive = [apply, 0]
        else:
            graph[apply] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": positive, "negative": negative, "control_net": [loader, 0], "image": ["11", 0],
                "start_percent": 0.0, "end_percent": 1.0, **control}}
            positive, negative = [apply, 0], [apply, 1]
    graph["3"]["inputs"].update(positive=positive, negative=negative)
    return graph


def run(base, graph: dict):
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    return engine.run(parse_api(graph), keep=["8"])


def image(base, graph: dict) -> torch.Tensor:
    result = run(base, graph)
    assert result.ok, result.error
    return result.values["8"][0]


def test_an_adapter_changes_the_image_and_follows_its_hint(base):
    plain = image(base, workflow())
    adapted = image(base, workflow({"strength": 1.0}))
    assert (adapted - plain).abs().max() > 1e-3
    assert (image(base, workflow({"strength": 1.0}, hint="other.png")) - adapted).abs().max() > 1e-3
    assert torch.equal(image(base, workflow({"strength": 1.0})), adapted)  # seeded: the same image again
    grey = image(base, workflow({"strength": 1.0, "name": "t2iadapter_tiny_canny.safetensors"}))
    assert (grey - plain).abs().max() > 1e-3  # the one-channel (canny) adapter sees the hint made grey


def test_strength_zero_or_an_empty_range_leaves_the_image_as_without(base):
    plain = image(base, workflow())
    assert torch.equal(image(base, workflow({"strength": 0.0})), plain)
    assert torch.equal(image(base, workflow({"strength": 1.0, "end_percent": 0.0})), plain)
    assert torch.equal(image(base, workflow({"strength": 1.0, "start_percent": 0.8, "end_percent": 0.2})), plain)
    part = image(base, workflow({"strength": 1.0, "start_percent": 0.5}))
    assert (part - plain).abs().max() > 1e-4 and (part - image(base, workflow({"strength": 1.0}))).abs().max() > 1e-4


def test_the_older_node_gives_the_negative_prompt_the_adapter_too_as_in_comfyui(base):
    assert torch.equal(image(base, workflow({"strength": 1.0}, old=True)), image(base, workflow({"strength": 1.0})))


def test_the_adapter_runs_once_per_run_whatever_the_steps(base, monkeypatch):
    calls = []
    forward = T2IAdapter.forward

    def counting(self, hint):
        calls.append(hint.shape)
        return forward(self, hint)

    monkeypatch.setattr(T2IAdapter, "forward", counting)
    image(base, workflow({"strength": 1.0}))
    assert calls == [(1, 3, 64, 64)]  # 4 steps, both prompts: one run of the adapter on the 8x latent-sized hint


def test_an_adapter_chained_with_a_controlnet_adds_to_it(base):
    controlnet = {"strength": 1.0, "name": "tiny_controlnet.safetensors"}
    alone = image(base, workflow(controlnet))
    both = image(base, workflow(controlnet, {"strength": 1.0}))
    other_order = image(base, workflow({"strength": 1.0}, controlnet))
    assert (both - alone).abs().max() > 1e-3
    torch.testing.assert_close(both, other_order, rtol=0, atol=1e-5)  # the sum does not care about the order


def test_adapters_that_do_not_fit_the_model_are_refused_clearly(base):
    result = run(base, workflow({"strength": 1.0, "name": "t2i-adapter-tiny-sdxl.safetensors"}))
    assert not result.ok
    assert "t2i-adapter-tiny-sdxl.safetensors is a ControlNet for SDXL" in str(result.error)
    result = run(base, workflow({"strength": 1.0, "name": "t2iadapter_wide.safetensors"}))
    assert not result.ok
    assert ("t2iadapter_wide.safetensors does not fit the model tiny.safetensors: the T2I-Adapter's level 0 "
            "features (64 channels at 1/1 of the latent's size) do not fit the UNet's block there (32 channels "
            "at 1/1)") in str(result.error)


def test_low_vram_streams_the_adapter_as_it_does_the_unet(base):
    from executor.devices import EngineOptions

    engine = Executor(builtin_registry(), services=Services.create(
        base, force_cpu=True, options=EngineOptions(lowvram=True)))
    result = engine.run(parse_api(workflow({"strength": 1.0})), keep=["8"])
    assert result.ok, result.error
    torch.testing.assert_close(result.values["8"][0], image(base, workflow({"strength": 1.0})), rtol=0, atol=1e-5)


@pytest.mark.cuda
def test_on_cuda_an_adapter_run_matches_the_cpu(base):
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=False))
    result = engine.run(parse_api(workflow({"strength": 1.0}, {"strength": 0.5})), keep=["8"])
    assert result.ok, result.error
    gpu, cpu = result.values["8"][0], image(base, workflow({"strength": 1.0}, {"strength": 0.5}))
    mse = float(((gpu.float().cpu() - cpu) ** 2).mean())
    assert mse < 1e-2, mse  # bf16 on the GPU, fp32 here: close, not equal
