"""ComfyUI's newer guidance patch nodes: TemporalScoreRescaling (nodes_eps.py), TangentialAmplifyingGuidance
(nodes_tag.py) and FreSca (nodes_fresca.py). Each returns a new MODEL (the given one, which the cache may hold, is left
as it was); the math is in `ldm.sampling.extra_guidance`."""

from __future__ import annotations

from typing import Any

from ldm.sampling import extra_guidance as guidance
from nodes.node import Node
from nodes.sd.guidance_nodes import _with_post_cfg, _with_pre_cfg
from nodes.sd.models import DiffusionModel
from nodes.spec import Float, Int, Output, Socket


class TemporalScoreRescaling(Node):
    """[Post-CFG Function]
    TSR - Temporal Score Rescaling (2510.01184)

    Rescaling the model's score or noise to steer the sampling diversity."""

    display_name = "TSR - Temporal Score Rescaling"
    category = "model/patch/unet"
    model = Socket("MODEL")
    tsr_k = Float(0.95, min=0.01, max=100.0, step=0.001, extra={"display": "number", "advanced": True},
                  tooltip="Controls the rescaling strength.\nLower k produces more detailed results; higher k "
                          "produces smoother results in image generation. Setting k = 1 disables rescaling.")
    tsr_sigma = Float(1.0, min=0.01, max=100.0, step=0.001, extra={"display": "number", "advanced": True},
                      tooltip="Controls how early rescaling takes effect.\nLarger values take effect earlier.")
    outputs = (Output("MODEL", "patched_model"),)

    def execute(self, model: DiffusionModel, tsr_k: float, tsr_sigma: float) -> tuple[DiffusionModel]:
        return _with_post_cfg(model, guidance.TemporalScoreRescaling(tsr_k, tsr_sigma, model.prediction == "flow"))


class TangentialAmplifyingGuidance(Node):
    """Tangential Amplifying Guidance (arXiv 2510.04533): the step from the latent to the guided prediction, its part
    across the latent's direction scaled by t_scale and its part along it by r_scale, over part of the run."""

    display_name = "Tangential Amplifying Guidance"
    category = "experimental"
    model = Socket("MODEL")
    t_scale = Float(1.05, min=0.0, max=10.0, step=0.001, tooltip="scale for the tangential (orthogonal) component")
    r_scale = Float(1.0, min=0.0, max=10.0, step=0.001, tooltip="scale for the radial (parallel) component")
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.01, extra={"advanced": True})
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.01, extra={"advanced": True})
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, t_scale: float, r_scale: float, start_percent: float,
                end_percent: float) -> tuple[DiffusionModel]:
        schedule = model.schedule
        return _with_post_cfg(model, guidance.TangentialAmplifyingGuidance(
            t_scale, r_scale, schedule.sigma_at_percent(start_percent), schedule.sigma_at_percent(end_percent)))


class FreSca(Node):
    """Applies frequency-dependent scaling to the guidance"""

    display_name = "FreSca"
    category = "_for_testing"
    model = Socket("MODEL")
    scale_low = Float(1.0, min=0, max=10, step=0.01, tooltip="Scaling factor for low-frequency components")
    scale_high = Float(1.25, min=0, max=10, step=0.01, tooltip="Scaling factor for high-frequency components")
    freq_cutoff = Int(20, min=1, max=10000, step=1,
                      tooltip="Number of frequency indices around center to consider as low-frequency")
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, scale_low: float, scale_high: float,
                freq_cutoff: int) -> tuple[DiffusionModel]:
        return _with_pre_cfg(model, guidance.FreSca(scale_low, scale_high, freq_cutoff))


NODES: list[Any] = [TemporalScoreRescaling, TangentialAmplifyingGuidance, FreSca]
