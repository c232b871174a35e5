"""Image sources beside LoadImage: LoadImageOutput (a result of an earlier run, from output/) and WebcamCapture
(a camera picture the editor uploads, loaded as LoadImage loads a file and stretched to the capture size).

Both take ComfyUI's annotated names: "sub/name.png [output]" names a file of output/ ("[input]", "[temp]" the other
folders), as its editor writes them; a name without brackets is in the node's own folder.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.image import list_input_images, resize_image
from nodes.sd.imageio import IMAGE_SUFFIXES, load_image_file
from nodes.sd.latent import MAX_RESOLUTION
from nodes.spec import Boolean, Combo, Int, Output

_ANNOTATED = re.compile(r"^(?P<name>.*?)\s*\[(?P<folder>input|output|temp)\]$")


def _folder(kind: str) -> Path:
    paths = get_paths()
    return {"input": paths.input, "output": paths.output, "temp": paths.temp}[kind]


def find_image(name: str, default_folder: str) -> tuple[Path | None, str | None]:
    """The file an image input names, or None with the reason: a name in brackets picks the folder, a name that
    leads out of its folder (`..`, an absolute path, a link) is refused."""
    match = _ANNOTATED.match(name.strip())
    kind, relative = (match["folder"], match["name"]) if match else (default_folder, name)
    root = _folder(kind).resolve()
    if not relative:
        return None, f"no image named: choose a file of the {kind} folder"
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        return None, f"image {name!r} is outside the {kind} folder ({root}): name a file inside it"
    if not path.is_file():
        return None, f"image {relative!r} not found in the {kind} folder ({root})"
    return path, None


def _check_image(name: Any, default_folder: str) -> str | None:
    """Refuse a missing file, a path out of the folder, a file that is not an image, or one larger than Pillow
    decodes (its header only)."""
    from PIL import Image, UnidentifiedImageError

    path, problem = find_image(str(name or ""), default_folder)
    if path is None:
        return problem
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.DecompressionBombError as exc:  # raised on open, for the size the header claims
        return f"{name} is too large to load: {exc}"
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"{name} is not a readable image: {exc}"
    return None


def _load(name: str, default_folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    path, problem = find_image(name, default_folder)
    if path is None:
        raise FileNotFoundError(problem)
    return load_image_file(path)


def _file_hash(name: Any, default_folder: str) -> str | None:
    path, _ = find_image(str(name or ""), default_folder)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else None


def list_output_images() -> list[str]:
    """The images in output/ (sub-folders included), newest first: a refreshed list starts with the last result."""
    folder = get_paths().output
    if not folder.is_dir():
        return []
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    files.sort(key=lambda p: (-p.stat().st_mtime_ns, p.relative_to(folder).as_posix()))
    return [p.relative_to(folder).as_posix() for p in files]


class LoadImageOutput(Node):
    """Loads an image from the output folder (a result of an earlier run); the mask is 1 - alpha. The list starts
    with the newest file, so re-opening it after a run offers that run's image first."""

    display_name = "Load Image (from Outputs)"
    category = "image"
    image = Combo(list_output_images, image_upload=True, checked_by_node=True, extra={"image_folder": "output"})
    outputs = (Output("IMAGE"), Output("MASK"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _file_hash(inputs.get("image"), "output")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return _check_image(inputs.get("image"), "output")

    def execute(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _load(image, "output")


class WebcamCapture(Node):
    """A camera picture: the file the editor uploads at each queue (ComfyUI's writes "webcam/NAME.png [temp]"),
    or any image in input/, stretched to width x height as the browser draws its capture (0: the picture's own
    width or height)."""

    display_name = "Webcam Capture"
    category = "image"
    image = Combo(list_input_images, image_upload=True, checked_by_node=True)
    width = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    height = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    # In ComfyUI's editor: capture a new picture when the prompt is queued rather than on the button. Each
    # capture is a new file, and the file's hash keys the cache, so a new picture re-runs the node here too.
    capture_on_queue = Boolean(True)
    outputs = (Output("IMAGE"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _file_hash(inputs.get("image"), "input")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return _check_image(inputs.get("image"), "input")

    def execute(self, image: str, width: int, height: int, capture_on_queue: bool) -> tuple[torch.Tensor]:
        picture, _ = _load(image, "input")
        _, h, w, _ = picture.shape
        width, height = width or w, height or h
        if (height, width) != (h, w):
            picture = resize_image(picture, width, height, "bilinear")
        return (picture,)


NODES: list[Any] = [LoadImageOutput, WebcamCapture]
