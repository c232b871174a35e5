"""WanVaceToVideo on a tiny Wan VACE file: the controls it puts in the prompts (ComfyUI's formula: the control video
split by its mask, the mask folded 8x8, a reference image in front), the model's vace_context the sampler builds from
them, and whole runs: strength 0 gives the plain text-to-video model's result, a control changes it."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.wan_files import WAN21_MEAN, WAN21_STD, write_tiny_wan
from ldm.wan_presets import make_wan_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT, FRAMES = 64, 48, 9


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("vace")
    make_wan_files(root / "models", seed=3, dtype=torch.float32)
    write_tiny_wan(root / "models" / "diffusion_models" / "wan2.1_vace-tiny.safetensors", "vace", seed=5,
                   dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths))
    set_paths(FolderPaths())


def workflow(strength: float = 1.0, reference: bool = False, vace: bool = True) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.1_vace-tiny.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl-tiny.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae-tiny.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a dancer on a stage"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry"}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 5,
                                                     "color": 0x3070B0}},
        "8": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": WIDTH, "height": HEIGHT}},
        "9": {"class_type": "WanVaceToVideo", "inputs": {
            "positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": WIDTH, "height": HEIGHT,
            "length": FRAMES, "batch_size": 1, "strength": strength, "control_video": ["7", 0],
            "control_masks": ["8", 0], **({"reference_image": ["7", 0]} if reference else {})}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["9", 0], "negative": ["9", 1], "latent_image": ["9", 2], "denoise": 1.0}},
        "11": {"class_type": "TrimVideoLatent", "inputs": {"samples": ["10", 0], "trim_amount": ["9", 3]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }
    if not vace:  # the same run without controls
        doc["10"]["inputs"].update(positive=["5", 0], negative=["6", 0])
    return doc


def run(engine, doc: dict, keep: tuple[str, ...]):
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k] for k in keep]


def test_controls_follow_comfyuis_formula(engine) -> None:
    conditioning, _, latent, trim = run(engine, workflow(reference=True), ("9",))[0]
    options = conditioning[0][1]
    frames, mask = options["vace_frames"][0], options["vace_mask"][0]
    assert options["vace_strength"] == [1.0] and trim == 1
    # a reference frame in front of 3 latent frames: 32 channels (reference latent, the latent space's zero)
    assert frames.shape == (1, 32, 4, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(frames[:, 16:, :1], torch.tensor(WAN21_MEAN).reshape(1, -1, 1, 1, 1).expand(
        1, 16, 1, HEIGHT // 8, WIDTH // 8))
    # a full mask: all to repaint, so the kept half is the grey video's latent and the mask 1 past the reference
    assert mask.shape == (1, 64, 4, HEIGHT // 8, WIDTH // 8)
    assert mask[:, :, :1].eq(0).all() and mask[:, :, 1:].eq(1).all()
    assert latent["samples"].shape == (1, 16, 4, HEIGHT // 8, WIDTH // 8)


def test_strength_zero_is_the_plain_model_and_a_control_changes_the_video(engine) -> None:
    plain = run(engine, workflow(vace=False), ("10",))[0][0]["samples"]
    off = run(engine, workflow(strength=0.0), ("10",))[0][0]["samples"]
    on = run(engine, workflow(strength=1.0), ("10",))[0][0]["samples"]
    torch.testing.assert_close(off, plain)
    assert (on - plain).abs().max() > 1e-3


def test_the_context_the_model_gets_is_the_normalised_controls(engine) -> None:
    from nodes.sd.wan_vace import vace_controls

    model, conditioning = (v[0] for v in run(engine, workflow(), ("1", "9")))
    bound = vace_controls(lambda *a, **k: None, model, conditioning, conditioning)
    frames, mask = conditioning[0][1]["vace_frames"][0], conditioning[0][1]["vace_mask"][0]
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1, 1) for v in (WAN21_MEAN, WAN21_STD))
    expected = torch.cat([(frames[:, :16] - mean) / std, (frames[:, 16:] - mean) / std, mask], dim=1)
    torch.testing.assert_close(bound.context[:, 0], expected)
    assert bound.strengths == [1.0]


def test_controls_on_a_model_without_vace_are_refused(engine) -> None:
    doc = workflow()
    doc["1"]["inputs"]["unet_name"] = "wan2.1_t2v-tiny.safetensors"
    result = engine.run(parse_api(doc))
    assert not result.ok and "is not a Wan VACE model" in str(result.error)
