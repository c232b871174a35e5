"""Image and batch utility nodes (nodes/sd/image_utils.py) against hand-computed values, and in a workflow."""

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.image_utils import (
    GetImageSize,
    ImageBlend,
    ImageFlip,
    ImageRotate,
    RebatchImages,
    RebatchLatents,
    ResizeAndPadImage,
)


def run(cls, **inputs):
    return cls().execute(**inputs)


def solid(value, h=2, w=3, channels=3, batch=1):
    return torch.full((batch, h, w, channels), float(value))


# A 2 x 3 single-channel image whose pixels are numbered row by row:
#   1 2 3
#   4 5 6
GRID = torch.tensor([[1.0, 2, 3], [4, 5, 6]])[None, ..., None]


def pixels(image):
    return image[0, ..., 0].tolist()


# --- Interface ------------------------------------------------------------------------------------

# name: (display name, category, required inputs in ComfyUI's order, outputs, output names, output is list)
INTERFACES = {
    "ImageBlend": ("Image Blend", "image/postprocessing", ["image1", "image2", "blend_factor", "blend_mode"],
                   ["IMAGE"], ["IMAGE"], [False]),
    "ImageRotate": ("Rotate", "image/transform", ["image", "rotation"], ["IMAGE"], ["IMAGE"], [False]),
    "ImageFlip": ("ImageFlip", "image/transform", ["image", "flip_method"], ["IMAGE"], ["IMAGE"], [False]),
    "GetImageSize": ("Get Image Size", "image", ["image"], ["INT", "INT", "INT"], ["width", "height", "batch_size"],
                     [False, False, False]),
    "ResizeAndPadImage": ("ResizeAndPadImage", "image/transform",
                          ["image", "target_width", "target_height", "padding_color", "interpolation"],
                          ["IMAGE"], ["IMAGE"], [False]),
    "RebatchImages": ("Rebatch Images", "image/batch", ["images", "batch_size"], ["IMAGE"], ["IMAGE"], [True]),
    "RebatchLatents": ("Rebatch Latents", "latent/batch", ["latents", "batch_size"], ["LATENT"], ["LATENT"],
                       [True]),
}


@pytest.fixture(scope="module")
def registry():
    return builtin_registry()


@pytest.mark.parametrize("name", sorted(INTERFACES))
def test_object_info_matches_comfyui(registry, name):
    display, category, required, outputs, names, is_list = INTERFACES[name]
    info = registry.get(name).object_info()
    assert (info["name"], info["display_name"], info["category"]) == (name, display, category)
    assert info["input_order"] == {"required": required, "optional": []}
    assert (info["output"], info["output_name"], info["output_is_list"]) == (outputs, names, is_list)
    assert info["description"] and not info["output_node"]
    assert registry.get(name).input_is_list == name.startswith("Rebatch")


def test_object_info_widget_options_match_comfyui(registry):
    def options(name, key):
        return registry.get(name).object_info()["input"]["required"][key]

    assert options("ImageBlend", "blend_factor") == ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}]
    assert options("ImageBlend", "blend_mode") == [
        ["normal", "multiply", "screen", "overlay", "soft_light", "difference"], {"default": "normal"}]
    assert options("ImageRotate", "rotation") == [["none", "90 degrees", "180 degrees", "270 degrees"],
                                                  {"default": "none"}]
    assert options("ImageFlip", "flip_method") == [["x-axis: vertically", "y-axis: horizontally"],
                                                   {"default": "x-axis: vertically"}]
    for key in ("target_width", "target_height"):
        assert options("ResizeAndPadImage", key) == ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}]
    assert options("ResizeAndPadImage", "padding_color") == [["white", "black"], {"default": "white"}]
    assert options("ResizeAndPadImage", "interpolation") == [
        ["area", "bicubic", "nearest-exact", "bilinear", "lanczos"], {"default": "area"}]
    for name in ("RebatchImages", "RebatchLatents"):
        assert options(name, "batch_size") == ["INT", {"default": 1, "min": 1, "max": 4096, "step": 1}]


