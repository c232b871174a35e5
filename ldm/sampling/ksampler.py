"""The high-level sampling entry point the KSampler and KSamplerAdvanced nodes call."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.sampling import (
    dpm_solver,
    samplers,
    samplers_cfgpp,
    samplers_exponential,
    samplers_lcm_upscale,
    samplers_ldm,
    samplers_multistep,
    samplers_sde,
    samplers_stochastic,
    unipc,
)
from ldm.sampling.denoiser import Denoiser, UNet, uniform_level
from ldm.sampling.guidance import CFGGuider, CondList, DualCfg
from ldm.sampling.hooks import HookedUNets, entry_hooks
from ldm.sampling.model_patches import GuidanceWrapper, SamplingPatches, cfg_override
from ldm.sampling.noise import (
    BrownianTreeNoiseSampler,
    PrefetchingNoiseSampler,
    model_noise,
    prepare_noise,
    seeded_noise_sampler,
    step_noise_seed,
)
from ldm.sampling.run import SamplingRun, sampling_run
from ldm.sampling.schedulers import get_sigmas
from ldm.sampling.schedules import DiscreteSchedule

log = logging.getLogger(__name__)

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": samplers.sample_euler,
    "euler_cfg_pp": samplers_cfgpp.sample_euler_cfg_pp,
    "euler_ancestral": samplers.sample_euler_ancestral,
    "euler_ancestral_cfg_pp": samplers_cfgpp.sample_euler_ancestral_cfg_pp,
    "heun": samplers.sample_heun,
    "heunpp2": samplers_exponential.sample_heunpp2,
    # SEEDS-2 as ComfyUI's exponential Heun on x0: its phi_2 form with the second stage at the step's end
    "exp_heun_2_x0": partial(samplers_stochastic.sample_seeds_2, eta=0.0, s_noise=0.0, r=1.0, solver_type="phi_2"),
    "exp_heun_2_x0_sde": partial(samplers_stochastic.sample_seeds_2, r=1.0, solver_type="phi_2"),
    "dpm_2": samplers.sample_dpm_2,
    "dpm_2_ancestral": samplers.sample_dpm_2_ancestral,
    "lms": samplers.sample_lms,
    "dpm_fast": dpm_solver.sample_dpm_fast,
    "dpm_adaptive": dpm_solver.sample_dpm_adaptive,
    "dpmpp_2s_ancestral": samplers.sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": samplers_cfgpp.sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": samplers.sample_dpmpp_sde,
    "dpmpp_2m": samplers.sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": samplers_cfgpp.sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": samplers_sde.sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": partial(samplers_sde.sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_3m_sde": samplers_sde.sample_dpmpp_3m_sde,
    "ddpm": samplers_ldm.sample_ddpm,
    "lcm": samplers_sde.sample_lcm,
    "ipndm": samplers_multistep.sample_ipndm,
    "ipndm_v": samplers_multistep.sample_ipndm_v,
    "deis": samplers_exponential.sample_deis,
    "res_multistep": samplers_exponential.sample_res_multistep,
    "res_multistep_cfg_pp": samplers_exponential.sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": samplers_exponential.sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": samplers_exponential.sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": samplers_multistep.sample_gradient_estimation,
    "gradient_estimation_cfg_pp": samplers_exponential.sample_gradient_estimation_cfg_pp,
    "er_sde": samplers_stochastic.sample_er_sde,
    "seeds_2": samplers_stochastic.sample_seeds_2,
    "seeds_3": samplers_stochastic.sample_seeds_3,
    "sa_solver": samplers_stochastic.sample_sa_solver,
    "sa_solver_pece": partial(samplers_stochastic.sample_sa_solver, use_pece=True),
    "ddim": samplers_ldm.sample_ddim,
    "uni_pc": unipc.sample_uni_pc,
    "uni_pc_bh2": partial(unipc.sample_uni_pc, variant="bh2"),
    "plms": samplers_ldm.sample_plms,
}
# Samplers that change the latent's size as they sample. Only a SAMPLER node makes them (ComfyUI's KSampler does
# not list them); areas in latent pixels are scaled with the latent, and a noise mask cannot follow it.
RESIZING_SAMPLERS: dict[str, Callable[..., Tensor]] = {"lcm_upscale": samplers_lcm_upscale.sample_lcm_upscale}
# ComfyUI's "_gpu" samplers draw their Brownian tree on the GPU instead of the CPU, so the same seed gives
# other noise there. Here every sampler's noise comes from one seeded generator, the same on any device,
# so these names are the same samplers; they are accepted so that workflows naming them run.
SAMPLER_ALIASES = {"dpmpp_sde_gpu": "dpmpp_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
                   "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun", "dpmpp_3m_sde_gpu": "dpmpp_3m_sde"}
# ComfyUI's order (the subset implemented here), then the extras: plms, from the original SD code.
SAMPLER_NAMES = [alias for name in SAMPLERS
                 for alias in (name, *(a for a, target in SAMPLER_ALIASES.items() if target == name))]

# Samplers whose step noise comes from a Brownian tree rather than independent draws.
_BROWNIAN = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}
_STEP_NOISE = {
    "euler",
    "heun",
    "heunpp2",
    "dpm_2",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "ddpm",
    "lcm",
    "ddim",
    "dpm_fast",
    "dpm_adaptive",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "exp_heun_2_x0_sde",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
}
# Those of them that draw step noise at (nearly) every step with their default options: drawn ahead.
_DRAW_AHEAD = {"euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral",
               "dpmpp_2s_ancestral_cfg_pp", "ddpm", "lcm", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
               "er_sde"}
# CFG++ samplers: they read the unconditional prediction of each model call.
_CFG_PP = {"euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
           "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"}


# Samplers that add fresh noise at every step: they need falling noise levels.
_STOCHASTIC = {"euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral",
               "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "ddpm",
               "lcm", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "exp_heun_2_x0_sde", "er_sde",
               "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "lcm_upscale"}


# Those of them that also sample rectified-flow models (Flux, SD3), as ComfyUI's do for its CONST models: they
# take `flow=True` and re-noise a flow latent its own way; the SDE ones step in its half-log-SNR, which is
# infinite at sigma 1, so they start just below it (ComfyUI's offset_first_sigma_for_snr).
_FLOW_STOCHASTIC = {"euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                    "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "lcm", "seeds_2", "seeds_3",
                    "exp_heun_2_x0_sde", "sa_solver", "sa_solver_pece", "er_sde"}
# exp_heun_2_x0 adds no noise but shares SEEDS-2's steps in the half-log-SNR, so it takes `flow` too.
_FLOW_SDE = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "seeds_2", "seeds_3", "exp_heun_2_x0",
             "exp_heun_2_x0_sde", "sa_solver", "sa_solver_pece", "er_sde"}


# Samplers that take only the ends of the schedule and step between them their own way, downwards.
_FALLING_ONLY = {"dpm_fast", "dpm_adaptive"}


def check_sigmas(sigmas: Tensor, sampler_name: str) -> None:
    """Refuse, with the reason, a schedule no sampler can walk: it must be finite, not negative, and strictly
    falling (0 only at the end), or strictly rising from above 0 (unsampling: FlipSigmas) for a sampler that
    adds no noise of its own."""
    levels = sigmas.tolist()
    shown = ", ".join(f"{s:.4g}" for s in levels[:8]) + (", ..." if len(levels) > 8 else "")
    if not all(math.isfinite(s) and s >= 0 for s in levels):
        raise ValueError(f"sigmas must be finite and not negative, got [{shown}]")
    if len(levels) < 2:
        return
    falling = all(a > b for a, b in zip(levels, levels[1:], strict=False))
    rising = all(a < b for a, b in zip(levels, levels[1:], strict=False)) and levels[0] > 0
    if not falling and not rising:
        raise ValueError(f"sigmas must fall at every step (0 only at the end), or rise at every step from above 0 "
                         f"to turn an image back into noise; got [{shown}]")
    if rising and sampler_name in _STOCHASTIC | _FALLING_ONLY:
        why = "adds noise at each step" if sampler_name in _STOCHASTIC else "plans its steps from high to low noise"
        raise ValueError(f"{sampler_name} {why} and needs falling sigmas; rising ones (from FlipSigmas, to turn "
                         "an image back into noise) need a sampler without noise of its own, such as euler, heun, "
                         "dpmpp_2m or ddim")


class SamplingInterrupted(Exception):
    """Raised when the `interrupt` hook asks sampling to stop."""


# The KSampler gives these samplers a schedule of one step more with its next-to-last level dropped, so that
# their last step (a second-order one) does not end on the smallest sigma (ComfyUI's KSampler rule).
DISCARD_PENULTIMATE_SIGMA = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


def _ksampler_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int, sampler_name: str | None) -> Tensor:
    if sampler_name not in DISCARD_PENULTIMATE_SIGMA:
        return get_sigmas(scheduler, schedule, steps)
    sigmas = get_sigmas(scheduler, schedule, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def compute_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int, denoise: float = 1.0,
                   sampler_name: str | None = None) -> Tensor:
    """The sigmas of a KSampler run: for denoise < 1, the last `steps + 1` of a `steps / denoise` schedule,
    so every step is spent on the lower part of the noise range (ComfyUI's behaviour); with `sampler_name`,
    the KSampler's DISCARD_PENULTIMATE_SIGMA rule too (the custom sampling nodes' BasicScheduler has none)."""
    if denoise > 0.9999:
        return _ksampler_sigmas(schedule, scheduler, steps, sampler_name)
    if denoise <= 0.0:
        return torch.zeros(0)
    return _ksampler_sigmas(schedule, scheduler, int(steps / denoise), sampler_name)[-(steps + 1) :]


def _brownian_queries(sampler_name: str, sigmas: list[float], options: dict) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) pairs an SDE sampler will ask its Brownian tree for, in order
    (computed exactly as the samplers do, so that they compare equal)."""
    if not options.get("eta", 1.0):
        return []
    queries = []
    for sigma, sigma_next in zip(sigmas, sigmas[1:], strict=False):
        if sigma_next == 0:
            continue
        if sampler_name == "dpmpp_sde":
            queries.append((sigma, samplers.dpmpp_sde_stage_level(sigma, sigma_next, options.get("r", 0.5),
                                                                  options.get("flow", False))))
        queries.append((sigma, sigma_next))
    return queries


