"""ComfyUI's Save Image (Advanced): PNG at 8 or 16 bits and scene-linear 32-bit float EXR, the workflow in the PNGs.

ComfyUI declares `format` as a dynamic combo whose choice brings its own inputs; its API prompts carry them as
`format.bit_depth` and `format.input_color_space`, and its editor stores the widgets as [filename_prefix, format,
bit_depth, input_color_space]. Loom takes those undeclared inputs as they come (`accept_all_inputs`).
"""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from typing import Any

import torch

from nodes.folders import get_paths, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.imageio import png_bytes, workflow_metadata
from nodes.spec import Combo, Output, Socket, String

# Each format's bit depths and input colour spaces, the first of each the default (ComfyUI's).
FORMATS = {"png": (("8-bit", "16-bit"), ("sRGB",)), "exr": (("32-bit float",), ("sRGB", "HDR", "linear"))}


class SaveImageAdvanced(Node):
    """Saves images as 8- or 16-bit PNGs carrying the workflow (RGBA images with their alpha), or as 32-bit float EXRs
    in scene-linear light (the input read as sRGB, as HLG-encoded HDR, or as already linear; colour only), and passes
    the images on, as ComfyUI's node does."""

    display_name = "Save Image (Advanced)"
    category = "image"
    output_node = True
    accept_all_inputs = True
    images = Socket("IMAGE")
    filename_prefix = String("ComfyUI", tooltip="file name prefix; may include a sub-folder, e.g. 'cats/cat'")
    format = Combo(list(FORMATS), tooltip="png: 8 or 16 bits (format.bit_depth); exr: 32-bit float, scene-linear "
                   "(format.input_color_space: sRGB, HDR or linear)")
    outputs = (Output("IMAGE", "images", tooltip="the images saved, passed on"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any]:
        names = ("filename_prefix", "format", "format.bit_depth", "format.input_color_space")
        return dict(zip(names, values, strict=False))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        fmt = inputs.get("format", "png")
        if fmt not in FORMATS:
            return f"format: {fmt!r} is not one of {', '.join(FORMATS)}"
        depths, spaces = FORMATS[fmt]
        for key, allowed in (("format.bit_depth", depths), ("format.input_color_space", spaces)):
            if key in inputs and inputs[key] not in allowed:
                return f"{key}: {inputs[key]!r} is not one of {', '.join(allowed)} for {fmt}"
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, images: torch.Tensor, filename_prefix: str, format: str = "png", **options: Any) -> NodeResult:
        depths, spaces = FORMATS[format]
        depth = options.get("format.bit_depth", depths[0])
        space = options.get("format.input_color_space", spaces[0])
        text, results = workflow_metadata(self.ctx), []
        for image in images:
            if format == "png":
                data = _png(image, depth, text)
            else:
                data = _exr(_linear(image[..., :3], space))
            with new_output_file(get_paths().output, filename_prefix, f".{format}") as (path, handle, subfolder):
                handle.write(data)
            results.append({"filename": path.name, "subfolder": subfolder, "type": "output"})
        return NodeResult(ui={"images": results}, outputs=(images,))


def _png(image: torch.Tensor, depth: str, text: dict[str, str]) -> bytes:
    if depth == "8-bit":
        return png_bytes(image, text)
    # 16 bits per channel: Pillow writes no 16-bit RGB(A) PNG, FFmpeg's encoder does (it writes no text chunks).
    alpha = image.shape[-1] == 4  # an RGBA VAE's pictures (Qwen-Image-Layered's, 2.1's) keep their alpha
    pixels = (image[..., :4 if alpha else 3].clamp(0, 1) * 65535).round().to(torch.int32).numpy().astype("uint16")
    formats = ("rgba64le", "rgba64be") if alpha else ("rgb48le", "rgb48be")
    return _with_text(_encoded("png", pixels, *formats), text)


def _with_text(png: bytes, text: dict[str, str]) -> bytes:
    """`png` with tEXt chunks inserted after its IHDR chunk (8-byte signature, 25-byte IHDR)."""
    chunks = b""
    for key, value in text.items():
        body = key.encode("latin-1") + b"\0" + value.encode("latin-1", "replace")
        chunks += struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return png[:33] + chunks + png[33:]


def _linear(image: torch.Tensor, space: str) -> torch.Tensor:
    """Scene-linear light from the input's encoding: sRGB's inverse EOTF, HLG's inverse OETF (BT.2100), or none."""
    x = image.float()
    if space == "sRGB":
        return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0) + 0.055) / 1.055) ** 2.4)
    if space == "HDR":
        a, b, c = 0.17883277, 0.28466892, 0.55991073
        return torch.where(x <= 0.5, x * x / 3, (torch.exp((x - c) / a) + b) / 12)
    return x


def _exr(linear: torch.Tensor) -> bytes:
    return _encoded("exr", linear.contiguous().numpy(), "gbrpf32le", "gbrpf32le")  # PyAV takes [H, W, RGB]


def _encoded(codec_name: str, array: Any, frame_format: str, pix_fmt: str) -> bytes:
    """One picture ([H, W, 3]) through FFmpeg's image encoder (PyAV); the packet is the file."""
    import av

    codec = av.CodecContext.create(codec_name, "w")
    codec.width, codec.height, codec.pix_fmt = array.shape[1], array.shape[0], pix_fmt
    codec.time_base = Fraction(1, 1)
    frame = av.VideoFrame.from_ndarray(array, format=frame_format)
    if frame_format != pix_fmt:
        frame = frame.reformat(format=pix_fmt)
    frame.pts, frame.time_base = 0, codec.time_base
    return b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])


NODES = [SaveImageAdvanced]
