"""ControlNetInpaintingAliMamaApply with an SD3 inpainting ControlNet (Alimama's SD3-Controlnet-Inpainting layout:
diffusers' SD3ControlNetModel with one extra conditioning channel) against diffusers'
StableDiffusion3ControlNetInpaintingPipeline: same transformer, text encoders, VAE, ControlNet, picture, mask, noise."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetInpaintingPipeline
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.sampling import prepare_noise
from ldm.sd3_files import LATENT_SCALE, LATENT_SHIFT
from ldm.sd3_presets import VARIANTS
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_sd3_controlnet_nodes import CHECKPOINT, diffusers_vae, pinned_sd3_files
from tests.nodes.test_sd3_nodes import CFG, HEIGHT, SEED, STEPS, TEXTS, WIDTH, reference_pipeline
from tests.nodes.test_sd3_nodes import workflow as sd3_workflow

MODULES = ("nodes.builtin.utils", "nodes.sd.loaders", "nodes.sd.part_loaders", "nodes.sd.image", "nodes.sd.sd3",
           "nodes.sd.flux", "nodes.sd.latent", "nodes.sd.conditioning", "nodes.sd.controlnet", "nodes.sd.sampling",
           "nodes.sd.vae")
STRENGTH = 0.8


def inpainting_controlnet(seed: int) -> SD3ControlNetModel:
    """Alimama's architecture, tiny: InstantX's with a 17-channel hint embedding, every weight random."""
    c = VARIANTS["sd3-medium"]
    model = SD3ControlNetModel(
        sample_size=c.pos_embed_max_size * c.patch_size, patch_size=c.patch_size, in_channels=c.in_channels,
        num_layers=1, attention_head_dim=c.hidden_size // c.num_heads, num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_dim, caption_projection_dim=c.hidden_size,
        pooled_projection_dim=c.adm_in_channels, out_channels=c.out_channels, pos_embed_max_size=c.pos_embed_max_size,
        extra_conditioning_channels=1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            scale = 1.0 if name.endswith("pos_embed") else 0.1
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale + ("norm_" in name))
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_inpaint_cn")
    files = pinned_sd3_files(root / "models", "sd3-medium")
    reference = inpainting_controlnet(seed=9)
    (root / "models" / "controlnet").mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
                                root / "models" / "controlnet" / "sd3-inpaint-tiny.safetensors")
    (root / "input").mkdir()
    rgba = (torch.rand(HEIGHT, WIDTH, 4, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    rgba[..., 3] = 255
    rgba[16:40, 8:40, 3] = 0  # repaint this box (LoadImage's mask: 1 - alpha), 8-pixel aligned
    Image.fromarray(rgba.numpy(), "RGBA").save(root / "input" / "photo.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files, reference
    set_paths(FolderPaths())


def test_workflow_matches_stable_diffusion_3_controlnet_inpainting_pipeline(base, tmp_path) -> None:
    """Also the hint's shift: Alimama's pipeline shifts the hint latents as SD3's (ComfyUI does not)."""
    paths, files, reference_net = base
    engine = Executor(builtin_registry(MODULES), services=Services.create(paths, force_cpu=True))
    doc = sd3_workflow(CHECKPOINT, negative="blurry")
    del doc["8"], doc["9"]
    doc["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "sd3-inpaint-tiny.safetensors"}}
    doc["11"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    doc["12"] = {"class_type": "ControlNetInpaintingAliMamaApply", "inputs": {
        "positive": ["4", 0], "negative": ["5", 0], "control_net": ["10", 0], "vae": ["1", 2], "image": ["11", 0],
        "mask": ["11", 1], "strength": STRENGTH, "start_percent": 0.0, "end_percent": 1.0}}
    doc["7"]["inputs"].update(positive=["12", 0], negative=["12", 1])
    doc["99"] = {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}}
    result = engine.run(parse_api(doc), keep=["7"])
    assert result.ok, result.error
    latent = result.values["7"][0]["samples"]

    pipe = reference_pipeline(files["checkpoint"], tmp_path)
    inpaint_pipe = StableDiffusion3ControlNetInpaintingPipeline(
        **{**pipe.components, "vae": diffusers_vae(files)}, controlnet=reference_net)
    inpaint_pipe.set_progress_bar_config(disable=True)
    rgba = torch.from_numpy(np.array(Image.open(paths.base / "input" / "photo.png"))).float() / 255
    noise = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        out = inpaint_pipe(
            prompt=TEXTS["clip_l"], prompt_2=TEXTS["clip_g"], prompt_3=TEXTS["t5xxl"], negative_prompt="blurry",
            height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, sigmas=[1 - i / STEPS for i in range(STEPS)],
            guidance_scale=CFG, latents=noise, max_sequence_length=77, output_type="latent",
            control_image=rgba[..., :3].movedim(-1, 0)[None] * 2 - 1, control_mask=(1 - rgba[..., 3])[None, None],
            controlnet_conditioning_scale=STRENGTH).images
    expected = out / LATENT_SCALE + LATENT_SHIFT
    torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)
