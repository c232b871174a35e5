"""ControlNet workflows through the engine, as ComfyUI's API format writes them: a tiny checkpoint, a
tiny ControlNet file of its family, and a hint image from the input folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint, make_controlnet
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_device_options import txt2img

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "tiny.safetensors", seed=2)
    make_controlnet("tiny-sd1", root / "models" / "controlnet" / "tiny_canny.safetensors", seed=5)
    make_controlnet("tiny-sdxl", root / "models" / "controlnet" / "tiny_xl.safetensors", seed=6)
    (root / "input").mkdir()
    for name, box in (("edges.png", (8, 8, 40, 40)), ("other.png", (30, 2, 62, 20))):
        image = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(image).rectangle(box, outline="white", width=2)
        image.save(root / "input" / name)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def workflow(control: dict | None = None, hint: str = "edges.png", old: bool = False) -> dict:
    """txt2img at 64 px; `control` holds the Apply ControlNet node's widget values."""
    graph = txt2img()
    if control is not None:
        graph["10"] = {"class_type": "ControlNetLoader",
                       "inputs": {"control_net_name": control.pop("name", "tiny_canny.safetensors")}}
        graph["11"] = {"class_type": "LoadImage", "inputs": {"image": hint}}
        if old:
            graph["12"] = {"class_type": "ControlNetApply", "inputs": {
                "conditioning": ["6", 0], "control_net": ["10", 0], "image": ["11", 0], **control}}
            graph["3"]["inputs"]["positive"] = ["12", 0]
        else:
            graph["12"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["6", 0], "negative": ["7", 0], "control_net": ["10", 0], "image": ["11", 0],
                "start_percent": 0.0, "end_percent": 1.0, **control}}
            graph["3"]["inputs"]["positive"] = ["12", 0]
            graph["3"]["inputs"]["negative"] = ["12", 1]
    return graph


def image(base, graph: dict) -> torch.Tensor:
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    result = engine.run(parse_api(graph), keep=["8"])
    assert result.ok, result.error
    return result.values["8"][0]


def test_a_controlnet_changes_the_image_and_follows_its_hint(base):
    plain = image(base, workflow())
    controlled = image(base, workflow({"strength": 1.0}))
    assert (controlled - plain).abs().max() > 1e-3
    other_hint = image(base, workflow({"strength": 1.0}, hint="other.png"))
    assert (other_hint - controlled).abs().max() > 1e-3
    again = image(base, workflow({"strength": 1.0}))
    assert torch.equal(again, controlled)  # seeded: the same inputs make the same image


def test_strength_zero_or_an_empty_range_leaves_the_image_as_without(base):
    plain = image(base, workflow())
    assert torch.equal(image(base, workflow({"strength": 0.0})), plain)
    assert torch.equal(image(base, workflow({"strength": 1.0, "end_percent": 0.0})), plain)


def test_the_older_node_on_the_positive_prompt_controls_the_negative_too_as_in_comfyui(base):
    advanced = image(base, workflow({"strength": 1.0}))
    old = image(base, workflow({"strength": 1.0}, old=True))
    assert torch.equal(old, advanced)  # the negative prompt gets the positive's control: the same calls
    # A negative prompt with a control of its own keeps it.
    graph = workflow({"strength": 1.0}, old=True)
    graph["13"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["7", 0], "control_net": ["10", 0],
                                                                "image": ["11", 0], "strength": 0.5}}
    graph["3"]["inputs"]["negative"] = ["13", 0]
    assert (image(base, graph) - old).abs().max() > 1e-4


