"""ComfyUI's custom sampling nodes: the parts of a KSampler as values of their own, wired together.

SIGMAS is a 1-D float tensor of noise levels, high to low (usually ending in 0); SAMPLER a sampler name
with its options; NOISE the initial noise (a seed, or none); GUIDER a model with its prompts and cfg.
SamplerCustom and SamplerCustomAdvanced run them through the same sampling code as the KSampler, and
also return the last step's denoised prediction.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ldm.sampling import SAMPLER_NAMES, SCHEDULER_NAMES, compute_sigmas
from ldm.sampling.guidance import DualCfg
from ldm.sampling.schedulers import append_zero, sigmas_beta, sigmas_exponential, sigmas_karras
from nodes.node import Node
from nodes.sd.models import DiffusionModel
from nodes.sd.sampling import run_sampler
from nodes.spec import INT_MAX, Boolean, Combo, Float, Int, Output, Socket, String

# SD's schedule: the defaults of the schedulers that take their range as numbers.
SIGMA_MAX, SIGMA_MIN = 14.614642, 0.0291675


@dataclass(frozen=True)
class SamplerChoice:
    """A SAMPLER: one of the KSampler's samplers, with options for it (eta, s_noise, r, order, ...)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoiseSource:
    """A NOISE: the seeded Gaussian noise added to the latent before sampling, or none (`enabled` False).
    The seed also seeds the step noise of ancestral and SDE samplers, as in ComfyUI (0 without noise)."""

    seed: int
    enabled: bool = True


@dataclass(frozen=True)
class Guider:
    """A GUIDER: what the sampler calls for each prediction, a model with its prompts and cfg."""

    model: DiffusionModel
    positive: list
    negative: list
    cfg: float
    dual: DualCfg | None = None  # DualCFGGuider's second positive prompt
    negative_model: DiffusionModel | None = None  # DualModelGuider's: the model that predicts the negative prompt


def _sigmas_out(sigmas: torch.Tensor) -> tuple[torch.Tensor]:
    return (sigmas.detach().to("cpu", torch.float32),)


# Schedulers -----------------------------------------------------------------------------------------------------

def _sigma_range(default: float) -> Any:
    return Float(default, min=0.0, max=5000.0, step=0.01, round=False)


class BasicScheduler(Node):
    """The sigmas of one of the KSampler's schedulers for a model; denoise below 1 keeps the low end."""

    category = "sampling/schedulers"
    model = Socket("MODEL")
    scheduler = Combo(SCHEDULER_NAMES)
    steps = Int(20, min=1, max=10000)
    denoise = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("SIGMAS"),)

    def execute(self, model: DiffusionModel, scheduler: str, steps: int, denoise: float) -> tuple[torch.Tensor]:
        return _sigmas_out(compute_sigmas(model.schedule, scheduler, steps, denoise))


