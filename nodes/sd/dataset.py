"""ComfyUI's data set preparation nodes (comfy_extras/nodes_dataset.py): folders of pictures or videos with their
captions as lists, per-item image, video and text edits, list shuffles, and training data sets of latents and
prompts saved as ComfyUI's shards, so that either program reads the other's.

A list here is an output declared `is_list`: the nodes it feeds run once per item, unless they take lists
(`input_is_list`). Pictures go through Pillow as ComfyUI's do: 8-bit channels made by truncation, int(255 * value).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.models import Clip, file_fingerprint
from nodes.sd.training_data import _folder_fingerprint, input_subfolders
from nodes.sd.video import Video, read_video
from nodes.spec import INT_MAX, Combo, Float, Int, Output, Socket, String

log = logging.getLogger("loom.dataset")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".webm", ".mkv", ".flv")
SAVE_MODES = ["overwrite", "increment"]
ADVANCED = {"advanced": True}
# ComfyUI seeds NumPy with seed % (2**32 - 1): the legacy generator takes 32-bit seeds.
SEED_MODULUS = 2**32 - 1


def _seed() -> Any:
    return Int(0, min=0, max=INT_MAX, tooltip="the random seed")


def _rng(seed: int) -> np.random.RandomState:
    return np.random.RandomState(seed % SEED_MODULUS)


# --- Folders ----------------------------------------------------------------------------------------------------------


def _inside(root: Path, name: str, node: str, what: str) -> Path:
    """`root / name`, refused when it leads outside `root` ("..", an absolute path, a link out)."""
    root = root.resolve()
    target = (root / name.replace("\\", "/")).resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"{node}: {what} {name!r} leads outside the {root.name} folder; name a folder inside it")
    return target


def _input_folder(name: str, node: str) -> Path:
    folder = _inside(get_paths().input, name, node, "folder")
    if not folder.is_dir():
        raise ValueError(f"{node}: there is no folder {name!r} in the input folder")
    return folder


def dataset_roots() -> list[Path]:
    """ComfyUI's "datasets" folders: datasets/ beside models/ (the base folder), with those extra_model_paths.yaml
    names under `datasets` (an is_default section's first). New data sets go into the first."""
    paths = get_paths()
    return [*paths.first_model_paths.get("datasets", []), paths.base / "datasets",
            *paths.extra_model_paths.get("datasets", [])]


def dataset_folders() -> list[str]:
    """Every folder under a datasets root holding metadata.json or a .safetensors file (not looked into further),
    as a path relative to its root."""
    found: set[str] = set()
    for root in dataset_roots():
        if not root.is_dir():
            continue
        seen: set[tuple[int, int]] = set()
        for directory, subdirs, files in os.walk(root, followlinks=True):
            stat = os.stat(directory)
            if (stat.st_dev, stat.st_ino) in seen:  # a link loop
                subdirs[:] = []
                continue
            seen.add((stat.st_dev, stat.st_ino))
            if Path(directory) != root and ("metadata.json" in files or any(f.endswith(".safetensors") for f in files)):
                found.add(Path(directory).relative_to(root).as_posix())
                subdirs[:] = []
    return sorted(found)


def _dataset_folder(name: str, node: str, new: bool) -> Path:
    """The data set folder `name`: for a new one, in the first datasets root; else the first root that has it."""
    roots = dataset_roots()
    for root in roots[:1] if new else roots:
        folder = _inside(root, name, node, "folder_name")
        if folder == root.resolve():
            raise ValueError(f"{node}: folder_name must name a folder inside the datasets folder, e.g. 'my_dataset'")
        if new or folder.is_dir():
            return folder
    raise ValueError(f"{node}: there is no data set {name!r} in the datasets folder")


def _files(folder: Path, suffixes: tuple[str, ...], repeat_subfolders: bool) -> list[Path]:
    """The files of `folder` with those suffixes, by name; with `repeat_subfolders`, also those of each sub-folder,
    as often as the number its name starts with says (kohya's `10_name` layout), once otherwise."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in suffixes:
            found.append(entry)
        elif entry.is_dir() and repeat_subfolders:
            prefix = entry.name.split("_")[0]
            inner = [p for p in sorted(entry.iterdir()) if p.is_file() and p.suffix.lower() in suffixes]
            found.extend(inner * (int(prefix) if prefix.isdigit() else 1))
    return found


def _caption(path: Path) -> str:
    caption = path.with_suffix(".txt")
    return caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""


# --- Pictures ---------------------------------------------------------------------------------------------------------


def load_picture(path: Path) -> torch.Tensor:
    """A picture file as IMAGE [1, H, W, 3], as ComfyUI's data set loader reads it (no EXIF turn)."""
    from PIL import Image

    with Image.open(path) as source:
        picture = source.point(lambda v: v * (1 / 255)) if source.mode == "I" else source
        array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]


def _to_pil(image: torch.Tensor):
    """One picture [1, H, W, C] or [H, W, C] as Pillow's, int(255 * value) clipped, as ComfyUI's tensor_to_pil."""
    from PIL import Image

    array = (image.reshape(image.shape[-3:]).detach().float().cpu().numpy() * 255).clip(0, 255).astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _from_pil(picture) -> torch.Tensor:
    array = np.asarray(picture, dtype=np.float32) / 255.0
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy())[None]


