"""Training images with captions: the procedural shapes dataset and caption folders with aspect buckets."""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Colours far apart in RGB so that a pixel's nearest palette entry names it even after a lossy VAE.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7.0, "": 10.0, "large": 13.0}  # radius in pixels at 64 px; "" (medium) is unsaid
# Row-major 3x3 grid; "" is the centre and is not said in captions.
POSITIONS = ("at the top left", "at the top", "at the top right", "on the left", "",
             "on the right", "at the bottom left", "at the bottom", "at the bottom right")
GRID = (0.25, 0.5, 0.75)  # cell centres as fractions of the side
JITTER = 0.04  # centre jitter, a fraction of the side: keeps shapes well inside their grid cell


@dataclass(frozen=True)
class ShapeScene:
    """One picture: a shape of a colour, kind, size and grid position on a plain background."""

    background: str
    color: str
    shape: str
    size: str
    position: int  # index into POSITIONS

    @property
    def caption(self) -> str:
        words = ["a", self.size, self.color, self.shape, POSITIONS[self.position],
                 "on a", self.background, "background"]
        return " ".join(w for w in words if w)


def all_scenes() -> list[ShapeScene]:
    """Every caption the shapes dataset can produce (8 * 7 * 3 * 3 * 9 = 4,536)."""
    return [ShapeScene(bg, color, shape, size, pos)
            for bg in COLORS for color in COLORS if color != bg
            for shape in SHAPES for size in SIZES for pos in range(len(POSITIONS))]


def _held_out(scene: ShapeScene, fraction: float) -> bool:
    # A content hash (not Python's hash) so the split is the same in every process.
    digest = hashlib.sha256(scene.caption.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def split_scenes(held_out_fraction: float = 0.05) -> tuple[list[ShapeScene], list[ShapeScene]]:
    """(training scenes, held-out evaluation scenes): held-out captions never appear in training."""
    scenes = all_scenes()
    train = [s for s in scenes if not _held_out(s, held_out_fraction)]
    held = [s for s in scenes if _held_out(s, held_out_fraction)]
    return train, held


def evaluation_scenes(n: int = 100, seed: int = 0) -> list[ShapeScene]:
    """`n` held-out scenes in a seeded order, the benchmark's captions."""
    _, held = split_scenes()
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(seed)).tolist()
    return [held[i] for i in order[:n]]


