"""Image nodes: load, save, preview, scale, crop, batch, composite, blur, pad for outpainting.

IMAGE is [B, H, W, C] floats in 0..1.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nodes.folders import get_paths, input_file, input_files, input_where, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.imageio import (
    IMAGE_SUFFIXES,
    NotAnImageError,
    load_image_file,
    png_bytes,
    to_pil,
    workflow_metadata,
)
from nodes.sd.latent import MAX_RESOLUTION, center_crop, composite, upscale_latent
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket, String

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


def list_input_images() -> list[str]:
    return input_files(IMAGE_SUFFIXES)


class LoadImage(Node):
    """Loads an image from the input folder; the mask is 1 - alpha (all zeros without alpha)."""

    display_name = "Load Image"
    category = "image"
    image = Combo(list_input_images, image_upload=True, choices_where=input_where)
    outputs = (Output("IMAGE"), Output("MASK"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        path = input_file(str(inputs.get("image", "")))
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        """Refuse a file that is not an image before anything heavy runs (reads the header only)."""
        from PIL import Image, UnidentifiedImageError

        path = input_file(str(inputs.get("image", "")))
        if path is None:
            return None  # the combo check has reported it
        try:
            with Image.open(path) as image:
                image.verify()
        except Image.DecompressionBombError as exc:
            return f"{inputs['image']} is too large to load: {exc}"
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            return f"{inputs['image']} is not a readable image: {exc}"
        return None

    def execute(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = input_file(image)
        if path is None:
            raise FileNotFoundError(f"input image {image!r} not found in {get_paths().input}")
        return load_image_file(path)


def save_images(ctx: Any, images: torch.Tensor, root: Path, prefix: str, kind: str) -> list[dict[str, str]]:
    """Write each image as PREFIX_00001_.png with the workflow in tEXt chunks; never overwrite."""
    text = workflow_metadata(ctx)
    results = []
    for image in images:
        with new_output_file(root, prefix, ".png") as (path, handle, subfolder):
            handle.write(png_bytes(image, text))
        results.append({"filename": path.name, "subfolder": subfolder, "type": kind})
    return results


class SaveImage(Node):
    """Saves images to the output folder as PNGs carrying the workflow."""

    display_name = "Save Image"
    category = "image"
    output_node = True
    images = Socket("IMAGE")
    filename_prefix = String("ComfyUI", tooltip="file name prefix; may include a sub-folder, e.g. 'cats/cat'")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

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
    # Optional here (ComfyUI added it in late 2025): workflows saved before then still load and validate.
    resolution_steps = Int(1, min=1, max=256, optional=True,
                           tooltip="round each side to a multiple of this (e.g. 16 or 32 for a model's patch grid)")
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, upscale_method: str, megapixels: float,
                resolution_steps: int = 1) -> tuple:
        _, h, w, _ = image.shape
        scale = (megapixels * 1024 * 1024 / (w * h)) ** 0.5
        width, height = (round(side * scale / resolution_steps) * resolution_steps for side in (w, h))
        return (resize_image(image, width, height, upscale_method),)


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


MASK_CHANNELS = ["alpha", "red", "green", "blue"]


def load_mask_file(path: Path, channel: str) -> torch.Tensor:
    """One channel of an image file's first frame as a MASK [1, H, W]; `alpha` gives 1 - alpha."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    band = channel[0].upper()
    try:
        with Image.open(path) as source:
            image = ImageOps.exif_transpose(source)
            if image.getbands() != ("R", "G", "B", "A"):
                if image.mode == "I":
                    image = image.point(lambda v: v * (1 / 255))
                image = image.convert("RGBA")
            values = np.asarray(image.getchannel(band), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise NotAnImageError(f"{path.name} is not a readable image: {exc}") from None
    mask = torch.from_numpy(values.copy())
    return (1.0 - mask if band == "A" else mask)[None]


class LoadImageMask(LoadImage):
    """Loads one channel of an input-folder image as a mask (alpha is inverted: opaque is 0)."""

    display_name = "Load Image (as Mask)"
    category = "mask"
    channel = Combo(MASK_CHANNELS)
    outputs = (Output("MASK"),)

    def execute(self, image: str, channel: str) -> tuple[torch.Tensor]:
        path = input_file(image)
        if path is None:
            raise FileNotFoundError(f"input image {image!r} not found in {get_paths().input}")
        return (load_mask_file(path, channel),)


class ImageScaleBy(Node):
    """Resizes images by a factor."""

    display_name = "Upscale Image By"
    category = "image/upscaling"
    image = Socket("IMAGE")
    upscale_method = Combo(UPSCALE_METHODS)
    scale_by = Float(1.0, min=0.01, max=8.0, step=0.01)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, upscale_method: str, scale_by: float) -> tuple[torch.Tensor]:
        _, h, w, _ = image.shape
        return (resize_image(image, max(1, round(w * scale_by)), max(1, round(h * scale_by)), upscale_method),)


class ImageInvert(Node):
    """1 - image."""

    display_name = "Invert Image"
    category = "image"
    image = Socket("IMAGE")
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - image,)


