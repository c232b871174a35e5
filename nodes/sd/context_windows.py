"""ComfyUI's context-window nodes (comfy_extras/nodes_context_windows.py): ContextWindowsManual, and its presets for
Wan (WanContextWindowsManual) and LTX-Video (LTXVContextWindows), which take lengths in video frames and turn them
into latent frames (Wan's 4 video frames to a latent frame, LTX-Video's 8) along dim 2. The MODEL's UNet becomes a
copy that samples long latents in overlapping windows (`ldm.sampling.context_windows`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ldm.sampling.context_windows import FUSE_METHODS, SCHEDULES, ContextWindows, windowed_unet
from nodes.node import Node
from nodes.sd.conditioning import MAX_RESOLUTION
from nodes.sd.models import DiffusionModel
from nodes.spec import Boolean, Combo, Int, Output, Socket, String

_ADVANCED = {"advanced": True}
_MODEL_IN = "The model to apply context windows to during sampling."
_SCHEDULE = "Step-dependent scheduling algorithm for context windows."
_STRIDE = "The stride of the context window; only applicable to uniform schedules."
_LOOP = "Whether to close the context window loop; only applicable to looped schedules."
_FUSE = "The method to use to fuse the context windows."
_FREENOISE = "Whether to apply FreeNoise noise shuffling, improves window blending."
_SPLIT = ("Whether to split multiple conditionings (created by ConditionCombine) to each window based on region "
          "index.")


def index_list(node: str, name: str, text: str) -> tuple[int, ...]:
    """A comma-separated list of latent indices ("" for none), as ComfyUI parses it."""
    if not text.strip():
        return ()
    try:
        indices = tuple(int(part.strip()) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{node}: {name} {text!r} is not a comma-separated list of latent indices, such as '0' or "
                         "'0, 1'") from None
    if any(i < 0 for i in indices):
        raise ValueError(f"{node}: {name} {text!r} holds a negative index; latent indices count from 0")
    return indices


def with_context_windows(node: str, model: DiffusionModel, context_length: int, context_overlap: int,
                         context_schedule: str, context_stride: int, closed_loop: bool, fuse_method: str, dim: int,
                         freenoise: bool, cond_retain_index_list: str = "", split_conds_to_windows: bool = False,
                         latent_retain_index_list: str = "", causal_window_fix: bool = True) -> DiffusionModel:
    """`model` whose UNet is a copy that samples in context windows (the given one is left as it was)."""
    if split_conds_to_windows:
        raise ValueError(f"{node}: split_conds_to_windows (one of several combined prompts per window) is not "
                         "supported in Loom; set it to false, or sample each part with its own prompt")
    family = model.family
    channels = getattr(family, "latent_channels", None)
    if channels is None and getattr(family, "vae_config", None) is not None:
        channels = family.vae_config.z_channels
    try:
        settings = ContextWindows(
            context_schedule, fuse_method, context_length, context_overlap, context_stride, closed_loop, dim,
            freenoise, index_list(node, "cond_retain_index_list", cond_retain_index_list),
            index_list(node, "latent_retain_index_list", latent_retain_index_list), causal_window_fix, channels,
            model.schedule)
    except ValueError as error:
        raise ValueError(f"{node}: {error}") from None
    return replace(model, unet=windowed_unet(model.unet, settings),
                   loras=(*model.loras, f"context windows {context_length}/{context_overlap}"))


class ContextWindowsManual(Node):
    """Manually set context windows."""

    display_name = "Context Windows (Manual)"
    category = "model_patches"
    model = Socket("MODEL", tooltip=_MODEL_IN)
    context_length = Int(16, min=1, tooltip="The length of the context window.")
    context_overlap = Int(4, min=0, tooltip="The overlap of the context window.")
    context_schedule = Combo(SCHEDULES, default="standard_static", tooltip=_SCHEDULE)
    context_stride = Int(1, min=1, tooltip=_STRIDE)
    closed_loop = Boolean(False, tooltip=_LOOP)
    fuse_method = Combo(FUSE_METHODS, default="pyramid", tooltip=_FUSE)
    dim = Int(0, min=0, max=5, tooltip="The dimension to apply the context windows to.")
    freenoise = Boolean(False, tooltip=_FREENOISE)
    cond_retain_index_list = String("", tooltip=(
        "List of latent indices to retain in the conditioning tensors for each window. For concat-style I2V models "
        "(e.g. Wan I2V, HunyuanVideo I2V, Cosmos I2V, SVD) the encoded start image lives in the c_concat "
        "conditioning channels; setting this to '0' will retain that start image content at sub-pos 0 of every "
        "window."))
    split_conds_to_windows = Boolean(False, tooltip=_SPLIT)
    latent_retain_index_list = String("", tooltip=(
        "List of latent indices to retain in the noise latent itself for each window. Use for workflows where "
        "reference content (e.g. a start image) lives directly in the noise latent rather than in separate "
        "conditioning channels (e.g. inplace-style I2V like LTXV, AnimateDiff). Independent of "
        "cond_retain_index_list."))
    causal_window_fix = Boolean(True, tooltip="Whether to add a causal fix frame to non-0-indexed context windows.")
    outputs = (Output("MODEL", tooltip="The model with context windows applied during sampling."),)

    def execute(self, model: DiffusionModel, context_length: int, context_overlap: int, context_schedule: str,
                context_stride: int, closed_loop: bool, fuse_method: str, dim: int, freenoise: bool,
                cond_retain_index_list: str = "", split_conds_to_windows: bool = False,
                latent_retain_index_list: str = "", causal_window_fix: bool = True) -> tuple[DiffusionModel]:
        return (with_context_windows(self.name, model, context_length, context_overlap, context_schedule,
                                     context_stride, closed_loop, fuse_method, dim, freenoise, cond_retain_index_list,
                                     split_conds_to_windows, latent_retain_index_list, causal_window_fix),)


class WanContextWindowsManual(Node):
    """Set context windows for Wan-like models."""

    display_name = "Wan Context Windows"
    category = "model_patches"
    model = Socket("MODEL", tooltip=_MODEL_IN)
    context_length = Int(81, min=1, max=MAX_RESOLUTION, step=4,
                         tooltip="The length of the context window in real frames. Must be 4*n + 1.")
    context_overlap = Int(30, min=0, tooltip="The overlap of the context window in real frames.")
    context_schedule = Combo(SCHEDULES, default="standard_uniform", tooltip=_SCHEDULE)
    context_stride = Int(1, min=1, tooltip=_STRIDE, extra=_ADVANCED)
    closed_loop = Boolean(False, tooltip=_LOOP, extra=_ADVANCED)
    fuse_method = Combo(FUSE_METHODS, default="pyramid", tooltip=_FUSE)
    freenoise = Boolean(True, tooltip=_FREENOISE, extra=_ADVANCED)
    retain_first_frame = Boolean(False, tooltip=(
        "Retain the first I2V frame in every context window (may help retain initial reference)."))
    split_conds_to_windows = Boolean(False, tooltip=_SPLIT, extra=_ADVANCED)
    outputs = (Output("MODEL", tooltip="The model with context windows applied during sampling."),)

    frames_per_latent = 4  # Wan's VAE: 4 video frames to a latent frame (after the first)

    def execute(self, model: DiffusionModel, context_length: int, context_overlap: int, context_schedule: str,
                context_stride: int, closed_loop: bool, fuse_method: str, freenoise: bool,
                retain_first_frame: bool = False, split_conds_to_windows: bool = False) -> tuple[DiffusionModel]:
        n = self.frames_per_latent
        retain = "0" if retain_first_frame else ""
        return (with_context_windows(
            self.name, model, max((context_length - 1) // n + 1, 1), max(context_overlap // n, 0), context_schedule,
            context_stride, closed_loop, fuse_method, 2, freenoise, cond_retain_index_list=retain,
            split_conds_to_windows=split_conds_to_windows, **self.latent_retained(retain)),)

    def latent_retained(self, retain: str) -> dict[str, Any]:
        return {}


class LTXVContextWindows(WanContextWindowsManual):
    """Set context windows for LTXV-like models."""

    display_name = "LTXV Context Windows"
    context_length = Int(145, min=1, max=MAX_RESOLUTION, step=8,
                         tooltip="The length of the context window in real frames. Must be 8*n + 1.")
    context_overlap = Int(40, min=0, step=8, tooltip="The overlap of the context window in real frames.")
    retain_first_frame = Boolean(False, tooltip=(
        "Retain the first latent frame in every context window (may help retain initial reference)."))

    frames_per_latent = 8  # LTX-Video's VAE: 8 video frames to a latent frame (after the first)

    def latent_retained(self, retain: str) -> dict[str, Any]:
        return {"latent_retain_index_list": retain}  # its start image lives in the latent itself


NODES: list[Any] = [ContextWindowsManual, WanContextWindowsManual, LTXVContextWindows]
