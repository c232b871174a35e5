"""LTX-Video end to end on tiny random files in the real layouts (`main.py make-ltxv`): ComfyUI's declarations, and
the text-to-video and image-to-video workflows (SamplerCustom on LTXVScheduler's levels) against a plain Euler loop
over diffusers' LTXVideoTransformer3DModel with the same weights, prompts (T5 states and attention masks), frame rate
and noise. ComfyUI's LTX-Video positions (the causal first frame) are LTXConditionPipeline's."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXConditionPipeline

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.ltxv_files import load_ltxv_unet
from ldm.ltxv_presets import CHECKPOINT, T5XXL, make_ltxv_files
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_ltxv import _twin

SIZE, LENGTH, SEED, STEPS, CFG, FRAME_RATE = 64, 17, 4, 4, 3.0, 24.0
LATENT = (1, 128, 3, 2, 2)  # 17 pictures: 1 + 2 latent frames; 64 px: 2 latent pixels


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltxv")
    files = make_ltxv_files(root / "models", seed=2, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def workflow(i2v: bool = False) -> dict:
    doc = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": T5XXL, "type": "ltxv"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a wave breaking on rocks"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry, jittery"}},
        "5": {"class_type": "LTXVConditioning",
              "inputs": {"positive": ["3", 0], "negative": ["4", 0], "frame_rate": FRAME_RATE}},
        "6": {"class_type": "EmptyLTXVLatentVideo",
              "inputs": {"width": SIZE, "height": SIZE, "length": LENGTH, "batch_size": 1}},
        "7": {"class_type": "LTXVScheduler", "inputs": {"steps": STEPS, "max_shift": 2.05, "base_shift": 0.95,
                                                        "stretch": True, "terminal": 0.1, "latent": ["6", 0]}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "9": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": SEED, "cfg": CFG, "positive": ["5", 0],
            "negative": ["5", 1], "sampler": ["8", 0], "sigmas": ["7", 0], "latent_image": ["6", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }
    if i2v:
        doc["12"] = {"class_type": "EmptyImage",
                     "inputs": {"width": 96, "height": 80, "batch_size": 1, "color": 0x3060C0}}
        doc["13"] = {"class_type": "LTXVImgToVideo", "inputs": {
            "positive": ["5", 0], "negative": ["5", 1], "vae": ["1", 2], "image": ["12", 0], "width": SIZE,
            "height": SIZE, "length": LENGTH, "batch_size": 1, "strength": 1.0}}
        doc["9"]["inputs"].update(positive=["13", 0], negative=["13", 1], latent_image=["13", 2])
    return doc


def run(engine, doc: dict, keep: tuple[str, ...]):
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k] for k in keep]


def reference_loop(base, positive, negative, sigmas, start=None):
    """Euler over diffusers' transformer: CFG on the velocity, x += (next - sigma) * v; for image-to-video the
    start frame stays clean and is told level 0 (diffusers' per-token timesteps)."""
    unet = load_ltxv_unet(base[1]["checkpoint"])
    twin = _twin(unet.unet)
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1, 1) for v in (unet.family.latent_mean, unet.family.latent_std))
    frames, rows, cols = LATENT[2:]
    ids = LTXConditionPipeline._scale_video_ids(LTXConditionPipeline._prepare_video_ids(2, frames, rows, cols),
                                                scale_factor=32, scale_factor_t=8).float()
    ids[:, 0] = ids[:, 0] / FRAME_RATE
    context = torch.cat([positive[0][0], negative[0][0]])
    mask = torch.cat([positive[0][1]["attention_mask"], negative[0][1]["attention_mask"]])
    x = prepare_noise(torch.zeros(LATENT), SEED)
    clean = None if start is None else (start - mean) / std
    for sigma, next_sigma in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        levels = torch.full((2, frames, rows, cols), sigma)
        if clean is not None:
            x[:, :, :1] = clean[:, :, :1]
            levels[:, 0] = 0.0
        with torch.no_grad():
            out = twin(LTXPipeline._pack_latents(torch.cat([x, x])), context, levels.flatten(1) * 1000, mask,
                       video_coords=ids, return_dict=False)[0]
        cond, uncond = LTXPipeline._unpack_latents(out, frames, rows, cols).chunk(2)
        x = x + (next_sigma - sigma) * (uncond + CFG * (cond - uncond))
    if clean is not None:
        x[:, :, :1] = clean[:, :, :1]
    return x * std + mean


