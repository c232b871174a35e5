"""txt2img through our engine and through diffusers' pipeline on the same weights, side by side.

    python -m benchmarks.pipeline [--quick] [--steps 20]

For the tiny SD1 preset (64 px) and the full-size `sd15` preset (256 px): 20 steps of euler with
guidance 7.5, timed end to end (text encoding, sampling, VAE decode; the checkpoint is already
loaded on both sides), best of a few runs, alternating ours and theirs. Then the engine's cache at
work: a run that changes only the seed, against the sampler + decode time of a cold run. `--quick`
skips sd15. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.diffusers_reference import diffusers_sd1_pipeline, diffusers_txt2img
from executor.events import Executed, Executing
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

PROMPT = "a red circle on a blue background"


def txt2img_graph(ckpt: str, size: int, steps: int, seed: int) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": seed, "steps": steps, "cfg": 7.5,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def node_times(executor: Executor, graph: dict) -> tuple[float, dict[str, float]]:
    """Wall time of a run and the time spent in each node."""
    started: dict[str, float] = {}
    spent: dict[str, float] = {}

    def on_event(event) -> None:
        if isinstance(event, Executing) and event.node:
            started[event.node] = time.perf_counter()
        elif isinstance(event, Executed):
            spent[event.node] = event.duration_s

    began = time.perf_counter()
    result = executor.run(parse_api(graph), on_event=on_event)
    total = time.perf_counter() - began
    assert result.ok, result.error
    # Executed is sent only for output nodes: derive the others from consecutive start times.
    order = sorted(started, key=started.get)
    for this, after in zip(order, order[1:], strict=False):
        spent.setdefault(this, started[after] - started[this])
    return total, spent


def compare(root: Path, preset: str, size: int, steps: int, reps: int) -> dict:
    checkpoint = root / "models" / "checkpoints" / f"{preset}.safetensors"
    make_checkpoint(preset, checkpoint, seed=0, dtype=torch.float16)
    executor = Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    pipe = diffusers_sd1_pipeline(checkpoint)
    graph = txt2img_graph(checkpoint.name, size, steps, 0)
    executor.run(parse_api(graph))  # loads the checkpoint into the model cache
    ours, theirs = float("inf"), float("inf")
    sampler_decode, seed_change = float("inf"), float("inf")
    for rep in range(reps):
        executor.cache.clear()  # everything but the loaded model runs again
        total, spent = node_times(executor, graph)
        ours = min(ours, total)
        sampler_decode = min(sampler_decode, spent["3"] + spent["8"])
        # Then only the seed changes: the sampler, decode and save run again, nothing else.
        changed, ran = node_times(executor, txt2img_graph(checkpoint.name, size, steps, rep + 1))
        assert set(ran) == {"3", "8", "9"}, f"a seed change re-ran {sorted(ran)}"
        seed_change = min(seed_change, changed)
        began = time.perf_counter()
        diffusers_txt2img(pipe, PROMPT, seed=rep, steps=steps, cfg=7.5, size=size)
        theirs = min(theirs, time.perf_counter() - began)
    return {"ours_s": ours, "diffusers_s": theirs, "ratio": ours / theirs, "seed_change_s": seed_change,
            "sampler_decode_s": sampler_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    runs = [("tiny-sd1", 64)] + ([] if args.quick else [("sd15", 256)])
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        set_paths(FolderPaths(base=Path(tmp)))
        for preset, size in runs:
            figures[preset] = compare(Path(tmp), preset, size, args.steps, args.reps)
            f = figures[preset]
            print(f"{preset} {size}px, {args.steps} steps: ours {f['ours_s']:.3f}s, diffusers {f['diffusers_s']:.3f}s, "
                  f"ratio {f['ratio']:.2f}; seed change re-run {f['seed_change_s']:.3f}s vs sampler+decode "
                  f"{f['sampler_decode_s']:.3f}s", flush=True)
    main_run = figures.get("sd15", figures["tiny-sd1"])
    print(json.dumps({
        "tiny_ratio": round(figures["tiny-sd1"]["ratio"], 3),
        "sd15_256_ratio": round(figures["sd15"]["ratio"], 3) if "sd15" in figures else None,
        "seed_change_s_over_sampler_decode_s": round(main_run["seed_change_s"] / main_run["sampler_decode_s"], 3),
    }))


if __name__ == "__main__":
    main()
