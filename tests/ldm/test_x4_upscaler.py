"""The Stable Diffusion x4 upscaler's parts against diffusers' on identical weights: the UNet (class-label noise
level, text-only first attention in its lower levels), the three-level VAE, the schedule and the image's noise
augmentation; and detection of a tiny checkpoint in the real LDM key layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint import load_checkpoint, save_checkpoint
from ldm.presets import build_preset, randomize_
from ldm.sampling.noise import cpu_generator
from ldm.unet import UNetConfig, UNetModel
from ldm.upscaler_x4 import augment, noise_level
from ldm.vae import AutoencoderKL, VAEConfig
from nodes.sd.models import schedule_of
from tests.ldm.diffusers_reference import diffusers_unet, diffusers_vae, rel_err

diffusers = pytest.importorskip("diffusers")

# The real model's layout at a tiny width: 7 input channels, four levels with attention in the lower three, whose
# first two attend to the text in place of themselves (a level without attention reads as False), linear
# projections, 1,000 noise-level classes. The context is the tiny SD2 text encoder's width.
TINY_X4_UNET = UNetConfig(
    in_channels=7, model_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1, transformer_depth=(0, 1, 1, 1),
    transformer_depth_middle=1, num_heads=8, context_dim=32, use_linear_in_transformer=True, num_classes=1000,
    disable_self_attentions=(False, True, True, False))
TINY_X4_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, scaling_factor=0.08333)


def write_tiny_x4(path: Path, seed: int = 0) -> Path:
    """A random-weight x4 upscaler checkpoint (UNet, three-level VAE, SD2-style OpenCLIP text encoder), fp16."""
    _, _, _, _, text_encoder = build_preset("tiny-sd2", seed)
    generator = torch.Generator().manual_seed(seed)
    unet = randomize_(UNetModel(TINY_X4_UNET), generator)
    vae = randomize_(AutoencoderKL(TINY_X4_VAE), generator)
    return save_checkpoint(path, unet, vae, text_encoder, {}, dtype=torch.float16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_checkpoint(write_tiny_x4(tmp_path_factory.mktemp("x4") / "x4.safetensors"))


def test_a_tiny_checkpoint_is_detected_with_its_whole_configuration(tiny):
    family = tiny.family
    assert (family.name, family.prediction) == ("sd_x4_upscaler", "v")
    assert family.unet_config == TINY_X4_UNET
    assert family.vae_config == TINY_X4_VAE and family.vae_config.downscale == 4
    assert tiny.unused_keys == []
    assert tiny.unet.label_emb.weight.shape == (1000, 128)
    block = tiny.unet.input_blocks[3][1].transformer_blocks[0]  # level 1: its first attention reads the text
    assert block.attn1.to_k.in_features == 32 and block.attn1.to_q.in_features == 64
    assert tiny.unet.input_blocks[7][1].transformer_blocks[0].attn1.to_k.in_features == 128  # level 3: itself


def test_unet_matches_diffusers_with_noise_level_class_labels(tiny):
    reference = diffusers_unet(TINY_X4_UNET, tiny.unet.state_dict())
    assert reference.config.only_cross_attention == [False, True, True, False]
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 7, 16, 12, generator=g), torch.randn(2, 5, 32, generator=g)
    t, levels = torch.tensor([10.0, 700.0]), torch.tensor([20, 350])
    with torch.no_grad():
        ours = tiny.unet(x, t, context, y=levels.float())
        theirs = reference(x, t, encoder_hidden_states=context, class_labels=levels).sample
        assert rel_err(ours, theirs) < 1e-5
        assert rel_err(tiny.unet(x, t, context, y=torch.zeros(2)), ours) > 1e-3  # the label counts
    with pytest.raises(ValueError, match="num_classes"):
        tiny.unet(x, t, context)


def test_vae_of_three_levels_matches_diffusers(tiny):
    reference = diffusers_vae(TINY_X4_VAE, tiny.vae.state_dict())
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    pixels = torch.rand(1, 3, 32, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        decoded = tiny.vae.decode(z)
        assert decoded.shape == (1, 3, 32, 24)  # four times the latent
        assert rel_err(decoded, reference.decode(z).sample) < 1e-5
        assert rel_err(tiny.vae.encode(pixels).mode(), reference.encode(pixels).latent_dist.mode()) < 1e-5


def test_schedule_is_the_upscalers_own(tiny):
    reference = diffusers.EulerDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    ours = schedule_of(tiny.family)
    expected = reference.sigmas[:-1].flip(0)  # diffusers' table runs high to low, with a final 0
    # diffusers' betas are float32 throughout, ours (LDM's) float64 until alpha-bar: 1e-4 apart at the low end.
    torch.testing.assert_close(ours.sigmas, expected, rtol=2e-4, atol=0)
    assert ours.sigmas[-1] > 30  # far from SD's 14.6: its betas end at 0.02, not 0.012


def test_noise_augmentation_is_the_upscale_pipelines_low_res_noise():
    assert [noise_level(a) for a in (0.0, 0.2, 1.0)] == [0, 70, 350]
    with pytest.raises(ValueError, match="0..1"):
        noise_level(1.5)
    low_res = diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    noise = torch.randn(image.shape, generator=cpu_generator(5))
    expected = low_res.add_noise(image, noise, torch.tensor([70]))
    torch.testing.assert_close(augment(image, 70, 5), expected, rtol=1e-5, atol=1e-6)
    assert rel_err(augment(image, 70, 5), image) > 0.1
