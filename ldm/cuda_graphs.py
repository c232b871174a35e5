"""CUDA graphs for a UNet's forward at fixed shapes: one captured graph replayed for every step.

At batch 1 a UNet step launches about a thousand small kernels, and on a fast GPU the host spends
longer launching them than the GPU spends running them. A CUDA graph records the launches once and
replays them with one call (no compilation, unlike `torch.compile(mode="reduce-overhead")`).

`GraphedUNet(unet)` is called like the UNet. Each new signature (the shapes and dtypes of `x`,
`timesteps`, `context` and `y`) is run twice on a side stream to warm up (cuDNN autotuning,
allocator), then captured; later calls copy their inputs into the graph's static inputs, replay, and
return a copy of the static output. Inputs off CUDA, and calls with autograd on, go to the module.

The graph holds the weights' addresses: moving the module, or replacing a weight tensor (a LoRA
patch, offloading), makes the captured graphs stale. Call `reset()` then, or make a new wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor | None, ...]
    output: torch.Tensor


class GraphedUNet:
    def __init__(self, unet: nn.Module, warmup: int = 2) -> None:
        self.unet = unet
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured] = {}

    def reset(self) -> None:
        self._graphs.clear()

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type != "cuda" or (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
            return self.unet(x, timesteps, context, y=y)
        args = (x, timesteps, context, y)
        key = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in args)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(args)
        for static, new in zip(captured.inputs, args, strict=True):
            if static is not None:
                static.copy_(new)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, args: tuple[torch.Tensor | None, ...]) -> _Captured:
        inputs = tuple(None if t is None else t.clone() for t in args)
        x, timesteps, context, y = inputs
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.unet(x, timesteps, context, y=y)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.unet(x, timesteps, context, y=y)
        return _Captured(graph, inputs, output)
