"""EasyCache (ComfyUI's comfy_extras/nodes_easycache.py, node "EasyCache"; after Zhou et al. 2025, "Less is Enough:
Training-Free Video Diffusion Acceleration via Runtime-Adaptive Caching"): model calls are skipped while the model's
output is expected to change little, and the skipped calls return their input plus the output-minus-input difference
of the call last computed.

The MODEL's UNet becomes a shallow copy (weights shared, `ldm.lora.shallow_copy`) whose class adds the cache to
its `forward(x, timesteps, context, ...)`, so LoRAs, hooks and patched copies made from it keep the cache. The
arithmetic is ComfyUI's `easycache_forward_wrapper` / `EasyCacheHolder`, on the model's input `x[:, :C]` (the scaled
latent, without an inpainting or image-to-video model's extra channels; C is the model's output channels) and its raw
output `out[:, :C]`, for one model call:

- Levels: `start_t` and `end_t` are the levels `start_percent` and `end_percent` of the way through sampling
  (ComfyUI's percent_to_sigma, Loom's `sigma_at_percent`), as the model's timestep input. A call at or below `end_t`
  runs and changes nothing. Above it, every call's `out - x` is kept per prompt batch ("cache diff"; ComfyUI keys
  it per cond uuid, Loom per call's `context`, the same while the calls' batches stay the same). The rest happens
  only at or below `start_t`.
- Tracking: ComfyUI tracks one prompt, the first uuid of the first call at or below `start_t`: the negative
  prompt when there is one (its calc_cond_batch runs the negative first, batched or alone), the positive at cfg 1;
  that call decides for the model evaluation, whose later calls follow. Loom's guider runs the positive first (the
  negative last in a batched call), so here the first call in the window leads (decides at each evaluation) and the
  tracked prompt is the last prompt (last run of rows with the same context) of the last call the lead's module makes
  in that first evaluation: the negative, as in ComfyUI, and the same decisions, every prompt's rows holding the same
  latent. The tracked rows, every 8th row and column of the last two dimensions, give `x_prev` and `out_prev`;
  `norm = mean|out|` is over the tracked call's whole output (all its prompts).
- At the lead's call: `input_change = mean|x - x_prev|` (subsampled); once a rate `k` is known (from the tracked
  prompt's second computed call on), `cumulative += k * input_change / norm`, and while `cumulative <
  reuse_threshold` and the call has a cache diff, it is skipped (`x + diff`, nothing else updated: later input
  changes stay measured from the last computed call) and so are the evaluation's other calls that have one;
  otherwise `cumulative = 0` and the model runs. After a computed tracked call, `k = mean|out - out_prev| /
  input_change` (when there was an input change), then `x_prev`, `out_prev` and `norm` are replaced. So the first
  two evaluations in the window always run, and at reuse_threshold 0 nothing is skipped.
- Resets: every sampling run starts afresh (ComfyUI's OUTER_SAMPLE wrapper clones the holder; here each run's
  state is its own, kept in the run, `ldm.sampling.run`). A change of the input's shape (past the batch), dtype or
  device within the window clears the state as ComfyUI's `reset` does, which leaves `k` at 0 rather than unknown: the
  second tracked call after it is then skipped whatever the threshold above 0 (ComfyUI's behaviour, kept).

Logged (logger `nodes.sd.easycache`) as ComfyUI does: the settings at each run's start, the steps skipped at its last
level; with `verbose`, each decision. Other modules' calls (Perturbed-Attention and Self-Attention Guidance's patched
copies, hooked prompts' copies) have cache diffs of their own and follow the decisions, never lead nor are tracked.

Not as ComfyUI: the levels come from the MODEL's schedule when EasyCache is applied (ComfyUI reads the sampled model's
at each run), so a ModelSampling node after it that changes a flow model's shift moves the window (Comfy-Org's
HunyuanVideo 1.5 templates put ModelSamplingSD3 after it with the model's own shift, 7: no change).

LazyCache (ComfyUI's node of the same file) is the same rule one level up, on each model evaluation's guided
prediction (ComfyUI's PREDICT_NOISE wrapper; Loom's `SamplingPatches.around_guidance`): the sampler's latent `x` and
the guided x0 in place of a model call's input and output, one cache for all prompts, no tracked prompt, its levels
the sampler's sigmas. So it works with any model and guidance; a skipped evaluation costs no model call at all.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ldm.lora import shallow_copy
from ldm.sampling.denoiser import first_level
from ldm.sampling.run import current_run
from nodes.node import Node
from nodes.sd.models import DiffusionModel
from nodes.spec import Boolean, Float, Output, Socket

log = logging.getLogger(__name__)

SUBSAMPLE = 8  # ComfyUI's subsample_factor
MAX_PROMPT_BATCHES = 16  # cache diffs kept per run, by call `context` (a guard should contexts be remade per call)


def model_timestep(schedule: Any, sigma: float) -> float:
    """The model's timestep input at level `sigma`."""
    return float(schedule.unet_timestep(schedule.sigma_to_t_scalar(sigma)))


