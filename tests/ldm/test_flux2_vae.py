"""The FLUX.2 VAE against diffusers' AutoencoderKLFlux2 with the same weights, packed and normalised as diffusers'
Flux2Pipeline does it; tiling; its files (BFL's, ComfyUI's and diffusers' key layouts) and what is not one.

diffusers 0.42 has no single-file converter for this VAE (its scripts/convert_flux2_to_diffusers.py has one, not
shipped): the LDM part goes through the single-file converter for LDM VAEs (`convert_ldm_vae_checkpoint`, which
wants `quant_conv` / `post_quant_conv` at the top level, as that script's table maps BFL's
`encoder.quant_conv` / `decoder.post_quant_conv`), the batch-norm statistics by name; strict loading checks that
every key lands.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Pipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.flux2_vae import (
    TINY_FLUX2_VAE,
    Flux2VAE,
    Flux2VAEConfig,
    load_flux2_vae,
    peek_flux2_vae,
    random_flux2_vae,
    write_tiny_flux2_vae,
)
from ldm.presets import randomize_
from ldm.vae import AutoencoderKL, VAEConfig
from tests.ldm.diffusers_reference import rel_err

# A decoder wider than the encoder (diffusers' decoder_block_out_channels) and levels of two widths.
WIDE_DECODER = Flux2VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, decoder_ch=64)


def _flat(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL's keys with the 1x1 convolutions around the latent at the top level, as ComfyUI saves them."""
    moved = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    out = {}
    for key, value in sd.items():
        prefix = next((p for p in moved if key.startswith(p)), None)
        out[moved[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def _diffusers(vae: Flux2VAE) -> AutoencoderKLFlux2:
    c = vae.config
    levels = len(c.ch_mult)
    reference = AutoencoderKLFlux2(
        block_out_channels=tuple(c.ch * m for m in c.ch_mult),
        decoder_block_out_channels=tuple((c.decoder_ch or c.ch) * m for m in c.ch_mult),
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=c.num_res_blocks, latent_channels=c.z_channels, patch_size=(c.patch, c.patch))
    sd = vae.state_dict()
    weights = convert_ldm_vae_checkpoint(_flat(sd), dict(reference.config))
    weights.update({k: sd[k] for k in ("bn.running_mean", "bn.running_var")})
    weights["bn.num_batches_tracked"] = torch.tensor(0)
    reference.load_state_dict(weights, strict=True)
    return reference.eval()


def _pipeline_encode(reference: AutoencoderKLFlux2, pixels: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Flux2Pipeline._encode_vae_image: the posterior's mode (or a draw), patchified, normalised by the batch norm."""
    posterior = reference.encode(pixels).latent_dist
    latents = Flux2Pipeline._patchify_latents(posterior.mode() if generator is None else posterior.sample(generator))
    mean = reference.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    return (latents - mean) / std


def _pipeline_decode(reference: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """Flux2Pipeline's last step: undo the normalisation, unpatchify, decode."""
    mean = reference.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(reference.bn.running_var.view(1, -1, 1, 1) + reference.config.batch_norm_eps)
    return reference.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean)).sample


@pytest.mark.parametrize("config", [TINY_FLUX2_VAE, WIDE_DECODER], ids=["tiny", "wide-decoder"])
def test_matches_diffusers_flux2_pipeline(config: Flux2VAEConfig) -> None:
    vae = random_flux2_vae(config, seed=1)
    reference = _diffusers(vae)
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1  # not square: 4 x 6 latent pixels
    with torch.no_grad():
        ours = vae.encode(pixels)
        latents = ours.mode()
        assert latents.shape == (2, 128, 4, 6) and latents.dtype == torch.float32
        assert rel_err(latents, _pipeline_encode(reference, pixels)) < 1e-5
        drawn = ours.sample(torch.Generator().manual_seed(3))
        expected = _pipeline_encode(reference, pixels, torch.Generator().manual_seed(3))
        assert rel_err(drawn, expected) < 1e-5 and rel_err(drawn, latents) > 1e-3
        # Normalised by statistics measured on the VAE's own encodings: near unit scale, not the raw latent's.
        assert 0.5 < latents.std() < 2 and latents.mean().abs() < 0.5
        z = torch.randn(2, 128, 3, 5, generator=g)
        decoded = vae.decode(z)
        assert decoded.shape == (2, 3, 48, 80)
        assert rel_err(decoded, _pipeline_decode(reference, z)) < 1e-5


def test_tiled_encode_and_decode() -> None:
    vae = random_flux2_vae(TINY_FLUX2_VAE, seed=4)
    g = torch.Generator().manual_seed(5)
    pixels = torch.rand(1, 3, 128, 192, generator=g) * 2 - 1
    z = torch.randn(1, 128, 8, 12, generator=g)
    with torch.no_grad():
        full, decoded = vae.encode(pixels).mode(), vae.decode(z)
        # One tile covering the picture is the untiled computation itself.
        assert torch.equal(vae.encode_tiled(pixels, tile_size=192, overlap=32).mode(), full)
        assert torch.equal(vae.decode_tiled(z, tile_size=12, overlap=4), decoded)
        tiled = vae.encode_tiled(pixels, tile_size=128, overlap=32).mode()
        tiled_pixels = vae.decode_tiled(z, tile_size=8, overlap=2)
        # Away from the seam (the second tile starts 64 px in, at latent column 4) the result is the first tile's own.
        first = vae.encode(pixels[..., :128]).mode()
        first_pixels = vae.decode(z[..., :8])[..., :64]
    assert tiled.shape == full.shape and tiled_pixels.shape == decoded.shape
    assert torch.equal(tiled[..., :4], first[..., :4]) and torch.equal(tiled_pixels[..., :64], first_pixels)
    assert not torch.allclose(tiled[..., 4:8], first[..., 4:8])  # over the seam, a blend with the second tile
    # Loose: a random-weight model's GroupNorm statistics and mid-block attention see only the tile.
    assert rel_err(tiled, full) < 0.3 and rel_err(tiled_pixels, decoded) < 0.3


def test_shapes_are_checked() -> None:
    vae = random_flux2_vae(TINY_FLUX2_VAE)
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 24, 32))
    with pytest.raises(ValueError, match="128"):
        vae.decode(torch.zeros(1, 32, 4, 4))


