"""Hook nodes (ComfyUI's): LoRAs for some prompts only, scheduled over the run (see ldm.sampling.hooks; the
guidance applies them); the nodes that attach them to prompts are in nodes.sd.hook_conditioning."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ldm.lora import check_lora_family
from ldm.sampling.clip_schedule import clip_ranges
from ldm.sampling.hooks import HookKeyframes, Hooks, Keyframe, WeightHook, patched_copy
from nodes.node import Node
from nodes.sd.hook_conditioning import NODES as CONDITIONING_NODES
from nodes.sd.loaders import (
    CheckpointLoaderSimple,
    LoraLoader,
    engine_weight_dtypes,
    load_checkpoint_outputs,
    model_file,
    shared_lora,
)
from nodes.sd.models import Clip
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket

# --- creating and combining hooks ---------------------------------------------------------------------


class CreateHookLora(Node):
    """A hook of a LoRA: it patches the UNet for the prompts that carry it, and the text encoder of a CLIP
    given it by SetClipHooks; the MODEL and CLIP themselves stay as they are."""

    display_name = "Create Hook LoRA"
    category = "advanced/hooks/create"
    lora_name = model_file("loras")
    strength_model = Float(1.0, min=-20.0, max=20.0, step=0.01)
    strength_clip = Float(1.0, min=-20.0, max=20.0, step=0.01)
    prev_hooks = Socket("HOOKS", optional=True)
    outputs = (Output("HOOKS"),)

    fingerprint = LoraLoader.fingerprint

    def execute(self, lora_name: str, strength_model: float, strength_clip: float = 0.0,
                prev_hooks: Hooks | None = None) -> tuple[Hooks]:
        prev_hooks = prev_hooks or Hooks()
        if strength_model == 0 and strength_clip == 0:
            return (prev_hooks,)  # a hook that changes nothing is left out, as in ComfyUI
        lora = shared_lora(self, lora_name)
        return (Hooks.combine([prev_hooks, Hooks((WeightHook(lora, strength_model, strength_clip, lora_name),))]),)


class CreateHookLoraModelOnly(Node):
    """A LoRA hook for the UNet alone (CreateHookLora with strength_clip 0)."""

    display_name = "Create Hook LoRA (MO)"
    category = "advanced/hooks/create"
    lora_name = model_file("loras")
    strength_model = Float(1.0, min=-20.0, max=20.0, step=0.01)
    prev_hooks = Socket("HOOKS", optional=True)
    outputs = (Output("HOOKS"),)

    fingerprint = LoraLoader.fingerprint

    def execute(self, lora_name: str, strength_model: float, prev_hooks: Hooks | None = None) -> tuple[Hooks]:
        return CreateHookLora.execute(self, lora_name, strength_model, 0.0, prev_hooks)


def _model_as_lora(node: Node, ckpt_name: str, strength_model: float, strength_clip: float,
                   prev_hooks: Hooks | None) -> tuple[Hooks]:
    """A hook that moves the hooked prompts' UNet (and a SetClipHooks CLIP) towards a checkpoint's weights."""
    other_model, other_clip, _ = load_checkpoint_outputs(node, ckpt_name, *engine_weight_dtypes(node))
    hook = WeightHook(None, strength_model, strength_clip, ckpt_name, target_unet=other_model.unet,
                      target_clip=other_clip.encoder if strength_clip else None)
    return (Hooks.combine([prev_hooks, Hooks((hook,))]),)


class CreateHookModelAsLora(Node):
    """A hook of another checkpoint of the same kind as the model it is used with: each weight of the UNet that
    runs the hooked prompts (and of the text encoder, with SetClipHooks) becomes W + strength * (W_ckpt - W),
    so that at strength 1 they run with the checkpoint's weights."""

    display_name = "Create Hook Model as LoRA"
    category = "advanced/hooks/create"
    ckpt_name = model_file("checkpoints")
    strength_model = Float(1.0, min=-20.0, max=20.0, step=0.01)
    strength_clip = Float(1.0, min=-20.0, max=20.0, step=0.01)
    prev_hooks = Socket("HOOKS", optional=True)
    outputs = (Output("HOOKS"),)

    fingerprint = CheckpointLoaderSimple.fingerprint

    def execute(self, ckpt_name: str, strength_model: float, strength_clip: float,
                prev_hooks: Hooks | None = None) -> tuple[Hooks]:
        return _model_as_lora(self, ckpt_name, strength_model, strength_clip, prev_hooks)


