"""A1111 hypernetworks: per attention input width, two small MLPs that rewrite the key and value inputs of the UNet's
attention layers, `k_in = x + mlp_k(x) * strength` (and v alike), read from AUTOMATIC1111's webui `.pt` files.

A file is a torch.save'd dict: each width (an int: 768 or 1024 for SD1's or SD2's cross-attention, 320, 640, 1280
for the self-attention layers) maps to two state dicts (key, value) of an MLP `linear.N.weight`, `linear.N.bias`;
the other entries are its settings (`layer_structure`, `activation_func`, `is_layer_norm`, `activate_output`,
`use_dropout`, `last_layer_dropout`, `dropout_structure`) and information (`name`, `step`, `sd_checkpoint`, ...).
The MLP is built from the settings as the webui builds it, so that its keys must match the file's exactly.
"""

from __future__ import annotations

import functools
import itertools
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.attention import CrossAttention
from ldm.lora import shallow_copy

log = logging.getLogger(__name__)


class HypernetworkError(ValueError):
    """A file that cannot be used as a hypernetwork: unreadable, unsafe, or not in the webui's layout."""


# The activations the webui offers that take no weights of their own ("swish" is its name for Hardswish).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish, "gelu": nn.GELU,
    "silu": nn.SiLU, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "hardtanh": nn.Hardtanh,
    "relu6": nn.ReLU6, "selu": nn.SELU, "celu": nn.CELU, "softplus": nn.Softplus, "logsigmoid": nn.LogSigmoid,
    "tanhshrink": nn.Tanhshrink,
}

# NovelAI's early files, before the webui's `linear` Sequential (the webui renames them on load too).
_OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


@dataclass(frozen=True)
class Structure:
    """A file's settings, with the webui's defaults for those it lacks."""

    layer_structure: tuple[float, ...]  # width multipliers of the MLP's layers, 1 first and last
    activation: str
    layer_norm: bool
    activate_output: bool  # the activation after the last Linear too
    dropout: tuple[float, ...]  # per entry of layer_structure: a Dropout after that layer (a no-op here)

    @classmethod
    def of(cls, data: dict, name: str) -> Structure:
        layers = data.get("layer_structure") or [1, 2, 1]
        if (not isinstance(layers, list | tuple) or len(layers) < 2 or layers[0] != 1 or layers[-1] != 1
                or not all(isinstance(m, int | float) and m > 0 for m in layers)):
            raise HypernetworkError(f"{name}: layer_structure {layers!r} is not a list of width multipliers "
                                    "starting and ending with 1")
        activation = data.get("activation_func") or "linear"
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise HypernetworkError(f"{name}: activation_func {activation!r} is not supported (supported: "
                                    f"{', '.join(ACTIVATIONS)})")
        dropout = data.get("dropout_structure")
        if dropout is None:  # the webui's parse_dropout_structure
            dropout = [0.0] * len(layers)
            if data.get("use_dropout", False):
                dropout = [0.0, *[0.3] * (len(layers) - 3), 0.3 if data.get("last_layer_dropout", False) else 0.0, 0.0]
        if (not isinstance(dropout, list | tuple) or len(dropout) < len(layers)
                or not all(isinstance(p, int | float) for p in dropout)):
            raise HypernetworkError(f"{name}: dropout_structure {dropout!r} does not fit layer_structure {layers!r}")
        # The webui's default for activate_output is True, as its first activations followed every layer (ComfyUI
        # reads a missing one as False).
        return cls(tuple(layers), activation, bool(data.get("is_layer_norm", False)),
                   bool(data.get("activate_output", True)), tuple(dropout))

    def mlp(self, width: int) -> nn.Sequential:
        """The MLP the webui builds for this width (Linear, activation, LayerNorm, Dropout, layer after layer), so
        that its state dict keys are the file's."""
        layers: list[nn.Module] = []
        last = len(self.layer_structure) - 2
        for i, (m_in, m_out) in enumerate(itertools.pairwise(self.layer_structure)):
            layers.append(nn.Linear(int(width * m_in), int(width * m_out)))
            if self.activation != "linear" and (i < last or self.activate_output):
                layers.append(ACTIVATIONS[self.activation]())
            if self.layer_norm:
                layers.append(nn.LayerNorm(int(width * m_out)))
            if self.dropout[i + 1] > 0:
                layers.append(nn.Dropout(self.dropout[i + 1]))
        return nn.Sequential(*layers)


def _residual(x: Tensor, mlp: nn.Sequential, strength: float) -> Tensor:
    """x + mlp(x) * strength, in the MLP's precision (float32, as the webui's files are, unless the UNet's was
    changed since)."""
    h = x.to(mlp[0].weight.dtype)
    return (h + mlp(h) * strength).to(x.dtype)


class HypernetworkLayer(nn.Module):
    """The key and value MLPs of one width."""

    def __init__(self, key: nn.Sequential, value: nn.Sequential):
        super().__init__()
        self.key, self.value = key, value

    def forward(self, keys: Tensor, values: Tensor, strength: float) -> tuple[Tensor, Tensor]:
        return _residual(keys, self.key, strength), _residual(values, self.value, strength)


