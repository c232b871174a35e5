"""Qwen-Image end to end on tiny random files in the real layouts (`main.py make-qwen-image`): ComfyUI's workflow
(UNETLoader, CLIPLoader type qwen_image, VAELoader with Wan 2.1's VAE, ModelSamplingAuraFlow, EmptySD3LatentImage,
KSampler) against diffusers' QwenImagePipeline given the same prompt states and mask, noise and levels. With one
prompt (cfg 1): diffusers' "true CFG" rescales the guided prediction's norm, which ComfyUI's CFG does not."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.qwen_image_files import load_qwen_image_unet
from ldm.qwen_image_presets import make_qwen_image_files
from ldm.sampling import prepare_noise
from ldm.wan_files import WAN21_MEAN, WAN21_STD
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT, SEED, STEPS, SHIFT = 64, 48, 6, 4, 3.1  # 4 steps: `simple` takes 1 - i / 4 before the shift


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    files = make_qwen_image_files(root / "models", seed=2, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


def workflow(files: dict, cfg: float = 1.0) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["qwen25vl"].name, "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"].name}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a neon sign that says LOOM"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def run(engine, doc: dict, keep: tuple[str, ...]):
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def test_workflow_matches_qwen_image_pipeline(base) -> None:
    from tests.ldm.test_qwen_image import diffusers_twin

    engine = Executor(builtin_registry(), services=Services.create(base[0]))
    latent, image, positive = run(engine, workflow(base[1]), ("8", "9", "5"))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    set_timesteps = scheduler.set_timesteps

    def simple_levels(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """`simple`'s unshifted levels, which the scheduler shifts (the pipeline would give its own and a mu)."""
        set_timesteps(sigmas=[1 - i / STEPS for i in range(STEPS)], device=device)

    scheduler.set_timesteps = simple_levels
    transformer = diffusers_twin(load_qwen_image_unet(base[1]["unet"], dtype=torch.float32).unet)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    noise = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    packed = QwenImagePipeline._pack_latents(noise, 1, 16, HEIGHT // 8, WIDTH // 8)
    states, options = positive[0]
    with torch.no_grad():
        out = pipe(prompt_embeds=states, prompt_embeds_mask=options["attention_mask"], height=HEIGHT, width=WIDTH,
                   num_inference_steps=STEPS, true_cfg_scale=1.0, latents=packed, output_type="latent").images
    out = QwenImagePipeline._unpack_latents(out, HEIGHT, WIDTH, 8)[:, :, 0]
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1) for v in (WAN21_MEAN, WAN21_STD))
    expected = out * std + mean
    assert latent["samples"].shape == (1, 16, HEIGHT // 8, WIDTH // 8) and expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and image.std() > 0.01


def test_cfg_runs_both_prompts(base) -> None:
    engine = Executor(builtin_registry(), services=Services.create(base[0]))
    plain = run(engine, workflow(base[1]), ("8",))[0]
    guided = run(engine, workflow(base[1], cfg=2.5), ("8",))[0]
    assert not torch.allclose(plain["samples"], guided["samples"])
