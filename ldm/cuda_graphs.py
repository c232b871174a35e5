"""CUDA graphs for a UNet's forward at fixed shapes: one captured graph replayed for every step.

At batch 1 a UNet step launches about a thousand small kernels, and on a fast GPU the host spends
longer launching them than the GPU spends running them (SD1.5 at 512 px on an H100: 44 it/s eager,
77 it/s replayed; see benchmarks/RESULTS.md). A CUDA graph records the launches once and replays
them with one call, with no compilation (unlike `torch.compile(mode="reduce-overhead")`).

`graphed_unet(unet)` gives the module's `GraphedUNet`, called like the UNet. Each new signature (the
shapes and dtypes of `x`, `timesteps`, `context` and `y`) runs twice on a side stream to warm up
(cuDNN autotuning, the allocator), then is captured; later calls copy their inputs into the graph's
static inputs, replay, and return a copy of the static output. Inputs off CUDA, and calls with
autograd on, go straight to the forward. A signature whose capture fails runs eagerly from then on.

A graph holds the addresses of the weights it read. `graphed_unet` compares them with the module's
at the start of every sampling run and drops stale graphs (the module was moved, offloaded, or had a
weight replaced); weights changed in place are simply read by the next replay. Each graph keeps its
own activation memory, so a module keeps at most `max_shapes` of them, least recently used dropped
first; a shape that comes back in the same sampling run after being dropped then runs without (the
shapes are taking turns, as with area conditioning over many region sizes, and capturing them again
and again would cost more than it saves). `release(unet)` drops a module's graphs: the engine's device
manager calls it whenever it moves the module off the GPU (eviction, `/free`, out-of-memory recovery).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor | None, ...]
    output: torch.Tensor


class GraphedUNet:
    def __init__(self, unet: nn.Module, forward: Callable[..., torch.Tensor] | None = None, *,
                 warmup: int = 2, max_shapes: int = 4) -> None:
        self.unet = unet
        self.forward = unet if forward is None else forward  # e.g. the compiled forward (no bool(): it has no len)
        self.warmup = warmup
        self.max_shapes = max_shapes
        self._graphs: OrderedDict[tuple, _Captured | None] = OrderedDict()  # None: capture failed, run eagerly
        self._evicted: set[tuple] = set()  # shapes whose graphs were dropped to make room in this run
        self._weights = self._fingerprint()

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of the module has weights of its own: it gets no graphs (see `graphed_unet`)."""
        return None

    def _fingerprint(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*self.unet.parameters(), *self.unet.buffers()))

    def check_weights(self) -> None:
        """Drop the graphs if any weight tensor has moved since they were captured."""
        weights = self._fingerprint()
        if weights != self._weights:
            self.reset()
            self._weights = weights

    def reset(self) -> None:
        self._graphs.clear()
        self._evicted.clear()

    def new_run(self) -> None:
        """A new sampling run: shapes dropped in earlier runs may be captured again (a server that
        sees many image sizes in turn still gains: one capture costs about three steps)."""
        self._evicted.clear()

    def _graphable(self, x: torch.Tensor) -> bool:
        return x.device.type == "cuda" and not torch.is_grad_enabled()

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None) -> torch.Tensor:
        if control is not None:  # ControlNet residuals: launched one by one (their values change per step)
            return self.forward(x, timesteps, context, y=y, control=control)
        if not self._graphable(x):
            return self.forward(x, timesteps, context, y=y)
        args = (x, timesteps, context, y)
        key = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in args)
        if key not in self._graphs:
            if key in self._evicted:
                # More shapes take turns than a module keeps (area conditioning with many region sizes):
                # capturing each again would cost three forward passes to save a fraction of one.
                return self.forward(x, timesteps, context, y=y)
            self._graphs[key] = self._capture(args)
            while len(self._graphs) > self.max_shapes:
                self._evicted.add(self._graphs.popitem(last=False)[0])
        self._graphs.move_to_end(key)
        captured = self._graphs[key]
        if captured is None:
            return self.forward(x, timesteps, context, y=y)
        for static, new in zip(captured.inputs, args, strict=True):
            if static is not None:
                static.copy_(new)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, args: tuple[torch.Tensor | None, ...]) -> _Captured | None:
        inputs = tuple(None if t is None else t.clone() for t in args)
        x, timesteps, context, y = inputs
        stream = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.forward(x, timesteps, context, y=y)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA work of other threads (the noise prefetch, a preview) may go on meanwhile.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = self.forward(x, timesteps, context, y=y)
        except Exception as exc:  # noqa: BLE001 - some op cannot be captured: run this shape eagerly
            log.warning("CUDA graph capture failed for input shape %s; running it without: %s",
                        tuple(x.shape), exc)
            return None
        return _Captured(graph, inputs, output)


def graphed_unet(unet: nn.Module, forward: Callable[..., torch.Tensor] | None = None) -> GraphedUNet:
    """The `GraphedUNet` kept on `unet` (made at first use), its graphs checked against the weights.

    Kept on the module itself and tagged with its id, as `ldm.compile.compiled_unet` does: a LoRA
    copy inherits the attribute but not the id, so it gets graphs of its own weights.
    """
    owner, graphed = unet.__dict__.get("_loom_graphed", (None, None))
    if owner != id(unet) or graphed is None or graphed.forward is not (unet if forward is None else forward):
        graphed = GraphedUNet(unet, forward)
        unet.__dict__["_loom_graphed"] = (id(unet), graphed)  # not a submodule: kept out of state_dict()
    graphed.check_weights()
    graphed.new_run()
    return graphed


def release(unet: nn.Module) -> None:
    """Drop the graphs kept on `unet` and their memory (its weights are leaving the device)."""
    _, graphed = unet.__dict__.get("_loom_graphed", (None, None))
    if graphed is not None:
        graphed.reset()
