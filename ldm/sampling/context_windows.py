"""Context windows (ComfyUI's comfy/context_windows.py, nodes ContextWindowsManual, WanContextWindowsManual and
LTXVContextWindows): a video latent longer than the model's context is denoised in overlapping windows of frames,
each model call run once per window and the windows' outputs fused, frame by frame, with weights (FreeNoise, Qiu et
al. 2023, "FreeNoise: Tuning-Free Longer Video Diffusion via Noise Rescheduling"; the schedules are AnimateDiff's,
after neggles' animatediff-cli).

The model's UNet becomes a shallow copy (weights shared, `ldm.lora.shallow_copy`) whose class windows its
`forward(x, timesteps, context, **inputs)` along `dim` (2, the frames of [B, C, T, H, W]) when `x` has more frames
than `context_length`; otherwise it is the plain forward. For each window (its frame indices from the schedule):

- `x` is cut to the window's frames, and so is every input laid out as `x` is with the same frames there (an
  image-to-video model's mask and start image, `y`; `denoise_mask`; a Fun camera's embedding), VACE's
  `vace_context` [B, n, C, T, H, W] one axis further, and per-frame timesteps [B, T, ...]. An image-to-video model's
  channels beyond the latent's (the sampler appends them to `x`) are conditioning, as ComfyUI's `c_concat`.
- `causal_window_fix`: a window that does not start at frame 0 gets the frame before it first, and that frame's
  output is dropped.
- `cond_retain_index_list` / `latent_retain_index_list`: positions k of the window (counting the causal frame) take
  frame k of the whole video in the conditioning inputs / in the latent's own channels (the start image in every
  window).
- Fusing (ComfyUI's fuse methods): "flat", "pyramid" and "overlap-linear" add each window's output times its
  weights and divide by the summed weights; "relative" is a running weighted average, each position's weight its
  closeness to the window's middle.

The schedules are ComfyUI's: "standard_static" (fixed windows, the last moved back to end at the last frame),
"batched" (no overlap, the last window shorter), "standard_uniform" and "looped_uniform" (windows shifted at each
sampling step by an ordered halving of the step index, with strides 1, 2, 4, ... up to `context_stride`; looped ones
wrap round the end, standard ones are moved back within the video, duplicates dropped). The step is the one the
sampler records for each model call on the sampling run (`ldm.sampling.run.SamplingRun.record`: the index of the
call's level among the run's, ComfyUI's set_step); a call between them (a multistep sampler's substep) keeps the last.
A call within a run that no sampler recorded (a model called by hand inside `sampling_run`) is located by its
timestep against the schedule the node saw; outside a run the step is 0.

FreeNoise (`freenoise`): the initial noise's frames past the first window repeat, shuffled, the frames a window
length before them, so that windows start from correlated noise; `ldm.sampling.noise.model_noise` applies it.

Not as ComfyUI: the windows are taken per model call on the raw output (velocity, eps), where ComfyUI fuses the
denoised predictions; as each frame's x0 is affine in its output with the frame's own latent, the two are the same,
but for `latent_retain_index_list` without `causal_window_fix`, where ComfyUI's x0 at the retained position is
taken from the retained frame's latent. Splitting several prompts over the windows (`split_conds_to_windows`) and
LTX-Video's keyframe guides (LTXVAddGuide) are not windowed: refused.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ldm.lora import shallow_copy
from ldm.sampling.run import RTOL, current_run

SCHEDULES = ("standard_static", "standard_uniform", "looped_uniform", "batched")  # the nodes' combo order
FUSE_METHODS = ("pyramid", "relative", "flat", "overlap-linear")
STEP_SCHEDULES = ("standard_uniform", "looped_uniform")  # those that change with the sampling step


def ordered_halving(value: int) -> float:
    """`value`'s 64 bits reversed, as a fraction of 2^64: 0, 1/2, 1/4, 3/4, 1/8, ... for 0, 1, 2, 3, 4, ..."""
    return int(f"{value:064b}"[::-1], 2) / (1 << 64)


