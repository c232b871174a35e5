"""ResizeImagesByLongerEdge: ComfyUI's sizes (the short side truncated, a square by its height), Pillow's LANCZOS on
8-bit images made by truncation (a reference written here with Pillow on each image), batches, and an editor (UI-format)
workflow as the LTX-2.3 templates save it ([1536])."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.load import graph_from_data
from graph.ui_format import ui_to_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.image_ops import ImageScaleToMaxDimension, ResizeImagesByLongerEdge


def reference(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each image through Pillow as RGB bytes (int(255 * x), clipped), LANCZOS to `size` (width, height), / 255."""
    out = []
    for image in images.numpy():
        pil = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8), mode="RGB")
        out.append(np.asarray(pil.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(out))


# (height, width, longer_edge, (new width, new height)): the templates' 1280x720 at 1536, portrait, a short side
# whose exact value 19.84 truncates to 19 (ImageScaleToMaxDimension rounds it to 20), a square, a downscale
SIZES = [(72, 128, 1536 // 10, (153, 86)), (128, 72, 160, (90, 160)), (31, 50, 32, (32, 19)), (40, 40, 56, (56, 56)),
         (90, 160, 64, (64, 36))]


@pytest.mark.parametrize(("height", "width", "longer_edge", "size"), SIZES)
def test_sizes_and_pixels_are_comfyuis(height, width, longer_edge, size) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, height, width, 3)
    (out,) = ResizeImagesByLongerEdge().execute(images, longer_edge)
    assert out.shape == (2, size[1], size[0], 3) and out.dtype == torch.float32
    assert (out - reference(images, size)).abs().max().item() == 0.0


def test_the_short_side_truncates_where_image_scale_to_max_dimension_rounds() -> None:
    images = torch.rand(1, 31, 50, 3)
    assert ResizeImagesByLongerEdge().execute(images, 32)[0].shape[1:3] == (19, 32)
    assert ImageScaleToMaxDimension().execute(images, "lanczos", 32)[0].shape[1:3] == (20, 32)


def test_same_size_still_quantises_to_8_bits() -> None:
    images = torch.tensor([[[[0.5, 0.2, 1.7], [0.999, -0.1, 0.0]]]])  # 1 x 1 x 2 x 3
    (out,) = ResizeImagesByLongerEdge().execute(images, 2)
    torch.testing.assert_close(out, torch.tensor([[[[127, 51, 255], [254, 0, 0]]]]) / 255.0, rtol=0, atol=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    paths = FolderPaths(base=tmp_path_factory.mktemp("resize_longer_edge"))
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def ui_workflow() -> dict:
    return {
        "last_node_id": 3, "last_link_id": 2,
        "nodes": [
            {"id": 1, "type": "EmptyImage", "pos": [0, 0], "size": [200, 100], "mode": 0, "inputs": [],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}], "widgets_values": [128, 72, 1, 0]},
            {"id": 2, "type": "ResizeImagesByLongerEdge", "pos": [300, 0], "size": [270, 80], "mode": 0,
             "inputs": [{"localized_name": "images", "name": "images", "type": "IMAGE", "link": 1}],
             "outputs": [{"localized_name": "images", "name": "images", "type": "IMAGE", "links": [2]}],
             "widgets_values": [1536]},
            {"id": 3, "type": "PreviewImage", "pos": [600, 0], "size": [200, 100], "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 2}], "outputs": [], "widgets_values": []},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]],
    }


def test_ui_format_workflow_runs(engine) -> None:
    info = engine.registry.get("ResizeImagesByLongerEdge").object_info()
    options = info["input"]["required"]["longer_edge"][1]
    assert (options["default"], options["min"], options["max"]) == (1024, 1, 8192)
    assert ui_to_api(ui_workflow(), engine.registry)["2"]["inputs"] == {"images": ["1", 0], "longer_edge": 1536}
    result = engine.run(graph_from_data(ui_workflow(), engine.registry), keep=["2"])
    assert result.ok, result.error
    assert result.values["2"][0].shape == (1, 864, 1536, 3)