def percent_timestep(schedule: Any, percent: float) -> float:
    """The model's timestep input at `percent` of the way through sampling: inf from the start, -inf at the end
    (ComfyUI's percent_to_sigma gives a level above any and 0, which no call is at)."""
    sigma = schedule.sigma_at_percent(percent)
    if math.isinf(sigma):
        return math.inf
    return -math.inf if sigma <= 0.0 else model_timestep(schedule, sigma)


def _subsample(x: Tensor) -> Tensor:
    return x[..., ::SUBSAMPLE, ::SUBSAMPLE]


def _mean_abs(x: Tensor) -> Tensor:
    return x.flatten().abs().mean()


def last_prompt_rows(context: Tensor) -> slice:
    """The rows of the last run of equal `context` rows: the last prompt's rows of a batched call."""
    start = context.shape[0] - 1
    while start > 0 and torch.equal(context[start - 1], context[start]):
        start -= 1
    return slice(start, context.shape[0])


class EasyCacheState:
    """One sampling run's cache (ComfyUI's EasyCacheHolder); `start_t` and `end_t` are model timesteps."""

    def __init__(self, reuse_threshold: float, start_t: float, end_t: float, verbose: bool = False) -> None:
        self.reuse_threshold = reuse_threshold
        self.start_t = start_t
        self.end_t = end_t
        self.verbose = verbose
        self.steps = 0  # the run's steps, for the log
        self.last_t = -math.inf  # the run's last level as a model timestep, where the skipped steps are logged
        self.reset()

    def reset(self, rate: Tensor | float | None = None) -> None:
        """Forget all but the settings; `rate` is the relative transformation rate left (ComfyUI's reset leaves 0.0,
        a new run has none)."""
        self.rate = rate
        self.cumulative: Tensor | float = 0.0
        self.lead: tuple[Any, Tensor, float] | None = None  # the deciding call's module, context and first level
        self.learning = False  # within the lead's first model evaluation, where the tracked call is found
        self.tracked: tuple[Tensor, slice] | None = None  # the tracked prompt's call's context, and its rows
        self.change: Tensor | None = None  # the input change the lead's call measured
        self.x_prev: Tensor | None = None
        self.out_prev: Tensor | None = None
        self.norm: Tensor | None = None
        self.diffs: list[tuple[Tensor, Tensor]] = []  # (context, out - x) per prompt batch
        self.skip_t: float | None = None  # the level at which the lead's call was just skipped
        self.skipped = 0
        self.metadata: tuple | None = None
        self.channels: int | None = None
        self.logged = False

    def new_run(self, steps: int, last_t: float) -> None:
        self.reset()
        self.steps, self.last_t = steps, last_t
        log.info("EasyCache enabled - threshold: %s, start_t: %s, end_t: %s", self.reuse_threshold, self.start_t,
                 self.end_t)

    def _diff(self, context: Tensor) -> int | None:
        return next((i for i, (kept, _) in enumerate(self.diffs) if kept is context), None)

    def _track(self, context: Tensor) -> None:
        """Track the last prompt of this call (ComfyUI's first uuid), from its first computed call on."""
        self.tracked = (context, last_prompt_rows(context))
        self.x_prev = self.out_prev = self.norm = None

    def _rows(self, x: Tensor) -> Tensor:
        """The tracked prompt's rows of a call's `x` (the latent's last rows: every prompt's are the same latent)."""
        assert self.tracked is not None
        rows = self.tracked[1]
        return _subsample(x[x.shape[0] - (rows.stop - rows.start):])

    def before(self, owner: Any, x: Tensor, t: float, context: Tensor) -> tuple[Tensor | None, dict]:
        """The result of a call that is skipped (else None), and what `after` needs to know of the call."""
        step = {"owner": owner, "context": context, "update": t > self.end_t, "tracked": False}
        if not step["update"] or t > self.start_t or self.channels is None:
            return None, step
        x = x[:, : self.channels]
        metadata = (x.device, x.dtype, x.shape[1:])
        if self.metadata is None:
            self.metadata = metadata
        elif metadata != self.metadata:
            log.warning("EasyCache - Tensor shape, dtype or device changed, resetting state")
            self.reset(rate=0.0)
            self.channels, self.metadata = x.shape[1], metadata
        index = self._diff(context)
        if self.lead is None:  # the first call in the window
            self.lead, self.learning = (owner, context, t), True
            self._track(context)
            step["tracked"] = True
            return None, step
        lead_owner, lead_context, lead_t = self.lead
        if context is lead_context and owner is lead_owner:  # a new model evaluation: decide for all its calls
            self.learning, self.skip_t = False, None
            self.change = None if self.x_prev is None else _mean_abs(self._rows(x) - self.x_prev)
            if self.norm is not None and self.rate is not None:
                self.cumulative = self.cumulative + self.rate * self.change / self.norm
                skip = bool(self.cumulative < self.reuse_threshold) and index is not None
                if self.verbose:
                    log.info("EasyCache [verbose] - %s step; cumulative_change_rate: %s, reuse_threshold: %s",
                             "skipping" if skip else "NOT skipping", float(self.cumulative), self.reuse_threshold)
                if skip:
                    self.skip_t = t
                    self.skipped += 1
                    return x + self.diffs[index][1], step
                self.cumulative = 0.0
        elif self.learning and owner is lead_owner and t == lead_t:  # a later call of the first evaluation
            self._track(context)
        elif self.skip_t == t and index is not None:  # skipped with the lead's call
            return x + self.diffs[index][1], step
        step["tracked"] = self.tracked is not None and context is self.tracked[0]
        return None, step

    def after(self, x: Tensor, out: Tensor, t: float, step: dict) -> None:
        """Keep what a computed call tells: its cache diff and, for the tracked prompt, the change rates."""
        if not step["update"]:
            return
        context = step["context"]
        if self.channels is None:  # the run's first call (before it, the input's own channels were not known)
            self.channels = out.shape[1]
            if t <= self.start_t:  # in the window: it leads
                self.metadata = (x.device, x.dtype, x[:, : self.channels].shape[1:])
                self.lead, self.learning = (step["owner"], context, t), True
                self._track(context)
                step["tracked"] = True
        x, out = x[:, : self.channels], out[:, : self.channels]
        index = self._diff(context)
        if index is None:
            self.diffs = [*self.diffs[1 - MAX_PROMPT_BATCHES:], (context, out - x)]
        else:
            self.diffs[index] = (context, out - x)
        if not step["tracked"]:
            return
        if self.norm is not None and self.change is not None:
            self.rate = _mean_abs(self._rows(out) - self.out_prev) / self.change
        self.x_prev, self.out_prev, self.norm = self._rows(x).clone(), self._rows(out).clone(), _mean_abs(out)

    def report(self, t: float) -> None:
        """Log the steps skipped, once, after the first call at the run's last level."""
        if self.logged or t > self.last_t + 1e-5 * max(1.0, abs(self.last_t)):  # float32 timesteps
            return
        self.logged = True
        speedup = self.steps / (self.steps - self.skipped) if self.steps > self.skipped else 1.0
        log.info("EasyCache - skipped %d/%d steps (%.2fx speedup).", self.skipped, self.steps, speedup)


