"""Qwen-Image 2.1's RGBA VAE against diffusers' AutoencoderKLQwenImage21 with the same weights (tiny, float32), its
two key layouts, its tiny file and the files it refuses."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import AutoencoderKLQwenImage21

from ldm.checkpoint import CheckpointError, read_shapes, write_safetensors
from ldm.qwen_image21_vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    QWEN_IMAGE21_VAE_CONFIG,
    TINY_QWEN_IMAGE21_VAE,
    QwenImage21VAE,
    comfy_from_diffusers,
    is_qwen_image21_vae,
    load_qwen_image21_vae,
    peek_qwen_image21_vae,
    random_qwen_image21_vae,
    write_tiny_qwen_image21_vae,
)
from ldm.wan_vae_files import write_tiny_wan_vae


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLQwenImage21:
    """diffusers' VAE at the tiny widths, norm gains and biases made random too."""
    torch.manual_seed(0)
    c = TINY_QWEN_IMAGE21_VAE
    model = AutoencoderKLQwenImage21(base_dim=c.base_dim, decoder_base_dim=c.decoder_base_dim, z_dim=c.z_dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def vae(reference: AutoencoderKLQwenImage21) -> QwenImage21VAE:
    return load_qwen_image21_vae(reference.state_dict())


def test_encode_matches_diffusers(vae: QwenImage21VAE, reference: AutoencoderKLQwenImage21) -> None:
    pixels = torch.rand(2, 4, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = vae.encode(pixels).mode()
        theirs = reference.encode(pixels.unsqueeze(2)).latent_dist.mode().squeeze(2)
    assert ours.shape == (2, 64, 2, 3)
    assert theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max() < 1e-5


def test_decode_matches_diffusers(vae: QwenImage21VAE, reference: AutoencoderKLQwenImage21) -> None:
    z = torch.randn(2, 64, 2, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = vae.decode(z)
        theirs = reference.decode(z.unsqueeze(2)).sample.squeeze(2)
    assert ours.shape == (2, 4, 32, 48)
    assert theirs.abs().mean() > 0.1
    assert (ours - theirs).abs().max() < 1e-5
    assert ours.min() >= -1.0 and ours.max() <= 1.0


def test_rgb_pixels_get_an_opaque_alpha(vae: QwenImage21VAE, reference: AutoencoderKLQwenImage21) -> None:
    rgb = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    rgba = torch.cat([rgb, torch.ones(1, 1, 32, 32)], dim=1)
    with torch.no_grad():
        ours = vae.encode(rgb).mode()
        theirs = reference.encode(rgba.unsqueeze(2)).latent_dist.mode().squeeze(2)
        assert torch.equal(ours, vae.encode(rgba).mode())
    assert (ours - theirs).abs().max() < 1e-5


def test_tiles_cover_the_picture(vae: QwenImage21VAE) -> None:
    z = torch.randn(1, 64, 3, 4, generator=torch.Generator().manual_seed(4))
    pixels = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(vae.decode_tiled(z, tile_size=4, overlap=1), vae.decode(z), atol=1e-6)
        assert vae.decode_tiled(z, tile_size=2, overlap=1).shape == (1, 4, 48, 64)
        assert vae.encode_tiled(pixels, tile_size=32, overlap=16).mode().shape == (1, 64, 3, 4)


def test_pictures_of_other_sizes_are_refused(vae: QwenImage21VAE) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 4, 24, 32))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 16, 2, 2))


def test_latent_statistics_are_diffusers_defaults() -> None:
    parameters = inspect.signature(AutoencoderKLQwenImage21.__init__).parameters
    assert list(LATENTS_MEAN) == parameters["latents_mean"].default
    assert list(LATENTS_STD) == parameters["latents_std"].default