def test_a_controlnet_for_another_family_is_refused_with_both_names(base):
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    # Refused at validation: the files' headers say SDXL (the ControlNet) and SD1 (the checkpoint whose CLIP
    # encoded the prompts), for both Apply nodes.
    for old in (False, True):
        with pytest.raises(WorkflowInvalid, match="tiny_xl.safetensors is a ControlNet for SDXL; the (positive|"
                                                  "conditioning) conditioning linked was encoded for SD1"):
            engine.run(parse_api(workflow({"strength": 1.0, "name": "tiny_xl.safetensors"}, old=old)))
    # Where validation cannot tell (the prompts combined first), the KSampler refuses it, naming both files.
    graph = workflow({"strength": 1.0, "name": "tiny_xl.safetensors"})
    graph["13"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                                  "conditioning_2": ["6", 0]}}
    graph["14"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["7", 0],
                                                                  "conditioning_2": ["7", 0]}}
    graph["12"]["inputs"].update(positive=["13", 0], negative=["14", 0])
    result = engine.run(parse_api(graph), keep=["8"])
    assert not result.ok
    message = str(result.error)
    assert "tiny_xl.safetensors is a ControlNet for SDXL" in message and "tiny.safetensors" in message
    # A difference ControlNet's loader checks the MODEL linked.
    graph = workflow({"strength": 1.0})
    graph["10"] = {"class_type": "DiffControlNetLoader", "inputs": {"model": ["4", 0],
                                                                   "control_net_name": "tiny_xl.safetensors"}}
    with pytest.raises(WorkflowInvalid, match="tiny_xl.safetensors is a ControlNet for SDXL; the MODEL linked is SD1"):
        engine.run(parse_api(graph))


def test_a_controlnet_of_the_right_family_but_another_size_is_refused_clearly(base, tmp_path):
    # The bundled demo model is a small SD1-style UNet: a real SD1.5 ControlNet does not fit it.
    graph = workflow({"strength": 1.0})
    graph["4"]["inputs"]["ckpt_name"] = "loom-demo.safetensors"
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    result = engine.run(parse_api(graph), keep=["8"])
    assert not result.ok
    assert ("tiny_canny.safetensors does not fit the model loom-demo.safetensors: the ControlNet was made for a "
            "UNet with model_channels 32, and this one has 64") in str(result.error)


def test_a_start_after_the_end_never_acts_and_a_missing_file_is_a_clear_error(base):
    plain = image(base, workflow())
    assert torch.equal(image(base, workflow({"strength": 1.0, "start_percent": 0.8, "end_percent": 0.2})), plain)
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    with pytest.raises(WorkflowInvalid, match=r"'nope.safetensors' is not one of \[tiny_canny.safetensors, "
                                              r"tiny_xl.safetensors\] \(the files in models/controlnet"):
        engine.run(parse_api(workflow({"strength": 1.0, "name": "nope.safetensors"})), keep=["8"])


def test_low_vram_streams_the_controlnet_as_it_does_the_unet(base):
    from executor.devices import EngineOptions

    engine = Executor(builtin_registry(), services=Services.create(
        base, force_cpu=True, options=EngineOptions(lowvram=True)))
    result = engine.run(parse_api(workflow({"strength": 1.0})), keep=["8"])
    assert result.ok, result.error
    torch.testing.assert_close(result.values["8"][0], image(base, workflow({"strength": 1.0})), rtol=0, atol=1e-5)


def test_the_resized_hints_are_let_go_after_the_run(base):
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    result = engine.run(parse_api(workflow({"strength": 1.0})), keep=["12"])
    assert result.ok
    positive, negative = result.values["12"]
    control = positive[0][1]["control"]
    assert control is negative[0][1]["control"] and control._hints == {}


@pytest.mark.cuda
def test_on_cuda_a_controlnet_run_launches_an_nchw_unet_and_matches_the_cpu(base):
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=False))
    result = engine.run(parse_api(workflow({"strength": 1.0})), keep=["8"])
    assert result.ok, result.error
    [unet] = [m for m in engine.services.devices.resident() if type(m).__name__ == "UNetModel"]
    assert unet.input_blocks[0][0].weight.is_cuda and unet.input_blocks[0][0].weight.is_contiguous()
    gpu, cpu = result.values["8"][0], image(base, workflow({"strength": 1.0}))
    mse = float(((gpu.float().cpu() - cpu) ** 2).mean())
    assert mse < 1e-2, mse  # bf16 on the GPU, fp32 here: close, not equal


def test_the_cli_runs_a_controlnet_workflow(base, tmp_path):
    graph = workflow({"strength": 1.0})
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "cn"}}
    path = tmp_path / "controlnet.json"
    path.write_text(json.dumps(graph))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "run", str(path), "--json", "--cpu",
                           "--base-dir", str(base.base)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "success"
    assert list((base.base / "output").glob("cn_*.png"))