class EasyCacheUNet(nn.Module):
    """Marks the classes `easycache_class` makes (see `with_easycache`)."""


@dataclass(frozen=True, eq=False)
class EasyCacheSettings:
    """EasyCache as a UNet copy carries it (shared by the copies made from that one): each sampling run's
    `EasyCacheState` is made from these when the run first calls the model, and kept in the run
    (`ldm.sampling.run`), so that the model holds nothing of a run. `start_t` and `end_t` are model timesteps."""

    reuse_threshold: float
    start_t: float
    end_t: float
    verbose: bool = False
    schedule: Any = None  # the model's, for the run's last level (where the skipped steps are logged)

    def state(self) -> EasyCacheState | None:
        """The state of the sampling run in progress (made at its first call); None outside a run."""
        run = current_run()
        if run is None:
            return None
        state = run.state.get(self)
        if state is None:
            state = run.state[self] = EasyCacheState(self.reuse_threshold, self.start_t, self.end_t, self.verbose)
            positive = run.sigmas[run.sigmas > 0]
            last_t = model_timestep(self.schedule, float(positive[-1])) if len(positive) else 0.0
            state.new_run(len(run.sigmas) - 1, last_t)
        return state


@functools.cache
def easycache_class(base: type) -> type:
    """`base` with EasyCache around its forward, its settings the instance's `easycache` (EasyCacheSettings); a call
    outside a sampling run is the plain forward."""
    if issubclass(base, EasyCacheUNet):
        return base

    class Cached(base, EasyCacheUNet):
        def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            state = self.__dict__["easycache"].state()
            if state is None:
                return super().forward(x, timesteps, context, *args, **kwargs)
            t = float(timesteps.reshape(-1)[0])
            cached, step = _before(state, self, x, t, context)
            if cached is not None:
                return cached
            out = super().forward(x, timesteps, context, *args, **kwargs)
            _after(state, x, out, t, step)
            return out

    Cached.__name__ = Cached.__qualname__ = f"EasyCache{base.__name__}"
    return Cached


