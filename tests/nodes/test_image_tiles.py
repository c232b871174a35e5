"""Tile and YUV nodes (nodes/sd/image_tiles.py): the tile grid against hand-worked boxes, the merge against an
independent numpy weighting, the YUV planes against the BT.601-style formulas, a split -> per-tile node -> merge
workflow, the declarations and bad input."""

import numpy as np
import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.image_tiles import (
    ImageAddNoise,
    ImageMergeTileList,
    ImageRGBToYUV,
    ImageYUVToRGB,
    SplitImageToTileList,
    tile_grid,
)


def run(cls, **inputs):
    return cls().execute(**inputs)


def ramp(batch=1, h=70, w=100, channels=3):
    torch.manual_seed(0)
    return torch.rand(batch, h, w, channels)


# --- The grid -------------------------------------------------------------------------------------------------


def test_grid_strides_by_tile_minus_overlap_and_pins_the_last_tile_to_the_edge():
    # 100 x 70, tiles 64 x 64, overlap 16: stride 48; the second column and row are pulled back to end at the edge.
    assert tile_grid(100, 70, 64, 64, 16) == [(0, 0, 64, 64), (36, 0, 100, 64), (0, 6, 64, 70), (36, 6, 100, 70)]
    # An overlap above three quarters of the tile leaves the stride at a quarter tile: 64 / 4 = 16.
    assert [box[0] for box in tile_grid(100, 64, 64, 64, 60)] == [0, 16, 32, 36]
    # No overlap: tiles side by side; a tile larger than the image is the whole image.
    assert tile_grid(128, 64, 64, 64, 0) == [(0, 0, 64, 64), (64, 0, 128, 64)]
    assert tile_grid(40, 30, 64, 64, 8) == [(0, 0, 40, 30)]
    # The stride is rounded: 0.25 * 66 = 16.5 rounds (half to even) to 16.
    assert [box[0] for box in tile_grid(70, 66, 66, 66, 60)] == [0, 4]
    assert [box[0] for box in tile_grid(120, 66, 66, 66, 60)] == [0, 16, 32, 48, 54]


def test_split_gives_each_box_of_the_grid_in_order():
    image = ramp(batch=2)
    (tiles,) = run(SplitImageToTileList, image=image, tile_width=64, tile_height=64, overlap=16)
    boxes = tile_grid(100, 70, 64, 64, 16)
    assert len(tiles) == len(boxes)
    for tile, (x0, y0, x1, y1) in zip(tiles, boxes, strict=True):
        assert tile.shape == (2, 64, 64, 3)
        torch.testing.assert_close(tile, image[:, y0:y1, x0:x1])


# --- The merge ------------------------------------------------------------------------------------------------


def numpy_merge(tiles, width, height, overlap):
    """An independent transcription of the merge: each tile weighted by sin(pi i / (n - 1)) per axis (floored at
    1e-5), or by 1 without overlap, summed and divided by the summed weights."""
    th, tw = tiles[0].shape[1:3]
    canvas = np.zeros((tiles[0].shape[0], height, width, tiles[0].shape[3]))
    weights = np.zeros((tiles[0].shape[0], height, width, 1))
    wy = np.maximum(np.sin(np.pi * np.arange(th) / (th - 1)), 1e-5) if overlap else np.ones(th)
    wx = np.maximum(np.sin(np.pi * np.arange(tw) / (tw - 1)), 1e-5) if overlap else np.ones(tw)
    window = np.outer(wy, wx)[None, ..., None]
    for tile, (x0, y0, x1, y1) in zip(tiles, tile_grid(width, height, tw, th, overlap), strict=False):
        canvas[:, y0:y1, x0:x1] += tile.numpy() * window[:, :y1 - y0, :x1 - x0]
        weights[:, y0:y1, x0:x1] += window[:, :y1 - y0, :x1 - x0]
    weights[weights == 0] = 1
    return canvas / weights


def test_merge_feathers_overlapping_tiles_with_a_sine_window():
    torch.manual_seed(1)
    tiles = [torch.rand(1, 64, 64, 3) for _ in range(4)]  # distinct content, so the weighting shows
    (merged,) = run(ImageMergeTileList, image_list=tiles, final_width=[100], final_height=[70], overlap=[16])
    assert merged.shape == (1, 70, 100, 3)
    np.testing.assert_allclose(merged.numpy(), numpy_merge(tiles, 100, 70, 16), rtol=1e-5, atol=1e-5)
    # Where only the first tile lies (top left corner), its own pixels come back.
    torch.testing.assert_close(merged[:, :6, :36], tiles[0][:, :6, :36])


def test_merge_without_overlap_places_tiles_and_leaves_uncovered_pixels_black():
    tiles = [torch.full((1, 64, 64, 3), 0.25), torch.full((1, 64, 64, 3), 0.75)]
    (merged,) = run(ImageMergeTileList, image_list=tiles, final_width=[128], final_height=[128], overlap=[0])
    assert (merged[:, :64, :64] == 0.25).all() and (merged[:, :64, 64:] == 0.75).all()
    assert (merged[:, 64:] == 0).all()  # the second row of the grid has no tiles


def test_split_then_merge_gives_the_image_back():
    image = ramp()
    (tiles,) = run(SplitImageToTileList, image=image, tile_width=64, tile_height=64, overlap=24)
    (merged,) = run(ImageMergeTileList, image_list=tiles, final_width=[100], final_height=[70], overlap=[24])
    torch.testing.assert_close(merged, image)