# --- ImageBlend -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "a", "b", "expected"), [
    ("normal", 0.2, 0.6, 0.6),
    ("multiply", 0.2, 0.6, 0.12),
    ("screen", 0.2, 0.6, 0.68),  # 1 - 0.8 * 0.4
    ("overlay", 0.2, 0.6, 0.24),  # dark base: 2ab
    ("overlay", 0.8, 0.6, 0.84),  # light base: 1 - 2(1 - a)(1 - b) = 1 - 2 * 0.2 * 0.4
    ("soft_light", 0.2, 0.2, 0.104),  # b <= 0.5: a - (1 - 2b) a (1 - a) = 0.2 - 0.6 * 0.2 * 0.8
    ("soft_light", 0.2, 0.6, 0.2496),  # b > 0.5, a <= 0.25: D(a) = ((16a - 12)a + 4)a = 0.448; a + 0.2 * 0.248
    ("soft_light", 0.64, 0.75, 0.72),  # b > 0.5, a > 0.25: D(a) = sqrt(a) = 0.8; a + 0.5 * 0.16
    ("difference", 0.7, 0.2, 0.5),
    ("difference", 0.2, 0.6, 0.0),  # signed, as ComfyUI's, then clamped: not |a - b|
])
def test_blend_modes_at_full_factor(mode, a, b, expected):
    (out,) = run(ImageBlend, image1=solid(a), image2=solid(b), blend_factor=1.0, blend_mode=mode)
    assert out.shape == (1, 2, 3, 3)
    torch.testing.assert_close(out, solid(expected))


def test_blend_factor_mixes_image1_with_the_blend():
    (half,) = run(ImageBlend, image1=solid(0.2), image2=solid(0.6), blend_factor=0.5, blend_mode="normal")
    torch.testing.assert_close(half, solid(0.4))
    (quarter,) = run(ImageBlend, image1=solid(0.2), image2=solid(0.6), blend_factor=0.25, blend_mode="multiply")
    torch.testing.assert_close(quarter, solid(0.75 * 0.2 + 0.25 * 0.12))
    (none,) = run(ImageBlend, image1=solid(0.2), image2=solid(0.6), blend_factor=0.0, blend_mode="screen")
    torch.testing.assert_close(none, solid(0.2))


def test_blend_result_is_clamped():
    (out,) = run(ImageBlend, image1=solid(1.5), image2=solid(0.6), blend_factor=0.0, blend_mode="normal")
    assert out.max() == 1.0


def test_blend_resizes_image2_to_image1_with_a_centre_crop():
    """A 4 x 4 image2 cropped to image1's 2:4 aspect keeps its middle two rows, already 4 wide: no resampling."""
    image2 = torch.arange(16.0).reshape(1, 4, 4, 1).expand(1, 4, 4, 3) / 16
    (out,) = run(ImageBlend, image1=solid(0.0, h=2, w=4), image2=image2, blend_factor=1.0, blend_mode="normal")
    assert out.shape == (1, 2, 4, 3)
    torch.testing.assert_close(out, image2[:, 1:3])


def test_blend_resizes_image2_bicubically():
    image2 = torch.rand(1, 3, 5, 3, generator=torch.Generator().manual_seed(0))
    (out,) = run(ImageBlend, image1=solid(0.0, h=6, w=10), image2=image2, blend_factor=1.0, blend_mode="normal")
    expected = torch.nn.functional.interpolate(image2.movedim(-1, 1), size=(6, 10), mode="bicubic",
                                               align_corners=False).movedim(1, -1).clamp(0, 1)
    torch.testing.assert_close(out, expected)


def test_blend_gives_image2_the_channels_of_image1():
    (rgba,) = run(ImageBlend, image1=solid(0.2, channels=4), image2=solid(0.6), blend_factor=1.0,
                  blend_mode="normal")
    assert rgba.shape[-1] == 4
    torch.testing.assert_close(rgba[..., :3], solid(0.6))
    assert (rgba[..., 3] == 1).all()  # image2's missing alpha is opaque
    (rgb,) = run(ImageBlend, image1=solid(0.2), image2=solid(0.6, channels=4), blend_factor=1.0, blend_mode="multiply")
    torch.testing.assert_close(rgb, solid(0.12))


def test_blend_broadcasts_a_single_image_and_refuses_other_batch_mismatches():
    image2 = torch.stack([solid(v)[0] for v in (0.2, 0.4, 0.6)])
    (out,) = run(ImageBlend, image1=solid(0.5), image2=image2, blend_factor=1.0, blend_mode="multiply")
    assert out.shape == (3, 2, 3, 3)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="image1 has 2 images and image2 3"):
        run(ImageBlend, image1=solid(0.5, batch=2), image2=image2, blend_factor=1.0, blend_mode="normal")


# --- ImageRotate and ImageFlip --------------------------------------------------------------------


@pytest.mark.parametrize(("rotation", "expected"), [
    ("none", [[1, 2, 3], [4, 5, 6]]),
    ("90 degrees", [[4, 1], [5, 2], [6, 3]]),  # clockwise
    ("180 degrees", [[6, 5, 4], [3, 2, 1]]),
    ("270 degrees", [[3, 6], [2, 5], [1, 4]]),
])
def test_rotate_turns_clockwise(rotation, expected):
    (out,) = run(ImageRotate, image=GRID, rotation=rotation)
    assert pixels(out) == expected