def test_diffusers_layout_converts_to_comfy_layout(reference: AutoencoderKLQwenImage21, tmp_path) -> None:
    converted = comfy_from_diffusers(reference.state_dict())
    tiny = read_shapes(write_tiny_qwen_image21_vae(tmp_path / "tiny.safetensors"))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in tiny.items()}
    sd = reference.state_dict()
    assert torch.equal(converted["encoder.conv1.weight"], sd["encoder.conv_in.weight"].unsqueeze(2))
    assert torch.equal(converted["encoder.downsamples.1.downsamples.0.residual.6.weight"],
                       sd["encoder.down_blocks.1.resnets.0.conv2.weight"].unsqueeze(2))
    assert torch.equal(converted["decoder.upsamples.0.upsamples.3.resample.1.weight"],
                       sd["decoder.up_blocks.0.upsampler.resample.1.weight"])
    assert torch.equal(converted["decoder.middle.1.to_qkv.weight"], sd["decoder.mid_block.attentions.0.to_qkv.weight"])
    assert torch.equal(converted["conv1.weight"], sd["quant_conv.weight"].unsqueeze(2))
    assert converted["decoder.upsamples.1.upsamples.3.time_conv.weight"].shape == (2 * 96, 96, 1, 1, 1)


def test_full_size_layout_is_comfys() -> None:
    with torch.device("meta"):
        converted = comfy_from_diffusers(AutoencoderKLQwenImage21().state_dict())
        ours = QwenImage21VAE(QWEN_IMAGE21_VAE_CONFIG).state_dict()
    assert len(converted) == 238 and set(ours) < set(converted)
    assert all(converted[k].shape == v.shape for k, v in ours.items())
    # The shapes a reader of ComfyUI's qwen_image_2.1_vae_bf16.safetensors reports.
    assert converted["decoder.conv1.weight"].shape == (1152, 64, 1, 3, 3)
    assert converted["decoder.head.2.weight"].shape == (4, 144, 1, 3, 3)
    assert converted["encoder.conv1.weight"].shape == (96, 4, 1, 3, 3)


def test_tiny_file_loads(tmp_path) -> None:
    path = write_tiny_qwen_image21_vae(tmp_path / "qwen_image_2.1_vae.safetensors", seed=7)
    assert is_qwen_image21_vae(read_shapes(path)) and peek_qwen_image21_vae(path)
    vae = load_qwen_image21_vae(path)
    assert vae.config == TINY_QWEN_IMAGE21_VAE
    assert (vae.latent_channels, vae.image_channels, vae.spatial_compression, vae.scaling_factor) == (64, 4, 16, 1.0)
    assert getattr(vae, "temporal_compression", None) is None  # an image VAE to Loom's nodes
    z = torch.randn(1, 64, 2, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(vae.decode(z), random_qwen_image21_vae(seed=7).decode(z))
        assert vae.encode(vae.decode(z)).mode().shape == (1, 64, 2, 2)


def test_other_files_are_refused(tmp_path) -> None:
    wan22 = write_tiny_wan_vae(tmp_path / "wan2.2_vae.safetensors", "2.2")
    layered = write_tiny_wan_vae(tmp_path / "qwen_image_layered_vae.safetensors", "qwen-layered")
    for path in (wan22, layered):
        assert not peek_qwen_image21_vae(path)
        with pytest.raises(CheckpointError, match="not Qwen-Image 2.1's VAE"):
            load_qwen_image21_vae(path)
    with pytest.raises(CheckpointError, match="not Qwen-Image 2.1's VAE"):
        load_qwen_image21_vae({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)})


def test_stray_and_missing_weights_are_refused(tmp_path) -> None:
    sd = dict(random_qwen_image21_vae().state_dict())
    with pytest.raises(CheckpointError, match="1 weights have no place"):
        load_qwen_image21_vae({**sd, "decoder.extra.weight": torch.zeros(1)})
    del sd["decoder.middle.0.residual.2.bias"]
    with pytest.raises(CheckpointError, match="missing 1 weights"):
        load_qwen_image21_vae(sd)
    write_safetensors({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "other.safetensors", {})
    with pytest.raises(CheckpointError):
        load_qwen_image21_vae(tmp_path / "other.safetensors")