class CreateHookModelAsLoraModelOnly(Node):
    """CreateHookModelAsLora for the UNet alone."""

    display_name = "Create Hook Model as LoRA (MO)"
    category = "advanced/hooks/create"
    ckpt_name = model_file("checkpoints")
    strength_model = Float(1.0, min=-20.0, max=20.0, step=0.01)
    prev_hooks = Socket("HOOKS", optional=True)
    outputs = (Output("HOOKS"),)

    fingerprint = CheckpointLoaderSimple.fingerprint

    def execute(self, ckpt_name: str, strength_model: float, prev_hooks: Hooks | None = None) -> tuple[Hooks]:
        return _model_as_lora(self, ckpt_name, strength_model, 0.0, prev_hooks)


def _combine_hooks(**groups: Hooks | None) -> tuple[Hooks]:
    return (Hooks.combine(groups[name] for name in sorted(groups)),)


class CombineHooks2(Node):
    """The hooks of both groups together."""

    display_name = "Combine Hooks [2]"
    category = "advanced/hooks/combine"
    hooks_A = Socket("HOOKS", optional=True)
    hooks_B = Socket("HOOKS", optional=True)
    outputs = (Output("HOOKS"),)

    def execute(self, **groups: Hooks) -> tuple[Hooks]:
        return _combine_hooks(**groups)


class CombineHooks4(CombineHooks2):
    """The hooks of all four groups together."""

    display_name = "Combine Hooks [4]"
    hooks_C = Socket("HOOKS", optional=True)
    hooks_D = Socket("HOOKS", optional=True)


class CombineHooks8(CombineHooks4):
    """The hooks of all eight groups together."""

    display_name = "Combine Hooks [8]"
    hooks_E = Socket("HOOKS", optional=True)
    hooks_F = Socket("HOOKS", optional=True)
    hooks_G = Socket("HOOKS", optional=True)
    hooks_H = Socket("HOOKS", optional=True)


# --- scheduling -------------------------------------------------------------------------------------


class CreateHookKeyframe(Node):
    """A keyframe: from start_percent of the run on, the hooks' model strength (and, with SetClipHooks'
    schedule_clip, their clip strength) times strength_mult."""

    display_name = "Create Hook Keyframe"
    category = "advanced/hooks/scheduling"
    strength_mult = Float(1.0, min=-20.0, max=20.0, step=0.01)
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001)
    prev_hook_kf = Socket("HOOK_KEYFRAMES", optional=True)
    outputs = (Output("HOOK_KEYFRAMES", name="HOOK_KF"),)

    def execute(self, strength_mult: float, start_percent: float,
                prev_hook_kf: HookKeyframes | None = None) -> tuple[HookKeyframes]:
        return ((prev_hook_kf or HookKeyframes()).add(Keyframe(strength_mult, start_percent)),)


INTERPOLATIONS = ("linear", "ease_in", "ease_out", "ease_in_out")


def interpolated(start: float, end: float, count: int, method: str = "linear") -> list[float]:
    """`count` values from `start` to `end`, evenly in `method`'s curve of the fraction t in [0, 1]: t, t^2,
    1 - (1 - t)^2, (1 - cos(pi t)) / 2 (ComfyUI's InterpolationMethod)."""
    curve = {"linear": lambda t: t, "ease_in": lambda t: t * t, "ease_out": lambda t: 1 - (1 - t) ** 2,
             "ease_in_out": lambda t: (1 - math.cos(t * math.pi)) / 2}[method]
    fractions = [i / (count - 1) for i in range(count)] if count > 1 else [0.0]
    return [start + (end - start) * curve(t) for t in fractions]


