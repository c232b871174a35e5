"""Sampler nodes for the newer solvers, with ComfyUI's names and inputs: SamplerER_SDE, SamplerSASolver,
SamplerSEEDS2, SamplerEulerCFGpp and SamplerLCMUpscale. Each makes a SAMPLER for SamplerCustom and
SamplerCustomAdvanced."""

from __future__ import annotations

from typing import Any

import torch

from ldm.sampling.samplers_stochastic import ER_SDE_SOLVER_TYPES, er_sde_options, sa_solver_tau
from nodes.node import Node
from nodes.sd.custom_sampling import SamplerChoice
from nodes.sd.latent import upscale_latent
from nodes.sd.models import DiffusionModel
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket


class SamplerER_SDE(Node):  # noqa: N801 (ComfyUI's name)
    """ER-SDE-Solver (Cui et al. 2024): its own noise scaler, the reverse-time SDE, or the ODE (no noise), with
    up to three stages per step."""

    category = "sampling/samplers"
    solver_type = Combo(list(ER_SDE_SOLVER_TYPES))
    max_stage = Int(3, min=1, max=3)
    eta = Float(1.0, min=0.0, max=10.0, step=0.01, round=False,
                tooltip="stochastic strength (of either SDE); 0 runs the ODE")
    s_noise = Float(1.0, min=0.0, max=100.0, step=0.01, round=False)
    outputs = (Output("SAMPLER"),)

    def execute(self, solver_type: str, max_stage: int, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("er_sde", er_sde_options(solver_type, max_stage, eta, s_noise)),)


class SamplerSASolver(Node):
    """SA-Solver (Xue et al. 2023): stochastic Adams predictor and corrector, noisy between two points of the
    model's schedule."""

    category = "sampling/samplers"
    model = Socket("MODEL")
    eta = Float(1.0, min=0.0, max=10.0, step=0.01, round=False)
    sde_start_percent = Float(0.2, min=0.0, max=1.0, step=0.001)
    sde_end_percent = Float(0.8, min=0.0, max=1.0, step=0.001)
    s_noise = Float(1.0, min=0.0, max=100.0, step=0.01, round=False)
    predictor_order = Int(3, min=1, max=6)
    corrector_order = Int(4, min=0, max=6)
    use_pece = Boolean(False)
    simple_order_2 = Boolean(False)
    outputs = (Output("SAMPLER"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        start, end = inputs.get("sde_start_percent"), inputs.get("sde_end_percent")
        if isinstance(start, float) and isinstance(end, float) and start > end:
            return f"sde_start_percent ({start}) must not be after sde_end_percent ({end})"
        return None

    def execute(self, model: DiffusionModel, eta: float, sde_start_percent: float, sde_end_percent: float,
                s_noise: float, predictor_order: int, corrector_order: int, use_pece: bool,
                simple_order_2: bool) -> tuple[SamplerChoice]:
        if (problem := self.check_inputs({"sde_start_percent": sde_start_percent, "sde_end_percent": sde_end_percent})):
            raise ValueError(problem)
        schedule = model.schedule
        tau = sa_solver_tau(schedule.sigma_at_percent(sde_start_percent), schedule.sigma_at_percent(sde_end_percent),
                            eta)
        return (SamplerChoice("sa_solver", {"tau_func": tau, "s_noise": s_noise, "predictor_order": predictor_order,
                                            "corrector_order": corrector_order, "use_pece": use_pece,
                                            "simple_order_2": simple_order_2}),)


class SamplerSEEDS2(Node):
    """SEEDS-2 (Gonzalez et al. 2023): a two-stage exponential SDE solver; phi_2 with r 1 and eta 0 is ComfyUI's
    exp_heun_2_x0."""

    category = "sampling/samplers"
    solver_type = Combo(["phi_1", "phi_2"])
    eta = Float(1.0, min=0.0, max=100.0, step=0.01, round=False, tooltip="stochastic strength; 0 runs the ODE")
    s_noise = Float(1.0, min=0.0, max=100.0, step=0.01, round=False)
    r = Float(0.5, min=0.01, max=1.0, step=0.01, round=False, tooltip="where in the step the second stage is")
    outputs = (Output("SAMPLER"),)

    def execute(self, solver_type: str, eta: float, s_noise: float, r: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("seeds_2", {"solver_type": solver_type, "eta": eta, "s_noise": s_noise, "r": r}),)


class SamplerEulerCFGpp(Node):
    """Euler with CFG++ (Chung et al. 2024), for cfg about 1 to 2: the paper's steps ("regular", the euler_cfg_pp
    sampler) or ComfyUI's alternative form."""

    display_name = "SamplerEulerCFG++"
    category = "_for_testing"
    version = Combo(["regular", "alternative"])
    outputs = (Output("SAMPLER"),)

    def execute(self, version: str) -> tuple[SamplerChoice]:
        return (SamplerChoice("euler_cfg_pp", {"alternative": True} if version == "alternative" else {}),)


class SamplerLCMUpscale(Node):
    """LCM sampling that upscales the latent between its first steps, so the run ends scale_ratio times larger
    (scale_steps -1: the ratio is spread over the first half of the steps)."""

    category = "sampling/samplers"
    scale_ratio = Float(1.0, min=0.1, max=20.0, step=0.01)
    scale_steps = Int(-1, min=-1, max=1000, step=1)
    upscale_method = Combo(["bislerp", "nearest-exact", "bilinear", "area", "bicubic"])
    outputs = (Output("SAMPLER"),)

    def execute(self, scale_ratio: float, scale_steps: int, upscale_method: str) -> tuple[SamplerChoice]:
        def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
            return upscale_latent(x, width, height, upscale_method, "disabled")

        return (SamplerChoice("lcm_upscale", {"total_upscale": scale_ratio, "resize": resize,
                                              "upscale_steps": None if scale_steps < 0 else scale_steps}),)


NODES: list[Any] = [SamplerER_SDE, SamplerSASolver, SamplerSEEDS2, SamplerEulerCFGpp, SamplerLCMUpscale]