def _uniform(frames: int, length: int, overlap: int, stride: int, step: int, end_pad: int) -> list[list[int]]:
    """Windows of `length` frames taken every `length * s - overlap` frames, for strides s = 1, 2, 4, ... (at most
    `stride` of them, and no more than the video's length calls for), each shifted by the step's ordered halving;
    frame indices wrap round the end."""
    strides = min(stride, int(math.ceil(math.log2(frames / length))) + 1)
    shift = ordered_halving(step)
    pad = int(round(frames * shift))
    windows = []
    for s in (1 << i for i in range(strides)):
        for start in range(int(shift * s) + pad, frames + pad + end_pad, length * s - overlap):
            windows.append([e % frames for e in range(start, start + length * s, s)])
    return windows


def looped_uniform(frames: int, length: int, overlap: int, stride: int = 1, step: int = 0,
                   closed_loop: bool = False) -> list[list[int]]:
    """Uniform windows that wrap round the end of the video; `closed_loop` adds the windows that join the end back
    to the start."""
    if frames < length:
        return [list(range(frames))]
    return _uniform(frames, length, overlap, stride, step, 0 if closed_loop else -overlap)


def _rolls_over(window: list[int]) -> int | None:
    """The position where a window's indices wrap round to lower ones, None if they do not."""
    return next((i for i in range(1, len(window)) if window[i] < window[i - 1]), None)


def _moved_to_end(window: list[int], frames: int) -> list[int]:
    """A window's spacing, its first index moved to 0, then the whole slid to end at the last frame."""
    relative = [(i - window[0] + frames) % frames for i in window]
    return [i + frames - 1 - relative[-1] for i in relative]


def standard_uniform(frames: int, length: int, overlap: int, stride: int = 1, step: int = 0) -> list[list[int]]:
    """Uniform windows, those that would wrap round moved back to end at the last frame (with a window starting
    where the wrapped part began, when the next window does not hold that frame); repeated windows dropped."""
    if frames <= length:
        return [list(range(frames))]
    windows = _uniform(frames, length, overlap, stride, step, -overlap)
    repeated = []
    i = 0
    while i < len(windows):
        roll = _rolls_over(windows[i])
        if roll is not None:
            wrapped = windows[i][roll]
            windows[i] = _moved_to_end(windows[i], frames)
            if wrapped not in windows[(i + 1) % len(windows)]:
                windows.insert(i + 1, list(range(wrapped, wrapped + length)))
        if any(windows[i] == windows[j] for j in range(i)):
            repeated.append(i)
        i += 1
    return [w for i, w in enumerate(windows) if i not in repeated]


def standard_static(frames: int, length: int, overlap: int) -> list[list[int]]:
    """Windows every `length - overlap` frames, the same at every step; the last moved back to end at the last
    frame."""
    if frames <= length:
        return [list(range(frames))]
    windows = []
    for start in range(0, frames, length - overlap):
        if start + length >= frames:
            windows.append(list(range(frames - length, frames)))
            break
        windows.append(list(range(start, start + length)))
    return windows


def batched(frames: int, length: int) -> list[list[int]]:
    """Windows side by side without overlap, the last one shorter if the frames do not divide evenly."""
    if frames <= length:
        return [list(range(frames))]
    return [list(range(start, min(start + length, frames))) for start in range(0, frames, length)]


def context_windows(schedule: str, frames: int, length: int, overlap: int, stride: int = 1, step: int = 0,
                    closed_loop: bool = False) -> list[list[int]]:
    """The frame indices of each window of `schedule` over `frames` frames at sampling step `step`."""
    if schedule == "standard_static":
        return standard_static(frames, length, overlap)
    if schedule == "batched":
        return batched(frames, length)
    if schedule == "standard_uniform":
        return standard_uniform(frames, length, overlap, stride, step)
    if schedule == "looped_uniform":
        return looped_uniform(frames, length, overlap, stride, step, closed_loop)
    raise ValueError(f"unknown context_schedule {schedule!r}; expected one of {SCHEDULES}")


def fuse_weights(method: str, window: Sequence[int], frames: int, overlap: int) -> Tensor:
    """The weight [len(window)] of each position of a window over `frames` frames: "flat" 1; "pyramid" (and
    "relative", whose running average uses them no further) 1, 2, ... up to the middle and back down;
    "overlap-linear" 1 but for a ramp over the first `overlap` positions (not in the first window) and a ramp down
    over the last (not in the last window), from and to 1e-37."""
    length = len(window)
    if method == "flat":
        return torch.ones(length)
    if method in ("pyramid", "relative"):
        half = (length + 1) // 2
        rising = list(range(1, half + 1))
        return torch.tensor(rising + rising[::-1][length % 2:], dtype=torch.float32)
    if method == "overlap-linear":
        weights = torch.ones(length)
        if overlap > 0 and min(window) > 0:
            weights[:overlap] = torch.linspace(1e-37, 1, overlap)
        if overlap > 0 and max(window) < frames - 1:
            weights[-overlap:] = torch.linspace(1, 1e-37, overlap)
        return weights
    raise ValueError(f"unknown fuse_method {method!r}; expected one of {FUSE_METHODS}")


