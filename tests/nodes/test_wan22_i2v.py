"""Wan 2.2 5B image-to-video as ComfyUI runs it (Wan22ImageToVideoLatent: the start image's latent frame kept by the
noise mask, which the model takes as per-frame noise levels) against diffusers' WanImageToVideoPipeline with
`expand_timesteps` (Wan2.2-TI2V-5B's), on tiny random files in the real layouts."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.sampling import prepare_noise
from ldm.umt5 import write_tiny_umt5
from ldm.wan_files import WAN22_MEAN, WAN22_STD, load_wan_unet, write_tiny_wan
from ldm.wan_vae_files import load_wan_vae, write_tiny_wan_vae
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_wan import diffusers_twin
from tests.ldm.test_wan_vae import _wan22_to_diffusers
from tests.nodes.test_wan_nodes import CFG, FRAMES, SEED, SHIFT, STEPS, scheduler

SIZE = 64  # 4x4 latent pixels at Wan 2.2's 1/16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    models = root / "models"
    files = {"unet": write_tiny_wan(models / "diffusion_models" / "wan2.2_ti2v-tiny.safetensors", "ti2v", seed=4,
                                    dtype=torch.float32),
             "vae": write_tiny_wan_vae(models / "vae" / "wan2.2_vae-tiny.safetensors", version="2.2", seed=5),
             "umt5": write_tiny_umt5(models / "text_encoders" / "umt5-tiny.safetensors", dtype=torch.float32)}
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


def workflow(start: bool = True) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_ti2v-tiny.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5-tiny.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan2.2_vae-tiny.safetensors"}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a kite over a beach"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "static"}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": 80, "height": 80, "batch_size": 1, "color": 0x40A060}},
        "8": {"class_type": "Wan22ImageToVideoLatent", "inputs": {
            "vae": ["3", 0], "width": SIZE, "height": SIZE, "length": FRAMES, "batch_size": 1,
            **({"start_image": ["7", 0]} if start else {})}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["8", 0],
            "denoise": 1.0}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["3", 0]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }
    return doc


def test_wan22_image_to_video_matches_diffusers(base) -> None:
    engine = Executor(builtin_registry(), services=Services.create(base[0]))
    result = engine.run(parse_api(workflow()), keep=["9", "10", "8", "5", "6", "7"])
    assert result.ok, result.error
    latent, video, prepared, positive, negative, image = (result.values[k][0] for k in ("9", "10", "8", "5", "6", "7"))
    assert prepared["noise_mask"].flatten(2)[0, 0, ::16].tolist() == [0.0, 1.0, 1.0]
    files = base[1]
    vae = load_wan_vae(files["vae"])
    c = vae.config
    twin_vae = AutoencoderKLWan(base_dim=c.base_dim, decoder_base_dim=c.decoder_base_dim, z_dim=c.z_dim,
                                is_residual=True, in_channels=12, out_channels=12, patch_size=c.patch_size,
                                scale_factor_spatial=c.spatial_compression, latents_mean=list(WAN22_MEAN),
                                latents_std=list(WAN22_STD))
    twin_vae.load_state_dict(_wan22_to_diffusers(dict(vae.state_dict())), strict=True)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=twin_vae.eval(), scheduler=scheduler(),
                                   transformer=diffusers_twin(load_wan_unet(files["unet"]).unet),
                                   expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    noise = prepare_noise(torch.zeros(1, 48, 3, SIZE // 16, SIZE // 16), SEED)
    with torch.no_grad():
        out = pipe(image=image[:, :SIZE, :SIZE].movedim(-1, 1), prompt_embeds=positive[0][0],
                   negative_prompt_embeds=negative[0][0], height=SIZE, width=SIZE, num_frames=FRAMES,
                   num_inference_steps=STEPS, guidance_scale=CFG, latents=noise, output_type="latent").frames
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1, 1) for v in (WAN22_MEAN, WAN22_STD))
    torch.testing.assert_close(latent["samples"], out * std + mean, rtol=1e-4, atol=1e-4)
    # the start frame is the image's latent, kept
    torch.testing.assert_close(latent["samples"][:, :, :1], prepared["samples"][:, :, :1], rtol=1e-5, atol=1e-5)
    assert video.shape == (FRAMES, SIZE, SIZE, 3)


def test_wan22_text_to_video_latent_is_empty(base) -> None:
    engine = Executor(builtin_registry(), services=Services.create(base[0]))
    result = engine.run(parse_api(workflow(start=False)), keep=["8", "9"])
    assert result.ok, result.error
    prepared = result.values["8"][0]
    assert "noise_mask" not in prepared and prepared["samples"].shape == (1, 48, 3, SIZE // 16, SIZE // 16)
    assert not prepared["samples"].any()