def render_scenes(scenes: list[ShapeScene], size: int = 64, seed: int = 0, device: str | torch.device = "cpu",
                  jitter: bool = True) -> Tensor:
    """Antialiased pictures [N, 3, size, size] in -1..1, rendered as signed distance fields.

    Coverage is `clamp(0.5 - distance, 0, 1)` per pixel, which antialiases edges without
    supersampling; it runs batched on any device. Centres jitter by a seeded amount.
    """
    n = len(scenes)
    generator = torch.Generator().manual_seed(seed)
    offsets = (torch.rand(n, 2, generator=generator) * 2 - 1) * JITTER * size if jitter else torch.zeros(n, 2)
    centres = torch.tensor([[GRID[s.position % 3] * size, GRID[s.position // 3] * size] for s in scenes])
    centres = (centres + offsets).to(device).view(n, 1, 1, 2)
    radius = torch.tensor([SIZES[s.size] * size / 64 for s in scenes], device=device).view(n, 1, 1)
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device).view(n, 1, 1)
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    p = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), dim=-1) - centres  # [N, H, W, (x, y)]
    circle = p.norm(dim=-1) - radius
    square = (p.abs() - 0.9 * radius[..., None]).amax(dim=-1)
    # An upward equilateral triangle inscribed in the circle: its centroid is the given centre.
    edges = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
    triangle = torch.stack([p[..., 0] * ex + p[..., 1] * ey for ex, ey in edges], -1).amax(-1) - radius / 2
    distance = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    coverage = (0.5 - distance).clamp(0, 1).unsqueeze(1)
    colours = {name: torch.tensor(rgb, device=device, dtype=torch.float32) / 127.5 - 1 for name, rgb in PALETTE.items()}
    fg = torch.stack([colours[s.color] for s in scenes]).view(n, 3, 1, 1)
    bg = torch.stack([colours[s.background] for s in scenes]).view(n, 3, 1, 1)
    return bg + (fg - bg) * coverage


def sample_scenes(count: int, seed: int, scenes: list[ShapeScene] | None = None) -> list[ShapeScene]:
    """`count` scenes drawn uniformly (seeded) from `scenes` (default: the training split)."""
    pool = scenes if scenes is not None else split_scenes()[0]
    picks = torch.randint(len(pool), (count,), generator=torch.Generator().manual_seed(seed))
    return [pool[i] for i in picks.tolist()]


@dataclass
class ImageSet:
    """Pictures of one size [N, 3, H, W] in -1..1 with one caption each."""

    pixels: Tensor
    captions: list[str]


def pick_bucket(buckets: list[ImageSet], generator: torch.Generator) -> int:
    """A bucket index drawn in proportion to the buckets' sizes, so every image is equally likely."""
    if len(buckets) == 1:
        return 0
    weights = torch.tensor([float(len(b.captions)) for b in buckets])
    return int(torch.multinomial(weights, 1, generator=generator))


def shapes_dataset(count: int, seed: int = 0, size: int = 64, device: str | torch.device = "cpu") -> ImageSet:
    """The procedural shapes dataset: `count` training-split pictures, the same for the same seed."""
    scenes = sample_scenes(count, seed)
    chunks = [render_scenes(scenes[i:i + 4096], size, seed * 1_000_003 + i, device)
              for i in range(0, count, 4096)]
    return ImageSet(torch.cat(chunks), [s.caption for s in scenes])


def bucket_sizes(base: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs in multiples of `step` with about `base`^2 pixels, aspect up to `max_ratio`, and the
    square of `base` itself (down to a multiple of 8, the VAE's factor), which a `base` such as 96 or 160 that is
    no multiple of `step` would otherwise lack."""
    square = max(8, base // 8 * 8)
    sizes = {(square, square)}
    for width in range(step, int(base * max_ratio) + 1, step):
        height = max(step, round(base * base / width / step) * step)
        if max(width / height, height / width) <= max_ratio:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def caption_folder(folder: str | Path, base: int = 512, step: int = 64) -> list[ImageSet]:
    """A folder of images with same-named .txt captions, one ImageSet per aspect bucket.

    Each image goes to the bucket closest to its aspect ratio, is resized to cover the bucket and
    centre-cropped. Images without a caption file get an empty caption (unconditional training), and a
    warning says how many.
    """
    from PIL import Image

    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if base < step:
        raise ValueError(f"the picture size ({base}) must be at least {step} pixels")
    buckets = bucket_sizes(base, step)
    grouped: dict[tuple[int, int], tuple[list[Tensor], list[str]]] = {}
    uncaptioned = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, SyntaxError) as exc:  # truncated, corrupt or not a picture: name the file
            raise OSError(f"{path}: not a readable image ({exc})") from None
        aspect = image.width / image.height
        width, height = min(buckets, key=lambda b: abs(math.log(b[0] / b[1] / aspect)))
        scale = max(width / image.width, height / image.height)
        resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                               Image.Resampling.LANCZOS)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        cropped = resized.crop((left, top, left + width, top + height))
        pixels = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).view(height, width, 3)
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        if not caption:
            uncaptioned.append(path.name)
        images, captions = grouped.setdefault((width, height), ([], []))
        images.append(pixels.permute(2, 0, 1).float() / 127.5 - 1)
        captions.append(caption)
    if not grouped:
        raise ValueError(f"{folder}: no images ({', '.join(sorted(suffixes))}) found")
    if uncaptioned:
        shown = ", ".join(uncaptioned[:3]) + (", ..." if len(uncaptioned) > 3 else "")
        warnings.warn(f"{folder}: {len(uncaptioned)} of {sum(len(c) for _, c in grouped.values())} pictures have no "
                      f"caption (no same-named .txt, or an empty one: {shown}); they train unconditionally",
                      stacklevel=2)
    return [ImageSet(torch.stack(images), captions) for images, captions in grouped.values()]
