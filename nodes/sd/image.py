"""Image nodes: load, save, preview, scale, pad for outpainting. IMAGE is [B, H, W, C] floats in 0..1."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import torch

from nodes.folders import get_paths
from nodes.node import Node, NodeResult
from nodes.sd.imageio import IMAGE_SUFFIXES, load_image_file, to_pil
from nodes.sd.latent import center_crop, upscale_latent
from nodes.spec import Combo, Float, Int, Output, Socket, String

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


def list_input_images() -> list[str]:
    folder = get_paths().input
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def resolve_input_image(name: str) -> Path | None:
    root = get_paths().input.resolve()
    path = (root / name).resolve()
    return path if path.is_file() and path.is_relative_to(root) else None


class LoadImage(Node):
    """Loads an image from the input folder; the mask is 1 - alpha (all zeros without alpha)."""

    display_name = "Load Image"
    category = "image"
    image = Combo(list_input_images, image_upload=True)
    outputs = (Output("IMAGE"), Output("MASK"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        path = resolve_input_image(str(inputs.get("image", "")))
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        """Refuse a file that is not an image before anything heavy runs (reads the header only)."""
        from PIL import Image, UnidentifiedImageError

        path = resolve_input_image(str(inputs.get("image", "")))
        if path is None:
            return None  # the combo check has reported it
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            return f"{inputs['image']} is not a readable image: {exc}"
        return None

    def execute(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = resolve_input_image(image)
        if path is None:
            raise FileNotFoundError(f"input image {image!r} not found in {get_paths().input}")
        return load_image_file(path)


def _next_counter(folder: Path, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)_\.png$")
    numbers = [int(m.group(1)) for p in folder.glob(f"{prefix}_*_.png") if (m := pattern.match(p.name))]
    return max(numbers, default=0) + 1


def save_images(ctx: Any, images: torch.Tensor, root: Path, prefix: str, kind: str) -> list[dict[str, str]]:
    """Write each image as PREFIX_00001_.png with the workflow in tEXt chunks; never overwrite."""
    from PIL.PngImagePlugin import PngInfo

    prefix_path = Path(prefix.replace("\\", "/"))
    if prefix_path.is_absolute() or ".." in prefix_path.parts or not prefix_path.name:
        raise ValueError(f"filename_prefix {prefix!r} must be a relative name inside the output folder")
    folder = (root / prefix_path.parent).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    subfolder = prefix_path.parent.as_posix() if prefix_path.parent != Path(".") else ""
    info = PngInfo()
    extra = ctx.extra if ctx is not None else {}
    if extra.get("prompt") is not None:
        info.add_text("prompt", json.dumps(extra["prompt"]))
    for key, value in (extra.get("extra_pnginfo") or {}).items():
        info.add_text(key, json.dumps(value))
    results = []
    counter = _next_counter(folder, prefix_path.name)
    for image in images:
        counter, path, handle = _create_new(folder, prefix_path.name, counter)
        with handle:
            to_pil(image).save(handle, format="PNG", pnginfo=info, compress_level=4)
        results.append({"filename": path.name, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


def _create_new(folder: Path, prefix: str, counter: int) -> tuple[int, Path, BinaryIO]:
    """Open the first free PREFIX_NNNNN_.png from `counter` on, created exclusively: several workers saving
    into one shared output folder at once never pick the same name (O_EXCL, also on NFS v3 and later)."""
    while True:
        path = folder / f"{prefix}_{counter:05}_.png"
        try:
            return counter, path, open(path, "xb")
        except FileExistsError:
            counter += 1


class SaveImage(Node):
    """Saves images to the output folder as PNGs carrying the workflow."""

    display_name = "Save Image"
    category = "image"
    output_node = True
    images = Socket("IMAGE")
    filename_prefix = String("ComfyUI", tooltip="file name prefix; may include a sub-folder, e.g. 'cats/cat'")

    def execute(self, images: torch.Tensor, filename_prefix: str) -> NodeResult:
        saved = save_images(self.ctx, images, get_paths().output, filename_prefix, "output")
        return NodeResult(ui={"images": saved})


class PreviewImage(Node):
    """Shows images without keeping them (written to the temp folder)."""

    display_name = "Preview Image"
    category = "image"
    output_node = True
    images = Socket("IMAGE")

    def execute(self, images: torch.Tensor) -> NodeResult:
        prefix = f"preview_{uuid.uuid4().hex[:8]}"
        return NodeResult(ui={"images": save_images(self.ctx, images, get_paths().temp, prefix, "temp")})


def resize_image(image: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """Resize [B, H, W, C]; width or height 0 keeps the aspect ratio; `center` crops to the new aspect."""
    _, h, w, _ = image.shape
    if width == 0 and height == 0:
        return image
    width = width or max(1, round(w * height / h))
    height = height or max(1, round(h * width / w))
    if method == "lanczos":
        from PIL import Image

        from nodes.sd.imageio import from_pil
        if crop == "center":
            image = center_crop(image.movedim(-1, 1), width, height).movedim(1, -1)
        return torch.cat([from_pil(to_pil(im).resize((width, height), Image.Resampling.LANCZOS)) for im in image])
    return upscale_latent(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1).clamp(0, 1)


class ImageScale(Node):
    display_name = "Upscale Image"
    category = "image/upscaling"
    image = Socket("IMAGE")
    upscale_method = Combo(UPSCALE_METHODS)
    width = Int(512, min=0, max=16384, step=1)
    height = Int(512, min=0, max=16384, step=1)
    crop = Combo(CROP_METHODS)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str) -> tuple:
        return (resize_image(image, width, height, upscale_method, crop),)


class ImageScaleToTotalPixels(Node):
    display_name = "Scale Image to Total Pixels"
    category = "image/upscaling"
    image = Socket("IMAGE")
    upscale_method = Combo(UPSCALE_METHODS)
    megapixels = Float(1.0, min=0.01, max=16.0, step=0.01)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, upscale_method: str, megapixels: float) -> tuple:
        _, h, w, _ = image.shape
        scale = (megapixels * 1024 * 1024 / (w * h)) ** 0.5
        return (resize_image(image, round(w * scale), round(h * scale), upscale_method),)


class ImagePadForOutpaint(Node):
    """Pads an image for outpainting; the mask is 1 over the new area and fades into the old edge."""

    display_name = "Pad Image for Outpainting"
    category = "image"
    image = Socket("IMAGE")
    left = Int(0, min=0, max=16384, step=8)
    top = Int(0, min=0, max=16384, step=8)
    right = Int(0, min=0, max=16384, step=8)
    bottom = Int(0, min=0, max=16384, step=8)
    feathering = Int(40, min=0, max=16384, step=1)
    outputs = (Output("IMAGE"), Output("MASK"))

    def execute(self, image: torch.Tensor, left: int, top: int, right: int, bottom: int,
                feathering: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, c = image.shape
        out = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=image.dtype)
        out[:, top:top + h, left:left + w] = image
        mask = torch.ones((h + top + bottom, w + left + right), dtype=torch.float32)
        inner = torch.zeros((h, w), dtype=torch.float32)
        if feathering > 0 and feathering * 2 < min(h, w):
            ys = torch.arange(h, dtype=torch.float32)[:, None]
            xs = torch.arange(w, dtype=torch.float32)[None, :]
            # Distance to each padded edge (edges without padding do not fade).
            dist = torch.full((h, w), float(feathering))
            for pad, d in ((top, ys), (bottom, h - 1 - ys), (left, xs), (right, w - 1 - xs)):
                if pad:
                    dist = torch.minimum(dist, d.expand(h, w))
            inner = ((feathering - dist) / feathering).clamp(0, 1) ** 2
        mask[top:top + h, left:left + w] = inner
        return out, mask.unsqueeze(0).expand(b, -1, -1).clone()


class ImageToMask(Node):
    """One channel of an image as a MASK [B, H, W]."""

    display_name = "Convert Image to Mask"
    category = "mask"
    image = Socket("IMAGE")
    channel = Combo(["red", "green", "blue", "alpha"])
    outputs = (Output("MASK"),)

    def execute(self, image: torch.Tensor, channel: str) -> tuple[torch.Tensor]:
        index = ["red", "green", "blue", "alpha"].index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"the image has {image.shape[-1]} channels, so no {channel} channel; "
                             "Load Image gives the alpha channel as its MASK output (1 - alpha)")
        return (image[..., index].clone(),)


class MaskToImage(Node):
    """A MASK as a grey IMAGE [B, H, W, 3]."""

    display_name = "Convert Mask to Image"
    category = "mask"
    mask = Socket("MASK")
    outputs = (Output("IMAGE"),)

    def execute(self, mask: torch.Tensor) -> tuple[torch.Tensor]:
        mask = mask.reshape(-1, *mask.shape[-2:])
        return (mask[..., None].expand(-1, -1, -1, 3).clone(),)


NODES = [LoadImage, SaveImage, PreviewImage, ImageScale, ImageScaleToTotalPixels, ImagePadForOutpaint, ImageToMask,
         MaskToImage]