def relative_bias(window: Sequence[int], index: int) -> float:
    """The "relative" fuse's weight of frame `index` in a window: 1 at its middle, falling to 0.01 at its ends."""
    first, last = window[0], window[-1]
    return max(1e-2, 1 - abs(index - (first + last) / 2) / ((last - first + 1e-2) / 2))


def freenoise(noise: Tensor, dim: int, length: int, overlap: int, seed: int) -> Tensor:
    """FreeNoise's noise rescheduling (ComfyUI's apply_freenoise, after AnimateDiff-Evolved): a copy of `noise`
    whose frames (along `dim`) from `length` on are, `length - overlap` at a time, a seeded shuffle of the frames
    `length` before them (the shuffles' sources already rescheduled)."""
    noise = noise.clone()
    generator = torch.Generator(device="cpu").manual_seed(int(seed) % 2**64)
    frames, delta = noise.shape[dim], length - overlap
    if delta <= 0:
        raise ValueError(f"FreeNoise needs context_overlap ({overlap}) below context_length ({length})")
    for start in range(0, frames - length, delta):
        place = start + length
        count = min(delta, frames - place)
        if count <= 0:
            break
        source = torch.randperm(count, generator=generator) + start
        noise.narrow(dim, place, count).copy_(noise.index_select(dim, source.to(noise.device)))
    return noise


def _take(full: Tensor, dim: int, indices: list[int], retain: Sequence[int]) -> Tensor:
    """`full`'s entries `indices` along `dim`, then positions `retain` of the result set to `full`'s same positions
    (ComfyUI's get_tensor with a retain_index_list)."""
    window = full.index_select(dim, torch.tensor(indices, device=full.device))
    if retain:
        where = torch.tensor(list(retain), device=full.device)
        window.index_copy_(dim, where, full.index_select(dim, where))
    return window


def _add_at(full: Tensor, dim: int, indices: list[int], values: Tensor) -> None:
    """`full[..., indices, ...] += values` along `dim`, with advanced indexing's semantics (a repeated index keeps
    the last write, as ComfyUI's add_window)."""
    index = (slice(None),) * dim + (indices,)
    full[index] += values


