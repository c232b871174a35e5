"""ComfyUI's image tiling nodes (an image cut into an overlapping grid of tiles given as a list, and a list of tiles
merged back with a sine feather), its RGB <-> YUV (YCbCr) split and join, and ImageAddNoise.

The grid is ComfyUI's SplitImageToTileList.get_grid_coords: tiles start every `stride` pixels, stride = round(max(
tile / 4, tile - overlap)) on each axis, and the last tile of a row or column is moved back to end at the image's
edge; ImageMergeTileList walks the same grid with the first tile's size. The YUV nodes call kornia's rgb_to_ycbcr
and ycbcr_to_rgb, as ComfyUI does (Y = 0.299 R + 0.587 G + 0.114 B, U = 0.564 (B - Y) + 0.5, V = 0.713 (R - Y) + 0.5).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION
from nodes.spec import Float, Int, Output, Socket

Box = tuple[int, int, int, int]  # x_start, y_start, x_end, y_end


def tile_grid(width: int, height: int, tile_width: int, tile_height: int, overlap: int) -> list[Box]:
    """The tiles' boxes, row by row: starts every stride pixels, the last tile of a row or column shifted back to end
    at the edge (a tile larger than the image is the whole image)."""
    stride_x = round(max(tile_width * 0.25, tile_width - overlap))
    stride_y = round(max(tile_height * 0.25, tile_height - overlap))
    boxes = []
    y = 0
    while y < height:
        y_end = min(y + tile_height, height)
        y_start = max(0, y_end - tile_height)
        x = 0
        while x < width:
            x_end = min(x + tile_width, width)
            boxes.append((max(0, x_end - tile_width), y_start, x_end, y_end))
            if x_end >= width:
                break
            x += stride_x
        if y_end >= height:
            break
        y += stride_y
    return boxes


def _check_image(image: torch.Tensor, node: str, what: str = "image") -> None:
    if image.ndim != 4:
        raise ValueError(f"{node}: the {what} has shape {tuple(image.shape)}; an IMAGE is [batch, height, width, "
                         "channels]")


class SplitImageToTileList(Node):
    """Splits an image into a batched list of tiles with a specified overlap."""

    display_name = "Split Image into List of Tiles"
    category = "image/batch"
    image = Socket("IMAGE")
    tile_width = Int(1024, min=64, max=MAX_RESOLUTION)
    tile_height = Int(1024, min=64, max=MAX_RESOLUTION)
    overlap = Int(128, min=0, max=4096)
    outputs = (Output("IMAGE", is_list=True),)

    def execute(self, image: torch.Tensor, tile_width: int, tile_height: int,
                overlap: int) -> tuple[list[torch.Tensor]]:
        _check_image(image, "SplitImageToTileList")
        height, width = image.shape[1:3]
        boxes = tile_grid(width, height, tile_width, tile_height, overlap)
        return ([image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes],)


def feather_window(height: int, width: int, overlap: int, like: torch.Tensor) -> torch.Tensor:
    """ImageMergeTileList's weight of a tile's pixels, [1, H, W, 1]: the product of sin(pi t) over t in 0..1 along
    each axis, floored at 1e-5 so edges still count; all ones when the tiles do not overlap."""
    if overlap <= 0:
        return torch.ones(1, height, width, 1, device=like.device, dtype=like.dtype)
    rows = torch.sin(math.pi * torch.linspace(0, 1, height, device=like.device, dtype=like.dtype)).clamp(min=1e-5)
    cols = torch.sin(math.pi * torch.linspace(0, 1, width, device=like.device, dtype=like.dtype)).clamp(min=1e-5)
    return (rows[:, None] * cols[None, :])[None, ..., None]


class ImageMergeTileList(Node):
    """Merges a list of tiles (as SplitImageToTileList cut them, in its order) into one image of the final size:
    each pixel is the mean of the tiles over it, weighted by a sine window when they overlap. The grid is the one
    the first tile's size and `overlap` give; tiles beyond it are ignored, pixels no tile covers stay black."""

    display_name = "Merge List of Tiles to Image"
    category = "image/batch"
    input_is_list = True
    image_list = Socket("IMAGE")
    final_width = Int(1024, min=64, max=32768)
    final_height = Int(1024, min=64, max=32768)
    overlap = Int(128, min=0, max=4096)
    outputs = (Output("IMAGE"),)

    def execute(self, image_list: list[torch.Tensor], final_width: list[int], final_height: list[int],
                overlap: list[int]) -> tuple[torch.Tensor]:
        width, height, overlap_px = final_width[0], final_height[0], overlap[0]
        if not image_list:
            raise ValueError("ImageMergeTileList: the image list is empty; link it to a list of tiles such as "
                             "SplitImageToTileList gives")
        for number, tile in enumerate(image_list):
            _check_image(tile, "ImageMergeTileList", f"tile {number}")
        first = image_list[0]
        batch, tile_height, tile_width, channels = first.shape
        canvas = torch.zeros(batch, height, width, channels, device=first.device, dtype=first.dtype)
        weights = torch.zeros(batch, height, width, 1, device=first.device, dtype=first.dtype)
        window = feather_window(tile_height, tile_width, overlap_px, first)
        for (x0, y0, x1, y1), tile in zip(tile_grid(width, height, tile_width, tile_height, overlap_px), image_list,
                                          strict=False):
            h, w = min(y1 - y0, tile.shape[1]), min(x1 - x0, tile.shape[2])
            if len(tile) != batch or tile.shape[-1] != channels:
                raise ValueError(f"ImageMergeTileList: the tiles must share the first one's batch size and channels "
                                 f"({batch}, {channels}); one has {len(tile)} and {tile.shape[-1]}")
            mask = window[:, :h, :w]
            canvas[:, y0:y0 + h, x0:x0 + w] += tile[:, :h, :w].to(canvas) * mask
            weights[:, y0:y0 + h, x0:x0 + w] += mask
        weights[weights == 0] = 1.0
        return (canvas / weights,)


