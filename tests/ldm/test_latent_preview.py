"""Latent-to-RGB preview maps fitted to a VAE's own encodings (ldm.latent_preview), with real tiny AutoencoderKLs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.checkpoint import ModelFamily, load_vae
from ldm.flux_files import LATENT_SHIFT, FluxFamily
from ldm.flux_presets import TINY_FLUX_VAE
from ldm.latent_preview import (
    FIT_SIDE,
    SD1_RGB_MAP,
    fit_for,
    fit_rgb,
    fitting_pictures,
    latent_format,
    pooled,
    register_vae,
    rows,
    sampler_rgb_map,
)
from ldm.presets import PRESETS, randomize_
from ldm.vae import AutoencoderKL
from nodes.sd.models import DiffusionModel

DEMO = Path(__file__).parents[2] / "assets" / "models" / "checkpoints" / "loom-demo.safetensors"


def tiny_vae(config=PRESETS["tiny-sd1"][3], seed: int = 0) -> AutoencoderKL:
    return randomize_(AutoencoderKL(config), torch.Generator().manual_seed(seed)).eval()


def encoded(vae: AutoencoderKL, pictures: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(latent rows [N, C], pooled colour rows [N, 3]) of pictures [B, 3, H, W] in 0..1."""
    with torch.no_grad():
        z = vae.encode(pictures * 2 - 1).mode()
    return rows(z), rows(pooled(pictures, pictures.shape[-1] // z.shape[-1]))


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def grey_preview(latent_rows: np.ndarray) -> np.ndarray:
    """What the server shows for a latent without a map: the channel mean, stretched to 0..1, as grey."""
    grey = latent_rows.mean(axis=1, keepdims=True)
    return np.repeat((grey - grey.min()) / np.ptp(grey), 3, axis=1)


def with_bias(latent_rows: np.ndarray) -> np.ndarray:
    return np.concatenate([latent_rows, np.ones((len(latent_rows), 1))], axis=1)


@pytest.mark.parametrize("config", [PRESETS["tiny-sd1"][3], TINY_FLUX_VAE], ids=["sd1", "flux"])
def test_the_fit_is_the_least_squares_map_of_its_pictures_with_the_residual_it_reports(config):
    vae = tiny_vae(config)
    fit = fit_rgb(vae)
    latents, colours = encoded(vae, torch.from_numpy(fitting_pictures()))
    assert fit.matrix.shape == (config.z_channels + 1, 3) and len(latents) == (FIT_SIDE // 8) ** 2
    assert rms(with_bias(latents) @ fit.matrix, colours) == pytest.approx(fit.residual, rel=1e-4)
    # torch's own least squares on the same rows: the same map
    reference = torch.linalg.lstsq(torch.from_numpy(with_bias(latents)), torch.from_numpy(colours)).solution
    np.testing.assert_allclose(fit.matrix, reference.numpy(), atol=1e-3 * np.abs(reference.numpy()).max())
    assert fit_rgb(vae) is fit  # kept per VAE


def fresh_picture(seed: int) -> torch.Tensor:
    """Smooth random colours, not among the fitting pictures: [1, 3, 48, 48]."""
    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=48, mode="bilinear")


@pytest.mark.parametrize("source", ["tiny random", "bundled demo"])
def test_a_fitted_preview_of_a_fresh_picture_is_closer_to_it_than_grey(source):
    vae = tiny_vae() if source == "tiny random" else load_vae(DEMO).vae.eval()  # trained a few minutes
    fit = fit_rgb(vae)
    for seed in range(3):
        latents, colours = encoded(vae, fresh_picture(seed))
        fitted = np.clip(with_bias(latents) @ fit.matrix, 0, 1)
        assert rms(fitted, colours) < 0.8 * rms(grey_preview(latents), colours)


def test_the_sampler_space_map_shows_the_same_colours_and_is_its_own_least_squares_fit():
    vae = tiny_vae(TINY_FLUX_VAE, seed=3)
    fit = fit_rgb(vae)
    family = FluxFamily(unet_config=None, vae_config=TINY_FLUX_VAE, name="flux", latent_shift=LATENT_SHIFT)
    model = DiffusionModel(torch.nn.Identity(), family, "tiny")
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(fitting_pictures()) * 2 - 1).mode()
    x = model.latent_in(z)  # what the sampler holds: (z - shift) * scale
    rgb_map = sampler_rgb_map(fit, 16, model.latent_out)
    np.testing.assert_allclose(with_bias(rows(x)) @ rgb_map, with_bias(rows(z)) @ fit.matrix, atol=1e-4)
    _, colours = encoded(vae, torch.from_numpy(fitting_pictures()))
    direct, *_ = np.linalg.lstsq(with_bias(rows(x)), colours, rcond=None)
    np.testing.assert_allclose(rgb_map, direct, atol=1e-3 * np.abs(direct).max())


def test_playground_latents_get_their_per_channel_map():
    vae = tiny_vae(PRESETS["tiny-sdxl"][3])
    fit = fit_rgb(vae)
    family = ModelFamily("sdxl", "eps", PRESETS["tiny-sdxl"][2], PRESETS["tiny-sdxl"][3], playground=True)
    model = DiffusionModel(torch.nn.Identity(), family, "tiny")
    z = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    rgb_map = sampler_rgb_map(fit, 4, model.latent_out)
    np.testing.assert_allclose(with_bias(rows(model.latent_in(z))) @ rgb_map, with_bias(rows(z)) @ fit.matrix,
                               atol=1e-4)


def test_registered_maps_by_latent_format_and_the_fallbacks():
    flux = tiny_vae(TINY_FLUX_VAE, seed=7)
    assert latent_format(TINY_FLUX_VAE) == (16, 0.3611)
    fit = register_vae(flux)
    assert fit_for(TINY_FLUX_VAE) is fit and register_vae(flux) is fit
    identity = lambda x: x  # noqa: E731
    assert sampler_rgb_map(None, 4, identity) is SD1_RGB_MAP  # 4 channels, nothing fitted: SD1's table
    assert sampler_rgb_map(None, 16, identity) is None  # nothing known: grey
    assert sampler_rgb_map(fit, 4, identity) is None  # a map for another width is not used


def test_a_half_precision_vae_on_the_cpu_is_fitted_in_float32_and_left_as_it_is():
    half = tiny_vae().half()
    widened = tiny_vae()
    widened.load_state_dict(half.state_dict())  # the same (fp16-rounded) weights, in float32
    fit, half_fit = fit_rgb(widened), fit_rgb(half)
    assert half.dtype == torch.float16
    np.testing.assert_allclose(half_fit.matrix, fit.matrix, atol=1e-5 * np.abs(fit.matrix).max())


def test_a_vae_that_cannot_encode_gets_no_map_and_no_error(caplog):
    unloaded = AutoencoderKL(PRESETS["tiny-sd1"][3]).to("meta")  # weights not materialised
    assert register_vae(unloaded) is None
    assert "no colour step previews from this VAE" in caplog.text
