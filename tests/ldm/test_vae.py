"""Our VAE against diffusers' on identical weights; posterior maths; tiled encode/decode without seams."""

from __future__ import annotations

import pytest
import torch

from ldm.presets import PRESETS, randomize_
from ldm.vae import AutoencoderKL, DiagonalGaussianDistribution, tiled_apply
from tests.ldm.diffusers_reference import diffusers_vae, rel_err


def _vae(preset: str = "tiny-sd1") -> AutoencoderKL:
    return randomize_(AutoencoderKL(PRESETS[preset][3]), torch.Generator().manual_seed(0)).eval()


def _compare(vae: AutoencoderKL, size: int) -> tuple[float, float]:
    reference = diffusers_vae(vae.config, vae.state_dict())
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    z = torch.randn(2, 4, size // 8, size // 8, generator=g)
    with torch.no_grad():
        enc = rel_err(vae.encode(pixels).mode(), reference.encode(pixels).latent_dist.mode())
        dec = rel_err(vae.decode(z), reference.decode(z).sample)
    assert enc < 1e-4 and dec < 1e-4, (enc, dec)
    return enc, dec


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sdxl"])
def test_matches_diffusers(preset: str) -> None:
    _compare(_vae(preset), 32)


@pytest.mark.slow
def test_full_sd_vae_matches_diffusers() -> None:
    torch.manual_seed(0)
    enc, dec = _compare(AutoencoderKL(PRESETS["sd15"][3]).eval(), 64)
    print(f"full SD VAE relative error: encode {enc:.2e} decode {dec:.2e}")


def test_scaling_factor_per_family() -> None:
    assert _vae("tiny-sd1").scaling_factor == 0.18215
    assert _vae("tiny-sdxl").scaling_factor == 0.13025


def test_posterior() -> None:
    mean, logvar = torch.randn(1, 4, 3, 3), torch.full((1, 4, 3, 3), -2.0)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.equal(posterior.mode(), mean)
    a = posterior.sample(torch.Generator().manual_seed(5))
    b = posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    expected = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum()
    torch.testing.assert_close(posterior.kl(), expected.reshape(1))
    standard = DiagonalGaussianDistribution(torch.zeros(1, 8, 2, 2))
    assert standard.kl().abs().item() < 1e-6


def _ramp_image(size: int, channels: int = 4) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([xs, ys, xs * ys, xs + ys][:channels])[None]


def _column_steps(image: torch.Tensor) -> torch.Tensor:
    return (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))


def test_tiling_is_exact_for_a_pointwise_decoder() -> None:
    def upscale(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.nn.functional.interpolate(z, scale_factor=8.0)[:, :3])

    z = torch.randn(2, 4, 21, 27)
    torch.testing.assert_close(tiled_apply(upscale, z, 8, 3, 8.0, 3), upscale(z))


def test_tiling_blends_away_tile_edge_effects() -> None:
    """A zero-padded conv misbehaves at tile edges (as a real decoder does); blending hides the seam."""
    conv = torch.nn.Conv2d(4, 3, 5, padding=2)
    torch.nn.init.constant_(conv.weight, 1 / 100)

    def decoder(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(conv(z), scale_factor=8.0, mode="bilinear")

    z = _ramp_image(32)
    with torch.no_grad():
        blended = _column_steps(tiled_apply(decoder, z, 16, 8, 8.0, 3))
        pasted = _column_steps(torch.cat([decoder(z[..., :16]), decoder(z[..., 16:])], dim=-1))
    typical = blended[64:192].median()
    assert pasted[127] > 5 * typical  # the test sees a hard seam...
    assert blended[64:192].max() < 2 * typical  # ...and there is none after blending


def test_tiled_vae_decode_and_encode() -> None:
    vae = _vae()
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = vae.decode(z)
        assert torch.equal(vae.decode_tiled(z, tile_size=32, overlap=8), full)
        tiled = vae.decode_tiled(z, tile_size=24, overlap=8)
        # Loose: GroupNorm statistics of random-weight models depend strongly on the tile.
        assert tiled.shape == full.shape and rel_err(tiled, full) < 0.3
        pixels = tiled.clamp(-1, 1)
        posterior = vae.encode_tiled(pixels, tile_size=192, overlap=64)
        assert posterior.mode().shape == (1, 4, 32, 32)
        assert rel_err(posterior.mode(), vae.encode(pixels).mode()) < 0.3


def test_chunked_vae_attention_equals_sdpa() -> None:
    from ldm.attention import set_attention_chunking

    vae = _vae()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        full = vae.decode(z)
        set_attention_chunking(vae, 5)
        assert rel_err(vae.decode(z), full) < 1e-5