@dataclass(frozen=True, eq=False)
class ContextWindows:
    """Context windows as a UNet copy carries them (see the module docstring). `latent_channels`: the channels of
    `x` that are the latent's (those after are conditioning); `schedule`: the model's noise schedule when the node
    ran, whose timesteps locate a call among the run's levels when the sampler recorded none (see `step`)."""

    context_schedule: str
    fuse_method: str
    context_length: int
    context_overlap: int
    context_stride: int = 1
    closed_loop: bool = False
    dim: int = 2
    freenoise: bool = False
    cond_retain_index_list: tuple[int, ...] = ()
    latent_retain_index_list: tuple[int, ...] = ()
    causal_window_fix: bool = True
    latent_channels: int | None = None
    schedule: Any = None

    def __post_init__(self) -> None:
        if self.context_schedule not in SCHEDULES:
            raise ValueError(f"unknown context_schedule {self.context_schedule!r}; expected one of {SCHEDULES}")
        if self.fuse_method not in FUSE_METHODS:
            raise ValueError(f"unknown fuse_method {self.fuse_method!r}; expected one of {FUSE_METHODS}")
        if self.context_length < 1:
            raise ValueError(f"context_length must be at least 1, not {self.context_length}")
        if self.context_schedule != "batched" and not 0 <= self.context_overlap < self.context_length:
            raise ValueError(f"context_overlap ({self.context_overlap}) must be below context_length "
                             f"({self.context_length}) for the {self.context_schedule} schedule")
        if self.freenoise and self.context_overlap >= self.context_length:
            raise ValueError(f"FreeNoise needs context_overlap ({self.context_overlap}) below context_length "
                             f"({self.context_length})")

    def step(self, timesteps: Tensor) -> int:
        """The sampling step of a call at `timesteps`: the step the sampler recorded for it on the run (whatever
        schedule a later ModelSampling node gave the model); for a call it did not record, the index of the
        timestep among the run's levels mapped through the node's schedule (the last step found for a level between
        them); 0 outside a run."""
        run = current_run()
        if run is None:
            return 0
        if run.level is not None:
            return run.step
        state = run.state.setdefault(self, {"step": 0, "levels": None})
        if state["levels"] is None:
            state["levels"] = [self._timestep(float(s)) for s in run.sigmas]
        level = float(timesteps.reshape(-1)[0])
        for index, known in enumerate(state["levels"]):
            if known is not None and math.isclose(known, level, rel_tol=RTOL):
                state["step"] = index
                break
        return state["step"]

    def _timestep(self, sigma: float) -> float | None:
        if sigma <= 0 or self.schedule is None:
            return None
        return float(self.schedule.unet_timestep(self.schedule.sigma_to_t_scalar(sigma)))

    def initial_noise(self, noise: Tensor, seed: int) -> Tensor:
        """The sampling run's initial noise: FreeNoise's rescheduling of it when asked for, else itself."""
        if not self.freenoise or noise.ndim <= self.dim:
            return noise
        return freenoise(noise, self.dim, self.context_length, self.context_overlap, seed)

    def windows(self, frames: int, timesteps: Tensor) -> list[list[int]]:
        step = self.step(timesteps) if self.context_schedule in STEP_SCHEDULES else 0
        return context_windows(self.context_schedule, frames, self.context_length, self.context_overlap,
                               self.context_stride, step, self.closed_loop)

    # The window loop runs eagerly (its indices change with the step, which a compiled graph would guard on and
    # recompile for); each window's forward may still be compiled, once per window length.
    @torch.compiler.disable(recursive=False)
    def __call__(self, forward: Callable[..., Tensor], x: Tensor, timesteps: Tensor, context: Tensor,
                 inputs: dict[str, Any]) -> Tensor:
        """`forward(x, timesteps, context, **inputs)`, window by window when `x` has more than `context_length`
        frames along `dim`."""
        dim = self.dim
        if x.ndim <= dim or x.shape[dim] <= self.context_length:
            return forward(x, timesteps, context, **inputs)
        if dim < 2:
            raise ValueError(f"context windows along dim {dim} of a model input {tuple(x.shape)}: Loom windows a "
                             "latent's frames (dim 2 of [B, C, T, H, W], as the Wan and LTXV nodes set), not the batch "
                             "(dim 0, which holds each prompt's rows) nor the channels (dim 1): set dim to 2")
        _refuse_unwindowed(inputs, x)
        frames = x.shape[dim]
        fused: Tensor | None = None
        counts = biases = None
        for window in self.windows(frames, timesteps):
            anchored = self.causal_window_fix and window[0] >= 1
            indices = [window[0] - 1, *window] if anchored else list(window)
            self._check_retained(indices)
            out = forward(self._window_x(x, indices), self._window_timesteps(timesteps, frames, indices), context,
                          **{k: self._window_input(k, v, x, indices) for k, v in inputs.items()})
            if anchored:
                out = out.narrow(dim, 1, out.shape[dim] - 1)
            if fused is None:
                shape = list(out.shape)
                shape[dim] = frames
                fused = torch.zeros(shape, dtype=torch.float32, device=out.device)
                counts = torch.zeros([frames if d == dim else 1 for d in range(out.ndim)], device=out.device)
                biases = [0.0] * frames
            if self.fuse_method == "relative":
                _fuse_relative(fused, biases, out.float(), window, dim)
            else:
                weights = fuse_weights(self.fuse_method, window, frames, self.context_overlap).to(out.device)
                weights = weights.reshape([len(window) if d == dim else 1 for d in range(out.ndim)])
                _add_at(fused, dim, window, out.float() * weights)
                _add_at(counts, dim, window, weights)
        assert fused is not None and counts is not None
        if self.fuse_method != "relative":
            fused = fused / counts
        return fused.to(x.dtype)

    def _check_retained(self, indices: list[int]) -> None:
        for name, retained in (("cond_retain_index_list", self.cond_retain_index_list),
                               ("latent_retain_index_list", self.latent_retain_index_list)):
            if retained and max(retained) >= len(indices):
                raise ValueError(f"{name} {list(retained)} names a position past a window of {len(indices)} frames"
                                 f" (context_length {self.context_length})")

    def _window_x(self, x: Tensor, indices: list[int]) -> Tensor:
        """The latent's channels with `latent_retain_index_list`, the conditioning channels after them with
        `cond_retain_index_list`."""
        channels = x.shape[1] if self.latent_channels is None else min(self.latent_channels, x.shape[1])
        latent = _take(x[:, :channels], self.dim, indices, self.latent_retain_index_list)
        if channels == x.shape[1]:
            return latent
        extra = _take(x[:, channels:], self.dim, indices, self.cond_retain_index_list)
        return torch.cat([latent, extra], dim=1)

    def _window_timesteps(self, timesteps: Tensor, frames: int, indices: list[int]) -> Tensor:
        """Per-frame timesteps [B, T, ...] (of the frames axis, dim 2) windowed; one per video as they are."""
        if self.dim == 2 and timesteps.ndim >= 2 and timesteps.shape[1] == frames:
            return _take(timesteps, 1, indices, self.cond_retain_index_list)
        return timesteps

    def _window_input(self, name: str, value: Any, x: Tensor, indices: list[int]) -> Any:
        """An input laid out as `x` with its frames windowed (VACE's controls one axis further); others as they
        are."""
        if not isinstance(value, Tensor):
            return value
        frames = x.shape[self.dim]
        axis = self.dim + 1 if name == "vace_context" else self.dim
        if value.ndim == x.ndim + (axis - self.dim) and value.shape[axis] == frames:
            return _take(value, axis, indices, self.cond_retain_index_list)
        return value


