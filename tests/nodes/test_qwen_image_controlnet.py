"""Qwen-Image ControlNets (InstantX's layout) in ComfyUI's workflow on tiny random files: UNETLoader, CLIPLoader
(qwen_image), VAELoader, ControlNetLoader, Apply ControlNet (vae linked) or ControlNetInpaintingAliMamaApply, KSampler,
against diffusers' QwenImageControlNetPipeline and QwenImageControlNetInpaintPipeline given the same transformer,
ControlNet, VAE, prompt states, noise and levels; strength 0 and a ControlNet whose output layers are zero change
nothing; the refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetInpaintPipeline,
    QwenImageControlNetPipeline,
    QwenImagePipeline,
)
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_state_dict, write_safetensors
from ldm.controlnet import load_controlnet
from ldm.controlnet_qwen_image import random_qwen_image_controlnet, write_tiny_qwen_image_controlnet
from ldm.qwen_image_files import TINY_QWEN_IMAGE, load_qwen_image_unet
from ldm.qwen_image_presets import make_qwen_image_files
from ldm.sampling import prepare_noise
from ldm.wan_files import WAN21_MEAN, WAN21_STD
from ldm.wan_vae_files import load_wan_vae
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_controlnet_qwen_image import diffusers_controlnet
from tests.ldm.test_qwen_image import diffusers_twin

WIDTH, HEIGHT, SEED, STEPS, SHIFT, STRENGTH = 64, 48, 6, 4, 3.1, 0.8  # 4 steps: `simple` takes 1 - i / 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-controlnet")
    models = root / "models"
    files = make_qwen_image_files(models, seed=2, dtype=torch.float32)
    vae = load_state_dict(files["vae"])
    vae["conv1.weight"][16:] = 0  # no posterior spread: diffusers' pipelines sample it
    vae["conv1.bias"][16:] = -30
    write_safetensors(vae, models / "vae" / "qwen_image_vae-sharp.safetensors", {}, torch.float32)
    write_tiny_qwen_image_controlnet(models / "controlnet" / "Qwen-Image-InstantX-ControlNet-Union.safetensors",
                                     blocks=1, seed=5)
    write_tiny_qwen_image_controlnet(models / "controlnet" / "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors",
                                     blocks=1, seed=6, inpaint=True)
    silent = random_qwen_image_controlnet(blocks=1, seed=5).state_dict()
    for key in silent:
        if key.startswith("controlnet_blocks."):
            silent[key].zero_()
    write_safetensors(silent, models / "controlnet" / "silent.safetensors", {}, torch.float32)
    (root / "input").mkdir()
    g = torch.Generator().manual_seed(1)
    rgba = (torch.rand(HEIGHT, WIDTH, 4, generator=g) * 255).to(torch.uint8)
    rgba[..., 3] = 255
    rgba[8:32, 16:48, 3] = 0  # repainted where transparent (LoadImage's mask: 1 - alpha), on whole latent pixels
    Image.fromarray(rgba.numpy(), "RGBA").save(root / "input" / "hint.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield root, files
    set_paths(FolderPaths())


def workflow(files: dict, controlnet: str | None, strength: float = STRENGTH, node: str = "ControlNetApplyAdvanced",
             vae: bool = True) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["qwen25vl"].name, "type": "qwen_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae-sharp.safetensors"}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a lighthouse"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    if controlnet is not None:
        doc["12"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
        inputs = {"positive": ["5", 0], "negative": ["6", 0], "control_net": ["12", 0], "image": ["11", 0],
                  "strength": strength, "start_percent": 0.0, "end_percent": 1.0}
        if node == "ControlNetInpaintingAliMamaApply":
            inputs["mask"] = ["11", 1]
        if vae:
            inputs["vae"] = ["3", 0]
        doc["13"] = {"class_type": node, "inputs": inputs}
        doc["8"]["inputs"].update(positive=["13", 0], negative=["13", 1])
    return doc


def run(root, doc: dict, keep: tuple[str, ...] = ("8",)):
    engine = Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    result = engine.run(parse_api(doc), keep=list(keep))
    return result, [result.values[k][0] for k in keep] if result.ok else None


def diffusers_latents(root, files: dict, states: torch.Tensor, mask: torch.Tensor, controlnet: str,
                      inpaint: bool) -> torch.Tensor:
    """The pipeline's latents (unnormalised, as a LATENT holds them) for the same run: `simple`'s levels shifted by
    the scheduler, the hint image given as a tensor in -1..1 at the output size (no resampling)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    set_timesteps = scheduler.set_timesteps

    def simple_levels(num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        set_timesteps(sigmas=[1 - i / STEPS for i in range(STEPS)], device=device)

    scheduler.set_timesteps = simple_levels
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16)
    wan = load_wan_vae(root / "models" / "vae" / "qwen_image_vae-sharp.safetensors", dtype=torch.float32)
    vae.load_state_dict(convert_wan_vae_to_diffusers(dict(wan.state_dict())), strict=True)
    transformer = diffusers_twin(load_qwen_image_unet(files["unet"], dtype=torch.float32).unet)
    ours = load_controlnet(root / "models" / "controlnet" / controlnet).model
    ours.config = dataclasses.replace(ours.config, axes_dim=TINY_QWEN_IMAGE.axes_dim)  # the model's, as `fit` sets
    net = diffusers_controlnet(ours)
    kind = QwenImageControlNetInpaintPipeline if inpaint else QwenImageControlNetPipeline
    pipe = kind(scheduler=scheduler, vae=vae.eval(), text_encoder=None, tokenizer=None, transformer=transformer,
                controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    noise = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    packed = QwenImagePipeline._pack_latents(noise, 1, 16, HEIGHT // 8, WIDTH // 8)
    rgba = torch.from_numpy(np.array(Image.open(root / "input" / "hint.png"))).float() / 255
    hint = rgba[..., :3].permute(2, 0, 1)[None] * 2 - 1
    extra = {"control_mask": mask[None, None]} if inpaint else {}
    with torch.no_grad():
        out = pipe(prompt_embeds=states, prompt_embeds_mask=None, height=HEIGHT, width=WIDTH,
                   num_inference_steps=STEPS, true_cfg_scale=1.0, latents=packed, output_type="latent",
                   control_image=hint, controlnet_conditioning_scale=STRENGTH, **extra).images
    out = QwenImagePipeline._unpack_latents(out, HEIGHT, WIDTH, 8)[:, :, 0]
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1) for v in (WAN21_MEAN, WAN21_STD))
    return out * std + mean


