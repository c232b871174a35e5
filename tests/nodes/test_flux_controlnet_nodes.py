"""A Flux ControlNet (diffusers' FluxControlNetModel layout) through ControlNetLoader and ControlNetApplyAdvanced
with tiny Flux files: a whole workflow against diffusers' FluxControlNetPipeline (same transformer, ControlNet,
VAE, prompt embeddings and noise), and the refusals."""

from __future__ import annotations

import safetensors.torch
import torch
from diffusers import FluxControlNetPipeline, FluxPipeline
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_state_dict, write_safetensors
from ldm.flux_files import LATENT_SHIFT
from ldm.flux_presets import TINY_FLUX, make_flux_files
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_controlnet_flux import diffusers_controlnet
from tests.nodes.test_flux_variants_nodes import diffusers_parts

WIDTH, HEIGHT, SEED, STEPS = 64, 48, 4, 4


def tiny_controlnet():
    return diffusers_controlnet(seed=5, config=TINY_FLUX)  # 2 double blocks and 1 single block; the model has 2, 2


def test_workflow_matches_diffusers_pipeline(tmp_path) -> None:
    models = tmp_path / "models"
    files = make_flux_files(models, "dev", seed=3, dtype=torch.float32)
    vae = load_state_dict(files["vae"])
    vae["encoder.conv_out.weight"][16:] = 0  # no posterior spread: diffusers' pipeline samples it
    vae["encoder.conv_out.bias"][16:] = -30
    write_safetensors(vae, models / "vae" / "ae-sharp.safetensors", {}, torch.float32)
    (models / "controlnet").mkdir()
    controlnet = tiny_controlnet()
    safetensors.torch.save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()},
                                models / "controlnet" / "flux-canny-tiny.safetensors")
    (tmp_path / "input").mkdir()
    pixels = (torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "input" / "edges.png")
    set_paths(FolderPaths(base=tmp_path))
    try:
        engine = Executor(builtin_registry(), services=Services.create(FolderPaths(base=tmp_path), force_cpu=True))
        doc = {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-dev.safetensors",
                                                         "weight_dtype": "default"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                             "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-sharp.safetensors"}},
            "4": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15,
                                                                 "base_shift": 0.5, "width": WIDTH, "height": HEIGHT}},
            "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "a house",
                                                                  "t5xxl": "a house at dusk", "guidance": 3.5}},
            "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
            "11": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
            "12": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "flux-canny-tiny.safetensors"}},
            "13": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["6", 0], "negative": ["7", 0], "control_net": ["12", 0], "image": ["11", 0],
                "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0, "vae": ["3", 0]}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "simple",
                                                       "positive": ["13", 0], "negative": ["13", 1],
                                                       "latent_image": ["5", 0], "denoise": 1.0}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
            "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
        }
        result = engine.run(parse_api(doc), keep=["6", "8"])
        assert result.ok, result.error
        ours = result.values["8"][0]["samples"]
        [(context, options)] = result.values["6"][0]
        without = dict(doc)
        without["8"] = {**doc["8"], "inputs": {**doc["8"]["inputs"], "positive": ["6", 0], "negative": ["7", 0]}}
        plain = engine.run(parse_api(without), keep=["8"]).values["8"][0]["samples"]
        del doc["13"]["inputs"]["vae"]
        refused = engine.run(parse_api(doc))
        assert not refused.ok and "is a Flux ControlNet, whose hint image is VAE-encoded" in str(refused.error)
    finally:
        set_paths(FolderPaths())

    pipe = FluxControlNetPipeline(**diffusers_parts(tmp_path, "dev"), controlnet=tiny_controlnet())
    pipe.set_progress_bar_config(disable=True)
    h, w = HEIGHT // 8, WIDTH // 8
    noise = FluxPipeline._pack_latents(prepare_noise(torch.zeros(1, 16, h, w), SEED), 1, 16, h, w)
    with torch.no_grad():
        packed = pipe(prompt_embeds=context, pooled_prompt_embeds=options["pooled_output"], height=HEIGHT,
                      width=WIDTH, num_inference_steps=STEPS, guidance_scale=3.5, output_type="latent", latents=noise,
                      control_image=Image.open(tmp_path / "input" / "edges.png"),
                      controlnet_conditioning_scale=0.8).images
    expected = FluxPipeline._unpack_latents(packed, HEIGHT, WIDTH, 8) / 0.3611 + LATENT_SHIFT
    assert (ours - plain).abs().mean() > 1e-3  # the ControlNet acts
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
