"""ImageScaleToTotalPixels' resolution_steps (ComfyUI's newer input): each side rounded to a multiple of it, as
ComfyUI rounds it; a UI-format file's third widget value reaches it, and files saved before it existed still load."""

import torch

from graph.ui_format import ui_to_api
from nodes.registry import builtin_registry
from nodes.sd.image import ImageScaleToTotalPixels


def test_sides_are_rounded_to_the_resolution_steps() -> None:
    image = torch.rand(1, 300, 400, 3)
    (scaled,) = ImageScaleToTotalPixels().execute(image, "bilinear", 1.0, 16)
    assert scaled.shape == (1, 880, 1184, 3)  # 887.7 and 1182.4 px to multiples of 16, as ComfyUI gives
    (plain,) = ImageScaleToTotalPixels().execute(image, "bilinear", 1.0)
    assert plain.shape == (1, 887, 1182, 3)


def test_ui_files_with_and_without_the_widget() -> None:
    registry = builtin_registry()

    def convert(widgets: list) -> dict:
        node = {"id": 2, "type": "ImageScaleToTotalPixels", "pos": [0, 0], "size": [300, 100], "mode": 0,
                "inputs": [{"name": "image", "type": "IMAGE", "link": None}],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}], "widgets_values": widgets}
        return ui_to_api({"nodes": [node], "links": []}, registry)["2"]["inputs"]

    assert convert(["lanczos", 1, 32]) == {"upscale_method": "lanczos", "megapixels": 1, "resolution_steps": 32}
    assert convert(["lanczos", 1])["megapixels"] == 1
