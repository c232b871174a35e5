"""InstructPix2Pix (an SD1 UNet with 8 input channels: the noisy latent, then the input image's latent): detection
of a tiny checkpoint, and its guided prediction against diffusers' UNet called as StableDiffusionInstructPix2Pix-
Pipeline calls it (the scaled latent first, then the unscaled image latent), with plain CFG and with the
pipeline's three-way image guidance (DualCfg, an image-less negative seeing zeros)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import load_checkpoint, save_checkpoint
from ldm.presets import build_preset, randomize_
from ldm.sampling import DiscreteSchedule
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGGuider, DualCfg
from ldm.unet import UNetModel
from tests.ldm.diffusers_reference import diffusers_unet, rel_err

pytest.importorskip("diffusers")


def write_tiny_ip2p(path: Path, seed: int = 0) -> Path:
    """A random-weight InstructPix2Pix checkpoint: the tiny SD1 one with an 8-channel UNet input, fp16."""
    _, _, unet, vae, text_encoder = build_preset("tiny-sd1", seed)
    unet = randomize_(UNetModel(dataclasses.replace(unet.config, in_channels=8)), torch.Generator().manual_seed(seed))
    return save_checkpoint(path, unet, vae, text_encoder, {}, dtype=torch.float16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_checkpoint(write_tiny_ip2p(tmp_path_factory.mktemp("ip2p") / "ip2p.safetensors"))


def test_a_tiny_checkpoint_is_sd1_with_eight_input_channels(tiny):
    assert (tiny.family.name, tiny.family.prediction) == ("sd1", "eps")
    assert (tiny.family.unet_config.in_channels, tiny.family.unet_config.out_channels) == (8, 4)
    assert tiny.unused_keys == []


@pytest.fixture(scope="module")
def inputs(tiny):
    g = torch.Generator().manual_seed(1)
    text, empty = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    x, image = torch.randn(1, 4, 8, 8, generator=g) * 14.6, torch.randn(1, 4, 8, 8, generator=g)
    return text, empty, x, image, diffusers_unet(tiny.family.unet_config, tiny.unet.state_dict())


def pipeline_eps(reference, x: torch.Tensor, sigma: float, image: torch.Tensor, context: torch.Tensor):
    """The pipeline's UNet call at one Euler level: the scaled latent, then the image latent, in channels."""
    t = DiscreteSchedule().sigma_to_t(torch.tensor([sigma]))
    scaled = x / (sigma**2 + 1) ** 0.5
    with torch.no_grad():
        return reference(torch.cat([scaled, image], dim=1), t, encoder_hidden_states=context).sample


@pytest.mark.parametrize("sigma", [14.6, 0.9])
def test_text_guidance_matches_the_pipeline_with_image_guidance_1(tiny, inputs, sigma):
    text, empty, x, image, reference = inputs
    guider = CFGGuider(Denoiser(tiny.unet, DiscreteSchedule()), [(text, {"concat": image})],
                       [(empty, {"concat": image})], 7.5)
    with torch.no_grad():
        ours = guider(x, torch.tensor([sigma]))
    positive, negative = (pipeline_eps(reference, x, sigma, image, c) for c in (text, empty))
    # The pipeline's 3-way guidance at image_guidance_scale 1: image + g * (text - image), plain CFG over text.
    expected = x - sigma * (negative + 7.5 * (positive - negative))
    assert rel_err(ours, expected) < 1e-5


def test_image_guidance_is_dual_cfg_with_an_image_less_negative(tiny, inputs):
    text, empty, x, image, reference = inputs
    sigma = 3.0
    dual = DualCfg(middle=[(empty, {"concat": image})], cfg_middle=1.5)
    guider = CFGGuider(Denoiser(tiny.unet, DiscreteSchedule()), [(text, {"concat": image})], [(empty, {})], 7.5,
                       dual=dual, concat=torch.zeros_like(image))
    with torch.no_grad():
        ours = guider(x, torch.tensor([sigma]))
    text_eps = pipeline_eps(reference, x, sigma, image, text)
    image_eps = pipeline_eps(reference, x, sigma, image, empty)
    uncond_eps = pipeline_eps(reference, x, sigma, torch.zeros_like(image), empty)
    eps = uncond_eps + 7.5 * (text_eps - image_eps) + 1.5 * (image_eps - uncond_eps)
    assert rel_err(ours, x - sigma * eps) < 1e-5
