"""Sampler overhead: model calls per sampler and time spent outside the model, as % of model time.

Runs `ldm.sampling.sample` (CFG batching, the denoiser wrapper and each sampler) for a 512x512
image's latent on a small conv "UNet" whose calls are timed (synchronised on CUDA); the rest of
the wall time is the overhead (`overhead_pct`). That in-run figure also holds what the model's
memory churn costs the sampler's own tensors (page faults after large frees, cold caches), so
`isolated_overhead_pct` repeats the run with a stand-in that returns the UNet's output shape at
no cost, and divides by the real model time. The `floor` row runs the same model calls with nothing
between them but guidance and an Euler step in five plain tensor ops: the overhead no sampler can go
under on this machine, which shows how much of each sampler's figure is its own. On the CPU, torch
uses one thread (`--threads`) so that figures are stable on a shared machine. The model's time runs
from the denoiser's call to its return: nn.Module's call machinery is the model's cost.
`--keep-freed-memory` runs under the malloc settings `main.py` uses on the CPU. The last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from executor.allocator import keep_freed_memory
from ldm.sampling import SAMPLERS, DiscreteSchedule, sample
from ldm.sampling.schedulers import get_sigmas

STEPS = 20
REPEATS = 3
FLOOR = "floor"  # run_floor's row, measured in turn with the samplers


class TinyUNet(torch.nn.Module):
    """A few 3x3 convolutions at 64x64 with timestep and context inputs: UNet-shaped calls."""

    def __init__(self, width: int = 64, context_dim: int = 768) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(4, width, 3, padding=1)
        self.mid = torch.nn.ModuleList(torch.nn.Conv2d(width, width, 3, padding=1) for _ in range(3))
        self.out = torch.nn.Conv2d(width, 4, 3, padding=1)
        self.ctx = torch.nn.Linear(context_dim, width)
        self.time = torch.nn.Linear(1, width)

    def forward(self, x, t, context, y=None):
        h = (
            self.inp(x)
            + (self.ctx(context.mean(1)) + self.time(t[:, None].to(x.dtype) / 1000))[:, :, None, None]
        )
        for conv in self.mid:
            h = h + conv(torch.nn.functional.silu(h))
        return self.out(h)


class TimedModel:
    """The model as the denoiser calls it, timed from the call to its return (synchronised on CUDA):
    the module's own call machinery and the freeing of its activations are the model's cost, not the
    sampler's."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, x, t, context, y=None):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        out = self.module(x, t, context, y)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def run_once(name: str, unet, schedule: DiscreteSchedule, device: str) -> float:
    positive = [(torch.randn(1, 77, 768, device=device), {})]
    negative = [(torch.randn(1, 77, 768, device=device), {})]
    latent = torch.zeros(1, 4, 64, 64, device=device)
    start = time.perf_counter()
    out = sample(
        unet,
        schedule,
        latent,
        seed=0,
        steps=STEPS,
        cfg=7.0,
        sampler_name=name,
        scheduler="karras",
        positive=positive,
        negative=negative,
    )
    out.sum().item()
    return time.perf_counter() - start


def run_floor(unet, schedule: DiscreteSchedule, device: str) -> float:
    """The least any sampler does between model calls: guidance and an Euler step in five plain tensor ops,
    with the timesteps made beforehand and no function layers. Its overhead is what this machine charges for
    touching the latent at all after a model call (caches refilled), which no sampler code can go under."""
    sigmas = get_sigmas("karras", schedule, STEPS).tolist()
    context = torch.randn(2, 77, 768, device=device)
    timesteps = [torch.full((2,), schedule.sigma_to_t_scalar(s), device=device) for s in sigmas[:-1]]
    x = torch.randn(1, 4, 64, 64, device=device) * sigmas[0]
    start = time.perf_counter()
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out = unet(x.expand(2, *x.shape).mul((sigma**2 + 1) ** -0.5).flatten(0, 1), t, context)
        positive, negative = out.chunk(2)
        x0 = torch.add(x, torch.lerp(negative, positive, 7.0), alpha=-sigma)
        x = torch.lerp(x, x0, (sigma - sigma_next) / sigma)
    x.sum().item()
    return time.perf_counter() - start


def free_model(x, t, context, y=None):
    return x  # what a model costs nothing to compute: the sampler's own work remains


def measure_once(name: str, unet: TimedModel, schedule: DiscreteSchedule, device: str) -> dict:
    unet.seconds, unet.calls = 0.0, 0
    if name == FLOOR:
        overhead = run_floor(unet, schedule, device) - unet.seconds
    else:
        overhead = run_once(name, unet, schedule, device) - unet.seconds
    row = {
        "model_calls": unet.calls,
        "ms_per_model_call": round(1000 * unet.seconds / unet.calls, 3),
        "overhead_ms_per_step": round(1000 * overhead / STEPS, 3),
        "overhead_pct": round(100 * overhead / unet.seconds, 2),
    }
    if name != FLOOR:
        row["isolated_overhead_pct"] = round(100 * run_once(name, free_model, schedule, device) / unet.seconds, 2)
    return row


def measure(names: list[str], unet: TimedModel, schedule: DiscreteSchedule, device: str,
            repeats: int = REPEATS) -> dict[str, dict]:
    """Each sampler's best of `repeats` runs. The repeats go round all the samplers in turn, so a burst
    of load from elsewhere on a shared machine spoils one run of several samplers rather than every run
    of one sampler."""
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name in names:
            row = measure_once(name, unet, schedule, device)
            if name not in best or row["overhead_pct"] < best[name]["overhead_pct"]:
                best[name] = row
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    names = list(SAMPLERS)  # without the "_gpu" aliases, which are the same samplers
    parser.add_argument("--samplers", nargs="+", default=names, choices=names, metavar="NAME")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs per sampler; the best is kept")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="tune glibc's malloc as `main.py` does on the CPU (executor.allocator): the model "
                             "runs faster, so the same overhead is a larger share of it")
    args = parser.parse_args(argv)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = TimedModel(TinyUNet().eval().to(args.device))
    schedule = DiscreteSchedule()
    with torch.no_grad():
        measure(["euler"], unet, schedule, args.device)  # warm-up
        results = measure([*args.samplers, FLOOR], unet, schedule, args.device, args.repeats)
    floor = results.pop(FLOOR)
    for name, row in [*results.items(), (FLOOR, floor)]:
        print(
            f"{name:20s} calls {row['model_calls']:3d}  model {row['ms_per_model_call']:8.3f} ms/call  "
            f"overhead {row['overhead_ms_per_step']:7.3f} ms/step = {row['overhead_pct']:6.2f}%  "
            + (f"isolated {row['isolated_overhead_pct']:6.2f}%" if name != FLOOR else
               "(guidance and an Euler step in five plain tensor ops: the least a sampler can do)")
        )
    summary = {
        "device": args.device,
        "steps": STEPS,
        "latent": [1, 4, 64, 64],
        "keep_freed_memory": kept,
        "overhead_pct_max": max(row["overhead_pct"] for row in results.values()),
        "isolated_overhead_pct_max": max(row["isolated_overhead_pct"] for row in results.values()),
        "floor_overhead_pct": floor["overhead_pct"],
        "floor_overhead_ms_per_step": floor["overhead_ms_per_step"],
        "samplers": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
