"""Changes to sampling that a model carries: how guidance combines its predictions (RescaleCFG), what it changes
before (APG, TCFG) and adds after (Perturbed-Attention Guidance, Self-Attention Guidance), how an inpainting mask
evolves over the run (Differential Diffusion), wrappers around each guided evaluation (LazyCache, CFGOverride, which
guides within `cfg_override`), and a model that predicts the negative prompt (DualModelGuider,
SkipLayerGuidanceDiTSimple). `sample()` takes them as `SamplingPatches`; `call_sides` tells a patch inside the model
which rows of a call are which prompt (NAG)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.patches import AttentionRecorder, perturbed_attention_copy


@dataclass(frozen=True)
class CfgArgs:
    """What a guidance function sees at one model call: the latent `x` and its levels `sigma` [B], the
    positive and negative predictions of x0 (`uncond` is None when cfg is 1 and no negative pass ran); `parts`:
    a packed latent's parts' shapes without the batch (`ldm.sampling.av_latent`), None for any other latent."""

    x: Tensor
    sigma: Tensor
    cond: Tensor
    uncond: Tensor | None
    cfg: float
    parts: tuple[tuple[int, ...], ...] | None = None


# A guidance function returns the guided x0 in place of `uncond + cfg * (cond - uncond)`.
CfgFunction = Callable[[CfgArgs], Tensor]
# A pre-guidance function (ComfyUI's sampler_pre_cfg_function) maps the two sides' predictions to new ones before
# they are combined; it runs only when the negative side was predicted. Its second argument is a dict that the
# guider keeps for it over one sampling run and no longer (e.g. APG's momentum), so a patch object a cached model
# holds stays stateless between runs.
PreCfgFunction = Callable[[CfgArgs, dict], CfgArgs]
# A post-guidance function maps the guided x0 to a new one. `predict(transform, at=None, negative=False,
# without=())` is the prediction of the positive prompt (or the negative) by the UNet module `transform(unet)`, e.g.
# a copy with some layers patched, at the latent `at` (the call's own when None), at the call's noise level, its
# entries without the conditioning options named in `without` (e.g. LTX-2's reference audio).
Predict = Callable[..., Tensor]
PostCfgFunction = Callable[[CfgArgs, Tensor, Predict], Tensor]
# A mask function maps an inpainting mask (1 = repaint) and the run's progress at this call (1 at the first
# level, 0 at the last) to the mask used for this call.
MaskFunction = Callable[[Tensor, float], Tensor]


class GuidanceWrapper(Protocol):
    """A guidance wrapper (ComfyUI's PREDICT_NOISE wrapper), for one sampling run: called as `wrapper(x, sigma,
    guide)` for each model evaluation in place of `guide(x, sigma)`, the guided x0 (after the noise mask is applied
    to x); `finish()` when the run ends, failed or not (LazyCache: its cache lives for one run and logs what it
    skipped). A wrapper that calls `guide` within `cfg_override(value)` has that evaluation guided at `value`
    (CFGOverride)."""

    def __call__(self, x: Tensor, sigma: Tensor, guide: Callable[[Tensor, Tensor], Tensor]) -> Tensor: ...

    def finish(self) -> None: ...


# Makes a fresh guidance wrapper from the run's levels (on the CPU) when each sampling run starts.
GuidanceWrapperFactory = Callable[[Tensor], GuidanceWrapper]
# A negative-side function (ComfyUI's sampler_calc_cond_batch_function, as SkipLayerGuidanceDiTSimple uses it) gives,
# for a model call's level, the transform of the UNet module (as `Predict` takes them) that predicts the negative
# prompt at that call, or None for the module itself (the negative batched with the positive, as usual).
NegativeFunction = Callable[[float], Any]

_cfg_override: ContextVar[float | None] = ContextVar("cfg_override", default=None)


@contextmanager
def cfg_override(cfg: float | None) -> Iterator[None]:
    """Within it, guiders guide at `cfg` in place of their own (ComfyUI's CFGOverride sets the guider's cfg around
    its predict_noise); nested, the innermost wins; None: no override (a sampling run starts without one)."""
    token = _cfg_override.set(cfg)
    try:
        yield
    finally:
        _cfg_override.reset(token)


def overridden_cfg() -> float | None:
    """The cfg a `cfg_override` around this call asks for; None outside one."""
    return _cfg_override.get()


_call_sides: ContextVar[tuple[int, ...] | None] = ContextVar("call_sides", default=None)


@contextmanager
def call_sides(sides: tuple[int, ...]) -> Iterator[None]:
    """Within it, the model call's rows are `len(sides)` equal chunks, chunk i of side `sides[i]` (0 = positive,
    1 = negative): ComfyUI's cond_or_uncond, which the guider sets around each batched call for a patch inside
    the model that mixes the two sides' rows (Normalized Attention Guidance, `ldm.nag`)."""
    token = _call_sides.set(sides)
    try:
        yield
    finally:
        _call_sides.reset(token)


def current_sides() -> tuple[int, ...] | None:
    """The sides of the rows of the model call in progress (`call_sides`); None outside a guider's call."""
    return _call_sides.get()


@dataclass(frozen=True)
class SamplingPatches:
    cfg_function: CfgFunction | None = None
    post_cfg: tuple[PostCfgFunction, ...] = ()
    pre_cfg: tuple[PreCfgFunction, ...] = ()  # applied in order, before cfg_function (APG, TCFG)
    denoise_mask: MaskFunction | None = None
    keep_negative: bool = False  # predict the negative prompt even at cfg 1, for a patch that reads it
    # A third prompt the guider predicts and combines (`guidance.ThirdPrompt`) when the sampler was given none:
    # ComfyUI's older PerpNeg model patch, the same as its PerpNegGuider.
    third_prompt: Any = None
    around_guidance: tuple[GuidanceWrapperFactory, ...] = ()  # outermost first
    # Where it gives a transform, the negative prompt is predicted by that transform of the UNet module (another
    # model, skipped layers) in calls of its own, rather than batched with the positive.
    negative_by: NegativeFunction | None = None

    def after(self, patch: PostCfgFunction) -> SamplingPatches:
        """These patches with `patch` last of the post-guidance functions."""
        return replace(self, post_cfg=(*self.post_cfg, patch))

    def around(self, factory: GuidanceWrapperFactory) -> SamplingPatches:
        """These patches with `factory`'s wrappers innermost (nearest the guider) of the guidance wrappers."""
        return replace(self, around_guidance=(*self.around_guidance, factory))


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
class RenormCFG:
    """Lumina Image 2.0's renormalised guidance (its reference sampler's `forward_with_cfg`, as ComfyUI's RenormCFG
    node applies it to the predictions of x0): classifier-free guidance only where the noise level sigma is below
    `cfg_trunc`, the positive prediction alone elsewhere; and the guided prediction's norm (each image's, over all
    its values) capped at `renorm_cfg` times the positive prediction's, the direction kept. `renorm_cfg` 0 caps
    nothing; `cfg_trunc` above the largest sigma (ComfyUI's default 100; flow sigmas are at most 1) guides every
    step. Without a negative prediction (cfg 1) the guided prediction is the positive one, still capped."""

    cfg_trunc: float = 100.0
    renorm_cfg: float = 1.0

    def __call__(self, args: CfgArgs) -> Tensor:
        cond = args.cond
        guided = cond if args.uncond is None else args.uncond + args.cfg * (cond - args.uncond)
        if self.renorm_cfg > 0:
            dims = tuple(range(1, cond.ndim))
            cap = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * self.renorm_cfg
            norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
            guided = torch.where(norm > cap, guided * (cap / norm), guided)  # `>`: no 0 / 0 where both are 0
        return torch.where(_per_item(args.sigma, cond) < self.cfg_trunc, guided, cond)


@dataclass(frozen=True)
class PerturbedAttentionGuidance:
    """Perturbed-Attention Guidance (Ahn et al. 2024): guides away from the prediction of the same model with
    the identity as the self-attention map of its middle block, which keeps the layout but loses structure:
    `x0 + scale * (positive - perturbed positive)`. One more model pass per step."""

    scale: float

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        if self.scale == 0:
            return denoised
        return denoised + self.scale * (args.cond - predict(perturbed_attention_copy))


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int = 9) -> Tensor:
    """Each channel blurred by a normalised Gaussian of `kernel_size` taps, the edges mirrored."""
    if sigma <= 0:
        return x
    taps = torch.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.device, x.dtype)
    kernel2d = torch.outer(kernel, kernel).expand(x.shape[1], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel2d, groups=x.shape[1])


def _unpatched(unet: nn.Module) -> nn.Module:
    return unet


@dataclass(frozen=True)
class SelfAttentionGuidance:
    """Self-Attention Guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using
    Self-Attention Guidance"), as ComfyUI's node runs it: where the negative prediction's middle-block
    self-attention looks most (tokens that get more than their share of it), its x0 is blurred; the model's
    negative prediction of that degraded image, re-noised with the same noise, guides away from it:
    `x0 + scale * (degraded - prediction(degraded + x - x0_negative))`.

    Two more model passes of the negative side per step: one on a copy that records the attention map (ComfyUI
    records it during the main pass), one on the degraded latent."""

    scale: float
    blur_sigma: float
    recorder: AttentionRecorder = field(default_factory=AttentionRecorder, compare=False, repr=False)

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        x0 = args.uncond
        if self.scale == 0 or x0 is None or min(x0.shape[2:]) <= 4:  # the blur's padding needs more than 4
            return denoised
        predict(self.recorder, negative=True)
        degraded = self.degrade(x0, self.recorder.probs)
        return denoised + (degraded - predict(_unpatched, at=degraded + args.x - x0, negative=True)) * self.scale

    def degrade(self, x0: Tensor, probs: Tensor) -> Tensor:
        """`x0` blurred where the attention map's tokens receive more than one query's worth of attention
        (averaged over heads, summed over queries); the mask is the middle block's grid, upsampled nearest."""
        b, _, height, width = x0.shape
        received = probs.reshape(b, -1, *probs.shape[1:]).mean(1).sum(1)  # [b, tokens]
        size = self.recorder.size(height, width, received.shape[1])
        mask = (received > 1.0).to(x0.dtype).reshape(b, 1, *size)
        mask = F.interpolate(mask, (height, width), mode="nearest")
        return torch.lerp(x0, gaussian_blur(x0, self.blur_sigma), mask)


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
