"""Hooks: LoRAs that act on some prompts only, with their strength scheduled over the run (ComfyUI's hooks).

A `Hooks` group (the HOOKS socket) holds `WeightHook`s, each a LoRA (or a whole-model difference) with a model
and a CLIP strength and an optional keyframe schedule (`HookKeyframes`) that multiplies the model strength
as the run goes (and the CLIP strength, for a scheduled CLIP: see ldm.sampling.clip_schedule). A conditioning
entry whose options carry `hooks` is predicted by the UNet with those LoRAs applied; `HookedUNets` makes those
patched copies for one sampling run, one per hook group, remade only when the effective strengths change, and
frees them at its end. The base UNet is never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ldm.lora import Lora, LoraError, apply_lora, match_lora, shallow_copy
from ldm.quant import dequantized_weight

# The LoRA key prefixes of text-encoder layers (kohya's te, te1, te2; diffusers').
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")


@dataclass(frozen=True)
class Keyframe:
    """From `start_percent` of the run (0 = pure noise, 1 = the end) on, the hook's strength times `strength`."""

    strength: float
    start_percent: float
    guarantee_steps: int = 1


@dataclass(frozen=True)
class HookKeyframes:
    """A hook's schedule (HOOK_KEYFRAMES): keyframes in order of their start. Before the first one starts, the
    first one holds (ComfyUI takes the first keyframe as current from the start); none: strength 1 throughout.

    ComfyUI moves at most one keyframe on per step for keyframes with `guarantee_steps`; here the last keyframe
    started at the current level holds, which is the same whenever no two keyframes start between two steps."""

    keyframes: tuple[Keyframe, ...] = ()

    def add(self, keyframe: Keyframe) -> HookKeyframes:
        """A copy with `keyframe` added (after those with the same start)."""
        return HookKeyframes(tuple(sorted((*self.keyframes, keyframe), key=lambda k: k.start_percent)))

    def strength_at(self, sigma: float, sigma_at_percent: Callable[[float], float]) -> float:
        if not self.keyframes:
            return 1.0
        current = self.keyframes[0]
        for keyframe in self.keyframes[1:]:
            if sigma_at_percent(keyframe.start_percent) >= sigma:
                current = keyframe
        return current.strength


@dataclass(frozen=True, eq=False)
class WeightHook:
    """One LoRA as a hook: `lora` patches the UNet at `strength_model` and the text encoder at `strength_clip`;
    or, without a LoRA, another checkpoint's `target_unet` and `target_clip` (ComfyUI's model as LoRA: each weight
    moves towards the target's by the strength, `W + s * (T - W)`). `keyframes` schedule the model strength (and
    a scheduled CLIP's clip strength). Hooks compare by identity (two loads of one file are two hooks, as in
    ComfyUI), so that a group is a cheap cache key."""

    lora: Lora | None
    strength_model: float
    strength_clip: float
    name: str
    keyframes: HookKeyframes = field(default_factory=HookKeyframes)
    target_unet: nn.Module | None = None
    target_clip: nn.Module | None = None

    def apply(self, module: nn.Module, strength: float, clip: bool = False) -> nn.Module:
        """A patched copy of `module` (the UNet, or with `clip` the text encoder) at `strength`."""
        if self.lora is not None:
            if strength:
                self.check_fits(module, clip)
            return apply_lora(module, self.lora, strength)
        return toward(module, self.target_clip if clip else self.target_unet, strength, self.name)

    def check_fits(self, module: nn.Module, clip: bool = False) -> None:
        """Refuses a LoRA of another family, which matches no layer of `module`, as LoraLoader does, rather
        than patching nothing (a LoRA with no keys for this part, e.g. a UNet-only one on the CLIP, is no error)."""
        if self.lora is not None and self.has_part(clip) and not match_lora(module, self.lora):
            raise LoraError(f"{self.name} patches no layer of this {'text encoder' if clip else 'UNet'}: it is "
                            "a LoRA for another kind of model")

    def has_part(self, clip: bool) -> bool:
        """Whether the LoRA has layers for the text encoder (`clip`) or else for the UNet."""
        te = [name.startswith(_TEXT_ENCODER_PREFIXES) for name in self.lora.weights] if self.lora else []
        return any(te) if clip else not all(te)