def _kornia_color() -> ModuleType:
    """kornia.color, imported on use as the Canny node imports kornia."""
    try:
        from kornia import color
    except ImportError:
        raise RuntimeError("the YUV nodes need kornia: pip install kornia") from None
    return color


class ImageRGBToYUV(Node):
    """Splits an RGB image into its Y (luma), U and V (chroma, 0.5 for grey) planes, each as a grey image; an alpha
    channel is dropped."""

    display_name = "Image RGB to YUV"
    category = "image/color"
    image = Socket("IMAGE")
    outputs = (Output("IMAGE", "Y"), Output("IMAGE", "U"), Output("IMAGE", "V"))

    def execute(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_image(image, "ImageRGBToYUV")
        if image.shape[-1] < 3:
            raise ValueError(f"ImageRGBToYUV needs an RGB image; this one has {image.shape[-1]} channel(s)")
        rgb = image[..., :3]
        yuv = _kornia_color().rgb_to_ycbcr(rgb.movedim(-1, 1)).movedim(1, -1)
        return tuple(yuv[..., i:i + 1].expand_as(rgb) for i in range(3))


class ImageYUVToRGB(Node):
    """Joins Y, U and V planes (each image's mean over its first three channels) into an RGB image."""

    display_name = "Image YUV to RGB"
    category = "image/color"
    Y = Socket("IMAGE")
    U = Socket("IMAGE")
    V = Socket("IMAGE")
    outputs = (Output("IMAGE"),)

    def execute(self, Y: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor]:
        planes = {"Y": Y, "U": U, "V": V}
        for name, plane in planes.items():
            _check_image(plane, "ImageYUVToRGB", name)
        shapes = {tuple(plane.shape[:3]) for plane in planes.values()}
        if len(shapes) > 1:
            raise ValueError("ImageYUVToRGB: Y, U and V must have one batch size, height and width; got "
                             + ", ".join(f"{name} {tuple(plane.shape[:3])}" for name, plane in planes.items()))
        yuv = torch.cat([plane[..., :3].mean(dim=-1, keepdim=True) for plane in planes.values()], dim=-1)
        return (_kornia_color().ycbcr_to_rgb(yuv.movedim(-1, 1)).movedim(1, -1),)


class ImageAddNoise(Node):
    """Adds gaussian noise of standard deviation `strength` to every pixel (the seed's torch CPU stream), clamped to
    0..1."""

    display_name = "Add Noise to Image"
    category = "image/filters"
    image = Socket("IMAGE")
    seed = Int(0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
               tooltip="The random seed used for creating the noise.")
    strength = Float(0.5, min=0.0, max=1.0, step=0.01)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, seed: int, strength: float) -> tuple[torch.Tensor]:
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(image.size(), generator=generator, device="cpu").to(image)
        return (torch.clip(image + strength * noise, min=0.0, max=1.0),)


NODES = [SplitImageToTileList, ImageMergeTileList, ImageRGBToYUV, ImageYUVToRGB, ImageAddNoise]
