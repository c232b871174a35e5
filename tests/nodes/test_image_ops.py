"""Image utility nodes (nodes/sd/image_ops.py) and animated savers (nodes/sd/animation.py) against hand-computed
values, Pillow and kornia."""

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.animation import SaveAnimatedPNG, SaveAnimatedWEBP
from nodes.sd.image_ops import (
    ImageColorToMask,
    ImageQuantize,
    ImageScaleToMaxDimension,
    ImageStitch,
    JoinImageWithAlpha,
    Morphology,
    PorterDuffImageComposite,
    SplitImageWithAlpha,
    bayer_matrix,
)

PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {}}}
WORKFLOW = {"nodes": [{"id": 1}]}


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def run(cls, **inputs):
    node = cls()
    node.ctx = NodeContext(extra={"prompt": PROMPT, "extra_pnginfo": {"workflow": WORKFLOW}})
    return node.execute(**inputs)


def solid(color, h=2, w=3, batch=1):
    return torch.tensor(color, dtype=torch.float32).expand(batch, h, w, len(color)).clone()


def random_image(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# --- Interface ------------------------------------------------------------------------------------

# name: (required inputs in ComfyUI's order, optional inputs, category, outputs)
INTERFACES = {
    "ImageQuantize": (["image", "colors", "dither"], [], "image/postprocessing", ["IMAGE"]),
    "Morphology": (["image", "operation", "kernel_size"], [], "image/postprocessing", ["IMAGE"]),
    "PorterDuffImageComposite": (["source", "source_alpha", "destination", "destination_alpha", "mode"], [],
                                 "mask/compositing", ["IMAGE", "MASK"]),
    "SplitImageWithAlpha": (["image"], [], "mask/compositing", ["IMAGE", "MASK"]),
    "JoinImageWithAlpha": (["image", "alpha"], [], "mask/compositing", ["IMAGE"]),
    "ImageColorToMask": (["image", "color"], [], "mask", ["MASK"]),
    "ImageScaleToMaxDimension": (["image", "upscale_method", "largest_size"], [], "image/upscaling", ["IMAGE"]),
    "ImageStitch": (["image1", "direction", "match_image_size", "spacing_width", "spacing_color"], ["image2"],
                    "image/transform", ["IMAGE"]),
    "SaveAnimatedWEBP": (["images", "filename_prefix", "fps", "lossless", "quality", "method"], [],
                         "image/animation", []),
    "SaveAnimatedPNG": (["images", "filename_prefix", "fps", "compress_level"], [], "image/animation", []),
}


@pytest.fixture(scope="module")
def registry():
    return builtin_registry()


@pytest.mark.parametrize("name", sorted(INTERFACES))
def test_object_info_has_comfyui_inputs_in_order(registry, name):
    required, optional, category, outputs = INTERFACES[name]
    info = registry.get(name).object_info()
    assert info["name"] == name and info["category"] == category
    assert info["input_order"] == {"required": required, "optional": optional}
    assert info["output"] == outputs and info["description"]
    assert info["output_node"] == name.startswith("SaveAnimated")


def test_object_info_widget_options_match_comfyui(registry):
    def options(name, key):
        info = registry.get(name).object_info()["input"]
        return (info["required"] | info["optional"])[key]

    assert options("ImageQuantize", "colors") == ["INT", {"default": 256, "min": 1, "max": 256, "step": 1}]
    assert options("ImageQuantize", "dither")[0] == ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8",
                                                     "bayer-16"]
    assert options("Morphology", "operation")[0] == ["erode", "dilate", "open", "close", "gradient", "bottom_hat",
                                                     "top_hat"]
    assert options("Morphology", "kernel_size") == ["INT", {"default": 3, "min": 3, "max": 999, "step": 1}]
    assert options("PorterDuffImageComposite", "mode") == [
        ["ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN", "MULTIPLY",
         "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR"], {"default": "DST"}]
    assert options("ImageColorToMask", "color") == ["INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1,
                                                            "display": "number"}]
    assert options("ImageScaleToMaxDimension", "largest_size") == ["INT", {"default": 512, "min": 0, "max": 16384,
                                                                           "step": 1}]
    assert options("ImageStitch", "direction") == [["right", "down", "left", "up"], {"default": "right"}]
    assert options("ImageStitch", "spacing_width") == ["INT", {"default": 0, "min": 0, "max": 1024, "step": 2}]
    assert options("ImageStitch", "spacing_color") == [["white", "black", "red", "green", "blue"],
                                                       {"default": "white"}]
    assert options("SaveAnimatedWEBP", "fps") == ["FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}]
    assert options("SaveAnimatedWEBP", "quality") == ["INT", {"default": 80, "min": 0, "max": 100, "step": 1}]
    assert options("SaveAnimatedWEBP", "method") == [["default", "fastest", "slowest"], {"default": "default"}]
    assert options("SaveAnimatedPNG", "compress_level") == ["INT", {"default": 4, "min": 0, "max": 9, "step": 1}]


# --- Quantize -------------------------------------------------------------------------------------


def test_bayer_matrix_is_the_classic_ordered_dither_map():
    """Against the closed form: index(i, j) = bit-reverse of the interleaved bits of (i XOR j) and i."""
    for order in (2, 4, 8, 16):
        bits = order.bit_length() - 1
        index = np.zeros((order, order))
        for i in range(order):
            for j in range(order):
                woven = sum((((i ^ j) >> k) & 1) << (2 * k) | ((i >> k) & 1) << (2 * k + 1) for k in range(bits))
                index[i, j] = int(format(woven, f"0{2 * bits}b")[::-1], 2)
        np.testing.assert_allclose(bayer_matrix(order), (index + 0.5) / order ** 2 - 0.5)
    assert bayer_matrix(2).tolist() == [[-0.375, 0.125], [0.375, -0.125]]


def test_quantize_truncates_to_8_bits_and_keeps_few_colours_exactly():
    """Five colours fit a 256-colour palette unchanged; like ComfyUI the 8-bit values are truncated, not rounded."""
    colours = torch.tensor([[0.1, 0.2, 0.9], [0.5, 0.5, 0.5], [0.999, 0.0, 0.3], [0.33, 0.66, 0.99], [0, 0, 0]])
    picks = torch.randint(0, 5, (2, 7, 9), generator=torch.Generator().manual_seed(0))
    image = colours[picks]
    out = run(ImageQuantize, image=image, colors=256, dither="none")[0]
    assert torch.equal(out, torch.floor(image * 255) / 255)


@pytest.mark.parametrize("dither", ["none", "floyd-steinberg"])
def test_quantize_maps_to_pillows_median_cut_palette(dither):
    image = random_image(1, 2, 11, 13, 3)
    out = run(ImageQuantize, image=image, colors=6, dither=dither)[0]
    for item, result in zip(image, out, strict=True):
        rgb = Image.fromarray((item * 255).to(torch.uint8).numpy())
        palette = rgb.quantize(colors=6)
        method = Image.Dither.FLOYDSTEINBERG if dither != "none" else Image.Dither.NONE
        expected = np.asarray(rgb.quantize(palette=palette, dither=method).convert("RGB"))
        assert torch.equal(result, torch.from_numpy(expected.astype(np.float32) / 255))
        assert len(torch.unique(result.reshape(-1, 3), dim=0)) <= 6


@pytest.mark.parametrize("order", [2, 4, 8, 16])
def test_bayer_dither_shifts_pixels_by_the_tiled_threshold_map_before_mapping(order):
    """An 11x13 image (not a multiple of the map) dithered by hand: pixel (y, x) + spread * map[y % n, x % n]."""
    image = random_image(2, 1, 11, 13, 3)
    out = run(ImageQuantize, image=image, colors=5, dither=f"bayer-{order}")[0][0]
    rgb = (image[0] * 255).to(torch.uint8).numpy()
    palette = Image.fromarray(rgb).quantize(colors=5)
    spread = 512 / (len(palette.getpalette()) // 3)
    shifted = np.empty(rgb.shape, dtype=np.uint8)
    for y in range(11):
        for x in range(13):
            threshold = spread * bayer_matrix(order)[y % order, x % order] + 0.5
            shifted[y, x] = np.clip(rgb[y, x] + threshold, 0, 255).astype(np.uint8)
    expected = np.asarray(Image.fromarray(shifted).quantize(palette=palette, dither=Image.Dither.NONE).convert("RGB"))
    assert torch.equal(out, torch.from_numpy(expected.astype(np.float32) / 255))


def test_quantize_keeps_alpha_and_refuses_grey_images():
    image = torch.cat([random_image(3, 1, 4, 4, 3), torch.full((1, 4, 4, 1), 0.25)], dim=-1)
    out = run(ImageQuantize, image=image, colors=2, dither="bayer-4")[0]
    assert out.shape == (1, 4, 4, 4) and torch.equal(out[..., 3], image[..., 3])
    with pytest.raises(ValueError, match=r"ImageQuantize needs an RGB image .* got shape \(1, 4, 4, 1\)"):
        run(ImageQuantize, image=torch.zeros(1, 4, 4, 1), colors=2, dither="none")


# --- Morphology -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [3, 4, 7])
@pytest.mark.parametrize("operation", ["erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat"])
def test_morphology_matches_kornia(operation, kernel_size):
    """kornia.morphology (what ComfyUI's node calls) with a square of ones and its default geodesic border."""
    from kornia import morphology

    reference = {"erode": morphology.erosion, "dilate": morphology.dilation, "open": morphology.opening,
                 "close": morphology.closing, "gradient": morphology.gradient, "top_hat": morphology.top_hat,
                 "bottom_hat": morphology.bottom_hat}[operation]
    image = random_image(4, 2, 9, 12, 3)
    out = run(Morphology, image=image, operation=operation, kernel_size=kernel_size)[0]
    expected = reference(image.movedim(-1, 1), torch.ones(kernel_size, kernel_size)).movedim(1, -1)
    torch.testing.assert_close(out, expected)


def test_morphology_by_hand():
    dot = torch.zeros(1, 7, 7, 1)
    dot[0, 3, 3] = 1
    dilated = run(Morphology, image=dot, operation="dilate", kernel_size=3)[0]
    assert dilated[0, 2:5, 2:5].min() == 1 and dilated.sum() == 9
    assert torch.equal(run(Morphology, image=dilated, operation="erode", kernel_size=3)[0], dot)
    # Beyond the edges counts for nothing: eroding a white image leaves it white.
    assert run(Morphology, image=torch.ones(1, 4, 5, 3), operation="erode", kernel_size=5)[0].min() == 1
    # An even square reaches one pixel further up/left when dilating (scipy's and kornia 0.9's convention).
    dot = torch.zeros(1, 6, 7, 1)
    dot[0, 2, 3] = 1
    assert run(Morphology, image=dot, operation="dilate", kernel_size=4)[0][0, :, :, 0].nonzero().tolist() == [
        [r, c] for r in range(0, 4) for c in range(1, 5)]


# --- Compositing ----------------------------------------------------------------------------------


def composite(mode, src=(1.0, 0.0, 0.0), src_mask=0.5, dst=(0.0, 0.0, 1.0), dst_mask=0.75):
    image, mask = run(PorterDuffImageComposite, source=solid(src, 1, 1), source_alpha=torch.full((1, 1, 1), src_mask),
                      destination=solid(dst, 1, 1), destination_alpha=torch.full((1, 1, 1), dst_mask), mode=mode)
    return image.flatten().tolist(), mask.item()


def test_porter_duff_modes_by_hand():
    """Red at alpha 0.5 (mask 0.5) over blue at alpha 0.25 (mask 0.75); results un-premultiplied, alpha as a mask."""
    approx = pytest.approx
    assert composite("XOR") == (approx([0.75, 0, 0.25]), approx(0.5))  # alpha .75*.5 + .5*.25
    assert composite("DST_IN") == (approx([0, 0, 1]), approx(1 - 0.125))
    assert composite("ADD") == (approx([2 / 3, 0, 1 / 3]), approx(0.25))
    assert composite("SRC_ATOP") == (approx([0.5, 0, 0.5]), approx(0.75))  # (.25 * .5 red + .5 * .25 blue) / .25
    assert composite("CLEAR") == ([0, 0, 0], 1)
    assert composite("SRC") == ([1, 0, 0], 0.5) and composite("DST") == ([0, 0, 1], 0.75)


def test_porter_duff_source_over_matches_pillows_alpha_composite():
    rng = np.random.RandomState(5)
    src, dst = (rng.randint(0, 256, (6, 8, 4)).astype(np.uint8) for _ in range(2))
    src[..., 3], dst[..., 3] = rng.randint(32, 256, (6, 8)), rng.randint(32, 256, (6, 8))
    expected = np.asarray(Image.alpha_composite(Image.fromarray(dst), Image.fromarray(src))) / 255.0

    def split(rgba):
        tensor = torch.from_numpy(rgba.astype(np.float32) / 255)[None]
        return tensor[..., :3], 1 - tensor[..., 3]

    (source, source_mask), (destination, destination_mask) = split(src), split(dst)
    image, mask = run(PorterDuffImageComposite, source=source, source_alpha=source_mask, destination=destination,
                      destination_alpha=destination_mask, mode="SRC_OVER")
    np.testing.assert_allclose(image[0].numpy(), expected[..., :3], atol=2 / 255)
    np.testing.assert_allclose(1 - mask[0].numpy(), expected[..., 3], atol=2 / 255)


def test_porter_duff_fits_sizes_and_batches_as_comfyui_and_refuses_other_channel_counts():
    image, mask = run(PorterDuffImageComposite, source=solid((1.0, 0, 0), 4, 4, batch=3),
                      source_alpha=torch.zeros(2, 2, 2), destination=solid((0, 0, 1.0), 6, 8, batch=4),
                      destination_alpha=torch.full((2, 3, 4), 0.5), mode="SRC_OVER")
    assert image.shape == (2, 6, 8, 3) and mask.shape == (2, 6, 8)  # the shortest batch; the destination's size
    torch.testing.assert_close(image, solid((1.0, 0, 0), 6, 8, batch=2))
    torch.testing.assert_close(mask, torch.zeros(2, 6, 8))
    with pytest.raises(ValueError, match="the source has 4 channels and the destination 3"):
        run(PorterDuffImageComposite, source=torch.zeros(1, 2, 2, 4), source_alpha=torch.zeros(1, 2, 2),
            destination=torch.zeros(1, 2, 2, 3), destination_alpha=torch.zeros(1, 2, 2), mode="SRC")


def test_split_and_join_alpha_use_masks_of_one_minus_alpha():
    rgba = random_image(6, 2, 5, 4, 4)
    rgb, mask = run(SplitImageWithAlpha, image=rgba)
    assert torch.equal(rgb, rgba[..., :3]) and torch.equal(mask, 1 - rgba[..., 3])
    torch.testing.assert_close(run(JoinImageWithAlpha, image=rgb, alpha=mask)[0], rgba)
    _, opaque = run(SplitImageWithAlpha, image=rgba[..., :3])
    assert torch.equal(opaque, torch.zeros(2, 5, 4))
    # A mask of another size is stretched to the image; the shorter batch decides the count.
    joined = run(JoinImageWithAlpha, image=solid((0.2, 0.4, 0.6, 0.9), 6, 8, batch=3),
                 alpha=torch.full((1, 3, 2), 0.25))[0]
    assert joined.shape == (1, 6, 8, 4)
    torch.testing.assert_close(joined[0, 0, 0], torch.tensor([0.2, 0.4, 0.6, 0.75]))


def test_image_color_to_mask_matches_8_bit_rgb_exactly():
    image = torch.tensor([[[1.0, 128 / 255, 0.0], [1.0, 127 / 255, 0.0], [1.2, 128.4 / 255, -0.1]]])[None]
    assert run(ImageColorToMask, image=image, color=0xFF8000)[0].tolist() == [[[1.0, 0.0, 1.0]]]
    with pytest.raises(ValueError, match="ImageColorToMask needs an RGB image"):
        run(ImageColorToMask, image=torch.zeros(1, 2, 2, 1), color=0)


# --- Resizing and stitching -----------------------------------------------------------------------


def test_scale_to_max_dimension_fits_the_longer_side():
    def size(h, w, largest, method="bilinear", channels=3):
        return tuple(run(ImageScaleToMaxDimension, image=torch.rand(1, h, w, channels), upscale_method=method,
                         largest_size=largest)[0].shape[1:])

    assert size(20, 30, 15) == (10, 15, 3) and size(30, 20, 15) == (15, 10, 3) and size(8, 8, 24) == (24, 24, 3)
    assert size(20, 30, 0) == (20, 30, 3)  # 0 leaves the image as it is
    assert size(20, 30, 45, "lanczos", 4) == (30, 45, 4)  # lanczos keeps alpha
    image = torch.arange(16.0).view(1, 4, 4, 1).expand(1, 4, 4, 3) / 16
    area = run(ImageScaleToMaxDimension, image=image, upscale_method="area", largest_size=2)[0][0, :, :, 0] * 16
    assert area.tolist() == [[2.5, 4.5], [10.5, 12.5]]  # means of the 2x2 blocks
    constant = run(ImageScaleToMaxDimension, image=solid((0.2, 0.6, 1.0, 0.4), 6, 9), upscale_method="lanczos",
                   largest_size=5)[0]
    torch.testing.assert_close(constant, solid((0.2, 0.6, 1.0, 0.4), 3, 5), atol=1 / 255, rtol=0)


RED, BLUE, WHITE, BLACK = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)


def stitch(image1, image2, direction="right", match=False, spacing=0, color="white"):
    return run(ImageStitch, image1=image1, direction=direction, match_image_size=match, spacing_width=spacing,
               spacing_color=color, image2=image2)[0]


def columns(image):
    """The colour of each column of the first image's top row."""
    return [tuple(c) for c in image[0, 0].tolist()]


def test_stitch_places_image2_by_direction_with_an_even_gap():
    red, blue = solid(RED, 2, 3), solid(BLUE, 2, 2)
    assert columns(stitch(red, blue)) == [RED] * 3 + [BLUE] * 2
    assert columns(stitch(red, blue, "left", spacing=1)) == [BLUE] * 2 + [WHITE] * 2 + [RED] * 3  # 1 -> 2
    down = stitch(red, solid(BLUE, 1, 3), "up", spacing=2, color="green")
    assert [tuple(r) for r in down[0, :, 0].tolist()] == [BLUE, (0, 1, 0), (0, 1, 0), RED, RED]
    assert stitch(red, None) is red


def test_stitch_matches_sizes_or_pads_centred():
    red = solid(RED, 2, 3)
    matched = stitch(red, solid(BLUE, 4, 4), match=True)  # 4x4 -> height 2, width 2
    assert matched.shape == (1, 2, 5, 3) and columns(matched) == [RED] * 3 + [BLUE] * 2
    stacked = stitch(red, solid(BLUE, 4, 4), "down", match=True)  # -> width 3, height 3
    assert stacked.shape == (1, 5, 3, 3)
    padded = stitch(red, solid(BLUE, 4, 1), spacing=2, color="white")
    assert padded.shape == (1, 4, 6, 3)
    assert [tuple(r) for r in padded[0, :, 0].tolist()] == [WHITE, RED, RED, WHITE]  # white gap: white padding
    padded = stitch(red, solid(BLUE, 4, 1), color="red")
    assert [tuple(r) for r in padded[0, :, 0].tolist()] == [BLACK, RED, RED, BLACK]  # other gaps: black


def test_stitch_evens_out_batches_and_channels():
    red = solid(RED, 2, 2)
    blues = torch.cat([solid(BLUE + (0.5,), 2, 2), solid((0.0, 1.0, 0.0, 0.5), 2, 2)])
    out = stitch(red, blues, spacing=2)
    assert out.shape == (2, 2, 6, 4)
    assert [tuple(c) for c in out[1, 0].tolist()] == [RED + (1.0,)] * 2 + [WHITE + (1.0,)] * 2 + [(0, 1, 0, 0.5)] * 2


# --- Animations -----------------------------------------------------------------------------------


def frames_of(path, mode):
    with Image.open(path) as image:
        frames, durations = [], []
        for i in range(image.n_frames):
            image.seek(i)
            image.load()
            durations.append(image.info["duration"])
            frames.append(np.asarray(image.convert(mode)))
        return frames, durations


def eight_bit(images):
    return [(image.numpy() * 255).round().astype(np.uint8) for image in images]


def test_save_animated_webp_writes_one_lossless_animation_with_the_workflow(folders):
    images = random_image(7, 3, 8, 10, 3)
    result = run(SaveAnimatedWEBP, images=images, filename_prefix="anim/clip", fps=6.0, lossless=True, quality=80,
                 method="default")
    assert result.ui == {"images": [{"filename": "clip_00001_.webp", "subfolder": "anim", "type": "output"}],
                         "animated": [True]}
    from graph.load import load_workflow_data

    assert load_workflow_data(folders.output / "anim" / "clip_00001_.webp") == PROMPT  # read back from the EXIF
    assert result.outputs == ()
    path = folders.output / "anim" / "clip_00001_.webp"
    frames, durations = frames_of(path, "RGB")
    assert durations == [166] * 3  # int(1000 / 6)
    for frame, expected in zip(frames, eight_bit(images), strict=True):
        assert np.array_equal(frame, expected)
    with Image.open(path) as image:
        exif = image.getexif()
    assert exif[0x0110] == "prompt:" + json.dumps(PROMPT) and exif[0x010F] == "workflow:" + json.dumps(WORKFLOW)
    again = run(SaveAnimatedWEBP, images=images[:2], filename_prefix="anim/clip", fps=0.5, lossless=False,
                quality=50, method="fastest")
    assert again.ui["images"][0]["filename"] == "clip_00002_.webp"
    assert frames_of(folders.output / "anim" / "clip_00002_.webp", "RGB")[1] == [2000, 2000]
    # One image is saved, but not announced as an animation.
    single = run(SaveAnimatedWEBP, images=images[:1], filename_prefix="anim/clip", fps=6.0, lossless=True,
                 quality=80, method="slowest")
    assert single.ui == {"images": [{"filename": "clip_00003_.webp", "subfolder": "anim", "type": "output"}]}


def png_chunks(path):
    data = path.read_bytes()[8:]
    chunks = []
    while data:
        length, kind = struct.unpack(">I4s", data[:8])
        chunks.append((kind, data[8:8 + length]))
        data = data[12 + length:]
    return chunks


def test_save_animated_png_writes_an_apng_with_comfyuis_workflow_chunks(folders):
    images = random_image(8, 4, 6, 5, 4)
    result = run(SaveAnimatedPNG, images=images, filename_prefix="apng", fps=4.0, compress_level=9)
    assert result.ui == {"images": [{"filename": "apng_00001_.png", "subfolder": "", "type": "output"}],
                         "animated": [True]}
    path = folders.output / "apng_00001_.png"
    frames, durations = frames_of(path, "RGBA")
    assert durations == [250] * 4
    for frame, expected in zip(frames, eight_bit(images), strict=True):
        assert np.array_equal(frame, expected)
    chunks = png_chunks(path)
    kinds = [kind for kind, _ in chunks]
    comf = [body for kind, body in chunks if kind == b"comf"]
    assert comf == [b"prompt\0" + json.dumps(PROMPT).encode(), b"workflow\0" + json.dumps(WORKFLOW).encode()]
    assert kinds.index(b"comf") > kinds.index(b"IDAT")
    from graph.load import load_workflow_data

    assert load_workflow_data(path) == PROMPT  # `main.py run` reads the workflow back


def test_animation_savers_refuse_an_empty_batch_and_an_escaping_prefix(folders):
    with pytest.raises(ValueError, match="needs a batch of at least one image"):
        run(SaveAnimatedPNG, images=torch.zeros(0, 4, 4, 3), filename_prefix="x", fps=6.0, compress_level=4)
    with pytest.raises(ValueError, match="must be a relative name inside the output folder"):
        run(SaveAnimatedWEBP, images=torch.zeros(2, 4, 4, 3), filename_prefix="../x", fps=6.0, lossless=True,
            quality=80, method="default")
    assert not list(folders.base.rglob("*.webp")) and not list(folders.base.rglob("*.png"))


# --- Through the executor -------------------------------------------------------------------------


def test_every_node_runs_in_a_workflow(tmp_path):
    set_paths(FolderPaths(base=tmp_path))
    try:
        engine = Executor(builtin_registry(), services=Services.create(FolderPaths(base=tmp_path), force_cpu=True))
        def empty(color):
            return {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 6, "batch_size": 1, "color": color}}

        graph = {  # an orange and a blue image
            "0": empty(0xFF8000), "00": empty(0x0000FF),
            "1": {"class_type": "ImageBatch", "inputs": {"image1": ["0", 0], "image2": ["00", 0]}},
            "2": {"class_type": "ImageQuantize", "inputs": {"image": ["1", 0], "colors": 4, "dither": "bayer-2"}},
            "3": {"class_type": "Morphology", "inputs": {"image": ["2", 0], "operation": "close", "kernel_size": 3}},
            "4": {"class_type": "ImageStitch", "inputs": {"image1": ["3", 0], "direction": "right",
                                                          "match_image_size": True, "spacing_width": 2,
                                                          "spacing_color": "black", "image2": ["1", 0]}},
            "5": {"class_type": "ImageColorToMask", "inputs": {"image": ["4", 0], "color": 0xFF8000}},
            "6": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["4", 0], "alpha": ["5", 0]}},
            "7": {"class_type": "SplitImageWithAlpha", "inputs": {"image": ["6", 0]}},
            "8": {"class_type": "PorterDuffImageComposite", "inputs": {
                "source": ["7", 0], "source_alpha": ["7", 1], "destination": ["4", 0], "destination_alpha": ["5", 0],
                "mode": "SRC_OVER"}},
            "9": {"class_type": "ImageScaleToMaxDimension", "inputs": {"image": ["8", 0], "upscale_method": "lanczos",
                                                                       "largest_size": 9}},
            "10": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["9", 0], "filename_prefix": "wf",
                                                                "fps": 10.0, "lossless": True, "quality": 80,
                                                                "method": "fastest"}},
            "11": {"class_type": "SaveAnimatedPNG", "inputs": {"images": ["9", 0], "filename_prefix": "wf",
                                                               "fps": 10.0, "compress_level": 1}},
        }
        result = engine.run(parse_api(graph), keep=["5", "9"])
        assert result.ok, result.error
        mask, scaled = result.values["5"][0], result.values["9"][0]
        # The orange image is orange (0xFF8000) everywhere but the black gap, columns 8 and 9 of the 18.
        assert mask.shape == (2, 6, 18) and mask[0, :, 8:10].sum() == 0 and mask[0].sum() == 6 * 16
        assert mask[1].sum() == 0
        assert scaled.shape == (2, 3, 9, 3)
        assert result.outputs["10"]["images"][0]["filename"] == "wf_00001_.webp"
        assert result.outputs["11"]["images"][0]["filename"] == "wf_00001_.png"
        with Image.open(tmp_path / "output" / "wf_00001_.png") as apng:
            assert apng.n_frames == 2 and apng.size == (9, 3)
    finally:
        set_paths(FolderPaths())