def latent_mask(mask: Tensor, latent: Tensor) -> Tensor:
    """A [H, W], [B, H, W] or [B, 1|C, H, W] mask at any resolution, as [B, C, h, w] at the latent's; for a video
    latent, such a mask for every frame, or a [B, 1|C, T, H, W] one resized over frames too (trilinearly, as
    ComfyUI does), as [B, C, T, h, w]."""
    mask = mask.to(latent.device, latent.dtype)
    if mask.shape == latent.shape:
        return mask  # at the latent's size already (a packed audio-video latent's: ldm.sampling.av_latent)
    if mask.ndim == 5:
        if latent.ndim != 5:
            raise ValueError(f"a video noise mask {tuple(mask.shape)} does not fit the image latent "
                             f"{tuple(latent.shape)}")
        mask = F.interpolate(mask, size=latent.shape[-3:], mode="trilinear", align_corners=False)
        mask = mask.expand(-1, latent.shape[1], -1, -1, -1) if mask.shape[1] == 1 else mask
        return mask.repeat(math.ceil(latent.shape[0] / mask.shape[0]), 1, 1, 1, 1)[: latent.shape[0]]
    mask = mask.reshape(-1, mask.shape[-3] if mask.ndim == 4 else 1, *mask.shape[-2:])
    mask = F.interpolate(mask, size=latent.shape[-2:], mode="bilinear", align_corners=False)
    mask = mask.expand(-1, latent.shape[1], -1, -1) if mask.shape[1] == 1 else mask
    if mask.shape[0] != latent.shape[0]:
        mask = mask.repeat(math.ceil(latent.shape[0] / mask.shape[0]), 1, 1, 1)[: latent.shape[0]]
    return mask.unsqueeze(2) if latent.ndim == 5 else mask  # a video latent's frames share the mask


