"""Prompt adherence of a shapes model: txt2img through the engine on held-out captions, judged by pixels.

    python -m benchmarks.prompt_adherence --checkpoint models/checkpoints/loom-shapes-64.safetensors

Each image is judged without any model: background colour = the palette colour most of the border
pixels are nearest to; shape colour = the most common other palette colour; each pixel's coverage
by the shape is its position between those two colours. The shape is the largest connected region
of mostly-covered pixels: its kind is told by how much of its bounding box the coverage fills
(square ~1, circle pi/4, triangle 1/2) and by how much of it lies in the box's upper half (a
quarter for the upward triangles), its position by the coverage centroid on a 3x3 grid.
The control judges the same images against the targets of other captions (a shuffled pairing),
so it measures chance level.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm.training.data import COLORS, PALETTE, POSITIONS, SHAPES, ShapeScene, evaluation_scenes

ATTRIBUTES = ("background_color", "shape_color", "shape_kind", "position")
SD_NODE_MODULES = ("nodes.sd.loaders", "nodes.sd.conditioning", "nodes.sd.latent", "nodes.sd.sampling",
                   "nodes.sd.vae", "nodes.sd.image")
_PALETTE = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255


@dataclass(frozen=True)
class Judgement:
    background_color: str
    shape_color: str | None
    shape_kind: str | None
    position: int | None


def _largest_region(mask: Tensor) -> list[tuple[int, int]]:
    """Pixels (y, x) of the largest 4-connected region of a boolean [H, W] mask."""
    h, w = mask.shape
    todo = mask.tolist()
    best: list[tuple[int, int]] = []
    for sy, sx in mask.nonzero().tolist():
        if not todo[sy][sx]:
            continue
        todo[sy][sx] = False
        region, queue = [], deque([(sy, sx)])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and todo[ny][nx]:
                    todo[ny][nx] = False
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    return best


def judge_image(image: Tensor) -> Judgement:
    """Judge one IMAGE [H, W, 3] in 0..1."""
    h, w, _ = image.shape
    pixels = image.reshape(-1, 3).float()
    labels = torch.cdist(pixels, _PALETTE).argmin(dim=1).view(h, w)
    border = torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(border.bincount(minlength=len(COLORS)).argmax())
    others = labels[labels != background]
    if others.numel() == 0:
        return Judgement(COLORS[background], None, None, None)
    shape_color = int(others.bincount(minlength=len(COLORS)).argmax())
    # Coverage of each pixel by the shape: its position between the two colours. Blur moves coverage
    # around but keeps its sum, so areas measured this way survive a soft-edged (generated) picture.
    bg, fg = _PALETTE[background], _PALETTE[shape_color]
    coverage = (((pixels - bg) @ (fg - bg)) / (fg - bg).square().sum()).clamp(0, 1).view(h, w)
    region = torch.tensor(_largest_region(coverage > 0.5) or [(0, 0)])
    # Measured again against the shape's actual colour (its median), which a model may render off-palette.
    fg = image[region[:, 0], region[:, 1]].float().median(dim=0).values
    if float((fg - bg).square().sum()) > 1e-4:
        coverage = (((pixels - bg) @ (fg - bg)) / (fg - bg).square().sum()).clamp(0, 1).view(h, w)
    (top, left), (bottom, right) = region.min(dim=0).values.tolist(), region.max(dim=0).values.tolist()
    box_area = (bottom - top + 1) * (right - left + 1)
    near = coverage[max(top - 2, 0):bottom + 3, max(left - 2, 0):right + 3]
    mass = float(near.sum())
    fill = mass / box_area
    rows = torch.arange(near.shape[0], dtype=torch.float32) + max(top - 2, 0) + 0.5
    cols = torch.arange(near.shape[1], dtype=torch.float32) + max(left - 2, 0) + 0.5
    middle = (top + bottom + 1) / 2
    upper = float(near[rows < middle].sum()) / max(mass, 1e-6)
    # Triangles point up: a quarter of their area lies in the upper half of their box, against a half
    # for circles and squares; squares fill their box, circles pi/4 of it.
    kind = "triangle" if upper < 0.4 or fill < 0.6 else "square" if fill > 0.89 else "circle"
    cy = float((near.sum(dim=1) * rows).sum()) / max(mass, 1e-6)
    cx = float((near.sum(dim=0) * cols).sum()) / max(mass, 1e-6)
    row = 0 if cy < 0.375 * h else 2 if cy > 0.625 * h else 1
    col = 0 if cx < 0.375 * w else 2 if cx > 0.625 * w else 1
    return Judgement(COLORS[background], COLORS[shape_color], kind, row * 3 + col)


def _matches(judgement: Judgement, scene: ShapeScene) -> dict[str, bool]:
    return {"background_color": judgement.background_color == scene.background,
            "shape_color": judgement.shape_color == scene.color,
            "shape_kind": judgement.shape_kind == scene.shape,
            "position": judgement.position == scene.position}


def score(images: Tensor, scenes: list[ShapeScene], seed: int = 0) -> dict[str, float]:
    """Accuracy per attribute, all four at once, and the shuffled-caption control for the shape colour."""
    judged = [judge_image(image) for image in images]
    hits = [_matches(j, s) for j, s in zip(judged, scenes, strict=True)]
    n = len(hits)
    result = {name: sum(h[name] for h in hits) / n for name in ATTRIBUTES}
    result["all"] = sum(all(h.values()) for h in hits) / n
    # Pair each image with another caption's targets: what agreement looks like without conditioning.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    shuffled = [_matches(judged[i], scenes[perm[i]])["shape_color"] for i in range(n)]
    result["shuffled_shape_color"] = sum(shuffled) / n
    return result


def _workflow(caption: str, ckpt_name: str, seed: int, steps: int, cfg: float, sampler: str,
              scheduler: str, size: int) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["ckpt", 1]}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


def generate(checkpoint: Path, captions: list[str], steps: int = 20, cfg: float = 5.0, sampler: str = "euler",
             scheduler: str = "normal", size: int = 64, seed: int = 0) -> Tensor:
    """One image per caption [N, H, W, 3] through the engine's txt2img workflow (the checkpoint loads once)."""
    from executor.executor import Executor
    from executor.services import Services
    from graph.load import graph_from_data
    from nodes.folders import FolderPaths, set_paths
    from nodes.registry import BUILTIN_MODULES, builtin_registry

    checkpoint = Path(checkpoint).resolve()
    registry = builtin_registry((*BUILTIN_MODULES, *(m for m in SD_NODE_MODULES if m not in BUILTIN_MODULES)))
    with tempfile.TemporaryDirectory() as temp:
        paths = FolderPaths(base=Path(temp), extra_model_paths={"checkpoints": [checkpoint.parent]},
                            temp_dir=Path(temp) / "temp")
        set_paths(paths)
        executor = Executor(registry, services=Services.create(paths))
        images = []
        for i, caption in enumerate(captions):
            graph = graph_from_data(_workflow(caption, checkpoint.name, seed + i, steps, cfg, sampler,
                                              scheduler, size), registry)
            result = executor.run(graph, keep=["decode"])
            if not result.ok:
                raise RuntimeError(f"txt2img failed for {caption!r}: {result.error}")
            images.append(result.values["decode"][0][0])
    return torch.stack(images)


def evaluate(checkpoint: Path, n: int = 100, steps: int = 20, cfg: float = 5.0, seed: int = 0,
             sampler: str = "euler") -> dict[str, float]:
    scenes = evaluation_scenes(n, seed)
    images = generate(checkpoint, [s.caption for s in scenes], steps, cfg, sampler, seed=seed)
    return score(images, scenes, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoints/loom-shapes-64.safetensors"))
    parser.add_argument("--n", type=int, default=100, help="held-out captions to generate")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    figures = evaluate(args.checkpoint, args.n, args.steps, args.cfg, args.seed, args.sampler)
    for name, value in figures.items():
        print(f"{name:>22}: {value:6.1%}")
    chance = 1 / (len(COLORS) - 1)
    print(f"(chance: colours {chance:.0%}, kind {1 / len(SHAPES):.0%}, position {1 / len(POSITIONS):.0%})")
    print(json.dumps({**figures, "n": args.n, "steps": args.steps, "cfg": args.cfg}))


if __name__ == "__main__":
    main()
