"""Guidance variants ComfyUI ships as model patches (CFG-Zero*, CFGNorm, APG, Mahiro, Epsilon Scaling, TCFG) and
Perp-Neg's three-prompt guidance, each computed as ComfyUI computes it.

All predictions here are x0 predictions of the unscaled latent `x = x0 + sigma * eps` (ComfyUI's "denoised"); where
a method works on noise predictions, they are `x - x0`, which is ComfyUI's "cond"/"uncond" (sigma * eps). Post-guidance
functions take `(args, denoised, predict)` and pre-guidance ones `(args, state)`: see `model_patches`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.sampling.guidance import CondList
from ldm.sampling.model_patches import CfgArgs, Predict


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-item inner products of two [B, ...] tensors, shaped [B, 1, ...] to broadcast back."""
    dot = (a.reshape(a.shape[0], -1) * b.reshape(b.shape[0], -1)).sum(1)
    return dot.reshape(-1, *([1] * (a.ndim - 1)))


def optimized_scale(positive: Tensor, negative: Tensor) -> Tensor:
    """CFG-Zero*'s s* = <positive, negative> / ||negative||^2 per item (the least-squares scale of the negative
    prediction onto the positive one), with 1e-8 added to the denominator as ComfyUI does."""
    return _flat_dot(positive, negative) / (_flat_dot(negative, negative) + 1e-8)


@dataclass(frozen=True)
class CFGZeroStar:
    """CFG-Zero*'s optimized scale: Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow
    Matching Models" (arXiv 2503.18886), Eq. 8-9: the negative prediction is first scaled by s* (computed, as in
    ComfyUI, on the noise predictions `x - x0`), giving `s* u + cfg (c - s* u)`. ComfyUI applies that combination to
    the x0 predictions, as a correction of the guided result: `denoised + (cfg - 1)(1 - s*) u`. The paper's zeroing
    of the first steps is not part of ComfyUI's node."""

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        if args.uncond is None:
            return denoised
        alpha = optimized_scale(args.x - args.cond, args.x - args.uncond)
        return denoised + (args.cfg - 1.0) * (1.0 - alpha) * args.uncond


@dataclass(frozen=True)
class CFGNorm:
    """ComfyUI's CFGNorm (comfy_extras/nodes_cfg.py; no paper cited): caps the guided x0's norm over channels, at
    each pixel, at the positive prediction's, then multiplies by `strength`:
    `denoised * clamp(|cond| / (|denoised| + 1e-8), 0, 1) * strength`."""

    strength: float

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        cap = args.cond.norm(dim=1, keepdim=True) / (denoised.norm(dim=1, keepdim=True) + 1e-8)
        return denoised * cap.clamp(0.0, 1.0) * self.strength


@dataclass(frozen=True)
class Mahiro:
    """ComfyUI's Mahiro guidance (comfy_extras/nodes_mahiro.py; no paper): mixes the guided x0 with the positive
    prediction scaled by cfg ("leap"), weighted by how alike the negative's leap and the mean of the two are. With
    signed square roots r(t) = sign(t) sqrt|t|, sim the cosine similarity over channels of r(cfg * uncond) and
    r((cfg * cond + denoised) / 2), averaged over pixels and the batch, and w = 2 (sim + 1) in [0, 4]:
    `(w denoised + (4 - w) cfg cond) / 4`."""

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        if args.uncond is None:
            return denoised
        leap = args.cond * args.cfg
        negative_leap = args.uncond * args.cfg
        merged = (leap + denoised) / 2

        def signed_sqrt(t: Tensor) -> Tensor:
            return t.abs().sqrt() * t.sign()

        similarity = F.cosine_similarity(signed_sqrt(negative_leap), signed_sqrt(merged)).mean()
        weight = 2 * (similarity + 1)
        return (weight * denoised + (4 - weight) * leap) / 4


@dataclass(frozen=True)
class EpsilonScaling:
    """Epsilon Scaling: Ning et al. 2024, "Elucidating the Exposure Bias in Diffusion Models" (ICLR 2024, arXiv
    2308.15321), with its uniform schedule: the guided noise prediction is divided by `scaling_factor` (lambda,
    slightly above 1), `x - (x - denoised) / lambda`, against the exposure bias of sampling."""

    scaling_factor: float

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        factor = self.scaling_factor or 1e-9  # ComfyUI's guard; the node's range starts at 0.5
        return args.x - (args.x - denoised) / factor


def _item_norm(t: Tensor) -> Tensor:
    """The L2 norm over the last three dimensions (channels and pixels of one image), kept for broadcasting."""
    return t.norm(p=2, dim=(-1, -2, -3), keepdim=True)


