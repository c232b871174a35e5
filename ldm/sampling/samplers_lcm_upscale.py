"""LCM sampling that upscales the latent between steps (ComfyUI's SamplerLCMUpscale): the size grows as it samples.

Each step is a consistency step (Song et al. 2023, Algorithm 1; Luo et al. 2023, LCM): jump to the model's x0
estimate, then re-noise it to the next level. In the first steps the estimate is resized before the new noise is
added, so that the run ends `total_upscale` times larger than it began and the later steps add detail at the new
size. ComfyUI's spread of the ratio over the steps is kept (see `upscale_factors`), so a workflow gives the same
sizes here as there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.sampling.noise import cpu_generator
from ldm.sampling.samplers import Callback, Model, _call, _report

Resize = Callable[[Tensor, int, int], Tensor]  # (x, height, width) -> x at that size


def upscale_factors(levels: int, total_upscale: float, upscale_steps: int | None = None) -> list[float]:
    """The size factor (of the starting latent) after each of the first steps of a run over `levels` sigmas.

    The factors rise evenly from 1 to `total_upscale` over `upscale_steps` steps; None spreads them over the first
    half of the steps (ceil(steps / 2), at least one). As in ComfyUI, `upscale_steps` beyond the run's steps
    spreads the ratio over one step more than the run has, so the run ends a step short of `total_upscale`.
    """
    count = max(levels // 2 + 1, 2) if upscale_steps is None else min(upscale_steps + 1, levels + 1)
    if count < 2:
        return []
    # numpy.linspace(1, total_upscale, count)[1:], with its arithmetic (k * step + 1, the last exactly the end),
    # so that sizes which round at .5 round as ComfyUI's do.
    step = (total_upscale - 1.0) / (count - 1)
    factors = [k * step + 1.0 for k in range(1, count - 1)] + [float(total_upscale)]
    return factors[:levels - 1]  # one per step at most


def upscale_sizes(height: int, width: int, levels: int, total_upscale: float,
                  upscale_steps: int | None = None) -> list[tuple[int, int]]:
    """The (height, width) the latent is resized to after each of the first steps (see `upscale_factors`)."""
    return [(round(height * f), round(width * f)) for f in upscale_factors(levels, total_upscale, upscale_steps)]


def resize_bilinear(x: Tensor, height: int, width: int) -> Tensor:
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


@torch.no_grad()
def sample_lcm_upscale(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    disable: bool | None = None,
    total_upscale: float = 2.0,
    upscale_steps: int | None = None,
    resize: Resize = resize_bilinear,
    seed: int | None = None,
) -> Tensor:
    """Multistep consistency sampling whose x0 estimate is resized (`resize(x, height, width)`) after each of the
    first steps, before it is re-noised; the result is about `total_upscale` times the size of `x`.

    The step noise is drawn at the latent's size of the moment, from a CPU generator seeded with `seed` (the same
    draws as the `lcm` sampler's `seeded_noise_sampler` while the size stays), or from torch's global one without.
    """
    generator = None if seed is None else cpu_generator(seed)
    s = sigmas.tolist()
    sizes = upscale_sizes(x.shape[-2], x.shape[-1], len(s), total_upscale, upscale_steps)
    for i in range(len(s) - 1):
        denoised = _call(model, x, s[i], extra_args)
        _report(callback, i, x, s[i], s[i], denoised)
        x = denoised
        if i < len(sizes) and sizes[i] != tuple(x.shape[-2:]):
            x = resize(x, *sizes[i])
        if s[i + 1] > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
            x = torch.add(x, noise, alpha=s[i + 1])
    return x