def _not_saved(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """A state dict post-hook that takes the module's own entries out again."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        del state_dict[key]


class Hypernetwork(nn.Module):
    """A loaded file: its layers by width, with its name and training step. Registered on a patched UNet so that
    its weights move with it, but left out of the UNet's state dict: saving the model saves the model alone."""

    def __init__(self, layers: dict[int, HypernetworkLayer], name: str, step: int, structure: Structure):
        super().__init__()
        self.layers = nn.ModuleDict({str(width): layer for width, layer in layers.items()})
        self.name, self.step, self.structure = name, step, structure
        self.requires_grad_(False).eval()
        self.register_state_dict_post_hook(_not_saved)

    @property
    def widths(self) -> list[int]:
        return [int(width) for width in self.layers]


def _read(path: Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            named = re.search(r"GLOBAL (\S+)", str(exc))
            raise HypernetworkError(
                f"{path.name}: refusing to load, it holds Python objects beyond tensors and settings"
                f"{f' ({named.group(1)})' if named else ''} that only full unpickling (which can run arbitrary "
                "code) would read") from None
        raise HypernetworkError(f"{path.name}: not a valid torch file ({exc})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise HypernetworkError(f"{path.name}: unreadable or truncated torch file ({exc})") from None
    if not isinstance(data, dict):
        raise HypernetworkError(f"{path.name}: not a hypernetwork (the file holds a {type(data).__name__})")
    return data


def _load_mlp(structure: Structure, width: int, weights: Any, where: str) -> nn.Sequential:
    if not isinstance(weights, dict) or not all(isinstance(t, Tensor) for t in weights.values()):
        raise HypernetworkError(f"{where}: expected a state dict of tensors, not {type(weights).__name__}")
    weights = {_OLD_KEYS.get(key, key): tensor for key, tensor in weights.items()}
    mlp = structure.mlp(width)
    expected = {f"linear.{key}": tensor for key, tensor in mlp.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise HypernetworkError(
            f"{where}: the weights do not fit the file's settings (layer_structure {list(structure.layer_structure)}, "
            f"activation_func {structure.activation}, is_layer_norm {structure.layer_norm}, activate_output "
            f"{structure.activate_output}): missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            raise HypernetworkError(f"{where}: {key} is {list(weights[key].shape)}, but a width-{width} layer with "
                                    f"layer_structure {list(structure.layer_structure)} needs {list(tensor.shape)}")
    mlp.load_state_dict({key.removeprefix("linear."): tensor.float() for key, tensor in weights.items()})
    return mlp


def load_hypernetwork(path: str | Path) -> Hypernetwork:
    """A webui hypernetwork file, read with `torch.load(weights_only=True)`; HypernetworkError naming what is wrong
    with any other."""
    path = Path(path)
    data = _read(path)
    structure = Structure.of(data, path.name)
    widths = {key: value for key, value in data.items() if isinstance(key, int) and not isinstance(key, bool)}
    if not widths:
        raise HypernetworkError(f"{path.name}: not a hypernetwork (no per-width weights under int keys such as 768; "
                                f"it holds {', '.join(map(repr, list(data)[:8])) or 'nothing'})")
    layers = {}
    for width, pair in sorted(widths.items()):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise HypernetworkError(f"{path.name}: entry {width} should be a pair of state dicts (key, value)")
        key, value = (_load_mlp(structure, width, weights, f"{path.name}, width {width}, {part}")
                      for weights, part in zip(pair, ("key", "value"), strict=True))
        layers[width] = HypernetworkLayer(key, value)
    name = data.get("name")
    step = data.get("step")
    return Hypernetwork(layers, name if isinstance(name, str) else path.stem, step if isinstance(step, int) else 0,
                        structure)


def hypernetwork_copy(unet: nn.Module, hypernetwork: Hypernetwork, strength: float) -> nn.Module:
    """A copy of `unet` whose attention layers (self- and cross-attention, as in the webui and ComfyUI) pass their
    key and value inputs through `hypernetwork`'s MLPs for their width, after those of hypernetworks already
    applied. `unet` itself is left as it was. HypernetworkError when no layer has one of its widths."""
    copy = shallow_copy(unet)
    layers = [m for m in copy.modules() if isinstance(m, CrossAttention)]
    model_widths = sorted({layer.to_k.in_features for layer in layers})
    if not set(hypernetwork.widths) & set(model_widths):
        raise HypernetworkError(
            f"hypernetwork {hypernetwork.name} has layers for widths {hypernetwork.widths}, but this model's "
            f"attention layers take {model_widths}: it is for another kind of model")
    unused = sorted(set(hypernetwork.widths) - set(model_widths))
    if unused:
        log.warning("hypernetwork %s: no attention layer of this model takes widths %s; those layers are unused",
                    hypernetwork.name, unused)
    for layer in layers:
        width = str(layer.to_k.in_features)
        if width in hypernetwork.layers:
            transform = functools.partial(hypernetwork.layers[width], strength=strength)
            layer.hypernetworks = (*layer.hypernetworks, transform)
    copy.hypernetwork_weights = nn.ModuleList([*getattr(copy, "hypernetwork_weights", ()), hypernetwork])
    return copy
