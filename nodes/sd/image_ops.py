"""Image utility nodes: quantize, morphology, Porter-Duff compositing, alpha split/join, stitching, animations."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nodes.node import Node
from nodes.sd.image import resize_image
from nodes.sd.latent import MAX_RESOLUTION, as_mask_batch, upscale_latent
from nodes.spec import Boolean, Combo, Int, Output, Socket


def resize_any(image: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    """Resize [B, H, W, C] with any number of channels; lanczos (Pillow) works channel by channel."""
    if method != "lanczos":
        return resize_image(image, width, height, method)
    from PIL import Image

    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    resized = [[np.asarray(Image.fromarray(item[..., c]).resize((width, height), Image.Resampling.LANCZOS))
                for c in range(item.shape[-1])] for item in pixels]
    return torch.from_numpy(np.stack([np.stack(chans, axis=-1) for chans in resized])).float().div(255)


def _need_rgb(image: torch.Tensor, what: str) -> None:
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"{what} needs an RGB image [batch, height, width, 3 or 4 channels], got shape "
                         f"{tuple(image.shape)}")


# --- Quantize -------------------------------------------------------------------------------------

DITHERS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]


def bayer_matrix(order: int) -> np.ndarray:
    """The order x order Bayer threshold map, centred on 0 in (-0.5, 0.5): (index + 0.5) / order^2 - 0.5."""
    index = np.zeros((1, 1), dtype=np.int64)
    while index.shape[0] < order:
        index = np.block([[4 * index, 4 * index + 2], [4 * index + 3, 4 * index + 1]])
    return (index + 0.5) / (order * order) - 0.5


def quantize_image(rgb: np.ndarray, colors: int, dither: str) -> np.ndarray:
    """Reduce one uint8 [H, W, 3] image to a median-cut palette of `colors` (Pillow), optionally dithered."""
    from PIL import Image

    image = Image.fromarray(rgb)
    palette = image.quantize(colors=colors)
    if dither.startswith("bayer"):
        # Ordered dithering: shift each pixel by its threshold, scaled to the gap between palette colours.
        order = int(dither.split("-")[1])
        spread = 2 * 256 / (len(palette.getpalette()) // 3)
        h, w = rgb.shape[:2]
        thresholds = np.tile(spread * bayer_matrix(order) + 0.5, (-(-h // order), -(-w // order)))[:h, :w]
        image = Image.fromarray(np.clip(rgb + thresholds[..., None], 0, 255).astype(np.uint8))
    method = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
    return np.asarray(image.quantize(palette=palette, dither=method).convert("RGB"))


class ImageQuantize(Node):
    """Reduces each image to at most `colors` colours, with optional Floyd-Steinberg or ordered (Bayer) dithering."""

    category = "image/postprocessing"
    image = Socket("IMAGE")
    colors = Int(256, min=1, max=256, step=1)
    dither = Combo(DITHERS)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, colors: int, dither: str) -> tuple[torch.Tensor]:
        _need_rgb(image, "ImageQuantize")
        out = image.detach().float().cpu().clone()
        # Truncated, not rounded, to 8 bits, as ComfyUI does.
        pixels = (out[..., :3].clamp(0, 1) * 255).to(torch.uint8).numpy()
        for i, rgb in enumerate(pixels):
            out[i, ..., :3] = torch.from_numpy(quantize_image(rgb, colors, dither).astype(np.float32) / 255)
        return (out,)


# --- Morphology -----------------------------------------------------------------------------------

MORPHOLOGY_OPERATIONS = ["erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat"]


def _window_max(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Maximum over each run of `size` elements along `dim` (output shorter by size - 1), in log2(size) steps."""
    span = 1
    while 2 * span <= size:
        n = x.shape[dim] - span
        x = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, span, n))
        span *= 2
    n = x.shape[dim] - (size - span)
    return torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, size - span, n))


def _max_filter(x: torch.Tensor, size: int, before: int) -> torch.Tensor:
    """Maximum of [B, C, H, W] over the size x size square from `before` pixels up/left of each pixel; pixels
    beyond the edges do not count (kornia's geodesic border)."""
    after = size - 1 - before
    padded = F.pad(x, (before, after, before, after), value=float("-inf"))
    return _window_max(_window_max(padded, size, 2), size, 3)


