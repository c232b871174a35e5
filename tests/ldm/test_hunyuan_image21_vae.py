"""HunyuanImage 2.1's image VAE against diffusers' AutoencoderKLHunyuanImage with the same weights (tiny, float32,
the real 32x compression and 64 latent channels), its key layouts at the real sizes, the VAEs it is not; and its
refiner's VAE (diffusers' AutoencoderKLHunyuanImageRefiner) run by ldm.hunyuan_video15_vae as it is."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanImage,
    AutoencoderKLHunyuanImageRefiner,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
)

from ldm import hunyuan_video15_vae as hv15
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.flux2_vae import TINY_FLUX2_VAE, Flux2VAE
from ldm.hunyuan_image21_vae import (
    SCALING_FACTOR,
    HunyuanImage21VAE,
    HunyuanImage21VAEConfig,
    config_from_state_dict,
    diffusers_from_file,
    file_from_diffusers,
    is_hunyuan_image21_vae,
    load_hunyuan_image21_vae,
    peek_hunyuan_image21_vae,
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


def _diffusers_vae(config: HunyuanImage21VAEConfig) -> AutoencoderKLHunyuanImage:
    return AutoencoderKLHunyuanImage(
        in_channels=config.in_channels, out_channels=config.out_channels, latent_channels=config.latent_channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        spatial_compression_ratio=config.spatial_compression, sample_size=384)


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return tiny_state_dict(seed=0)


@pytest.fixture(scope="module")
def vae(weights: dict[str, torch.Tensor]) -> HunyuanImage21VAE:
    return load_hunyuan_image21_vae(weights)


@pytest.fixture(scope="module")
def reference(weights: dict[str, torch.Tensor]) -> AutoencoderKLHunyuanImage:
    """diffusers' VAE at the tiny widths, given the tiny file's weights through the key conversion."""
    model = _diffusers_vae(tiny_config())
    model.load_state_dict(diffusers_from_file(weights), strict=True)
    return model.eval()


def test_encode_matches_diffusers(vae: HunyuanImage21VAE, reference: AutoencoderKLHunyuanImage) -> None:
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = vae.encode(pixels)
        theirs = reference.encode(pixels).latent_dist
    assert ours.mode().shape == (2, 64, 2, 3)
    assert theirs.mean.abs().max() > 1.0
    assert _relative(ours.mode(), theirs.mean) < 1e-5  # measured 2.1e-6 of 13.2: 1.6e-7
    assert _relative(ours.logvar, theirs.logvar) < 1e-5


def test_decode_matches_diffusers(vae: HunyuanImage21VAE, reference: AutoencoderKLHunyuanImage) -> None:
    latent = torch.randn(2, 64, 2, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = vae.decode(latent)
        unclamped = vae.decoder(latent)
        theirs = reference.decode(latent).sample
    assert ours.shape == theirs.shape == (2, 3, 64, 96)
    assert (theirs.abs() < 1).float().mean() > 0.5  # most of it is not clamped away
    assert _relative(unclamped, theirs) < 1e-5  # measured 4.5e-6 of 3.9: 1.2e-6
    assert torch.equal(ours, unclamped.clamp(-1, 1))


def test_tiles_covering_everything_are_the_whole(vae: HunyuanImage21VAE) -> None:
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latent = torch.randn(1, 64, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (vae.encode_tiled(pixels, 64, 32).mode() - vae.encode(pixels).mode()).abs().max() < 1e-5
        assert (vae.decode_tiled(latent, 2, 1) - vae.decode(latent)).abs().max() < 1e-5


def test_real_sizes_and_key_layout() -> None:
    """At the released sizes: diffusers' tensors renamed are this module's, one for one, shapes equal; the sizes
    read back are the default config's; the compression is 32x into 64 channels, in space only."""
    ours = _meta_state_dict(HunyuanImage21VAE)
    theirs = _meta_state_dict(lambda: _diffusers_vae(HunyuanImage21VAEConfig()))
    renamed = file_from_diffusers(theirs)
    assert len(ours) == len(theirs) == 324
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert diffusers_from_file(renamed).keys() == theirs.keys()
    assert tuple(ours["encoder.down.4.downsample.conv.weight"].shape) == (256, 1024, 3, 3)
    assert tuple(ours["decoder.up.0.upsample.conv.weight"].shape) == (4096, 1024, 3, 3)
    assert tuple(ours["decoder.conv_in.weight"].shape) == (1024, 64, 3, 3)
    assert config_from_state_dict(ours) == HunyuanImage21VAEConfig()
    with torch.device("meta"):
        model = HunyuanImage21VAE()
    assert (model.latent_channels, model.spatial_compression) == (64, 32)
    assert not hasattr(model, "temporal_compression")
    assert model.scaling_factor == SCALING_FACTOR == 0.75289


