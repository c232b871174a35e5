"""Small ComfyUI core nodes over machinery Loom already has: the multi-GPU device pickers (nodes_multigpu.py), the
Painter and Curve Editor widgets' nodes (nodes_painter.py, nodes_curve.py), Ideogram 4's scheduler, JoyImage's
guidance rescale, Mochi's empty latent, the text overlay and the (deprecated) diffusers-folder loader of nodes.py.

Kinds of input from ComfyUI's newer node schema, declared as what they amount to (as nodes/sd/toolkit.py does):

- COLOR is a socketless widget holding "#rrggbb"; CURVE one holding {"points": [[x, y], ...], "interpolation":
  "monotone_cubic" | "linear"} (or a bare list of points). Their values are checked by the nodes, and
  `widgets_from_ui` reads them from an editor file's widgets_values.
- Painter's `mask` is the name of the RGBA picture its editor widget uploads to input/ ("painter-N-T.png [input]").
  Loom's editor has no painting widget: there the name is typed, or comes from a ComfyUI file or an API prompt.
- A CURVE output is a `Curve` (points, interpolation; `interp`, `interp_array` and `to_lut` evaluate it), a
  HISTOGRAM output a list of 256 counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.sampling.model_patches import CfgArgs
from ldm.sampling.schedulers import sigmas_ideogram4
from nodes.folders import get_paths
from nodes.node import Node, NodeResult
from nodes.sd.image import save_images
from nodes.sd.image_sources import find_image
from nodes.sd.latent import MAX_RESOLUTION
from nodes.sd.models import Clip, DiffusionModel, Vae
from nodes.spec import Boolean, Combo, Float, InputSpec, Int, Output, Socket, String

log = logging.getLogger(__name__)


def _preview(ctx: Any, images: torch.Tensor, prefix: str) -> list[dict[str, str]]:
    """Images written to the temp folder for the editor to show (ComfyUI's UI.PreviewImage)."""
    return save_images(ctx, images, get_paths().temp, f"{prefix}_{uuid.uuid4().hex[:8]}", "temp")


# --- Multi-GPU (nodes_multigpu.py) --------------------------------------------------------------------------------

# ComfyUI offers "default", "cpu" and "gpu:N" for each GPU when there are several; Loom runs every model on its one
# device (the engine's: --cpu, --lowvram and the rest apply to all), so it offers what a one-GPU ComfyUI offers.
DEVICE_CHOICES = ("default", "cpu")
VAE_DEVICE_CHOICES = ("default",)


def _passed_through(node: str, what: str, device: Any) -> None:
    if device in (None, "default"):
        log.info("%s: the %s stays on Loom's device, as the loader placed it", node, what)
    else:
        log.info("%s: Loom runs every model on its one device; device %r is not chosen per %s, which passes "
                 "through unchanged (as ComfyUI does with a device it lacks)", node, device, what)


class MultiGPUCFGSplitNode(Node):
    """Prepares model to have sampling accelerated via splitting work units. ComfyUI spreads the positive and
    negative passes over up to `max_gpus` GPUs; Loom runs on one device, where this passes the MODEL through."""

    name = "MultiGPU_WorkUnits"
    display_name = "MultiGPU CFG Split"
    category = "advanced/multigpu"
    model = Socket("MODEL")
    max_gpus = Int(2, min=1, step=1)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, max_gpus: int) -> tuple[DiffusionModel]:
        if max_gpus < 1:
            raise ValueError(f"MultiGPU_WorkUnits: max_gpus must be at least 1, not {max_gpus}")
        log.info("MultiGPU_WorkUnits: Loom samples on one device; the model passes through unchanged (max_gpus %d)",
                 max_gpus)
        return (model,)


class SelectModelDeviceNode(Node):
    """Place the diffusion model on a specific device (default / cpu / gpu:N). Loom places every model on its one
    device itself: the MODEL passes through, and a device it does not choose per model is logged."""

    name = "SelectModelDevice"
    display_name = "Select Model Device"
    category = "advanced/multigpu"
    model = Socket("MODEL")
    # ComfyUI takes any saved choice (a gpu:N of another machine passes through): so does Loom.
    device = Combo(DEVICE_CHOICES, checked_by_node=True)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, device: Any = "default") -> tuple[DiffusionModel]:
        _passed_through("SelectModelDevice", "model", device)
        return (model,)