# The cache's bookkeeping branches on values read on the host: kept out of a compiled forward's graph.
@torch.compiler.disable
def _before(state: EasyCacheState, owner: Any, x: Tensor, t: float, context: Tensor) -> tuple[Tensor | None, dict]:
    cached, step = state.before(owner, x, t, context)
    if cached is not None:
        state.report(t)
    return cached, step


@torch.compiler.disable
def _after(state: EasyCacheState, x: Tensor, out: Tensor, t: float, step: dict) -> None:
    state.after(x, out, t, step)
    state.report(t)


def cached_unet(unet: nn.Module, settings: EasyCacheSettings) -> nn.Module:
    """A copy of `unet` (sharing its weights) with EasyCache."""
    cached = shallow_copy(unet)
    cached.__class__ = easycache_class(type(unet))
    cached.__dict__["easycache"] = settings
    cached.cuda_graphs_safe = False  # a CUDA graph would replay one branch of the cache's decisions
    return cached


def with_easycache(model: DiffusionModel, reuse_threshold: float, start_percent: float, end_percent: float,
                   verbose: bool = False) -> DiffusionModel:
    """`model` whose UNet is a copy with EasyCache (the given one is left as it was)."""
    schedule = model.schedule
    settings = EasyCacheSettings(reuse_threshold, percent_timestep(schedule, start_percent),
                                 percent_timestep(schedule, end_percent), verbose, schedule)
    return replace(model, unet=cached_unet(model.unet, settings),
                   loras=(*model.loras, f"EasyCache {reuse_threshold:g}"))


class EasyCache(Node):
    """Native EasyCache implementation: skips model calls whose output is expected to change little between
    start_percent and end_percent of the run, reusing the last computed call's output-minus-input difference."""

    category = "advanced/debug"
    model = Socket("MODEL", tooltip="The model to add EasyCache to.")
    reuse_threshold = Float(0.2, min=0.0, max=3.0, step=0.01, tooltip="The threshold for reusing cached steps.")
    start_percent = Float(0.15, min=0.0, max=1.0, step=0.01,
                          tooltip="The relative sampling step to begin use of EasyCache.")
    end_percent = Float(0.95, min=0.0, max=1.0, step=0.01,
                        tooltip="The relative sampling step to end use of EasyCache.")
    verbose = Boolean(False, tooltip="Whether to log verbose information.")
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, reuse_threshold: float, start_percent: float, end_percent: float,
                verbose: bool) -> tuple[DiffusionModel]:
        return (with_easycache(model, reuse_threshold, start_percent, end_percent, verbose),)


