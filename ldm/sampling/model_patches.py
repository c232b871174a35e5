"""Changes to sampling that a model carries: how guidance combines its predictions (RescaleCFG), what it adds
after (Perturbed-Attention Guidance), and how an inpainting mask evolves over the run (Differential
Diffusion). `sample()` takes them as `SamplingPatches`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.patches import perturbed_attention_copy


@dataclass(frozen=True)
class CfgArgs:
    """What a guidance function sees at one model call: the latent `x` and its levels `sigma` [B], the
    positive and negative predictions of x0 (`uncond` is None when cfg is 1 and no negative pass ran)."""

    x: Tensor
    sigma: Tensor
    cond: Tensor
    uncond: Tensor | None
    cfg: float


# A guidance function returns the guided x0 in place of `uncond + cfg * (cond - uncond)`.
CfgFunction = Callable[[CfgArgs], Tensor]
# A post-guidance function maps the guided x0 to a new one. `predict_positive(transform)` is the positive
# prediction of the UNet module `transform(unet)`, e.g. a copy with some layers patched.
PredictPositive = Callable[[Callable[[nn.Module], nn.Module]], Tensor]
PostCfgFunction = Callable[[CfgArgs, Tensor, PredictPositive], Tensor]
# A mask function maps an inpainting mask (1 = repaint) and the run's progress at this call (1 at the first
# level, 0 at the last) to the mask used for this call.
MaskFunction = Callable[[Tensor, float], Tensor]


@dataclass(frozen=True)
class SamplingPatches:
    cfg_function: CfgFunction | None = None
    post_cfg: tuple[PostCfgFunction, ...] = ()
    denoise_mask: MaskFunction | None = None


def _per_item(sigma: Tensor, like: Tensor) -> Tensor:
    return sigma.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class RescaleCFG:
    """Rescaled classifier-free guidance: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Eq. 15-16. In v-space, the guided prediction is scaled to the positive one's standard
    deviation (per image), and `multiplier` of that is mixed with the plain guided one. Counters the
    over-exposure strong guidance gives v-prediction and zero-terminal-SNR models."""

    multiplier: float

    def __call__(self, args: CfgArgs) -> Tensor:
        if args.uncond is None:
            return args.cond
        sigma = _per_item(args.sigma, args.x)
        alpha = (sigma**2 + 1) ** -0.5  # x_t = alpha * x in DDPM terms; v = (alpha^2 * x - x0) / (alpha * sigma)
        scale = alpha * sigma
        cond, uncond = ((alpha**2 * args.x - x0) / scale for x0 in (args.cond, args.uncond))
        guided = uncond + args.cfg * (cond - uncond)
        dims = tuple(range(1, guided.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        v = self.multiplier * rescaled + (1 - self.multiplier) * guided
        return alpha**2 * args.x - scale * v


@dataclass(frozen=True)
class PerturbedAttentionGuidance:
    """Perturbed-Attention Guidance (Ahn et al. 2024): guides away from the prediction of the same model with
    the identity as the self-attention map of its middle block, which keeps the layout but loses structure:
    `x0 + scale * (positive - perturbed positive)`. One more model pass per step."""

    scale: float

    def __call__(self, args: CfgArgs, denoised: Tensor, predict_positive: PredictPositive) -> Tensor:
        if self.scale == 0:
            return denoised
        return denoised + self.scale * (args.cond - predict_positive(perturbed_attention_copy))


@dataclass(frozen=True)
class DifferentialDiffusion:
    """Differential Diffusion (Levin & Fried 2023, "Differential Diffusion: Giving Each Pixel Its Strength"):
    a soft mask says how much each pixel may change. At each step only pixels whose mask value reaches the
    run's remaining progress are repainted, so a pixel at 0.3 follows the original for the first 70% of the
    run and is free for the last 30%. `strength` between 0 and 1 mixes the soft mask back in; 0, like 1, is the
    thresholded mask alone (ComfyUI's reading of an unset strength)."""

    strength: float = 1.0

    def __call__(self, mask: Tensor, progress: float) -> Tensor:
        binary = (mask >= progress).to(mask.dtype)
        if not 0.0 < self.strength < 1.0:
            return binary
        return torch.lerp(mask, binary, self.strength)