def _match_channels(image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the image without alpha an opaque alpha channel when the other has one."""
    c1, c2 = image1.shape[-1], image2.shape[-1]
    if c1 > c2:
        image2 = F.pad(image2, (0, c1 - c2), value=1.0)
    elif c2 > c1:
        image1 = F.pad(image1, (0, c2 - c1), value=1.0)
    return image1, image2


class ImageBatch(Node):
    """Joins two image batches; image2 is resized (bilinear, centre crop) to image1's size if they differ."""

    display_name = "Batch Images"
    category = "image"
    image1 = Socket("IMAGE")
    image2 = Socket("IMAGE")
    outputs = (Output("IMAGE"),)

    def execute(self, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
        image1, image2 = _match_channels(image1, image2.to(image1))
        if image1.shape[1:] != image2.shape[1:]:
            image2 = resize_image(image2, image1.shape[2], image1.shape[1], "bilinear", "center")
        return (torch.cat((image1, image2), dim=0),)


class EmptyImage(Node):
    """A batch of images of one colour (an INT 0xRRGGBB)."""

    category = "image"
    width = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    height = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    batch_size = Int(1, min=1, max=4096)
    color = Int(0, min=0, max=0xFFFFFF, step=1, extra={"display": "color"})
    outputs = (Output("IMAGE"),)

    def execute(self, width: int, height: int, batch_size: int, color: int) -> tuple[torch.Tensor]:
        rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=torch.float32) / 0xFF
        return (rgb.expand(batch_size, height, width, 3).clone(),)


class ImageCrop(Node):
    """Crops images to width x height from (x, y); a start past the edge is moved onto the last pixel."""

    display_name = "Image Crop"
    category = "image/transform"
    image = Socket("IMAGE")
    width = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    height = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    x = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, width: int, height: int, x: int, y: int) -> tuple[torch.Tensor]:
        x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


class RepeatImageBatch(Node):
    """Repeats an image batch `amount` times."""

    category = "image/batch"
    image = Socket("IMAGE")
    amount = Int(1, min=1, max=4096)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, amount: int) -> tuple[torch.Tensor]:
        return (image.repeat(amount, 1, 1, 1),)


class ImageFromBatch(Node):
    """Takes `length` images from `batch_index` on (an index past the end takes the last image)."""

    category = "image/batch"
    image = Socket("IMAGE")
    batch_index = Int(0, min=0, max=4095)
    length = Int(1, min=1, max=4096)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, batch_index: int, length: int) -> tuple[torch.Tensor]:
        start = min(image.shape[0] - 1, batch_index)
        length = min(image.shape[0] - start, length)
        return (image[start:start + length].clone(),)


class ImageCompositeMasked(Node):
    """Pastes `source` into `destination` at (x, y), through `mask` when one is given."""

    category = "image"
    destination = Socket("IMAGE")
    source = Socket("IMAGE")
    x = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=1)
    resize_source = Boolean(False)
    mask = Socket("MASK", optional=True)
    outputs = (Output("IMAGE"),)

    def execute(self, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, resize_source: bool,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        # Like ComfyUI: the source takes the destination's channels (alpha dropped, or added opaque).
        if source.shape[-1] > destination.shape[-1]:
            source = source[..., :destination.shape[-1]]
        elif source.shape[-1] < destination.shape[-1]:
            source = F.pad(source, (0, destination.shape[-1] - source.shape[-1]), value=1.0)
        out = composite(destination.clone().movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1, resize_source)
        return (out.movedim(1, -1),)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """A normalised [size, size] Gaussian over coordinates -1..1 (so sigma is relative to the radius)."""
    coords = torch.linspace(-1, 1, size)
    squared = coords[:, None] ** 2 + coords[None, :] ** 2
    kernel = torch.exp(-squared / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def _filter(image: torch.Tensor, kernel: torch.Tensor, radius: int, what: str) -> torch.Tensor:
    """Convolve each channel of [B, H, W, C] with `kernel`, the edges reflected."""
    _, h, w, c = image.shape
    if radius >= h or radius >= w:
        raise ValueError(f"{what} {radius} must be smaller than the image's width and height ({w}x{h})")
    x = F.pad(image.movedim(-1, 1), (radius, radius, radius, radius), mode="reflect")
    weight = kernel.to(x).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c).movedim(1, -1)


class ImageBlur(Node):
    """Gaussian blur of radius `blur_radius`."""

    display_name = "Image Blur"
    category = "image/postprocessing"
    image = Socket("IMAGE")
    blur_radius = Int(1, min=1, max=31, step=1)
    sigma = Float(1.0, min=0.1, max=10.0, step=0.1)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, blur_radius: int, sigma: float) -> tuple[torch.Tensor]:
        if blur_radius == 0:
            return (image,)
        kernel = gaussian_kernel(blur_radius * 2 + 1, sigma)
        return (_filter(image, kernel, blur_radius, "blur_radius"),)


class ImageSharpen(Node):
    """Unsharp-style sharpening: the image minus alpha * 10 times its Gaussian surroundings, clamped to 0..1."""

    display_name = "Image Sharpen"
    category = "image/postprocessing"
    image = Socket("IMAGE")
    sharpen_radius = Int(1, min=1, max=31, step=1)
    sigma = Float(1.0, min=0.1, max=10.0, step=0.01)
    alpha = Float(1.0, min=0.0, max=5.0, step=0.01)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, sharpen_radius: int, sigma: float, alpha: float) -> tuple[torch.Tensor]:
        if sharpen_radius == 0:
            return (image,)
        kernel = gaussian_kernel(sharpen_radius * 2 + 1, sigma) * -(alpha * 10)
        # The centre weight makes the kernel sum to 1, so flat areas keep their value.
        kernel[sharpen_radius, sharpen_radius] += 1.0 - kernel.sum()
        return (_filter(image, kernel, sharpen_radius, "sharpen_radius").clamp(0, 1),)


NODES = [LoadImage, SaveImage, PreviewImage, ImageScale, ImageScaleToTotalPixels, ImagePadForOutpaint, ImageToMask,
         MaskToImage, LoadImageMask, ImageScaleBy, ImageInvert, ImageBatch, EmptyImage, ImageCrop, RepeatImageBatch,
         ImageFromBatch, ImageCompositeMasked, ImageBlur, ImageSharpen]
