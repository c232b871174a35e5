"""ComfyUI's small toolkit nodes: a list from many inputs, number and colour conversion, saving text, bounding boxes
(a primitive, a canvas of boxes, crops by a box or by boxes) and cropping an image to its mask.

Several take kinds of input from ComfyUI's newer node schema that Loom's declarations have no word for; Loom
declares what they amount to, so that ComfyUI's API prompts and editor files run unchanged:

- COLOR is a socketless widget holding "#rrggbb" (or "#rrggbbaa"); BOUNDING_BOX one holding {"x", "y", "width",
  "height"} in pixels; BOUNDING_BOXES one holding a list of such boxes, each with optional "metadata". Their values
  are checked by the nodes, and `widgets_from_ui` reads them from an editor file's widgets_values.
- A BOUNDING_BOX output carries one box or, per frame, a list of boxes ([[box, ...], ...]).
- CreateList's `inputs` grows one socket at a time (an "autogrow" input): `inputs.input0` .. `inputs.input9`, the
  first required, as BatchImagesNode's.
- ComfyNumberConvert's `value` and CreateBoundingBoxes' `bboxes` take any of several types ("INT,FLOAT,STRING,BOOLEAN").
"""

from __future__ import annotations

import json
import math
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nodes.folders import get_paths, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.image import save_images
from nodes.sd.latent import MAX_RESOLUTION, as_mask_batch, upscale_latent
from nodes.sd.utility_nodes import in_slot_order, unknown_links
from nodes.spec import Combo, Float, InputSpec, Int, Output, Socket, String

BOX_FIELDS = ("x", "y", "width", "height")
DEFAULT_BOX = {"x": 0, "y": 0, "width": 512, "height": 512}  # ComfyUI's BoundingBox.Input default


def _preview(ctx: Any, images: torch.Tensor, prefix: str) -> list[dict[str, str]]:
    """Images written to the temp folder for the editor to show (ComfyUI's intermediate preview)."""
    return save_images(ctx, images, get_paths().temp, f"{prefix}_{uuid.uuid4().hex[:8]}", "temp")


def _as_json(value: Any) -> Any:
    """A widget value Loom's editor may hold as JSON text, as the value itself."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def lanczos(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, C, H, W] resized to width x height with Pillow's Lanczos, as ComfyUI's comfy.utils.lanczos: each channel
    through 8 bits, truncated (not rounded) on the way in."""
    from PIL import Image

    pixels = (x.detach().float().cpu() * 255.0).clamp(0, 255).to(torch.uint8).numpy()
    resized = [[np.asarray(Image.fromarray(channel).resize((width, height), Image.Resampling.LANCZOS))
                for channel in item] for item in pixels]
    return torch.from_numpy(np.stack(resized).astype(np.float32) / 255.0).to(device=x.device, dtype=x.dtype)


