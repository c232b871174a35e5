"""Merging two models of one architecture weight by weight: weighted sums, add and subtract, per-block ratios.

Every merge computes `a * w1 + b * w2` for each floating-point weight (and persistent buffer) of the two
modules, where `(a, b)` may depend on the weight's key (its `state_dict` name): a weighted sum is
`(ratio, 1 - ratio)`, ComfyUI's subtract `(multiplier, -multiplier)`, add `(1, 1)`. As ComfyUI does, the
sum is computed in float32 and rounded once to the dtype of model1's weight.

The result is a `shallow_copy` of model1: a key whose factors leave model1's weight as it is (1 and 0)
shares model1's tensor, every other key gets a new one, and neither input is ever changed (they are
cached models). fp8 layers of `ldm.quant` take part with their dequantized weights; a merged fp8 layer
becomes a plain Linear/Conv2d in its compute dtype (an untouched one stays fp8). int8 (torchao) weights
cannot be read back exactly and are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ldm.lora import shallow_copy
from ldm.quant import Fp8Conv2d, Fp8Linear, dequantized_weight

Factors = Callable[[str], tuple[float, float]]  # key -> (factor of model1's weight, factor of model2's)

# The plain layer each fp8 layer class stands for: a merged fp8 layer turns back into one.
_PLAIN: dict[type, type] = {Fp8Linear: nn.Linear, Fp8Conv2d: nn.Conv2d}
_SHOWN = 5  # problems named in an error message


class MergeError(ValueError):
    """Two modules that cannot be merged: different architectures, keys, shapes, or unreadable weights."""


def _tensors(module: nn.Module, skip: tuple[str, ...]) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Every tensor `state_dict` would hold, by key: (owning module, attribute, tensor), with an fp8 layer's
    `weight_scale` left out (its weight is read dequantized) and keys ending with a suffix in `skip` too. What a
    patch hangs on a copy and keeps out of `state_dict` (a hypernetwork's MLPs) is not a weight to merge: the merged
    model keeps model1's patches, as in ComfyUI."""
    saved = module.state_dict(keep_vars=True).keys()  # references, no copies
    found: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for path, owner in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        tensors = [*owner._parameters.items(),
                   *((name, t) for name, t in owner._buffers.items() if name not in owner._non_persistent_buffers_set)]
        for name, tensor in tensors:
            key = prefix + name
            if (tensor is None or key not in saved or key.endswith(skip)
                    or (type(owner) in _PLAIN and name == "weight_scale")):
                continue
            found[key] = (owner, name, tensor)
    return found


def _check(model1: nn.Module, model2: nn.Module, skip: tuple[str, ...]
           ) -> tuple[dict[str, tuple[nn.Module, str, torch.Tensor]], dict[str, tuple[nn.Module, str, torch.Tensor]]]:
    """Both modules' tensors by key, once they are known to fit together; MergeError naming what does not."""
    # A subclass is the same architecture (a text encoder loaded from part files is a TextEncoder too).
    if not isinstance(model2, type(model1)) and not isinstance(model1, type(model2)):
        raise MergeError(f"cannot merge a {type(model2).__name__} into a {type(model1).__name__}: "
                         "the models have different architectures")
    first, second = _tensors(model1, skip), _tensors(model2, skip)
    only1, only2 = sorted(first.keys() - second.keys()), sorted(second.keys() - first.keys())
    if only1 or only2:
        raise MergeError(f"the models have different architectures: {len(only1)} weights of model1 are missing "
                         f"from model2 ({_some(only1)}) and {len(only2)} weights of model2 are missing from model1 "
                         f"({_some(only2)})")
    wrong = [f"{key}: {tuple(t.shape)} vs {tuple(second[key][2].shape)}"
             for key, (_, _, t) in first.items() if t.shape != second[key][2].shape]
    if wrong:
        raise MergeError(f"the models have different architectures: {len(wrong)} weights differ in shape "
                         f"({_some(wrong)})")
    quantized = [key for tensors in (first, second) for key, (_, _, t) in tensors.items()
                 if type(t) not in (torch.Tensor, nn.Parameter)]
    if quantized:
        raise MergeError(f"cannot merge quantized (int8) weights such as {_some(quantized)}: load the models "
                         "without --weights-dtype int8 to merge them")
    return first, second


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "") if items else "none"


