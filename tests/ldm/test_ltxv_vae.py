"""LTX-Video's VAE (0.9.0, 0.9.1, 0.9.5; Lightricks' key layout) against diffusers' AutoencoderKLLTXVideo, its weights
renamed by diffusers' own single-file converter (`convert_ltx_vae_checkpoint_to_diffusers`) and loaded strictly."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo
from diffusers.loaders.single_file_utils import convert_ltx_vae_checkpoint_to_diffusers
from torch import nn

from ldm.checkpoint import CheckpointError, load_state_dict, read_metadata, write_safetensors
from ldm.ltxv_vae import (
    LTXV_090,
    LTXV_091,
    LTXV_095,
    LTXVVAE,
    TINY_LTXV_VAES,
    LTXVVAEConfig,
    is_ltxv_vae,
    load_ltxv_vae,
    ltxv_vae_config_from_state_dict,
    peek_ltxv_vae,
    random_ltxv_vae,
    write_tiny_ltxv_vae,
)

_DECODER_091 = dict(decoder_spatio_temporal_scaling=(True,) * 3, upsample_residual=(True,) * 3,
                    upsample_factor=(2,) * 3, timestep_conditioning=True)
# diffusers' configs of the released files (its scripts/convert_ltx_to_diffusers.py); 0.9.0 is the default.
_FULL = {
    "0.9.0": {},
    "0.9.1": dict(decoder_block_out_channels=(256, 512, 1024), decoder_layers_per_block=(5, 6, 7, 8),
                  decoder_inject_noise=(True, True, True, False), **_DECODER_091),
    "0.9.5": dict(block_out_channels=(128, 256, 512, 1024, 2048), down_block_types=("LTXVideo095DownBlock3D",) * 4,
                  layers_per_block=(4, 6, 6, 2, 2), spatio_temporal_scaling=(True,) * 4,
                  downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                  decoder_block_out_channels=(256, 512, 1024), decoder_layers_per_block=(5, 5, 5, 5),
                  decoder_inject_noise=(False,) * 4, **_DECODER_091),
}
_EXTRA_STATISTICS = ("channel", "mean-of-stds", "mean-of-stds_over_std-of-means")


def _diffusers_config(c: LTXVVAEConfig) -> dict:
    """The diffusers config of one of our layouts (block widths from the base width, layers from the blocks)."""
    w = c.encoder_width
    enc = tuple(b.count for b in c.encoder_blocks if b.kind == "res_x")
    dec_res = [b for b in reversed(c.decoder_blocks) if b.kind == "res_x"]
    if c.version == "0.9.0":
        return dict(block_out_channels=(w, 2 * w, 4 * w, 4 * w), layers_per_block=enc,
                    decoder_block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                    decoder_layers_per_block=tuple(b.count for b in dec_res))
    out = dict(_FULL[c.version], layers_per_block=enc, decoder_block_out_channels=(2 * w, 4 * w, 8 * w),
               decoder_layers_per_block=tuple(b.count for b in dec_res),
               decoder_inject_noise=tuple(b.inject_noise for b in dec_res))
    out["block_out_channels"] = (w, 2 * w, 4 * w, 8 * w, 16 * w) if c.version == "0.9.5" else (w, 2 * w, 4 * w, 4 * w)
    return out


def _to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' converter on a `vae.`-prefixed file. It tells 0.9.5 by the encoder's 2048-channel output
    convolution; a tiny 0.9.5 is narrower, so that one probe sees a placeholder and the real weight goes back in."""
    sd = dict(sd)
    conv_out = sd["vae.encoder.conv_out.conv.weight"]
    if any(".conv.conv." in k for k in sd if k.startswith("vae.encoder.down_blocks.")):
        sd["vae.encoder.conv_out.conv.weight"] = torch.empty(1, 2048, 1, 1, 1, device=conv_out.device)
    converted = convert_ltx_vae_checkpoint_to_diffusers(sd)
    converted["encoder.conv_out.conv.weight"] = conv_out
    return converted


def _file_tensors(model: LTXVVAE) -> dict[str, torch.Tensor]:
    sd = {"vae." + k: v.clone() for k, v in model.state_dict().items()}
    for name in _EXTRA_STATISTICS:
        sd[f"vae.per_channel_statistics.{name}"] = torch.ones(model.latent_channels)
    return sd


def _twin(model: LTXVVAE) -> AutoencoderKLLTXVideo:
    reference = AutoencoderKLLTXVideo(**_diffusers_config(model.config))
    reference.load_state_dict(_to_diffusers(_file_tensors(model)), strict=True)
    return reference.eval()