def test_config_roundtrip(weights: dict[str, torch.Tensor]) -> None:
    assert config_from_state_dict(weights) == tiny_config()
    config = dataclasses.replace(tiny_config(), block_out_channels=(32, 64, 64), layers_per_block=1,
                                 latent_channels=16)
    assert config.spatial_compression == 4
    assert config_from_state_dict(_meta_state_dict(lambda: HunyuanImage21VAE(config))) == config
    broken = dict(weights)
    del broken["decoder.up.1.block.2.conv2.bias"]
    with pytest.raises(ValueError, match="missing"):
        config_from_state_dict(broken)
    with pytest.raises(ValueError, match="multiple of 32"):
        HunyuanImage21VAEConfig(block_out_channels=(16, 32))


def test_loads_diffusers_layout(vae: HunyuanImage21VAE, reference: AutoencoderKLHunyuanImage) -> None:
    loaded = load_hunyuan_image21_vae(reference.state_dict())
    for name, tensor in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_file_with_5d_kernels(tmp_path: Path, vae: HunyuanImage21VAE, weights: dict[str, torch.Tensor]) -> None:
    """Tencent's checkpoint keeps some convolutions as [out, in, 1, k, k]; they load squeezed."""
    path = tmp_path / "hunyuan_image_2.1_vae_fp16.safetensors"
    write_safetensors({k: v.unsqueeze(2) if v.ndim == 4 else v for k, v in weights.items()}, path, {})
    assert peek_hunyuan_image21_vae(path)
    loaded = load_hunyuan_image21_vae(path, dtype=torch.float16)
    assert loaded.dtype == torch.float16
    for name, tensor in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.half()), name


def _comfy_refiner_layout() -> dict[str, torch.Tensor]:
    """Comfy-Org's HunyuanImage refiner VAE's names as ComfyUI's vae_refiner.py (refiner_vae=False) builds them:
    HunyuanVideo 1.5's tree with plain Conv3d (`conv_in.weight`, 3x3x3) and GroupNorm (`norm1.weight`)."""
    renamed = {}
    for key, value in _meta_state_dict(hv15.HunyuanVideo15VAE).items():
        key = re.sub(r"\.conv\.(weight|bias)$", r".\1", key)
        renamed[re.sub(r"\.gamma$", ".weight", key)] = value
    return renamed