def test_split_process_merge_workflow(tmp_path):
    set_paths(FolderPaths(base=tmp_path))
    try:
        engine = Executor(builtin_registry(), services=Services.create(FolderPaths(base=tmp_path), force_cpu=True))
        graph = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 160, "height": 96, "batch_size": 1,
                                                         "color": 0x336699}},
            "2": {"class_type": "SplitImageToTileList", "inputs": {"image": ["1", 0], "tile_width": 64,
                                                                   "tile_height": 64, "overlap": 16}},
            "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},  # runs once per tile
            "4": {"class_type": "ImageMergeTileList", "inputs": {"image_list": ["3", 0], "final_width": 160,
                                                                 "final_height": 96, "overlap": 16}},
            "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        }
        result = engine.run(parse_api(graph), keep=["2", "4"])
        assert result.ok, result.error
        assert len(result.values["2"][0]) == len(tile_grid(160, 96, 64, 64, 16)) == 6
        merged = result.values["4"][0]
        expected = 1 - torch.tensor([0x33, 0x66, 0x99]).div(255)
        torch.testing.assert_close(merged, expected.expand(1, 96, 160, 3), atol=1e-5, rtol=0)
    finally:
        set_paths(FolderPaths())


def test_merge_refuses_tiles_of_another_batch_size():
    tiles = [torch.zeros(1, 64, 64, 3), torch.zeros(2, 64, 64, 3)]
    with pytest.raises(ValueError, match="ImageMergeTileList.*batch size"):
        run(ImageMergeTileList, image_list=tiles, final_width=[128], final_height=[64], overlap=[0])
    with pytest.raises(ValueError, match="ImageMergeTileList.*empty"):
        run(ImageMergeTileList, image_list=[], final_width=[128], final_height=[64], overlap=[0])


# --- YUV ------------------------------------------------------------------------------------------------------


def test_rgb_to_yuv_planes_follow_the_ycbcr_formulas():
    image = ramp(h=4, w=5, channels=4)  # the alpha channel is dropped
    y, u, v = run(ImageRGBToYUV, image=image)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    for plane, want in ((y, luma), (u, 0.564 * (b - luma) + 0.5), (v, 0.713 * (r - luma) + 0.5)):
        assert plane.shape == (1, 4, 5, 3)
        for channel in range(3):  # a grey image: the plane in every channel
            torch.testing.assert_close(plane[..., channel], want)


def test_yuv_to_rgb_inverts_the_split_and_averages_each_plane():
    image = ramp(h=4, w=5) * 0.8 + 0.1  # inside the gamut, away from any clamp
    y, u, v = run(ImageRGBToYUV, image=image)
    (back,) = run(ImageYUVToRGB, Y=y, U=u, V=v)
    torch.testing.assert_close(back, image, atol=5e-4, rtol=0)  # kornia's inverse coefficients are rounded
    # Each plane is read as the mean of its first three channels.
    coloured_y = torch.cat([y[..., :1] * 0.5, y[..., :1] * 1.5, y[..., :1], torch.zeros_like(y[..., :1])], dim=-1)
    (same,) = run(ImageYUVToRGB, Y=coloured_y, U=u, V=v)
    torch.testing.assert_close(same, back)


def test_yuv_to_rgb_refuses_planes_of_different_sizes():
    with pytest.raises(ValueError, match="ImageYUVToRGB.*one batch size, height and width"):
        run(ImageYUVToRGB, Y=torch.zeros(1, 4, 4, 3), U=torch.zeros(1, 4, 5, 3), V=torch.zeros(1, 4, 4, 3))


# --- Noise ----------------------------------------------------------------------------------------------------


def test_add_noise_is_the_seeded_torch_stream_scaled_and_clamped():
    image = torch.full((2, 3, 4, 3), 0.5)
    (noisy,) = run(ImageAddNoise, image=image, seed=42, strength=0.1)
    torch.manual_seed(42)  # ComfyUI seeds the global CPU generator
    expected = torch.clamp(image + 0.1 * torch.randn(image.size()), 0, 1)
    torch.testing.assert_close(noisy, expected)
    (strong,) = run(ImageAddNoise, image=image, seed=42, strength=1.0)
    assert strong.min() == 0 and strong.max() == 1  # clamped
    (zero,) = run(ImageAddNoise, image=image, seed=7, strength=0.0)
    torch.testing.assert_close(zero, image)


# --- Declarations ---------------------------------------------------------------------------------------------


def test_declarations_match_comfyui():
    info = builtin_registry().object_info()
    split = info["SplitImageToTileList"]
    assert split["input_order"]["required"] == ["image", "tile_width", "tile_height", "overlap"]
    assert {"default": 1024, "min": 64, "max": 16384}.items() <= split["input"]["required"]["tile_width"][1].items()
    assert {"default": 128, "min": 0, "max": 4096}.items() <= split["input"]["required"]["overlap"][1].items()
    assert split["output_is_list"] == [True] and split["category"] == "image/batch"
    merge = info["ImageMergeTileList"]
    assert merge["input_order"]["required"] == ["image_list", "final_width", "final_height", "overlap"]
    assert {"default": 1024, "min": 64, "max": 32768}.items() <= merge["input"]["required"]["final_width"][1].items()
    assert merge["output_is_list"] == [False]
    assert info["ImageRGBToYUV"]["output_name"] == ["Y", "U", "V"]
    assert info["ImageYUVToRGB"]["input_order"]["required"] == ["Y", "U", "V"]
    assert info["ImageRGBToYUV"]["category"] == info["ImageYUVToRGB"]["category"] == "image/color"
    noise = info["ImageAddNoise"]
    assert noise["input_order"]["required"] == ["image", "seed", "strength"]
    assert noise["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert noise["input"]["required"]["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF
    strength = noise["input"]["required"]["strength"][1]
    assert {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}.items() <= strength.items()
    assert noise["category"] == "image/filters"
