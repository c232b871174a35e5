"""Qwen-Image 2.1 end to end on tiny random files in the released layouts (`main.py make-qwen-image21`): ComfyUI's
edit graph (UNETLoader, CLIPLoader type qwen_image with Qwen3-VL, VAELoader with the RGBA VAE, QwenImage21Cache,
TextEncodeQwenImage21 with a picture and the VAE, its latent, KSampler, VAEDecode) against an Euler loop over
diffusers' QwenImage21Transformer2DModel called as QwenImage21Pipeline calls it, with the prompt states, image slots
and reference latent the node made (same weights, noise and levels); text to image from EmptyLatentImage; the
refusals a wrong graph gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Transformer2DModel
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_state_dict
from ldm.qwen_image21 import TINY_QWEN_IMAGE21
from ldm.qwen_image21_vae import LATENTS_MEAN, LATENTS_STD
from ldm.qwen_image_presets import make_qwen_image21_files
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_qwen_image21 import diffusers_layout, pipeline_call

SEED, STEPS, CFG, RESOLUTION = 3, 3, 2.0, 320
SHIFT = 3.1  # Loom's default for Qwen-Image 2.1 (ldm.qwen_image21_files)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_image21")
    files = make_qwen_image21_files(root / "models", seed=2, dtype=torch.float32)
    (root / "input").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "input" / "picture.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def workflow(files: dict, edit: bool = True) -> dict:
    """ComfyUI's Qwen-Image 2.1 edit template's graph (or, without `edit`, its text-to-image one), short."""
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["qwen3vl"].name, "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"].name}},
        "4": {"class_type": "QwenImage21Cache", "inputs": {"model": ["1", 0], "device": "auto", "dtype": "default"}},
        "5": {"class_type": "TextEncodeQwenImage21", "inputs": {
            "clip": ["2", 0], "prompt": "make the sky orange", "negative_prompt": "blurry", "resolution": RESOLUTION,
            "vae": ["3", 0], "images.image_1": ["6", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "picture.png"}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["5", 2], "seed": SEED,
            "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "qwen21"}},
    }
    if not edit:
        del doc["6"], doc["5"]["inputs"]["images.image_1"]
        doc["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 1}}
        doc["8"]["inputs"]["latent_image"] = ["7", 0]
    return doc


def twin(path) -> QwenImage21Transformer2DModel:
    c = TINY_QWEN_IMAGE21
    model = QwenImage21Transformer2DModel(
        in_channels=c.channels, out_channels=c.channels, num_layers=c.num_layers, attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads, context_in_dim=c.text_dim, mlp_ratio=c.mlp_ratio, axes_dims_rope=c.axes_dim)
    model.load_state_dict(diffusers_layout({k: v.float() for k, v in load_state_dict(path).items()}), strict=True)
    return model.eval()


def simple_sigmas(steps: int, shift: float = SHIFT) -> list[float]:
    """ComfyUI's simple scheduler over the 1,000 shifted flow levels, then 0."""
    levels = [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in range(1, 1001)]
    return [levels[-(1 + int(i * 1000 / steps))] for i in range(steps)] + [0.0]


def test_edit_graph_matches_the_pipelines_transformer_calls(base) -> None:
    engine, files = base
    result = engine.run(parse_api(workflow(files)), keep=["5", "8", "9"])
    assert result.ok, result.error
    positive, negative, empty = result.values["5"]
    latent, picture = result.values["8"][0]["samples"], result.values["9"][0]
    assert empty["samples"].shape == (1, 64, 288 // 16, 384 // 16)  # 256 x 192 at about 320^2, multiples of 32
    mean, std = (torch.tensor(v).reshape(1, 64, 1, 1) for v in (LATENTS_MEAN, LATENTS_STD))
    model = twin(files["unet"])
    prompts = []
    for [(states, options)] in (positive, negative):
        [reference] = options["reference_latents"]
        assert reference.shape == empty["samples"].shape
        prompts.append((states, options["attention_mask"], [(reference - mean) / std],
                        options["image_slots"][0].tolist()))
    assert prompts[0][3] != prompts[1][3] or prompts[0][0].shape != prompts[1][0].shape  # prompts of their own

    sigmas = simple_sigmas(STEPS)
    x = prepare_noise(empty["samples"], SEED) * sigmas[0]  # sigma 1: the noise alone
    for sigma, following in zip(sigmas, sigmas[1:], strict=False):
        t = torch.tensor([sigma])
        v_pos, v_neg = (pipeline_call(model, x, t, states, mask, refs, slots) for states, mask, refs, slots in prompts)
        x = x + (v_neg + CFG * (v_pos - v_neg)) * (following - sigma)
    expected = x * std + mean
    assert (latent - expected).abs().max() < 1e-4 * expected.abs().max()
    assert picture.shape == (1, 288, 384, 4)  # RGBA


def test_the_prefix_cache_changes_nothing_but_the_work(base) -> None:
    """QwenImage21Cache's device off (the prompt and picture recomputed at every step) samples the latent the
    default cache does."""
    engine, files = base
    cached = engine.run(parse_api(workflow(files)), keep=["8"])
    doc = workflow(files)
    doc["4"]["inputs"]["device"] = "off"
    recomputed = engine.run(parse_api(doc), keep=["4", "8"])
    assert cached.ok and recomputed.ok, (cached.error, recomputed.error)
    assert not recomputed.values["4"][0].unet.prefix_cache
    torch.testing.assert_close(recomputed.values["8"][0]["samples"], cached.values["8"][0]["samples"],
                               rtol=1e-5, atol=1e-5)


def test_text_to_image_refits_the_empty_latent_and_saves_rgba(base) -> None:
    engine, files = base
    result = engine.run(parse_api(workflow(files, edit=False)), keep=["5", "8"])
    assert result.ok, result.error
    [(_, options)] = result.values["5"][0]
    assert "image_slots" not in options and "reference_latents" not in options
    sampled = result.values["8"][0]
    assert sampled["samples"].shape == (1, 64, 12, 16)  # EmptyLatentImage's 1/8 refitted to 1/16
    assert "downscale_ratio_spacial" not in sampled  # a later sampler must not refit it again
    [item] = result.outputs["10"]["images"]
    with Image.open(engine.services.paths.output / item["subfolder"] / item["filename"]) as image:
        assert image.mode == "RGBA" and image.size == (256, 192)


def test_wrong_graphs_are_refused_by_name(base) -> None:
    engine, files = base
    doc = workflow(files)  # Qwen-Image 2.1's node on an SD1 CLIP
    doc["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    from ldm.presets import make_checkpoint

    make_checkpoint("tiny-sd1", engine.services.paths.base / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    doc["5"]["inputs"]["clip"] = ["20", 1]
    with pytest.raises(WorkflowInvalid, match="TextEncodeQwenImage21 needs Qwen-Image 2.1's text encoder"):
        engine.run(parse_api(doc))
    doc = workflow(files)  # the cache node on another model
    doc["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    result = engine.run(parse_api(doc), keep=["4"])
    assert not result.ok and "QwenImage21Cache is for Qwen-Image 2.1" in str(result.error)