def dilate(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey dilation by a flat square anchored at size // 2, the square reflected (Minkowski, as scipy and kornia
    0.9; the same as erosion's square for odd sizes)."""
    return _max_filter(x, size, size - 1 - size // 2)


def erode(x: torch.Tensor, size: int) -> torch.Tensor:
    return -_max_filter(-x, size, size // 2)


MORPHOLOGY: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "erode": erode,
    "dilate": dilate,
    "open": lambda x, k: dilate(erode(x, k), k),
    "close": lambda x, k: erode(dilate(x, k), k),
    "gradient": lambda x, k: dilate(x, k) - erode(x, k),
    "top_hat": lambda x, k: x - dilate(erode(x, k), k),
    "bottom_hat": lambda x, k: erode(dilate(x, k), k) - x,
}


class Morphology(Node):
    """Grey-scale morphology with a square kernel on every channel: erode, dilate, open, close, gradient, hats."""

    display_name = "ImageMorphology"
    category = "image/postprocessing"
    image = Socket("IMAGE")
    operation = Combo(MORPHOLOGY_OPERATIONS)
    kernel_size = Int(3, min=3, max=999, step=1)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, operation: str, kernel_size: int) -> tuple[torch.Tensor]:
        return (MORPHOLOGY[operation](image.movedim(-1, 1), kernel_size).movedim(1, -1),)


# --- Compositing ----------------------------------------------------------------------------------

T = torch.Tensor
# Each mode maps premultiplied (source colour, source alpha, destination colour, destination alpha) to the
# premultiplied result and its alpha. DARKEN, LIGHTEN and OVERLAY take ComfyUI's forms, not the W3C ones.
PORTER_DUFF: dict[str, Callable[[T, T, T, T], tuple[T, T]]] = {
    "ADD": lambda sc, sa, dc, da: ((sc + dc).clamp(0, 1), (sa + da).clamp(0, 1)),
    "CLEAR": lambda sc, sa, dc, da: (torch.zeros_like(dc), torch.zeros_like(da)),
    "DARKEN": lambda sc, sa, dc, da: ((1 - da) * sc + (1 - sa) * dc + torch.minimum(sc, dc), sa + da - sa * da),
    "DST": lambda sc, sa, dc, da: (dc, da),
    "DST_ATOP": lambda sc, sa, dc, da: (sa * dc + (1 - da) * sc, sa),
    "DST_IN": lambda sc, sa, dc, da: (dc * sa, sa * da),
    "DST_OUT": lambda sc, sa, dc, da: ((1 - sa) * dc, (1 - sa) * da),
    "DST_OVER": lambda sc, sa, dc, da: (dc + (1 - da) * sc, da + (1 - da) * sa),
    "LIGHTEN": lambda sc, sa, dc, da: ((1 - da) * sc + (1 - sa) * dc + torch.maximum(sc, dc), sa + da - sa * da),
    "MULTIPLY": lambda sc, sa, dc, da: (sc * dc, sa * da),
    "OVERLAY": lambda sc, sa, dc, da: (torch.where(2 * dc < da, 2 * sc * dc, sa * da - 2 * (da - sc) * (sa - dc)),
                                       sa + da - sa * da),
    "SCREEN": lambda sc, sa, dc, da: (sc + dc - sc * dc, sa + da - sa * da),
    "SRC": lambda sc, sa, dc, da: (sc, sa),
    "SRC_ATOP": lambda sc, sa, dc, da: (da * sc + (1 - sa) * dc, da),
    "SRC_IN": lambda sc, sa, dc, da: (sc * da, sa * da),
    "SRC_OUT": lambda sc, sa, dc, da: ((1 - da) * sc, (1 - da) * sa),
    "SRC_OVER": lambda sc, sa, dc, da: (sc + (1 - sa) * dc, sa + (1 - sa) * da),
    "XOR": lambda sc, sa, dc, da: ((1 - da) * sc + (1 - sa) * dc, (1 - da) * sa + (1 - sa) * da),
}


def _fit_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A [B, H, W] mask resized (bicubic, centre crop) to height x width, if it is not that size already."""
    if mask.shape[-2:] == (height, width):
        return mask
    return upscale_latent(mask[:, None], width, height, "bicubic", "center")[:, 0]


class PorterDuffImageComposite(Node):
    """Composites source over destination by a Porter-Duff rule; the alphas are MASKs (1 - alpha), as LoadImage's."""

    display_name = "Porter-Duff Image Composite"
    category = "mask/compositing"
    source = Socket("IMAGE")
    source_alpha = Socket("MASK")
    destination = Socket("IMAGE")
    destination_alpha = Socket("MASK")
    mode = Combo(list(PORTER_DUFF), default="DST")
    outputs = (Output("IMAGE"), Output("MASK"))

    def execute(self, source: torch.Tensor, source_alpha: torch.Tensor, destination: torch.Tensor,
                destination_alpha: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        source_alpha, destination_alpha = as_mask_batch(source_alpha), as_mask_batch(destination_alpha)
        if source.shape[-1] != destination.shape[-1]:
            raise ValueError(f"PorterDuffImageComposite: the source has {source.shape[-1]} channels and the "
                             f"destination {destination.shape[-1]}; they must have the same")
        # As ComfyUI: as many results as the shortest of the four batches.
        n = min(len(source), len(source_alpha), len(destination), len(destination_alpha))
        height, width = destination.shape[1:3]
        dst = destination[:n]
        src = source[:n].to(dst)
        if src.shape[1:3] != (height, width):
            src = upscale_latent(src.movedim(-1, 1), width, height, "bicubic", "center").movedim(1, -1)
        da = 1 - _fit_mask(destination_alpha[:n].to(dst), height, width)[..., None]
        sa = 1 - _fit_mask(source_alpha[:n].to(dst), height, width)[..., None]
        color, alpha = PORTER_DUFF[mode](src * sa, sa, dst * da, da)
        color = torch.where(alpha > 1e-5, color / alpha, torch.zeros_like(color)).clamp(0, 1)
        return color, 1 - alpha[..., 0]


class SplitImageWithAlpha(Node):
    """The RGB channels and, as a MASK, 1 - alpha (all zeros for an image without alpha)."""

    display_name = "Split Image with Alpha"
    category = "mask/compositing"
    image = Socket("IMAGE")
    outputs = (Output("IMAGE"), Output("MASK"))

    def execute(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return image[..., :3].clone(), 1.0 - alpha


class JoinImageWithAlpha(Node):
    """Adds an alpha channel of 1 - `alpha` (a MASK, resized to the image); as many images as the shorter batch."""

    display_name = "Join Image with Alpha"
    category = "mask/compositing"
    image = Socket("IMAGE")
    alpha = Socket("MASK")
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor]:
        mask = as_mask_batch(alpha).to(image)
        if mask.shape[-2:] != image.shape[1:3]:
            mask = F.interpolate(mask[:, None], size=tuple(image.shape[1:3]), mode="bilinear")[:, 0]
        n = min(len(image), len(mask))
        return (torch.cat((image[:n, ..., :3], 1.0 - mask[:n, ..., None]), dim=-1),)


class ImageColorToMask(Node):
    """1 where a pixel's 8-bit RGB is exactly `color` (0xRRGGBB), 0 elsewhere."""

    category = "mask"
    image = Socket("IMAGE")
    color = Int(0, min=0, max=0xFFFFFF, step=1, extra={"display": "number"})
    outputs = (Output("MASK"),)

    def execute(self, image: torch.Tensor, color: int) -> tuple[torch.Tensor]:
        _need_rgb(image, "ImageColorToMask")
        rgb = (image[..., :3].clamp(0, 1) * 255).round().to(torch.int64)
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        return ((packed == color).float(),)


# --- Resizing and stitching -----------------------------------------------------------------------


class ImageScaleToMaxDimension(Node):
    """Resizes so that the longer side is `largest_size`, keeping the aspect ratio (0 leaves the image as it is)."""

    display_name = "Scale Image to Max Dimension"
    category = "image/upscaling"
    image = Socket("IMAGE")
    # ComfyUI lists "bilinear" twice; once is enough.
    upscale_method = Combo(["area", "lanczos", "bilinear", "nearest-exact", "bicubic"])
    largest_size = Int(512, min=0, max=MAX_RESOLUTION, step=1)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, upscale_method: str, largest_size: int) -> tuple[torch.Tensor]:
        height, width = image.shape[1:3]
        if largest_size == 0:
            return (image,)
        if height > width:
            width, height = max(1, round(width / height * largest_size)), largest_size
        elif width > height:
            width, height = largest_size, max(1, round(height / width * largest_size))
        else:
            width = height = largest_size
        return (resize_any(image, width, height, upscale_method),)


class ResizeImagesByLongerEdge(Node):
    """ComfyUI's ResizeImagesByLongerEdge (comfy_extras/nodes_dataset.py, deprecated there in favour of
    ImageScaleToMaxDimension, which its editor offers to swap in, with lanczos): each image is resized with Pillow's
    LANCZOS so that its longer side (the height for a square) is `longer_edge`, the other side
    int(side * longer_edge / longer side), truncated, even when the size does not change. As ComfyUI, each image goes
    through Pillow as 8-bit channels, int(255 * value) (truncated, clipped to 0..255), and comes back as value / 255;
    ImageScaleToMaxDimension rounds the side instead, and Loom's lanczos rounds the channels."""

    display_name = "Resize Images by Longer Edge"
    category = "image/transform"
    images = Socket("IMAGE")
    longer_edge = Int(1024, min=1, max=8192, step=1, tooltip="the length of the longer side, in pixels")
    outputs = (Output("IMAGE", "images"),)

    def execute(self, images: torch.Tensor, longer_edge: int) -> tuple[torch.Tensor]:
        from PIL import Image

        height, width = images.shape[1:3]
        if width > height:
            size = (longer_edge, int(height * (longer_edge / width)))
        else:
            size = (int(width * (longer_edge / height)), longer_edge)
        pixels = (images.detach().float().cpu().numpy() * 255).clip(0, 255).astype(np.uint8)
        channels = pixels.shape[-1]
        resized = [np.asarray(Image.fromarray(item[..., 0] if channels == 1 else item).resize(
            size, Image.Resampling.LANCZOS)).reshape(size[1], size[0], channels) for item in pixels]
        return (torch.from_numpy(np.stack(resized)).float().div(255).to(images.device),)


SPACING_COLORS: dict[str, tuple[float, ...]] = {
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0)}