class LazyCacheRun:
    """One sampling run's LazyCache (ComfyUI's LazyCacheHolder, used by its lazycache_predict_noise_wrapper):
    called as `run(x, sigma, guide)` for each model evaluation (`ldm.sampling.model_patches.GuidanceWrapperFactory`).

    At levels above `end_sigma` each evaluation runs and is remembered: `x_prev` and `out_prev` (every 8th row and
    column of the last two dimensions), `norm = mean|out|`, `diff = out - x`. At or below `start_sigma` (and above
    `end_sigma`), `input_change = mean|x - x_prev|` (subsampled); once a rate is known, `cumulative += rate *
    input_change / norm`, and while it is below `reuse_threshold` the evaluation is skipped: `x + diff`, nothing
    else updated. Otherwise `cumulative = 0`, the evaluation runs, and `rate = mean|out - out_prev| / input_change`.
    A change of the latent's shape, dtype or device clears all but the settings (and leaves the rate 0, not
    unknown: ComfyUI's reset)."""

    def __init__(self, reuse_threshold: float, start_sigma: float, end_sigma: float, steps: int,
                 verbose: bool = False) -> None:
        self.reuse_threshold, self.start_sigma, self.end_sigma = reuse_threshold, start_sigma, end_sigma
        self.steps, self.verbose = steps, verbose
        self.reset()
        self.rate: Tensor | float | None = None  # none yet at a run's start

    def reset(self) -> None:
        self.rate = 0.0
        self.cumulative: Tensor | float = 0.0
        self.x_prev: Tensor | None = None
        self.out_prev: Tensor | None = None
        self.norm: Tensor | None = None
        self.diff: Tensor | None = None
        self.metadata: tuple | None = None
        self.skipped = 0

    def _check_metadata(self, x: Tensor) -> None:
        metadata = (x.device, x.dtype, tuple(x.shape))
        if self.metadata is None:
            self.metadata = metadata
        elif metadata != self.metadata:
            log.warning("LazyCache - Tensor shape, dtype or device changed, resetting state")
            self.reset()

    def __call__(self, x: Tensor, sigma: Tensor, guide: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        level = first_level(sigma)
        if not level > self.end_sigma:
            return guide(x, sigma)
        change = None
        if level <= self.start_sigma:
            self._check_metadata(x)
            if self.x_prev is not None:
                change = _mean_abs(_subsample(x) - self.x_prev)
                if self.norm is not None and self.rate is not None:
                    self.cumulative = self.cumulative + self.rate * change / self.norm
                    if self.cumulative < self.reuse_threshold:
                        if self.verbose:
                            log.info("LazyCache [verbose] - skipping step; cumulative_change_rate: %s, "
                                     "reuse_threshold: %s", float(self.cumulative), self.reuse_threshold)
                        self.skipped += 1
                        return x + self.diff
                    self.cumulative = 0.0
        out = guide(x, sigma)
        if self.norm is not None and change is not None:
            self.rate = _mean_abs(_subsample(out) - self.out_prev) / change
        self.diff = out - x
        self.x_prev, self.out_prev = _subsample(x).clone(), _subsample(out).clone()
        self.norm = _mean_abs(out)
        return out

    def finish(self) -> None:
        speedup = self.steps / (self.steps - self.skipped) if self.steps > self.skipped else 1.0
        log.info("LazyCache - skipped %d/%d steps (%.2fx speedup).", self.skipped, self.steps, speedup)


@dataclass(frozen=True)
class LazyCacheSettings:
    """LazyCache as a MODEL carries it: a fresh `LazyCacheRun` for each sampling run, from its levels."""

    reuse_threshold: float
    start_sigma: float
    end_sigma: float
    start_percent: float
    end_percent: float
    verbose: bool = False

    def __call__(self, sigmas: Tensor) -> LazyCacheRun:
        log.info("LazyCache enabled - threshold: %s, start_percent: %s, end_percent: %s", self.reuse_threshold,
                 self.start_percent, self.end_percent)
        return LazyCacheRun(self.reuse_threshold, self.start_sigma, self.end_sigma, len(sigmas) - 1, self.verbose)


def with_lazycache(model: DiffusionModel, reuse_threshold: float, start_percent: float, end_percent: float,
                   verbose: bool = False) -> DiffusionModel:
    """`model` whose sampling runs LazyCache around each guided prediction (the given one is left as it was)."""
    schedule = model.schedule
    settings = LazyCacheSettings(reuse_threshold, schedule.sigma_at_percent(start_percent),
                                 schedule.sigma_at_percent(end_percent), start_percent, end_percent, verbose)
    return replace(model, sampling_patches=model.sampling_patches.around(settings))


class LazyCache(Node):
    """A homebrew version of EasyCache - even 'easier' version of EasyCache to implement. Overall works worse than
    EasyCache, but better in some rare cases AND universal compatibility with everything in ComfyUI."""

    category = "advanced/debug"
    model = Socket("MODEL", tooltip="The model to add LazyCache to.")
    reuse_threshold = Float(0.2, min=0.0, max=3.0, step=0.01, tooltip="The threshold for reusing cached steps.")
    start_percent = Float(0.15, min=0.0, max=1.0, step=0.01,
                          tooltip="The relative sampling step to begin use of LazyCache.")
    end_percent = Float(0.95, min=0.0, max=1.0, step=0.01,
                        tooltip="The relative sampling step to end use of LazyCache.")
    verbose = Boolean(False, tooltip="Whether to log verbose information.")
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, reuse_threshold: float, start_percent: float, end_percent: float,
                verbose: bool) -> tuple[DiffusionModel]:
        return (with_lazycache(model, reuse_threshold, start_percent, end_percent, verbose),)


NODES: list[Any] = [EasyCache, LazyCache]
