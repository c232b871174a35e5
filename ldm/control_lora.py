"""Control-LoRA (Stability AI's control-lora-*.safetensors for SDXL): a ControlNet stored as low-rank offsets from
the UNet it runs with, made whole from that UNet's weights when it is first used.

A file holds an empty `lora_controlnet` marker; for each weight of the UNet's encoder with two or more dimensions
a pair `NAME.up` [out, rank] (a convolution's [out, rank, 1, 1]) and `NAME.down` [rank, in] ([rank, in, kh, kw]),
whose product is the ControlNet's `NAME.weight` minus the UNet's; and, whole, the weights the UNet does not have
(`input_hint_block.*`, `zero_convs.*`, `middle_block_out.*`) and the encoder's one-dimensional ones (norms,
biases). The ControlNet is the UNet's encoder with those applied, so one file fits any SDXL fine-tune: its
weights follow the model being sampled (ComfyUI's ControlLora does the same, at each run).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize
from ldm.controlnet import ControlNet, LoadedControlNet, controlnet_shape, unet_weights
from ldm.unet import UNetConfig

MARKER = "lora_controlnet"
ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")  # the UNet's parts a ControlNet copies
# What a UNet must share with the one a Control-LoRA was made for: the shapes of the encoder's weights.
SHAPE_FIELDS = ("model_channels", "in_channels", "channel_mult", "num_res_blocks", "transformer_depth",
                "transformer_depth_middle", "context_dim", "adm_in_channels", "use_linear_in_transformer")


def is_control_lora(sd: Mapping[str, Tensor]) -> bool:
    return MARKER in sd


def _pairs(sd: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """{weight name: (up, down)} of a Control-LoRA's low-rank layers."""
    pairs = {}
    for key in sd:
        for this, other in ((".up", ".down"), (".down", ".up")):
            if key.endswith(this) and key.removesuffix(this) + other not in sd:
                raise CheckpointError(f"{key} has no {key.removesuffix(this) + other} to go with it")
        if key.endswith(".up"):
            name = key.removesuffix(".up")
            up, down = sd[key], sd[f"{name}.down"]
            if up.ndim != down.ndim or up.shape[1] != down.shape[0]:
                raise CheckpointError(f"{name}: up {list(up.shape)} and down {list(down.shape)} do not multiply")
            pairs[f"{name}.weight"] = up, down
    return pairs


class ControlLoraWeights(Mapping[str, Tensor]):
    """The weights of the ControlNet a Control-LoRA makes with `base` (a UNet's weights, `unet_weights`), each
    computed when it is read, on the device of the base weight, in fp32, so that making the ControlNet holds one
    layer's intermediate at a time. A layer with a LoRA pair is its weight (the file's, else the base's) plus
    up @ down; the file's other weights are taken as they are; the rest of the base's encoder as it is."""

    def __init__(self, sd: Mapping[str, Tensor], base: Mapping[str, Tensor] | None = None,
                 source: str = "the Control-LoRA"):
        self.pairs = _pairs(sd)
        self.full = {k: v for k, v in sd.items() if k != MARKER and not k.endswith((".up", ".down"))}
        self.base = base
        self.source = source
        own = [k for k in base if k.startswith(ENCODER)] if base is not None else []
        self._keys = dict.fromkeys([*self.full, *self.pairs, *own])
        self._last: tuple[str, Tensor] | None = None

    def shapes(self) -> StateDict:
        """The file's weights as empty tensors of their shapes: enough to tell the ControlNet's shape."""
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in self.full.items()}
        shapes.update({k: torch.empty((up.shape[0], *down.shape[1:]), device="meta")
                       for k, (up, down) in self.pairs.items()})
        return shapes

    def __getitem__(self, key: str) -> Tensor:
        if self._last is not None and self._last[0] == key:  # `_materialize` reads each weight twice
            return self._last[1]
        if key in self.full:
            weight = self.full[key]
        elif key in self._keys and self.base is not None and key in self.base:
            weight = self.base[key]
        else:
            raise KeyError(key)
        pair = self.pairs.get(key)
        if pair is not None:
            up, down = (t.to(weight.device, torch.float32) for t in pair)
            shape = (up.shape[0], *down.shape[1:])
            if tuple(weight.shape) != shape:
                raise CheckpointError(f"{self.source} does not fit this UNet: its {key} is {list(shape)}, and "
                                      f"the UNet's {list(weight.shape)}")
            weight = weight.float() + (up.flatten(1) @ down.flatten(1)).reshape(shape)
        self._last = key, weight
        return weight

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def control_lora_shape(sd: Mapping[str, Tensor], path: Path) -> tuple[str, UNetConfig, int, tuple[int, ...]]:
    """(family, encoder config, hint channels, hint widths) of a Control-LoRA, from its file alone (the heads
    are the family's standard ones: the weights do not tell them)."""
    try:
        return controlnet_shape(ControlLoraWeights(sd).shapes())
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None


