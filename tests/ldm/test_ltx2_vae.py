"""LTX-2's video VAE (ldm.ltxv_vae, version "2.0": 0.9.5's layout without timestep conditioning, the decoder padded by
reflection) against diffusers' AutoencoderKLLTX2Video, its weights renamed to Lightricks' keys by
`convert_diffusers_ltx2_vae` and loaded strictly."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLLTX2Video

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.ltxv_vae import (
    LTX2,
    LTXV_095,
    LTXVVAE,
    TINY_LTXV_VAES,
    convert_diffusers_ltx2_vae,
    is_ltxv_vae,
    load_ltxv_vae,
    ltxv_vae_config_from_state_dict,
    peek_ltxv_vae,
    random_ltxv_vae,
    write_tiny_ltxv_vae,
)

# diffusers' config of the released VAE (its scripts/convert_ltx2_to_diffusers.py, version "2.0").
_FULL = dict(block_out_channels=(256, 512, 1024, 2048), layers_per_block=(4, 6, 6, 2, 2),
             decoder_block_out_channels=(256, 512, 1024), decoder_layers_per_block=(5, 5, 5, 5),
             spatio_temporal_scaling=(True,) * 4, decoder_spatio_temporal_scaling=(True,) * 3,
             decoder_inject_noise=(False,) * 4, upsample_residual=(True,) * 3, upsample_factor=(2,) * 3,
             timestep_conditioning=False, decoder_causal=False)
# A small one of the same layout. diffusers' encoder widens its input convolution to the latent channels, so the
# latent is 16 channels wide here (the released files' 128 is checked by shape below).
_TINY = dict(_FULL, latent_channels=16, block_out_channels=(32, 64, 128, 256), layers_per_block=(1, 2, 1, 1, 2),
             decoder_block_out_channels=(16, 32, 64), decoder_layers_per_block=(2, 1, 1, 2))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights that keep activations in range; latent statistics away from 0 and 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name == "latents_std":
                tensor.copy_(0.5 + 0.5 * noise.abs())
            elif name.endswith("bias") or name == "latents_mean":
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(noise * tensor[0].numel() ** -0.5)


@pytest.fixture(scope="module")
def pair() -> tuple[LTXVVAE, AutoencoderKLLTX2Video]:
    reference = AutoencoderKLLTX2Video(**_TINY).eval()
    _randomize(reference, seed=1)
    sd = convert_diffusers_ltx2_vae({k: v.clone() for k, v in reference.state_dict().items()})
    assert is_ltxv_vae(sd, "")
    return load_ltxv_vae(sd, prefix=""), reference


def _video(frames: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _stats(reference: AutoencoderKLLTX2Video) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.latents_mean.view(1, -1, 1, 1, 1), reference.latents_std.view(1, -1, 1, 1, 1)


def test_loaded_layout(pair):
    model, _ = pair
    c = model.config
    assert c.version == "2.0" and not c.timestep_conditioning
    assert (c.padding_mode, c.decoder_padding_mode) == ("zeros", "reflect")
    assert not hasattr(model.decoder, "last_time_embedder")


@pytest.mark.parametrize("frames", [1, 9, 17])
@torch.no_grad()
def test_encode_and_decode_match_diffusers(pair, frames):
    """Normalised latents out of encode_latent and back through decode_latent, as ComfyUI's VAE nodes use them;
    diffusers' raw latents normalised with its latents_mean / latents_std. Max abs diff about 1e-6."""
    model, reference = pair
    mean, std = _stats(reference)
    x = _video(frames)
    z = model.encode_latent(x)
    assert z.shape == (1, 16, 1 + (frames - 1) // 8, 2, 2)
    expected = (reference.encode(x).latent_dist.mode() - mean) / std
    assert (z - expected).abs().max() < 1e-4
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    out = model.decode_latent(z)
    reference_out = reference.decode(z * std + mean).sample
    assert out.shape == (1, 3, frames, 64, 64)
    assert out.abs().max() > 0.1
    assert (out - reference_out).abs().max() < 1e-4
    torch.testing.assert_close(out, reference_out, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decode_takes_no_timestep_and_adds_no_noise(pair):
    model, _ = pair
    z = torch.randn(2, 16, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    out = model.decode_latent(z)
    assert out.shape == (2, 3, 9, 64, 96)
    assert torch.equal(out, model.decode_latent(z, timestep=0.5, noise_scale=0.5,
                                                generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(model.encode_latent(out), model.normalize(model.encode(out).mode()))
    torch.testing.assert_close(model.un_normalize(model.normalize(z)), z)


@torch.no_grad()
def test_first_frame_is_encoded_like_a_still_image(pair):
    model, _ = pair
    video = _video(17, 32)
    z = model.encode_latent(video)
    torch.testing.assert_close(z[:, :, :1], model.encode_latent(video[:, :, :1]), atol=1e-5, rtol=1e-5)


def test_full_size_layout_is_diffusers_and_reads_back_from_shapes():
    """The released VAE's layout: 0.9.5's blocks, no timestep conditioning; diffusers' weights renamed land on
    exactly our keys and shapes."""
    with torch.device("meta"):
        model, reference = LTXVVAE(LTX2), AutoencoderKLLTX2Video(**_FULL)
    converted = convert_diffusers_ltx2_vae(reference.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ltxv_vae_config_from_state_dict(converted, "") == LTX2
    assert LTX2.encoder_blocks == LTXV_095.encoder_blocks and LTX2.decoder_blocks == LTXV_095.decoder_blocks
    assert (LTX2.version, LTXV_095.version) == ("2.0", "0.9.5")
    assert converted["decoder.conv_in.conv.weight"].shape == (1024, 128, 3, 3, 3)
    assert converted["encoder.conv_out.conv.weight"].shape == (129, 2048, 3, 3, 3)


def test_tiny_file_round_trip(tmp_path):
    """The all-in-one layout (`vae.` prefix) at 128 latent channels: 1 + 8k frames -> 1 + k latent frames, 1/32 of
    the pixels; the metadata config LTX-2's files carry names each part's padding."""
    path = tmp_path / "ltx2.safetensors"
    config = {"vae": {"encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "reflect",
                      "timestep_conditioning": False, "causal_decoder": False}}
    write_safetensors({"model.diffusion_model.patchify_proj.weight": torch.ones(4, 128)}, path,
                      {"config": json.dumps(config)})
    write_tiny_ltxv_vae(path, "2.0", seed=3)
    assert peek_ltxv_vae(path) == "2.0"
    vae = load_ltxv_vae(path)
    expected = random_ltxv_vae(TINY_LTXV_VAES["2.0"], seed=3)
    assert vae.config == expected.config and vae.config.decoder_padding_mode == "reflect"
    x = _video(9, 64)
    with torch.no_grad():
        z = vae.encode_latent(x)
        assert z.shape == (1, 128, 2, 2, 2)
        torch.testing.assert_close(z, expected.encode_latent(x))
        assert vae.decode_latent(z).shape == (1, 3, 9, 64, 64)


def test_metadata_padding_mode_for_both_parts(tmp_path):
    path = tmp_path / "vae.safetensors"
    model = random_ltxv_vae(TINY_LTXV_VAES["2.0"], seed=4)
    metadata = {"config": json.dumps({"vae": {"spatial_padding_mode": "zeros"}})}
    write_safetensors(dict(model.state_dict()), path, metadata)
    vae = load_ltxv_vae(path)
    assert (vae.config.padding_mode, vae.config.decoder_padding_mode) == ("zeros", "zeros")
    assert load_ltxv_vae(dict(model.state_dict()), prefix="").config.decoder_padding_mode == "reflect"


def test_leftover_weights_are_refused():
    sd = dict(random_ltxv_vae(TINY_LTXV_VAES["2.0"]).state_dict())
    sd["decoder.up_blocks.0.time_embedder.timestep_embedder.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="no place"):
        load_ltxv_vae(sd, prefix="")
