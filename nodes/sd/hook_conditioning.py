"""Hook nodes that set conditioning properties (ComfyUI's): hooks, masks and timestep ranges on prompts, pairs of
prompts, and default prompts (see ldm.sampling.guidance for how the sampler reads them)."""

from __future__ import annotations

from typing import Any

import torch

from ldm.sampling.hooks import Hooks
from nodes.node import Node
from nodes.spec import Combo, Float, Output, Socket


class ConditioningTimestepsRange(Node):
    """A part of the run (0 = the first step, 1 = the end), with the parts before and after it."""

    display_name = "Timesteps Range"
    category = "advanced/hooks"
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001)
    outputs = (Output("TIMESTEPS_RANGE"), Output("TIMESTEPS_RANGE", name="BEFORE_RANGE"),
               Output("TIMESTEPS_RANGE", name="AFTER_RANGE"))

    def execute(self, start_percent: float, end_percent: float) -> tuple[tuple, tuple, tuple]:
        return (start_percent, end_percent), (0.0, start_percent), (end_percent, 1.0)


def _set_properties(conditioning: list, strength: float, set_cond_area: str, mask: torch.Tensor | None,
                    hooks: Hooks | None, timesteps: tuple | None) -> list:
    """ComfyUI's conditioning properties: hooks added to the entries' own, a mask with its strength (the
    strength acts only with a mask), and a timestep range."""
    out = []
    for embedding, options in conditioning:
        options = dict(options)
        if hooks is not None and hooks.hooks:  # an empty group (CombineHooks with nothing) is ComfyUI's None
            options["hooks"] = Hooks.combine([options.get("hooks"), hooks])
        if mask is not None:
            options.update(mask=mask.unsqueeze(0) if mask.ndim < 3 else mask, mask_strength=strength,
                           set_area_to_bounds=set_cond_area != "default")
        if timesteps is not None:
            options.update(start_percent=timesteps[0], end_percent=timesteps[1])
        out.append((embedding, options))
    return out


def _defaults(conditioning: list, hooks: Hooks | None) -> list:
    """Entries marked `default` (used where the side's other entries leave weight), with the hooks added."""
    return [(emb, {**opts, "default": True}) for emb, opts in _set_properties(conditioning, 1.0, "default", None,
                                                                              hooks, None)]


class ConditioningSetProperties(Node):
    """Sets a prompt's mask (with its strength), hooks and timestep range."""

    display_name = "Cond Set Props"
    category = "advanced/hooks/cond single"
    cond_NEW = Socket("CONDITIONING")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    set_cond_area = Combo(["default", "mask bounds"])
    mask = Socket("MASK", optional=True)
    hooks = Socket("HOOKS", optional=True)
    timesteps = Socket("TIMESTEPS_RANGE", optional=True)
    outputs = (Output("CONDITIONING"),)

    def execute(self, cond_NEW: list, strength: float, set_cond_area: str, mask: torch.Tensor | None = None,
                hooks: Hooks | None = None, timesteps: tuple | None = None) -> tuple[list]:
        return (_set_properties(cond_NEW, strength, set_cond_area, mask, hooks, timesteps),)


class ConditioningSetPropertiesAndCombine(Node):
    """ConditioningSetProperties on cond_NEW, appended to cond."""

    display_name = "Cond Set Props Combine"
    category = "advanced/hooks/cond single"
    cond = Socket("CONDITIONING")
    cond_NEW = Socket("CONDITIONING")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    set_cond_area = Combo(["default", "mask bounds"])
    mask = Socket("MASK", optional=True)
    hooks = Socket("HOOKS", optional=True)
    timesteps = Socket("TIMESTEPS_RANGE", optional=True)
    outputs = (Output("CONDITIONING"),)

    def execute(self, cond: list, cond_NEW: list, strength: float, set_cond_area: str,
                mask: torch.Tensor | None = None, hooks: Hooks | None = None,
                timesteps: tuple | None = None) -> tuple[list]:
        return (cond + _set_properties(cond_NEW, strength, set_cond_area, mask, hooks, timesteps),)


