"""LoRA's entry point: matching a file's patches to a model's layers, and patching shallow copies with them.

The patch kinds and the reading of files are ldm.lora_formats'; which family a file is for, and the names its keys
give each model's layers, ldm.lora_families'. Other code imports all of these from here.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.lora_families import (
    _index,
    _redundant,
    _slots,
    check_lora_family,
    family_fits,
    lora_family,
    takes_no_lora,
)
from ldm.lora_formats import (
    FullWeight,
    LohaWeight,
    LokrWeight,
    Lora,
    LoraError,
    LoraWeight,
    WeightPatch,
    load_lora,
    lora_from_state_dict,
    peek_lora,
)
from ldm.lora_keys_sd import diffusers_unet_blocks, diffusers_unet_name
from ldm.quant import Fp8Conv2d, Fp8Linear, dequantized_weight

__all__ = [
    "FullWeight",
    "LohaWeight",
    "LokrWeight",
    "Lora",
    "LoraError",
    "LoraWeight",
    "apply_lora",
    "apply_lora_bypass",
    "check_lora_family",
    "diffusers_unet_blocks",
    "diffusers_unet_name",
    "family_fits",
    "load_lora",
    "lora_family",
    "lora_from_state_dict",
    "match_lora",
    "peek_lora",
    "shallow_copy",
    "takes_no_lora",
    "unmatched_lora_keys",
]


# --- matching and patching ------------------------------------------------------------------------

def _misfit(patch: WeightPatch, weight: Tensor, bias: Tensor | None) -> str | None:
    """How `patch` does not fit a layer's `weight` and `bias` (None when it does)."""
    if isinstance(patch, FullWeight) and patch.diff is not None and patch.diff.shape != weight.shape:
        return f"weight {tuple(patch.diff.shape)}, model {tuple(weight.shape)}"
    if patch.out_features != weight.shape[0] or patch.in_numel != weight[0].numel():
        return f"[{patch.out_features} out, {patch.in_numel} in], model {tuple(weight.shape)}"
    if patch.bias is not None and (bias is None or patch.bias.shape != bias.shape):
        return f"bias {tuple(patch.bias.shape)}, model {'none' if bias is None else tuple(bias.shape)}"
    channels = weight.shape[:2] if weight.dim() > 1 else ()
    if patch.dora_scale is not None and patch.dora_scale.numel() not in channels:
        return f"DoRA magnitudes {tuple(patch.dora_scale.shape)}, model {tuple(weight.shape)}"
    try:  # its factors' inner sizes (ranks, Tucker cores): computed on shapes alone
        _on_meta(patch).delta(weight.shape)
    except RuntimeError as e:
        return f"factors that do not fit together ({str(e).splitlines()[0]})"
    return None


def _on_meta(patch: WeightPatch) -> WeightPatch:
    """The same patch with shape-only tensors."""
    tensors = {f.name: getattr(patch, f.name).to("meta") for f in fields(patch)
               if f.init and isinstance(getattr(patch, f.name), Tensor)}
    return replace(patch, **tensors)


def match_lora(module: nn.Module, lora: Lora) -> dict[str, WeightPatch]:
    """Layer path in `module` -> its patch, checking every matched shape."""
    from ldm import lora_flux

    index, slots, repeats = _index(module), _slots(module), _redundant(module, lora.weights)
    matched: dict[str, WeightPatch] = {}
    sliced = lora_flux.SlotParts()
    wrong = []
    for name, patch in lora.weights.items():
        slot = slots.get(name)
        path = slot.path if slot else index.get(name)
        if path is None or name in repeats:
            continue
        layer, attr = _target(module, path)
        weight, bias = getattr(layer, attr), getattr(layer, "bias", None) if attr == "weight" else None
        if slot:
            # only shapes are checked: meta views, no copy of the rows
            weight, bias = slot.part(weight.to("meta")), None if bias is None else slot.part(bias.to("meta"))
        misfit = _misfit(patch, weight, bias)
        if misfit:
            wrong.append(f"{name}: LoRA {misfit}")
        if slot:
            sliced.add(slot, patch)
        else:
            matched[path] = patch
    count = len(matched) + sum(len(parts) for parts in sliced.parts.values())
    if wrong:
        source = lora.path.name if lora.path else "LoRA"
        why = ("it is probably for another model family" if len(wrong) * 2 > count
               else "the rest fit: the file is probably damaged")
        raise LoraError(f"{source} does not fit this model ({len(wrong)} of its {count} layers do not, e.g. "
                        f"{'; '.join(wrong[:3])}); {why}")
    return sliced.merged(module, matched)


