"""SaveImageAdvanced, ComfyUI's Save Image (Advanced), as its templates call it: PNG at 8 or 16 bits with the
workflow in text chunks, and scene-linear 32-bit float EXR from sRGB, HLG (HDR) or linear input; its dynamic `format`
combo's inputs come as `format.bit_depth` / `format.input_color_space`, or as a UI file's four widget values."""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest
from PIL import Image

from executor.executor import Executor
from graph.document import parse_api
from graph.ui_format import ui_to_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path, bundled_models=None)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def _save(folders, color: tuple[float, float, float], **inputs) -> tuple[dict, object]:
    """Run EmptyImage(4x2 of `color`) -> SaveImageAdvanced(**inputs); the result and the saved file's path."""
    r, g, b = (round(c * 255) for c in color)
    doc = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 2, "batch_size": 1,
                                                       "color": (r << 16) | (g << 8) | b}},
           "2": {"class_type": "SaveImageAdvanced", "inputs": {"images": ["1", 0], "filename_prefix": "adv", **inputs}}}
    result = Executor(builtin_registry()).run(parse_api(doc))
    assert result.ok, result.error
    [saved] = result.outputs["2"]["images"]
    return doc, folders.output / saved["subfolder"] / saved["filename"]


def _decoded(path, codec: str, fmt: str) -> np.ndarray:
    context = av.CodecContext.create(codec, "r")
    [frame] = [*context.decode(av.packet.Packet(path.read_bytes())), *context.decode(None)]
    return frame.to_ndarray(format=fmt)


def test_png_8_bit_is_save_images_png_with_the_workflow(folders) -> None:
    doc, path = _save(folders, (1.0, 0.5, 0.0), format="png", **{"format.bit_depth": "8-bit"})
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (4, 2) and image.getpixel((0, 0)) == (255, 128, 0)
        assert json.loads(image.text["prompt"])["2"]["class_type"] == "SaveImageAdvanced"


def test_png_16_bit_keeps_16_bits_and_the_workflow(folders) -> None:
    _, path = _save(folders, (1.0, 0.5, 0.0), format="png", **{"format.bit_depth": "16-bit"})
    pixels = _decoded(path, "png", "rgb48le")
    assert pixels.shape == (2, 4, 3) and pixels.dtype == np.uint16
    assert tuple(pixels[0, 0]) == (65535, round(128 / 255 * 65535), 0)  # EmptyImage's 8-bit colour, 16 bits wide
    with Image.open(path) as image:
        assert json.loads(image.text["prompt"])["1"]["class_type"] == "EmptyImage"


@pytest.mark.parametrize(("space", "linear"), [
    ("linear", lambda v: v),
    ("sRGB", lambda v: v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4),
    ("HDR", lambda v: v * v / 3 if v <= 0.5 else (math.exp((v - 0.55991073) / 0.17883277) + 0.28466892) / 12),
])
def test_exr_is_scene_linear_float(folders, space, linear) -> None:
    _, path = _save(folders, (1.0, 0.5, 0.2), format="exr", **{"format.input_color_space": space})
    assert path.suffix == ".exr" and path.read_bytes()[:4] == b"v/1\x01"  # OpenEXR's magic number
    pixels = _decoded(path, "exr", "gbrpf32le")
    want = [linear(round(c * 255) / 255) for c in (1.0, 0.5, 0.2)]
    np.testing.assert_allclose(pixels[0, 0], want, rtol=1e-6, atol=1e-7)


def test_a_comfyui_template_node_converts_and_bad_options_are_refused(folders) -> None:
    registry = builtin_registry()
    node = {"id": 469, "type": "SaveImageAdvanced", "pos": [0, 0], "size": [300, 100], "mode": 0,
            "inputs": [{"name": "images", "type": "IMAGE", "link": None}], "outputs": [],
            "widgets_values": ["Qwen_Image_2509", "png", "8-bit", "sRGB"]}
    assert ui_to_api({"nodes": [node], "links": []}, registry)["469"]["inputs"] == {
        "filename_prefix": "Qwen_Image_2509", "format": "png", "format.bit_depth": "8-bit",
        "format.input_color_space": "sRGB"}
    doc = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 2, "batch_size": 1, "color": 0}},
           "2": {"class_type": "SaveImageAdvanced", "inputs": {"images": ["1", 0], "filename_prefix": "x",
                                                               "format": "png", "format.bit_depth": "32-bit float"}}}
    from graph.validate import validate

    [problem] = validate(parse_api(doc), registry).problems
    assert "format.bit_depth: '32-bit float' is not one of 8-bit, 16-bit for png" in str(problem)


def test_rgba_pictures_keep_their_alpha_and_the_images_pass_on(folders) -> None:
    """An RGBA picture (Qwen-Image-Layered's and 2.1's VAEs decode to RGBA) keeps its alpha at 16 bits too; the node
    passes its images on (ComfyUI's templates link its output to ImageCompare)."""
    doc = {"1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 2, "batch_size": 1, "color": 0xFF8000}},
           "2": {"class_type": "SolidMask", "inputs": {"value": 0.25, "width": 4, "height": 2}},
           "3": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["2", 0]}},
           "4": {"class_type": "SaveImageAdvanced", "inputs": {"images": ["3", 0], "filename_prefix": "rgba",
                                                               "format": "png", "format.bit_depth": "16-bit"}},
           "5": {"class_type": "ImageCompare", "inputs": {"image_a": ["3", 0], "image_b": ["4", 0]}}}
    result = Executor(builtin_registry()).run(parse_api(doc), keep=["3", "4"])
    assert result.ok, result.error
    rgba = result.values["3"][0]
    assert rgba.shape[-1] == 4 and result.values["4"][0] is rgba
    [saved] = result.outputs["4"]["images"]
    pixels = _decoded(folders.output / saved["subfolder"] / saved["filename"], "png", "rgba64le")
    np.testing.assert_allclose(pixels / 65535, rgba[0].numpy(), atol=1 / 65535)