class PairConditioningSetProperties(Node):
    """ConditioningSetProperties on a positive and a negative prompt alike."""

    display_name = "Cond Pair Set Props"
    category = "advanced/hooks/cond pair"
    positive_NEW = Socket("CONDITIONING")
    negative_NEW = Socket("CONDITIONING")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    set_cond_area = Combo(["default", "mask bounds"])
    mask = Socket("MASK", optional=True)
    hooks = Socket("HOOKS", optional=True)
    timesteps = Socket("TIMESTEPS_RANGE", optional=True)
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"))

    def execute(self, positive_NEW: list, negative_NEW: list, strength: float, set_cond_area: str,
                mask: torch.Tensor | None = None, hooks: Hooks | None = None,
                timesteps: tuple | None = None) -> tuple[list, list]:
        return tuple(_set_properties(c, strength, set_cond_area, mask, hooks, timesteps)
                     for c in (positive_NEW, negative_NEW))


class PairConditioningSetPropertiesAndCombine(Node):
    """PairConditioningSetProperties on the new pair, each appended to its side of the first pair."""

    display_name = "Cond Pair Set Props Combine"
    category = "advanced/hooks/cond pair"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    positive_NEW = Socket("CONDITIONING")
    negative_NEW = Socket("CONDITIONING")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    set_cond_area = Combo(["default", "mask bounds"])
    mask = Socket("MASK", optional=True)
    hooks = Socket("HOOKS", optional=True)
    timesteps = Socket("TIMESTEPS_RANGE", optional=True)
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"))

    def execute(self, positive: list, negative: list, positive_NEW: list, negative_NEW: list, strength: float,
                set_cond_area: str, mask: torch.Tensor | None = None, hooks: Hooks | None = None,
                timesteps: tuple | None = None) -> tuple[list, list]:
        return (positive + _set_properties(positive_NEW, strength, set_cond_area, mask, hooks, timesteps),
                negative + _set_properties(negative_NEW, strength, set_cond_area, mask, hooks, timesteps))


class PairConditioningCombine(Node):
    """Each side's prompts of pair A, then pair B's."""

    display_name = "Cond Pair Combine"
    category = "advanced/hooks/cond pair"
    positive_A = Socket("CONDITIONING")
    negative_A = Socket("CONDITIONING")
    positive_B = Socket("CONDITIONING")
    negative_B = Socket("CONDITIONING")
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"))

    def execute(self, positive_A: list, negative_A: list, positive_B: list, negative_B: list) -> tuple[list, list]:
        return positive_A + positive_B, negative_A + negative_B


class ConditioningSetDefaultCombine(Node):
    """Appends cond_DEFAULT as a default prompt: it acts where the other prompts leave weight (outside their
    areas and masks, outside their timestep ranges), with the hooks if given."""

    display_name = "Cond Set Default Combine"
    category = "advanced/hooks/cond single"
    cond = Socket("CONDITIONING")
    cond_DEFAULT = Socket("CONDITIONING")
    hooks = Socket("HOOKS", optional=True)
    outputs = (Output("CONDITIONING"),)

    def execute(self, cond: list, cond_DEFAULT: list, hooks: Hooks | None = None) -> tuple[list]:
        return (cond + _defaults(cond_DEFAULT, hooks),)


class PairConditioningSetDefaultCombine(Node):
    """ConditioningSetDefaultCombine on a positive and a negative side."""

    display_name = "Cond Pair Set Default Combine"
    category = "advanced/hooks/cond pair"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    positive_DEFAULT = Socket("CONDITIONING")
    negative_DEFAULT = Socket("CONDITIONING")
    hooks = Socket("HOOKS", optional=True)
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"))

    def execute(self, positive: list, negative: list, positive_DEFAULT: list, negative_DEFAULT: list,
                hooks: Hooks | None = None) -> tuple[list, list]:
        return positive + _defaults(positive_DEFAULT, hooks), negative + _defaults(negative_DEFAULT, hooks)


class SetModelHooksOnCond(Node):
    """Adds the hooks to every entry of a conditioning (to those it already carries)."""

    category = "advanced/hooks/manual"
    conditioning = Socket("CONDITIONING")
    hooks = Socket("HOOKS")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, hooks: Hooks) -> tuple[list]:
        return (_set_properties(conditioning, 1.0, "default", None, hooks, None),)


NODES: list[Any] = [
    ConditioningTimestepsRange, ConditioningSetProperties, ConditioningSetPropertiesAndCombine,
    PairConditioningSetProperties, PairConditioningSetPropertiesAndCombine, PairConditioningCombine,
    ConditioningSetDefaultCombine, PairConditioningSetDefaultCombine, SetModelHooksOnCond,
]
