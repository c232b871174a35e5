"""Guidance patches of ComfyUI's newer nodes: Temporal Score Rescaling, Tangential Amplifying Guidance and FreSca change
the guided prediction (or the two sides' predictions) of x0; CfgOverride changes the cfg over part of the run; and
NegativeOnModel has another UNet predict the negative prompt (DualModelGuider). All of them act on predictions of x0,
as ComfyUI's post- and pre-guidance functions do, so each formula is taken over as it is written there."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ldm.sampling.denoiser import first_level
from ldm.sampling.model_patches import CfgArgs, Predict, cfg_override


def tsr_factor(snr: float, k: float, variance: float) -> float:
    """Temporal Score Rescaling's ratio r (Xu et al. 2025, arXiv 2510.01184, Eq. 6): `(snr v + 1) / (snr v / k + 1)`,
    k as snr grows without bound."""
    if math.isinf(snr):
        return k
    return (snr * variance + 1) / (snr * variance / k + 1)


@dataclass(frozen=True)
class TemporalScoreRescaling:
    """Temporal Score Rescaling (ComfyUI's TemporalScoreRescaling node, nodes_eps.py): the guided x0 moved towards
    or away from `x / alpha` (the latent with its noise part left in) by the ratio r of `tsr_factor`:
    `lerp(x / alpha, x0, r)`, with `snr = (alpha / sigma)^2`; alpha is 1 for a latent `x0 + sigma noise` (SD, SDXL)
    and `1 - sigma` for a rectified-flow one (Flux, SD3, Wan). k = 1, sigma 0 and snr 0 (a flow model's sigma 1)
    change nothing."""

    k: float
    tsr_sigma: float
    flow: bool = False

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        sigma = first_level(args.sigma)
        if self.k == 1 or sigma == 0 or (self.flow and sigma >= 1):
            return denoised
        half_log_snr = math.log((1 - sigma) / sigma) if self.flow else -math.log(sigma)
        snr = math.inf if 2 * half_log_snr > 700 else math.exp(2 * half_log_snr)
        if snr == 0:
            return denoised
        r = tsr_factor(snr, self.k, self.tsr_sigma**2)
        alpha = 1 - sigma if self.flow else 1.0
        return torch.lerp(args.x / alpha, denoised, r)


def tangential_amplify(x0: Tensor, x: Tensor, t_scale: float, r_scale: float) -> Tensor:
    """Tangential Amplifying Guidance's update (Cho et al. 2025, arXiv 2510.04533, Algorithm 2): the step from the
    latent `x` to the prediction `x0`, split into its part along `x` (radial) and the rest (tangential), each
    scaled: `x + t_scale * tangential + r_scale * radial`, per item over its dimensions longer than 1."""
    dims = tuple(d for d in range(1, x0.ndim) if x0.shape[d] > 1)
    direction = x / (torch.linalg.vector_norm(x, dim=dims, keepdim=True) + 1e-8)
    step = x0 - x
    radial = (step * direction).sum(dim=dims, keepdim=True) * direction
    return x + t_scale * (step - radial) + r_scale * radial


@dataclass(frozen=True)
class TangentialAmplifyingGuidance:
    """Tangential Amplifying Guidance (ComfyUI's node of that name, nodes_tag.py): while `sigma_low <= sigma <=
    sigma_high`, the guided x0 becomes `tangential_amplify(x0, x, t_scale, r_scale)`."""

    t_scale: float
    r_scale: float
    sigma_high: float
    sigma_low: float

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        if not self.sigma_low <= first_level(args.sigma) <= self.sigma_high:
            return denoised
        return tangential_amplify(denoised, args.x, self.t_scale, self.r_scale)


def frequency_scaled(x: Tensor, scale_low: float, scale_high: float, cutoff: int) -> Tensor:
    """`x` with its 2-D spectrum (over the last two dimensions, the zero frequency centred) scaled by `scale_low` in
    the central band, `cutoff` indices either side of the centre in every dimension from the third (a video's
    frames too, as ComfyUI's mask does), and by `scale_high` elsewhere; computed in float32."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.full(spectrum.shape, float(scale_high), device=x.device)
    centre = mask
    for dim in range(2, mask.ndim):
        half = mask.shape[dim] // 2
        width = min(cutoff, half)
        centre = centre.narrow(dim, half - width, 2 * width)
    centre.fill_(scale_low)
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)


@dataclass(frozen=True)
class FreSca:
    """FreSca (Huang et al. 2025, "FreSca: Scaling in Frequency Space Enhances Diffusion Models"; ComfyUI's FreSca
    node, nodes_fresca.py): before guidance, the guidance direction `positive - negative` has its low and high
    frequencies scaled apart (`frequency_scaled`), and the positive prediction becomes `negative + that`. Being
    linear, it is the same on predictions of x0 as of noise. Without a negative prediction nothing changes."""

    scale_low: float
    scale_high: float
    cutoff: int

    def __call__(self, args: CfgArgs, state: dict) -> CfgArgs:
        if args.uncond is None:
            return args
        guidance = frequency_scaled(args.cond - args.uncond, self.scale_low, self.scale_high, self.cutoff)
        return replace(args, cond=guidance + args.uncond)


@dataclass(frozen=True)
class CfgOverride:
    """ComfyUI's CFGOverride: each model evaluation at a level in `(sigma_low, sigma_high]` is guided at `cfg`
    instead of the guider's own (`model_patches.cfg_override`). A guidance wrapper factory
    (`SamplingPatches.around_guidance`); of several that cover a level, the last added (nearest the sampler) wins."""

    cfg: float
    sigma_high: float
    sigma_low: float

    def __call__(self, sigmas: Tensor) -> CfgOverrideRun:
        return CfgOverrideRun(self)


@dataclass(frozen=True)
class CfgOverrideRun:
    """One sampling run's CfgOverride wrapper (it keeps nothing between calls)."""

    settings: CfgOverride

    def __call__(self, x: Tensor, sigma: Tensor, guide: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        if not self.settings.sigma_low < first_level(sigma) <= self.settings.sigma_high:
            return guide(x, sigma)
        with cfg_override(self.settings.cfg):
            return guide(x, sigma)

    def finish(self) -> None:
        """Nothing to log or release."""


@dataclass(frozen=True, eq=False)
class NegativeOnModel:
    """A negative-side function (`model_patches.NegativeFunction`) for ComfyUI's DualModelGuider: at every level the
    negative prompt is predicted by another UNet, `place()` (which readies it on the compute device and returns it),
    and `inner` (the sampled model's own negative-side function, e.g. SkipLayerGuidanceDiTSimple's), if any, is
    applied to that UNet where it says. Compared by identity: the guider keeps one side guider per transform."""

    place: Callable[[], nn.Module]
    inner: Callable[[float], Any] | None = None

    def __call__(self, sigma: float) -> Any:
        transform = None if self.inner is None else self.inner(sigma)
        return self._plain if transform is None else _OtherModel(self.place, transform)

    def _plain(self, module: nn.Module) -> nn.Module:
        return self.place()


@dataclass(frozen=True)
class _OtherModel:
    """The transform `transform` applied to the other UNet instead of the sampled one."""

    place: Callable[[], nn.Module]
    transform: Any

    def __call__(self, module: nn.Module) -> nn.Module:
        return self.transform(self.place())