def _target(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The layer at `path` and "weight", or, where `path` names a parameter of no layer of its own (Wan's
    `blocks.N.modulation`), its parent and the parameter's name."""
    try:
        return module.get_submodule(path), "weight"
    except AttributeError:
        parent, _, name = path.rpartition(".")
        return module.get_submodule(parent), name


def unmatched_lora_keys(lora: Lora, *modules: nn.Module) -> list[str]:
    """File keys that patch nothing in any of `modules` (plus those not understood as LoRA at all)."""
    names = set().union(*(_index(m).keys() | _slots(m).keys() for m in modules if m is not None))
    return sorted(lora.unknown_keys + [k for name in lora.weights if name not in names
                                       for k in lora.sources.get(name, [])])


def shallow_copy(module: nn.Module) -> nn.Module:
    """New module objects all the way down, sharing every parameter and buffer tensor."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: shallow_copy(child) if child is not None else None
                      for name, child in module._modules.items()}
    return clone


@torch.no_grad()
def apply_lora(module: nn.Module, lora: Lora, strength: float = 1.0) -> nn.Module:
    """A patched copy of `module` with W + strength * delta on every matched layer (see WeightPatch.patched).

    `module` itself is never changed: the copy shares all untouched tensors and gets new ones for
    the patched weights, so a cached base model stays right for workflows without the LoRA.
    """
    matched = match_lora(module, lora)
    if not matched or strength == 0:
        return module
    patched = shallow_copy(module)
    for path, patch in matched.items():
        layer, name = _target(patched, path)
        # an fp8 layer's patched weight is stored in full precision
        base = dequantized_weight(layer) if name == "weight" else getattr(layer, name)
        new = patch.patched(base, strength)
        layer._parameters[name] = nn.Parameter(new.to(base.dtype), requires_grad=getattr(layer, name).requires_grad)
        if patch.bias is not None:
            bias = layer.bias.float() + strength * patch.bias.float().to(layer.bias.device)
            layer._parameters["bias"] = nn.Parameter(bias.to(layer.bias.dtype), requires_grad=layer.bias.requires_grad)
    return patched


# --- bypass: the LoRA added at forward time (ComfyUI's LoraLoaderBypass) ------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# Layers whose forward is W x (+ b) as nn.Linear's or nn.ConvNd's is (fp8 ones dequantize first): a bypass adds its
# path to their output. Others (a causal conv padding in its own forward) get the patch merged instead.
_PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, Fp8Linear.forward,
                   Fp8Conv2d.forward)


class _Bypass:
    """A forward hook adding a patch's path to its layer's output, y = layer(x) + strength * h(x): for a plain LoRA
    pair h(x) = alpha/rank * up(down(x)) (a LoCon's down with the layer's stride and padding; with a Tucker core,
    down, core, up), for the other kinds the delta applied as the layer applies its weight; plus a bias change. Its
    tensors are cast once per device and dtype they meet."""

    def __init__(self, patch: WeightPatch, strength: float, weight_shape: torch.Size) -> None:
        self.patch, self.strength, self.shape = patch, strength, weight_shape
        self.cast: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}

    def _factors(self, grouped: bool) -> dict[str, Tensor]:
        patch, ones = self.patch, (1,) * (len(self.shape) - 2)
        factors: dict[str, Tensor] = {}
        if isinstance(patch, LoraWeight) and not grouped and (patch.mid is None or ones):
            factors["up"] = patch.up.float().reshape(patch.up.shape[0], patch.rank, *ones) * (
                self.strength * patch.scaled(patch.rank))
            if patch.mid is not None:
                factors["down"] = patch.down.float().reshape(patch.rank, -1, *ones)
                factors["mid"] = patch.mid.float()
            else:
                factors["down"] = patch.down.float().reshape(patch.rank, *self.shape[1:])
        else:
            factors["delta"] = patch.delta(self.shape).float() * self.strength
        if patch.bias is not None:
            factors["bias"] = patch.bias.float() * self.strength
        return factors

    def __call__(self, layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        key = (output.device, output.dtype)
        if key not in self.cast:
            self.cast[key] = {k: t.to(output.device, output.dtype)
                              for k, t in self._factors(getattr(layer, "groups", 1) != 1).items()}
        t = self.cast[key]
        x = args[0].to(output.dtype)
        linear = isinstance(layer, nn.Linear)
        if "delta" in t:
            h = F.linear(x, t["delta"]) if linear else layer._conv_forward(x, t["delta"], None)
        elif linear:
            h = F.linear(F.linear(x, t["down"]), t["up"])
        else:
            conv = _CONV[len(self.shape) - 2]
            if "mid" in t:  # 1x1 down, the core with the layer's stride and padding, 1x1 up
                h = conv(layer._conv_forward(conv(x, t["down"]), t["mid"], None), t["up"])
            else:
                h = conv(layer._conv_forward(x, t["down"], None), t["up"])
        if "bias" in t:
            h = h + (t["bias"] if linear else t["bias"].reshape(-1, *(1,) * (h.dim() - 2)))
        return output + h


def _bypassable(layer: nn.Module, name: str, patch: WeightPatch) -> bool:
    """Whether a forward-time sum gives what merging `patch` gives: not for DoRA (it renormalises the merged
    weight), nor a full weight difference (ComfyUI merges those in bypass mode too), nor a parameter of no layer."""
    dora = patch.dora_scale is not None or any(p.dora_scale is not None for _, p in getattr(patch, "parts", ()))
    return (name == "weight" and not dora and not isinstance(patch, FullWeight)
            and type(layer).forward in _PLAIN_FORWARDS)


def _merge_patch(layer: nn.Module, name: str, patch: WeightPatch, strength: float) -> None:
    """Give the (copied) `layer` its patched parameter `name` and bias, as apply_lora does."""
    base = dequantized_weight(layer) if name == "weight" else getattr(layer, name)
    new = patch.patched(base, strength)
    layer._parameters[name] = nn.Parameter(new.to(base.dtype), requires_grad=getattr(layer, name).requires_grad)
    if patch.bias is not None:
        bias = layer.bias.float() + strength * patch.bias.float().to(layer.bias.device)
        layer._parameters["bias"] = nn.Parameter(bias.to(layer.bias.dtype), requires_grad=layer.bias.requires_grad)


@torch.no_grad()
def apply_lora_bypass(module: nn.Module, lora: Lora, strength: float = 1.0) -> nn.Module:
    """A copy of `module` that adds each matched patch at forward time instead of changing weights (ComfyUI's bypass
    mode): its layers keep the base's weight tensors and get a forward hook of their own. What a sum cannot express
    (see _bypassable) is merged as apply_lora merges it. Equal to apply_lora's result up to float rounding."""
    matched = match_lora(module, lora)
    if not matched or strength == 0:
        return module
    patched = shallow_copy(module)
    for path, patch in matched.items():
        layer, name = _target(patched, path)
        if _bypassable(layer, name, patch):
            # the copy's own hook table: shallow_copy shares the base layer's, which must stay as it is
            layer._forward_hooks = OrderedDict(layer._forward_hooks)
            layer.register_forward_hook(_Bypass(patch, strength, layer.weight.shape))
        else:
            _merge_patch(layer, name, patch, strength)
    return patched