def test_declarations_are_comfyuis(engine) -> None:
    info = {name: engine.registry.get(name).object_info() for name in
            ("EmptyLTXVLatentVideo", "LTXVConditioning", "LTXVScheduler", "ModelSamplingLTXV", "LTXVImgToVideo")}
    assert {name: i["input_order"]["required"] for name, i in info.items()} == {
        "EmptyLTXVLatentVideo": ["width", "height", "length", "batch_size"],
        "LTXVConditioning": ["positive", "negative", "frame_rate"],
        "LTXVScheduler": ["steps", "max_shift", "base_shift", "stretch", "terminal"],
        "ModelSamplingLTXV": ["model", "max_shift", "base_shift"],
        "LTXVImgToVideo": ["positive", "negative", "vae", "image", "width", "height", "length", "batch_size",
                           "strength"]}
    assert info["LTXVScheduler"]["output"] == ["SIGMAS"]
    length = info["EmptyLTXVLatentVideo"]["input"]["required"]["length"][1]
    assert (length["default"], length["min"], length["step"]) == (97, 1, 8)


def test_text_to_video_matches_an_euler_loop_over_diffusers_transformer(engine, base) -> None:
    latent, video, positive, negative, sigmas = run(engine, workflow(), ("9", "10", "3", "4", "7"))
    assert sigmas[0].shape == (STEPS + 1,) and float(sigmas[0][-2]) == pytest.approx(0.1)
    expected = reference_loop(base, positive[0], negative[0], sigmas[0])
    assert latent[0]["samples"].shape == LATENT and expected.std() > 0.1
    torch.testing.assert_close(latent[0]["samples"], expected, rtol=1e-4, atol=1e-4)
    assert video[0].shape == (LENGTH, SIZE, SIZE, 3) and video[0].std() > 0.01


def test_image_to_video_keeps_the_start_frame_and_matches_the_loop(engine, base) -> None:
    latent, prepared, positive, negative, sigmas = run(engine, workflow(i2v=True), ("9", "13", "3", "4", "7"))
    prepared = prepared[2]
    assert prepared["noise_mask"].flatten().tolist() == [0.0, 1.0, 1.0]
    start = prepared["samples"]
    expected = reference_loop(base, positive[0], negative[0], sigmas[0], start)
    torch.testing.assert_close(latent[0]["samples"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latent[0]["samples"][:, :, :1], start[:, :, :1], rtol=1e-5, atol=1e-5)


def test_model_sampling_ltxv_and_refusals(engine) -> None:
    doc = workflow()
    doc["20"] = {"class_type": "ModelSamplingLTXV",
                 "inputs": {"model": ["1", 0], "max_shift": 2.05, "base_shift": 0.95, "latent": ["6", 0]}}
    doc["9"]["inputs"]["model"] = ["20", 0]
    model = run(engine, doc, ("20",))[0][0]
    assert model.schedule.shift == pytest.approx(0.95 + (12 - 1024) * 1.1 / 3072)
    doc["6"] = {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    doc["7"]["inputs"].pop("latent")
    result = engine.run(parse_api(doc))
    assert not result.ok and "(1, 4, 8, 8) is not a video latent [B, C, frames, h, w]: make it with " \
                             "EmptyLTXVLatentVideo" in str(result.error)
    doc["9"]["inputs"]["model"] = ["1", 0]  # without ModelSamplingLTXV: the empty latent is fitted, as in ComfyUI
    latent = run(engine, doc, ("9",))[0][0]
    assert latent["samples"].shape == (1, 128, 1, SIZE // 8, SIZE // 8)  # EmptyLatentImage's 1/8 size, kept
    doc = workflow()
    doc["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}}
    with pytest.raises(WorkflowInvalid, match="missing.safetensors"):
        engine.run(parse_api(doc))
