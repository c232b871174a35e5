"""ControlNetInpaintingAliMamaApply with tiny Flux files and a Flux inpainting ControlNet in diffusers' layout: its
declaration, the hint it makes (against one built as Alimama's pipeline builds it, with diffusers' VAE), an
inpainting run, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_state_dict, write_safetensors
from ldm.flux_presets import TINY_FLUX, make_flux_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_controlnet_flux import diffusers_controlnet
from tests.ldm.test_controlnet_inpaint import diffusers_inpainting_controlnet, write
from tests.nodes.test_flux_variants_nodes import diffusers_parts

WIDTH, HEIGHT, SEED, STEPS = 64, 48, 4, 3
MODULES = ("nodes.builtin.utils", "nodes.sd.part_loaders", "nodes.sd.loaders", "nodes.sd.image", "nodes.sd.vae",
           "nodes.sd.latent", "nodes.sd.flux", "nodes.sd.conditioning", "nodes.sd.controlnet", "nodes.sd.sampling")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint_cn")
    models = root / "models"
    files = make_flux_files(models, "dev", seed=3, dtype=torch.float32)
    vae = load_state_dict(files["vae"])
    vae["encoder.conv_out.weight"][16:] = 0  # no posterior spread: diffusers' sample is the mean Loom encodes
    vae["encoder.conv_out.bias"][16:] = -30
    write_safetensors(vae, models / "vae" / "ae-sharp.safetensors", {}, torch.float32)
    (models / "controlnet").mkdir()
    write(diffusers_inpainting_controlnet(5, config=TINY_FLUX), models / "controlnet" / "flux-inpaint-tiny.safetensors")
    write(diffusers_controlnet(5, config=TINY_FLUX), models / "controlnet" / "flux-canny-tiny.safetensors")
    (root / "input").mkdir()
    rgba = (torch.rand(HEIGHT, WIDTH, 4, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    rgba[..., 3] = 255
    rgba[8:32, 16:48, 3] = 0  # LoadImage's mask is 1 - alpha: repaint this box (8-pixel aligned)
    Image.fromarray(rgba.numpy(), "RGBA").save(root / "input" / "photo.png")
    set_paths(FolderPaths(base=root))
    yield root
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(root):
    return Executor(builtin_registry(MODULES), services=Services.create(FolderPaths(base=root), force_cpu=True))


def workflow(controlnet: str | None = "flux-inpaint-tiny.safetensors",
             node: str = "ControlNetInpaintingAliMamaApply") -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-dev.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                         "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-sharp.safetensors"}},
        "6": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "a cat",
                                                              "t5xxl": "a cat on a sofa", "guidance": 3.5}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["3", 0]}},
        "5": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["11", 1]}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
    }
    if controlnet is not None:
        doc["12"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
        doc["13"] = {"class_type": node, "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["12", 0], "vae": ["3", 0],
            "image": ["11", 0], "mask": ["11", 1], "strength": 0.9, "start_percent": 0.0, "end_percent": 1.0}}
        if node == "ControlNetApplyAdvanced":
            del doc["13"]["inputs"]["mask"]
        doc["8"]["inputs"].update(positive=["13", 0], negative=["13", 1])
    return doc


def run(engine, doc: dict, node: str):
    doc = {**doc, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}
    return engine.run(parse_api(doc), keep=[node])


def test_declaration_is_comfyuis(engine) -> None:
    info = engine.registry.get("ControlNetInpaintingAliMamaApply").object_info()
    assert info["category"] == "conditioning/controlnet" and not info["input"]["optional"]
    assert info["input_order"]["required"] == ["positive", "negative", "control_net", "vae", "image", "mask",
                                               "strength", "start_percent", "end_percent"]
    required = info["input"]["required"]
    assert [required[name][0] for name in info["input_order"]["required"][:6]] == [
        "CONDITIONING", "CONDITIONING", "CONTROL_NET", "VAE", "IMAGE", "MASK"]
    for name, default, high, step in (("strength", 1.0, 10.0, 0.01), ("start_percent", 0.0, 1.0, 0.001),
                                      ("end_percent", 1.0, 1.0, 0.001)):
        options = required[name][1]
        assert (options["default"], options["min"], options["max"], options["step"]) == (default, 0.0, high, step)
    assert info["output"] == ["CONDITIONING", "CONDITIONING"] and info["output_name"] == ["positive", "negative"]


def test_hint_is_the_masked_pictures_latents_and_the_keep_mask(engine, root) -> None:
    """As Alimama's pipeline builds it: masked pixels set to -1, diffusers' VAE, Flux's shift and scale, the mask
    brought to the latent's size (nearest), inverted, as a 17th channel."""
    result = run(engine, workflow(), "13")
    assert result.ok, result.error
    [(_, positive)], [(_, negative)] = result.values["13"]
    control = positive["control"]
    assert negative["control"] is control  # one model call for both prompts
    hint = control._hint(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), 1)

    rgba = torch.from_numpy(np.array(Image.open(root / "input" / "photo.png"))).float() / 255
    picture, mask = rgba[..., :3].movedim(-1, 0)[None] * 2 - 1, (1 - rgba[..., 3])[None, None]
    picture[(mask > 0.5).repeat(1, 3, 1, 1)] = -1
    vae = diffusers_parts(root, "dev")["vae"]
    with torch.no_grad():
        latents = vae.encode(picture).latent_dist.sample()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    keep = 1 - F.interpolate(mask, size=(HEIGHT // 8, WIDTH // 8))
    expected = torch.cat([latents, keep], dim=1)
    assert hint.shape == (1, 17, 6, 8) and keep[0, 0, 1:4, 2:6].eq(0).all() and keep.sum() == 48 - 12
    torch.testing.assert_close(hint, expected, rtol=1e-4, atol=1e-4)


def test_inpainting_run(engine) -> None:
    controlled = run(engine, workflow(), "8")
    plain = run(engine, workflow(None), "8")
    weak = workflow()
    weak["13"]["inputs"]["strength"] = 0.3
    weaker = run(engine, weak, "8")
    assert controlled.ok and plain.ok and weaker.ok, (controlled.error, plain.error, weaker.error)
    ours, without, less = (r.values["8"][0]["samples"] for r in (controlled, plain, weaker))
    assert ours.shape == (1, 16, 6, 8) and bool(torch.isfinite(ours).all())
    assert (ours - without).abs().mean() > 1e-3 and (ours - less).abs().mean() > 1e-4
    # outside the mask the latent is kept (SetLatentNoiseMask): the ControlNet changes only the box
    torch.testing.assert_close(ours[..., 5:, :], without[..., 5:, :])
    assert (ours[..., 1:4, 2:6] - without[..., 1:4, 2:6]).abs().mean() > 1e-3


def test_a_controlnet_that_is_not_an_inpainting_one_is_refused(engine) -> None:
    result = run(engine, workflow("flux-canny-tiny.safetensors"), "8")
    assert not result.ok and ("flux-canny-tiny.safetensors is not an inpainting ControlNet (its hint embedding takes "
                              "no mask channel)") in str(result.error)
    result = run(engine, workflow(node="ControlNetApplyAdvanced"), "8")
    assert not result.ok and ("flux-inpaint-tiny.safetensors is an inpainting ControlNet (its hint is a masked "
                              "picture and the mask): apply it with ControlNetInpaintingAliMamaApply"
                              ) in str(result.error)
