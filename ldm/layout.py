"""Channels-last memory layout for the UNet on CUDA.

cuDNN's convolutions on Hopper (and Ampere) run in NHWC. Given NCHW tensors, each convolution first
copies its input to NHWC (`nchwToNhwcKernel`): 3.2 of SD1.5's 12 ms of GPU time per 512 px step on an
H100 (`python -m benchmarks.unet_profile`). With the weights in channels-last the activations stay
NHWC from the first convolution on, provided every layer between the convolutions keeps the layout:

- PyTorch's CUDA group norm (2.11) returns an NCHW tensor for any input, so `GroupNorm` below keeps a
  channels-last input channels-last;
- the spatial transformer returns its tokens in the input's layout (`ldm.attention`).

Measured on an H200 with the UNet's forward in a CUDA graph, batch 2: SD1.5 at 512 px 11.95 -> 10.20 ms,
SDXL at 1024 px 41.09 -> 38.29 ms; through the sampler, 82.6 -> 94.5 and 24.2 -> 25.9 it/s
(`benchmarks/RESULTS.md`). Without CUDA graphs it is slower (the group norm below is more, smaller
kernels, and an eager step waits on launches), so the engine uses it under graphs only.
"""

from __future__ import annotations

import torch
from torch import nn


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether `x` is stored channels-last (and not also plain contiguous, as 1x1 images are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that returns a channels-last input channels-last; other inputs go to PyTorch's.

    The statistics are reduced over the [B, HW, G, C/G] view of the channels-last storage (accumulated
    in fp32 by PyTorch's reductions), folded with the affine weights into one factor and one offset per
    sample and channel (computed in fp32), and applied as one multiply-add in the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_channels_last(x):
            return super().forward(x)
        b, c, h, w = x.shape
        per_group = c // self.num_groups
        grouped = x.permute(0, 2, 3, 1).reshape(b, h * w, self.num_groups, per_group)  # a view: no copy
        # fp16's range ends at 65504: a group with a standard deviation over 256 would overflow its variance.
        source = grouped.float() if x.dtype == torch.float16 else grouped
        var, mean = torch.var_mean(source, dim=(1, 3), correction=0)
        scale = (var.float() + self.eps).rsqrt().repeat_interleave(per_group, dim=1)  # [B, C]
        mean = mean.float().repeat_interleave(per_group, dim=1)
        if self.affine:
            scale = scale * self.weight.float()
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias.float()
        return torch.addcmul(shift.to(x.dtype)[:, :, None, None], x, scale.to(x.dtype)[:, :, None, None])


def use_channels_last(module: nn.Module) -> nn.Module:
    """Store `module`'s 4-D weights channels-last, in place (a no-op for weights already so).

    Called before every sampling run on CUDA, so a LoRA copy's patched weights, or weights that came
    back from the CPU, are converted then. The tensors' data is swapped inside the same parameter
    objects, which a LoRA copy shares with its base model, so each weight is converted once for both.
    Unchanged weights keep their storage, and CUDA graphs captured on them stay valid.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last):
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


def use_nchw(module: nn.Module) -> nn.Module:
    """Undo `use_channels_last`, in place: for runs that launch the UNet's kernels one by one (no CUDA
    graph: a ControlNet's residuals change every step), where NCHW is the faster layout. A no-op for a
    module that was never converted."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if is_channels_last(tensor):
            tensor.data = tensor.data.contiguous()
    return module