class SelectCLIPDeviceNode(Node):
    """Place the CLIP text encoder on a specific device (default / cpu / gpu:N). In Loom the CLIP passes through;
    to keep a text encoder on the CPU, load it with Load CLIP's device "cpu"."""

    name = "SelectCLIPDevice"
    display_name = "Select CLIP Device"
    category = "advanced/multigpu"
    clip = Socket("CLIP")
    device = Combo(DEVICE_CHOICES, checked_by_node=True)
    outputs = (Output("CLIP"),)

    def execute(self, clip: Any, device: Any = "default") -> tuple[Any]:
        _passed_through("SelectCLIPDevice", "CLIP", device)
        return (clip,)


class SelectVAEDeviceNode(Node):
    """Place the VAE on a specific device (default / gpu:N; not the CPU, as in ComfyUI). In Loom the VAE passes
    through."""

    name = "SelectVAEDevice"
    display_name = "Select VAE Device"
    category = "advanced/multigpu"
    vae = Socket("VAE")
    device = Combo(VAE_DEVICE_CHOICES, checked_by_node=True)
    outputs = (Output("VAE"),)

    def execute(self, vae: Any, device: Any = "default") -> tuple[Any]:
        _passed_through("SelectVAEDevice", "VAE", device)
        return (vae,)


# --- Painter (nodes_painter.py) -----------------------------------------------------------------------------------


