"""Seeded noise: the initial latent noise and the per-step noise of ancestral and SDE samplers.

Everything is drawn on the CPU from a `torch.Generator` seeded like `torch.manual_seed(seed)`,
then moved to the latent's device and dtype, so a seed gives the same image on any device.
Step noise uses its own stream (`step_noise_seed`), seeded as ComfyUI seeds it on the CPU, so that
ancestral and SDE samplers give ComfyUI's `--cpu` image for the same seed. (On a GPU ComfyUI draws
it from the GPU's generator, whose numbers differ from the CPU's.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

NoiseSampler = Callable[[float, float], Tensor]


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator for any seed in [0, 2^64 - 1] (the KSampler node's range)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) % 2**64)


def step_noise_seed(seed: int) -> int:
    """The seed of the per-step noise stream that goes with a noise seed: the next one, as ComfyUI's
    default noise sampler has it on the CPU (the seed itself would repeat the initial noise)."""
    return (int(seed) + 1) % 2**64


def prepare_noise(latent: Tensor, seed: int, batch_index: list[int] | None = None,
                  parts: tuple[tuple[int, ...], ...] | None = None) -> Tensor:
    """Unit Gaussian noise shaped like `latent`, from `seed`.

    Without `batch_index` the batch is one draw, so item k of a batch of n is the same as item k
    of any larger batch. With `batch_index` (latents picked out of a bigger batch), item i gets
    the noise that position `batch_index[i]` would have had, as in ComfyUI. For a packed latent of
    several `parts` (their shapes without the batch; `ldm.sampling.av_latent`), each part's noise is
    drawn in turn from the one generator, packed as the latent is.
    """
    generator = cpu_generator(seed)
    if parts is None:
        noise = _draw(tuple(latent.shape), generator, batch_index)
    else:
        from ldm.sampling.av_latent import pack

        noise = pack([_draw((latent.shape[0], *shape), generator, batch_index) for shape in parts])
    return noise.to(device=latent.device, dtype=latent.dtype)


def _draw(shape: tuple[int, ...], generator: torch.Generator, batch_index: list[int] | None) -> Tensor:
    if batch_index is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    drawn = [torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
             for _ in range(max(batch_index) + 1)]
    return torch.cat([drawn[i] for i in batch_index])


def seeded_noise_sampler(x: Tensor, seed: int, cpu: bool = False) -> NoiseSampler:
    """Fresh unit noise shaped like `x` at each call, from a CPU generator seeded with `seed` (the
    sigmas are ignored); moved to `x`'s device and dtype unless `cpu`."""
    generator = cpu_generator(seed)

    def sample(sigma: float, sigma_next: float) -> Tensor:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        return noise if cpu else noise.to(x.device, x.dtype)

    return sample


class BrownianTreeNoiseSampler:
    """Noise from one Brownian motion path over the sigma range (a seeded torchsde BrownianTree,
    as k-diffusion does), so SDE samplers see consistent noise whatever the step sizes.

    Calling it with (sigma, sigma_next) returns the normalised increment of the path between them.
    The tree lives on the CPU and is built at the first draw (on the prefetching thread, where there is
    one); increments are moved to `x`'s device (`cpu_increment` leaves them there).
    """

    def __init__(self, x: Tensor, sigma_min: float, sigma_max: float, seed: int) -> None:
        self.device, self.dtype, self.shape, self.seed = x.device, x.dtype, x.shape, int(seed) % 2**64
        self.bounds = float(sigma_min), float(sigma_max)
        # torchsde rounds the tree's ends to 6 decimals (its default tol, 1e-6) and warns about
        # queries beyond them; queries are clamped to the rounded range instead.
        self.query_range = (
            max(self.bounds[0], round(self.bounds[0], 6)),
            min(self.bounds[1], round(self.bounds[1], 6)),
        )
        self._tree = None

    @property
    def tree(self):
        if self._tree is None:
            import torchsde

            t0, t1 = (torch.tensor(t, dtype=torch.float64) for t in self.bounds)
            self._tree = torchsde.BrownianTree(t0, torch.zeros(self.shape, dtype=torch.float32), t1, entropy=self.seed)
        return self._tree

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        return self.cpu_increment(sigma, sigma_next).to(self.device, self.dtype)

    def cpu_increment(self, sigma: float, sigma_next: float) -> Tensor:
        lo, hi = self.query_range
        t0, t1 = (min(max(float(t), lo), hi) for t in sorted((sigma, sigma_next)))
        increment = self.tree(torch.tensor(t0, dtype=torch.float64), torch.tensor(t1, dtype=torch.float64))
        increment = increment / (t1 - t0) ** 0.5
        # k-diffusion's sign convention: increments taken from high to low sigma are negated.
        sign = -1.0 if sigma > sigma_next else 1.0
        return sign * increment


class PrefetchingNoiseSampler:
    """Draws a noise sampler's answers to a known sequence of (sigma, sigma_next) queries ahead of
    time on one background thread, so slow draws (a Brownian tree walk, a seeded `randn`) overlap
    the model calls.

    `sampler` makes CPU tensors; answers are moved to `device` and `dtype` (where given) in the
    caller's thread (a CUDA copy from another thread could land inside a CUDA graph capture). Queries
    arriving out of the expected order are answered on the same thread, after the queue: results
    never depend on timing. With `by_query=False` (a sampler whose answers do not depend on the
    sigmas, as `seeded_noise_sampler` draws successive noise) every call takes the next draw, so the
    sequence is the one direct calls give. Drawing begins at `start()` (the KSampler calls it as its
    first model call begins, so the draws overlap the model rather than the set-up before it) or at
    the first query. Call `close()` to drop the draws not yet made.
    """

    def __init__(self, sampler: NoiseSampler, queries: list[tuple[float, float]],
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 by_query: bool = True) -> None:
        self._sampler = sampler
        self._device, self._dtype = device, dtype
        self._by_query = by_query
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noise")
        self._queries: list[tuple[float, float]] | None = queries
        self._pending: deque = deque()

    def start(self) -> None:
        if self._queries is not None:
            self._pending.extend((query, self._executor.submit(self._sampler, *query)) for query in self._queries)
            self._queries = None

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        self.start()
        if self._pending and (not self._by_query or self._pending[0][0] == (sigma, sigma_next)):
            noise = self._pending.popleft()[1].result()
        else:
            noise = self._executor.submit(self._sampler, sigma, sigma_next).result()
        return noise.to(device=self._device, dtype=self._dtype)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._queries = None
        self._pending.clear()


def model_noise(module: object, noise: Tensor, seed: int) -> Tensor:
    """A sampling run's initial `noise` as the sampled model takes it: `module.initial_noise(noise, seed)` where the
    UNet module has one (context windows' FreeNoise, `ldm.sampling.context_windows`), else `noise` itself."""
    initial_noise = getattr(module, "initial_noise", None)
    return noise if initial_noise is None else initial_noise(noise, seed)
