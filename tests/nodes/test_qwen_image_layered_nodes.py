"""Qwen-Image-Layered end to end on tiny random files in the released layouts (`main.py make-qwen-image`): ComfyUI's
"Image to Layers" graph (LoadImage, ImageScaleToMaxDimension, VAEEncode with the RGBA VAE, ReferenceLatent on both
prompts, GetImageSize, EmptyQwenImageLayeredLatentImage, ModelSamplingAuraFlow 1, KSampler, LatentCutToBatch,
VAEDecode, SaveImage) against an Euler loop over diffusers' QwenImageTransformer2DModel configured as the Layered
model and called as QwenImageLayeredPipeline calls it (same weights, noise, prompt states and levels); the RGBA
pictures decoded and saved; text to layers; a layered latent refused by plain Qwen-Image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_state_dict
from ldm.qwen_image_files import TINY_QWEN_IMAGE_LAYERED
from ldm.qwen_image_presets import make_qwen_image_files
from ldm.sampling import prepare_noise
from ldm.wan_files import WAN21_MEAN, WAN21_STD
from ldm.wan_vae_files import load_wan_vae
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_qwen_image_layered import pipeline_call

SEED, STEPS, CFG, LAYERS = 4, 3, 2.5, 2
WIDTH, HEIGHT = 128, 96  # large enough that ComfyUI's and diffusers' text positions agree (6 x 8 patches >= 3 frames)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_layered")
    files = make_qwen_image_files(root / "models", seed=2, dtype=torch.float32)
    (root / "input").mkdir()
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / "input" / "picture.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def workflow(files: dict, reference: bool = True) -> dict:
    """Comfy-Org's Qwen-Image-Layered template's "Image to Layers" graph (or, without `reference`, its "Text to
    Layers"), short."""
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["layered_unet"].name,
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["qwen25vl"].name, "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": files["layered_vae"].name}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 1.0}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "picture.png"}},
        "6": {"class_type": "ImageScaleToMaxDimension", "inputs": {"image": ["5", 0], "upscale_method": "lanczos",
                                                                   "largest_size": WIDTH}},
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["6", 0], "vae": ["3", 0]}},
        "8": {"class_type": "GetImageSize", "inputs": {"image": ["6", 0]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a fox in the snow, a tree"}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "11": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["9", 0], "latent": ["7", 0]}},
        "12": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["10", 0], "latent": ["7", 0]}},
        "13": {"class_type": "EmptyQwenImageLayeredLatentImage", "inputs": {
            "width": ["8", 0], "height": ["8", 1], "layers": LAYERS, "batch_size": 1}},
        "14": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["11", 0], "negative": ["12", 0], "latent_image": ["13", 0], "seed": SEED,
            "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "15": {"class_type": "LatentCutToBatch", "inputs": {"samples": ["14", 0], "dim": "t", "slice_size": 1}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["3", 0]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "layers"}},
    }
    if not reference:
        for nid in ("5", "6", "7", "8", "11", "12"):
            del doc[nid]
        doc["13"]["inputs"].update(width=WIDTH, height=HEIGHT)
        doc["14"]["inputs"].update(positive=["9", 0], negative=["10", 0])
    return doc


def twin(path) -> QwenImageTransformer2DModel:
    c = TINY_QWEN_IMAGE_LAYERED
    model = QwenImageTransformer2DModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.joint_attention_dim,
        axes_dims_rope=c.axes_dim, use_additional_t_cond=True, use_layer3d_rope=True)
    model.load_state_dict({k: v.float() for k, v in load_state_dict(path).items()}, strict=True)
    return model.eval()


def simple_sigmas(steps: int) -> list[float]:
    """ComfyUI's simple scheduler over 1,000 flow levels with shift 1 (t / 1000), then 0."""
    return [(1000 - int(i * 1000 / steps)) / 1000 for i in range(steps)] + [0.0]


def test_image_to_layers_matches_the_pipelines_transformer_calls(base) -> None:
    engine, files = base
    result = engine.run(parse_api(workflow(files)), keep=["7", "11", "12", "13", "14", "16"])
    assert result.ok, result.error
    reference = result.values["7"][0]["samples"]
    empty, latent, pictures = result.values["13"][0]["samples"], result.values["14"][0]["samples"], \
        result.values["16"][0]
    assert empty.shape == (1, 16, LAYERS + 1, HEIGHT // 8, WIDTH // 8) and latent.shape == empty.shape
    [(positive, pos_options)], [(negative, neg_options)] = result.values["11"][0], result.values["12"][0]

    mean, std = (torch.tensor(v).reshape(1, 16, 1, 1, 1) for v in (WAN21_MEAN, WAN21_STD))
    cond = ((reference - mean) / std)[:, :, 0]  # the pipeline's normalised condition latent
    model = twin(files["layered_unet"])
    sigmas = simple_sigmas(STEPS)
    x = prepare_noise(empty, SEED) * sigmas[0]  # sigma 1: the noise alone
    for sigma, following in zip(sigmas, sigmas[1:], strict=False):
        t = torch.tensor([sigma])
        v_pos, v_neg = (pipeline_call(model, x, cond, t, context, options.get("attention_mask"))
                        for context, options in ((positive, pos_options), (negative, neg_options)))
        x = x + (v_neg + CFG * (v_pos - v_neg)) * (following - sigma)
    expected = x * std + mean
    assert (latent - expected).abs().max() < 1e-4 * expected.abs().max()

    # each frame its own RGBA picture: the composite first, then the layers
    vae = load_wan_vae(files["layered_vae"])
    with torch.no_grad():
        decoded = vae.decode(latent.movedim(2, 0).reshape(LAYERS + 1, 16, 1, HEIGHT // 8, WIDTH // 8))
    expected_pictures = ((decoded[:, :, 0].movedim(1, -1) + 1) / 2).clamp(0, 1)
    assert pictures.shape == (LAYERS + 1, HEIGHT, WIDTH, 4)
    torch.testing.assert_close(pictures, expected_pictures, rtol=1e-4, atol=1e-4)
    saved = engine.run(parse_api(workflow(files)))
    for item in saved.outputs["17"]["images"]:
        with Image.open(engine.services.paths.output / item["subfolder"] / item["filename"]) as image:
            assert image.mode == "RGBA" and image.size == (WIDTH, HEIGHT)


def test_text_to_layers_runs_and_plain_qwen_image_refuses_layers(base) -> None:
    engine, files = base
    result = engine.run(parse_api(workflow(files, reference=False)), keep=["16"])
    assert result.ok, result.error
    assert result.values["16"][0].shape == (LAYERS + 1, HEIGHT, WIDTH, 4)
    doc = workflow(files, reference=False)
    doc["1"]["inputs"]["unet_name"] = files["unet"].name
    result = engine.run(parse_api(doc), keep=["14"])
    assert not result.ok and "only Qwen-Image-Layered takes a latent of several" in str(result.error)