def _value(owner: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as the layer computes with it: an fp8 layer's weight dequantized to its compute dtype."""
    return dequantized_weight(owner) if type(owner) in _PLAIN and name == "weight" else tensor


@torch.no_grad()
def merge_modules(model1: nn.Module, model2: nn.Module, factors: Factors, skip: Iterable[str] = ()) -> nn.Module:
    """A new module with `a * w1 + b * w2` for each floating-point weight, `(a, b) = factors(key)`.

    Keys ending with a suffix in `skip` keep model1's tensor; so do non-floating-point buffers. Raises
    MergeError, before computing anything, when the modules differ in type, keys or shapes. The result
    keeps model1's dtypes and devices; model2's weights are moved to them as they are used.
    """
    skip = tuple(skip)
    first, second = _check(model1, model2, skip)
    merged = shallow_copy(model1)
    owners = dict(merged.named_modules(remove_duplicate=False))
    for key, (owner1, name, tensor1) in first.items():
        a, b = factors(key)
        if (a == 1 and b == 0) or not tensor1.is_floating_point():
            continue  # model1's tensor as it is: shared, an fp8 layer left in fp8
        w1 = _value(owner1, name, tensor1)
        w2 = _value(*second[key])
        total = w1.float() if a == 1 else w1.float() * a
        if b != 0:  # as ComfyUI: a factor of 0 adds nothing, not even model2's NaNs
            total = total + w2.to(device=total.device, dtype=torch.float32) * b
        path, _, _ = key.rpartition(".")
        owner = owners[path]
        if type(owner) in _PLAIN and name == "weight":
            owner.__class__ = _PLAIN[type(owner)]  # a shallow copy's own object: model1's layer stays fp8
            owner._buffers.pop("weight_scale", None)  # and its own dict of buffers
        _store(owner, name, total.to(w1.dtype))
    return merged


def _store(owner: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(tensor, requires_grad=owner._parameters[name].requires_grad)
    else:
        owner._buffers[name] = tensor


def weighted_merge(model1: nn.Module, model2: nn.Module, ratio: float | Callable[[str], float],
                   skip: Iterable[str] = ()) -> nn.Module:
    """`ratio * model1 + (1 - ratio) * model2`; `ratio` may be a function of the key (see `prefix_ratios`)."""
    ratio_of = ratio if callable(ratio) else (lambda _key: ratio)

    def factors(key: str) -> tuple[float, float]:
        r = float(ratio_of(key))
        return r, 1.0 - r

    return merge_modules(model1, model2, factors, skip)


def add(model1: nn.Module, model2: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """`model1 + model2`, e.g. a difference from `subtract` added onto another model."""
    return merge_modules(model1, model2, lambda _key: (1.0, 1.0), skip)


def subtract(model1: nn.Module, model2: nn.Module, multiplier: float = 1.0, skip: Iterable[str] = ()) -> nn.Module:
    """`multiplier * (model1 - model2)`, as ComfyUI's ModelMergeSubtract (the multiplier scales model1 too)."""
    return merge_modules(model1, model2, lambda _key: (multiplier, -multiplier), skip)


def prefix_ratios(ratios: Mapping[str, float], default: float, strip: str = "") -> Callable[[str], float]:
    """key -> the ratio of the longest prefix in `ratios` that the key, less `strip` (see `wrapper_prefix`),
    starts with, else `default`."""
    by_length = sorted(ratios.items(), key=lambda item: len(item[0]), reverse=True)

    def ratio(key: str) -> float:
        key = key.removeprefix(strip)
        return next((r for prefix, r in by_length if key.startswith(prefix)), default)

    return ratio


def wrapper_prefix(module: nn.Module) -> str:
    """What Loom's keys of `module` carry before the checkpoint's (and ComfyUI's) names of its weights: "model." for a
    denoiser that wraps the transformer as its one part `model` and holds no weight of its own (LTX-2's), else ""."""
    own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    return "model." if [name for name, _ in module.named_children()] == ["model"] and not own else ""


@torch.no_grad()
def dequantized(module: nn.Module) -> nn.Module:
    """`module` with its fp8 layers as plain Linear/Conv2d layers in their compute dtype (a shallow copy; the
    module itself when it has none): what a file can hold and any loader read back."""
    if not any(type(layer) in _PLAIN for layer in module.modules()):
        return module
    plain = shallow_copy(module)
    for layer in plain.modules():
        if type(layer) in _PLAIN:
            weight = dequantized_weight(layer)
            layer.__class__ = _PLAIN[type(layer)]
            layer._buffers.pop("weight_scale", None)
            _store(layer, "weight", weight)
    return plain