def test_a_model_name_saved_on_windows_finds_the_file_in_its_subfolder(base):
    import shutil

    sub = base.base / "models" / "controlnet" / "SD15"
    sub.mkdir(exist_ok=True)
    shutil.copy(base.base / "models" / "controlnet" / "tiny_canny.safetensors", sub / "canny.safetensors")
    windows = image(base, workflow({"strength": 1.0, "name": "SD15\\canny.safetensors"}))
    assert torch.equal(windows, image(base, workflow({"strength": 1.0})))


def test_a_difference_controlnet_is_the_models_unet_plus_its_offsets(base):
    """The diff_control_sd15_* files hold ControlNet minus UNet, with a `difference` entry: through
    DiffControlNetLoader they give the whole ControlNet's image; the plain loader names the node to use."""
    import safetensors.torch

    from ldm.checkpoint import load_checkpoint, load_state_dict

    folder = base.model_dirs("controlnet")[0]
    unet = load_checkpoint(base.model_dirs("checkpoints")[0] / "tiny.safetensors").unet.state_dict()
    offsets = {f"control_model.{k}": v.float() - unet[k].float() if k in unet and unet[k].shape == v.shape
               else v.float() for k, v in load_state_dict(folder / "tiny_canny.safetensors").items()}
    safetensors.torch.save_file({**offsets, "difference": torch.tensor(0.0)}, folder / "tiny_diff.safetensors")

    expected = image(base, workflow({"name": "tiny_canny.safetensors", "strength": 1.0}))
    graph = workflow({"name": "tiny_diff.safetensors", "strength": 1.0})
    graph["10"] = {"class_type": "DiffControlNetLoader",
                   "inputs": {"model": ["4", 0], "control_net_name": "tiny_diff.safetensors"}}
    assert torch.allclose(image(base, graph), expected, atol=1e-4)
    assert not torch.allclose(image(base, workflow()), expected, atol=1e-4)  # the ControlNet matters

    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    result = engine.run(parse_api(workflow({"name": "tiny_diff.safetensors", "strength": 1.0})))
    assert not result.ok and "load it with Load ControlNet Model (diff)" in str(result.error)


def test_a_controlnet_prompt_reaches_the_controlnet_alone(base, monkeypatch):
    """CLIPTextEncodeControlnet's prompt (ComfyUI's cross_attn_controlnet) is what the ControlNet attends to on the
    entries that carry it; the UNet keeps the entry's own prompt, and the other side's ControlNet its own."""
    from ldm.controlnet import ControlNet

    seen = []
    forward = ControlNet.forward

    def recording(self, x, hint, timesteps, context, *args, **kwargs):
        seen.append(context.detach().clone())
        return forward(self, x, hint, timesteps, context, *args, **kwargs)

    monkeypatch.setattr(ControlNet, "forward", recording)
    plain = image(base, workflow({"strength": 1.0}))
    plain_contexts = list(seen)
    seen.clear()
    graph = workflow({"strength": 1.0})
    graph["13"] = {"class_type": "CLIPTextEncodeControlnet",
                   "inputs": {"clip": ["4", 1], "conditioning": ["6", 0], "text": "a tall house"}}
    graph["12"]["inputs"]["positive"] = ["13", 0]
    graph["14"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a tall house", "clip": ["4", 1]}}
    graph["15"] = {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}
    engine = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    result = engine.run(parse_api(graph), keep=["8", "6", "7", "14"])
    assert result.ok, result.error
    house, red, empty = (result.values[k][0][0][0] for k in ("14", "6", "7"))
    # the positive's ControlNet call reads the house, the negative's its own empty prompt: one call each (their
    # option sets differ, so they are not batched), 4 steps
    assert len(seen) == 8 and len(plain_contexts) == 4  # the plain run batches both prompts in one call
    positives = [c for c in seen if torch.allclose(c, house.expand_as(c))]
    negatives = [c for c in seen if torch.allclose(c, empty.expand_as(c))]
    assert len(positives) == 4 and len(negatives) == 4
    assert not any(torch.allclose(c[:1], red) for c in seen)
    assert not torch.equal(result.values["8"][0], plain)
