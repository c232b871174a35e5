"""Classifier-free guidance over the graph's CONDITIONING lists, with area and mask composition.

A CONDITIONING is a list of `(embedding [1 or B, L, D], options)` pairs. Options read here:
- `area`: `(height, width, y, x)` in latent pixels (image pixels // 8), as ComfyUI's
  ConditioningSetArea stores it; or `("percentage", h, w, y, x)` as fractions of the latent size.
- `strength`: weight of this entry where entries overlap (default 1.0).
- `mask`: [1 or B, H, W] weights, any resolution (resized bilinearly to the latent), with
  `mask_strength` (default 1.0); cropped to `area` when both are given. With `set_area_to_bounds`,
  the area is the mask's bounding box (at least 8 latent pixels a side), so the model runs on that crop.
- `y`: the precomputed class/size embedding [1 or B, adm] for models that take one (SDXL). The
  caller builds it from `pooled_output` and the size options; this module never looks at those.
- `control`: a ControlNet chain (`ldm.controlnet.Control`) applied to this entry's model calls.
- `start_percent`, `end_percent`: the part of the run (0 = pure noise, 1 = the end) in which the entry
  acts, as ComfyUI's ConditioningSetTimestepRange stores it; outside it the entry is left out.
- `clip_start_percent`, `clip_end_percent`: the keyframe range a scheduled CLIP encoded the entry for
  (ldm.sampling.clip_schedule); the entry acts where this range and its timestep range meet, as in ComfyUI.
- `concat`: for inpainting models, [1 or B, C, H, W] channels appended to the UNet's input at the
  latent's size (the caller builds them; entries without one get the guider's `concat`).
- `ref_latents`: Flux Kontext's reference latents (`ldm.flux_variants.References`, in the model's latent space), passed
  to the model with the entry's calls, never cropped to an area; entries share a call only with matching ones.
- `attention_mask`: Apply Style Model's attn_bias for Flux Redux, an additive bias over the joint attention in
  ComfyUI's layout (`ldm.flux_redux.style_attention_mask`); entries share a call only with masks of one shape.
- `hooks`: an `ldm.sampling.hooks.Hooks` group: the entry is predicted by the UNet with those LoRAs applied
  (the guider's `hooked` makes the copies); entries of different groups never share a call.
- `gligen`: `("position", ldm.gligen.Gligen, phrases)` (GLIGENTextBoxApply): the entry is predicted by a copy of the
  UNet whose transformer blocks take the phrases' grounding tokens (`ldm.gligen.grounded_unet`), made once per
  latent shape; entries with other groundings (or none) never share a call.
- `default`: the entry acts only where the side's other active entries leave weight, with weight
  `max(0, 1 - their summed weights)` over the whole image (ComfyUI's ConditioningSetDefaultCombine).

Each entry predicts x0 over its area; entries of one side (positive or negative) are blended by
their weights, with an 8-pixel linear feather on area edges that are inside the image and have
no mask (ComfyUI's area composition). Latent pixels no entry covers predict 0, as in ComfyUI.
All entries of both sides that share an area size (and the same ControlNet chain, or none, and ControlNet prompts
`cross_attn_controlnet` of one shape, or none) go through ONE model call; embeddings of
different lengths (77 vs 154 tokens) are repeated to their least common multiple, which leaves
attention unchanged, or run in separate calls when that multiple would exceed 4x the shorter one.
Where the negative prompt is predicted by another model (`negative_by`: DualModelGuider, SkipLayerGuidanceDiTSimple),
each side's entries (area pairs included) go through calls of their own, the negative's through that model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ldm.sampling.cond_jobs import (
    Job,
    batched_attention_masks,
    batched_inputs,
    batched_references,
    batches_of,
    entry_job,
    pair_areas,
)
from ldm.sampling.denoiser import Conditioning, Denoiser, uniform_level
from ldm.sampling.hooks import HookedUNets
from ldm.sampling.model_patches import (
    CfgArgs,
    CfgFunction,
    NegativeFunction,
    PostCfgFunction,
    PreCfgFunction,
    call_sides,
    overridden_cfg,
)

CondList = list[tuple[Tensor, dict]]


def _sigma_range(opts: dict, sigma_at_percent: Callable[[float], float]) -> tuple[float, float] | None:
    """The (high, low) sigmas between which an entry acts: its timestep range, within its scheduled CLIP's
    keyframe range if it has one; None for the whole run."""
    if "clip_start_percent" in opts:
        start = max(opts["clip_start_percent"], opts.get("start_percent", 0.0))
        end = min(opts["clip_end_percent"], opts.get("end_percent", 1.0))
    elif "start_percent" in opts or "end_percent" in opts:
        start, end = opts.get("start_percent", 0.0), opts.get("end_percent", 1.0)
    else:
        return None
    return sigma_at_percent(start), sigma_at_percent(end)


@dataclass(frozen=True)
class DualCfg:
    """A second positive prompt, `middle`, between the positive and the negative (ComfyUI's DualCFGGuider):
    `regular` guidance is `negative + cfg_middle * (middle - negative) + cfg * (positive - middle)`; `nested`
    is `negative + cfg_middle * (guided - negative)`, where guided = `middle + cfg * (positive - middle)`. A model's
    guidance function (RescaleCFG) replaces the inner combination of each style, as in ComfyUI; post-guidance
    functions (PAG) act on the final result with the first prompt as the positive, where ComfyUI runs them
    inside the inner step."""

    middle: CondList
    cfg_middle: float
    nested: bool = False

    def combine(self, args: CfgArgs, middle: Tensor, guide: Callable[[CfgArgs], Tensor]) -> Tensor:
        """The guided x0 from the positive and negative predictions in `args` and the middle one's."""
        if self.nested:
            return torch.lerp(args.uncond, guide(CfgArgs(args.x, args.sigma, args.cond, middle, args.cfg)),
                              self.cfg_middle)
        guided = guide(CfgArgs(args.x, args.sigma, middle, args.uncond, self.cfg_middle))
        return guided + (args.cond - middle) * args.cfg


class ThirdPrompt(Protocol):
    """A third prompt, `middle`, predicted with the positive and negative ones and combined with them by
    `combine` (DualCfg; PerpNeg in `guidance_patches`). `middle` is prepared for the model as a negative prompt."""

    middle: CondList

    def combine(self, args: CfgArgs, middle: Tensor, guide: Callable[[CfgArgs], Tensor]) -> Tensor: ...


@dataclass
class _Plan:
    """How one latent shape is evaluated: the batched calls, and per side the blend denominators."""

    batches: list[tuple[list[Job], Conditioning]]
    counts: list[Tensor | None]  # None: the side is one whole-image entry, used as is

    @property
    def plain_cfg(self) -> bool:
        """One whole-image entry per side, both in one call: the common case, with a fast path."""
        return (len(self.counts) == 2 and all(c is None for c in self.counts) and len(self.batches) == 1
                and self.batches[0][0][0].hooks is None)


class CFGGuider:
    """The guided denoiser `model(x, sigma) -> x0` that samplers call:
    `uncond + cfg * (cond - uncond)`, with the unconditional pass skipped when cfg == 1.

    Jobs, batches and concatenated contexts depend only on the latent's shape, so they are
    built once per shape and reused at every step. A `cfg_function` (`ldm.sampling.model_patches`)
    replaces the last step, the combination of the two sides' predictions; `post_cfg` functions then
    change the result, and may ask for one side's prediction by a patched copy of `module`, the UNet
    module behind the denoiser's (perhaps compiled or graphed) forward (see `model_patches.Predict`).
    `pre_cfg` functions change the two sides' predictions before they are combined, each with a dict of its own
    for this guider's lifetime (one sampling run).
    `keep_negative` runs the negative side even at cfg 1 (for those that read it); `dual` adds a third prompt
    (see `DualCfg`, `ThirdPrompt`); `concat` is an inpainting model's extra input for entries without their own.
    `hooked` (`ldm.sampling.hooks.HookedUNets`) gives the denoisers of entries that carry hooks; `parts`, a packed
    latent's parts' shapes (`ldm.sampling.av_latent`), are passed on to guidance functions (`CfgArgs.parts`).
    `negative_by` (`model_patches.NegativeFunction`) has the negative prompt predicted, at the levels it says, by a
    transform of `module` rather than batched with the positive. Within `model_patches.cfg_override` a call is
    guided at that cfg (not DualCfg's, whose scales are its own, as ComfyUI's DualCFGGuider ignores the override).
    """

    def __init__(
        self, denoiser: Denoiser, positive: CondList, negative: CondList, cfg: float, feather: int = 8,
        cfg_function: CfgFunction | None = None, post_cfg: tuple[PostCfgFunction, ...] = (),
        module: Any = None, keep_negative: bool = False, dual: ThirdPrompt | None = None,
        concat: Tensor | None = None, pre_cfg: tuple[PreCfgFunction, ...] = (), hooked: HookedUNets | None = None,
        parts: tuple[tuple[int, ...], ...] | None = None, negative_by: NegativeFunction | None = None,
    ) -> None:
        if not positive:
            raise ValueError("positive conditioning is empty")
        self.denoiser = denoiser
        self.negative_by = negative_by
        self._given = (positive, negative, keep_negative)
        self._at_cfgs: dict[float, CFGGuider] = {}  # the same guider at other cfgs (cfg_override)
        self.cfg = cfg
        if dual is not None:
            if not negative:
                raise ValueError("dual guidance needs a negative conditioning")
            self.sides = [positive, negative, dual.middle]
        elif negative and (keep_negative or not math.isclose(cfg, 1.0)):
            self.sides = [positive, negative]
        else:
            self.sides = [positive]
        self.dual = dual
        self.concat = concat
        self.feather = feather
        self.cfg_function = cfg_function
        self.post_cfg = post_cfg
        self.pre_cfg = pre_cfg
        self._pre_cfg_state: list[dict] = [{} for _ in pre_cfg]  # per run: this guider is made for one
        self.module = module
        self.hooked = hooked
        self.parts = parts
        self._patched: dict[Any, CFGGuider] = {}  # per (transform, negative, without): one side by a patched copy
        self._plans: dict[tuple, _Plan] = {}
        # Per side and entry, the (high, low) sigmas between which it acts, or None for the whole run.
        self.ranges = [[_sigma_range(opts, denoiser.schedule.sigma_at_percent) for _, opts in side]
                       for side in self.sides]
        self.ranged = any(r is not None for side in self.ranges for r in side)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        cfg = overridden_cfg()
        # Without a negative prompt (a side guider, BasicGuider) the cfg changes nothing.
        if (cfg is not None and self._given[1] and not math.isclose(cfg, self.cfg)
                and not isinstance(self.dual, DualCfg)):
            return self._at_cfg(cfg)(x, sigma)
        if not self.post_cfg:
            return self._guided(x, sigma)[0]
        denoised, args = self._guided(x, sigma, need_args=True)

        def predict(transform: Any, at: Tensor | None = None, negative: bool = False,
                    without: tuple[str, ...] = ()) -> Tensor:
            if negative and len(self.sides) < 2:
                raise ValueError("this guidance patch needs the negative prompt's prediction, which was not made")
            return self._side_guider(transform, negative, without)(x if at is None else at, sigma)

        for patch in self.post_cfg:
            denoised = patch(args, denoised, predict)
        return denoised

    def _side_guider(self, transform: Any, negative: bool, without: tuple[str, ...] = ()) -> CFGGuider:
        """The guider of one side's prompts alone, predicted by the module `transform(module)`, made once."""
        if self.module is None:
            raise ValueError("this guidance patch needs the UNet module, which the sampler was not given")
        key = (transform, negative, without)
        if key not in self._patched:
            patched = transform(self.module)
            # A wrapper that adapts the module to the sampler's latent (av_latent.PackedParts) wraps the copy too.
            over = getattr(self.denoiser.unet, "over", None)
            denoiser = Denoiser(patched if over is None else over(patched), self.denoiser.schedule,
                                self.denoiser.prediction, self.denoiser.quantize)
            hooked = None if self.hooked is None else self.hooked.over(patched)
            side = [(emb, {k: v for k, v in opts.items() if k not in without})
                    for emb, opts in self.sides[1 if negative else 0]]
            self._patched[key] = CFGGuider(denoiser, side, [], 1.0, self.feather, module=patched,
                                           concat=self.concat, hooked=hooked, parts=self.parts)
        return self._patched[key]

    def _at_cfg(self, cfg: float) -> CFGGuider:
        """This guider at another cfg (made once per value): it predicts the negative prompt or not as that cfg
        needs, and shares the pre-guidance functions' state and the side guiders with this one."""
        if cfg not in self._at_cfgs:
            positive, negative, keep_negative = self._given
            other = CFGGuider(self.denoiser, positive, negative, cfg, self.feather, self.cfg_function, self.post_cfg,
                              self.module, keep_negative, self.dual, self.concat, self.pre_cfg, self.hooked,
                              self.parts, self.negative_by)
            other._pre_cfg_state, other._patched = self._pre_cfg_state, self._patched
            self._at_cfgs[cfg] = other
        return self._at_cfgs[cfg]

    def _guided(self, x: Tensor, sigma: Tensor, need_args: bool = False) -> tuple[Tensor, CfgArgs | None]:
        """The guided x0, and (if asked or needed) what a guidance function sees."""
        # Samplers give every item one level: the denoiser then needs it as a float, not a tensor.
        level = uniform_level(sigma)
        active = self._active(sigma, level)
        elsewhere = None  # the denoiser that predicts the negative side's calls at this level, if not the plain one
        if self.negative_by is not None and len(self.sides) >= 2 and self.dual is None:
            transform = self.negative_by(level if level is not None else float(sigma.max()))
            elsewhere = None if transform is None else self._side_guider(transform, negative=True).denoiser
        # With the negative predicted by another model, its jobs (area pairs included) get calls of their own.
        plan = self._plan(x, active, split_sides=elsewhere is not None)
        if level is not None and plan.plain_cfg and self.cfg_function is None and not self.pre_cfg and not need_args:
            with call_sides(tuple(j.side for j in plan.batches[0][0])):
                return self.denoiser.guided_at_level(x, level, plan.batches[0][1], self.cfg), None
        preds: list[Tensor | None] = [None] * len(self.sides)
        totals = [None if c is None else torch.zeros_like(x) for c in plan.counts]
        for jobs, cond in plan.batches:
            if len(jobs) == 1 and jobs[0].spans_frames_and_rows(x):
                x_in = x[..., jobs[0].cols] if jobs[0].cols.stop - jobs[0].cols.start < x.shape[-1] else x
            else:
                x_in = torch.cat([x[j.region] for j in jobs])
            denoiser = self._denoiser(jobs[0].hooks, sigma, level)
            if elsewhere is not None and jobs[0].side == 1:
                if jobs[0].hooks is not None or jobs[0].gligen is not None:
                    raise ValueError("a negative prompt with hooks or GLIGEN boxes cannot be predicted by another "
                                     "model (DualModelGuider, SkipLayerGuidanceDiTSimple)")
                denoiser = elsewhere
            with call_sides(tuple(j.side for j in jobs)):
                x0 = (denoiser(x_in, sigma.repeat(len(jobs)), cond) if level is None
                      else denoiser.at_level(x_in, level, cond))
            for job, out in zip(jobs, x0.chunk(len(jobs)), strict=True):
                if plan.counts[job.side] is None:
                    preds[job.side] = out
                else:
                    totals[job.side][job.region] += out * job.weight
        for side, count in enumerate(plan.counts):
            if count is not None:
                preds[side] = totals[side] / count
        args = CfgArgs(x, sigma, preds[0], preds[1] if len(preds) > 1 else None, self.cfg, self.parts)
        if len(preds) == 1:
            return preds[0] if self.cfg_function is None else self.cfg_function(args), args
        if not isinstance(self.dual, DualCfg):  # ComfyUI's DualCFGGuider runs no pre-guidance functions
            for patch, state in zip(self.pre_cfg, self._pre_cfg_state, strict=True):
                args = patch(args, state)
        if self.dual is None:
            return self._guide(args), args
        return self.dual.combine(args, preds[2], self._guide), args

    def _denoiser(self, hooks: Any, sigma: Tensor, level: float | None) -> Denoiser:
        """The denoiser of one call's hook group: the plain one without hooks."""
        if hooks is None:
            return self.denoiser
        if self.hooked is None:
            raise ValueError("a prompt carries hooks (a LoRA for it alone), and the sampler was not given the "
                             "UNet module to patch")
        return self.hooked.get(hooks, level if level is not None else float(sigma.max()))

    def _grounded(self, job: Job) -> Any:
        """The GLIGEN-grounded copy of the UNet for a call whose entries carry `gligen`; None without."""
        if job.gligen is None:
            return None
        if self.module is None:
            raise ValueError("a prompt carries GLIGEN boxes, and the sampler was not given the UNet module to patch")
        if job.hooks is not None:
            raise ValueError("a prompt carries both GLIGEN boxes and hooks, which cannot be combined")
        from ldm.gligen import grounded_unet

        kind, model, phrases = job.gligen
        if kind != "position":
            raise ValueError(f"unknown GLIGEN grounding {kind!r}: only text boxes (\"position\") are supported")
        return grounded_unet(self.module, model, phrases, job.rows.stop - job.rows.start,
                             job.cols.stop - job.cols.start)

    def _guide(self, args: CfgArgs) -> Tensor:
        """`uncond + cfg * (cond - uncond)`, or the model's guidance function."""
        if self.cfg_function is not None:
            return self.cfg_function(args)
        return torch.lerp(args.uncond, args.cond, args.cfg)

    def _active(self, sigma: Tensor, level: float | None) -> tuple | None:
        """Which entries act at this noise level (None: all of them, none having a range)."""
        if not self.ranged:
            return None
        current = level if level is not None else float(sigma.max())
        return tuple(tuple(r is None or r[1] <= current <= r[0] for r in side) for side in self.ranges)

    def _default_jobs(self, x: Tensor, jobs: list[Job], active: tuple | None) -> list[Job]:
        """The active `default` entries' jobs: whole-image, weighted by what the side's other entries leave
        (`max(0, 1 - their weights)`); none for a side that those cover fully."""
        out = []
        for side, conds in enumerate(self.sides):
            defaults = [(i, emb, opts) for i, (emb, opts) in enumerate(conds)
                        if opts.get("default") and (active is None or active[side][i])]
            if not defaults:
                continue
            covered = torch.zeros(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
            for job in jobs:
                if job.side == side:
                    covered[job.region] += job.weight
            left = (1 - covered).clamp_(min=0)
            if not bool(left.any()):
                continue
            for i, emb, opts in defaults:
                whole = {k: v for k, v in opts.items() if k not in ("area", "mask", "set_area_to_bounds", "strength")}
                job = entry_job(side, emb, whole, x, self.feather, self.concat)
                job.weight, job.source = left, (side, i)
                out.append(job)
        return out

    def _plan(self, x: Tensor, active: tuple | None = None, split_sides: bool = False) -> _Plan:
        """The model calls for `x` with the `active` entries; `split_sides`: no call mixes the two sides."""
        key = (tuple(x.shape), x.device, x.dtype, active, split_sides)
        if key not in self._plans:
            jobs = []
            for side, conds in enumerate(self.sides):
                for i, (emb, opts) in enumerate(conds):
                    if opts.get("default"):
                        continue  # placed below, where the others leave room
                    if (job := entry_job(side, emb, opts, x, self.feather, self.concat)) is not None:
                        job.source = (side, i)
                        jobs.append(job)
            if len(self.sides) >= 2:
                jobs = pair_areas(jobs)
            jobs = [j for j in jobs if active is None or active[j.source[0]][j.source[1]]]
            jobs += self._default_jobs(x, jobs, active)
            batches = []
            groups = ([g for side in range(len(self.sides)) for g in batches_of([j for j in jobs if j.side == side])]
                      if split_sides else batches_of(jobs))
            for group in groups:
                length = math.lcm(*(j.context.shape[1] for j in group))
                context = torch.cat([j.context if j.context.shape[1] == length
                                     else j.context.repeat(1, length // j.context.shape[1], 1) for j in group])
                y = None if group[0].y is None else torch.cat([j.y for j in group])
                concat = None if group[0].concat is None else torch.cat([j.concat for j in group])
                control_context = (None if group[0].control_context is None
                                   else torch.cat([j.control_context for j in group]))
                batches.append((group, Conditioning(context, y, group[0].control, len(group), concat,
                                                    self._grounded(group[0]), batched_references(group),
                                                    batched_attention_masks(group), batched_inputs(group),
                                                    control_context)))
            counts: list[Tensor | None] = []
            for side in range(len(self.sides)):
                mine = [j for j in jobs if j.side == side]
                whole = len(mine) == 1 and isinstance(mine[0].weight, float)
                if whole and (mine[0].rows.stop, mine[0].cols.stop) == tuple(x.shape[-2:]):
                    counts.append(None)  # one whole-image entry: its weight cancels out
                    continue
                count = torch.full_like(x, 1e-37)
                for job in mine:
                    count[job.region] += job.weight
                counts.append(count)
            self._plans[key] = _Plan(batches, counts)
        return self._plans[key]
