"""ComfyUI's training data set nodes: the pictures of a folder of input/ as one IMAGE batch, with their captions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.models import Clip, file_fingerprint
from nodes.spec import Combo, Int, Output, Socket

# The picture files a data set folder holds (ComfyUI's list).
DATA_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RESIZE_METHODS = ["None", "Stretch", "Crop", "Pad"]


def input_subfolders() -> list[str]:
    """Every folder under input/, as a path relative to it."""
    root = get_paths().input
    if not root.is_dir():
        return []
    return sorted(Path(directory).relative_to(root).as_posix() for directory, _, _ in os.walk(root)
                  if Path(directory) != root)


def _folder(name: str) -> Path:
    root = get_paths().input.resolve()
    folder = (root / name).resolve()
    if not folder.is_relative_to(root) or not folder.is_dir():
        raise FileNotFoundError(f"input folder {name!r} not found (in {get_paths().input.name}/)")
    return folder


def _pictures(folder: Path, repeat_subfolders: bool) -> list[Path]:
    """The pictures of `folder`, by name; with `repeat_subfolders`, also those of its sub-folders, each as often as
    the number its name starts with says (kohya's `10_name` layout), once otherwise."""
    pictures = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in DATA_SUFFIXES:
            pictures.append(entry)
        elif entry.is_dir() and repeat_subfolders:
            prefix = entry.name.split("_")[0]
            inner = [p for p in sorted(entry.iterdir()) if p.is_file() and p.suffix.lower() in DATA_SUFFIXES]
            pictures.extend(inner * (int(prefix) if prefix.isdigit() else 1))
    if not pictures:
        raise ValueError(f"input folder {folder.name!r} holds no pictures ({', '.join(DATA_SUFFIXES)})")
    return pictures


def _fitted(image: torch.Tensor, width: int, height: int, method: str, name: str) -> torch.Tensor:
    """One picture [1, H, W, 3] at the data set's size: `Stretch`ed, `Crop`ped from the top left (black where it is
    too small), or fitted whole and `Pad`ded (centred, black); `None` refuses another size."""
    from nodes.sd.image import resize_image

    _, h, w, _ = image.shape
    if (w, h) == (width, height):
        return image
    if method == "None":
        raise ValueError(f"{name} is {w}x{h} and the data set {width}x{height}: choose a resize_method, or give the "
                         "pictures one size")
    if method == "Stretch":
        return resize_image(image, width, height, "lanczos")
    out = torch.zeros(1, height, width, 3)
    if method == "Crop":
        out[:, :min(h, height), :min(w, width)] = image[:, :height, :width]
        return out
    scale = min(width / w, height / h)
    fitted = resize_image(image, max(1, round(w * scale)), max(1, round(h * scale)), "lanczos")
    top, left = (height - fitted.shape[1]) // 2, (width - fitted.shape[2]) // 2
    out[:, top:top + fitted.shape[1], left:left + fitted.shape[2]] = fitted
    return out


def load_pictures(paths: list[Path], method: str, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """The pictures as one IMAGE batch, at `width` x `height` (each None: the first picture's)."""
    from nodes.sd.imageio import load_image_file

    images = []
    for path in paths:
        image = load_image_file(path)[0][:1]
        width, height = width or image.shape[2], height or image.shape[1]
        images.append(_fitted(image, width, height, method, path.name))
    return torch.cat(images)


def _folder_fingerprint(inputs: dict[str, Any]) -> Any:
    """Every file under the folder with its size and time: an added, changed or removed picture or caption re-runs."""
    try:
        folder = _folder(str(inputs.get("folder", "")))
    except FileNotFoundError:
        return None
    return [[p.relative_to(folder).as_posix(), file_fingerprint(p)] for p in sorted(folder.rglob("*")) if p.is_file()]


class LoadImageSetFromFolderNode(Node):
    """Loads the pictures of a folder of input/ as one batch, for training."""

    display_name = "Load Image Dataset from Folder"
    category = "loaders"
    folder = Combo(input_subfolders, tooltip="the folder to load pictures from")
    resize_method = Combo(RESIZE_METHODS, optional=True,
                          tooltip="for pictures of another size than the first: None refuses them")
    outputs = (Output("IMAGE"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _folder_fingerprint(inputs)

    def execute(self, folder: str, resize_method: str = "None") -> tuple[torch.Tensor]:
        return (load_pictures(_pictures(_folder(folder), repeat_subfolders=False), resize_method),)


class LoadImageTextSetFromFolderNode(Node):
    """Loads the pictures of a folder of input/ as one batch and encodes each one's caption (the same-named .txt
    file; none or empty: the empty prompt), one prompt per picture, for training. Sub-folders named `N_name` add
    their pictures N times (kohya's layout)."""

    display_name = "Load Image and Text Dataset from Folder"
    category = "loaders"
    folder = Combo(input_subfolders, tooltip="the folder to load pictures and captions from")
    clip = Socket("CLIP", tooltip="the text encoder for the captions")
    resize_method = Combo(RESIZE_METHODS, optional=True,
                          tooltip="for pictures of another size than the data set's: None refuses them")
    width = Int(-1, min=-1, max=10000, optional=True, tooltip="the data set's width; -1: the first picture's")
    height = Int(-1, min=-1, max=10000, optional=True, tooltip="the data set's height; -1: the first picture's")
    outputs = (Output("IMAGE"), Output("CONDITIONING"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _folder_fingerprint(inputs)

    def execute(self, folder: str, clip: Clip, resize_method: str = "None", width: int = -1,
                height: int = -1) -> tuple[torch.Tensor, list]:
        from nodes.sd.conditioning import _encoded

        pictures = _pictures(_folder(folder), repeat_subfolders=True)
        images = load_pictures(pictures, resize_method, width if width > 0 else None, height if height > 0 else None)
        encoded: dict[str, list] = {}
        conditioning = []
        for picture in pictures:
            caption_file = picture.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            if caption not in encoded:
                encoded[caption] = _encoded(self, clip, caption, lambda encoding: {} if encoding.pooled is None else
                                            {"pooled_output": encoding.pooled.float().cpu()})
            conditioning.extend(encoded[caption])
        return images, conditioning


NODES: list[Any] = [LoadImageSetFromFolderNode, LoadImageTextSetFromFolderNode]