def _add_keyframes(prev: HookKeyframes | None, strengths: list[float], start_percent: float, end_percent: float,
                   print_keyframes: bool) -> tuple[HookKeyframes]:
    keyframes = prev or HookKeyframes()
    for i, (percent, strength) in enumerate(zip(interpolated(start_percent, end_percent, len(strengths)),
                                                strengths, strict=True)):
        keyframes = keyframes.add(Keyframe(strength, percent, guarantee_steps=1 if i == 0 else 0))
        if print_keyframes:
            # To the console, as ComfyUI prints them: a node's log.info is not shown by `run` or a server worker.
            print(f"Hook Keyframe - start_percent:{percent} = {strength}", flush=True)
    return (keyframes,)


class CreateHookKeyframesInterpolated(Node):
    """keyframes_count keyframes from start_percent to end_percent, their strengths going from strength_start
    to strength_end along the interpolation's curve."""

    display_name = "Create Hook Keyframes Interp."
    category = "advanced/hooks/scheduling"
    strength_start = Float(1.0, min=0.0, max=10.0, step=0.001)
    strength_end = Float(1.0, min=0.0, max=10.0, step=0.001)
    interpolation = Combo(list(INTERPOLATIONS))
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001)
    keyframes_count = Int(5, min=2, max=100)
    print_keyframes = Boolean(False)
    prev_hook_kf = Socket("HOOK_KEYFRAMES", optional=True)
    outputs = (Output("HOOK_KEYFRAMES", name="HOOK_KF"),)

    def execute(self, strength_start: float, strength_end: float, interpolation: str, start_percent: float,
                end_percent: float, keyframes_count: int, print_keyframes: bool = False,
                prev_hook_kf: HookKeyframes | None = None) -> tuple[HookKeyframes]:
        strengths = interpolated(strength_start, strength_end, keyframes_count, interpolation)
        return _add_keyframes(prev_hook_kf, strengths, start_percent, end_percent, print_keyframes)