def shape_mismatch(made_for: UNetConfig, unet: UNetConfig) -> str | None:
    """How a UNet differs from the one a Control-LoRA was made for (None: its weights fit)."""
    for name in SHAPE_FIELDS:
        theirs, ours = getattr(made_for, name), getattr(unet, name)
        if theirs != ours:
            return f"the Control-LoRA was made for a UNet with {name} {theirs}, and this one has {ours}"
    return None


@torch.no_grad()
def build_controlnet(sd: Mapping[str, Tensor], path: Path, base: Mapping[str, Tensor], device: torch.device | str,
                     dtype: torch.dtype) -> LoadedControlNet:
    """The ControlNet a Control-LoRA's weights `sd` make with `base` (`ldm.controlnet.unet_weights`: its config
    gives the heads), on `device` in `dtype`."""
    family, config, hint_channels, widths = control_lora_shape(sd, path)
    base_config = getattr(base, "config", None)
    if base_config is not None:
        mismatch = shape_mismatch(config, base_config)
        if mismatch:
            raise CheckpointError(f"{path.name} does not fit this UNet: {mismatch}")
        config = base_config
    weights = ControlLoraWeights(sd, base, path.name)
    model = _materialize(lambda: ControlNet(config, hint_channels, widths), weights, "ControlNet", path, device, dtype)
    expected = set(model.state_dict())
    return LoadedControlNet(model, family, sorted(k for k in weights if k not in expected), path)


class ControlLora:
    """A loaded Control-LoRA: the file's weights, and the ControlNet they made with the last UNet given to
    `controlnet`, kept while that UNet's encoder weights live and are the ones used (a LoRA'd copy of the model
    gets its own; a copy that only patches the forward, such as FreeU's, shares it). Called like a ControlNet
    (`Control.residuals`), it runs that one: the sampler makes it for its model first (nodes/sd/sampling.py)."""

    global_average_pooling = False

    def __init__(self, sd: Mapping[str, Tensor], path: Path):
        self.family, self.config, self.hint_channels, self.widths = control_lora_shape(sd, path)
        self.weights = {k: v for k, v in sd.items() if k != MARKER}
        self.path = path
        self._made: ControlNet | None = None
        self._base: list[weakref.ref] = []  # the encoder weights it was made from

    def unused_keys(self) -> list[str]:
        """The file's keys that no ControlNet weight comes from (what a ControlNet of its shape does not have)."""
        with torch.device("meta"):
            expected = set(ControlNet(self.config, self.hint_channels, self.widths).state_dict())
        return sorted(k for k in ControlLoraWeights(self.weights).shapes() if k not in expected)

    def controlnet(self, unet: nn.Module) -> ControlNet:
        """The ControlNet this Control-LoRA makes with `unet`: made (on the device of its blocks' weights, in its
        dtype) the first time, then reused while the same weights are given."""
        tensors = [t for k, t in unet.state_dict(keep_vars=True).items() if k.startswith(ENCODER)]
        if self._made is not None and len(tensors) == len(self._base) and all(
                ref() is t for ref, t in zip(self._base, tensors, strict=True)):
            return self._made
        self._forget()  # the last one goes before the next is made: one ControlNet's memory at a time
        device = next(unet.input_blocks.parameters()).device  # a streamed UNet's blocks (ldm.offload) stay home
        made = build_controlnet(self.weights, self.path, unet_weights(unet), device, unet.dtype).model
        # A weight of the base going (the model dropped from the caches) lets the ControlNet go with it.
        self._base = [weakref.ref(t, self._forget) for t in tensors]
        self._made = made
        return made

    def _forget(self, _gone: weakref.ref | None = None) -> None:
        self._made, self._base = None, []

    def _current(self) -> ControlNet:
        if self._made is None:
            raise RuntimeError(f"{self.path.name}: a Control-LoRA runs the ControlNet made with the sampled "
                               "model's UNet, and none was made (ControlLora.controlnet(unet))")
        return self._made

    @property
    def dtype(self) -> torch.dtype:
        return self._current().dtype

    def __call__(self, *args, **kwargs) -> list[Tensor]:
        return self._current()(*args, **kwargs)

    def cache_size(self) -> int:
        """Bytes held: the file's weights, and the ControlNet made from them (when there is one)."""
        tensors = [*self.weights.values(), *(self._made.state_dict().values() if self._made is not None else ())]
        return sum(t.numel() * t.element_size() for t in tensors)


def load_control_lora(sd: Mapping[str, Tensor], path: Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, base: Mapping[str, Tensor] | None = None
                      ) -> LoadedControlNet:
    """A Control-LoRA file's weights `sd` as `load_controlnet` gives them: with `base` (a UNet's weights), the
    ControlNet they make with it, on `device` in `dtype`; without, a `ControlLora`, made into one when used."""
    if base is not None:
        return build_controlnet(sd, path, base, device, dtype)
    lora = ControlLora(sd, path)
    return LoadedControlNet(lora, lora.family, lora.unused_keys(), path)