class KarrasScheduler(Node):
    """Karras et al.'s schedule between two noise levels."""

    category = "sampling/schedulers"
    steps = Int(20, min=1, max=10000)
    sigma_max = _sigma_range(SIGMA_MAX)
    sigma_min = _sigma_range(SIGMA_MIN)
    rho = Float(7.0, min=0.0, max=100.0, step=0.01, round=False)
    outputs = (Output("SIGMAS"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        rho, low, high = inputs.get("rho"), inputs.get("sigma_min"), inputs.get("sigma_max")
        if isinstance(rho, (int, float)) and rho <= 0:
            return f"rho must be above 0 (got {rho})"
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not 0 <= low < high:
            return f"sigma_min ({low}) must be below sigma_max ({high})"
        return None

    def execute(self, steps: int, sigma_max: float, sigma_min: float, rho: float) -> tuple[torch.Tensor]:
        sigmas = sigmas_karras(steps, sigma_min, sigma_max, rho)
        doubled = len(sigmas) > 2 and sigmas[-2] == 0  # a ramp down to 0 ends there, without a second 0
        return _sigmas_out(sigmas[:-1] if doubled else sigmas)


class ExponentialScheduler(Node):
    """Noise levels evenly spaced in log-sigma."""

    category = "sampling/schedulers"
    steps = Int(20, min=1, max=10000)
    sigma_max = _sigma_range(SIGMA_MAX)
    sigma_min = _sigma_range(SIGMA_MIN)
    outputs = (Output("SIGMAS"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        return _check_range(inputs)

    def execute(self, steps: int, sigma_max: float, sigma_min: float) -> tuple[torch.Tensor]:
        return _sigmas_out(sigmas_exponential(steps, sigma_min, sigma_max))


class PolyexponentialScheduler(Node):
    """Log-sigma spaced by a power of the step ramp (k-diffusion's polyexponential; rho 1 is exponential)."""

    category = "sampling/schedulers"
    steps = Int(20, min=1, max=10000)
    sigma_max = _sigma_range(SIGMA_MAX)
    sigma_min = _sigma_range(SIGMA_MIN)
    rho = Float(1.0, min=0.0, max=100.0, step=0.01, round=False)
    outputs = (Output("SIGMAS"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        return _check_range(inputs)

    def execute(self, steps: int, sigma_max: float, sigma_min: float, rho: float) -> tuple[torch.Tensor]:
        ramp = torch.linspace(1, 0, steps) ** rho
        log_min, log_max = math.log(sigma_min), math.log(sigma_max)
        return _sigmas_out(append_zero((ramp * (log_max - log_min) + log_min).exp()))


def _check_range(inputs: dict) -> str | None:
    """Log-spaced schedules need two positive levels, the first the higher."""
    for name in ("sigma_max", "sigma_min"):
        value = inputs.get(name)
        if isinstance(value, (int, float)) and value <= 0:
            return f"{name} must be above 0 (got {value}): the levels are spaced in log-sigma"
    low, high = inputs.get("sigma_min"), inputs.get("sigma_max")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and low >= high:
        return f"sigma_min ({low}) must be below sigma_max ({high})"
    return None


class SDTurboScheduler(Node):
    """SD-Turbo's and SDXL-Turbo's few-step schedule: timesteps 999, 899, ... (1 to 10 steps)."""

    category = "sampling/schedulers"
    model = Socket("MODEL")
    steps = Int(1, min=1, max=10)
    denoise = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("SIGMAS"),)

    def execute(self, model: DiffusionModel, steps: int, denoise: float) -> tuple[torch.Tensor]:
        start = 10 - int(10 * denoise)
        timesteps = (torch.arange(10, 0, -1) * 100 - 1)[start:start + steps]
        return _sigmas_out(append_zero(model.schedule.sigmas[timesteps]))


class BetaSamplingScheduler(Node):
    """Timesteps at the quantiles of a Beta(alpha, beta) distribution (the `beta` scheduler, with its shape)."""

    category = "sampling/schedulers"
    model = Socket("MODEL")
    steps = Int(20, min=1, max=10000)
    alpha = Float(0.6, min=0.0, max=50.0, step=0.01, round=False)
    beta = Float(0.6, min=0.0, max=50.0, step=0.01, round=False)
    outputs = (Output("SIGMAS"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        bad = [k for k in ("alpha", "beta") if isinstance(inputs.get(k), (int, float)) and inputs[k] <= 0]
        return f"{' and '.join(bad)} must be above 0" if bad else None

    def execute(self, model: DiffusionModel, steps: int, alpha: float, beta: float) -> tuple[torch.Tensor]:
        return _sigmas_out(sigmas_beta(model.schedule, steps, alpha, beta))


# Sigma tools ----------------------------------------------------------------------------------------------------

class SplitSigmas(Node):
    """Splits a schedule at a step: the high part ends where the low part starts (for two samplers)."""

    category = "sampling/sigmas"
    sigmas = Socket("SIGMAS")
    step = Int(0, min=0, max=10000)
    outputs = (Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas"))

    def execute(self, sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sigmas[:step + 1], sigmas[step:]


class SplitSigmasDenoise(Node):
    """Splits a schedule so that the low part holds `denoise` of its steps, for a second stage of that
    strength. When that rounds to no step (denoise 0, or below half a step), the high part is the whole
    schedule and the low part its last level; ComfyUI's high part would be empty, skipping the first stage."""

    category = "sampling/sigmas"
    sigmas = Socket("SIGMAS")
    denoise = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas"))

    def execute(self, sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
        low_steps = round(max(sigmas.shape[-1] - 1, 0) * denoise)
        return sigmas[:len(sigmas) - low_steps], sigmas[-(low_steps + 1):]


class FlipSigmas(Node):
    """Reverses a schedule (low to high, for unsampling an image back to noise); a first 0 becomes 0.0001."""

    category = "sampling/sigmas"
    sigmas = Socket("SIGMAS")
    outputs = (Output("SIGMAS"),)

    def execute(self, sigmas: torch.Tensor) -> tuple[torch.Tensor]:
        flipped = sigmas.flip(0)
        if len(flipped) and flipped[0] == 0:
            flipped[0] = 0.0001
        return (flipped,)


class SetFirstSigma(Node):
    """Replaces the first noise level of a schedule."""

    category = "sampling/sigmas"
    sigmas = Socket("SIGMAS")
    sigma = Float(136.0, min=0.0, max=20000.0, step=0.001, round=False)
    outputs = (Output("SIGMAS"),)

    def execute(self, sigmas: torch.Tensor, sigma: float) -> tuple[torch.Tensor]:
        if not len(sigmas):
            raise ValueError("the schedule is empty: there is no first sigma to set")
        sigmas = sigmas.clone()
        sigmas[0] = sigma
        return (sigmas,)


class ManualSigmas(Node):
    """A schedule typed as numbers ("14.6, 7, 3.5, 1, 0")."""

    category = "sampling/custom_sampling"
    sigmas = String("1, 0.5")
    outputs = (Output("SIGMAS"),)

    def execute(self, sigmas: str) -> tuple[torch.Tensor]:
        numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", sigmas)
        if not numbers:
            raise ValueError(f"no numbers in the sigmas {sigmas!r}: write them like '14.6, 7, 1, 0'")
        return (torch.tensor([float(n) for n in numbers], dtype=torch.float32),)


# Samplers -------------------------------------------------------------------------------------------------------

class KSamplerSelect(Node):
    """One of the KSampler's samplers, by name, with its default options."""

    category = "sampling/samplers"
    sampler_name = Combo(SAMPLER_NAMES)
    outputs = (Output("SAMPLER"),)

    def execute(self, sampler_name: str) -> tuple[SamplerChoice]:
        return (SamplerChoice(sampler_name),)


def _eta() -> Any:
    return Float(1.0, min=0.0, max=100.0, step=0.01, round=False)


# ComfyUI's "gpu" noise device draws the Brownian tree on the GPU, its "cpu" one on the CPU. Here the tree is
# always drawn on the CPU from the seed, so that a seed gives the same image on any device: both are accepted.
NOISE_DEVICES = ["gpu", "cpu"]


class SamplerEulerAncestral(Node):
    """Euler ancestral with its noise amount (eta) and noise scale (s_noise)."""

    category = "sampling/samplers"
    eta = _eta()
    s_noise = _eta()
    outputs = (Output("SAMPLER"),)

    def execute(self, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("euler_ancestral", {"eta": eta, "s_noise": s_noise}),)


class SamplerEulerAncestralCFGPP(Node):
    """Euler ancestral with CFG++'s re-noising (Chung et al. 2024), for cfg about 1 to 2."""

    display_name = "SamplerEulerAncestralCFG++"
    category = "sampling/samplers"
    eta = Float(1.0, min=0.0, max=1.0, step=0.01, round=False)
    s_noise = Float(1.0, min=0.0, max=10.0, step=0.01, round=False)
    outputs = (Output("SAMPLER"),)

    def execute(self, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("euler_ancestral_cfg_pp", {"eta": eta, "s_noise": s_noise}),)


class DualCFGGuider(Node):
    """Guidance with two positive prompts: cond2 against the negative at cfg_cond2_negative, then cond1 against
    cond2 at cfg_conds (added on top, or nested inside the first)."""

    category = "sampling/guiders"
    model = Socket("MODEL")
    cond1 = Socket("CONDITIONING")
    cond2 = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    cfg_conds = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    cfg_cond2_negative = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    style = Combo(["regular", "nested"])
    outputs = (Output("GUIDER"),)

    def execute(self, model: DiffusionModel, cond1: list, cond2: list, negative: list, cfg_conds: float,
                cfg_cond2_negative: float, style: str) -> tuple[Guider]:
        return (Guider(model, cond1, negative, cfg_conds, DualCfg(cond2, cfg_cond2_negative, style == "nested")),)


class SamplerDPMPP_2S_Ancestral(Node):  # noqa: N801 (ComfyUI's name)
    """DPM-Solver++(2S) ancestral with eta and s_noise."""

    category = "sampling/samplers"
    eta = _eta()
    s_noise = _eta()
    outputs = (Output("SAMPLER"),)

    def execute(self, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("dpmpp_2s_ancestral", {"eta": eta, "s_noise": s_noise}),)


class SamplerDPMPP_SDE(Node):  # noqa: N801
    """DPM-Solver++ SDE with eta, s_noise and the midpoint ratio r."""

    category = "sampling/samplers"
    eta = _eta()
    s_noise = _eta()
    r = Float(0.5, min=0.0, max=100.0, step=0.01, round=False)
    noise_device = Combo(NOISE_DEVICES)
    outputs = (Output("SAMPLER"),)

    def execute(self, eta: float, s_noise: float, r: float, noise_device: str) -> tuple[SamplerChoice]:
        return (SamplerChoice("dpmpp_sde", {"eta": eta, "s_noise": s_noise, "r": r}),)


class SamplerDPMPP_2M_SDE(Node):  # noqa: N801
    """DPM-Solver++(2M) SDE with its solver type, eta and s_noise."""

    category = "sampling/samplers"
    solver_type = Combo(["midpoint", "heun"])
    eta = _eta()
    s_noise = _eta()
    noise_device = Combo(NOISE_DEVICES)
    outputs = (Output("SAMPLER"),)

    def execute(self, solver_type: str, eta: float, s_noise: float, noise_device: str) -> tuple[SamplerChoice]:
        return (SamplerChoice("dpmpp_2m_sde", {"eta": eta, "s_noise": s_noise, "solver_type": solver_type}),)


class SamplerDPMPP_3M_SDE(Node):  # noqa: N801
    """DPM-Solver++(3M) SDE with eta and s_noise."""

    category = "sampling/samplers"
    eta = _eta()
    s_noise = _eta()
    noise_device = Combo(NOISE_DEVICES)
    outputs = (Output("SAMPLER"),)

    def execute(self, eta: float, s_noise: float, noise_device: str) -> tuple[SamplerChoice]:
        return (SamplerChoice("dpmpp_3m_sde", {"eta": eta, "s_noise": s_noise}),)


class SamplerLMS(Node):
    """Linear multistep with its order."""

    category = "sampling/samplers"
    order = Int(4, min=1, max=100)
    outputs = (Output("SAMPLER"),)

    def execute(self, order: int) -> tuple[SamplerChoice]:
        return (SamplerChoice("lms", {"order": order}),)


class SamplerDPMAdaptative(Node):
    """Adaptive-step DPM-Solver with its error controller's settings (ComfyUI's spelling of the name)."""

    category = "sampling/samplers"
    order = Int(3, min=2, max=3)
    rtol = Float(0.05, min=0.0, max=100.0, step=0.01, round=False)
    atol = Float(0.0078, min=0.0, max=100.0, step=0.01, round=False)
    h_init = Float(0.05, min=0.0, max=100.0, step=0.01, round=False)
    pcoeff = Float(0.0, min=0.0, max=100.0, step=0.01, round=False)
    icoeff = Float(1.0, min=0.0, max=100.0, step=0.01, round=False)
    dcoeff = Float(0.0, min=0.0, max=100.0, step=0.01, round=False)
    accept_safety = Float(0.81, min=0.0, max=100.0, step=0.01, round=False)
    eta = Float(0.0, min=0.0, max=100.0, step=0.01, round=False)
    s_noise = _eta()
    outputs = (Output("SAMPLER"),)

    def execute(self, **options: Any) -> tuple[SamplerChoice]:
        return (SamplerChoice("dpm_adaptive", options),)


# Noise and guiders ----------------------------------------------------------------------------------------------

class RandomNoise(Node):
    """Seeded Gaussian noise, drawn on the CPU so that a seed gives the same image on any device."""

    category = "sampling/noise"
    noise_seed = Int(0, min=0, max=INT_MAX, control_after_generate=True)
    outputs = (Output("NOISE"),)

    def execute(self, noise_seed: int) -> tuple[NoiseSource]:
        return (NoiseSource(noise_seed),)


class DisableNoise(Node):
    """No initial noise: for a second stage that continues from a latent that still holds its noise."""

    category = "sampling/noise"
    outputs = (Output("NOISE"),)

    def execute(self) -> tuple[NoiseSource]:
        return (NoiseSource(0, enabled=False),)


class CFGGuider(Node):
    """Classifier-free guidance: uncond + cfg * (cond - uncond)."""

    display_name = "CFG Guider"
    category = "sampling/guiders"
    model = Socket("MODEL")
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    cfg = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    outputs = (Output("GUIDER"),)

    def execute(self, model: DiffusionModel, positive: list, negative: list, cfg: float) -> tuple[Guider]:
        return (Guider(model, positive, negative, cfg),)


class BasicGuider(Node):
    """The model's prediction for one conditioning, without guidance (for distilled models)."""

    display_name = "Basic Guider"
    category = "sampling/guiders"
    model = Socket("MODEL")
    conditioning = Socket("CONDITIONING")
    outputs = (Output("GUIDER"),)

    def execute(self, model: DiffusionModel, conditioning: list) -> tuple[Guider]:
        return (Guider(model, conditioning, [], 1.0),)


class DualModelGuider(Node):
    """Classifier-free guidance with the positive prompt predicted by `model` and the negative by `model_negative`
    (ComfyUI's Guider_DualModel; e.g. a distilled model's positive against its base model's negative). Without
    `model_negative` it is the CFG Guider. The two models must be of one family and prediction type (and, unless
    they are flow models, one noise schedule): the negative prompt is prepared once, for the first."""

    display_name = "Dual Model CFG Guider"
    category = "model/sampling/guiders"
    model = Socket("MODEL", tooltip="Model used for the positive (conditional) pass.")
    model_negative = Socket("MODEL", optional=True,
                            tooltip="Model used for the negative (unconditional) pass. Use the same model for "
                                    "ordinary CFG.")
    positive = Socket("CONDITIONING")
    cfg = Float(4.0, min=0.0, max=100.0, step=0.1, round=0.01)
    negative = Socket("CONDITIONING", optional=True,
                      tooltip="Negative conditioning run on the negative model. Leave unconnected for a text-free "
                              "(image-only) unconditional pass.")
    outputs = (Output("GUIDER"),)

    def execute(self, model: DiffusionModel, positive: list, cfg: float, model_negative: DiffusionModel | None = None,
                negative: list | None = None) -> tuple[Guider]:
        if negative is None:
            if not math.isclose(cfg, 1.0):
                # ComfyUI runs the negative pass with no text at all; Loom's models always take a prompt.
                raise ValueError(f"DualModelGuider: a text-free negative pass (no negative connected) is not "
                                 f"supported at cfg {cfg}; connect a negative prompt (e.g. an empty one), or set "
                                 "cfg to 1")
            negative = []
        if model_negative is None:
            return (Guider(model, positive, negative, cfg),)
        problem = _pair_problem(model, model_negative)
        if problem:
            raise ValueError(f"DualModelGuider: {problem}")
        return (Guider(model, positive, negative, cfg, negative_model=model_negative),)


def _pair_problem(model: DiffusionModel, other: DiffusionModel) -> str | None:
    """Why `other` cannot predict the negative prompt prepared for `model`; None when it can."""
    if other.family.name != model.family.name:
        return (f"model_negative ({other.source}) is {other.family.name.upper()} and model ({model.source}) is "
                f"{model.family.name.upper()}; both must be of one family")
    if other.prediction != model.prediction:
        return (f"model_negative predicts {other.prediction} and model {model.prediction}: give both the same "
                "ModelSampling")
    same = type(other.schedule) is type(model.schedule) and all(
        math.isclose(other.schedule.sigma_at_percent(p), model.schedule.sigma_at_percent(p), rel_tol=1e-5)
        for p in (0.1, 0.5, 0.9))
    if model.prediction != "flow" and not same:
        return "model_negative has another noise schedule than model: give both the same ModelSampling"
    return None


def _run_modules(model: DiffusionModel, *conditionings: list) -> tuple[torch.nn.Module, ...]:
    """The modules a sampling run of `model` over these prompts keeps on the device together (as `run_sampler`
    places them): the UNet, the prompts' ControlNets (a Control-LoRA's made from the UNet) and GLIGEN models."""
    from ldm.control_lora import ControlLora
    from nodes.sd.sampling import _controls

    controls = {id(c.model): c.model.controlnet(model.unet) if isinstance(c.model, ControlLora) else c.model
                for c in _controls(*conditionings)}
    gligens = {id(opts["gligen"][1]): opts["gligen"][1] for conditioning in conditionings
               for _, opts in conditioning if opts.get("gligen") is not None}
    return (model.unet, *controls.values(), *gligens.values())


def _with_negative_model(node: Node, model: DiffusionModel, negative_model: DiffusionModel, cfg: float,
                         conditionings: tuple[list, ...] = ()) -> DiffusionModel:
    """`model` whose sampling predicts the negative prompt by `negative_model`'s UNet (and by the model's own
    negative-side function, if it has one, applied to that UNet); at cfg 1 no negative is predicted, and the
    negative model is not loaded, as in ComfyUI. Placing it keeps on the device what a run over `conditionings`
    keeps (`_run_modules`: the UNet, the ControlNets and GLIGEN models)."""
    from ldm.sampling.extra_guidance import NegativeOnModel
    from nodes.sd.models import on_device

    if math.isclose(cfg, 1.0):
        return model
    # On the device before sampling (outside its inference mode), and again when a run first needs it, in case the
    # sampled model's ControlNets took its place since; neither placement offloads what the run keeps.
    place = functools.partial(on_device, node.ctx, negative_model.unet, keep=_run_modules(model, *conditionings))
    place()
    patches = model.sampling_patches
    return replace(model, sampling_patches=replace(patches, negative_by=NegativeOnModel(place, patches.negative_by)))


class CFGOverride(Node):
    """Override cfg to a fixed value over a [start, end] percent (sigma) range. With multiple overrides, the one
    nearest the sampler wins on overlap."""

    display_name = "CFG Override"
    category = "model/sampling/guiders"
    model = Socket("MODEL")
    cfg = Float(1.0, min=0.0, max=100.0, step=0.1, round=0.01)
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, cfg: float, start_percent: float,
                end_percent: float) -> tuple[DiffusionModel]:
        from ldm.sampling.extra_guidance import CfgOverride

        schedule = model.schedule
        override = CfgOverride(cfg, schedule.sigma_at_percent(start_percent), schedule.sigma_at_percent(end_percent))
        return (replace(model, sampling_patches=model.sampling_patches.around(override)),)


# The samplers ---------------------------------------------------------------------------------------------------

def _run(node: Node, guider: Guider, noise: NoiseSource, sampler: SamplerChoice, sigmas: torch.Tensor,
         latent: dict) -> tuple[dict, dict]:
    model = guider.model
    if guider.negative_model is not None:
        prompts = (guider.positive, guider.negative, *([guider.dual.middle] if guider.dual else []))
        model = _with_negative_model(node, model, guider.negative_model, guider.cfg, prompts)
    return run_sampler(node, model, latent, guider.positive, guider.negative, seed=noise.seed,
                       cfg=guider.cfg, sampler_name=sampler.name, sampler_options=sampler.options, sigmas=sigmas,
                       add_noise=noise.enabled, dual=guider.dual)


class SamplerCustom(Node):
    """Samples with a SAMPLER over given SIGMAS; also returns the last step's denoised prediction."""

    category = "sampling/custom_sampling"
    model = Socket("MODEL")
    add_noise = Boolean(True)
    noise_seed = Int(0, min=0, max=INT_MAX, control_after_generate=True)
    cfg = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    sampler = Socket("SAMPLER")
    sigmas = Socket("SIGMAS")
    latent_image = Socket("LATENT")
    outputs = (Output("LATENT", "output"), Output("LATENT", "denoised_output"))

    def execute(self, model: DiffusionModel, add_noise: bool, noise_seed: int, cfg: float, positive: list,
                negative: list, sampler: SamplerChoice, sigmas: torch.Tensor, latent_image: dict) -> tuple[dict, dict]:
        return _run(self, Guider(model, positive, negative, cfg), NoiseSource(noise_seed, add_noise), sampler, sigmas,
                    latent_image)


class SamplerCustomAdvanced(Node):
    """Samples with a NOISE, a GUIDER, a SAMPLER and SIGMAS; also returns the last step's denoised prediction."""

    category = "sampling/custom_sampling"
    noise = Socket("NOISE")
    guider = Socket("GUIDER")
    sampler = Socket("SAMPLER")
    sigmas = Socket("SIGMAS")
    latent_image = Socket("LATENT")
    outputs = (Output("LATENT", "output"), Output("LATENT", "denoised_output"))

    def execute(self, noise: NoiseSource, guider: Guider, sampler: SamplerChoice, sigmas: torch.Tensor,
                latent_image: dict) -> tuple[dict, dict]:
        return _run(self, guider, noise, sampler, sigmas, latent_image)


NODES: list[Any] = [
    SamplerCustom, BasicScheduler, KarrasScheduler, ExponentialScheduler, PolyexponentialScheduler,
    BetaSamplingScheduler, SDTurboScheduler, KSamplerSelect, SamplerEulerAncestral, SamplerLMS,
    SamplerDPMPP_3M_SDE, SamplerDPMPP_2M_SDE, SamplerDPMPP_SDE, SamplerDPMPP_2S_Ancestral, SamplerDPMAdaptative,
    SplitSigmas, SplitSigmasDenoise, FlipSigmas, SetFirstSigma, CFGGuider, BasicGuider, RandomNoise, DisableNoise,
    SamplerCustomAdvanced, ManualSigmas, SamplerEulerAncestralCFGPP, DualCFGGuider, CFGOverride, DualModelGuider,
]