def _areas_as_fractions(conds: CondList, latent: Tensor) -> CondList:
    """Areas in latent pixels as fractions of `latent`'s size, so that they follow a latent that grows while it is
    sampled (at its first size they are the same pixels)."""
    height, width = latent.shape[-2:]
    out = []
    for embedding, options in conds:
        area = options.get("area")
        if area is not None and area[0] != "percentage":
            h, w, y, x = area
            options = {**options, "area": ("percentage", h / height, w / width, y / height, x / width)}
        out.append((embedding, options))
    return out


def _check_mask_size(x: Tensor, latent: Tensor, sampler_name: str) -> None:
    if x.shape != latent.shape:
        raise ValueError(f"{sampler_name} resized the latent from {tuple(latent.shape[-2:])} to "
                         f"{tuple(x.shape[-2:])} while sampling, and a noise mask (SetLatentNoiseMask, "
                         "VAEEncodeForInpaint) keeps the unmasked part at the first size: inpaint with another "
                         "sampler (or scale_ratio 1), then upscale the result")


def _finish(wrappers: list[GuidanceWrapper], failed: bool) -> None:
    """End each guidance wrapper's run. After a failed run a wrapper that fails to finish is logged, so that the
    sampler's own exception is the one raised; after a good run the first such failure is raised, all finished."""
    error: Exception | None = None
    for wrapper in wrappers:
        try:
            wrapper.finish()
        except Exception as exc:
            if failed:
                log.exception("a guidance wrapper (%s) failed to finish a failed sampling run", type(wrapper).__name__)
            elif error is None:
                error = exc
    if error is not None:
        raise error