def test_rotate_agrees_with_torch_rot90_on_a_batch_of_colour_images():
    image = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    for turns, rotation in enumerate(["none", "90 degrees", "180 degrees", "270 degrees"]):
        (out,) = run(ImageRotate, image=image, rotation=rotation)
        # Clockwise is a negative (counter-clockwise) turn from the height axis to the width axis.
        torch.testing.assert_close(out, torch.rot90(image, k=-turns, dims=(1, 2)))


@pytest.mark.parametrize(("method", "expected"), [
    ("x-axis: vertically", [[4, 5, 6], [1, 2, 3]]),
    ("y-axis: horizontally", [[3, 2, 1], [6, 5, 4]]),
])
def test_flip(method, expected):
    (out,) = run(ImageFlip, image=GRID, flip_method=method)
    assert pixels(out) == expected


# --- GetImageSize ---------------------------------------------------------------------------------


def test_get_image_size_is_width_height_batch():
    assert run(GetImageSize, image=torch.zeros(3, 5, 7, 4)) == (7, 5, 3)


# --- ResizeAndPadImage ----------------------------------------------------------------------------


def test_resize_and_pad_scales_to_fit_and_centres_on_white():
    """2 x 4 pixels into 8 x 8: scale min(8/4, 8/2) = 2 gives 8 wide, 4 high; two white rows above and below."""
    image = torch.arange(8.0).reshape(1, 2, 4, 1).expand(1, 2, 4, 3) / 8
    (out,) = run(ResizeAndPadImage, image=image, target_width=8, target_height=8, padding_color="white",
                 interpolation="nearest-exact")
    assert out.shape == (1, 8, 8, 3)
    assert (out[:, :2] == 1).all() and (out[:, 6:] == 1).all()
    # Nearest at twice the size: every pixel becomes a 2 x 2 block.
    torch.testing.assert_close(out[:, 2:6], image.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2))


def test_resize_and_pad_puts_the_odd_pixel_of_padding_after():
    """2 x 4 into 9 wide, 3 high: scale min(9/4, 3/2) = 1.5 gives 6 x 3, one column left and two right."""
    (out,) = run(ResizeAndPadImage, image=solid(0.5, h=2, w=4, channels=4), target_width=9, target_height=3,
                 padding_color="black", interpolation="bilinear")
    assert out.shape == (1, 3, 9, 4)
    inside = torch.zeros(9, dtype=torch.bool)
    inside[1:7] = True
    torch.testing.assert_close(out[0, :, inside], torch.full((3, 6, 4), 0.5))
    assert (out[0, :, ~inside] == 0).all()  # black, and so transparent: the alpha channel is padded with 0 too


@pytest.mark.parametrize("interpolation", ["area", "bicubic", "nearest-exact", "bilinear", "lanczos"])
def test_resize_and_pad_keeps_a_solid_colour_with_every_method(interpolation):
    (out,) = run(ResizeAndPadImage, image=solid(0.4, h=3, w=2, batch=2), target_width=10, target_height=10,
                 padding_color="white", interpolation=interpolation)
    # min(10/2, 10/3): 3 x 2 becomes 10 high and int(2 * 10/3) = 6 wide, at columns 2..7.
    assert out.shape == (2, 10, 10, 3)
    torch.testing.assert_close(out[:, :, 2:8], torch.full((2, 10, 6, 3), 0.4), atol=1 / 255, rtol=0)
    assert (out[:, :, :2] == 1).all() and (out[:, :, 8:] == 1).all()


# --- RebatchImages --------------------------------------------------------------------------------


def numbered(first, count, h=2, w=2):
    """`count` images whose pixels are all first, first + 1, ..."""
    return torch.arange(first, first + count, dtype=torch.float32)[:, None, None, None].expand(count, h, w, 3)


