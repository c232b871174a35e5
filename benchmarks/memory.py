"""Memory over a long series of varied runs: does the engine stay within its budgets?

    python -m benchmarks.memory [--runs 200] [--output-cache-mb 64] [--lowvram] [--weights-dtype fp8]

Runs `--runs` txt2img workflows on the tiny SD1, SD2 and SDXL presets through one engine, varying
checkpoint, size, batch, seed, steps, sampler, prompt, LoRA and tiled decoding, and prints the
process's resident memory (and CUDA memory where there is a GPU) with the caches' sizes after
every 20 runs. The last line is one JSON object: RSS after the first and the last block, and the
growth between them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.pipeline import txt2img_graph
from executor.cache import OutputCache
from executor.devices import EngineOptions
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

PRESETS = {"tiny-sd1.safetensors": "tiny-sd1", "tiny-sd2.safetensors": "tiny-sd2",
           "tiny-sdxl.safetensors": "tiny-sdxl"}
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "heun", "ddim", "uni_pc", "dpmpp_sde"]
SUBJECTS = ["a red circle", "a blue square", "a green triangle on grey", "(a yellow star:1.3)", "two shapes"]


def rss_mib() -> float:
    """Resident set size of this process now (not the peak), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_lora(path: Path) -> None:
    import safetensors.torch
    import torch

    g = torch.Generator().manual_seed(3)
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.1,
                                 f"{key}.lora_up.weight": torch.randn(32, 4, generator=g) * 0.1,
                                 f"{key}.alpha": torch.tensor(4.0)}, path)


def workflow(i: int) -> dict:
    """The i-th workflow: a txt2img graph with several inputs varied at different periods."""
    ckpt = list(PRESETS)[i % 3]
    graph = txt2img_graph(ckpt, 64, 1 + i % 3, seed=i)
    graph["5"]["inputs"].update(width=64 + 32 * (i % 3), height=64 + 32 * (i // 3 % 2), batch_size=1 + i % 2)
    graph["3"]["inputs"].update(sampler_name=SAMPLERS[i % len(SAMPLERS)], cfg=4.0 + i % 5)
    graph["6"]["inputs"]["text"] = f"{SUBJECTS[i % len(SUBJECTS)]}, variation {i // 7}"
    if ckpt == "tiny-sd1.safetensors" and i % 4 == 0:
        graph["10"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["4", 0], "clip": ["4", 1], "lora_name": "shapes.safetensors",
            "strength_model": 0.5 + (i % 3) / 2, "strength_clip": 1.0}}
        graph["3"]["inputs"]["model"] = ["10", 0]
        graph["6"]["inputs"]["clip"] = ["10", 1]
        graph["7"]["inputs"]["clip"] = ["10", 1]
    if i % 5 == 0:
        graph["8"] = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["4", 2],
                                                                 "tile_size": 64, "overlap": 32}}
    return graph


def device_mib(services: Services) -> dict[str, float]:
    stats = services.devices.memory_stats()
    return {name: round(value / 2**20, 1) for name, value in stats.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--output-cache-mb", type=float, default=64.0, help="the output cache's byte budget")
    parser.add_argument("--lowvram", action="store_true")
    parser.add_argument("--weights-dtype", choices=["default", "fp8"], default="default")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "models" / "checkpoints").mkdir(parents=True)
        (root / "models" / "loras").mkdir(parents=True)
        for name, preset in PRESETS.items():
            make_checkpoint(preset, root / "models" / "checkpoints" / name, seed=1)
        write_lora(root / "models" / "loras" / "shapes.safetensors")
        paths = FolderPaths(base=root)
        set_paths(paths)
        options = EngineOptions(force_cpu=args.cpu, lowvram=args.lowvram, weights_dtype=args.weights_dtype)
        services = Services.create(paths, options=options)
        engine = Executor(builtin_registry(), cache=OutputCache(int(args.output_cache_mb * 2**20)),
                          services=services)
        began = time.perf_counter()
        samples: list[float] = []
        print(f"{'runs':>5} {'RSS MiB':>9} {'output cache MiB':>17} {'models':>7} {'model MiB':>10} {'s':>6}  device")
        for i in range(args.runs):
            result = engine.run(parse_api(workflow(i)))
            if not result.ok:
                raise SystemExit(f"run {i} failed: {result.error}")
            if (i + 1) % args.every == 0:
                samples.append(rss_mib())
                print(f"{i + 1:>5} {samples[-1]:>9.1f} {engine.cache.total / 2**20:>17.1f} {len(services.models):>7} "
                      f"{services.models.total_bytes / 2**20:>10.1f} {time.perf_counter() - began:>6.0f}  "
                      f"{device_mib(services)}", flush=True)
    summary = {"runs": args.runs, "rss_mib_first": round(samples[0], 1), "rss_mib_last": round(samples[-1], 1),
               "rss_growth_mib": round(samples[-1] - samples[0], 1), "rss_mib_max": round(max(samples), 1),
               "oom_recoveries": services.oom_recoveries}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
