"""HunyuanVideo 1.5's video VAE against diffusers' AutoencoderKLHunyuanVideo15 with the same weights (tiny, float32,
the real 16x / 4x compression and 32 latent channels), its key layouts at the real sizes, and the VAEs it is not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanImage,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
)

from ldm.checkpoint import CheckpointError
from ldm.flux2_vae import TINY_FLUX2_VAE, Flux2VAE
from ldm.hunyuan_video15_vae import (
    SCALING_FACTOR,
    HunyuanVideo15VAE,
    HunyuanVideo15VAEConfig,
    config_from_state_dict,
    diffusers_from_file,
    file_from_diffusers,
    is_hunyuan_video15_vae,
    load_hunyuan_video15_vae,
    tiny_config,
    tiny_state_dict,
)
from ldm.ltxv_vae import LTXVVAE, TINY_LTXV_095
from ldm.qwen_image21_vae import TINY_QWEN_IMAGE21_VAE, QwenImage21VAE
from ldm.vae import AutoencoderKL, VAEConfig
from ldm.wan_vae import WanVAE
from ldm.wan_vae_files import TINY_WAN21, TINY_WAN22


def _meta_state_dict(factory) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return factory().state_dict()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return tiny_state_dict(seed=0)


@pytest.fixture(scope="module")
def vae(weights: dict[str, torch.Tensor]) -> HunyuanVideo15VAE:
    return load_hunyuan_video15_vae(weights)


@pytest.fixture(scope="module")
def reference(weights: dict[str, torch.Tensor]) -> AutoencoderKLHunyuanVideo15:
    """diffusers' VAE at the tiny widths, given the tiny file's weights through the key conversion."""
    c = tiny_config()
    model = AutoencoderKLHunyuanVideo15(latent_channels=c.latent_channels, block_out_channels=c.block_out_channels,
                                        layers_per_block=c.layers_per_block)
    model.load_state_dict(diffusers_from_file(weights), strict=True)
    return model.eval()


@pytest.mark.parametrize("frames", [5, 1])
def test_encode_matches_diffusers(vae: HunyuanVideo15VAE, reference: AutoencoderKLHunyuanVideo15,
                                  frames: int) -> None:
    video = torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        ours = vae.encode(video).mode()
        theirs = reference.encode(video).latent_dist.mean
    assert ours.shape == (1, 32, 1 + (frames - 1) // 4, 2, 3)
    assert theirs.abs().max() > 1.0
    assert (ours - theirs).abs().max() < 1e-5  # measured 3.3e-6 (5 frames), 1.9e-6 (1 frame)


@pytest.mark.parametrize("latent_frames", [2, 1])
def test_decode_matches_diffusers(vae: HunyuanVideo15VAE, reference: AutoencoderKLHunyuanVideo15,
                                  latent_frames: int) -> None:
    latent = torch.randn(1, 32, latent_frames, 2, 3, generator=torch.Generator().manual_seed(10 + latent_frames))
    with torch.no_grad():
        ours = vae.decode(latent)
        theirs = reference.decode(latent).sample
    assert ours.shape == theirs.shape == (1, 3, 1 + 4 * (latent_frames - 1), 32, 48)
    assert (theirs.abs() < 1).float().mean() > 0.5  # most of it is not clamped away
    assert (ours - theirs.clamp(-1, 1)).abs().max() < 1e-5  # measured 4.2e-6 (5 frames), 3.9e-6 (1 frame)


def test_batch_items_are_independent(vae: HunyuanVideo15VAE) -> None:
    """diffusers' attention mask fails for batches over one (0.42.1), so batches are checked item by item here."""
    video = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(video).mode()
        pixels = vae.decode(latent)
        for i in range(2):  # relative to the latent's size: measured 1.7e-5 of 7.9, 3.9e-6 of 1
            assert (latent[i:i + 1] - vae.encode(video[i:i + 1]).mode()).abs().max() < 1e-5 * latent.abs().max()
            assert (pixels[i:i + 1] - vae.decode(latent[i:i + 1])).abs().max() < 1e-5


