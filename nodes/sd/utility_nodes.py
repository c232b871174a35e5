"""ComfyUI's newer utility nodes: batching any number of images, cutting latents, picking a resolution, resizing an
image or a mask by one of nine rules, and previewing masks and pairs of images.

Three of them use kinds of input from ComfyUI's newer node schema that Loom's declarations have no word for. Loom
declares what those kinds expand to, so that ComfyUI's API prompts and editor files run unchanged:

- BatchImagesNode's `images` grows one socket at a time in ComfyUI's editor (an "autogrow" input); its prompts link
  `images.image0`, `images.image1`, ... up to `images.image49`. Loom declares those fifty sockets, the first one
  required, as ComfyUI's validation expands them.
- ResizeImageMaskNode's `resize_type` is a combo whose choice brings inputs of its own (a "dynamic combo"); its
  prompts carry them as `resize_type.width`, `resize_type.multiplier`, ... Loom declares each one, optional, and
  refuses a prompt that lacks one its choice needs. Its `input` takes an IMAGE or a MASK and gives back the same kind.
- ImageCompare's `compare_view` is the editor's slider, a widget without a socket or a value to run on; Loom takes it
  as an optional input and accepts whatever the editor sends for it.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import torch
import torch.nn.functional as F

from nodes.folders import get_paths
from nodes.node import Node, NodeResult
from nodes.sd.image import save_images
from nodes.sd.image_ops import resize_any
from nodes.sd.latent import MAX_RESOLUTION, as_mask_batch, center_crop, upscale_latent
from nodes.spec import Combo, Float, InputSpec, Int, Output, Socket

SCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


def unknown_links(cls: type[Node], linked: dict[str, Any]) -> str | None:
    """The error for links into inputs the node does not declare (its execute takes the dotted names as **kwargs,
    so the engine's own check for undeclared inputs lets them through)."""
    unknown = sorted(name for name in linked if name not in cls.inputs)
    if not unknown:
        return None
    return f"{cls.name} has no input {', '.join(unknown)}"


# --- Batching -------------------------------------------------------------------------------------------------


AUTOGROW_MAX = 50  # ComfyUI's batch nodes take up to fifty: image0 .. image49, latent0 .. latent49, ...


def autogrow_sockets(group: str, prefix: str, type_name: str, required: int) -> dict[str, InputSpec]:
    """The sockets ComfyUI's autogrow input `group` expands to, `group.prefix0` .. `group.prefix49`, the first
    `required` of them required. The editor shows the optional ones one at a time, the next once all shown are linked
    (web/static/js/nodes.js)."""
    return {f"{group}.{prefix}{slot}": Socket(type_name, optional=slot >= required,
                                              extra={"autogrow": True} if slot >= required else {})
            for slot in range(AUTOGROW_MAX)}


def in_slot_order(values: dict[str, Any]) -> list[Any]:
    """The values linked into an autogrow input, in slot order (numeric: slot 10 comes after slot 2)."""
    def slot(name: str) -> int:
        return int(name[len(name.rstrip("0123456789")):])

    return [values[name] for name in sorted(values, key=slot)]


def batch_images(images: list[torch.Tensor]) -> torch.Tensor:
    """One batch of several IMAGE batches, in order: an image without alpha gets an opaque alpha channel when another
    has one, and each is resized (bilinear, centre crop) to the first one's height and width."""
    for number, image in enumerate(images):
        if image.ndim != 4:
            raise ValueError(f"BatchImagesNode: image {number} has shape {tuple(image.shape)}; an IMAGE is "
                             "[batch, height, width, channels]")
    first = images[0]
    channels = max(image.shape[-1] for image in images)
    height, width = first.shape[1:3]
    batched = []
    for image in images:
        image = image.to(first)
        if image.shape[-1] < channels:
            image = F.pad(image, (0, channels - image.shape[-1]), value=1.0)
        if image.shape[1:3] != (height, width):
            image = upscale_latent(image.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
        batched.append(image)
    return torch.cat(batched)


class BatchImagesNode(Node):
    """Joins up to fifty image batches into one, in slot order; each is resized (bilinear, centre crop) to the first
    one's size, and all get an alpha channel if one has it."""

    display_name = "Batch Images"
    category = "image/batch"
    inputs = autogrow_sockets("images", "image", "IMAGE", required=1)
    outputs = (Output("IMAGE"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return unknown_links(cls, linked)

    def execute(self, **images: torch.Tensor) -> tuple[torch.Tensor]:
        return (batch_images(in_slot_order(images)),)


# --- Latent cuts ----------------------------------------------------------------------------------------------


def _latent_axis(samples: torch.Tensor, dim: str, node: str) -> int:
    """The tensor dimension of x (width), y (height) or t (frames) in a latent [B, C, (T,) H, W]."""
    if samples.ndim < 3:
        raise ValueError(f"{node}: a latent has at least 3 dimensions [batch, channels, ...], got shape "
                         f"{tuple(samples.shape)}")
    return samples.ndim - {"x": 1, "y": 2, "t": 3}[dim]


class LatentCut(Node):
    """Keeps `amount` steps of a latent along its width (x), height (y) or frames (t), from `index` on (negative:
    counted from the end); both are clamped to the latent's extent, so at least one step is kept."""

    category = "latent/advanced"
    samples = Socket("LATENT", tooltip="the latent to cut")
    dim = Combo(["x", "y", "t"], tooltip="x: width, y: height, t: frames of a video latent")
    index = Int(0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1,
                tooltip="where the cut starts, in latent steps; negative counts from the end")
    amount = Int(1, min=1, max=MAX_RESOLUTION, step=1, tooltip="how many latent steps to keep")
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, dim: str, index: int, amount: int) -> tuple[dict]:
        latent = samples["samples"]
        axis = _latent_axis(latent, dim, "LatentCut")
        if axis < 2:
            # ComfyUI would cut the channels (or the batch) here, which no model can take.
            raise ValueError(f"LatentCut: dim 't' needs a video latent [batch, channels, frames, height, width]; "
                             f"this latent has shape {tuple(latent.shape)}")
        size = latent.shape[axis]
        if index >= 0:
            index = min(index, size - 1)
            amount = min(size - index, amount)
        else:
            index = max(index, -size)
            amount = min(-index, amount)
        return ({**samples, "samples": torch.narrow(latent, axis, index, amount)},)


class LatentCutToBatch(Node):
    """Cuts a latent along its frames (t), width (x) or height (y) into pieces of `slice_size` steps and stacks them
    as a batch (a remainder shorter than a piece is dropped; a latent shorter than one piece stays whole). A 't' of
    a latent without frames leaves it as it is."""

    category = "latent/advanced"
    samples = Socket("LATENT", tooltip="the latent to cut into a batch")
    dim = Combo(["t", "x", "y"], tooltip="t: frames of a video latent, x: width, y: height")
    slice_size = Int(1, min=1, max=MAX_RESOLUTION, step=1, tooltip="the length of each piece, in latent steps")
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, dim: str, slice_size: int) -> tuple[dict]:
        latent = samples["samples"]
        axis = _latent_axis(latent, dim, "LatentCutToBatch")
        if axis < 2:
            return (samples,)
        pieces = latent.movedim(axis, 1)
        length = pieces.shape[1]
        slice_size = min(slice_size, length)
        pieces = pieces[:, :length // slice_size * slice_size]
        # Row-major: the pieces of the first batch item, then those of the next.
        stacked = pieces.reshape(-1, slice_size, *pieces.shape[2:]).movedim(1, axis)
        return ({**samples, "samples": stacked},)


# --- Resolution -----------------------------------------------------------------------------------------------


ASPECT_RATIOS = {
    "1:1 (Square)": (1, 1),
    "3:2 (Photo)": (3, 2),
    "4:3 (Standard)": (4, 3),
    "16:9 (Widescreen)": (16, 9),
    "21:9 (Ultrawide)": (21, 9),
    "2:3 (Portrait Photo)": (2, 3),
    "3:4 (Portrait Standard)": (3, 4),
    "9:16 (Portrait Widescreen)": (9, 16),
}


class ResolutionSelector(Node):
    """The width and height, each a multiple of `multiple`, of an image of the chosen aspect ratio holding about
    `megapixels` million pixels (1.0 is 1024 x 1024). A side below `minimum` makes it the smallest size of that exact
    ratio whose sides are multiples of `multiple` and at least `minimum`, as ComfyUI's node does."""

    display_name = "Resolution Selector"
    category = "utils"
    aspect_ratio = Combo(list(ASPECT_RATIOS), tooltip="the shape of the image")
    megapixels = Float(1.0, min=0.1, max=16.0, step=0.1, tooltip="the pixel count, in units of 1024 x 1024")
    multiple = Int(8, min=8, max=128, step=4, optional=True, extra={"advanced": True},
                   tooltip="each side a multiple of this")
    minimum = Int(256, min=32, max=4096, step=32, optional=True, extra={"advanced": True},
                  tooltip="the least either side may be")
    outputs = (Output("INT", "width", tooltip="the width, a multiple of `multiple`"),
               Output("INT", "height", tooltip="the height, a multiple of `multiple`"))

    def execute(self, aspect_ratio: str, megapixels: float, multiple: int = 8, minimum: int = 256) -> tuple[int, int]:
        across, down = ASPECT_RATIOS[aspect_ratio]
        unit = math.sqrt(megapixels * 1024 * 1024 / (across * down))
        width, height = (round(side * unit / multiple) * multiple for side in (across, down))
        if min(width, height) >= minimum:
            return width, height
        # the least k for which across * k and down * k are multiples of `multiple` and both at least `minimum`
        step = math.lcm(multiple // math.gcd(across, multiple), multiple // math.gcd(down, multiple))
        k = math.ceil(math.ceil(max(minimum / across, minimum / down)) / step) * step
        return across * k, down * k


# --- Resize image or mask ----------------------------------------------------------------------------------------


def _as_nchw(x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
    """An IMAGE [B, H, W, C] or a MASK ([B, H, W] or [H, W]) as [B, C, H, W], and whether it was an image."""
    if x.ndim == 4:
        return x.movedim(-1, 1), True
    if x.ndim in (2, 3):
        return as_mask_batch(x)[:, None], False
    raise ValueError(f"ResizeImageMaskNode: {what} has shape {tuple(x.shape)}; expected an IMAGE [batch, height, "
                     "width, channels] or a MASK [batch, height, width]")


def _resize(x: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """[B, C, H, W] resized to width x height; `center` first crops to the new aspect ratio. Lanczos goes through
    Pillow at 8 bits per channel (as ComfyUI's), the other methods through torch, unclamped."""
    if method != "lanczos":
        return upscale_latent(x, width, height, method, crop)
    if crop == "center":
        x = center_crop(x, width, height)
    return resize_any(x.movedim(1, -1), width, height, "lanczos").movedim(-1, 1).to(x)


def _scale_dimensions(x: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """To width x height; a side of 0 follows the other's scale, both 0 leave it as it is."""
    if width == 0 and height == 0:
        return x
    h, w = x.shape[-2:]
    if width == 0:
        width = max(1, round(w * height / h))
    elif height == 0:
        height = max(1, round(h * width / w))
    return _resize(x, width, height, method, crop)


def _scale_side(x: torch.Tensor, size: int, method: str, longer: bool, option: str) -> torch.Tensor:
    """The longer (or shorter) side to `size`, the other in proportion; a square gets size x size."""
    if size == 0:
        raise ValueError(f"ResizeImageMaskNode: {option} 0 would leave no pixels")
    h, w = x.shape[-2:]
    if h == w:
        width = height = size
    elif (h > w) == longer:
        width, height = max(1, round(w / h * size)), size
    else:
        width, height = size, max(1, round(h / w * size))
    return _resize(x, width, height, method)


def _scale_to_multiple(x: torch.Tensor, multiple: int, method: str) -> torch.Tensor:
    """Each side down to a multiple of `multiple`: scaled to cover that size, keeping the aspect ratio, then cropped
    around the centre. Left as it is when it fits already, or when a side is shorter than `multiple`."""
    h, w = x.shape[-2:]
    target_w, target_h = w // multiple * multiple, h // multiple * multiple
    if multiple <= 1 or 0 in (target_w, target_h) or (target_w, target_h) == (w, h):
        return x
    if target_w / w >= target_h / h:
        scaled_w, scaled_h = target_w, max(target_h, math.ceil(h * target_w / w))
    else:
        scaled_w, scaled_h = max(target_w, math.ceil(w * target_h / h)), target_h
    x = _resize(x, scaled_w, scaled_h, method)
    top, left = (scaled_h - target_h) // 2, (scaled_w - target_w) // 2
    return x[..., top:top + target_h, left:left + target_w]


def _resize_by(x: torch.Tensor, choice: str, method: str, option: Any) -> torch.Tensor:
    """`x` [B, C, H, W] resized by the rule `choice`; `option(name)` gives the value of one of its inputs."""
    h, w = x.shape[-2:]
    if choice == "scale dimensions":
        return _scale_dimensions(x, option("width"), option("height"), method, option("crop"))
    if choice == "scale by multiplier":
        factor = option("multiplier")
        return _resize(x, max(1, round(w * factor)), max(1, round(h * factor)), method)
    if choice in ("scale longer dimension", "scale shorter dimension"):
        name = "longer_size" if choice == "scale longer dimension" else "shorter_size"
        return _scale_side(x, option(name), method, name == "longer_size", f"resize_type.{name}")
    if choice == "scale width":
        return _scale_dimensions(x, option("width"), 0, method, "disabled")
    if choice == "scale height":
        return _scale_dimensions(x, 0, option("height"), method, "disabled")
    if choice == "scale total pixels":
        scale = math.sqrt(int(option("megapixels") * 1024 * 1024) / (w * h))
        return _resize(x, max(1, round(w * scale)), max(1, round(h * scale)), method)
    if choice == "match size":
        match, _ = _as_nchw(option("match"), "resize_type.match")
        return _resize(x, match.shape[-1], match.shape[-2], method, option("crop"))
    if choice == "scale to multiple":
        return _scale_to_multiple(x, option("multiple"), method)
    raise ValueError(f"ResizeImageMaskNode: resize_type {choice!r} is not one of {', '.join(RESIZE_OPTIONS)}")


# The inputs each choice of resize_type brings, in the order ComfyUI's editor shows (and its files store) them.
RESIZE_OPTIONS: dict[str, tuple[str, ...]] = {
    "scale dimensions": ("width", "height", "crop"),
    "scale by multiplier": ("multiplier",),
    "scale longer dimension": ("longer_size",),
    "scale shorter dimension": ("shorter_size",),
    "scale width": ("width",),
    "scale height": ("height",),
    "scale total pixels": ("megapixels",),
    "match size": ("match", "crop"),
    "scale to multiple": ("multiple",),
}

_RESIZE_INPUTS: dict[str, InputSpec] = {
    "input": Socket("IMAGE,MASK", tooltip="the image or mask to resize"),
    # dynamic_inputs tells the editor which inputs each choice brings, so that it shows only those (as ComfyUI's does).
    "resize_type": Combo(list(RESIZE_OPTIONS), tooltip="how to resize; each choice brings the inputs "
                         "resize_type.<name> it uses",
                         extra={"dynamic_inputs": {choice: [f"resize_type.{n}" for n in names]
                                                   for choice, names in RESIZE_OPTIONS.items()}}),
    "scale_method": Combo(SCALE_METHODS, default="area", tooltip="interpolation: area to shrink, lanczos to enlarge, "
                          "nearest-exact for pixel art"),
    "resize_type.width": Int(512, min=0, max=MAX_RESOLUTION, step=1, optional=True,
                             tooltip="width in pixels; 0 follows the height, keeping the aspect ratio"),
    "resize_type.height": Int(512, min=0, max=MAX_RESOLUTION, step=1, optional=True,
                              tooltip="height in pixels; 0 follows the width, keeping the aspect ratio"),
    "resize_type.crop": Combo(CROP_METHODS, default="center", optional=True,
                              tooltip="disabled stretches to the new aspect ratio, center crops to it"),
    "resize_type.multiplier": Float(1.0, min=0.01, max=8.0, step=0.01, optional=True, tooltip="scale factor"),
    "resize_type.longer_size": Int(512, min=0, max=MAX_RESOLUTION, step=1, optional=True,
                                   tooltip="the longer side, in pixels; the other keeps the aspect ratio"),
    "resize_type.shorter_size": Int(512, min=0, max=MAX_RESOLUTION, step=1, optional=True,
                                    tooltip="the shorter side, in pixels; the other keeps the aspect ratio"),
    "resize_type.megapixels": Float(1.0, min=0.01, max=16.0, step=0.01, optional=True,
                                    tooltip="pixel count in units of 1024 x 1024, keeping the aspect ratio"),
    "resize_type.match": Socket("IMAGE,MASK", optional=True, tooltip="an image or mask whose size to take"),
    "resize_type.multiple": Int(8, min=1, max=MAX_RESOLUTION, step=1, optional=True,
                                tooltip="make both sides divisible by this (scaled to cover, then centre-cropped)"),
}


class ResizeImageMaskNode(Node):
    """Resizes an image or a mask: to given dimensions, by a factor, by its longer or shorter side, by width or
    height alone, to a pixel count, to another image's size, or down to multiples of a number."""

    display_name = "Resize Image/Mask"
    category = "transform"
    inputs = _RESIZE_INPUTS
    # ComfyUI's output has the kind of `input` (IMAGE or MASK), known only when the graph is built.
    outputs = (Output("*", "resized"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor (and Loom's) stores [resize_type, the choice's widgets..., scale_method]; Loom's older
        editor stored every widget in declaration order (None: read by position)."""
        choice = values[0] if values and isinstance(values[0], str) else None
        names = [f"resize_type.{n}" for n in RESIZE_OPTIONS.get(choice, ()) if cls.inputs[f"resize_type.{n}"].is_widget]
        if choice is None or choice not in RESIZE_OPTIONS or len(values) != len(names) + 2:
            return None
        return {"resize_type": choice, **dict(zip(names, values[1:-1], strict=True)), "scale_method": values[-1]}

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        choice = inputs.get("resize_type")
        missing = [f"resize_type.{n}" for n in RESIZE_OPTIONS.get(choice, ())
                   if f"resize_type.{n}" not in inputs and f"resize_type.{n}" not in linked]
        if missing:
            return f"resize_type {choice!r} needs the input{'s' * (len(missing) > 1)} {', '.join(missing)}"
        return unknown_links(cls, linked)

    def execute(self, input: torch.Tensor, resize_type: str, scale_method: str, **options: Any) -> tuple[torch.Tensor]:
        def option(name: str) -> Any:
            key = f"resize_type.{name}"
            if options.get(key) is None:
                raise ValueError(f"ResizeImageMaskNode: resize_type {resize_type!r} needs the input {key}")
            return options[key]

        x, is_image = _as_nchw(input, "input")
        resized = _resize_by(x, resize_type, scale_method, option)
        return (resized.movedim(1, -1) if is_image else resized[:, 0],)


# --- Previews -------------------------------------------------------------------------------------------------


class MaskPreview(Node):
    """Shows masks as grey images without keeping them (written to the temp folder)."""

    display_name = "Preview Mask"
    category = "mask"
    output_node = True
    mask = Socket("MASK", tooltip="the mask to show")

    def execute(self, mask: torch.Tensor) -> NodeResult:
        grey = as_mask_batch(mask)[..., None].expand(-1, -1, -1, 3)
        prefix = f"preview_{uuid.uuid4().hex[:8]}"
        return NodeResult(ui={"images": save_images(self.ctx, grey, get_paths().temp, prefix, "temp")})


class ImageCompare(Node):
    """Shows two images (or batches) for comparison with the editor's slider; writes them to the temp folder and
    reports them as `a_images` and `b_images`. Either may be left out."""

    display_name = "Image Compare"
    category = "image"
    output_node = True
    image_a = Socket("IMAGE", optional=True)
    image_b = Socket("IMAGE", optional=True)
    # ComfyUI's socketless slider widget: the editor may send a value for it, which nothing uses.
    compare_view = InputSpec(type="IMAGECOMPARE", optional=True, checked_by_node=True, extra={"socketless": True})

    def execute(self, image_a: torch.Tensor | None = None, image_b: torch.Tensor | None = None,
                compare_view: Any = None) -> NodeResult:
        ui: dict[str, list] = {"a_images": [], "b_images": []}
        for key, images, prefix in (("a_images", image_a, "comfy.compare.a"), ("b_images", image_b, "comfy.compare.b")):
            if images is not None and len(images) > 0:
                ui[key] = save_images(self.ctx, images, get_paths().temp, f"{prefix}_{uuid.uuid4().hex[:8]}", "temp")
        return NodeResult(ui=ui)


NODES = [BatchImagesNode, LatentCut, LatentCutToBatch, ResolutionSelector, ResizeImageMaskNode, MaskPreview,
         ImageCompare]