def _fuse_relative(fused: Tensor, biases: list[float], out: Tensor, window: list[int], dim: int) -> None:
    """The "relative" fuse: each frame the running average of its windows' outputs, weighted by `relative_bias`."""
    for position, index in enumerate(window):
        bias = relative_bias(window, index)
        total = biases[index]
        at = (slice(None),) * dim + (index,)
        fused[at] = fused[at] * (total / (total + bias)) + out[(slice(None),) * dim + (position,)] * (
            bias / (total + bias))
        biases[index] = total + bias


def _refuse_unwindowed(inputs: dict[str, Any], x: Tensor) -> None:
    if inputs.get("control") is not None:
        raise ValueError("a ControlNet's residuals cannot be cut into context windows: remove the ControlNet or the "
                         "context windows node")
    y = inputs.get("y")  # LTX-Video's: the frame rate, then its guides' keyframe coordinates
    guided = x.ndim == 5 and isinstance(y, Tensor) and y.ndim == 2 and y.shape[-1] > 1
    if inputs.get("keyframe_idxs") is not None or guided:
        raise ValueError("LTX-Video keyframe guides (LTXVAddGuide) are not cut into context windows in Loom: sample "
                         "without the guides, or without the context windows node")


class ContextWindowsUNet(nn.Module):
    """Marks the classes `windowed_class` makes (see `windowed_unet`)."""


@functools.cache
def windowed_class(base: type) -> type:
    """`base` whose forward runs in context windows, its settings the instance's `context_windows`."""
    if issubclass(base, ContextWindowsUNet):
        return base

    class Windowed(base, ContextWindowsUNet):
        def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, **inputs: Any) -> Tensor:
            return self.__dict__["context_windows"](super().forward, x, timesteps, context, inputs)

        def initial_noise(self, noise: Tensor, seed: int) -> Tensor:
            return self.__dict__["context_windows"].initial_noise(noise, seed)

    Windowed.__name__ = Windowed.__qualname__ = f"ContextWindows{base.__name__}"
    return Windowed


def windowed_unet(unet: nn.Module, settings: ContextWindows) -> nn.Module:
    """A copy of `unet` (sharing its weights) that runs in context windows; a windowed one gets the new settings."""
    windowed = shallow_copy(unet)
    windowed.__class__ = windowed_class(type(unet))
    windowed.__dict__["context_windows"] = settings
    windowed.cuda_graphs_safe = False  # windows of other lengths (the batched schedule's last) and host reads
    return windowed
