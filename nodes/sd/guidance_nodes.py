"""ComfyUI's guidance patch nodes: CFGZeroStar, CFGNorm, APG, Mahiro, Epsilon Scaling and TCFG return a new MODEL
(the given one, which the cache may hold, is left as it was); PerpNegGuider returns a GUIDER. The math is in
`ldm.sampling.guidance_patches`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ldm.sampling import guidance_patches as patches
from ldm.sampling.model_patches import PostCfgFunction, PreCfgFunction
from nodes.node import Node
from nodes.sd.custom_sampling import Guider
from nodes.sd.models import DiffusionModel
from nodes.spec import Float, Output, Socket


def _with_post_cfg(model: DiffusionModel, function: PostCfgFunction) -> tuple[DiffusionModel]:
    return (replace(model, sampling_patches=model.sampling_patches.after(function)),)


def _with_pre_cfg(model: DiffusionModel, function: PreCfgFunction) -> tuple[DiffusionModel]:
    current = model.sampling_patches
    return (replace(model, sampling_patches=replace(current, pre_cfg=(*current.pre_cfg, function))),)


class CFGZeroStar(Node):
    """CFG-Zero* (Fan et al. 2025): scales the negative prediction by its least-squares fit to the positive one
    before guidance."""

    category = "advanced/guidance"
    model = Socket("MODEL")
    outputs = (Output("MODEL", "patched_model"),)

    def execute(self, model: DiffusionModel) -> tuple[DiffusionModel]:
        return _with_post_cfg(model, patches.CFGZeroStar())


class CFGNorm(Node):
    """Caps the guided prediction's per-pixel norm at the positive prediction's, times strength."""

    category = "advanced/guidance"
    model = Socket("MODEL")
    strength = Float(1.0, min=0.0, max=100.0, step=0.01)
    outputs = (Output("MODEL", "patched_model"),)

    def execute(self, model: DiffusionModel, strength: float) -> tuple[DiffusionModel]:
        return _with_post_cfg(model, patches.CFGNorm(strength))


class APG(Node):
    """Adaptive Projected Guidance (Sadat et al. 2024): guidance with its update's norm capped and its part along
    the positive prediction weighted down, against the over-saturation of high cfg."""

    display_name = "Adaptive Projected Guidance"
    category = "sampling/custom_sampling"
    model = Socket("MODEL")
    eta = Float(1.0, min=-10.0, max=10.0, step=0.01,
                tooltip="Controls the scale of the parallel guidance vector. Default CFG behavior at a setting of 1.")
    norm_threshold = Float(5.0, min=0.0, max=50.0, step=0.1,
                           tooltip="Normalize guidance vector to this value, normalization disable at a setting of 0.")
    momentum = Float(0.0, min=-5.0, max=1.0, step=0.01,
                     tooltip="Controls a running average of guidance during diffusion, disabled at a setting of 0.")
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, eta: float, norm_threshold: float,
                momentum: float) -> tuple[DiffusionModel]:
        return _with_pre_cfg(model, patches.AdaptiveProjectedGuidance(eta, norm_threshold, momentum))


class Mahiro(Node):
    """Modify the guidance to scale more on the 'direction' of the positive prompt rather than the difference
    between the negative prompt."""

    display_name = "Mahiro is so cute that she deserves a better guidance function!! (。・ω・。)"
    category = "_for_testing"
    model = Socket("MODEL")
    outputs = (Output("MODEL", "patched_model"),)

    def execute(self, model: DiffusionModel) -> tuple[DiffusionModel]:
        return _with_post_cfg(model, patches.Mahiro())


class EpsilonScaling(Node):
    """Epsilon Scaling (Ning et al. 2024): divides the guided noise prediction by a factor slightly above 1,
    against the exposure bias of sampling."""

    name = "Epsilon Scaling"
    category = "model/patch/unet"
    model = Socket("MODEL")
    scaling_factor = Float(1.005, min=0.5, max=1.5, step=0.001, extra={"display": "number", "advanced": True})
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, scaling_factor: float) -> tuple[DiffusionModel]:
        return _with_post_cfg(model, patches.EpsilonScaling(scaling_factor))


class TCFG(Node):
    """TCFG - Tangential Damping CFG (2503.18137)

    Refine the uncond (negative) to align with the cond (positive) for improving quality."""

    display_name = "Tangential Damping CFG"
    category = "advanced/guidance"
    model = Socket("MODEL")
    outputs = (Output("MODEL", "patched_model"),)

    def execute(self, model: DiffusionModel) -> tuple[DiffusionModel]:
        return _with_pre_cfg(model, patches.TangentialDampingCFG())


class PerpNegGuider(Node):
    """Perp-Neg (Armandpour et al. 2023): guidance from the empty prompt towards the positive one, subtracting only
    the part of the negative prompt's direction perpendicular to the positive's."""

    category = "_for_testing"
    model = Socket("MODEL")
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    empty_conditioning = Socket("CONDITIONING")
    cfg = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    neg_scale = Float(1.0, min=0.0, max=100.0, step=0.01)
    outputs = (Output("GUIDER"),)

    def execute(self, model: DiffusionModel, positive: list, negative: list, empty_conditioning: list, cfg: float,
                neg_scale: float) -> tuple[Guider]:
        return (Guider(model, positive, negative, cfg, dual=patches.PerpNeg(empty_conditioning, neg_scale)),)


class PerpNeg(Node):
    """Perp-Neg as a model patch (ComfyUI's older, deprecated form of PerpNegGuider): samplers given this model guide
    as PerpNegGuider does, with the empty prompt as the third one."""

    category = "_for_testing"
    model = Socket("MODEL")
    empty_conditioning = Socket("CONDITIONING")
    neg_scale = Float(1.0, min=0.0, max=100.0, step=0.01)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, empty_conditioning: list, neg_scale: float) -> tuple[DiffusionModel]:
        third = patches.PerpNeg(empty_conditioning, neg_scale)
        return (replace(model, sampling_patches=replace(model.sampling_patches, third_prompt=third)),)


NODES: list[Any] = [CFGZeroStar, CFGNorm, APG, Mahiro, EpsilonScaling, TCFG, PerpNegGuider, PerpNeg]