def test_rebatch_images_splits_every_batch_in_order():
    (batches,) = run(RebatchImages, images=[numbered(0, 3), numbered(3, 2)], batch_size=[2])
    assert [b[:, 0, 0, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    (one,) = run(RebatchImages, images=[numbered(0, 3), numbered(3, 2)], batch_size=[8])
    assert len(one) == 1 and one[0][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_rebatch_images_refuses_to_batch_different_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        run(RebatchImages, images=[numbered(0, 1), numbered(1, 1, h=3)], batch_size=[2])
    # Apart, they may differ.
    (batches,) = run(RebatchImages, images=[numbered(0, 1), numbered(1, 1, h=3)], batch_size=[1])
    assert [b.shape[1] for b in batches] == [2, 3]


# --- RebatchLatents -------------------------------------------------------------------------------


def latent(first, count, size=2, **extra):
    samples = torch.arange(first, first + count, dtype=torch.float32)[:, None, None, None].expand(count, 4, size, size)
    return {"samples": samples, **extra}


def test_rebatch_latents_joins_runs_of_one_size_and_numbers_them():
    (batches,) = run(RebatchLatents, latents=[latent(0, 3), latent(3, 2), latent(5, 1, size=3)], batch_size=[2])
    assert [b["samples"][:, 0, 0, 0].tolist() for b in batches] == [[0, 1], [2, 3], [4], [5]]
    assert [b["batch_index"] for b in batches] == [[0, 1], [2, 3], [4], [5]]
    assert [b["samples"].shape[-1] for b in batches] == [2, 2, 2, 3]  # the new size starts a new batch
    assert all("noise_mask" not in b for b in batches)  # no masks, so none made up


def test_rebatch_latents_keeps_given_batch_indices_and_counts_on():
    (batches,) = run(RebatchLatents, latents=[latent(0, 2, batch_index=[7, 9]), latent(2, 2)], batch_size=[3])
    assert [b["batch_index"] for b in batches] == [[7, 9, 2], [3]]


def test_rebatch_latents_carries_noise_masks_with_their_samples():
    """The mask is a pixel-space [1, 8, 8] MASK for 2 x 2 latents: resized to 16 x 16, repeated for both."""
    mask = torch.full((1, 8, 8), 0.5)
    (batches,) = run(RebatchLatents, latents=[latent(0, 3), latent(3, 2, noise_mask=mask)], batch_size=[2])
    assert len(batches) == 3
    assert "noise_mask" not in batches[0]  # all ones: dropped
    first_masked, last = batches[1]["noise_mask"], batches[2]["noise_mask"]
    assert first_masked.shape == (2, 1, 16, 16) and last.shape == (1, 1, 16, 16)
    assert (first_masked[0] == 1).all() and (first_masked[1] == 0.5).all() and (last == 0.5).all()


def test_rebatch_latents_trims_a_mask_batch_longer_than_the_samples():
    masks = torch.stack([torch.full((1, 16, 16), v) for v in (0.1, 0.2, 0.3)])
    (batches,) = run(RebatchLatents, latents=[latent(0, 2, noise_mask=masks)], batch_size=[4])
    assert batches[0]["noise_mask"][:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.2])


# --- In a workflow --------------------------------------------------------------------------------


def test_nodes_run_in_a_workflow_with_list_outputs(tmp_path):
    set_paths(FolderPaths(base=tmp_path))
    try:
        engine = Executor(builtin_registry(), services=Services.create(FolderPaths(base=tmp_path), force_cpu=True))
        graph = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 6, "batch_size": 3, "color": 0x336699}},
            "2": {"class_type": "ImageRotate", "inputs": {"image": ["1", 0], "rotation": "90 degrees"}},
            "3": {"class_type": "ImageFlip", "inputs": {"image": ["2", 0], "flip_method": "y-axis: horizontally"}},
            "4": {"class_type": "ResizeAndPadImage", "inputs": {
                "image": ["3", 0], "target_width": 12, "target_height": 8, "padding_color": "black",
                "interpolation": "area"}},
            "5": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0xFFFFFF}},
            "6": {"class_type": "ImageBlend", "inputs": {"image1": ["4", 0], "image2": ["5", 0],
                                                         "blend_factor": 1.0, "blend_mode": "multiply"}},
            "7": {"class_type": "GetImageSize", "inputs": {"image": ["6", 0]}},
            "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
            "9": {"class_type": "RebatchImages", "inputs": {"images": ["6", 0], "batch_size": 2}},
            "10": {"class_type": "GetImageSize", "inputs": {"image": ["9", 0]}},  # runs once per batch
            "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 2]}},
            "12": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 5}},
            "13": {"class_type": "RebatchLatents", "inputs": {"latents": ["12", 0], "batch_size": 2}},
            "14": {"class_type": "RebatchLatents", "inputs": {"latents": ["13", 0], "batch_size": 4}},
            "15": {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}},
        }
        result = engine.run(parse_api(graph), keep=["6", "14"])
        assert result.ok, result.error
        blended = result.values["6"][0]
        # 8 x 6 turned to 6 wide, 8 high fits 12 x 8 at scale 1: black columns 0..2 and 9..11 around it.
        assert blended.shape == (3, 8, 12, 3)
        torch.testing.assert_close(blended[:, :, 3:9], torch.tensor([0x33, 0x66, 0x99]).div(255).expand(3, 8, 6, 3))
        assert (blended[:, :, :3] == 0).all() and (blended[:, :, 9:] == 0).all()
        assert result.outputs["8"] == {"text": ["12"]}
        assert result.outputs["11"] == {"text": ["2", "1"]}
        latents = result.values["14"][0]
        assert [b["samples"].shape[0] for b in latents] == [4, 1]
        assert [b["batch_index"] for b in latents] == [[0, 1, 2, 3], [4]]
    finally:
        set_paths(FolderPaths())
