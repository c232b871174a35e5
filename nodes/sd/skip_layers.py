"""Skip-layer guidance for diffusion transformers (SD3's and Flux's SkipLayerGuidance nodes): each returns a new MODEL
whose sampling runs one more prediction with some blocks skipped (`ldm.skip_layers`), or, SkipLayerGuidanceDiTSimple's,
predicts the negative prompt with them skipped; the given one is unchanged."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from nodes.node import Node
from nodes.sd.models import DiffusionModel
from nodes.spec import Float, Output, Socket, String

log = logging.getLogger(__name__)

DIT_FAMILIES = ("sd3", "flux")


def _family_problem(linked: dict[str, dict[str, Any]], node: str) -> str | None:
    family = linked.get("model", {}).get("family")
    if family is None or family in DIT_FAMILIES:
        return None
    return f"{node} is for diffusion transformers (SD3, Flux); the MODEL linked is {family.upper()}, a UNet"


def _skipped_layers(model: DiffusionModel, node: str, double_layers: str, single_layers: str) -> Any:
    """The `ldm.skip_layers.SkipLayers` the layer texts name, checked against the model; None when they name none."""
    from ldm.skip_layers import SkipLayers, block_lists, check_layers, parse_layers

    double, single = parse_layers(double_layers), parse_layers(single_layers)
    family = model.family.name
    if family not in DIT_FAMILIES:
        raise ValueError(f"{node} is for diffusion transformers (SD3, Flux); {model.source} is {family.upper()}, "
                         "a UNet")
    if not double and not single:
        return None
    problem = check_layers(model.unet, double, single)
    if problem:
        raise ValueError(f"{node}: {problem.removeprefix('skip-layer guidance: ')}")
    if single and block_lists(model.unet)[1] is None:
        log.warning("%s: %s has no single-stream blocks; single_layers %s are ignored", node, model.source, single)
        single = ()
    return SkipLayers(double, single)


def skip_layer_guidance(model: DiffusionModel, node: str, double_layers: str, single_layers: str, scale: float,
                        start_percent: float, end_percent: float, rescaling_scale: float) -> DiffusionModel:
    """`model` with skip-layer guidance added to its post-guidance functions (the model as it was when no layer
    is named, as in ComfyUI)."""
    from ldm.skip_layers import SkipLayerGuidance

    skip = _skipped_layers(model, node, double_layers, single_layers)
    if skip is None:
        return model
    schedule = model.schedule
    patch = SkipLayerGuidance(skip, scale, schedule.sigma_at_percent(start_percent),
                              schedule.sigma_at_percent(end_percent), rescaling_scale)
    return replace(model, sampling_patches=model.sampling_patches.after(patch))


class _DiTPatch(Node):
    """What the nodes share: the MODEL linked must be a diffusion transformer, and the output is of its family."""

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return _family_problem(linked, cls.name)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}


class SkipLayerGuidanceDiT(_DiTPatch):
    """Generic version of SkipLayerGuidance node that can be used on every DiT model: guidance away from the
    positive prediction with the named double-stream (SD3: joint) and single-stream blocks skipped, over part of
    the schedule; one more model pass per step there."""

    category = "advanced/guidance"
    model = Socket("MODEL")
    double_layers = String("7, 8, 9", extra={"advanced": True})
    single_layers = String("7, 8, 9", extra={"advanced": True})
    scale = Float(3.0, min=0.0, max=10.0, step=0.1)
    start_percent = Float(0.01, min=0.0, max=1.0, step=0.001, extra={"advanced": True})
    end_percent = Float(0.15, min=0.0, max=1.0, step=0.001, extra={"advanced": True})
    rescaling_scale = Float(0.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, double_layers: str, single_layers: str, scale: float,
                start_percent: float, end_percent: float, rescaling_scale: float) -> tuple[DiffusionModel]:
        return (skip_layer_guidance(model, self.name, double_layers, single_layers, scale, start_percent,
                                    end_percent, rescaling_scale),)


class SkipLayerGuidanceSD3(_DiTPatch):
    """Skip-layer guidance as Stability AI made it for SD3.5: guidance away from the positive prediction with the
    named joint blocks skipped, over part of the schedule (7, 8, 9 suit SD3.5 medium)."""

    category = "advanced/guidance"
    model = Socket("MODEL")
    layers = String("7, 8, 9", extra={"advanced": True})
    scale = Float(3.0, min=0.0, max=10.0, step=0.1)
    start_percent = Float(0.01, min=0.0, max=1.0, step=0.001, extra={"advanced": True})
    end_percent = Float(0.15, min=0.0, max=1.0, step=0.001, extra={"advanced": True})
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, layers: str, scale: float, start_percent: float,
                end_percent: float) -> tuple[DiffusionModel]:
        return (skip_layer_guidance(model, self.name, layers, "", scale, start_percent, end_percent, 0.0),)


class SkipLayerGuidanceDiTSimple(_DiTPatch):
    """Simple version of the SkipLayerGuidanceDiT node that only modifies the uncond pass."""

    category = "advanced/guidance"
    model = Socket("MODEL")
    double_layers = String("7, 8, 9", extra={"advanced": True})
    single_layers = String("7, 8, 9", extra={"advanced": True})
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001, extra={"advanced": True})
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001, extra={"advanced": True})
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, double_layers: str, single_layers: str, start_percent: float,
                end_percent: float) -> tuple[DiffusionModel]:
        from ldm.skip_layers import SkipLayersOnNegative

        skip = _skipped_layers(model, self.name, double_layers, single_layers)
        if skip is None:
            return (model,)
        schedule = model.schedule
        # Replaces an earlier negative-side function, as ComfyUI's calc_cond_batch function replaces the last one.
        negative = SkipLayersOnNegative(skip, schedule.sigma_at_percent(start_percent),
                                        schedule.sigma_at_percent(end_percent))
        return (replace(model, sampling_patches=replace(model.sampling_patches, negative_by=negative)),)


NODES: list[Any] = [SkipLayerGuidanceDiT, SkipLayerGuidanceSD3, SkipLayerGuidanceDiTSimple]
