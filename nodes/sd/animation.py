"""Animated image savers: SaveAnimatedWEBP and SaveAnimatedPNG, with the workflow where ComfyUI puts it."""

from __future__ import annotations

import json
from typing import Any

import torch

from nodes.folders import get_paths, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.imageio import to_pil
from nodes.spec import Boolean, Combo, Float, Int, Socket, String


def _frames(images: torch.Tensor, what: str) -> list:
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{what} needs a batch of at least one image, got shape {tuple(images.shape)}")
    return [to_pil(image) for image in images]


def _write_animation(prefix: str, suffix: str, frames: list, **options: object) -> dict[str, str]:
    """Save `frames` as one animated file in the output folder; no half-written file is left behind."""
    with new_output_file(get_paths().output, prefix, suffix) as (path, handle, subfolder):
        frames[0].save(handle, save_all=True, append_images=frames[1:], **options)
    return {"filename": path.name, "subfolder": subfolder, "type": "output"}


def _saved_ui(saved: dict[str, str], count: int) -> dict:
    return {"images": [saved], "animated": [True]} if count > 1 else {"images": [saved]}


WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}


class SaveAnimatedWEBP(Node):
    """Saves the batch as one animated WebP in the output folder, the workflow in its EXIF (as ComfyUI's)."""

    display_name = "Save Animated WEBP"
    category = "image/animation"
    output_node = True
    images = Socket("IMAGE")
    filename_prefix = String("ComfyUI")
    fps = Float(6.0, min=0.01, max=1000.0, step=0.01)
    lossless = Boolean(True)
    quality = Int(80, min=0, max=100)
    method = Combo(list(WEBP_METHODS))
    outputs = ()

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, images: torch.Tensor, filename_prefix: str, fps: float, lossless: bool, quality: int,
                method: str) -> NodeResult:
        frames = _frames(images, "SaveAnimatedWEBP")
        exif = frames[0].getexif()
        extra = self.ctx.extra
        if extra.get("prompt") is not None:
            exif[0x0110] = f"prompt:{json.dumps(extra['prompt'])}"  # the Model tag
        for offset, (key, value) in enumerate((extra.get("extra_pnginfo") or {}).items()):
            exif[0x010F - offset] = f"{key}:{json.dumps(value)}"  # Make, then the tags below it
        saved = _write_animation(filename_prefix, ".webp", frames, format="WEBP", duration=int(1000.0 / fps),
                                 exif=exif, lossless=lossless, quality=quality, method=WEBP_METHODS[method])
        return NodeResult(ui=_saved_ui(saved, len(frames)))


class SaveAnimatedPNG(Node):
    """Saves the batch as one animated PNG in the output folder, the workflow in 'comf' chunks (as ComfyUI's)."""

    display_name = "Save Animated PNG"
    category = "image/animation"
    output_node = True
    images = Socket("IMAGE")
    filename_prefix = String("ComfyUI")
    fps = Float(6.0, min=0.01, max=1000.0, step=0.01)
    compress_level = Int(4, min=0, max=9)
    outputs = ()

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, images: torch.Tensor, filename_prefix: str, fps: float, compress_level: int) -> NodeResult:
        from PIL.PngImagePlugin import PngInfo

        frames = _frames(images, "SaveAnimatedPNG")
        info = PngInfo()
        extra = self.ctx.extra
        chunks = {"prompt": extra.get("prompt")} if extra.get("prompt") is not None else {}
        chunks.update(extra.get("extra_pnginfo") or {})
        for key, value in chunks.items():
            info.add(b"comf", key.encode("latin-1") + b"\0" + json.dumps(value).encode("latin-1"), after_idat=True)
        saved = _write_animation(filename_prefix, ".png", frames, format="PNG", duration=int(1000.0 / fps),
                                 compress_level=compress_level, pnginfo=info)
        return NodeResult(ui=_saved_ui(saved, len(frames)))



NODES = [SaveAnimatedWEBP, SaveAnimatedPNG]