@pytest.fixture(scope="module", params=["0.9.0", "0.9.1", "0.9.5"])
def pair(request):
    model = random_ltxv_vae(TINY_LTXV_VAES[request.param], seed=1)
    return model, _twin(model)


def _video(frames: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("frames", [1, 9])
@torch.no_grad()
def test_encode_and_decode_match_diffusers(pair, frames):
    model, reference = pair
    x = _video(frames)
    z = model.encode(x).mode()
    assert z.shape == (1, 128, 1 + (frames - 1) // 8, 2, 2)
    torch.testing.assert_close(z, reference.encode(x).latent_dist.mode(), atol=1e-5, rtol=1e-5)
    if model.config.timestep_conditioning:
        # The res blocks' spatial noise: ours from the generator, diffusers' from the global one seeded alike.
        out = model.decode(z, timestep=0.03, noise_scale=0.0, generator=torch.Generator().manual_seed(5))
        torch.manual_seed(5)
        expected = reference.decode(z, torch.tensor([0.03])).sample
    else:
        out, expected = model.decode(z), reference.decode(z).sample
    assert out.shape == (1, 3, frames, 64, 64)
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decode_defaults_mix_noise_in_the_normalised_latent():
    """ComfyUI's defaults (timestep 0.05, 2.5% noise), the noise mixed as the original pipeline does:
    z_n = (z - mean) / std, then (1 - s) z_n + s n, decoded after un-normalising."""
    model = random_ltxv_vae(TINY_LTXV_VAES["0.9.1"], seed=2)
    reference = _twin(model)
    z = torch.randn(2, 128, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    out = model.decode(z, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    noise = torch.randn(z.shape)
    mean, std = (v.view(1, -1, 1, 1, 1) for v in (model.latent_mean, model.latent_std))
    mixed = ((1 - 0.025) * (z - mean) / std + 0.025 * noise) * std + mean
    expected = reference.decode(mixed, torch.tensor([0.05, 0.05])).sample
    assert out.shape == (2, 3, 9, 64, 96)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    again = model.decode(z, generator=torch.Generator().manual_seed(7))
    other = model.decode(z, generator=torch.Generator().manual_seed(8))
    assert torch.equal(out, again)
    assert (out - other).abs().max() > 1e-3


@torch.no_grad()
def test_first_frame_is_encoded_like_a_still_image():
    model = random_ltxv_vae(TINY_LTXV_VAES["0.9.0"])
    video = _video(17, 32)
    z = model.encode(video).mode()
    assert z.shape == (1, 128, 3, 1, 1)
    torch.testing.assert_close(z[:, :, :1], model.encode(video[:, :, :1]).mode(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", [LTXV_090, LTXV_091, LTXV_095], ids=["0.9.0", "0.9.1", "0.9.5"])
def test_full_size_layouts_are_diffusers_and_read_back_from_shapes(preset):
    with torch.device("meta"):
        model, reference = LTXVVAE(preset), AutoencoderKLLTXVideo(**_FULL[preset.version])
    sd = {"vae." + k: v for k, v in model.state_dict().items()}
    assert ltxv_vae_config_from_state_dict(sd) == preset
    ours = {k: tuple(v.shape) for k, v in convert_ltx_vae_checkpoint_to_diffusers(dict(sd)).items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("version", ["0.9.0", "0.9.1", "0.9.5"])
def test_tiny_file_round_trip(tmp_path, version):
    path = tmp_path / "ltxv.safetensors"
    write_safetensors({"model.diffusion_model.patchify_proj.weight": torch.ones(4, 128)}, path, {"note": "dit"})
    assert write_tiny_ltxv_vae(path, version, seed=3) == path
    keys = load_state_dict(path)
    assert torch.equal(keys["model.diffusion_model.patchify_proj.weight"], torch.ones(4, 128))
    assert read_metadata(path) == {"note": "dit"}
    assert is_ltxv_vae(keys) and not is_ltxv_vae(keys, "")
    assert keys["vae.per_channel_statistics.channel"].shape == (128,)
    assert peek_ltxv_vae(path) == version
    vae = load_ltxv_vae(path)
    expected = random_ltxv_vae(TINY_LTXV_VAES[version], seed=3)
    assert vae.config == expected.config and vae.config.version == version
    assert (vae.scaling_factor, vae.latent_channels, vae.spatial_compression, vae.temporal_compression) == \
        (1.0, 128, 32, 8)
    torch.testing.assert_close(vae.latent_std, keys["vae.per_channel_statistics.std-of-means"])
    torch.testing.assert_close(vae.latent_mean, keys["vae.per_channel_statistics.mean-of-means"])
    x = _video(9, 32)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).mode(), expected.encode(x).mode())
    half = load_ltxv_vae(path, dtype=torch.bfloat16)
    with torch.no_grad():
        out = half.decode(half.encode(x).mode(), generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 9, 32, 32) and out.isfinite().all()


def test_vae_only_file_and_padding_mode_from_metadata(tmp_path):
    """A VAE saved on its own (no prefix), whose metadata config asks for reflect padding; checked against diffusers
    with the same padding set on its convolutions."""
    model = random_ltxv_vae(TINY_LTXV_VAES["0.9.1"], seed=4)
    path = tmp_path / "vae.safetensors"
    write_safetensors({k[len("vae."):]: v for k, v in _file_tensors(model).items()}, path,
                      {"config": json.dumps({"vae": {"spatial_padding_mode": "reflect"}})})
    assert peek_ltxv_vae(path) == "0.9.1"
    vae = load_ltxv_vae(path)
    assert vae.config.padding_mode == "reflect"
    reference = _twin(model)
    for conv in reference.modules():
        if isinstance(conv, nn.Conv3d) and conv.kernel_size[-1] > 1:
            conv.padding_mode = "reflect"
    x = _video(9)
    with torch.no_grad():
        z = vae.encode(x).mode()
        torch.testing.assert_close(z, reference.encode(x).latent_dist.mode(), atol=1e-5, rtol=1e-5)
        out = vae.decode(z, 0.05, 0.0, torch.Generator().manual_seed(1))
        torch.manual_seed(1)
        torch.testing.assert_close(out, reference.decode(z, torch.tensor([0.05])).sample, atol=1e-5, rtol=1e-5)
        zeros = model.decode(z, 0.05, 0.0, torch.Generator().manual_seed(1))
    assert (out - zeros).abs().max() > 1e-3


def test_bad_files_and_inputs(tmp_path):
    other = tmp_path / "other.safetensors"
    write_safetensors({"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, other, {})
    with pytest.raises(CheckpointError, match="other.safetensors: no LTX-Video VAE"):
        load_ltxv_vae(other)
    assert peek_ltxv_vae(other) is None
    sd = _file_tensors(random_ltxv_vae(TINY_LTXV_VAES["0.9.0"]))
    with pytest.raises(CheckpointError, match="missing 1 weights: per_channel_statistics.std-of-means"):
        load_ltxv_vae({k: v for k, v in sd.items() if not k.endswith("std-of-means")})
    with pytest.raises(CheckpointError, match="1 weights have no place in an LTX-Video VAE: decoder.stray"):
        load_ltxv_vae({**sd, "vae.decoder.stray": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="state dict: no LTX-Video VAE"):
        load_ltxv_vae({k[len("vae."):]: v for k, v in sd.items()}, prefix="vae.")
    per_channel = {**sd, "vae.encoder.conv_out.conv.weight": torch.zeros(256, 32, 3, 3, 3)}
    with pytest.raises(CheckpointError, match="one shared log-variance channel"):
        load_ltxv_vae(per_channel)
    vae = load_ltxv_vae(sd)
    with pytest.raises(ValueError, match="10 frames; a video must have 1 \\+ 8k frames"):
        vae.encode(torch.zeros(1, 3, 10, 32, 32))
    with pytest.raises(ValueError, match="32x48 pixels"):
        vae.encode(torch.zeros(1, 3, 1, 48, 32))
    with pytest.raises(ValueError, match="expected latents"):
        vae.decode(torch.zeros(1, 16, 1, 1, 1))


@torch.no_grad()
def test_decoding_without_a_generator_is_reproducible():
    """No generator: the noise of a CPU generator seeded with DEFAULT_DECODE_SEED, whatever torch's global state,
    which decoding leaves as it was."""
    from ldm.ltxv_vae import DEFAULT_DECODE_SEED

    model = random_ltxv_vae(TINY_LTXV_VAES["0.9.1"], seed=2)
    z = torch.randn(1, 128, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = model.decode(z)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12)
    assert torch.equal(model.decode(z), first)
    assert torch.equal(model.decode(z, generator=torch.Generator().manual_seed(DEFAULT_DECODE_SEED)), first)
    other = model.decode(z, generator=torch.Generator().manual_seed(DEFAULT_DECODE_SEED + 1))
    assert (other - first).abs().max() > 1e-4
