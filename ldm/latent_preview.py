"""Step previews in colour for any latent space: a latent-to-RGB linear map fitted to a VAE's own encodings.

A sampler's x0 prediction becomes a coarse picture by one matrix product per latent pixel: RGB = [z, 1] @ M,
M of shape [C + 1, 3]. M is the least-squares fit of a small fixed set of synthetic pictures (colour patches
with gradients in them), average-pooled to latent resolution, against their encodings by the VAE itself, so it
is right for whatever latent space that VAE defines (SD1, SDXL, SD3, Flux, or one no table knows). It is
fitted once per VAE (`fit_rgb`), when a loader hands the VAE out (`register_vae`), and kept for the VAE's
latent format; a sampler asks for the map of its model's format in its own (scaled, shifted) latent space
(`sampler_rgb_map`) and hands `LatentPreview`s, the latent with that map, to progress reporting.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from ldm.vae import AutoencoderKL, VAEConfig

# The fitting pictures: a 4x4 grid of 16-px patches (2x2 latent pixels each at the usual 8x downscale), one
# colour per patch, each with a gentle ramp across it so no two latent pixels see the same colour. 64x64 px
# keeps the fit to one small encode (about 16 GFLOP for SDXL's or Flux's encoder).
FIT_SIDE = 64
PATCHES = 4
PATCH_COLOURS = np.array([
    [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0],
    [0.5, 0.5, 0.5], [0.8, 0.4, 0.2], [0.2, 0.6, 0.3], [0.3, 0.3, 0.8],
    [0.9, 0.7, 0.6], [0.4, 0.2, 0.5], [0.6, 0.9, 0.8], [0.25, 0.25, 0.2],
], dtype=np.float32)
RAMP = 0.3  # how far a patch's colour moves across it (towards the middle grey)

# Where nothing was fitted for a 4-channel latent: how SD1's four scaled channels make R, G and B, with
# 0.5 for bias (the table long used for SD previews, kept as the fallback the server always had).
SD1_LATENT_RGB = np.array([
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
], dtype=np.float32)
SD1_RGB_MAP = np.concatenate([SD1_LATENT_RGB / 2, np.full((1, 3), 0.5, dtype=np.float32)])

LatentFormat = tuple[int, float]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RgbFit:
    """A VAE's latent-to-RGB map: `matrix` [C + 1, 3] (a row per channel of the VAE's unscaled latents, then
    the bias) giving RGB in 0..1, and `residual`, its root-mean-square error on the fitting pictures."""

    matrix: np.ndarray
    residual: float


@dataclass(frozen=True)
class LatentPreview:
    """What a sampler reports as a step preview: a latent batch [B, C, h, w] and the map [C + 1, 3] from its
    latent space to RGB in 0..1 (None: nothing known, the previewer falls back to SD1's table or grey)."""

    latent: Any
    rgb_map: np.ndarray | None


def latent_format(config: VAEConfig | LatentFormat) -> LatentFormat:
    """The key of a latent space: its width and scale (SD1/SD2 0.18215, SDXL 0.13025, SD3 1.5305, Flux 0.3611;
    1 for the video VAEs, whose models normalise per channel instead), which a model family and the VAE it was
    made with share. A (width, scale) pair is its own key."""
    if isinstance(config, tuple):
        return config[0], round(float(config[1]), 5)
    return config.z_channels, round(float(config.scaling_factor), 5)


def vae_format(vae: Any) -> LatentFormat:
    """The latent format of a loaded VAE: an AutoencoderKL's from its config; one whose latents are not its config's
    z_channels (the video VAEs, Wan's and LTX-Video's, and FLUX.2's packed one) from its latent width and scale."""
    if hasattr(vae, "latent_channels"):
        return latent_format((vae.latent_channels, vae.scaling_factor))
    return latent_format(vae.config)


def is_video_vae(vae: Any) -> bool:
    return getattr(vae, "temporal_compression", None) is not None


def fitting_pictures() -> np.ndarray:
    """The fixed synthetic pictures the map is fitted to, [1, 3, FIT_SIDE, FIT_SIDE] in 0..1."""
    side = FIT_SIDE // PATCHES
    ramp = np.linspace(0.0, RAMP, side, dtype=np.float32)
    picture = np.empty((3, FIT_SIDE, FIT_SIDE), dtype=np.float32)
    for index, colour in enumerate(PATCH_COLOURS):
        row, col = divmod(index, PATCHES)
        # Horizontal ramp towards grey on odd patches, vertical on even ones: both directions are seen.
        across = ramp[None, :] if index % 2 else ramp[:, None]
        patch = colour[:, None, None] + (0.5 - colour[:, None, None]) * across[None]
        picture[:, row * side:(row + 1) * side, col * side:(col + 1) * side] = patch
    return picture[None]


def solve_rgb_map(latents: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares of `rgb` [N, 3] against `latents` [N, C] with a bias: ([C + 1, 3], RMS residual)."""
    design = np.concatenate([latents, np.ones((latents.shape[0], 1))], axis=1).astype(np.float64)
    matrix, *_ = np.linalg.lstsq(design, rgb.astype(np.float64), rcond=None)
    residual = float(np.sqrt(np.mean((design @ matrix - rgb) ** 2)))
    return matrix.astype(np.float32), residual


def pooled(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Pictures [B, 3, H, W] averaged over `factor`-pixel squares: their colour at latent resolution."""
    import torch.nn.functional as F

    return F.avg_pool2d(pixels, factor)


def rows(grid: Any) -> np.ndarray:
    """[B, C, h, w] as [B*h*w, C] float64 rows, one per latent pixel."""
    array = grid.detach().float().cpu().numpy() if hasattr(grid, "detach") else np.asarray(grid)
    return array.transpose(0, 2, 3, 1).reshape(-1, array.shape[1]).astype(np.float64)


_fits: weakref.WeakKeyDictionary[Any, RgbFit] = weakref.WeakKeyDictionary()
_by_format: dict[LatentFormat, RgbFit] = {}
_lock = threading.Lock()


def fit_rgb(vae: AutoencoderKL) -> RgbFit:
    """The latent-to-RGB map of `vae`'s unscaled latents, fitted once per VAE (these weights) and kept."""
    with _lock:
        fit = _fits.get(vae)
    if fit is not None:
        return fit
    import torch

    from ldm.vae import DiagonalGaussianDistribution

    device = next(vae.parameters()).device
    video = is_video_vae(vae)
    whole = hasattr(vae, "latent_channels")  # not an AutoencoderKL: its own encode, which may pack and normalise
    # What AutoencoderKL.encode runs; a video VAE encodes each picture as a one-frame video.
    encoder = vae if whole else torch.nn.Sequential(vae.encoder, vae.quant_conv)
    if device.type == "cpu" and next(vae.parameters()).dtype != torch.float32:
        # Half-precision convolutions are slow on CPUs (SDXL's encoder: about 40 s in fp16, not 0.2 s in fp32):
        # the fit runs on a float32 copy, which goes when it is done.
        encoder = copy.deepcopy(encoder).float()
    dtype = next(encoder.parameters()).dtype
    pictures = torch.from_numpy(fitting_pictures())
    if whole and not video:
        # At least two latent pixels per unknown of the fit (C + 1): FLUX.2's 128 channels at 1/16 want 256 px.
        side = FIT_SIDE // vae.spatial_compression
        repeat = max(1, math.ceil(math.sqrt(2 * (vae.latent_channels + 1)) / side))
        pictures = pictures.repeat_interleave(repeat, dim=2).repeat_interleave(repeat, dim=3)
    with torch.inference_mode():
        x = (pictures * 2 - 1).to(device, dtype)
        if video:
            latents = encoder.encode(x.unsqueeze(2)).mode()[:, :, 0]
        elif whole:
            latents = encoder.encode(x).mode()
        else:
            latents = DiagonalGaussianDistribution(encoder(x)).mode()
    colours = pooled(pictures, pictures.shape[-1] // latents.shape[-1])
    matrix, residual = solve_rgb_map(rows(latents), rows(colours))
    fit = RgbFit(matrix, residual)
    with _lock:
        _fits[vae] = fit
    return fit


def register_vae(vae: AutoencoderKL) -> RgbFit | None:
    """Fit `vae` (once) and make its map the one previews of its latent format use (the latest VAE loaded for
    a format wins: VAEs of one latent space give nearly the same map). A VAE that cannot encode here (no memory
    left, weights not materialised) gets no map, and a warning: previews fall back, loading goes on. An audio VAE
    (`ldm.oobleck`: its latents are sound, not pictures) gets none."""
    if getattr(vae, "hop_length", None) is not None:
        return None
    try:
        fit = fit_rgb(vae)
    except RuntimeError as e:
        log.warning("no colour step previews from this VAE: its fit failed (%s)", str(e).splitlines()[0])
        return None
    with _lock:
        _by_format[vae_format(vae)] = fit
    return fit


def fit_for(config: VAEConfig | LatentFormat) -> RgbFit | None:
    """The map registered for this latent format (a VAE config, or a (width, scale) pair), if a VAE of it was
    loaded."""
    with _lock:
        return _by_format.get(latent_format(config))


def sampler_rgb_map(fit: RgbFit | None, channels: int,
                    latent_out: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray | None:
    """The map [C + 1, 3] for latents as a sampler holds them, given `latent_out`, the model's affine per-channel
    map back to the VAE's latents (z = x / scale + shift, or Playground's per-channel one). The least-squares fit
    in the sampler's space is this affine change of the VAE-space fit (a bias absorbs the shift), with the same
    residual. Without a fit: SD1's table for 4 channels, None (grey) otherwise."""
    if fit is None:
        return SD1_RGB_MAP if channels == 4 else None
    if fit.matrix.shape[0] != channels + 1:
        return None
    import torch

    zero = latent_out(torch.zeros(1, channels, 1, 1)).reshape(channels).double().numpy()
    one = latent_out(torch.ones(1, channels, 1, 1)).reshape(channels).double().numpy()
    matrix = fit.matrix.astype(np.float64)
    weights = (one - zero)[:, None] * matrix[:-1]
    bias = zero @ matrix[:-1] + matrix[-1]
    return np.concatenate([weights, bias[None]]).astype(np.float32)


def apply_rgb_map(latent: np.ndarray, rgb_map: np.ndarray) -> np.ndarray:
    """One latent [C, h, w] as an [h, w, 3] picture in 0..1 (clipped) through a map [C + 1, 3]."""
    return np.clip(latent.transpose(1, 2, 0) @ rgb_map[:-1] + rgb_map[-1], 0.0, 1.0)