def _hex_pair(text: str, node: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise ValueError(f"{node}: {text!r} is not a hexadecimal colour component; give a colour as #RRGGBB") from None


# --- Lists and numbers --------------------------------------------------------------------------------------------


CREATE_LIST_SLOTS = 10  # ComfyUI's Autogrow.TemplatePrefix default: input0 .. input9


class CreateList(Node):
    """Joins the values linked into its inputs, in slot order, into one list: a list input adds each of its items,
    so downstream nodes run once per item."""

    display_name = "Create List"
    category = "utilities"
    input_is_list = True
    inputs = {f"inputs.input{slot}": Socket("*", optional=slot >= 1, extra={"autogrow": True} if slot >= 1 else {})
              for slot in range(CREATE_LIST_SLOTS)}
    outputs = (Output("*", "list", is_list=True),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return unknown_links(cls, linked)

    def execute(self, **inputs: list[Any]) -> tuple[list[Any]]:
        joined: list[Any] = []
        for values in in_slot_order(inputs):
            joined += values
        return (joined,)


def convert_number(value: Any) -> tuple[float, int]:
    """ComfyUI's Convert Number: a BOOLEAN is 1/0, an INT itself, a FLOAT truncated toward zero for the INT, a
    STRING parsed (its INT from the text when it is an integer, else the float truncated); never inf or NaN."""
    node = "ComfyNumberConvert"
    if isinstance(value, bool):
        as_float, as_int = float(value), int(value)
    elif isinstance(value, int):
        as_float, as_int = float(value), value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{node}: cannot convert the non-finite value {value} to a number")
        as_float, as_int = value, int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError(f"{node}: cannot convert an empty string to a number; give digits such as '42' or '1.5'")
        try:
            as_float = float(text)
        except ValueError:
            raise ValueError(f"{node}: cannot convert the string {value!r} to a number; give digits such as '42' "
                             "or '1.5'") from None
        if not math.isfinite(as_float):
            raise ValueError(f"{node}: cannot convert the non-finite value {as_float} to a number")
        try:
            as_int = int(text)
        except ValueError:
            as_int = int(as_float)
    else:
        raise ValueError(f"{node}: value must be an INT, FLOAT, STRING or BOOLEAN, got {type(value).__name__}")
    return as_float, as_int


class ComfyNumberConvert(Node):
    """Converts an INT, FLOAT, STRING or BOOLEAN into a FLOAT and an INT (truncated toward zero)."""

    display_name = "Convert Number"
    category = "utils"
    value = InputSpec(type="INT,FLOAT,STRING,BOOLEAN", checked_by_node=True, extra={"display_name": "value"})
    outputs = (Output("FLOAT", "FLOAT"), Output("INT", "INT"))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        value = inputs.get("value")
        if "value" in inputs and not isinstance(value, bool | int | float | str):
            return f"value must be an INT, FLOAT, STRING or BOOLEAN, got {type(value).__name__}"
        return None

    def execute(self, value: Any) -> tuple[float, int]:
        return convert_number(value)


# --- Colour -------------------------------------------------------------------------------------------------------


def parse_color(color: Any) -> tuple[int, str, float]:
    """ComfyUI's Color Picker: "#RRGGBB" or "#RRGGBBAA" as (R * 65536 + G * 256 + B, "#RRGGBB", AA / 255)."""
    node = "ColorToRGBInt"
    if not isinstance(color, str):
        raise ValueError(f"{node}: color must be a string such as '#ff8800', got {type(color).__name__}")
    transparency = 1.0
    if len(color) > 7:
        transparency = _hex_pair(color[7:9], node) / 255.0
        color = color[:7]
    if len(color) != 7 or color[0] != "#":
        raise ValueError(f"{node}: color must be in format #RRGGBB (or #RRGGBBAA), got {color!r}")
    red, green, blue = (_hex_pair(color[i:i + 2], node) for i in (1, 3, 5))
    return red * 256 * 256 + green * 256 + blue, color, transparency


class ColorToRGBInt(Node):
    """Return a color RGB integer value and hexadecimal representation."""

    display_name = "Color Picker"
    category = "utilities"
    color = InputSpec(type="COLOR", default="#ffffff", checked_by_node=True, extra={"socketless": True})
    outputs = (Output("INT", "rgb_int"), Output("COLOR", "hex"), Output("FLOAT", "transparency"))

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [the colour]."""
        return {"color": values[0]} if values and isinstance(values[0], str) else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if "color" in inputs:
            try:
                parse_color(inputs["color"])
            except ValueError as exc:
                return str(exc)
        return None

    def execute(self, color: str) -> tuple[int, str, float]:
        return parse_color(color)


# --- Text ---------------------------------------------------------------------------------------------------------


TEXT_FORMATS = ["txt", "csv", "md", "json"]


def new_text_path(root: Path, prefix: str, extension: str) -> tuple[Path, str]:
    """A new PREFIX_NNNNN.EXT under `root` (ComfyUI's name for saved text), one past the highest counter of that
    prefix and extension there, so nothing is overwritten; and the sub-folder the prefix names ('' for none)."""
    problem = output_prefix_problem(prefix)
    if problem:
        raise ValueError(f"SaveText: {problem}")
    prefix_path = Path(prefix.replace("\\", "/"))
    folder = root / prefix_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(prefix_path.name)}_(\d+)\.{re.escape(extension)}$")
    counter = max((int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))), default=0) + 1
    while (path := folder / f"{prefix_path.name}_{counter:05}.{extension}").exists():
        counter += 1
    subfolder = prefix_path.parent.as_posix() if prefix_path.parent != Path(".") else ""
    return path, subfolder


class SaveText(Node):
    """Save text content to a file in the output directory."""

    display_name = "Save Text"
    category = "text"
    output_node = True
    text = Socket("STRING")
    filename_prefix = String("ComfyUI")
    format = Combo(TEXT_FORMATS, default="txt")
    outputs = (Output("STRING", "text"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, text: str, filename_prefix: str, format: str) -> NodeResult:
        if not isinstance(text, str):
            raise ValueError(f"SaveText: text must be a STRING, got {type(text).__name__}")
        path, subfolder = new_text_path(get_paths().output, filename_prefix, format)
        content = text
        if format == "json":  # pretty-printed when it parses, else saved as it is
            try:
                content = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            except json.JSONDecodeError:
                pass
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(content)
        files = [{"filename": path.name, "subfolder": subfolder, "type": "output"}]
        return NodeResult(outputs=(text,), ui={"text": [text], "files": files})


# --- Bounding boxes -----------------------------------------------------------------------------------------------


def box_problem(box: Any) -> str | None:
    """Why a BOUNDING_BOX value is unusable as one box: a dict whose x, y, width, height (each optional) are
    integers, x and y at least 0, width and height at least 1."""
    if not isinstance(box, dict):
        return f"a bounding box is a dict such as {json.dumps(DEFAULT_BOX)}, got {box!r}"
    bad = [k for k in BOX_FIELDS if k in box and (isinstance(box[k], bool) or not isinstance(box[k], int))]
    if bad:
        return f"{', '.join(bad)} of the bounding box must be integers, got {box!r}"
    small = [k for k, least in zip(BOX_FIELDS, (0, 0, 1, 1), strict=True) if k in box and box[k] < least]
    return f"{', '.join(small)} of the bounding box is too small: {box!r}" if small else None


class PrimitiveBoundingBox(Node):
    """A bounding box of x, y, width and height pixels."""

    display_name = "Bounding Box"
    category = "utilities/primitive"
    x = Int(0, min=0, max=MAX_RESOLUTION, step=None)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=None)
    width = Int(512, min=1, max=MAX_RESOLUTION, step=None)
    height = Int(512, min=1, max=MAX_RESOLUTION, step=None)
    outputs = (Output("BOUNDING_BOX"),)

    def execute(self, x: int, y: int, width: int, height: int) -> tuple[dict[str, int]]:
        return ({"x": x, "y": y, "width": width, "height": height},)


def crop_box(image: torch.Tensor, box: dict[str, int]) -> torch.Tensor:
    """ComfyUI's Crop Image: x and y pulled inside the image (to its last column and row), then width x height
    pixels from there, as many as the image has."""
    x = min(box.get("x", 0), image.shape[2] - 1)
    y = min(box.get("y", 0), image.shape[1] - 1)
    return image[:, y:y + box.get("height", 512), x:x + box.get("width", 512), :]


class ImageCropV2(Node):
    """Crop an image to the specified dimensions."""

    display_name = "Crop Image"
    category = "image/transform"
    image = Socket("IMAGE")
    crop_region = InputSpec(type="BOUNDING_BOX", default=DEFAULT_BOX, checked_by_node=True,
                            extra={"socketless": True, "component": "ImageCrop"})
    outputs = (Output("IMAGE"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [the box, then its x, y, width, height again for its own fields]."""
        return {"crop_region": values[0]} if values and isinstance(values[0], dict | str) else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return box_problem(_as_json(inputs["crop_region"])) if "crop_region" in inputs else None

    def execute(self, image: torch.Tensor, crop_region: Any) -> NodeResult:
        box = _as_json(crop_region)
        problem = box_problem(box)
        if problem:
            raise ValueError(f"ImageCropV2: {problem}")
        if image.ndim != 4:
            raise ValueError(f"ImageCropV2: an IMAGE is [batch, height, width, channels], got shape "
                             f"{tuple(image.shape)}")
        cropped = crop_box(image, box)
        return NodeResult(outputs=(cropped,), ui={"images": _preview(self.ctx, cropped, "crop")})


def crop_by_boxes(image: torch.Tensor, frames: list[list[dict]], width: int, height: int, padding: int,
                  keep_aspect: str) -> torch.Tensor | None:
    """ComfyUI's Crop By Bounding Boxes: for frame i (the last box list serving the frames beyond), the union of its
    boxes, widened by `padding` and kept inside the image, resized ("area") to width x height, stretched or fitted
    and centred on black ("pad"). A frame without boxes gives no crop; an empty union falls back to a square of 0.3
    of the image's shorter side, centred across and 0.1 of the height down. None when no frame gave a crop."""
    frames_total, img_h, img_w, channels = image.shape
    crops = []
    for index in range(frames_total):
        boxes = frames[min(index, len(frames) - 1)]
        if not boxes:
            continue
        x1 = min(int(b["x"]) for b in boxes)
        y1 = min(int(b["y"]) for b in boxes)
        x2 = max(int(b["x"] + b["width"]) for b in boxes)
        y2 = max(int(b["y"] + b["height"]) for b in boxes)
        if padding > 0:
            x1, y1 = max(0, x1 - padding), max(0, y1 - padding)
            x2, y2 = min(img_w, x2 + padding), min(img_h, y2 + padding)
        x1, x2, y1, y2 = max(0, x1), min(img_w, x2), max(0, y1), min(img_h, y2)
        if x2 <= x1 or y2 <= y1:
            side = int(min(img_h, img_w) * 0.3)
            x1, y1 = max(0, (img_w - side) // 2), max(0, int(img_h * 0.1))
            x2, y2 = min(img_w, x1 + side), min(img_h, y1 + side)
            if x2 <= x1 or y2 <= y1:
                crops.append(torch.zeros(1, channels, height, width, dtype=image.dtype, device=image.device))
                continue
        crop = image[index, y1:y2, x1:x2].permute(2, 0, 1)[None]
        if keep_aspect == "pad":
            scale = min(width / (x2 - x1), height / (y2 - y1))
            fit_w, fit_h = int(round((x2 - x1) * scale)), int(round((y2 - y1) * scale))
            left, top = (width - fit_w) // 2, (height - fit_h) // 2
            out = torch.zeros(1, channels, height, width, dtype=image.dtype, device=image.device)
            out[:, :, top:top + fit_h, left:left + fit_w] = upscale_latent(crop, fit_w, fit_h, "area", "disabled")
        else:
            out = upscale_latent(crop, width, height, "area", "disabled")
        crops.append(out)
    return torch.cat(crops).permute(0, 2, 3, 1) if crops else None


def _box_frames(bboxes: Any, node: str) -> list[list[dict]]:
    """A BOUNDING_BOX input as one list of boxes per frame: a single box is one frame of one box."""
    frames = [[bboxes]] if not isinstance(bboxes, list) else bboxes
    for frame in frames:
        if not isinstance(frame, list):
            raise ValueError(f"{node}: bboxes must be a box or a list of box lists, one per frame ([[{{\"x\": ..., "
                             f"\"y\": ..., \"width\": ..., \"height\": ...}}]]), got {bboxes!r}")
        for box in frame:
            if not isinstance(box, dict) or any(not isinstance(box.get(k), int | float) for k in BOX_FIELDS):
                raise ValueError(f"{node}: each box needs numbers x, y, width and height, got {box!r}")
    return frames


class CropByBBoxes(Node):
    """Crop and resize regions from the input image batch based on provided bounding boxes."""

    display_name = "Crop By Bounding Boxes"
    category = "image/transform"
    image = Socket("IMAGE")
    bboxes = InputSpec(type="BOUNDING_BOX", default=DEFAULT_BOX, force_input=True, extra={"socketless": True})
    output_width = Int(512, min=64, max=4096, step=8, tooltip="Width each crop is resized to.")
    output_height = Int(512, min=64, max=4096, step=8, tooltip="Height each crop is resized to.")
    padding = Int(0, min=0, max=1024, step=1,
                  tooltip="Extra padding in pixels added on each side of the bbox before cropping.")
    keep_aspect = Combo(["stretch", "pad"], default="stretch",
                        tooltip="Whether to stretch the crop to fit the output size, or pad with black pixels to "
                                "preserve aspect ratio.")
    outputs = (Output("IMAGE", tooltip="All crops stacked into a single image batch."),)

    def execute(self, image: torch.Tensor, bboxes: Any, output_width: int, output_height: int, padding: int,
                keep_aspect: str = "stretch") -> NodeResult:
        if image.ndim != 4:
            raise ValueError(f"CropByBBoxes: an IMAGE is [batch, height, width, channels], got shape "
                             f"{tuple(image.shape)}")
        frames = _box_frames(bboxes, "CropByBBoxes")
        if not frames:
            return NodeResult(outputs=(image,))
        ui = {"source_images": _preview(self.ctx, image[:1], "crop_bboxes_source"),
              "input_bboxes": [{k: int(b[k]) for k in BOX_FIELDS} for b in frames[0]]}
        crops = crop_by_boxes(image, frames, output_width, output_height, padding, keep_aspect)
        return NodeResult(outputs=(image if crops is None else crops,), ui=ui)


# --- Crop to mask -------------------------------------------------------------------------------------------------


def crop_to_mask(image: torch.Tensor, mask: torch.Tensor, max_size: int, pad_factor: float, grow: int,
                 background: tuple[float, float, float], aspect: float, threshold: float = 0.05) -> torch.Tensor:
    """ComfyUI's _crop_image_with_mask for one [H, W, 3] image and [H, W] mask: the mask flipped when its border is
    mostly set and its centre mostly not, grown (shrunk) by `grow` pixels, values under `threshold` zeroed; both
    shrunk (Lanczos) so the longer side is at most `max_size`; the box of mask values above 204/255 (else of the
    inverted mask, else the whole picture) widened to the `aspect` (width / height) and by `pad_factor` about its
    centre; that crop (zero outside the picture) over `background`, as [1, 3, h, w]."""
    img = image.permute(2, 0, 1)[None].cpu().float().clamp(0, 1)
    alpha = mask[None, None].cpu().float().clamp(0, 1)
    plane = alpha[0, 0]
    h, w = plane.shape
    border = torch.cat([plane[0, :], plane[-1, :], plane[:, 0], plane[:, -1]])
    centre = plane[h // 4:h - h // 4, w // 4:w - w // 4]
    if float(border.mean()) > 0.5 and float(centre.mean()) < 0.5:
        alpha = 1.0 - alpha
    if grow > 0:
        alpha = F.max_pool2d(alpha, kernel_size=2 * grow + 1, stride=1, padding=grow)
    elif grow < 0:
        alpha = 1.0 - F.max_pool2d(1.0 - alpha, kernel_size=1 - 2 * grow, stride=1, padding=-grow)
    if threshold > 0.0:
        alpha = torch.where(alpha < threshold, torch.zeros_like(alpha), alpha)

    height, width = img.shape[-2:]
    if max(height, width) > max_size:
        scale = max_size / max(height, width)
        width, height = int(width * scale), int(height * scale)
        img, alpha = lanczos(img, width, height), lanczos(alpha, width, height)

    alpha_u8 = (alpha[0, 0].clamp(0, 1) * 255.0).to(torch.uint8)
    inside = (alpha_u8 > 204).nonzero()
    if inside.numel() == 0:
        inverted = ((255 - alpha_u8) > 204).nonzero()
        if inverted.numel() > 0:
            alpha, inside = 1.0 - alpha, inverted
    if inside.numel() > 0:
        y_min, x_min = inside.min(dim=0).values.tolist()
        y_max, x_max = inside.max(dim=0).values.tolist()
        centre_y, centre_x = (y_min + y_max) / 2.0, (x_min + x_max) / 2.0
        box_w, box_h = x_max - x_min + 1, y_max - y_min + 1
        if box_w / max(box_h, 1) >= aspect:
            crop_w, crop_h = int(box_w * pad_factor), int(box_w / aspect * pad_factor)
        else:
            crop_h, crop_w = int(box_h * pad_factor), int(box_h * aspect * pad_factor)
        half_w, half_h = math.ceil(crop_w / 2), math.ceil(crop_h / 2)
        x1, y1 = int(centre_x - half_w), int(centre_y - half_h)
        x2, y2 = x1 + 2 * half_w, y1 + 2 * half_h
    else:
        x1, y1, x2, y2 = 0, 0, width, height

    pad = (max(0, -x1), max(0, x2 - width), max(0, -y1), max(0, y2 - height))  # left, right, top, bottom
    if any(pad):
        img, alpha = F.pad(img, pad, value=0.0), F.pad(alpha, pad, value=0.0)
        x1, x2, y1, y2 = x1 + pad[0], x2 + pad[0], y1 + pad[2], y2 + pad[2]
    img, alpha = img[..., y1:y2, x1:x2], alpha[..., y1:y2, x1:x2]
    behind = torch.tensor(background, dtype=img.dtype).view(1, 3, 1, 1)
    return (img * alpha + behind * (1.0 - alpha)).clamp(0, 1)


def _background(color: Any, node: str) -> tuple[float, float, float]:
    """ComfyUI's reading of a background colour: "#RRGGBB" as 0..1 channels; any other length gives black."""
    if not isinstance(color, str):
        raise ValueError(f"{node}: background must be a colour such as '#000000', got {color!r}")
    digits = color.lstrip("#")
    if len(digits) != 6:
        return (0.0, 0.0, 0.0)
    red, green, blue = (_hex_pair(digits[i:i + 2], node) / 255.0 for i in (0, 2, 4))
    return red, green, blue


class ImageCropToMask(Node):
    """Crops each image to its mask's bounding box, widened to the output's aspect ratio and by `pad_factor`,
    composites the masked subject over the background colour and resizes it (Lanczos) to width x height; for 3D
    pipelines that expect a centred subject without background (Trellis2, Pixal3D, Hunyuan3D, TripoSR)."""

    display_name = "Crop Image to Mask"
    category = "image/transform"
    images = Socket("IMAGE")
    masks = Socket("MASK")
    width = Int(1024, min=64, max=4096, step=8, tooltip="Output width in pixels.")
    height = Int(1024, min=64, max=4096, step=8, tooltip="Output height in pixels.")
    pad_factor = Float(1.0, min=1.0, max=2.0, step=0.01,
                       tooltip="Extra margin around the mask bounding box as a multiplier.")
    grow_mask = Int(0, min=-32, max=32, step=1, tooltip="Grow or shrink the mask by this many pixels before cropping.")
    background = InputSpec(type="COLOR", default="#000000", checked_by_node=True,
                           tooltip="Background color behind the masked subject.", extra={"socketless": True})
    outputs = (Output("IMAGE", "images"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [width, height, pad_factor, grow_mask, background]."""
        if len(values) != 5 or not isinstance(values[4], str):
            return None
        return dict(zip(("width", "height", "pad_factor", "grow_mask", "background"), values, strict=True))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if "background" in inputs:
            try:
                _background(inputs["background"], "ImageCropToMask")
            except ValueError as exc:
                return str(exc)
        return None

    def execute(self, images: torch.Tensor, masks: torch.Tensor, width: int, height: int, pad_factor: float,
                grow_mask: int, background: str) -> tuple[torch.Tensor]:
        node = "ImageCropToMask"
        behind = _background(background, node)
        if images.ndim != 4:
            raise ValueError(f"{node}: an IMAGE is [batch, height, width, channels], got shape {tuple(images.shape)}")
        images = images[..., :3]
        masks = as_mask_batch(masks)
        batch = images.shape[0]
        if masks.shape[0] == 1 and batch > 1:
            masks = masks.expand(batch, -1, -1)
        elif masks.shape[0] != batch:
            raise ValueError(f"{node}: {masks.shape[0]} masks for {batch} images; give one mask, or one per image")
        if masks.shape[-2:] != images.shape[1:3]:
            masks = upscale_latent(masks[:, None].float(), images.shape[2], images.shape[1], "bilinear",
                                   "disabled")[:, 0]
        out = [lanczos(crop_to_mask(images[i], masks[i], max(width, height), pad_factor, grow_mask, behind,
                                    width / height), width, height).movedim(-3, -1) for i in range(batch)]
        return (torch.cat(out).to(images.device),)


# --- A canvas of bounding boxes -----------------------------------------------------------------------------------
#
# Boxes travel three ways: in pixels ({"x", "y", "width", "height", "metadata"?}), as fractions of the canvas while
# drawn ("regions": {"x", "y", "w", "h", "type", "text", "desc", "palette"}) and as Ideogram prompt elements
# ({"type", "bbox": [ymin, xmin, ymax, xmax] on a 0..1000 grid, "text"?, "desc", "color_palette"?}).

PREVIEW_LONG_EDGE = 1024
PREVIEW_DIM = 0.25


def hex_to_rgb(value: str) -> tuple[int, int, int]:
    """ComfyUI's colour_util.hex_to_rgb: "#RRGGBB" as three 0..255 ints; white for anything else."""
    digits = value.lstrip("#")
    try:
        return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)) if len(digits) == 6 else (
            255, 255, 255)
    except ValueError:
        return (255, 255, 255)


def readable_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The colour lightened toward white until its luma (0.299 R + 0.587 G + 0.114 B) reaches 130."""
    red, green, blue = rgb
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    if luma >= 130:
        return rgb
    t = (130 - luma) / (255 - luma)
    return round(red + (255 - red) * t), round(green + (255 - green) * t), round(blue + (255 - blue) * t)


def pixels_to_region(box: dict, width: int, height: int) -> dict[str, Any]:
    meta = box.get("metadata") if isinstance(box.get("metadata"), dict) else {}
    w, h = width or 1, height or 1
    return {"x": box.get("x", 0) / w, "y": box.get("y", 0) / h, "w": box.get("width", 0) / w,
            "h": box.get("height", 0) / h, "type": meta.get("type", "obj"), "text": meta.get("text", ""),
            "desc": meta.get("desc", ""), "palette": meta.get("palette", [])}


def region_to_pixels(region: dict, width: int, height: int) -> dict[str, int]:
    """A region as a pixel box; a negative width or height flips it to start at its other corner."""
    x, y, w, h = region.get("x", 0.0), region.get("y", 0.0), region.get("w", 0.0), region.get("h", 0.0)
    if w < 0:
        x, w = x + w, -w
    if h < 0:
        y, h = y + h, -h
    return {"x": round(x * width), "y": round(y * height), "width": round(w * width), "height": round(h * height)}


def element_to_box(element: dict, width: int, height: int, node: str) -> dict[str, Any]:
    """An Ideogram element (bbox [ymin, xmin, ymax, xmax] on 0..1000) as a pixel box with its metadata."""
    bbox = element.get("bbox")
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4):
        raise ValueError(f"{node}: bboxes element is missing a valid 'bbox' [ymin, xmin, ymax, xmax]: {element!r}")
    try:
        ymin, xmin, ymax, xmax = (float(v) / 1000.0 for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"{node}: bboxes element 'bbox' must contain four numbers, got {bbox!r}") from None
    kind = "text" if element.get("type") == "text" else "obj"
    return {"x": round(min(xmin, xmax) * width), "y": round(min(ymin, ymax) * height),
            "width": round(abs(xmax - xmin) * width), "height": round(abs(ymax - ymin) * height),
            "metadata": {"type": kind, "text": element.get("text", "") if kind == "text" else "",
                         "desc": element.get("desc", ""), "palette": element.get("color_palette", []) or []}}


def plain_boxes(frames: Any) -> list[dict[str, Any]]:
    """Pixel boxes from one box, a list of boxes or boxes per frame (the first frame's), keeping only x, y,
    width, height (0 when absent) and a dict of metadata."""
    if isinstance(frames, dict):
        frame = [frames]
    elif not isinstance(frames, list) or not frames:
        frame = []
    elif isinstance(frames[0], dict):
        frame = frames
    else:
        frame = frames[0] if isinstance(frames[0], list) else []
    boxes = []
    for box in frame:
        if isinstance(box, dict):
            plain = {k: box.get(k, 0) for k in BOX_FIELDS}
            if isinstance(box.get("metadata"), dict):
                plain["metadata"] = box["metadata"]
            boxes.append(plain)
    return boxes


def boxes_from_input(data: Any, width: int, height: int, node: str = "CreateBoundingBoxes") -> list[dict[str, Any]]:
    """The pixel boxes an upstream `bboxes` value gives: bounding boxes, Ideogram elements, or either as JSON."""
    if data is None:
        return []
    if isinstance(data, str):
        if not data.strip():
            return []
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"{node}: bboxes string input is not valid JSON: {exc}") from exc
    is_element = lambda item: isinstance(item.get("bbox"), list | tuple) and len(item["bbox"]) == 4  # noqa: E731
    is_box = lambda item: all(k in item for k in BOX_FIELDS)  # noqa: E731
    if isinstance(data, dict):
        if is_element(data):
            return [element_to_box(data, width, height, node)]
        if is_box(data):
            return plain_boxes(data)
        raise ValueError(f"{node}: a bboxes dict must be a bounding box (x, y, width, height) or an element (with a "
                         "'bbox')")
    if not isinstance(data, list):
        raise ValueError(f"{node}: bboxes input must be bounding boxes, elements, or a JSON string, got "
                         f"{type(data).__name__}")
    if not data:
        return []
    if isinstance(data[0], list):
        return plain_boxes(data)
    if isinstance(data[0], dict):
        if is_element(data[0]):
            return [element_to_box(item, width, height, node) for item in data if isinstance(item, dict)]
        if is_box(data[0]):
            return plain_boxes(data)
        raise ValueError(f"{node}: bboxes items must be bounding boxes (x, y, width, height) or elements (with a "
                         "'bbox')")
    raise ValueError(f"{node}: a bboxes list must contain bounding boxes or elements, got {type(data[0]).__name__}")


def region_to_element(region: dict) -> dict[str, Any]:
    """A region as an Ideogram element: its bbox on the 0..1000 grid (clamped, corners ordered), the text of a text
    element, its description and up to five palette colours, upper-cased."""
    def grid(value: float) -> int:
        return max(0, min(1000, round(value * 1000)))

    x, y, w, h = region.get("x", 0.0), region.get("y", 0.0), region.get("w", 0.0), region.get("h", 0.0)
    ymin, xmin, ymax, xmax = grid(y), grid(x), grid(y + h), grid(x + w)
    kind = "text" if region.get("type") == "text" else "obj"
    element: dict[str, Any] = {"type": kind, "bbox": [min(ymin, ymax), min(xmin, xmax), max(ymin, ymax),
                                                      max(xmin, xmax)]}
    if kind == "text":
        element["text"] = region.get("text", "")
    element["desc"] = region.get("desc", "")
    palette = region.get("palette", [])
    palette = palette.values() if isinstance(palette, dict) else palette
    palette = [c.upper() for c in palette if isinstance(c, str) and c]
    if palette:
        element["color_palette"] = palette[:5]
    return element


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)
    except Exception:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: Any, text: str, font: Any, max_width: float) -> list[str]:
    """Lines of `text` (its own line breaks kept) broken between words to fit `max_width`."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            longer = word if not line else f"{line} {word}"
            if line and draw.textlength(longer, font=font) > max_width:
                lines.append(line)
                line = word
            else:
                line = longer
        lines.append(line)
    return lines


def render_preview(regions: list[dict], width: int, height: int, background: torch.Tensor | None) -> torch.Tensor:
    """ComfyUI's preview of a canvas, [1, H, W, 3] with the longer side at most 1024: the background image (its
    first picture) dimmed to a quarter, or grey 32/255; each region outlined in its first palette colour (grey 140
    without one), its palette as swatches along the top, a numbered tag and its text and description inside."""
    from PIL import Image, ImageDraw, ImageEnhance

    if background is not None:
        array = (background[0].detach().cpu().numpy() * 255).clip(0, 255).astype(np.uint8)
        picture = Image.fromarray(array)
        scale = min(1.0, PREVIEW_LONG_EDGE / (max(picture.size) or 1))
        size = max(1, round(picture.size[0] * scale)), max(1, round(picture.size[1] * scale))
        base = picture.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        canvas = ImageEnhance.Brightness(base).enhance(PREVIEW_DIM).convert("RGBA")
    else:
        scale = min(1.0, PREVIEW_LONG_EDGE / (max(width, height) or 1))
        size = max(1, round(width * scale)), max(1, round(height * scale))
        grey = round(PREVIEW_DIM * 128)
        canvas = Image.new("RGBA", size, (grey, grey, grey, 255))
    rw, rh = size
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font_size = max(10, round(rh / 64))
    font, tag_font = _font(font_size), _font(max(9, font_size - 2))

    for number, region in enumerate(regions, start=1):
        palette = [c for c in (region.get("palette") or []) if c]
        red, green, blue = hex_to_rgb(palette[0]) if palette else (140, 140, 140)
        x, y = region.get("x", 0), region.get("y", 0)
        x1, x2 = sorted(max(0, min(rw, round(v * rw))) for v in (x, x + region.get("w", 0)))
        y1, y2 = sorted(max(0, min(rh, round(v * rh))) for v in (y, y + region.get("h", 0)))
        draw.rectangle([x1, y1, x2, y2], outline=(red, green, blue, 255), width=2)
        swatches = palette[:5]
        if swatches and x2 - x1 > 2:
            strip = max(5, font_size // 2)
            step = (x2 - x1) / len(swatches)
            for i, color in enumerate(swatches):
                draw.rectangle([x1 + round(i * step), y1, x1 + round((i + 1) * step), y1 + strip],
                               fill=hex_to_rgb(color))
        tag = str(number).zfill(2)
        draw.rectangle([x1, y1, x1 + draw.textlength(tag, font=tag_font) + 6, y1 + font_size + 2],
                       fill=(red, green, blue, 255))
        light = 0.299 * red + 0.587 * green + 0.114 * blue > 140
        draw.text((x1 + 3, y1 + 1), tag, fill=(0, 0, 0, 255) if light else (255, 255, 255, 255), font=tag_font)
        body = region.get("desc", "") or ""
        if region.get("type") == "text" and region.get("text"):
            body = f'"{region["text"]}"' + (f" — {body}" if body else "")
        if body and x2 - x1 > 8:
            line_y = y1 + font_size + 5
            for line in _wrap(draw, body, font, x2 - x1 - 8):
                if line_y > y2:
                    break
                draw.text((x1 + 4, line_y), line, fill=readable_color((red, green, blue)) + (255,), font=font)
                line_y += font_size + 2

    composed = Image.alpha_composite(canvas, overlay).convert("RGB")
    return torch.from_numpy(np.asarray(composed, dtype=np.float32) / 255.0)[None]


def _boxes_problem(value: Any, name: str) -> str | None:
    if value is not None and not (isinstance(value, list) and all(isinstance(b, dict) for b in value)):
        return f"{name} must be a list of bounding boxes ({{\"x\", \"y\", \"width\", \"height\", \"metadata\"?}}), " \
               f"got {value!r}"
    return None


class CreateBoundingBoxes(Node):
    """A canvas of bounding boxes (drawn in the editor, or taken from an upstream value that changed since the canvas
    last took it): their preview, the boxes in pixels (one frame) and as Ideogram prompt elements."""

    description = ("Draw bounding boxes in a canvas. Outputs Ideogram prompt elements, pixel-space bounding boxes, "
                   "and a preview image.")
    display_name = "Create Bounding Boxes"
    category = "utilities"
    output_node = True
    background = Socket("IMAGE", optional=True,
                        tooltip="Optional image used as background in the canvas and preview.")
    bboxes = InputSpec(type="BOUNDING_BOX,ARRAY,STRING", optional=True, checked_by_node=True,
                       tooltip="Bounding boxes, elements, or a JSON string to initialize the canvas. A new upstream "
                               "value initializes the canvas; edits made on the canvas take priority and are kept "
                               "until the upstream value changes again.")
    width = Int(1024, min=64, max=16384, step=16,
                tooltip="Width of the canvas and the pixel grid for the bounding boxes.")
    height = Int(1024, min=64, max=16384, step=16,
                 tooltip="Height of the canvas and the pixel grid for the bounding boxes.")
    editor_state = InputSpec(type="BOUNDING_BOXES", default=[], checked_by_node=True, extra={"socketless": False},
                             tooltip="Draw bounding boxes and set each box type, text, description, color palette. "
                                     "Start with background element first and foreground last.")
    last_incoming = InputSpec(type="BOUNDING_BOXES", optional=True, default=[], checked_by_node=True,
                              extra={"socketless": True},
                              tooltip="Internal state managed by the canvas: the upstream bboxes value that last "
                                      "initialized it. Leave empty to re-initialize the canvas from the bboxes input "
                                      "on the next run.")
    outputs = (Output("IMAGE", "preview"), Output("BOUNDING_BOX", "bboxes"), Output("ARRAY", "elements"))

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """The editor's widgets in order: width, height, editor_state, last_incoming."""
        if len(values) < 3 or not isinstance(values[2], list | str):
            return None
        return dict(zip(("width", "height", "editor_state", "last_incoming"), values, strict=False))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        for name in ("editor_state", "last_incoming"):
            if problem := _boxes_problem(_as_json(inputs.get(name)), name):
                return problem
        return None

    def execute(self, width: int, height: int, editor_state: Any = None, last_incoming: Any = None,
                background: torch.Tensor | None = None, bboxes: Any = None) -> NodeResult:
        editor_state, last_incoming = _as_json(editor_state), _as_json(last_incoming)
        for value, name in ((editor_state, "editor_state"), (last_incoming, "last_incoming")):
            if problem := _boxes_problem(value, name):
                raise ValueError(f"CreateBoundingBoxes: {problem}")
        incoming = boxes_from_input(bboxes, width, height)
        applied = last_incoming if isinstance(last_incoming, list) else []
        # A new upstream value replaces the canvas; otherwise the canvas's own boxes stand.
        source = incoming if incoming and incoming != applied else (editor_state or [])
        regions = [pixels_to_region(box, width, height) for box in source if isinstance(box, dict)]
        if background is not None and background.ndim != 4:
            raise ValueError(f"CreateBoundingBoxes: an IMAGE is [batch, height, width, channels], got shape "
                             f"{tuple(background.shape)}")
        preview = render_preview(regions, width, height, background)
        pixels = [region_to_pixels(region, width, height) for region in regions]
        ui: dict[str, Any] = {"dims": [width, height]}
        if incoming:
            ui["input_bboxes"] = incoming
        return NodeResult(outputs=(preview, [pixels] if pixels else [], [region_to_element(r) for r in regions]),
                          ui=ui)


NODES = [CreateList, ComfyNumberConvert, ColorToRGBInt, SaveText, PrimitiveBoundingBox, ImageCropV2, CropByBBoxes,
         ImageCropToMask, CreateBoundingBoxes]