@dataclass(frozen=True)
class Hooks:
    """HOOKS: a group of weight hooks, applied together to the entries that carry the group."""

    hooks: tuple[WeightHook, ...] = ()

    @staticmethod
    def combine(groups: Iterable[Hooks | None]) -> Hooks:
        """The union of `groups` (None ones skipped), each hook once, in order."""
        found: dict[int, WeightHook] = {}
        for group in groups:
            for hook in group.hooks if group is not None else ():
                found.setdefault(id(hook), hook)
        return Hooks(tuple(found.values()))

    def with_keyframes(self, keyframes: HookKeyframes) -> Hooks:
        """New hooks with `keyframes` as their schedule (ComfyUI's SetHookKeyframes)."""
        return Hooks(tuple(replace(hook, keyframes=keyframes) for hook in self.hooks))

    def model_strengths(self, sigma: float, sigma_at_percent: Callable[[float], float]) -> tuple[float, ...]:
        """Each hook's UNet strength at noise level `sigma`."""
        return tuple(h.strength_model * h.keyframes.strength_at(sigma, sigma_at_percent) for h in self.hooks)

    def cache_size(self) -> int:
        return 64 * (1 + len(self.hooks))  # the LoRAs and checkpoints are the model cache's, shared


@torch.no_grad()
def toward(module: nn.Module, target: nn.Module | None, strength: float, source: str) -> nn.Module:
    """A copy of `module` whose every parameter is `W + strength * (T - W)`, T being `target`'s (kept in W's
    dtype; fp8 weights in their compute dtype, as LoRAs leave them). Refuses a target of another shape."""
    if target is None or strength == 0:
        return module
    theirs = dict(target.named_modules())
    patched = shallow_copy(module)
    for path, layer in module.named_modules():
        twin = theirs.get(path)
        for name, param in layer._parameters.items():
            if param is None:
                continue
            other = None if twin is None else twin._parameters.get(name)
            if other is None or other.shape != param.shape:
                raise LoraError(f"{source} does not have this model's shape (at {path}.{name}: "
                                f"{None if other is None else tuple(other.shape)}, model {tuple(param.shape)}): "
                                "it is not a checkpoint of the same kind")
            if name == "weight":
                param, other = dequantized_weight(layer), dequantized_weight(twin)
            new = torch.lerp(param.float(), other.to(param.device).float(), strength).to(param.dtype)
            patched.get_submodule(path)._parameters[name] = nn.Parameter(new, requires_grad=False)
    return patched


def patched_copy(module: nn.Module, hooks: Iterable[tuple[WeightHook, float]], clip: bool = False) -> nn.Module:
    """`module` with each hook applied at its strength, one after the other (as chained LoraLoaders do)."""
    for hook, strength in hooks:
        module = hook.apply(module, strength, clip)
    return module


class HookedUNets:
    """The patched UNets (as `make(module)`, e.g. a Denoiser) for the hook groups of one sampling run: one
    per group, remade when a keyframe changes its strengths. `close` frees them."""

    def __init__(self, module: nn.Module, sigma_at_percent: Callable[[float], float],
                 make: Callable[[nn.Module], Any]) -> None:
        self.module = module
        self.sigma_at_percent = sigma_at_percent
        self.make = make
        self._made: dict[Hooks, tuple[tuple[float, ...], Any]] = {}

    def get(self, hooks: Hooks, sigma: float) -> Any:
        strengths = hooks.model_strengths(sigma, self.sigma_at_percent)
        made = self._made.get(hooks)
        if made is None or made[0] != strengths:
            self._made.pop(hooks, None)  # the old copy's weights go before the new ones are made
            patched = patched_copy(self.module, zip(hooks.hooks, strengths, strict=True))
            made = self._made[hooks] = (strengths, self.make(patched))
        return made[1]

    def over(self, module: nn.Module) -> HookedUNets:
        """The same for another base module (a guidance patch's patched copy of this one)."""
        return HookedUNets(module, self.sigma_at_percent, self.make)

    def close(self) -> None:
        self._made.clear()


def entry_hooks(*conditionings: Iterable[tuple[Any, dict]]) -> bool:
    """Whether any entry of the conditionings carries hooks."""
    return any(options.get("hooks") is not None for c in conditionings for _, options in c)
