"""Conversions between image files, PIL images and IMAGE/MASK tensors."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class NotAnImageError(ValueError):
    pass


def from_pil(image) -> torch.Tensor:
    """A PIL image as IMAGE [1, H, W, 3] float32 in 0..1."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]


def to_pil(image: torch.Tensor):
    """One IMAGE [H, W, C] tensor as a PIL image."""
    from PIL import Image

    array = (image.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def workflow_metadata(ctx: Any) -> dict[str, str]:
    """The workflow that made a file, as ComfyUI stores it: the prompt and the editor's extra data, as JSON."""
    extra = getattr(ctx, "extra", None) or {}
    metadata = {} if extra.get("prompt") is None else {"prompt": json.dumps(extra["prompt"])}
    metadata.update({key: json.dumps(value) for key, value in (extra.get("extra_pnginfo") or {}).items()})
    return metadata


def png_bytes(image: torch.Tensor, text: dict[str, str]) -> bytes:
    """An 8-bit PNG of one IMAGE [H, W, C] with `text` in tEXt chunks (SaveImage's)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    out = io.BytesIO()
    to_pil(image).save(out, format="PNG", pnginfo=info, compress_level=4)
    return out.getvalue()


def load_image_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read PNG/JPEG/WebP (all frames of the first frame's size), honouring EXIF orientation."""
    from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as source:
            frames, masks = [], []
            for frame in ImageSequence.Iterator(source):
                frame = ImageOps.exif_transpose(frame)
                if frames and frame.size != (frames[0].shape[2], frames[0].shape[1]):
                    break
                if frame.mode == "I":
                    frame = frame.point(lambda v: v * (1 / 255))
                frames.append(from_pil(frame))
                if "A" in frame.getbands() or (frame.mode == "P" and "transparency" in frame.info):
                    alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
                    masks.append(1.0 - torch.from_numpy(alpha.copy())[None])
                else:
                    masks.append(torch.zeros((1, frame.size[1], frame.size[0])))
    except Image.DecompressionBombError as exc:
        raise NotAnImageError(f"{path.name} is too large to load: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise NotAnImageError(f"{path.name} is not a readable image: {exc}") from None
    return torch.cat(frames), torch.cat(masks)