def _frames(images: list[torch.Tensor] | torch.Tensor, node: str) -> list[torch.Tensor]:
    """Every picture [1, H, W, C] of a list of IMAGE batches, in order."""
    if isinstance(images, torch.Tensor):
        images = [images]
    frames = []
    for image in images:
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"{node}: expected IMAGE batches [B, H, W, C], got {getattr(image, 'shape', image)!r}")
        frames.extend(image[i:i + 1] for i in range(len(image)))
    return frames


def _each_frame(images: torch.Tensor, edit: Any) -> torch.Tensor:
    """`edit` on each picture of a batch (ComfyUI runs its Pillow edits per frame), the results joined."""
    return torch.cat([edit(images[i:i + 1]) for i in range(len(images))]).to(images.device)


def _crop(image: torch.Tensor, left: int, top: int, width: int, height: int) -> torch.Tensor:
    """Pillow's crop box (left, top, left + width, top + height), bounded by the picture, on 8-bit channels."""
    picture = _to_pil(image)
    box = (left, top, min(picture.width, left + width), min(picture.height, top + height))
    return _from_pil(picture.crop(box))


def save_pictures(images: list[torch.Tensor], folder: Path, prefix: str, overwrite: bool) -> list[str]:
    """Each picture as PREFIX_NNNNN.png (index from 0; overwriting), or PREFIX_CCCCC_NNNNN.png with CCCCC one past
    the highest counter of the PREFIX_ files there (ComfyUI's get_save_image_path); the names written."""
    folder.mkdir(parents=True, exist_ok=True)
    start = ""
    if not overwrite:
        counters = [int(part) for p in folder.iterdir() if p.name.startswith(prefix + "_")
                    and (part := p.name[len(prefix) + 1:].split("_")[0]).isdigit()]
        start = f"{max(counters, default=0) + 1:05}_"
    names = []
    for index, image in enumerate(images):
        name = f"{prefix}_{start}{index:05d}.png"
        _to_pil(image).save(folder / name)
        names.append(name)
    return names


def _prefix_problem(prefix: Any, node: str) -> str | None:
    if isinstance(prefix, str) and (not prefix or Path(prefix).name != prefix or prefix in (".", "..")
                                    or "\\" in prefix):
        return f"{node}: filename_prefix {prefix!r} must be a plain file name (the folder goes in folder_name)"
    return None


def _folder_problem(name: Any, node: str) -> str | None:
    if isinstance(name, str):
        try:
            _inside(get_paths().output, name, node, "folder_name")
        except ValueError as exc:
            return str(exc)
    return None


# --- Loading and saving pictures and videos ---------------------------------------------------------------------------


