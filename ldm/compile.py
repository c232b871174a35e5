"""`torch.compile` of a UNet's forward, made once per module and reused for every later run.

TorchDynamo keeps the compiled graphs of a function keyed by the shapes and dtypes it has seen
(`dynamic=False`: one specialised graph per shape), so a second run at the same size and batch
costs no compilation; a new size compiles once more. The compiled forward is kept on the module
itself, tagged with the module's id: a LoRA-patched shallow copy inherits the attribute but not the
id, so it gets its own; a dropped model takes its graphs along.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def compiled_unet(unet: nn.Module, mode: str | None = None, backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """The compiled forward of `unet` (compiled lazily, at its first call for each shape).

    `mode` is torch.compile's ("max-autotune", "reduce-overhead" for CUDA graphs, ...); None is the
    default inductor mode. `backend` is torch.compile's too ("inductor", "cudagraphs"); a module keeps the
    forward of one backend, the last asked for. Weights are read at call time, so moving the module between
    devices is allowed (it re-specialises once per device).
    """
    owner, fn = getattr(unet, "_loom_compiled", (None, None))
    if owner != (id(unet), backend) or fn is None:
        fn = torch.compile(unet, mode=mode, dynamic=False, backend=backend)
        unet.__dict__["_loom_compiled"] = ((id(unet), backend), fn)  # not a submodule: kept out of state_dict()
    return fn


def is_compiled(unet: nn.Module) -> bool:
    owner = getattr(unet, "_loom_compiled", (None,))[0]
    return owner is not None and owner[0] == id(unet)


def forget_compiled(unet: nn.Module) -> None:
    """Drop the compiled forward (and with it the module's graphs), e.g. before copying the module."""
    unet.__dict__.pop("_loom_compiled", None)