def _pad_centred(image: torch.Tensor, size: int, dim: int, value: float) -> torch.Tensor:
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    pad = [0, 0] * (image.ndim - dim - 1) + [missing // 2, missing - missing // 2]
    return F.pad(image, pad, value=value)


class ImageStitch(Node):
    """Places image2 right of, below, left of or above image1, optionally resized to match and with a gap."""

    display_name = "Image Stitch"
    category = "image/transform"
    image1 = Socket("IMAGE")
    direction = Combo(["right", "down", "left", "up"], default="right")
    match_image_size = Boolean(True)
    spacing_width = Int(0, min=0, max=1024, step=2)
    spacing_color = Combo(list(SPACING_COLORS), default="white")
    image2 = Socket("IMAGE", optional=True)
    outputs = (Output("IMAGE"),)

    def execute(self, image1: torch.Tensor, direction: str, match_image_size: bool, spacing_width: int,
                spacing_color: str, image2: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        if image2 is None:
            return (image1,)
        image2 = image2.to(image1)
        batch = max(len(image1), len(image2))  # the shorter batch repeats its last image
        image1, image2 = (torch.cat([x, x[-1:].expand(batch - len(x), -1, -1, -1)]) for x in (image1, image2))
        across = direction in ("left", "right")
        dim = 1 if across else 2  # the dimension that must agree (height side by side, width stacked)
        if match_image_size:
            h2, w2 = image2.shape[1:3]
            if across:
                size = (max(1, int(image1.shape[1] * (w2 / h2))), image1.shape[1])
            else:
                size = (image1.shape[2], max(1, int(image1.shape[2] / (w2 / h2))))
            if size != (w2, h2):
                image2 = resize_any(image2, *size, "lanczos")
        else:
            # Pad the smaller one, centred: white for a white gap, black for any other.
            pad = {"white": 1.0}.get(spacing_color, 0.0)
            size = max(image1.shape[dim], image2.shape[dim])
            image1, image2 = _pad_centred(image1, size, dim, pad), _pad_centred(image2, size, dim, pad)
        channels = max(image1.shape[-1], image2.shape[-1])
        image1, image2 = (F.pad(x, (0, channels - x.shape[-1]), value=1.0) for x in (image1, image2))
        parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing_width > 0:
            gap_shape = list(image1.shape)
            gap_shape[3 - dim] = spacing_width + spacing_width % 2
            gap = torch.ones(gap_shape, dtype=image1.dtype, device=image1.device)  # alpha, if any, opaque
            color = torch.tensor(SPACING_COLORS[spacing_color], dtype=image1.dtype)[:channels]
            gap[..., :len(color)] = color.to(gap.device)
            parts.insert(1, gap)
        return (torch.cat(parts, dim=3 - dim),)


NODES = [ImageQuantize, Morphology, PorterDuffImageComposite, SplitImageWithAlpha, JoinImageWithAlpha,
         ImageColorToMask, ImageScaleToMaxDimension, ResizeImagesByLongerEdge, ImageStitch]