def test_tiny_file_round_trip(tmp_path: Path) -> None:
    path = write_tiny_flux2_vae(tmp_path / "flux2-vae.safetensors", seed=6)
    assert peek_flux2_vae(path)
    vae = load_flux2_vae(path)
    assert isinstance(vae, Flux2VAE) and vae.config == TINY_FLUX2_VAE and not vae.training
    assert (vae.spatial_compression, vae.latent_channels, vae.scaling_factor) == (16, 128, 1.0)
    assert not hasattr(vae, "temporal_compression")  # an image VAE, not a video one
    original = random_flux2_vae(TINY_FLUX2_VAE, seed=6)
    for key, value in original.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key
    # The statistics are realistic, not a fresh batch norm's.
    assert vae.bn.running_mean.abs().min() > 0 and (vae.bn.running_var - 1).abs().min() > 0.05

    half = load_flux2_vae(write_tiny_flux2_vae(tmp_path / "bf16.safetensors", seed=6, dtype=torch.bfloat16),
                          dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.bn.running_mean.dtype == torch.float32
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        assert half.encode(pixels).mode().dtype == torch.float32
        assert rel_err(half.encode(pixels).mode(), original.encode(pixels).mode()) < 0.05


def test_comfyui_and_diffusers_layouts_load(tmp_path: Path) -> None:
    vae = random_flux2_vae(WIDE_DECODER, seed=7)
    pixels = torch.rand(1, 3, 32, 64) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels).mode()
        for name, weights in [("comfy", _flat(vae.state_dict())), ("diffusers", _diffusers(vae).state_dict())]:
            path = tmp_path / f"{name}.safetensors"
            write_safetensors(weights, path, {})
            assert peek_flux2_vae(path), name
            loaded = load_flux2_vae(path)
            assert loaded.config == WIDE_DECODER
            assert rel_err(loaded.encode(pixels).mode(), expected) < 1e-6, name


def _image_vae(config: VAEConfig) -> AutoencoderKL:
    return randomize_(AutoencoderKL(config), torch.Generator().manual_seed(0))


def test_other_vaes_are_not_flux2(tmp_path: Path) -> None:
    small = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1)
    flux1 = tmp_path / "ae.safetensors"  # Flux.1's: 16 channels, no 1x1 convolutions, no batch norm
    write_safetensors(_image_vae(VAEConfig(**small, z_channels=16, use_quant_conv=False)).state_dict(), flux1, {})
    sd_vae = tmp_path / "sdxl_vae.safetensors"
    write_safetensors(_image_vae(VAEConfig(**small)).state_dict(), sd_vae, {})
    for path in (flux1, sd_vae):
        assert not peek_flux2_vae(path)
        with pytest.raises(CheckpointError, match=f"{path.name}: not a FLUX.2 VAE"):
            load_flux2_vae(path)
    assert not peek_flux2_vae(tmp_path / "missing.safetensors")


def test_broken_files_are_refused(tmp_path: Path) -> None:
    sd = random_flux2_vae(TINY_FLUX2_VAE).state_dict()

    def written(name: str, weights: dict[str, torch.Tensor]) -> Path:
        write_safetensors(weights, tmp_path / name, {})
        return tmp_path / name

    missing = written("missing.safetensors", {k: v for k, v in sd.items() if k != "decoder.conv_out.weight"})
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: the FLUX.2 VAE is missing 1 weights: "
                                              r"decoder\.conv_out\.weight"):
        load_flux2_vae(missing)
    extra = written("extra.safetensors", {**sd, "decoder.up.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(CheckpointError, match=r"extra\.safetensors: 1 weights have no place in a FLUX.2 VAE: "
                                              r"decoder\.up\.0\.attn\.0\.q\.weight"):
        load_flux2_vae(extra)
    # A batch norm over something other than the 2x2-packed latent is not this VAE's.
    odd = written("odd.safetensors", {**sd, "bn.running_mean": torch.zeros(64), "bn.running_var": torch.ones(64)})
    assert not peek_flux2_vae(odd)
    with pytest.raises(CheckpointError, match="odd.safetensors: not a FLUX.2 VAE"):
        load_flux2_vae(odd)
    good = write_tiny_flux2_vae(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    assert not peek_flux2_vae(truncated)
    with pytest.raises(CheckpointError, match="truncated.safetensors: unreadable or truncated"):
        load_flux2_vae(truncated)
    with pytest.raises(CheckpointError, match="state dict: its levels' widths .* do not fit"):
        load_flux2_vae({**sd, "encoder.conv_in.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(CheckpointError, match="do not fit the detected shape"):
        load_flux2_vae({**sd, "decoder.mid.attn_1.q.weight": torch.zeros(32, 16, 1, 1)})
