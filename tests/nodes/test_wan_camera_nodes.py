"""WanCameraEmbedding and WanCameraImageToVideo on a tiny Wan Fun camera file: what they put in the prompts
(ComfyUI's: the camera embedding, the start image's latent with the latent space's zero after it), and whole runs
through UNETLoader, KSampler and VAEDecode: the camera changes the video, one move differs from another, a model
without a camera adapter refuses the embedding, and the camera model runs without one."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.wan_camera import camera_embedding
from ldm.wan_files import WAN21_MEAN
from ldm.wan_presets import make_wan_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT, FRAMES = 64, 48, 9


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("camera")
    make_wan_files(root / "models", seed=3, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths))
    set_paths(FolderPaths())


def workflow(pose: str = "Zoom In", unet: str = "wan2.1_fun_camera-tiny.safetensors", camera: bool = True) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl-tiny.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae-tiny.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a lighthouse on a cliff"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry"}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1,
                                                     "color": 0x3070B0}},
        "8": {"class_type": "WanCameraEmbedding", "inputs": {"camera_pose": pose, "width": WIDTH, "height": HEIGHT,
                                                             "length": FRAMES, "speed": 1.0}},
        "9": {"class_type": "WanCameraImageToVideo", "inputs": {
            "positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": ["8", 1], "height": ["8", 2],
            "length": ["8", 3], "batch_size": 1, "start_image": ["7", 0], "camera_conditions": ["8", 0]}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["9", 0], "negative": ["9", 1], "latent_image": ["9", 2], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }
    if not camera:
        del doc["9"]["inputs"]["camera_conditions"]
    return doc


def run(engine, doc: dict, keep: tuple[str, ...]):
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k] for k in keep]


def test_the_nodes_put_comfyuis_values_in_the_prompts(engine) -> None:
    (embedding, width, height, length), (positive, negative, latent) = run(engine, workflow(), ("8", "9"))
    assert (width, height, length) == (WIDTH, HEIGHT, FRAMES)
    torch.testing.assert_close(embedding, camera_embedding("Zoom In", WIDTH, HEIGHT, FRAMES), atol=0, rtol=0)
    assert embedding.shape == (1, 24, 3, HEIGHT, WIDTH)
    for options in (positive[0][1], negative[0][1]):
        assert options["camera_conditions"] is embedding
        image = options["concat_latent_image"]
        assert image.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8) and "concat_mask" not in options
        # After the start picture's latent frame: the latent space's zero (its mean, unnormalised), as ComfyUI's.
        torch.testing.assert_close(image[:, :, 1:], torch.tensor(WAN21_MEAN).reshape(1, -1, 1, 1, 1).expand(
            1, 16, 2, HEIGHT // 8, WIDTH // 8))
        assert not torch.allclose(image[:, :, :1], image[:, :, 1:2])
    assert latent["samples"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8) and latent["samples"].eq(0).all()


def test_a_camera_run_end_to_end_follows_the_camera(engine) -> None:
    (zoom,), (decoded,) = run(engine, workflow("Zoom In"), ("10", "11"))
    assert decoded.shape == (FRAMES, HEIGHT, WIDTH, 3) and torch.isfinite(decoded).all()
    assert 0 <= decoded.min() and decoded.max() <= 1
    [(pan,)] = run(engine, workflow("Pan Left"), ("10",))
    [(without,)] = run(engine, workflow(camera=False), ("10",))
    zoom, pan, without = (x["samples"] for x in (zoom, pan, without))
    assert zoom.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    # The camera reaches the model: a video with it differs from one without, and one move from another.
    assert (zoom - without).abs().mean() > 0.05 and (zoom - pan).abs().mean() > 0.05


def test_a_model_without_a_camera_adapter_refuses_the_camera(engine) -> None:
    result = engine.run(parse_api(workflow(unet="wan2.1_i2v-tiny.safetensors")), keep=["10"])
    assert not result.ok
    assert "carry a camera embedding (WanCameraImageToVideo)" in result.error.exception_message
    assert "wan2.1_i2v-tiny.safetensors has no camera adapter" in result.error.exception_message
    # Without the embedding the same conditioning runs on the plain image-to-video model.
    [(out,)] = run(engine, workflow(unet="wan2.1_i2v-tiny.safetensors", camera=False), ("10",))
    assert torch.isfinite(out["samples"]).all()


def test_an_embedding_of_another_size_is_named(engine) -> None:
    doc = workflow()
    doc["9"]["inputs"].update(width=WIDTH + 16, height=HEIGHT, length=FRAMES)
    result = engine.run(parse_api(doc), keep=["10"])
    assert not result.ok
    assert "24, 3, 48, 80] for this latent (its frames, 8 times its size)" in result.error.exception_message
    doc = workflow()
    doc["8"]["inputs"]["length"] = 8
    result = engine.run(parse_api(doc), keep=["8"])
    assert not result.ok and "1 + 4k pictures" in result.error.exception_message
