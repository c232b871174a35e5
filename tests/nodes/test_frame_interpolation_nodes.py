"""FrameInterpolationModelLoader and FrameInterpolate through the engine on tiny random-weight RIFE and FILM files:
the frame count, the originals where ComfyUI keeps them, the middles against the network, ComfyUI's schema, and
refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.frame_interpolation import FILMNet, IFNet
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.frame_interpolation import FrameInterpolate, FrameInterpolationModelLoader

HEIGHT, WIDTH = 64, 80  # RIFE pads the width to 128; FILM needs 64


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("frame_interpolation")
    folder = root / "models" / "frame_interpolation"
    folder.mkdir(parents=True)
    rife = randomized(IFNet(4, (16, 16, 8, 8, 8)), seed=1)
    save_file(rife.state_dict(), folder / "rife_tiny.safetensors")
    film = randomized(FILMNet(filters=2, flow_convs=(1, 1, 1, 1), flow_filters=(4, 4, 4, 4)), seed=2)
    save_file(film.state_dict(), folder / "film_tiny.safetensors")
    save_file({"conv_first.weight": torch.zeros(4, 3, 3, 3)}, folder / "esrgan.safetensors")
    (root / "input").mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / "input" / f"f{i}.png")
    Image.new("RGBA", (WIDTH, HEIGHT), (10, 20, 30, 128)).save(root / "input" / "alpha.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True)), rife, film
    set_paths(FolderPaths())


def workflow(model_name: str, multiplier: int, frames: int = 3) -> dict:
    graph = {"m": {"class_type": "FrameInterpolationModelLoader", "inputs": {"model_name": model_name}}}
    for i in range(frames):
        graph[f"l{i}"] = {"class_type": "LoadImage", "inputs": {"image": f"f{i}.png"}}
    batch = ["l0", 0]
    for i in range(1, frames):
        graph[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": batch, "image2": [f"l{i}", 0]}}
        batch = [f"b{i}", 0]
    graph["i"] = {"class_type": "FrameInterpolate", "inputs": {"model": ["m", 0], "images": batch,
                                                               "multiplier": multiplier}}
    graph["p"] = {"class_type": "PreviewImage", "inputs": {"images": ["i", 0]}}
    return graph


def run(engine, graph: dict, source: list) -> tuple[torch.Tensor, torch.Tensor]:
    executor = engine[0]
    result = executor.run(parse_api(graph), keep=["i", source[0]])
    assert result.ok, result.error
    return result.values[source[0]][source[1]], result.values["i"][0]


def test_rife_triples_a_clip_keeping_the_originals(engine):
    graph = workflow("rife_tiny.safetensors", 3)
    clip, out = run(engine, graph, ["b2", 0])
    assert clip.shape == (3, HEIGHT, WIDTH, 3)
    assert out.shape == (7, HEIGHT, WIDTH, 3)  # (frames - 1) * multiplier + 1
    for k in range(3):
        assert torch.equal(out[3 * k], clip[k])
    rife = engine[1]
    padded = F.pad(clip.movedim(-1, 1), (0, 128 - WIDTH, 0, 64 - HEIGHT), mode="reflect")
    t = torch.tensor([1 / 3, 2 / 3]).reshape(2, 1, 1, 1).expand(-1, 1, 64, 128)
    with torch.no_grad():  # both timesteps of a pair in one batch, each frame encoded once, as the node runs them
        for pair in range(2):
            img0, img1 = padded[pair:pair + 1], padded[pair + 1:pair + 2]
            middles = rife(img0.expand(2, -1, -1, -1), img1.expand(2, -1, -1, -1), t,
                           (rife.extract_features(img0), rife.extract_features(img1)))
            expected = middles[:, :, :HEIGHT, :WIDTH].clamp(0, 1).movedim(1, -1)
            torch.testing.assert_close(out[3 * pair + 1:3 * pair + 3], expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out[1], out[2])


def test_film_doubles_a_clip(engine):
    clip, out = run(engine, workflow("film_tiny.safetensors", 2, frames=2), ["b1", 0])
    assert out.shape == (3, HEIGHT, WIDTH, 3)
    assert torch.equal(out[0], clip[0]) and torch.equal(out[2], clip[1])
    film = engine[2]
    with torch.no_grad():
        middle = film.forward_timesteps(clip[:1].movedim(-1, 1), clip[1:].movedim(-1, 1), [0.5])
    torch.testing.assert_close(out[1], middle[0].clamp(0, 1).movedim(0, -1))


def test_a_single_frame_comes_back_unchanged(engine):
    clip, out = run(engine, workflow("rife_tiny.safetensors", 4, frames=1), ["l0", 0])
    assert torch.equal(out, clip)


def test_refusals(engine):
    executor = engine[0]
    result = executor.run(parse_api(workflow("esrgan.safetensors", 2, frames=2)))
    assert not result.ok
    assert "esrgan.safetensors is not a frame interpolation model" in str(result.error)
    graph = workflow("rife_tiny.safetensors", 1, frames=2)
    with pytest.raises(WorkflowInvalid, match="multiplier.*smaller than min of 2"):  # ComfyUI's minimum
        executor.run(parse_api(graph))
    graph = workflow("rife_tiny.safetensors", 2, frames=2)
    graph["l1"]["inputs"]["image"] = "alpha.png"
    graph["l0"]["inputs"]["image"] = "alpha.png"
    graph["b1"] = {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["a", 0]}}
    graph["a"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["l0", 0], "alpha": ["l0", 1]}}
    result = executor.run(parse_api(graph))
    assert not result.ok and "FrameInterpolate: the images have 4 channels" in str(result.error)
    graph = workflow("film_tiny.safetensors", 2, frames=2)
    graph["s"] = {"class_type": "ImageScale", "inputs": {"image": ["b1", 0], "upscale_method": "nearest-exact",
                                                         "width": 48, "height": 40, "crop": "disabled"}}
    graph["i"]["inputs"]["images"] = ["s", 0]
    result = executor.run(parse_api(graph))
    assert not result.ok and "FILM needs frames at least 64 pixels" in str(result.error)


def test_the_schema_is_comfyuis():
    loader = FrameInterpolationModelLoader.object_info()
    assert loader["display_name"] == "Load Frame Interpolation Model" and loader["category"] == "loaders"
    assert loader["input_order"]["required"] == ["model_name"]
    assert loader["output"] == ["FRAME_INTERPOLATION_MODEL"]
    info = FrameInterpolate.object_info()
    assert info["display_name"] == "Frame Interpolate" and info["category"] == "image/video"
    assert info["input_order"] == {"required": ["model", "images", "multiplier"], "optional": ["torch_compile"]}
    assert info["input"]["required"]["model"] == ["FRAME_INTERPOLATION_MODEL", {}]
    assert info["input"]["required"]["multiplier"] == ["INT", {"default": 2, "min": 2, "max": 16, "step": 1}]
    compile_flag = info["input"]["optional"]["torch_compile"]
    assert compile_flag[0] == "BOOLEAN" and compile_flag[1]["default"] is False and compile_flag[1]["advanced"]
    assert info["output"] == ["IMAGE"]
    assert FrameInterpolate.widget_names() == ["multiplier", "torch_compile"]