@pytest.mark.parametrize(("controlnet", "node"), [
    ("Qwen-Image-InstantX-ControlNet-Union.safetensors", "ControlNetApplyAdvanced"),
    ("Qwen-Image-InstantX-ControlNet-Inpainting.safetensors", "ControlNetInpaintingAliMamaApply")])
def test_workflow_matches_diffusers_pipeline(base, controlnet, node) -> None:
    root, files = base
    result, values = run(root, workflow(files, controlnet, node=node), ("8", "9", "5", "11"))
    assert result.ok, result.error
    latent, image, positive = values[:3]
    mask = result.values["11"][1]
    _, [plain] = run(root, workflow(files, None))
    states, options = positive[0]
    assert options.get("attention_mask") is None or bool(options["attention_mask"].all())
    expected = diffusers_latents(root, files, states, mask[0], controlnet, node != "ControlNetApplyAdvanced")
    assert (latent["samples"] - plain["samples"]).abs().mean() > 1e-3  # the ControlNet acts
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3)


def test_strength_zero_and_silent_controlnet_change_nothing(base) -> None:
    root, files = base
    _, [plain] = run(root, workflow(files, None))
    _, [zero] = run(root, workflow(files, "Qwen-Image-InstantX-ControlNet-Union.safetensors", strength=0.0))
    _, [silent] = run(root, workflow(files, "silent.safetensors", strength=1.0))
    _, [acting] = run(root, workflow(files, "Qwen-Image-InstantX-ControlNet-Union.safetensors", strength=0.5))
    assert torch.equal(zero["samples"], plain["samples"]) and torch.equal(silent["samples"], plain["samples"])
    assert (acting["samples"] - plain["samples"]).abs().mean() > 1e-3


def test_refusals(base) -> None:
    root, files = base
    result, _ = run(root, workflow(files, "Qwen-Image-InstantX-ControlNet-Union.safetensors", vae=False))
    assert not result.ok and "is a Qwen-Image ControlNet, whose hint image is VAE-encoded" in str(result.error)
    result, _ = run(root, workflow(files, "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors"))
    assert not result.ok and "apply it with ControlNetInpaintingAliMamaApply" in str(result.error)