def hex_rgb(color: Any) -> tuple[float, float, float]:
    """"#rrggbb" as three 0..1 values; anything else is black (ComfyUI's painter reads colours so)."""
    digits = str(color).lstrip("#")
    if len(digits) != 6:
        return (0.0, 0.0, 0.0)
    try:
        return tuple(int(digits[i:i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return (0.0, 0.0, 0.0)


def paint_over(base: torch.Tensor, painting: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, H, W, 3] picture with an RGBA painting (uint8 [H, W, 4], already that size) laid over it by its alpha,
    and the alpha as a [1, H, W] mask."""
    paint = torch.from_numpy(painting.astype(np.float32) / 255.0)
    rgb, alpha = paint[..., :3], paint[..., 3:4]
    composite = rgb * alpha + base[0].float().cpu() * (1.0 - alpha)
    return composite.unsqueeze(0), alpha[..., 0].unsqueeze(0)


def read_painting(name: str, width: int, height: int) -> np.ndarray:
    """The painter's picture as RGBA uint8 [height, width, 4], resized with Lanczos when its size differs."""
    from PIL import Image

    path, problem = find_image(name, "input")
    if path is None:
        raise FileNotFoundError(f"Painter: {problem}")
    with Image.open(path) as picture:
        rgba = picture.convert("RGBA")
    if rgba.size != (width, height):
        rgba = rgba.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(rgba)


class PainterNode(Node):
    """A picture painted in the editor (its RGBA layer, uploaded to input/) over a base image or a plain
    background: the composite, and the painting's alpha as the mask."""

    name = "Painter"
    display_name = "Painter"
    category = "image"
    image = Socket("IMAGE", optional=True, tooltip="Optional base image to paint over")
    mask = String("", image_upload=True, checked_by_node=True, extra={"socketless": True, "widgetType": "PAINTER"})
    width = Int(512, min=64, max=4096, step=64, extra={"socketless": True, "hidden": True})
    height = Int(512, min=64, max=4096, step=64, extra={"socketless": True, "hidden": True})
    bg_color = InputSpec(type="COLOR", default="#000000", checked_by_node=True, extra={"socketless": True})
    outputs = (Output("IMAGE", "IMAGE"), Output("MASK", "MASK"))

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [mask, width, height, bg_color] (an upload button's "image" may follow mask)."""
        values = list(values)
        if len(values) > 1 and values[1] in ("image", "upload"):
            del values[1]
        if len(values) != 4 or not isinstance(values[0], str):
            return None
        return dict(zip(("mask", "width", "height", "bg_color"), values, strict=True))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        mask = inputs.get("mask")
        if mask is not None and not isinstance(mask, str):
            return f"Painter: mask must be the name of the painted picture (a string), not {type(mask).__name__}"
        if isinstance(mask, str) and mask.strip():
            path, problem = find_image(mask, "input")
            if path is None:
                return f"Painter: {problem}"
        return None

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        path, _ = find_image(str(inputs.get("mask") or ""), "input")
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else ""

    def execute(self, mask: str, width: int, height: int, bg_color: str = "#000000",
                image: torch.Tensor | None = None) -> NodeResult:
        if image is not None:
            base = image[:1, ..., :3].float().cpu()
        else:
            base = torch.tensor(hex_rgb(bg_color), dtype=torch.float32).expand(1, height, width, 3).clone()
        h, w = base.shape[1], base.shape[2]
        if mask and mask.strip():
            picture, alpha = paint_over(base, read_painting(mask, w, h))
        else:
            picture, alpha = base, torch.zeros(1, h, w)
        return NodeResult((picture, alpha), {"images": _preview(self.ctx, picture, "painter")})


# --- Curves (nodes_curve.py) --------------------------------------------------------------------------------------

CURVE_INTERPOLATIONS = ("monotone_cubic", "linear")
DEFAULT_CURVE = {"points": [[0.0, 0.0], [1.0, 1.0]], "interpolation": "monotone_cubic"}


def monotone_slopes(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson tangents at each point (monotone cubic Hermite interpolation, as the editor's preview draws
    it): the secant at the ends, the mean of the two secants inside (0 where they differ in sign), then each
    interval's pair scaled down so alpha^2 + beta^2 <= 9, and both 0 on a flat interval."""
    n = len(xs)
    if n < 2:
        return np.zeros(n)
    widths = np.diff(xs)
    secants = np.divide(np.diff(ys), widths, out=np.zeros(n - 1), where=widths != 0)
    slopes = np.empty(n)
    slopes[0], slopes[-1] = secants[0], secants[-1]
    for i in range(1, n - 1):
        left, right = secants[i - 1], secants[i]
        slopes[i] = 0.0 if left * right <= 0 else (left + right) / 2
    for i, secant in enumerate(secants):
        if secant == 0:
            slopes[i] = slopes[i + 1] = 0.0
            continue
        alpha, beta = slopes[i] / secant, slopes[i + 1] / secant
        if alpha * alpha + beta * beta > 9:
            shrink = 3 / math.sqrt(alpha * alpha + beta * beta)
            slopes[i], slopes[i + 1] = shrink * alpha * secant, shrink * beta * secant
    return slopes


@dataclass(frozen=True)
class Curve:
    """A CURVE value: control points (sorted by x) and how they are joined, evaluated on x in [0, 1] (held flat
    beyond the first and last points)."""

    points: tuple[tuple[float, float], ...]
    interpolation: str = "monotone_cubic"

    @classmethod
    def from_raw(cls, value: Any) -> Curve:
        """A curve from an editor's value: {"points": [[x, y], ...], "interpolation": ...}, a bare list of points
        (monotone cubic), or a Curve. An unknown interpolation is monotone cubic, as in ComfyUI."""
        if isinstance(value, Curve):
            return value
        raw, interpolation = (value.get("points"), value.get("interpolation", "monotone_cubic")) \
            if isinstance(value, dict) else (value, "monotone_cubic")
        try:
            points = tuple(sorted(((float(x), float(y)) for x, y in raw), key=lambda p: p[0]))
        except (TypeError, ValueError):
            raise ValueError(f"CurveEditor: curve points must be a list of [x, y] number pairs, not {raw!r}") from None
        if interpolation not in CURVE_INTERPOLATIONS:
            log.warning("CurveEditor: unknown curve interpolation %r, using monotone_cubic", interpolation)
            interpolation = "monotone_cubic"
        return cls(points, interpolation)

    def interp_array(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if not self.points:
            return np.zeros_like(x)
        xs, ys = (np.array(column, dtype=np.float64) for column in zip(*self.points, strict=True))
        if len(xs) == 1:
            return np.full_like(x, ys[0])
        if self.interpolation == "linear":
            return np.interp(x, xs, ys)
        slopes = monotone_slopes(xs, ys)
        hi = np.clip(np.searchsorted(xs, x, side="right"), 1, len(xs) - 1)
        lo = hi - 1
        width = xs[hi] - xs[lo]
        t = np.divide(x - xs[lo], width, out=np.zeros_like(x), where=width != 0)
        # Cubic Hermite basis on the interval.
        value = ((2 * t**3 - 3 * t**2 + 1) * ys[lo] + (t**3 - 2 * t**2 + t) * width * slopes[lo]
                 + (3 * t**2 - 2 * t**3) * ys[hi] + (t**3 - t**2) * width * slopes[hi])
        return np.where(x <= xs[0], ys[0], np.where(x >= xs[-1], ys[-1], value))

    def interp(self, x: float) -> float:
        return float(self.interp_array(np.array([x]))[0])

    def to_lut(self, size: int = 256) -> np.ndarray:
        """The curve at `size` evenly spaced x from 0 to 1."""
        return self.interp_array(np.linspace(0.0, 1.0, size))


class CurveEditor(Node):
    """The curve drawn in the editor's curve widget, as a CURVE value (monotone cubic or linear through its
    points); a linked HISTOGRAM is sent back for the widget to draw behind the curve."""

    display_name = "Curve Editor"
    category = "utils"
    curve = InputSpec(type="CURVE", default=DEFAULT_CURVE, checked_by_node=True, extra={"socketless": True})
    histogram = Socket("HISTOGRAM", optional=True)
    outputs = (Output("CURVE", "curve"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [the curve]."""
        return {"curve": values[0]} if values and isinstance(values[0], dict | list) else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if "curve" in inputs:
            try:
                Curve.from_raw(inputs["curve"])
            except (ValueError, AttributeError) as exc:
                return str(exc)
        return None

    def execute(self, curve: Any, histogram: list[int] | None = None) -> tuple[Curve] | NodeResult:
        result = Curve.from_raw(curve)
        if histogram is None:
            return (result,)
        return NodeResult((result,), {"histogram": [int(v) for v in histogram]})


def histogram_256(values: np.ndarray) -> np.ndarray:
    """Counts of each 8-bit level of 0..1 values (scaled by 255, clipped, truncated)."""
    return np.bincount(np.clip(values * 255, 0, 255).astype(np.uint8).ravel(), minlength=256)[:256]


class ImageHistogram(Node):
    """The first image's 256-level histograms: the mean of the R, G and B counts (integer), BT.709 luminance, and
    each channel's, for the Curve Editor to draw."""

    display_name = "Image Histogram"
    category = "utils"
    image = Socket("IMAGE")
    outputs = (Output("HISTOGRAM", "rgb"), Output("HISTOGRAM", "luminance"), Output("HISTOGRAM", "red"),
               Output("HISTOGRAM", "green"), Output("HISTOGRAM", "blue"))

    def execute(self, image: torch.Tensor) -> tuple[list[int], ...]:
        if image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(f"ImageHistogram: image must be an RGB IMAGE [B, H, W, 3], got {tuple(image.shape)}")
        pixels = image[0].float().cpu().numpy()
        red, green, blue = (histogram_256(pixels[..., c]) for c in range(3))
        luminance = histogram_256(0.2126 * pixels[..., 0] + 0.7152 * pixels[..., 1] + 0.0722 * pixels[..., 2])
        rgb = (red + green + blue) // 3
        return tuple(h.tolist() for h in (rgb, luminance, red, green, blue))


# --- Ideogram 4 (nodes_ideogram4.py) ------------------------------------------------------------------------------


class Ideogram4Scheduler(Node):
    """Ideogram 4's logit-normal flow schedule (`ldm.sampling.schedulers.sigmas_ideogram4`), shifted by the image
    size; it ends where the reference loop stops (about 5.5e-4) unless `full_denoise`. Loom runs no Ideogram 4
    model, but the levels are rectified-flow ones that any flow model (SD3, Flux, Wan, Qwen-Image) can walk."""

    display_name = "Ideogram 4 Scheduler"
    category = "model/sampling/schedulers"
    steps = Int(48, min=1, max=200)
    width = Int(1024, min=256, max=8192, step=16)
    height = Int(1024, min=256, max=8192, step=16)
    mu = Float(0.0, min=-10.0, max=10.0, step=0.05)
    std = Float(1.5, min=0.1, max=5.0, step=0.05)
    full_denoise = Boolean(False, optional=True,
                           tooltip="End at sigma 0 instead of where the reference loop stops (1 - t_max, about "
                                   "5.5e-4).")
    outputs = (Output("SIGMAS"),)

    def execute(self, steps: int, width: int, height: int, mu: float, std: float,
                full_denoise: bool = False) -> tuple[torch.Tensor]:
        if steps < 1 or width < 1 or height < 1 or std <= 0:
            raise ValueError(f"Ideogram4Scheduler: steps, width and height must be positive and std above 0 (got "
                             f"steps {steps}, {width}x{height}, std {std})")
        sigmas = sigmas_ideogram4(steps, width, height, mu, std)
        if full_denoise:
            sigmas[-1] = 0.0
        return (sigmas,)


# --- JoyImage (nodes_joyimage.py) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuidanceRescale:
    """JoyImage-Edit's guidance: classifier-free guidance on the noise predictions (x - x0), the result scaled at
    each latent position to the positive prediction's norm over the channels, `guided * |cond| / |guided|` (the
    guided norm floored at 1e-6). Without a negative prediction (cfg 1) it is the positive one."""

    def __call__(self, args: CfgArgs) -> torch.Tensor:
        if args.uncond is None:
            return args.cond
        cond, uncond = args.x - args.cond, args.x - args.uncond
        guided = uncond + args.cfg * (cond - uncond)
        scale = cond.norm(dim=1, keepdim=True) / guided.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return args.x - guided * scale


class JoyImageGuidanceRescale(Node):
    """CFG combine + per-token L2 norm rescale required by JoyImageEdit: the guided noise prediction scaled back to
    the positive one's norm at each latent position (over its channels). It replaces the model's guidance function,
    so it works with any model; Loom runs no JoyImage model."""

    category = "model/patch"
    model = Socket("MODEL")
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel) -> tuple[DiffusionModel]:
        patches = replace(model.sampling_patches, cfg_function=GuidanceRescale())
        return (replace(model, sampling_patches=patches),)


# --- Mochi (nodes_mochi.py) ---------------------------------------------------------------------------------------


class EmptyMochiLatentVideo(Node):
    """An empty (zero) Mochi video latent: 12 channels, 1/8 of the pixels, one frame for the first picture and one
    for every 6 after it. Loom runs no Mochi model: the latent is for workflows that pass it on."""

    category = "latent/video"
    width = Int(848, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(480, min=16, max=MAX_RESOLUTION, step=16)
    length = Int(25, min=7, max=MAX_RESOLUTION, step=6)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, length: int, batch_size: int = 1) -> tuple[dict]:
        if min(width, height) < 8 or length < 1 or batch_size < 1:
            raise ValueError(f"EmptyMochiLatentVideo: width and height must be at least 8 and length and batch_size "
                             f"at least 1 (got {width}x{height}, length {length}, batch_size {batch_size})")
        return ({"samples": torch.zeros(batch_size, 12, (length - 1) // 6 + 1, height // 8, width // 8)},)


# --- Text overlay (nodes_text_overlay.py) -------------------------------------------------------------------------

# Pillow's own font (Aileron, scalable where Pillow has FreeType), used when the fonts folder holds no chosen font.
PILLOW_FONT = "default"
LINE_SPACING = 1.2
MARGIN_PERCENT = 1.0
MIN_FONT_PERCENT, MIN_FONT_PIXELS = 2.0, 10
OUTLINE_THICKNESS = 0.04


def font_choices() -> list[str]:
    """The font files in models/fonts (and extra font folders), then Pillow's own font."""
    return [*get_paths().list_models("fonts"), PILLOW_FONT]


def font_file(name: str) -> Path | None:
    """The named font file of the fonts folders; None for Pillow's own font: "default", "" or a font the folders
    lack (logged: ComfyUI ships Roboto in its fonts/ folder, Loom ships none)."""
    if not name or name == PILLOW_FONT:
        return None
    path = get_paths().find_model("fonts", name)
    if path is None:
        log.warning("TextOverlay: font %r is not in %s; drawing with Pillow's own font", name,
                    ", ".join(str(p) for p in get_paths().model_dirs("fonts")))
    return path


def load_font(path: Path | None, size: int) -> Any:
    """A font file at `size` pixels, or Pillow's own font (None)."""
    from PIL import ImageFont

    if path is not None:
        return ImageFont.truetype(str(path), size)
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def wrap_text(text: str, font: Any, max_width: float) -> list[str]:
    """Lines of `text` (its own line breaks kept, blank ones too) that fit `max_width`: broken between words, and a
    word wider than the line cut into pieces that fit (at least one character each)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        words = paragraph.split()
        if not words:
            lines.append("")
            continue
        line = ""
        for word in words:
            while len(word) > 1 and font.getlength(word) > max_width:
                cut = 1
                while cut < len(word) and font.getlength(word[:cut + 1]) <= max_width:
                    cut += 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            longer = f"{line} {word}" if line else word
            if not line or font.getlength(longer) <= max_width:
                line = longer
            else:
                lines.append(line)
                line = word
        if line:
            lines.append(line)
    return lines


def parse_rgba(color: str) -> tuple[int, int, int, int]:
    """A colour Pillow names ("#ffffff", "#ffffff80", "white", "rgb(...)") as RGBA 0..255."""
    from PIL import ImageColor

    try:
        parsed = ImageColor.getrgb(color)
    except (ValueError, AttributeError):
        raise ValueError(f"TextOverlay: color must be #RRGGBB, #RRGGBBAA or a colour name, not {color!r}") from None
    return (*parsed, 255) if len(parsed) == 3 else parsed  # type: ignore[return-value]


def render_text_layer(width: int, height: int, text: str, position: str, align: str, font_name: str,
                      font_size: float, fill: tuple[int, ...], outline: tuple[int, ...]) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """The text drawn on a transparent width x height layer, as ComfyUI's overlay lays it out: a margin of 1% of the
    shorter side; the font `font_size`% of the height, shrunk by 10% at a time (to no less than 2% of the height or
    10 px) until the wrapped block fits; lines 1.2 font sizes apart; the block flush with the top or bottom margin,
    aligned left, centred or right; an outline of 4% of the font size. Returns the layer's RGB [H, W, 3] and alpha
    [H, W, 1] in 0..1."""
    from PIL import Image, ImageDraw

    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    margin = int(round(MARGIN_PERCENT / 100.0 * min(width, height)))
    max_width, max_height = max(1, width - 2 * margin), max(1, height - 2 * margin)
    size = max(1, int(round(font_size / 100.0 * height)))
    floor = min(size, max(MIN_FONT_PIXELS, int(round(MIN_FONT_PERCENT / 100.0 * height))))
    path = font_file(font_name)
    while True:
        font = load_font(path, size)
        stroke = max(1, int(round(size * OUTLINE_THICKNESS))) if outline[3] > 0 else 0
        block = "\n".join(wrap_text(text, font, max_width))
        # Pillow's own line advance, measured, so that lines end up LINE_SPACING font sizes apart.
        one = draw.textbbox((0, 0), "Ay", font=font, stroke_width=stroke)
        two = draw.multiline_textbbox((0, 0), "Ay\nAy", font=font, spacing=0, stroke_width=stroke)
        spacing = int(round(size * LINE_SPACING - ((two[3] - two[1]) - (one[3] - one[1]))))
        box = draw.multiline_textbbox((0, 0), block, font=font, spacing=spacing, stroke_width=stroke)
        if box[3] - box[1] <= max_height or size <= floor:
            break
        size = max(floor, int(size * 0.9))
    anchor, x = {"left": ("l", margin), "center": ("m", width / 2), "right": ("r", width - margin)}[align]
    y = height - margin - box[3] if position == "bottom" else margin - box[1]
    draw.multiline_text((x, y), block, font=font, fill=fill, anchor=anchor + "a", align=align, spacing=spacing,
                        stroke_width=stroke, stroke_fill=outline)
    pixels = torch.from_numpy(np.asarray(layer).astype(np.float32) / 255.0)
    return pixels[..., :3], pixels[..., 3:4]


class TextOverlay(Node):
    """Draw text overlay on an image or batch of images."""

    display_name = "Draw Text Overlay"
    category = "text"
    images = Socket("IMAGE")
    text = String("", multiline=True)
    # A ComfyUI file names a font of its fonts/ folder (Roboto/...): one Loom lacks is drawn in Pillow's own font.
    font = Combo(font_choices, default=PILLOW_FONT, checked_by_node=True,
                 tooltip="a font file in models/fonts, or Pillow's own font")
    font_size = Float(5.0, min=0.5, max=50.0, step=0.5, tooltip="Font size as a percentage of the image height.")
    color = InputSpec(type="COLOR", default="#ffffff", checked_by_node=True, tooltip="Color of the text.",
                      extra={"socketless": True})
    position = Combo(["top", "bottom"], default="top")
    align = Combo(["left", "center", "right"], default="left")
    outline = Boolean(True, tooltip="Draw a black outline around the text.")
    outputs = (Output("IMAGE", "images"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [text, font, font_size, color, position, align, outline]."""
        if len(values) != 7:
            return None
        return dict(zip(("text", "font", "font_size", "color", "position", "align", "outline"), values, strict=True))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if "font" in inputs and not isinstance(inputs["font"], str):
            return f"TextOverlay: font must be a font file's name, not {inputs['font']!r}"
        if isinstance(inputs.get("color"), str):
            try:
                parse_rgba(inputs["color"])
            except ValueError as exc:
                return str(exc)
        elif "color" in inputs:
            return f"TextOverlay: color must be #RRGGBB, #RRGGBBAA or a colour name, not {inputs['color']!r}"
        return None

    def execute(self, images: torch.Tensor, text: str, font: str, font_size: float, color: str, position: str,
                align: str, outline: bool) -> tuple[torch.Tensor]:
        if images.ndim != 4 or images.shape[-1] not in (3, 4):
            raise ValueError(f"TextOverlay: images must be an IMAGE [B, H, W, 3 or 4], got {tuple(images.shape)}")
        if not text.strip():
            return (images,)
        text = text.replace("\\n", "\n").replace("\\t", "\t")  # escapes typed in a one-line field
        rgb, alpha = render_text_layer(images.shape[2], images.shape[1], text, position, align, font, font_size,
                                       parse_rgba(color), (0, 0, 0, 255) if outline else (0, 0, 0, 0))
        rgb, alpha = rgb.to(images.device, images.dtype), alpha.to(images.device, images.dtype)
        if images.shape[-1] == 4:  # source-over onto a transparent picture, its colours not premultiplied
            under, under_alpha = images[..., :3], images[..., 3:]
            out_alpha = alpha + (1.0 - alpha) * under_alpha
            out = rgb * alpha + (1.0 - alpha) * under * under_alpha
            out = torch.where(out_alpha > 1e-5, out / out_alpha, torch.zeros_like(out))
            return (torch.cat((out.clamp(0, 1), out_alpha), dim=-1),)
        return (images * (1.0 - alpha) + rgb * alpha,)


# --- Diffusers folders (nodes.py) --------------------------------------------------------------------------------

DIFFUSERS = "diffusers"
# The weights a diffusers folder may hold, in ComfyUI's order of preference.
DIFFUSION_FILES = ("diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors",
                   "diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.bin")
TEXT_ENCODER_FILES = ("model.fp16.safetensors", "model.safetensors", "pytorch_model.fp16.bin", "pytorch_model.bin")


def diffusers_folders() -> list[str]:
    """The folders under models/diffusers (and extra diffusers folders) that hold a model_index.json, by their path
    there, sorted."""
    found: set[str] = set()
    for root in get_paths().model_dirs(DIFFUSERS):
        for directory, _, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found.add(Path(directory).relative_to(root).as_posix())
    return sorted(found)


def diffusers_folder(name: str) -> Path:
    """The folder a DiffusersLoader value names; it never leads out of the diffusers folders."""
    for root in get_paths().model_dirs(DIFFUSERS):
        folder = (root / name).resolve()
        if name and folder.is_relative_to(root.resolve()) and (folder / "model_index.json").is_file():
            return folder
    where = ", ".join(str(p) for p in get_paths().model_dirs(DIFFUSERS))
    raise FileNotFoundError(f"DiffusersLoader: no diffusers folder {name!r} with a model_index.json (looked in "
                            f"{where})")


def vae_scaling_factor(folder: Path) -> float | None:
    """The latent scale a diffusers VAE's config.json gives (SDXL's 0.13025); None when it gives none."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("scaling_factor")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


class DiffusersLoader(Node):
    """Loads a diffusers folder (models/diffusers/NAME with its model_index.json) as MODEL, CLIP and VAE: the UNet
    of unet/, the text encoders of text_encoder/ and text_encoder_2/, the VAE of vae/. Loom reads SD1.x, SD2.x and
    SDXL folders (the UNet in diffusers' names, the text encoders in transformers' names); others, such as SD3's and
    Flux's (a transformer/ folder), are refused by name: load their files with Load Diffusion Model."""

    category = "advanced/loaders/deprecated"
    model_path = Combo(diffusers_folders, tooltip="a folder in models/diffusers holding a model_index.json",
                       choices_where=lambda: ", ".join(str(p) for p in get_paths().model_dirs(DIFFUSERS)))
    outputs = (Output("MODEL"), Output("CLIP"), Output("VAE"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        try:
            folder = diffusers_folder(str(inputs.get("model_path", "")))
        except FileNotFoundError:
            return None
        return [str(p.stat().st_mtime_ns) for part in ("unet", "vae", "text_encoder", "text_encoder_2")
                if (p := first_file(folder / part, DIFFUSION_FILES + TEXT_ENCODER_FILES)) is not None]

    def execute(self, model_path: str) -> tuple[DiffusionModel, Clip, Vae]:
        from ldm.checkpoint import load_vae
        from ldm.latent_preview import register_vae
        from ldm.parts import load_text_encoders, load_unet
        from ldm.quant import quantize_
        from nodes.sd.loaders import engine_weight_dtypes, shared_model
        from nodes.sd.models import device_and_dtype, file_fingerprint, load_device, schedule_of

        folder = diffusers_folder(model_path)
        unet_path, vae_path = (first_file(folder / part, DIFFUSION_FILES) for part in ("unet", "vae"))
        text_paths = [p for part in ("text_encoder", "text_encoder_2")
                      if (p := first_file(folder / part, TEXT_ENCODER_FILES)) is not None]
        if unet_path is None:
            kind = "a transformer/ folder (an SD3 or Flux model)" if (folder / "transformer").is_dir() else "none"
            raise ValueError(f"DiffusersLoader: {model_path} has no unet/{DIFFUSION_FILES[1]} (it has {kind}); Loom "
                             "loads SD1.x, SD2.x and SDXL diffusers folders: load other models' files with Load "
                             "Diffusion Model, Load CLIP and Load VAE")
        if vae_path is None or not text_paths:
            raise ValueError(f"DiffusersLoader: {model_path} lacks {'vae/' if vae_path is None else 'text_encoder/'}"
                             f"{DIFFUSION_FILES[1] if vae_path is None else TEXT_ENCODER_FILES[1]}")
        weights, te_weights = engine_weight_dtypes(self)
        _, dtype, vae_dtype = device_and_dtype(self.ctx)
        device = load_device(self.ctx)

        def versions(*paths: Path) -> tuple[tuple[str, str], ...]:
            return tuple((str(p), str(file_fingerprint(p))) for p in paths)

        def unet() -> Any:
            loaded = load_unet(unet_path, device=device, dtype=dtype)
            quantize_(loaded.unet, weights)
            if loaded.unused_keys:
                log.warning("%s: %d unused UNet keys, e.g. %s", model_path, len(loaded.unused_keys),
                            loaded.unused_keys[:3])
            return loaded

        def text() -> Any:
            loaded = load_text_encoders(text_paths, device=device, dtype=dtype)
            quantize_(loaded.encoder, te_weights)
            if loaded.unused_keys:
                log.warning("%s: %d unused text-encoder keys, e.g. %s", model_path, len(loaded.unused_keys),
                            loaded.unused_keys[:3])
            return loaded

        loaded = shared_model(self, ("unet", *versions(unet_path), str(device), str(dtype), weights), unet)
        encoders = shared_model(self, ("load_text_encoders", versions(*text_paths), str(device), str(dtype),
                                       te_weights, False), text)
        scale = vae_scaling_factor(vae_path.parent)
        vae = shared_model(self, ("vae", *versions(vae_path), str(device), str(vae_dtype), scale),
                           lambda: load_vae(vae_path, device=device, dtype=vae_dtype, scaling_factor=scale).vae)
        register_vae(vae)
        return (DiffusionModel(loaded.unet, loaded.family, model_path, schedule=schedule_of(loaded.family)),
                Clip(encoders.encoder, encoders.family, model_path), Vae(vae, model_path))


NODES = [MultiGPUCFGSplitNode, SelectModelDeviceNode, SelectCLIPDeviceNode, SelectVAEDeviceNode, PainterNode,
         CurveEditor, ImageHistogram, Ideogram4Scheduler, JoyImageGuidanceRescale, EmptyMochiLatentVideo, TextOverlay,
         DiffusersLoader]