def sample(
    unet: UNet | None,
    schedule_or_denoiser: DiscreteSchedule | Denoiser,
    latent: Tensor,
    *,
    seed: int,
    steps: int = 20,
    cfg: float,
    sampler_name: str,
    scheduler: str = "normal",
    positive: CondList,
    negative: CondList,
    denoise: float = 1.0,
    sigmas: Tensor | None = None,
    start_step: int | None = None,
    end_step: int | None = None,
    add_noise: bool = True,
    return_leftover_noise: bool = False,
    noise_mask: Tensor | None = None,
    noise_parts: tuple[tuple[int, ...], ...] | None = None,
    batch_index: list[int] | None = None,
    callback: Callable[[int, int, Tensor], None] | None = None,
    interrupt: Callable[[], bool] | None = None,
    prediction: str = "eps",
    sampler_options: dict | None = None,
    patches: SamplingPatches | None = None,
    module: torch.nn.Module | None = None,
    dual: DualCfg | None = None,
    concat: Tensor | None = None,
    clean_kept: bool = False,
) -> Tensor:
    """Sample a latent (in model space, i.e. already times the VAE scaling factor).

    `sigmas` (high to low, usually ending in 0) replaces the schedule that `scheduler`, `steps` and
    `denoise` would make: the custom sampling nodes build it themselves.
    `start_step`/`end_step` cut the schedule for two-stage runs; unless `return_leftover_noise`,
    a run cut short by `end_step` still ends at sigma 0. `noise_mask` (1 = repaint, 0 = keep)
    holds the unmasked latents at the original, re-noised to each step's level, and restores them
    exactly at the end. `noise_parts` are the parts' shapes of a packed latent (`ldm.sampling.av_latent`),
    whose initial noise is drawn part by part. `callback(step, total, x0)` follows each step; `interrupt()` is polled
    before every model call: it may raise itself, or return True to raise SamplingInterrupted.
    `patches` change how guidance combines predictions and how the mask evolves over the run, may wrap each guided
    evaluation (`SamplingPatches.around_guidance`, their wrappers made when the run starts and finished when it ends)
    and may have the negative prompt predicted by another module (`negative_by`); those that run a patched copy of
    the UNet need its `module` (default: `unet`, if it is one), whose `initial_noise` may also reorder the initial
    noise (context windows' FreeNoise, `noise.model_noise`). The run is published as `ldm.sampling.run`'s current
    run (its levels, and each model call's level and step, recorded before the call). `dual` adds
    DualCFGGuider's second positive prompt. `concat` [B, C, H, W] is appended to the UNet's input channels
    (an inpainting model's mask and masked image; entries may carry their own, see `guidance`). `clean_kept`
    gives the model the kept part of a masked latent as it is rather than re-noised to each level, for models told
    the mask as per-token noise levels (`ldm.sampling.masked_timesteps`: LTX-Video's and Wan 2.2 5B's
    image-to-video, ComfyUI's scale_latent_inpaint).
    """
    sampler_name = SAMPLER_ALIASES.get(sampler_name, sampler_name)
    sampler = SAMPLERS.get(sampler_name) or RESIZING_SAMPLERS.get(sampler_name)
    if sampler is None:
        raise ValueError(f"unknown sampler {sampler_name!r}; expected one of {SAMPLER_NAMES}")
    if isinstance(schedule_or_denoiser, Denoiser):
        denoiser = schedule_or_denoiser
    else:
        denoiser = Denoiser(unet, schedule_or_denoiser, prediction)
    schedule = denoiser.schedule
    flow = denoiser.prediction == "flow"
    if flow and sampler_name in _STOCHASTIC - _FLOW_STOCHASTIC:
        # Their fresh noise is added the variance-exploding way (x + sigma * noise), which a flow latent is not.
        raise ValueError(f"{sampler_name} adds noise as SD models take it, not as a rectified-flow model (Flux) "
                         "does; choose a sampler without noise of its own, such as euler, heun, dpmpp_2m or deis, "
                         f"or one that re-noises a flow latent: {', '.join(sorted(_FLOW_STOCHASTIC))}")

    if sigmas is None:
        sigmas = compute_sigmas(schedule, scheduler, steps, denoise, sampler_name)
    else:
        sigmas = sigmas.detach().to("cpu", torch.float32).flatten().clone()  # cut below: never the caller's
        check_sigmas(sigmas, sampler_name)
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[: end_step + 1]
        if not return_leftover_noise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return latent
        sigmas = sigmas[start_step:]
    if len(sigmas) == 0:
        return latent

    # Read on the CPU, before the move: no device synchronisation.
    sigma_start, no_step = float(sigmas[0]), len(sigmas) == 1 or float(sigmas.max()) == 0
    sigma_end = float(sigmas[-1])
    run_levels = sigmas  # on the CPU, for models that read them (`ldm.sampling.run`)
    patches = patches or SamplingPatches()
    # A mask function sees the run's progress as a timestep fraction: 1 at the first level, 0 at the last
    # (or at the schedule's smallest level, if the run ends at 0).
    t_from = schedule.sigma_to_t_scalar(sigma_start)
    t_to = schedule.sigma_to_t_scalar(max(float(sigmas[-1]), schedule.sigma_min))
    sigmas = sigmas.to(latent.device)
    noise = prepare_noise(latent, seed, batch_index, noise_parts) if add_noise else torch.zeros_like(latent)
    if add_noise:  # as the model takes it: context windows' FreeNoise reorders it window by window
        noise = model_noise(module if module is not None else unet, noise, seed)
    # From the top of the schedule, start at the variance-preserving scale sqrt(1 + sigma^2): pure
    # noise in DDPM terms (ComfyUI's max_denoise). A flow model mixes noise and latent its own way.
    full = math.isclose(sigma_start, schedule.sigma_max, rel_tol=1e-5) or sigma_start > schedule.sigma_max
    x = denoiser.noise_latent(latent, noise, sigma_start, full)
    if no_step:
        # No step to take: the latent with its noise (a first stage split off at step 0), as in ComfyUI.
        x = x if noise_mask is None else torch.lerp(latent, x, latent_mask(noise_mask, latent))
        return denoiser.unscaled(x, sigma_end)

    if module is None and isinstance(unet, torch.nn.Module):
        module = unet
    options = dict(sampler_options or {})
    if flow and sampler_name in _FLOW_STOCHASTIC | _FLOW_SDE:
        options["flow"] = True
    if flow and sampler_name in _FLOW_SDE and float(sigmas[0]) >= 1:
        # The Brownian tree below still spans the schedule as given (ComfyUI builds it before the offset).
        sampler_sigmas = sigmas.clone()
        sampler_sigmas[0] = schedule.sigma_at_percent(1e-4)
    else:
        sampler_sigmas = sigmas
    if sampler_name in RESIZING_SAMPLERS:
        positive, negative = _areas_as_fractions(positive, latent), _areas_as_fractions(negative, latent)
        if dual is not None:
            dual = dataclasses.replace(dual, middle=_areas_as_fractions(dual.middle, latent))
    post_cfg = patches.post_cfg
    if sampler_name in _CFG_PP:
        options["uncond"] = capture = samplers_cfgpp.UncondCapture()
        post_cfg = (capture, *post_cfg)
    hooked = None
    if entry_hooks(positive, negative, dual.middle if dual is not None else ()):
        if module is None:
            raise ValueError("prompts with hooks (LoRAs for some prompts) need the UNet module to patch")
        # The hooked entries' UNets: patched copies of the module, uncompiled, for this run only.
        hooked = HookedUNets(module, schedule.sigma_at_percent,
                             lambda m: Denoiser(m, schedule, denoiser.prediction, denoiser.quantize))
    guider = CFGGuider(denoiser, positive, negative, cfg, cfg_function=patches.cfg_function, post_cfg=post_cfg,
                       module=module, keep_negative=sampler_name in _CFG_PP or patches.keep_negative, dual=dual,
                       concat=concat, pre_cfg=patches.pre_cfg, hooked=hooked, parts=noise_parts,
                       negative_by=patches.negative_by)
    wrappers: list[GuidanceWrapper] = []  # this run's (LazyCache's cache), made when it starts
    guide: Callable[[Tensor, Tensor], Tensor] = guider
    run: SamplingRun | None = None
    mask = None if noise_mask is None else latent_mask(noise_mask, latent)
    last_mask = [mask]  # the mask of the last model call, which the result is finally held to

    prefetcher: PrefetchingNoiseSampler | None = None

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        if interrupt is not None and interrupt():
            raise SamplingInterrupted("sampling interrupted")
        if prefetcher is not None:
            prefetcher.start()  # the noise is drawn while the model runs (a no-op after the first call)
        level = uniform_level(sigma)  # the sampler's level tensor carries its float: no device read
        if run is not None:
            run.record(level)  # the call's step, for context windows
        if mask is None:
            return guide(x, sigma)
        _check_mask_size(x, latent, sampler_name)
        step_mask = mask
        if patches.denoise_mask is not None:
            t = schedule.sigma_to_t_scalar(level if level is not None else float(sigma.reshape(-1)[0]))
            step_mask = patches.denoise_mask(mask, (t - t_to) / (t_from - t_to) if t_from > t_to else 0.0)
            last_mask[0] = step_mask
        if clean_kept:
            x = x * step_mask + latent * (1 - step_mask)
        else:
            levels = sigma.reshape(-1, *([1] * (x.ndim - 1)))
            x = x * step_mask + denoiser.noise_latent(latent, noise, levels) * (1 - step_mask)
        return guide(x, sigma) * step_mask + latent * (1 - step_mask)

    total = len(sigmas) - 1
    on_step = None if callback is None else (lambda d: callback(d["i"], total, d["denoised"]))
    if sampler_name in _BROWNIAN and "noise_sampler" not in options:
        positive_sigmas = sigmas[sigmas > 0]
        tree = BrownianTreeNoiseSampler(x, float(positive_sigmas.min()), float(positive_sigmas.max()), seed)
        prefetcher = PrefetchingNoiseSampler(tree.cpu_increment, _brownian_queries(
            sampler_name, sampler_sigmas.tolist(), options), x.device, x.dtype)
        options["noise_sampler"] = prefetcher
    elif sampler_name in _DRAW_AHEAD and "noise_sampler" not in options:
        levels = sigmas.tolist()
        prefetcher = PrefetchingNoiseSampler(seeded_noise_sampler(x, step_noise_seed(seed), cpu=True),
                                             list(zip(levels, levels[1:], strict=False)), x.device, x.dtype,
                                             by_query=False)
        options["noise_sampler"] = prefetcher
    elif sampler_name in _STEP_NOISE:
        options.setdefault("noise_sampler", seeded_noise_sampler(x, step_noise_seed(seed)))
    elif sampler_name in RESIZING_SAMPLERS:
        options.setdefault("seed", step_noise_seed(seed))  # drawn at each step's size: lcm's draws while it stays
    if sampler_name.startswith("sa_solver") and "tau_func" not in options:  # noise over 20%-80% of this schedule
        options["tau_func"] = samplers_stochastic.sa_solver_tau(schedule.sigma_at_percent(0.2),
                                                                schedule.sigma_at_percent(0.8))
    failed = True
    try:
        with sampling_run(run_levels) as run, cfg_override(None):  # an override around an outer run stays there
            wrappers.extend(make(run_levels) for make in patches.around_guidance)
            for wrapper in reversed(wrappers):
                guide = partial(wrapper, guide=guide)
            x = sampler(model, x, sampler_sigmas, callback=on_step, **options)
        failed = False
    finally:
        if prefetcher is not None:
            prefetcher.close()
        if hooked is not None:
            hooked.close()
        _finish(wrappers, failed)
    if mask is not None:
        _check_mask_size(x, latent, sampler_name)  # a resize after the last step, which no model call saw
        x = x * last_mask[0] + latent * (1 - last_mask[0])
    # A run that stops above 0 leaves its noise in: a flow model's sample is scaled for the next run to take back.
    return denoiser.unscaled(x, sigma_end)