@dataclass(frozen=True)
class AdaptiveProjectedGuidance:
    """Adaptive Projected Guidance: Sadat, Hilliges & Weber 2024, "Eliminating Oversaturation and Artifacts of High
    Guidance Scales in Diffusion Models" (arXiv 2410.02416), Algorithm 1, as ComfyUI's APG node runs it on x0
    predictions before guidance. The update D = cond - uncond is
    1. with `momentum` beta != 0, replaced by the running sum D_t + beta * D_{t-1} over the run's model calls (reset
       when the noise level rises, as at the start of a run);
    2. with `norm_threshold` r > 0, rescaled per image to norm at most r;
    3. split into its part along the positive prediction and the rest, the parallel part weighted by `eta`.
    The positive prediction becomes `uncond + D' + (cond - uncond) / cfg`, so that guidance at scale cfg gives
    `cond + cfg * D'`: the paper's `cond + (w - 1) D'` with w = cfg + 1, and at eta 1, r 0, beta 0 plain CFG at
    cfg + 1 (ComfyUI's behaviour, kept).

    The running sum lives in the guider's per-run state, never on this (cached, shared) object."""

    eta: float = 1.0
    norm_threshold: float = 5.0
    momentum: float = 0.0

    def __call__(self, args: CfgArgs, state: dict) -> CfgArgs:
        cond, uncond = args.cond, args.uncond
        if uncond is None or args.cfg == 0:  # cfg 0 would divide by zero; guidance is the negative alone anyway
            return args
        guidance = cond - uncond
        if self.momentum != 0:
            # Read the level on the device: comparing there keeps the step free of a host synchronisation.
            sigma = args.sigma.reshape(-1)[:1].to(guidance.dtype)
            previous = state.get("sigma")
            if previous is not None:
                continuing = (sigma <= previous).to(guidance.dtype)
                guidance = guidance + self.momentum * state["running"] * continuing
            state["sigma"], state["running"] = sigma, guidance
        if self.norm_threshold > 0:
            guidance = guidance * torch.clamp(self.norm_threshold / _item_norm(guidance), max=1.0)
        direction = F.normalize(cond, dim=(-1, -2, -3))
        parallel = (guidance * direction).sum(dim=(-1, -2, -3), keepdim=True) * direction
        projected = (guidance - parallel) + self.eta * parallel
        return replace(args, cond=uncond + projected + (cond - uncond) / args.cfg)


def tangential_damping(cond_noise: Tensor, uncond_noise: Tensor) -> Tensor:
    """TCFG's damped negative: per item, the negative noise prediction's component along the first right singular
    vector of the 2 x N matrix [uncond; cond] (the pair's principal direction), in float32."""
    batch = cond_noise.shape[0]
    matrix = torch.stack((uncond_noise.reshape(batch, -1), cond_noise.reshape(batch, -1)), dim=1).float()
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    direction = vh[:, :1, :]  # [B, 1, N]; its sign cancels below
    damped = (matrix[:, :1, :] @ direction.transpose(-2, -1)) * direction
    return damped.reshape(uncond_noise.shape).to(uncond_noise.dtype)


@dataclass(frozen=True)
class TangentialDampingCFG:
    """Tangential Damping CFG: "TCFG: Tangential Damping Classifier-free Guidance" (arXiv 2503.18137): before
    guidance, the negative noise prediction `x - uncond` keeps only its component along the principal direction of
    the pair (positive, negative), dropping the tangential part that pulls samples off the data manifold."""

    def __call__(self, args: CfgArgs, state: dict) -> CfgArgs:
        if args.uncond is None:
            return args
        damped = tangential_damping(args.x - args.cond, args.x - args.uncond)
        return replace(args, uncond=args.x - damped)


def perp_neg(positive: Tensor, negative: Tensor, empty: Tensor, neg_scale: float, cfg: float) -> Tensor:
    """Perp-Neg: Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm: Transform 2D Diffusion into 3D,
    alleviate Janus problem and Beyond" (arXiv 2304.04968), Eq. 6, as ComfyUI computes it. Against the empty
    prompt's prediction, only the part of the negative's direction perpendicular to the positive's is subtracted:
    `empty + cfg * (p - neg_scale * (n - <n, p> / |p|^2 * p))`, p = positive - empty, n = negative - empty. As in
    ComfyUI the projection is over the whole batch at once. Linear in the predictions, so x0 or noise alike."""
    pos = positive - empty
    neg = negative - empty
    # A positive equal to the empty prompt's prediction has no direction: nothing to project onto (ComfyUI: NaN).
    along = (neg * pos).sum() / torch.clamp(pos.square().sum(), min=torch.finfo(pos.dtype).tiny)
    perpendicular = neg - along * pos
    return empty + cfg * (pos - neg_scale * perpendicular)


@dataclass(frozen=True)
class PerpNeg:
    """Perp-Neg's third prompt for the guider (`guidance.ThirdPrompt`): `middle` is the empty prompt. The model's
    guidance function (RescaleCFG) is not used, as in ComfyUI's PerpNegGuider; pre- and post-guidance functions see
    the positive and negative predictions."""

    middle: CondList
    neg_scale: float

    def combine(self, args: CfgArgs, middle: Tensor, guide: Callable[[CfgArgs], Tensor]) -> Tensor:
        return perp_neg(args.cond, args.uncond, middle, self.neg_scale, args.cfg)