def test_real_sizes_and_key_layout() -> None:
    """At the released sizes: diffusers' tensors renamed are this module's, one for one, shapes equal; the sizes
    read back are the default config's; the latent scale is diffusers' config's."""
    ours = _meta_state_dict(HunyuanVideo15VAE)
    theirs = _meta_state_dict(AutoencoderKLHunyuanVideo15)
    renamed = file_from_diffusers(theirs)
    assert len(ours) == 218
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert diffusers_from_file(renamed).keys() == theirs.keys()
    assert tuple(ours["encoder.down.3.downsample.conv.conv.weight"].shape) == (128, 1024, 3, 3, 3)
    assert tuple(ours["decoder.up.0.upsample.conv.conv.weight"].shape) == (8192, 1024, 3, 3, 3)
    config = config_from_state_dict(ours)
    assert config == HunyuanVideo15VAEConfig()
    assert (config.latent_channels, config.spatial_compression, config.temporal_compression) == (32, 16, 4)
    with torch.device("meta"):
        assert AutoencoderKLHunyuanVideo15().config.scaling_factor == SCALING_FACTOR == 1.03682


def test_config_roundtrip(weights: dict[str, torch.Tensor]) -> None:
    assert config_from_state_dict(weights) == tiny_config()
    config = dataclasses.replace(tiny_config(), block_out_channels=(8, 16, 32, 64), layers_per_block=1,
                                 spatial_compression=8, temporal_compression=2)
    assert config_from_state_dict(_meta_state_dict(lambda: HunyuanVideo15VAE(config))) == config
    broken = dict(weights)
    del broken["decoder.up.1.block.2.conv2.conv.bias"]
    with pytest.raises(ValueError, match="missing"):
        config_from_state_dict(broken)


def test_loads_diffusers_layout(vae: HunyuanVideo15VAE, reference: AutoencoderKLHunyuanVideo15) -> None:
    loaded = load_hunyuan_video15_vae(reference.state_dict())
    for name, tensor in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_detection(weights: dict[str, torch.Tensor]) -> None:
    assert is_hunyuan_video15_vae(weights)
    assert is_hunyuan_video15_vae(_meta_state_dict(HunyuanVideo15VAE))
    others = {
        "diffusers' HunyuanVideo 1.5 names": _meta_state_dict(AutoencoderKLHunyuanVideo15),
        "SD / SDXL": _meta_state_dict(lambda: AutoencoderKL(VAEConfig())),
        "Flux 2": _meta_state_dict(lambda: Flux2VAE(TINY_FLUX2_VAE)),
        "Wan 2.1": _meta_state_dict(lambda: WanVAE(TINY_WAN21)),
        "Wan 2.2": _meta_state_dict(lambda: WanVAE(TINY_WAN22)),
        "Qwen-Image 2.1": _meta_state_dict(lambda: QwenImage21VAE(TINY_QWEN_IMAGE21_VAE)),
        "LTX-Video": _meta_state_dict(lambda: LTXVVAE(TINY_LTXV_095)),
        "HunyuanVideo 1.0 (diffusers)": _meta_state_dict(AutoencoderKLHunyuanVideo),
        "HunyuanImage 2.1 (diffusers)": _meta_state_dict(lambda: AutoencoderKLHunyuanImage(
            in_channels=3, out_channels=3, latent_channels=64, block_out_channels=(128, 256, 512, 512, 1024, 1024),
            layers_per_block=2, spatial_compression_ratio=32, sample_size=384)),
        "Wan (diffusers)": _meta_state_dict(AutoencoderKLWan),
        "LTX-Video (diffusers)": _meta_state_dict(AutoencoderKLLTXVideo),
    }
    assert [name for name, sd in others.items() if is_hunyuan_video15_vae(sd)] == []
    with pytest.raises(CheckpointError, match="not HunyuanVideo 1.5"):
        load_hunyuan_video15_vae(others["Wan 2.1"])


def test_rejects_bad_shapes(vae: HunyuanVideo15VAE) -> None:
    video = torch.rand(1, 3, 7, 32, 32) * 2 - 1  # frames past the last group of 4 are left out
    assert torch.equal(vae.encode(video).mode(), vae.encode(video[:, :, :5]).mode())
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 1, 24, 32))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2))
