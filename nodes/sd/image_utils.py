"""Image and batch utilities of ComfyUI: blend modes, quarter turns, flips, size, fit-and-pad, and rebatching."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from nodes.node import Node
from nodes.sd.image_ops import resize_any
from nodes.sd.latent import MAX_RESOLUTION, upscale_latent
from nodes.spec import Combo, Float, Int, Output, Socket

T = torch.Tensor


def _soft_light(a: T, b: T) -> T:
    """The W3C soft-light formula, with b the blend layer: darken by b < 0.5, lighten (towards D(a)) above."""
    d = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
    return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (d - a))


# Each mode maps (image1, image2) to the fully blended image. "difference" is signed, as ComfyUI's: the clamp
# after mixing makes it max(image1 - image2, 0), not the usual absolute difference.
BLEND_MODES: dict[str, Callable[[T, T], T]] = {
    "normal": lambda a, b: b,
    "multiply": lambda a, b: a * b,
    "screen": lambda a, b: 1 - (1 - a) * (1 - b),
    "overlay": lambda a, b: torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b)),
    "soft_light": _soft_light,
    "difference": lambda a, b: a - b,
}


class ImageBlend(Node):
    """Mixes image1 with image1 blended by image2 (`blend_factor` 1 is the pure blend); image2 is resized
    (bicubic, centre crop) to image1's size and given image1's channels."""

    display_name = "Image Blend"
    category = "image/postprocessing"
    image1 = Socket("IMAGE")
    image2 = Socket("IMAGE")
    blend_factor = Float(0.5, min=0.0, max=1.0, step=0.01)
    blend_mode = Combo(list(BLEND_MODES))
    outputs = (Output("IMAGE"),)

    def execute(self, image1: torch.Tensor, image2: torch.Tensor, blend_factor: float,
                blend_mode: str) -> tuple[torch.Tensor]:
        image2 = image2.to(image1)
        # As ImageCompositeMasked: an alpha channel image1 lacks is dropped, one it has is made opaque.
        channels = image1.shape[-1]
        image2 = image2[..., :channels] if image2.shape[-1] >= channels else F.pad(
            image2, (0, channels - image2.shape[-1]), value=1.0)
        if image2.shape[1:3] != image1.shape[1:3]:
            height, width = image1.shape[1:3]
            image2 = upscale_latent(image2.movedim(-1, 1), width, height, "bicubic", "center").movedim(1, -1)
        if len(image1) != len(image2) and 1 not in (len(image1), len(image2)):
            raise ValueError(f"ImageBlend: image1 has {len(image1)} images and image2 {len(image2)}; they must "
                             "have as many, or one of them a single image")
        blended = BLEND_MODES[blend_mode](image1, image2)
        return ((image1 * (1 - blend_factor) + blended * blend_factor).clamp(0, 1),)


class ImageRotate(Node):
    """Rotates images clockwise by a quarter turn, a half or three quarters."""

    display_name = "Rotate"
    category = "image/transform"
    image = Socket("IMAGE")
    rotation = Combo(["none", "90 degrees", "180 degrees", "270 degrees"])
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, rotation: str) -> tuple[torch.Tensor]:
        turns = {"90": 1, "180": 2, "270": 3}.get(rotation.split(" ")[0], 0)
        # From the width axis towards the height axis: clockwise as the image is shown.
        return (torch.rot90(image, k=turns, dims=[2, 1]),)


class ImageFlip(Node):
    """Mirrors images: x-axis flips top to bottom, y-axis left to right."""

    category = "image/transform"
    image = Socket("IMAGE")
    flip_method = Combo(["x-axis: vertically", "y-axis: horizontally"])
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, flip_method: str) -> tuple[torch.Tensor]:
        return (torch.flip(image, dims=[1 if flip_method.startswith("x") else 2]),)


class GetImageSize(Node):
    """The width, height and number of images of a batch."""

    display_name = "Get Image Size"
    category = "image"
    image = Socket("IMAGE")
    outputs = (Output("INT", "width"), Output("INT", "height"), Output("INT", "batch_size"))

    def execute(self, image: torch.Tensor) -> tuple[int, int, int]:
        return image.shape[2], image.shape[1], image.shape[0]


class ResizeAndPadImage(Node):
    """Scales images to fit inside target_width x target_height, keeping the aspect ratio, and centres them
    on a white or black canvas of that size."""

    category = "image/transform"
    image = Socket("IMAGE")
    target_width = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    target_height = Int(512, min=1, max=MAX_RESOLUTION, step=1)
    padding_color = Combo(["white", "black"])
    interpolation = Combo(["area", "bicubic", "nearest-exact", "bilinear", "lanczos"])
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, target_width: int, target_height: int, padding_color: str,
                interpolation: str) -> tuple[torch.Tensor]:
        batch, height, width, channels = image.shape
        scale = min(target_width / width, target_height / height)
        # Truncated, as ComfyUI does, so the fitted side can come out a pixel short of the target.
        new_width, new_height = max(1, int(width * scale)), max(1, int(height * scale))
        resized = resize_any(image, new_width, new_height, interpolation).to(image)
        # Every channel takes the padding value, an alpha channel too (so black padding is transparent).
        out = torch.full((batch, target_height, target_width, channels), 0.0 if padding_color == "black" else 1.0,
                         dtype=image.dtype, device=image.device)
        top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
        out[:, top:top + new_height, left:left + new_width] = resized
        return (out,)


# --- Rebatching (list inputs and outputs) -----------------------------------------------------------------


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


class RebatchImages(Node):
    """Splits the images of every incoming batch, in order, into batches of `batch_size` (the last may be
    smaller); the output is a list, so the nodes it feeds run once per batch."""

    display_name = "Rebatch Images"
    category = "image/batch"
    input_is_list = True
    images = Socket("IMAGE")
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("IMAGE", is_list=True),)

    def execute(self, images: list[torch.Tensor], batch_size: list[int]) -> tuple[list[torch.Tensor]]:
        frames = [image[i:i + 1] for image in images for i in range(len(image))]
        batches = []
        for part in _chunks(len(frames), batch_size[0]):
            shapes = sorted({tuple(frame.shape[1:]) for frame in frames[part]})
            if len(shapes) > 1:
                raise ValueError(f"RebatchImages: images of different sizes {shapes} (height, width, channels) "
                                 "would share a batch; resize them to one size first")
            batches.append(torch.cat(frames[part]))
        return (batches,)


def _latent_parts(latent: dict, first_index: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A latent's samples, its noise mask as [B, 1, 8h, 8w] (all ones if it has none) and its batch indices
    (counting on from `first_index` if it has none)."""
    samples = latent["samples"]
    n, (h, w) = len(samples), samples.shape[-2:]
    mask = latent.get("noise_mask")
    if mask is None:
        mask = torch.ones(n, 1, 8 * h, 8 * w, device=samples.device)
    else:
        mask = mask.reshape(-1, 1, *mask.shape[-2:]).float().to(samples.device)
        # ComfyUI means to resize here but drops the result; resizing lets masked and unmasked latents join.
        if mask.shape[-2:] != (8 * h, 8 * w):
            mask = F.interpolate(mask, size=(8 * h, 8 * w), mode="bilinear")
        mask = mask.repeat(-(-n // len(mask)), 1, 1, 1)[:n]
    indices = list(latent["batch_index"]) if "batch_index" in latent else list(range(first_index, first_index + n))
    return samples, mask, indices


class RebatchLatents(Node):
    """Joins consecutive latents of one size and splits them into batches of `batch_size` (a change of size
    starts a new batch); each keeps its noise mask (dropped where all ones) and batch indices."""

    display_name = "Rebatch Latents"
    category = "latent/batch"
    input_is_list = True
    latents = Socket("LATENT")
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT", is_list=True),)

    def execute(self, latents: list[dict], batch_size: list[int]) -> tuple[list[dict]]:
        runs: list[list[tuple[torch.Tensor, torch.Tensor, list[int]]]] = []
        counted = 0
        for latent in latents:
            parts = _latent_parts(latent, counted)
            counted += len(parts[2])
            if runs and runs[-1][0][0].shape[-2:] == parts[0].shape[-2:]:
                runs[-1].append(parts)
            else:
                runs.append([parts])
        batches = []
        for run in runs:
            samples = torch.cat([s for s, _, _ in run])
            masks = torch.cat([m for _, m, _ in run])
            indices = [i for _, _, ids in run for i in ids]
            for part in _chunks(len(samples), batch_size[0]):
                batch = {"samples": samples[part], "noise_mask": masks[part], "batch_index": indices[part]}
                if bool((batch["noise_mask"] == 1).all()):
                    del batch["noise_mask"]
                batches.append(batch)
        return (batches,)


NODES = [ImageBlend, ImageRotate, ImageFlip, GetImageSize, ResizeAndPadImage, RebatchImages, RebatchLatents]