class CreateHookKeyframesFromFloats(Node):
    """One keyframe per value of floats_strength, spread evenly from start_percent to end_percent."""

    display_name = "Create Hook Keyframes From Floats"
    category = "advanced/hooks/scheduling"
    # ComfyUI's options; as there, a constant (a number, or a list as {"__value__": [...]}) is taken too: no
    # core node outputs FLOATS, so an API workflow without a custom node gives the strengths as a constant.
    floats_strength = Socket("FLOATS", default=-1, min=-1, step=0.001, force_input=True, checked_by_node=True,
                             tooltip="a list of strengths (or one)")
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001)
    print_keyframes = Boolean(False)
    prev_hook_kf = Socket("HOOK_KEYFRAMES", optional=True)
    outputs = (Output("HOOK_KEYFRAMES", name="HOOK_KF"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if "floats_strength" not in inputs:  # linked
            return None
        try:
            _strengths(inputs["floats_strength"])
        except ValueError as exc:
            return str(exc)
        return None

    def execute(self, floats_strength: Any, start_percent: float, end_percent: float, print_keyframes: bool = False,
                prev_hook_kf: HookKeyframes | None = None) -> tuple[HookKeyframes]:
        return _add_keyframes(prev_hook_kf, _strengths(floats_strength), start_percent, end_percent, print_keyframes)


def _strengths(floats_strength: Any) -> list[float]:
    """FLOATS as a list of floats (one number: a list of one)."""
    if isinstance(floats_strength, int | float):
        return [float(floats_strength)]
    try:
        # A string is iterable but no list of numbers ("0.5" would give its characters).
        strengths = None if isinstance(floats_strength, str) else [float(v) for v in floats_strength]
    except (TypeError, ValueError):
        strengths = None
    if strengths is None:
        raise ValueError(f"floats_strength must be a number or a list of numbers, not "
                         f"{type(floats_strength).__name__}")
    if not strengths:
        raise ValueError("floats_strength is empty: give at least one strength")
    return strengths


class SetHookKeyframes(Node):
    """Schedules every hook of the group by the keyframes (no keyframes: the hooks as they are)."""

    display_name = "Set Hook Keyframes"
    category = "advanced/hooks/scheduling"
    hooks = Socket("HOOKS")
    hook_kf = Socket("HOOK_KEYFRAMES", optional=True)
    outputs = (Output("HOOKS"),)

    def execute(self, hooks: Hooks, hook_kf: HookKeyframes | None = None) -> tuple[Hooks]:
        return (hooks if hook_kf is None else hooks.with_keyframes(hook_kf),)


# --- CLIP -------------------------------------------------------------------------------------------


class SetClipHooks(Node):
    """A CLIP with the hooks' LoRAs applied at their clip strengths; with schedule_clip and hooks that have
    keyframes, it encodes a prompt once per keyframe range instead, at the clip strengths times the keyframes'
    there, each entry acting in its range of the run only (see ldm.sampling.clip_schedule). With apply_to_conds,
    the prompts it encodes carry the hooks, so that the UNet runs with their LoRAs for those prompts."""

    display_name = "Set CLIP Hooks"
    category = "advanced/hooks/clip"
    clip = Socket("CLIP")
    apply_to_conds = Boolean(True)
    schedule_clip = Boolean(False)
    hooks = Socket("HOOKS", optional=True)
    outputs = (Output("CLIP"),)

    def execute(self, clip: Clip, apply_to_conds: bool, schedule_clip: bool, hooks: Hooks | None = None
                ) -> tuple[Clip]:
        if hooks is None or not hooks.hooks:  # an empty group: ComfyUI's CombineHooks gives None for it
            return (clip,)
        patches = [(hook, hook.strength_clip) for hook in hooks.hooks if hook.strength_clip]
        for hook, _ in patches:
            if hook.lora is not None:
                check_lora_family(hook.lora, clip.family_name)  # LoraLoader's check, before any shape check
        if schedule_clip and any(hook.keyframes.keyframes for hook in hooks.hooks):
            clip = _scheduled(clip, hooks)
        elif patches:  # without keyframes, schedule_clip changes nothing (one range at the hooks' strengths)
            with torch.no_grad():
                clip = clip.with_encoder(patched_copy(clip.encoder, patches, clip=True),
                                         "+".join(hook.name for hook, _ in patches))
        return (replace(clip, cond_hooks=Hooks.combine([clip.cond_hooks, hooks])) if apply_to_conds else clip,)


def _scheduled(clip: Clip, hooks: Hooks) -> Clip:
    """`clip` set to encode once per keyframe range of `hooks` (and of an earlier SetClipHooks' schedule), the
    hooks applied to its text encoder at each range's strengths as it encodes."""
    for hook in hooks.hooks:
        if hook.strength_clip:
            hook.check_fits(clip.encoder, clip=True)  # here rather than in the encoder nodes
    scheduled = Hooks.combine([clip.clip_schedule, hooks])
    if not clip_ranges(scheduled):
        raise ValueError("schedule_clip: every hook keyframe starts at the end of the run (start_percent 1), which "
                         "leaves no part of the run to encode the prompt for")
    return replace(clip, clip_schedule=scheduled)


# One module to register: the conditioning nodes are listed here too.
NODES: list[Any] = [
    CreateHookLora, CreateHookLoraModelOnly, CreateHookModelAsLora, CreateHookModelAsLoraModelOnly, CombineHooks2,
    CombineHooks4, CombineHooks8, CreateHookKeyframe, CreateHookKeyframesInterpolated,
    CreateHookKeyframesFromFloats, SetHookKeyframes, SetClipHooks,
    *CONDITIONING_NODES,
]
