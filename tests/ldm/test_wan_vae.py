"""Wan's causal video VAE (2.1 and 2.2, original key layout) against diffusers' AutoencoderKLWan with the same weights.

Wan 2.1's keys are renamed by diffusers' own single-file converter (`convert_wan_vae_to_diffusers`). diffusers 0.42
ships no converter for Wan 2.2's nested levels (its scripts/convert_wan_to_diffusers.py has one, `convert_vae_22`):
`_wan22_to_diffusers` follows that script's rules, and strict loading checks every key lands somewhere.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.vae import AutoencoderKL, VAEConfig
from ldm.wan_vae import WAN21_CONFIG, WAN22_CONFIG, WanVAE
from ldm.wan_vae_files import (
    TINY_WAN21,
    TINY_WAN22,
    is_wan_vae,
    load_wan_vae,
    peek_wan_vae,
    random_wan_vae,
    wan_vae_config_from_state_dict,
    write_tiny_wan_vae,
)

_RESNET_PARTS = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight",
                 "residual.2.bias": "conv1.bias", "residual.3.gamma": "norm2.gamma",
                 "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                 "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}


def _wan22_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    nested = re.compile(r"(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)")
    out, flat = {}, {}
    for key, value in sd.items():
        m = nested.fullmatch(key)
        if m is None:
            flat[key] = value
            continue
        encoder = m[1].startswith("encoder")
        block = f"{'encoder.down_blocks' if encoder else 'decoder.up_blocks'}.{m[2]}"
        if m[4].startswith(("resample.", "time_conv.")):
            out[f"{block}.{'downsampler' if encoder else 'upsampler'}.{m[4]}"] = value
        else:
            out[f"{block}.resnets.{m[3]}.{_RESNET_PARTS[m[4]]}"] = value
    return {**out, **convert_wan_vae_to_diffusers(flat)}  # middle, heads, conv1/2 as in 2.1


def _twin(model: WanVAE) -> AutoencoderKLWan:
    c = model.config
    reference = AutoencoderKLWan(base_dim=c.base_dim, decoder_base_dim=c.decoder_base_dim, z_dim=c.z_dim,
                                 is_residual=c.residual, in_channels=3 * c.patch_size ** 2,
                                 out_channels=3 * c.patch_size ** 2, patch_size=c.patch_size if c.residual else None,
                                 scale_factor_spatial=c.spatial_compression)
    sd = dict(model.state_dict())
    state = _wan22_to_diffusers(sd) if c.residual else convert_wan_vae_to_diffusers(sd)
    reference.load_state_dict(state, strict=True)
    return reference.eval()


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def pair(request) -> tuple[WanVAE, AutoencoderKLWan]:
    model = random_wan_vae(TINY_WAN21 if request.param == "2.1" else TINY_WAN22, seed=3)
    return model, _twin(model)


@pytest.mark.parametrize("frames", [1, 9])
def test_encode_matches_diffusers(pair, frames: int) -> None:
    model, reference = pair
    s = model.spatial_compression
    pixels = torch.rand(2, 3, frames, 3 * s, 5 * s, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        latent = model.encode(pixels).mode()
        expected = reference.encode(pixels).latent_dist.mode()
    assert latent.shape == (2, model.latent_channels, 1 + (frames - 1) // 4, 3, 5)
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("latent_frames", [1, 3])
def test_decode_matches_diffusers(pair, latent_frames: int) -> None:
    model, reference = pair
    z = torch.randn(1, model.latent_channels, latent_frames, 3, 5, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pixels, expected = model.decode(z), reference.decode(z).sample
    s = model.spatial_compression
    assert pixels.shape == (1, 3, 1 + 4 * (latent_frames - 1), 3 * s, 5 * s)
    assert 0.05 < expected.abs().mean() and expected.abs().amax() <= 1.0
    torch.testing.assert_close(pixels, expected, rtol=1e-5, atol=1e-5)


def test_frames_past_the_last_four_frame_chunk_are_left_out() -> None:
    # As the original, diffusers and ComfyUI (latent frames = floor((T + 3) / 4)): 7 frames encode as the first 5.
    model = random_wan_vae(TINY_WAN21)
    pixels = torch.rand(1, 3, 7, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(pixels).mode(), model.encode(pixels[:, :, :5]).mode())
        # Causal: the first latent frame is the first frame's alone, whatever follows it.
        torch.testing.assert_close(model.encode(pixels).mode()[:, :, :1], model.encode(pixels[:, :, :1]).mode())


def test_bad_inputs_are_named() -> None:
    model = random_wan_vae(TINY_WAN22)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(torch.zeros(1, 3, 1, 24, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, T>=1, H, W\]"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="48"):
        model.decode(torch.zeros(1, 16, 1, 2, 2))


def test_config_from_real_shapes_and_compression() -> None:
    for config, version in ((WAN21_CONFIG, "wan21"), (WAN22_CONFIG, "wan22")):
        with torch.device("meta"):
            model = WanVAE(config)
        assert wan_vae_config_from_state_dict(model.state_dict()) == config
        assert is_wan_vae(model.state_dict().keys())
        assert (model.latent_channels, model.spatial_compression, model.temporal_compression,
                model.scaling_factor) == ((16, 8, 4, 1.0) if version == "wan21" else (48, 16, 4, 1.0))
    # The real files' parameter counts: Wan 2.1's VAE about 127M, Wan 2.2's about 705M.
    with torch.device("meta"):
        assert round(sum(p.numel() for p in WanVAE(WAN21_CONFIG).parameters()) / 1e6) == 127
        assert round(sum(p.numel() for p in WanVAE(WAN22_CONFIG).parameters()) / 1e6) == 705


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiny_file_round_trip(tmp_path, version: str) -> None:
    path = write_tiny_wan_vae(tmp_path / "vae.safetensors", version)
    assert peek_wan_vae(path) == "wan" + version.replace(".", "")
    vae = load_wan_vae(path, dtype=torch.bfloat16)
    assert vae.config == (TINY_WAN21 if version == "2.1" else TINY_WAN22) and vae.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in vae.parameters())
    pixels = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(pixels).mode()
        decoded = vae.decode(latent)
    assert latent.dtype == torch.bfloat16 and latent.shape[2] == 2 and torch.isfinite(latent).all()
    assert decoded.shape == (1, 3, 5, 32, 32) and torch.isfinite(decoded).all()


def test_wrong_files_get_a_clear_error(tmp_path) -> None:
    sd_vae = tmp_path / "sd_vae.safetensors"
    write_safetensors(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).state_dict(), sd_vae, {})
    assert peek_wan_vae(sd_vae) is None and peek_wan_vae(tmp_path / "missing.safetensors") is None
    with pytest.raises(CheckpointError, match="sd_vae.safetensors: not a Wan VAE"):
        load_wan_vae(sd_vae)
    weights = dict(random_wan_vae(TINY_WAN21).state_dict())
    del weights["decoder.head.2.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 weights: decoder\.head\.2\.bias"):
        load_wan_vae(weights)
    weights = {**random_wan_vae(TINY_WAN21).state_dict(), "encoder.downsamples.0.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"no place in a Wan VAE: encoder\.downsamples\.0\.extra\.weight"):
        load_wan_vae(weights)