def test_detection(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    assert is_hunyuan_image21_vae(weights)
    assert is_hunyuan_image21_vae(_meta_state_dict(HunyuanImage21VAE))
    others = {
        "diffusers' HunyuanImage 2.1 names": _meta_state_dict(lambda: _diffusers_vae(HunyuanImage21VAEConfig())),
        "HunyuanVideo 1.5": _meta_state_dict(hv15.HunyuanVideo15VAE),
        "HunyuanVideo 1.5 tiny": hv15.tiny_state_dict(),
        "HunyuanImage refiner (Comfy-Org layout)": _comfy_refiner_layout(),
        "SD / SDXL": _meta_state_dict(lambda: AutoencoderKL(VAEConfig())),
        "Flux 2": _meta_state_dict(lambda: Flux2VAE(TINY_FLUX2_VAE)),
        "Wan 2.1": _meta_state_dict(lambda: WanVAE(TINY_WAN21)),
        "Wan 2.2": _meta_state_dict(lambda: WanVAE(TINY_WAN22)),
        "Qwen-Image 2.1": _meta_state_dict(lambda: QwenImage21VAE(TINY_QWEN_IMAGE21_VAE)),
        "LTX-Video": _meta_state_dict(lambda: LTXVVAE(TINY_LTXV_095)),
        "HunyuanVideo 1.0 (diffusers)": _meta_state_dict(AutoencoderKLHunyuanVideo),
        "HunyuanVideo 1.5 (diffusers)": _meta_state_dict(AutoencoderKLHunyuanVideo15),
        "Wan (diffusers)": _meta_state_dict(AutoencoderKLWan),
        "LTX-Video (diffusers)": _meta_state_dict(AutoencoderKLLTXVideo),
    }
    assert [name for name, sd in others.items() if is_hunyuan_image21_vae(sd)] == []
    for name in ("Wan 2.1", "HunyuanVideo 1.5 tiny", "SD / SDXL"):
        with pytest.raises(CheckpointError, match="not HunyuanImage 2.1"):
            load_hunyuan_image21_vae(others[name])
    assert not hv15.is_hunyuan_video15_vae(weights)
    path = tmp_path / "hunyuanvideo15_vae_fp16.safetensors"
    write_safetensors(hv15.tiny_state_dict(), path, {})
    assert not peek_hunyuan_image21_vae(path)
    assert not peek_hunyuan_image21_vae(tmp_path / "missing.safetensors")


def test_rejects_bad_shapes(vae: HunyuanImage21VAE) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        vae.encode(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="multiples of 32"):
        vae.encode(torch.zeros(1, 3, 1, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 32, 2, 2))


# --- the refiner's VAE ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refiner_pair() -> tuple[hv15.HunyuanVideo15VAE, AutoencoderKLHunyuanImageRefiner]:
    """ldm.hunyuan_video15_vae's tiny VAE and diffusers' refiner VAE at the same widths, given the same tensors
    through ldm.hunyuan_video15_vae's key conversion (strict: its names and shapes are the refiner's)."""
    weights = hv15.tiny_state_dict(seed=1)
    c = hv15.tiny_config()
    refiner = AutoencoderKLHunyuanImageRefiner(latent_channels=c.latent_channels,
                                               block_out_channels=c.block_out_channels,
                                               layers_per_block=c.layers_per_block)
    refiner.load_state_dict(hv15.diffusers_from_file(weights), strict=True)
    return hv15.load_hunyuan_video15_vae(refiner.state_dict()), refiner.eval()


def test_refiner_vae_is_hunyuan_video15s_layout() -> None:
    ours = _meta_state_dict(hv15.HunyuanVideo15VAE)
    refiner = _meta_state_dict(AutoencoderKLHunyuanImageRefiner)
    renamed = hv15.file_from_diffusers(refiner)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    with torch.device("meta"):
        assert AutoencoderKLHunyuanImageRefiner().config.scaling_factor == hv15.SCALING_FACTOR == 1.03682


def test_refiner_vae_matches_on_images(refiner_pair: tuple[hv15.HunyuanVideo15VAE, AutoencoderKLHunyuanImageRefiner]
                                       ) -> None:
    """The refiner's VAE sees single frames [B, 3, 1, H, W] (diffusers' refiner pipeline); there it is HunyuanVideo
    1.5's VAE. (With more frames it is not: its temporal resamplers treat every frame as a first one, so 5 frames encode
    to 5 latent frames, not 2.)"""
    vae, refiner = refiner_pair
    pixels = torch.rand(2, 3, 1, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    latent = torch.randn(2, 32, 1, 2, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours, theirs = vae.encode(pixels), refiner.encode(pixels).latent_dist
        decoded, reference = vae.decode(latent), refiner.decode(latent).sample
    assert ours.mode().shape == (2, 32, 1, 2, 3)
    assert _relative(ours.mode(), theirs.mean) < 1e-5  # measured 3.9e-6 of 8.7: 4.5e-7
    assert _relative(ours.logvar, theirs.logvar) < 1e-5
    assert decoded.shape == reference.shape == (2, 3, 1, 32, 48)
    assert (reference.abs() < 1).float().mean() > 0.5
    assert (decoded - reference.clamp(-1, 1)).abs().max() < 1e-5  # measured 6.3e-6 of 2.9