class LoadImageDataSetFromFolder(Node):
    """Loads the pictures (PNG, JPG, JPEG, WEBP) of a folder of input/, by name, as a list: one IMAGE each, at its
    own size."""

    display_name = "Load Image (from Folder)"
    category = "image"
    folder = Combo(input_subfolders, tooltip="the folder of input/ to load pictures from")
    outputs = (Output("IMAGE", "images", is_list=True, tooltip="the pictures, one per item"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _folder_fingerprint(inputs)

    def execute(self, folder: str) -> tuple[list[torch.Tensor]]:
        files = _files(_input_folder(folder, self.name), IMAGE_SUFFIXES, repeat_subfolders=False)
        if not files:
            raise ValueError(f"{self.name}: the folder {folder!r} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
        return ([load_picture(path) for path in files],)


class LoadImageTextDataSetFromFolder(Node):
    """Loads the pictures of a folder of input/ and their captions (the same-named .txt file, trimmed; none: empty)
    as two lists. A sub-folder named `N_name` adds its pictures N times (kohya's layout), another once."""

    display_name = "Load Image-Text (from Folder)"
    category = "image"
    folder = Combo(input_subfolders, tooltip="the folder of input/ to load pictures and captions from")
    outputs = (Output("IMAGE", "images", is_list=True, tooltip="the pictures, one per item"),
               Output("STRING", "texts", is_list=True, tooltip="the caption of each picture"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _folder_fingerprint(inputs)

    def execute(self, folder: str) -> tuple[list[torch.Tensor], list[str]]:
        files = _files(_input_folder(folder, self.name), IMAGE_SUFFIXES, repeat_subfolders=True)
        if not files:
            raise ValueError(f"{self.name}: the folder {folder!r} holds no pictures ({', '.join(IMAGE_SUFFIXES)})")
        return [load_picture(path) for path in files], [_caption(path) for path in files]


class LoadVideoDataSetFromFolder(Node):
    """Loads the videos (MP4, AVI, MOV, WEBM, MKV, FLV) of a folder of input/, by name, as a list of VIDEOs. Loom's
    VIDEO holds its frames: each video is decoded whole here (ComfyUI decodes lazily, when a node needs frames)."""

    display_name = "Load Video (from Folder)"
    category = "video"
    folder = Combo(input_subfolders, tooltip="the folder of input/ holding the videos")
    outputs = (Output("VIDEO", "videos", is_list=True, tooltip="the videos, one per item"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _folder_fingerprint(inputs)

    def execute(self, folder: str) -> tuple[list[Video]]:
        files = _files(_input_folder(folder, self.name), VIDEO_SUFFIXES, repeat_subfolders=False)
        if not files:
            raise ValueError(f"{self.name}: the folder {folder!r} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
        return ([read_video(path) for path in files],)


class LoadVideoTextDataSetFromFolder(Node):
    """Loads the videos of a folder of input/ and their captions (the same-named .txt file) as two lists; `N_name`
    sub-folders add their videos N times (kohya's layout). Each video is decoded whole."""

    display_name = "Load Video-Text (from Folder)"
    category = "video"
    folder = Combo(input_subfolders, tooltip="the folder of input/ holding the videos and .txt captions")
    outputs = (Output("VIDEO", "videos", is_list=True, tooltip="the videos, one per item"),
               Output("STRING", "texts", is_list=True, tooltip="the caption of each video"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _folder_fingerprint(inputs)

    def execute(self, folder: str) -> tuple[list[Video], list[str]]:
        files = _files(_input_folder(folder, self.name), VIDEO_SUFFIXES, repeat_subfolders=True)
        if not files:
            raise ValueError(f"{self.name}: the folder {folder!r} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
        videos: dict[Path, Video] = {}
        for path in files:  # a repeated video is decoded once
            if path not in videos:
                videos[path] = read_video(path)
        return [videos[path] for path in files], [_caption(path) for path in files]


class SaveImageDataSetToFolder(Node):
    """Saves every picture of the list as PNG in a folder of output/: PREFIX_00000.png, ... (overwrite), or
    PREFIX_CCCCC_00000.png, ... with a new counter CCCCC (increment)."""

    display_name = "Save Image (to Folder) (DEPRECATED)"
    category = "image"
    output_node = True
    input_is_list = True
    images = Socket("IMAGE", tooltip="the pictures to save")
    folder_name = String("dataset", tooltip="the folder to save into, inside output/")
    filename_prefix = String("image", tooltip="the start of each file name", extra=ADVANCED)
    mode = Combo(SAVE_MODES, tooltip="overwrite files of the same names, or count on past the existing ones")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return (_folder_problem(inputs.get("folder_name"), cls.name)
                or _prefix_problem(inputs.get("filename_prefix"), cls.name))

    def execute(self, images: list[torch.Tensor], folder_name: list[str], filename_prefix: list[str],
                mode: list[str]) -> tuple[()]:
        problem = self.check_inputs({"folder_name": folder_name[0], "filename_prefix": filename_prefix[0]})
        if problem:
            raise ValueError(problem)
        folder = _inside(get_paths().output, folder_name[0], self.name, "folder_name")
        names = save_pictures(_frames(images, self.name), folder, filename_prefix[0], mode[0] == "overwrite")
        log.info("saved %d pictures to %s", len(names), folder)
        return ()


class SaveImageTextDataSetToFolder(Node):
    """Saves every picture of the list as PNG in a folder of output/ (named as Save Image (to Folder) names them)
    and each caption beside its picture, as the same name with .txt."""

    display_name = "Save Image-Text (to Folder)"
    category = "image"
    output_node = True
    input_is_list = True
    images = Socket("IMAGE", tooltip="the pictures to save")
    texts = Socket("STRING", optional=True, tooltip="the captions, one per picture")
    folder_name = String("dataset", tooltip="the folder to save into, inside output/")
    filename_prefix = String("image", tooltip="the start of each file name", extra=ADVANCED)
    mode = Combo(SAVE_MODES, tooltip="overwrite files of the same names, or count on past the existing ones")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return (_folder_problem(inputs.get("folder_name"), cls.name)
                or _prefix_problem(inputs.get("filename_prefix"), cls.name))

    def execute(self, images: list[torch.Tensor], folder_name: list[str], filename_prefix: list[str],
                mode: list[str], texts: list[str] | None = None) -> tuple[()]:
        problem = self.check_inputs({"folder_name": folder_name[0], "filename_prefix": filename_prefix[0]})
        if problem:
            raise ValueError(problem)
        folder = _inside(get_paths().output, folder_name[0], self.name, "folder_name")
        names = save_pictures(_frames(images, self.name), folder, filename_prefix[0], mode[0] == "overwrite")
        # As ComfyUI: captions pair with the pictures in order; the surplus of the longer list is not written.
        for name, caption in zip(names, texts or [], strict=False):
            (folder / name).with_suffix(".txt").write_text(str(caption), encoding="utf-8")
        log.info("saved %d pictures and captions to %s", len(names), folder)
        return ()


# --- Picture edits, per picture ---------------------------------------------------------------------------------------


class ResizeImagesByShorterEdge(Node):
    """Resizes each picture with Pillow's LANCZOS so that its shorter side (the height for a square) is
    `shorter_edge`, the other side int(side * shorter_edge / shorter side), truncated."""

    display_name = "Resize Images by Shorter Edge (DEPRECATED)"
    category = "image/transform"
    images = Socket("IMAGE", tooltip="the picture to resize")
    shorter_edge = Int(512, min=1, max=8192, tooltip="the length of the shorter side, in pixels")
    outputs = (Output("IMAGE", "images", tooltip="the resized pictures"),)

    def execute(self, images: torch.Tensor, shorter_edge: int) -> tuple[torch.Tensor]:
        from PIL import Image

        def resize(image: torch.Tensor) -> torch.Tensor:
            picture = _to_pil(image)
            w, h = picture.size
            size = (shorter_edge, int(h * (shorter_edge / w))) if w < h else (int(w * (shorter_edge / h)),
                                                                              shorter_edge)
            return _from_pil(picture.resize(size, Image.Resampling.LANCZOS))

        return (_each_frame(images, resize),)


class CenterCropImages(Node):
    """Crops the centre `width` x `height` of each picture (the whole side where the picture is smaller); the
    left and top margins are (side - size) // 2."""

    display_name = "Crop Image (Center)"
    category = "image/transform"
    images = Socket("IMAGE", tooltip="the picture to crop")
    width = Int(512, min=1, max=8192, tooltip="the crop's width")
    height = Int(512, min=1, max=8192, tooltip="the crop's height")
    outputs = (Output("IMAGE", "images", tooltip="the cropped pictures"),)

    def execute(self, images: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor]:
        h, w = images.shape[1:3]
        left, top = max(0, (w - width) // 2), max(0, (h - height) // 2)
        return (_each_frame(images, lambda image: _crop(image, left, top, width, height)),)


class RandomCropImages(Node):
    """Crops `width` x `height` of each picture at a place the seed draws (NumPy's legacy generator seeded with
    seed % (2**32 - 1): the left edge, then the top); every picture of a batch gets the same place."""

    display_name = "Crop Image (Random)"
    category = "image/transform"
    images = Socket("IMAGE", tooltip="the picture to crop")
    width = Int(512, min=1, max=8192, tooltip="the crop's width")
    height = Int(512, min=1, max=8192, tooltip="the crop's height")
    seed = _seed()
    outputs = (Output("IMAGE", "images", tooltip="the cropped pictures"),)

    def execute(self, images: torch.Tensor, width: int, height: int, seed: int) -> tuple[torch.Tensor]:
        h, w = images.shape[1:3]
        rng = _rng(seed)
        max_left, max_top = max(0, w - width), max(0, h - height)
        left = int(rng.randint(0, max_left + 1)) if max_left > 0 else 0
        top = int(rng.randint(0, max_top + 1)) if max_top > 0 else 0
        return (_each_frame(images, lambda image: _crop(image, left, top, width, height)),)


class NormalizeImages(Node):
    """(image - mean) / std on every channel (not clamped)."""

    display_name = "Normalize Image Colors"
    category = "image/color"
    images = Socket("IMAGE", tooltip="the pictures to normalize")
    mean = Float(0.5, min=0.0, max=1.0, tooltip="the mean subtracted", extra=ADVANCED)
    std = Float(0.5, min=0.001, max=1.0, tooltip="the standard deviation divided by", extra=ADVANCED)
    outputs = (Output("IMAGE", "images", tooltip="the normalized pictures"),)

    def execute(self, images: torch.Tensor, mean: float, std: float) -> tuple[torch.Tensor]:
        return ((images - mean) / std,)


class AdjustBrightness(Node):
    """image * factor, clamped to 0..1."""

    display_name = "Adjust Brightness"
    category = "image/adjustments"
    images = Socket("IMAGE", tooltip="the pictures to brighten or darken")
    factor = Float(1.0, min=0.0, max=2.0, tooltip="1: unchanged; below: darker; above: brighter")
    outputs = (Output("IMAGE", "images", tooltip="the adjusted pictures"),)

    def execute(self, images: torch.Tensor, factor: float) -> tuple[torch.Tensor]:
        return ((images * factor).clamp(0.0, 1.0),)


class AdjustContrast(Node):
    """(image - 0.5) * factor + 0.5, clamped to 0..1."""

    display_name = "Adjust Contrast"
    category = "image/adjustments"
    images = Socket("IMAGE", tooltip="the pictures to adjust")
    factor = Float(1.0, min=0.0, max=2.0, tooltip="1: unchanged; below: less contrast; above: more")
    outputs = (Output("IMAGE", "images", tooltip="the adjusted pictures"),)

    def execute(self, images: torch.Tensor, factor: float) -> tuple[torch.Tensor]:
        return (((images - 0.5) * factor + 0.5).clamp(0.0, 1.0),)


# --- Picture lists ----------------------------------------------------------------------------------------------------


class ShuffleDataset(Node):
    """Shuffles the pictures of the list (batches split into single pictures) with NumPy's permutation of the
    seed (seed % (2**32 - 1))."""

    display_name = "Shuffle Images List"
    category = "image/batch"
    input_is_list = True
    images = Socket("IMAGE", tooltip="the pictures to shuffle")
    seed = _seed()
    outputs = (Output("IMAGE", "images", is_list=True, tooltip="the pictures in their new order"),)

    def execute(self, images: list[torch.Tensor], seed: list[int]) -> tuple[list[torch.Tensor]]:
        frames = _frames(images, self.name)
        return ([frames[i] for i in _rng(seed[0]).permutation(len(frames))],)


class ShuffleImageTextDataset(Node):
    """Shuffles pictures and captions in one order, keeping each pair (the list items as they come: a batch
    moves whole)."""

    display_name = "Shuffle Pairs of Image-Text"
    category = "image/batch"
    input_is_list = True
    images = Socket("IMAGE", tooltip="the pictures to shuffle")
    texts = Socket("STRING", tooltip="their captions, one per picture")
    seed = _seed()
    outputs = (Output("IMAGE", "images", is_list=True, tooltip="the pictures in their new order"),
               Output("STRING", "texts", is_list=True, tooltip="the captions in the same order"))

    def execute(self, images: list[torch.Tensor], texts: list[str], seed: list[int]) -> tuple[list, list]:
        if len(texts) != len(images):
            raise ValueError(f"{self.name}: {len(images)} pictures and {len(texts)} captions; give one caption per "
                             "picture")
        order = _rng(seed[0]).permutation(len(images))
        return [images[i] for i in order], [texts[i] for i in order]


def _average_hash(image: torch.Tensor) -> np.ndarray:
    """ComfyUI's 64-bit hash: the picture by LANCZOS to 8x8, then grey (Pillow's L); a bit per pixel above the mean."""
    from PIL import Image

    small = np.asarray(_to_pil(image).resize((8, 8), Image.Resampling.LANCZOS).convert("L"), dtype=np.float64)
    return (small > small.mean()).ravel()


class ImageDeduplication(Node):
    """Drops each picture whose 8x8 average hash is as similar as `similarity_threshold` (1 - differing bits / 64)
    to a picture kept before it."""

    display_name = "Deduplicate Images"
    category = "image/batch"
    input_is_list = True
    images = Socket("IMAGE", tooltip="the pictures to deduplicate")
    similarity_threshold = Float(0.95, min=0.0, max=1.0, extra=ADVANCED,
                                 tooltip="pictures at least this similar (0..1) to one kept are dropped")
    outputs = (Output("IMAGE", "images", is_list=True, tooltip="the pictures kept"),)

    def execute(self, images: list[torch.Tensor], similarity_threshold: list[float]) -> tuple[list[torch.Tensor]]:
        frames = _frames(images, self.name)
        hashes = [_average_hash(frame) for frame in frames]
        kept: list[int] = []
        for i, bits in enumerate(hashes):
            if all(1.0 - np.count_nonzero(bits != hashes[j]) / 64.0 < similarity_threshold[0] for j in kept):
                kept.append(i)
        log.info("deduplication kept %d of %d pictures", len(kept), len(frames))
        return ([frames[i] for i in kept],)


class ImageGrid(Node):
    """Lays the pictures out in rows of `columns` cells on black, each resized (LANCZOS) to the cell, `padding`
    pixels apart; one IMAGE."""

    display_name = "Make Image Grid"
    category = "image/batch"
    input_is_list = True
    images = Socket("IMAGE", tooltip="the pictures to lay out")
    columns = Int(4, min=1, max=20, tooltip="cells per row")
    cell_width = Int(256, min=32, max=2048, tooltip="the width of each cell", extra=ADVANCED)
    cell_height = Int(256, min=32, max=2048, tooltip="the height of each cell", extra=ADVANCED)
    padding = Int(4, min=0, max=50, tooltip="pixels between cells", extra=ADVANCED)
    outputs = (Output("IMAGE", "images", tooltip="the grid"),)

    def execute(self, images: list[torch.Tensor], columns: list[int], cell_width: list[int], cell_height: list[int],
                padding: list[int]) -> tuple[torch.Tensor]:
        from PIL import Image

        frames = _frames(images, self.name)
        if not frames:
            raise ValueError(f"{self.name}: no pictures to lay out")
        cols, width, height, gap = columns[0], cell_width[0], cell_height[0], padding[0]
        rows = -(-len(frames) // cols)
        grid = Image.new("RGB", (cols * width + (cols - 1) * gap, rows * height + (rows - 1) * gap), (0, 0, 0))
        for index, frame in enumerate(frames):
            cell = _to_pil(frame).resize((width, height), Image.Resampling.LANCZOS)
            grid.paste(cell, ((index % cols) * (width + gap), (index // cols) * (height + gap)))
        return (_from_pil(grid),)


class MergeImageLists(Node):
    """Joins every picture it is given (lists and batches, in order) into one list."""

    display_name = "Merge Image Lists (DEPRECATED)"
    category = "image/batch"
    input_is_list = True
    images = Socket("IMAGE", tooltip="the pictures to join")
    outputs = (Output("IMAGE", "images", is_list=True, tooltip="the pictures, one per item"),)

    def execute(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor]]:
        return (_frames(images, self.name),)


# --- Videos -----------------------------------------------------------------------------------------------------------


def _video_part(video: Video, start: int, count: int) -> Video:
    """Frames start..start + count of a video, with the audio of the same time span."""
    audio = video.audio
    if audio is not None:
        rate = audio["sample_rate"]
        first, last = int(start / video.fps * rate), int((start + count) / video.fps * rate)
        audio = {**audio, "waveform": audio["waveform"][..., first:last]}
    return Video(video.images[start:start + count], video.fps, audio)


class VideoFrameSample(Node):
    """Takes `num_frames` frames of a video (all, where it has fewer): the first (head) or last (tail) ones with
    their audio, or spread evenly (uniform: round(i * (frames - 1) / (num_frames - 1)); one frame: the middle) or
    drawn by the seed (random, in order), without audio."""

    display_name = "Sample Video Frame"
    category = "video"
    video = Socket("VIDEO", tooltip="the video")
    num_frames = Int(16, min=1, max=9999, tooltip="frames to take")
    strategy = Combo(["uniform", "head", "tail", "random"], default="uniform",
                     tooltip="uniform: evenly spaced; head: the first; tail: the last; random: drawn, in order")
    seed = Int(0, min=0, max=INT_MAX, tooltip="the random seed (random only)")
    outputs = (Output("VIDEO", "video", tooltip="the frames taken"),)

    def execute(self, video: Video, num_frames: int, strategy: str, seed: int) -> tuple[Video]:
        total = len(video.images)
        count = min(num_frames, total)
        if strategy == "head":
            return (_video_part(video, 0, count),)
        if strategy == "tail":
            return (_video_part(video, total - count, count),)
        if strategy == "uniform":
            indices = [total // 2] if count == 1 else [round(i * (total - 1) / (count - 1)) for i in range(count)]
        elif strategy == "random":
            indices = sorted(_rng(seed).choice(total, size=count, replace=False).tolist())
        else:
            raise ValueError(f"{self.name}: unknown strategy {strategy!r}; choose uniform, head, tail or random")
        return (Video(video.images[indices], video.fps),)


class VideoTemporalCrop(Node):
    """Keeps `length` frames from `start_frame` on (a start past the end: the last frame), with their audio."""

    display_name = "Crop Video (Temporal)"
    category = "video/transform"
    video = Socket("VIDEO", tooltip="the video")
    start_frame = Int(0, min=0, max=99999, tooltip="the first frame kept")
    length = Int(16, min=1, max=99999, tooltip="frames to keep")
    outputs = (Output("VIDEO", "video", tooltip="the frames kept"),)

    def execute(self, video: Video, start_frame: int, length: int) -> tuple[Video]:
        total = len(video.images)
        start = min(start_frame, max(total - 1, 0))
        return (_video_part(video, start, min(length, total - start)),)


class VideoRandomTemporalCrop(Node):
    """Keeps `length` consecutive frames (all, where the video is shorter) from a start the seed draws, with their
    audio."""

    display_name = "Crop Video (Temporal Random)"
    category = "video/transform"
    video = Socket("VIDEO", tooltip="the video")
    length = Int(16, min=1, max=99999, tooltip="frames to keep")
    seed = _seed()
    outputs = (Output("VIDEO", "video", tooltip="the frames kept"),)

    def execute(self, video: Video, length: int, seed: int) -> tuple[Video]:
        total = len(video.images)
        count = min(length, total)
        latest = total - count
        start = int(_rng(seed).randint(0, latest + 1)) if latest > 0 else 0
        return (_video_part(video, start, count),)


class ShuffleVideoDataset(Node):
    """Shuffles the videos of the list with NumPy's permutation of the seed."""

    display_name = "Shuffle Videos List"
    category = "video/batch"
    input_is_list = True
    videos = Socket("VIDEO", tooltip="the videos to shuffle")
    seed = _seed()
    outputs = (Output("VIDEO", "videos", is_list=True, tooltip="the videos in their new order"),)

    def execute(self, videos: list[Video], seed: list[int]) -> tuple[list[Video]]:
        return ([videos[i] for i in _rng(seed[0]).permutation(len(videos))],)


class ShuffleVideoTextDataset(Node):
    """Shuffles videos and captions in one order, keeping each pair."""

    display_name = "Shuffle Pairs of Video-Text"
    category = "video/batch"
    input_is_list = True
    videos = Socket("VIDEO", tooltip="the videos to shuffle")
    texts = String(None, tooltip="their captions, one per video")
    seed = _seed()
    outputs = (Output("VIDEO", "videos", is_list=True, tooltip="the videos in their new order"),
               Output("STRING", "texts", is_list=True, tooltip="the captions in the same order"))

    def execute(self, videos: list[Video], texts: list[str], seed: list[int]) -> tuple[list, list]:
        if len(texts) != len(videos):
            raise ValueError(f"{self.name}: {len(videos)} videos and {len(texts)} captions; give one caption per "
                             "video")
        order = _rng(seed[0]).permutation(len(videos))
        return [videos[i] for i in order], [texts[i] for i in order]


# --- Texts, per text --------------------------------------------------------------------------------------------------


class _TextEdit(Node):
    """A text node that edits each text of a list (or the one text it is given)."""

    category = "text"
    texts = String(None, tooltip="the text to edit")
    outputs = (Output("STRING", "texts", tooltip="the edited texts"),)

    def edit(self, text: str, **options: Any) -> str:
        raise NotImplementedError

    def execute(self, texts: str, **options: Any) -> tuple[str]:
        if not isinstance(texts, str):
            raise ValueError(f"{self.name}: expected a text, got {type(texts).__name__}")
        return (self.edit(texts, **options),)


class TextToLowercase(_TextEdit):
    """Lower-cases the text."""

    display_name = "Convert Text to Lowercase (DEPRECATED)"

    def edit(self, text: str) -> str:
        return text.lower()


class TextToUppercase(_TextEdit):
    """Upper-cases the text."""

    display_name = "Convert Text to Uppercase (DEPRECATED)"

    def edit(self, text: str) -> str:
        return text.upper()


class TruncateText(_TextEdit):
    """Keeps the first `max_length` characters."""

    display_name = "Truncate Text"
    max_length = Int(77, min=1, max=10000, tooltip="characters to keep")

    def edit(self, text: str, max_length: int) -> str:
        return text[:max_length]


class AddTextPrefix(_TextEdit):
    """Puts `prefix` before the text."""

    display_name = "Add Text Prefix (DEPRECATED)"
    prefix = String("", tooltip="the text put before")

    def edit(self, text: str, prefix: str) -> str:
        return prefix + text


class AddTextSuffix(_TextEdit):
    """Puts `suffix` after the text."""

    display_name = "Add Text Suffix (DEPRECATED)"
    suffix = String("", tooltip="the text put after")

    def edit(self, text: str, suffix: str) -> str:
        return text + suffix


class ReplaceText(_TextEdit):
    """Replaces every occurrence of `find` with `replace` (an empty `find`: between every character, as Python's
    str.replace)."""

    display_name = "Replace Text (DEPRECATED)"
    find = String("", tooltip="the text to find")
    replace = String("", tooltip="the text put in its place")

    def edit(self, text: str, find: str, replace: str) -> str:
        return text.replace(find, replace)


class StripWhitespace(_TextEdit):
    """Strips leading and trailing whitespace."""

    display_name = "Strip Whitespace (DEPRECATED)"

    def edit(self, text: str) -> str:
        return text.strip()


class MergeTextLists(Node):
    """Joins every text it is given (lists, in order) into one list."""

    display_name = "Merge Text Lists (DEPRECATED)"
    category = "text"
    input_is_list = True
    texts = String(None, tooltip="the texts to join")
    outputs = (Output("STRING", "texts", is_list=True, tooltip="the texts, one per item"),)

    def execute(self, texts: list[str]) -> tuple[list[str]]:
        return (list(texts),)


# --- Training data sets -----------------------------------------------------------------------------------------------


class ResolutionBucket(Node):
    """Groups latents (batches split) with their prompts by height and width, in order of first appearance: one
    LATENT batch and one CONDITIONING (an entry per latent) per size."""

    display_name = "Resolution Bucket"
    category = "model/training"
    input_is_list = True
    latents = Socket("LATENT", tooltip="the latents to group, one item per picture")
    conditioning = Socket("CONDITIONING", tooltip="the prompt of each latent (a list as long as latents)")
    outputs = (Output("LATENT", "latents", is_list=True, tooltip="one batch per size"),
               Output("CONDITIONING", "conditioning", is_list=True, tooltip="the prompts of each batch"))

    def execute(self, latents: list[dict], conditioning: list[list]) -> tuple[list[dict], list[list]]:
        if len(latents) != len(conditioning):
            raise ValueError(f"{self.name}: {len(latents)} latents and {len(conditioning)} conditionings; give one "
                             "conditioning per latent")
        buckets: dict[tuple[int, int], tuple[list[torch.Tensor], list]] = {}
        for latent, prompts in zip(latents, conditioning, strict=True):
            samples = latent["samples"]
            if len(prompts) < len(samples):
                raise ValueError(f"{self.name}: a latent batch of {len(samples)} has {len(prompts)} conditioning "
                                 "entries; give one entry per latent of the batch")
            for i, sample in enumerate(samples):
                bucket = buckets.setdefault(tuple(sample.shape[-2:]), ([], []))
                bucket[0].append(sample)
                bucket[1].append(prompts[i])
        for (h, w), (items, _) in buckets.items():
            log.info("resolution bucket %dx%d: %d samples", h, w, len(items))
        return ([{"samples": torch.stack(items)} for items, _ in buckets.values()],
                [prompts for _, prompts in buckets.values()])


class MakeTrainingDataset(Node):
    """Encodes each picture with the VAE and each caption with the CLIP (one caption for all, one each, or none:
    the empty prompt), as lists of LATENTs and CONDITIONINGs for training."""

    display_name = "Make Training Dataset"
    category = "model/training"
    input_is_list = True
    images = Socket("IMAGE", tooltip="the pictures to encode")
    vae = Socket("VAE", tooltip="the VAE that encodes the pictures")
    clip = Socket("CLIP", tooltip="the text encoder for the captions")
    texts = Socket("STRING", optional=True, tooltip="one caption per picture, one for all, or none (empty)")
    outputs = (Output("LATENT", "latents", is_list=True, tooltip="a latent per picture"),
               Output("CONDITIONING", "conditioning", is_list=True, tooltip="a conditioning per picture"))

    def execute(self, images: list[torch.Tensor], vae: list, clip: list[Clip],
                texts: list[str] | None = None) -> tuple[list[dict], list[list]]:
        from nodes.sd.conditioning import _encoded
        from nodes.sd.vae import encode

        captions = list(texts or []) or [""]
        if len(captions) == 1:
            captions *= len(images)
        if len(captions) != len(images):
            raise ValueError(f"{self.name}: {len(captions)} texts for {len(images)} images; give one text per "
                             "image, one for all, or none")
        latents = [{"samples": encode(self, vae[0], image[..., :3])} for image in images]
        encoded: dict[str, list] = {}
        for caption in captions:
            if caption not in encoded:
                encoded[caption] = _encoded(self, clip[0], caption, lambda e: {} if e.pooled is None else
                                            {"pooled_output": e.pooled.float().cpu()})
        return latents, [list(encoded[caption]) for caption in captions]


def _storable(value: Any) -> bool:
    """Whether torch.load(weights_only=True) reads the value back: tensors, plain values and containers of them."""
    if isinstance(value, torch.Tensor | str | int | float | bool | type(None)):
        return True
    if isinstance(value, list | tuple):
        return all(_storable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _storable(v) for k, v in value.items())
    return False


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, list | tuple):
        return [_to_cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


class SaveTrainingDataset(Node):
    """Saves latents and their prompts as ComfyUI does, in a folder of datasets/: shard_0000.pkl, ... (torch.save of
    {"latents": [LATENT, ...], "conditioning": [CONDITIONING, ...]}, `shard_size` samples each) and metadata.json."""

    display_name = "Save Training Dataset"
    category = "model/training"
    output_node = True
    input_is_list = True
    latents = Socket("LATENT", tooltip="the latents, from Make Training Dataset")
    conditioning = Socket("CONDITIONING", tooltip="their prompts, from Make Training Dataset")
    folder_name = String("training_dataset", tooltip="the folder to save into, inside datasets/ "
                                                     "(sub-folders like project/run1 allowed)")
    shard_size = Int(1000, min=1, max=100000, tooltip="samples per shard file", extra=ADVANCED)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        name = inputs.get("folder_name")
        if isinstance(name, str):
            try:
                _dataset_folder(name, cls.name, new=True)
            except ValueError as exc:
                return str(exc)
        return None

    def execute(self, latents: list[dict], conditioning: list[list], folder_name: list[str],
                shard_size: list[int]) -> tuple[()]:
        if len(latents) != len(conditioning):
            raise ValueError(f"{self.name}: {len(latents)} latents and {len(conditioning)} conditionings; give one "
                             "conditioning per latent")
        for prompts in conditioning:
            for _, options in prompts:
                odd = sorted(k for k, v in options.items() if not _storable(v))
                if odd:
                    raise ValueError(f"{self.name}: the conditioning option(s) {', '.join(odd)} (from hooks or "
                                     "model patches) cannot be saved in a data set; train on plain prompts")
        folder = _dataset_folder(folder_name[0], self.name, new=True)
        folder.mkdir(parents=True, exist_ok=True)
        size, count = shard_size[0], len(latents)
        shards = -(-count // size)
        for shard in range(shards):
            part = slice(shard * size, min((shard + 1) * size, count))
            # ComfyUI's layout: conditioning entries as [tensor, options] lists.
            data = {"latents": [_to_cpu(latent) for latent in latents[part]],
                    "conditioning": [[[_to_cpu(e), _to_cpu(o)] for e, o in prompts] for prompts in conditioning[part]]}
            with open(folder / f"shard_{shard:04d}.pkl", "wb") as handle:
                torch.save(data, handle)
        metadata = {"num_samples": count, "num_shards": shards, "shard_size": size}
        (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
        log.info("saved %d samples in %d shards to %s", count, shards, folder)
        return ()


class LoadTrainingDataset(Node):
    """Loads a data set Save Training Dataset wrote (ComfyUI's or Loom's): every shard_*.pkl of the folder, by name,
    as lists of LATENTs and CONDITIONINGs."""

    display_name = "Load Training Dataset"
    category = "model/training"
    folder_name = Combo(dataset_folders, tooltip="the data set, a folder of datasets/")
    outputs = (Output("LATENT", "latents", is_list=True, tooltip="the latents"),
               Output("CONDITIONING", "conditioning", is_list=True, tooltip="their prompts"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        try:
            folder = _dataset_folder(str(inputs.get("folder_name", "")), cls.name, new=False)
        except ValueError:
            return None
        return [[p.name, file_fingerprint(p)] for p in sorted(folder.glob("shard_*.pkl"))]

    def execute(self, folder_name: str) -> tuple[list[dict], list[list]]:
        folder = _dataset_folder(folder_name, self.name, new=False)
        shards = sorted(p for p in folder.iterdir() if p.name.startswith("shard_") and p.name.endswith(".pkl"))
        if not shards:
            raise ValueError(f"{self.name}: the data set {folder_name!r} holds no shard_*.pkl files")
        latents: list[dict] = []
        conditioning: list[list] = []
        for shard in shards:
            try:
                with open(shard, "rb") as handle:
                    data = torch.load(handle, weights_only=True)
                latents.extend(data["latents"])
                conditioning.extend([[(e, o) for e, o in prompts] for prompts in data["conditioning"]])
            except (KeyError, TypeError, ValueError, RuntimeError, EOFError) as exc:
                raise ValueError(f"{self.name}: {shard.name} of {folder_name!r} is not a training data set shard "
                                 f"({exc})") from exc
        return latents, conditioning


NODES: list[Any] = [
    LoadImageDataSetFromFolder, LoadImageTextDataSetFromFolder, LoadVideoDataSetFromFolder,
    LoadVideoTextDataSetFromFolder, SaveImageDataSetToFolder, SaveImageTextDataSetToFolder,
    ResizeImagesByShorterEdge, CenterCropImages, RandomCropImages, NormalizeImages, AdjustBrightness, AdjustContrast,
    ShuffleDataset, ShuffleImageTextDataset, ImageDeduplication, ImageGrid, MergeImageLists,
    VideoFrameSample, VideoTemporalCrop, VideoRandomTemporalCrop, ShuffleVideoDataset, ShuffleVideoTextDataset,
    TextToLowercase, TextToUppercase, TruncateText, AddTextPrefix, AddTextSuffix, ReplaceText, StripWhitespace,
    MergeTextLists, ResolutionBucket, MakeTrainingDataset, SaveTrainingDataset, LoadTrainingDataset,
]
