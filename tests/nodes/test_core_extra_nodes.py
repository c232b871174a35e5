"""ComfyUI core latent, image and mask nodes: their `/object_info` interface and their values."""

import pytest
import torch
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.image import (
    EmptyImage,
    ImageBatch,
    ImageBlur,
    ImageCompositeMasked,
    ImageCrop,
    ImageFromBatch,
    ImageInvert,
    ImageScaleBy,
    ImageSharpen,
    LoadImageMask,
    RepeatImageBatch,
)
from nodes.sd.latent import (
    LatentBatch,
    LatentBlend,
    LatentComposite,
    LatentCompositeMasked,
    LatentCrop,
    LatentFlip,
    LatentFromBatch,
    LatentRotate,
    RepeatLatentBatch,
)
from nodes.sd.mask import CropMask, FeatherMask, GrowMask, InvertMask, MaskComposite, SolidMask, ThresholdMask


def run(cls, **inputs):
    node = cls()
    node.ctx = NodeContext()
    return node.execute(**inputs)


def latent(x, **extra):
    return {"samples": x, **extra}


# --- Interface ------------------------------------------------------------------------------------

# name: (required inputs in ComfyUI's order, optional inputs, category, outputs)
INTERFACES = {
    "RepeatLatentBatch": (["samples", "amount"], [], "latent/batch", ["LATENT"]),
    "LatentFromBatch": (["samples", "batch_index", "length"], [], "latent/batch", ["LATENT"]),
    "LatentBatch": (["samples1", "samples2"], [], "latent/batch", ["LATENT"]),
    "LatentComposite": (["samples_to", "samples_from", "x", "y", "feather"], [], "latent", ["LATENT"]),
    "LatentCompositeMasked": (["destination", "source", "x", "y", "resize_source"], ["mask"], "latent", ["LATENT"]),
    "LatentBlend": (["samples1", "samples2", "blend_factor"], [], "_for_testing", ["LATENT"]),
    "LatentFlip": (["samples", "flip_method"], [], "latent/transform", ["LATENT"]),
    "LatentRotate": (["samples", "rotation"], [], "latent/transform", ["LATENT"]),
    "LatentCrop": (["samples", "width", "height", "x", "y"], [], "latent/transform", ["LATENT"]),
    "ImageScaleBy": (["image", "upscale_method", "scale_by"], [], "image/upscaling", ["IMAGE"]),
    "ImageInvert": (["image"], [], "image", ["IMAGE"]),
    "ImageBatch": (["image1", "image2"], [], "image", ["IMAGE"]),
    "EmptyImage": (["width", "height", "batch_size", "color"], [], "image", ["IMAGE"]),
    "ImageCrop": (["image", "width", "height", "x", "y"], [], "image/transform", ["IMAGE"]),
    "RepeatImageBatch": (["image", "amount"], [], "image/batch", ["IMAGE"]),
    "ImageFromBatch": (["image", "batch_index", "length"], [], "image/batch", ["IMAGE"]),
    "ImageCompositeMasked": (["destination", "source", "x", "y", "resize_source"], ["mask"], "image", ["IMAGE"]),
    "LoadImageMask": (["image", "channel"], [], "mask", ["MASK"]),
    "ImageBlur": (["image", "blur_radius", "sigma"], [], "image/postprocessing", ["IMAGE"]),
    "ImageSharpen": (["image", "sharpen_radius", "sigma", "alpha"], [], "image/postprocessing", ["IMAGE"]),
    "SolidMask": (["value", "width", "height"], [], "mask", ["MASK"]),
    "InvertMask": (["mask"], [], "mask", ["MASK"]),
    "CropMask": (["mask", "x", "y", "width", "height"], [], "mask", ["MASK"]),
    "MaskComposite": (["destination", "source", "x", "y", "operation"], [], "mask", ["MASK"]),
    "FeatherMask": (["mask", "left", "top", "right", "bottom"], [], "mask", ["MASK"]),
    "GrowMask": (["mask", "expand", "tapered_corners"], [], "mask", ["MASK"]),
    "ThresholdMask": (["mask", "value"], [], "mask", ["MASK"]),
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
    assert list(info["input"]["required"]) == required and list(info["input"]["optional"]) == optional
    assert info["output"] == outputs and info["output_name"] == outputs
    assert info["description"]


def test_object_info_widget_options_match_comfyui(registry):
    def options(name, key):
        info = registry.get(name).object_info()["input"]
        return (info["required"] | info["optional"])[key]

    assert options("EmptyImage", "color") == ["INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1,
                                                      "display": "color"}]
    assert options("LatentFromBatch", "batch_index") == ["INT", {"default": 0, "min": 0, "max": 63, "step": 1}]
    assert options("LatentComposite", "feather") == ["INT", {"default": 0, "min": 0, "max": 16384, "step": 8}]
    assert options("LatentCrop", "width") == ["INT", {"default": 512, "min": 64, "max": 16384, "step": 8}]
    assert options("LatentBlend", "blend_factor") == ["FLOAT", {"default": 0.5, "min": 0, "max": 1, "step": 0.01}]
    assert options("LatentFlip", "flip_method")[0] == ["x-axis: vertically", "y-axis: horizontally"]
    assert options("LatentRotate", "rotation")[0] == ["none", "90 degrees", "180 degrees", "270 degrees"]
    assert options("ImageScaleBy", "scale_by") == ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}]
    assert options("ImageScaleBy", "upscale_method")[0] == ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
    assert options("ImageFromBatch", "batch_index") == ["INT", {"default": 0, "min": 0, "max": 4095, "step": 1}]
    assert options("ImageCompositeMasked", "resize_source") == ["BOOLEAN", {"default": False}]
    assert options("ImageCompositeMasked", "mask") == ["MASK", {}]
    assert options("LoadImageMask", "channel")[0] == ["alpha", "red", "green", "blue"]
    assert options("LoadImageMask", "image")[1] == {"image_upload": True}
    assert options("ImageBlur", "sigma") == ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}]
    assert options("ImageSharpen", "alpha") == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01}]
    assert options("MaskComposite", "operation")[0] == ["multiply", "add", "subtract", "and", "or", "xor"]
    assert options("GrowMask", "expand") == ["INT", {"default": 0, "min": -16384, "max": 16384, "step": 1}]
    assert options("GrowMask", "tapered_corners") == ["BOOLEAN", {"default": True}]
    assert options("ThresholdMask", "value") == ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}]


# --- Latent ---------------------------------------------------------------------------------------


def batch_of(n, h=2, w=2):
    """n latents, latent i filled with the value i."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, h, w).clone()


def test_repeat_latent_batch_repeats_samples_masks_and_batch_index():
    masks = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    out = run(RepeatLatentBatch, samples=latent(batch_of(2), noise_mask=masks, batch_index=[3, 5]), amount=3)[0]
    assert out["samples"][:, 0, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert out["noise_mask"][:, 0, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]
    assert out["batch_index"] == [3, 5, 6, 8, 9, 11]  # each copy shifted past the last index
    single = torch.ones(1, 1, 2, 2)
    out = run(RepeatLatentBatch, samples=latent(batch_of(1), noise_mask=single), amount=2)[0]
    assert out["noise_mask"] is single and "batch_index" not in out


def test_latent_from_batch_slices_samples_masks_and_sets_batch_index():
    masks = torch.stack([torch.full((1, 2, 2), 10.0), torch.full((1, 2, 2), 11.0)])
    source = latent(batch_of(5), noise_mask=masks, other="kept")
    out = run(LatentFromBatch, samples=source, batch_index=1, length=2)[0]
    assert out["samples"][:, 0, 0, 0].tolist() == [1, 2]
    assert out["noise_mask"][:, 0, 0, 0].tolist() == [11, 10]  # masks cycle over the batch
    assert out["batch_index"] == [1, 2] and out["other"] == "kept"
    # Past the end: the last latent, the length clipped; an existing batch_index is sliced.
    out = run(LatentFromBatch, samples=latent(batch_of(5), batch_index=[10, 11, 12, 13, 14]), batch_index=63,
              length=3)[0]
    assert out["samples"][:, 0, 0, 0].tolist() == [4] and out["batch_index"] == [14]
    one_mask = torch.ones(1, 1, 2, 2)
    assert torch.equal(run(LatentFromBatch, samples=latent(batch_of(3), noise_mask=one_mask), batch_index=0,
                           length=2)[0]["noise_mask"], one_mask)


def test_latent_batch_resizes_the_second_and_joins_batch_indices():
    s1 = latent(torch.zeros(1, 4, 4, 4), batch_index=[7])
    s2 = latent(torch.full((2, 4, 2, 2), 0.5))
    out = run(LatentBatch, samples1=s1, samples2=s2)[0]
    assert out["samples"].shape == (3, 4, 4, 4)
    torch.testing.assert_close(out["samples"][1:], torch.full((2, 4, 4, 4), 0.5))
    assert out["batch_index"] == [7, 0, 1]
    with pytest.raises(ValueError, match="channels"):
        run(LatentBatch, samples1=s1, samples2=latent(torch.zeros(1, 16, 4, 4)))


def test_latent_composite_places_source_at_x_y_over_8():
    dest = latent(torch.zeros(1, 4, 8, 8), noise_mask=torch.ones(1, 1, 8, 8))
    out = run(LatentComposite, samples_to=dest, samples_from=latent(torch.ones(1, 4, 2, 3)), x=16, y=8, feather=0)[0]
    expected = torch.zeros(1, 4, 8, 8)
    expected[:, :, 1:3, 2:5] = 1
    assert torch.equal(out["samples"], expected) and "noise_mask" in out
    assert dest["samples"].sum() == 0  # the input is not changed
    # Clipped at the right edge, and a source wholly outside changes nothing.
    out = run(LatentComposite, samples_to=dest, samples_from=latent(torch.ones(1, 4, 2, 3)), x=56, y=0, feather=0)[0]
    assert out["samples"][0, 0, :2, 7].tolist() == [1, 1] and out["samples"].sum() == 4 * 2
    out = run(LatentComposite, samples_to=dest, samples_from=latent(torch.ones(1, 4, 2, 3)), x=64, y=0, feather=0)[0]
    assert out["samples"].sum() == 0


def test_latent_composite_feathers_inner_edges():
    dest = latent(torch.zeros(1, 4, 8, 8))
    out = run(LatentComposite, samples_to=dest, samples_from=latent(torch.ones(1, 4, 4, 4)), x=16, y=16,
              feather=16)[0]["samples"][0, 0]
    ramp = torch.tensor([0.5, 1, 1, 0.5])
    torch.testing.assert_close(out[2:6, 2:6], ramp[:, None] * ramp[None, :])
    assert out.sum() == pytest.approx(ramp.sum() ** 2)
    # At the top-left corner only the inner (bottom and right) edges fade.
    out = run(LatentComposite, samples_to=dest, samples_from=latent(torch.ones(1, 4, 4, 4)), x=0, y=0,
              feather=16)[0]["samples"][0, 0]
    ramp = torch.tensor([1, 1, 1, 0.5])
    torch.testing.assert_close(out[:4, :4], ramp[:, None] * ramp[None, :])


def test_latent_composite_masked_with_and_without_mask():
    dest = latent(torch.zeros(2, 4, 8, 8))
    source = latent(torch.ones(1, 4, 4, 4))
    out = run(LatentCompositeMasked, destination=dest, source=source, x=8, y=8, resize_source=False)[0]["samples"]
    expected = torch.zeros(2, 4, 8, 8)
    expected[:, :, 1:5, 1:5] = 1
    assert torch.equal(out, expected)
    mask = torch.zeros(4, 4)  # a bare [H, W] mask: the left half
    mask[:, :2] = 1
    out = run(LatentCompositeMasked, destination=dest, source=source, x=8, y=8, resize_source=False,
              mask=mask)[0]["samples"]
    expected = torch.zeros(2, 4, 8, 8)
    expected[:, :, 1:5, 1:3] = 1
    assert torch.equal(out, expected)
    out = run(LatentCompositeMasked, destination=dest, source=source, x=32, y=0, resize_source=True)[0]["samples"]
    assert out[:, :, :, 4:].min() == 1 and out[:, :, :, :4].max() == 0  # resized to 8x8, then placed at x=4


def test_latent_blend_weights_samples1_by_the_factor():
    s1, s2 = latent(torch.ones(1, 4, 4, 4), noise_mask=torch.ones(1, 1, 4, 4)), latent(torch.zeros(1, 4, 2, 2))
    out = run(LatentBlend, samples1=s1, samples2=s2, blend_factor=0.25)[0]
    torch.testing.assert_close(out["samples"], torch.full((1, 4, 4, 4), 0.25))
    assert "noise_mask" in out


def test_latent_flip_rotate_and_crop():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 4, 2, 2)
    flipped = run(LatentFlip, samples=latent(x), flip_method="x-axis: vertically")[0]["samples"][0, 0]
    assert flipped.tolist() == [[3, 4], [1, 2]]
    flipped = run(LatentFlip, samples=latent(x), flip_method="y-axis: horizontally")[0]["samples"][0, 0]
    assert flipped.tolist() == [[2, 1], [4, 3]]
    rotated = {r: run(LatentRotate, samples=latent(x), rotation=r)[0]["samples"][0, 0].tolist()
               for r in ["none", "90 degrees", "180 degrees", "270 degrees"]}
    assert rotated == {"none": [[1, 2], [3, 4]], "90 degrees": [[3, 1], [4, 2]],
                       "180 degrees": [[4, 3], [2, 1]], "270 degrees": [[2, 4], [1, 3]]}
    grid = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16).expand(1, 4, 16, 16)
    out = run(LatentCrop, samples=latent(grid), width=64, height=72, x=16, y=8)[0]["samples"]
    assert torch.equal(out, grid[..., 1:10, 2:10])
    # A start within the last 64 px moves back so that 64 px remain.
    out = run(LatentCrop, samples=latent(grid), width=512, height=64, x=120, y=0)[0]["samples"]
    assert torch.equal(out, grid[..., 0:8, 8:16])


# --- Image ----------------------------------------------------------------------------------------


def test_image_scale_by_and_invert():
    image = torch.rand(2, 4, 6, 3)
    out = run(ImageScaleBy, image=image, upscale_method="nearest-exact", scale_by=0.5)[0]
    assert out.shape == (2, 2, 3, 3)
    torch.testing.assert_close(out, image[:, 1::2, 1::2])
    assert run(ImageScaleBy, image=image, upscale_method="bilinear", scale_by=1.5)[0].shape == (2, 6, 9, 3)
    torch.testing.assert_close(run(ImageInvert, image=image)[0], 1 - image)


def test_image_batch_resizes_image2_to_image1():
    image1, image2 = torch.zeros(1, 4, 6, 3), torch.full((2, 8, 8, 3), 0.5)
    out = run(ImageBatch, image1=image1, image2=image2)[0]
    assert out.shape == (3, 4, 6, 3)
    torch.testing.assert_close(out[1:], torch.full((2, 4, 6, 3), 0.5))
    # Centre crop to image1's aspect first: the left and right columns of image2 are dropped.
    image2 = torch.zeros(1, 4, 8, 3)
    image2[:, :, 2:6] = 1
    out = run(ImageBatch, image1=torch.zeros(1, 4, 4, 3), image2=image2)[0]
    assert torch.equal(out[1], torch.ones(4, 4, 3))
    out = run(ImageBatch, image1=torch.zeros(1, 4, 4, 4), image2=torch.zeros(1, 4, 4, 3))[0]
    assert out.shape == (2, 4, 4, 4) and out[1, ..., 3].min() == 1  # an opaque alpha added


def test_empty_image_colour():
    out = run(EmptyImage, width=5, height=3, batch_size=2, color=0xFF8001)[0]
    assert out.shape == (2, 3, 5, 3)
    torch.testing.assert_close(out[1, 2, 4], torch.tensor([1.0, 128 / 255, 1 / 255]))
    assert torch.equal(out, out[:1, :1, :1].expand_as(out))


def test_image_crop_clamps_the_start():
    image = torch.arange(4 * 6, dtype=torch.float32).view(1, 4, 6, 1).expand(1, 4, 6, 3)
    assert torch.equal(run(ImageCrop, image=image, width=2, height=3, x=1, y=1)[0], image[:, 1:4, 1:3])
    out = run(ImageCrop, image=image, width=512, height=512, x=100, y=100)[0]
    assert torch.equal(out, image[:, 3:, 5:])  # the last pixel, as ComfyUI


def test_repeat_image_batch_and_image_from_batch():
    image = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 2, 3)
    assert run(RepeatImageBatch, image=image, amount=2)[0][:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2]
    assert run(ImageFromBatch, image=image, batch_index=1, length=5)[0][:, 0, 0, 0].tolist() == [1, 2]
    assert run(ImageFromBatch, image=image, batch_index=4095, length=1)[0][:, 0, 0, 0].tolist() == [2]


def test_image_composite_masked():
    dest, source = torch.zeros(1, 6, 6, 3), torch.ones(1, 2, 2, 4)  # an RGBA source: its alpha is dropped
    out = run(ImageCompositeMasked, destination=dest, source=source, x=5, y=1, resize_source=False)[0]
    expected = torch.zeros(1, 6, 6, 3)
    expected[:, 1:3, 5] = 1
    assert torch.equal(out, expected)
    mask = torch.tensor([[[1.0, 0.0], [0.25, 0.0]]])
    out = run(ImageCompositeMasked, destination=dest, source=source, x=0, y=0, resize_source=False, mask=mask)[0]
    assert out[0, :2, :2, 0].tolist() == [[1.0, 0.0], [0.25, 0.0]] and out[0, 2:].max() == 0


def test_load_image_mask_channels(tmp_path):
    set_paths(FolderPaths(base=tmp_path))
    try:
        (tmp_path / "input").mkdir(parents=True, exist_ok=True)
        image = Image.new("RGBA", (3, 2), (255, 0, 51, 255))
        image.putpixel((2, 1), (0, 102, 0, 0))
        image.save(tmp_path / "input" / "m.png")
        Image.new("RGB", (3, 2), (10, 20, 30)).save(tmp_path / "input" / "rgb.png")
        alpha = run(LoadImageMask, image="m.png", channel="alpha")[0]
        assert alpha.shape == (1, 2, 3) and alpha[0, 1, 2] == 1 and alpha[0, 0, 0] == 0  # 1 - alpha
        assert run(LoadImageMask, image="m.png", channel="red")[0][0].tolist() == [[1, 1, 1], [1, 1, 0]]
        assert run(LoadImageMask, image="m.png", channel="green")[0][0, 1, 2] == pytest.approx(0.4)
        assert run(LoadImageMask, image="m.png", channel="blue")[0][0, 0, 0] == pytest.approx(0.2)
        assert run(LoadImageMask, image="rgb.png", channel="alpha")[0].abs().max() == 0  # opaque everywhere
        assert LoadImageMask.fingerprint({"image": "m.png"}) != LoadImageMask.fingerprint({"image": "rgb.png"})
        with pytest.raises(FileNotFoundError):
            run(LoadImageMask, image="missing.png", channel="red")
    finally:
        set_paths(FolderPaths())


def reference_gaussian(size, sigma):
    """ComfyUI's kernel, written out: exp(-d^2 / 2 sigma^2) over a grid from -1 to 1, normalised."""
    step = 2 / (size - 1)
    values = [[2.718281828459045 ** (-(((i * step - 1) ** 2 + (j * step - 1) ** 2) / (2 * sigma ** 2)))
               for j in range(size)] for i in range(size)]
    kernel = torch.tensor(values)
    return kernel / kernel.sum()


def test_image_blur_is_a_normalised_gaussian():
    flat = torch.full((1, 8, 8, 3), 0.3)
    torch.testing.assert_close(run(ImageBlur, image=flat, blur_radius=2, sigma=1.0)[0], flat)
    impulse = torch.zeros(1, 9, 9, 3)
    impulse[0, 4, 4] = 1
    out = run(ImageBlur, image=impulse, blur_radius=2, sigma=0.5)[0]
    torch.testing.assert_close(out[0, 2:7, 2:7, 1], reference_gaussian(5, 0.5))
    assert out[0, :2].abs().max() == 0 and out.sum() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="blur_radius 4 must be smaller"):
        run(ImageBlur, image=torch.zeros(1, 4, 8, 3), blur_radius=4, sigma=1.0)


def test_image_sharpen_kernel():
    flat = torch.full((1, 6, 6, 3), 0.4)
    torch.testing.assert_close(run(ImageSharpen, image=flat, sharpen_radius=1, sigma=1.0, alpha=1.0)[0], flat)
    image = torch.full((1, 7, 7, 3), 0.5)
    image[0, 3, 3] = 0.6
    out = run(ImageSharpen, image=image, sharpen_radius=1, sigma=1.0, alpha=0.1)[0]
    g = reference_gaussian(3, 1.0).tolist()
    # kernel = -alpha * 10 * g, its centre raised so that it sums to 1
    assert out[0, 3, 3, 0] == pytest.approx(0.5 + 0.1 * (1 + 1.0 - g[1][1]), abs=1e-6)
    assert out[0, 3, 4, 0] == pytest.approx(0.5 - 0.1 * g[1][2], abs=1e-6)
    assert out[0, 3, 5, 0] == pytest.approx(0.5, abs=1e-6)
    strong = run(ImageSharpen, image=image, sharpen_radius=1, sigma=1.0, alpha=5.0)[0]
    assert strong.min() >= 0 and strong.max() <= 1  # clamped


# --- Mask -----------------------------------------------------------------------------------------


def test_solid_invert_threshold_and_crop_mask():
    solid = run(SolidMask, value=0.25, width=3, height=2)[0]
    assert solid.shape == (1, 2, 3) and solid.unique().tolist() == [0.25]
    mask = torch.tensor([[0.0, 0.3], [0.6, 1.0]])  # a bare [H, W] mask
    torch.testing.assert_close(run(InvertMask, mask=mask)[0], (1 - mask)[None])
    assert run(ThresholdMask, mask=mask, value=0.3)[0].tolist() == [[[0, 0], [1, 1]]]
    grid = torch.arange(20, dtype=torch.float32).view(1, 4, 5)
    assert torch.equal(run(CropMask, mask=grid, x=1, y=2, width=2, height=512)[0], grid[:, 2:, 1:3])
    with pytest.raises(ValueError, match="outside the 5x4 mask"):
        run(CropMask, mask=grid, x=5, y=0, width=2, height=2)


DEST = [[0.5, 0.5, 0.5], [0.5, 0.6, 0.2], [0.5, 1.0, 0.0]]
SOURCE = [[0.7, 0.3], [0.4, 1.0]]


@pytest.mark.parametrize("operation, region", [
    ("multiply", [[0.42, 0.06], [0.4, 0.0]]),
    ("add", [[1.0, 0.5], [1.0, 1.0]]),  # 1.3 and 1.4 clamped
    ("subtract", [[0.0, 0.0], [0.6, 0.0]]),  # negatives clamped
    ("and", [[1.0, 0.0], [0.0, 0.0]]),  # on the rounded masks: dest [[1, 0], [1, 0]], source [[1, 0], [0, 1]]
    ("or", [[1.0, 0.0], [1.0, 1.0]]),
    ("xor", [[0.0, 0.0], [1.0, 1.0]]),
])
def test_mask_composite_operations(operation, region):
    out = run(MaskComposite, destination=torch.tensor(DEST), source=torch.tensor(SOURCE), x=1, y=1,
              operation=operation)[0]
    expected = torch.tensor(DEST)[None].clone()
    expected[0, 1:, 1:] = torch.tensor(region)
    torch.testing.assert_close(out, expected)


def test_mask_composite_clips_and_broadcasts():
    dest, source = torch.zeros(1, 3, 3), torch.ones(2, 2, 2)
    out = run(MaskComposite, destination=dest, source=source, x=2, y=0, operation="add")[0]
    assert out.shape == (2, 3, 3) and out.sum() == 2 * 2 and out[:, :2, 2].min() == 1
    out = run(MaskComposite, destination=dest, source=source, x=3, y=0, operation="add")[0]
    assert out.sum() == 0
    with pytest.raises(ValueError, match="do not match"):
        run(MaskComposite, destination=torch.zeros(2, 3, 3), source=torch.ones(3, 2, 2), x=0, y=0, operation="add")


def test_feather_mask():
    out = run(FeatherMask, mask=torch.ones(1, 4, 6), left=2, top=4, right=0, bottom=0)[0][0]
    cols = torch.tensor([0.5, 1, 1, 1, 1, 1])
    rows = torch.tensor([0.25, 0.5, 0.75, 1])
    torch.testing.assert_close(out, rows[:, None] * cols[None, :])
    # ComfyUI feathers the far edges from index -0 (the first column): kept for identical results.
    out = run(FeatherMask, mask=torch.ones(4, 6), left=0, top=0, right=3, bottom=0)[0][0]
    torch.testing.assert_close(out[0], torch.tensor([1 / 3, 1, 1, 1, 1, 2 / 3]))
    out = run(FeatherMask, mask=torch.ones(1, 4, 6), left=100, top=0, right=0, bottom=0)[0][0]
    torch.testing.assert_close(out[0], torch.arange(1, 7) / 6)  # clipped to the width


def dot(size=7):
    mask = torch.zeros(1, size, size)
    mask[0, size // 2, size // 2] = 1
    return mask


def test_grow_mask_square_plus_and_shrink():
    square = run(GrowMask, mask=dot(), expand=1, tapered_corners=False)[0][0]
    assert square.nonzero().tolist() == [[r, c] for r in (2, 3, 4) for c in (2, 3, 4)]
    plus = run(GrowMask, mask=dot(), expand=1, tapered_corners=True)[0][0]
    assert sorted(plus.nonzero().tolist()) == [[2, 3], [3, 2], [3, 3], [3, 4], [4, 3]]
    diamond = run(GrowMask, mask=dot(), expand=2, tapered_corners=True)[0][0]
    assert {(r, c) for r, c in diamond.nonzero().tolist()} == {
        (r, c) for r in range(7) for c in range(7) if abs(r - 3) + abs(c - 3) <= 2}
    shrunk = run(GrowMask, mask=square[None], expand=-1, tapered_corners=False)[0]
    assert torch.equal(shrunk, dot())
    assert torch.equal(run(GrowMask, mask=dot(), expand=0, tapered_corners=True)[0], dot())


@pytest.mark.parametrize("expand", [-2, 3])
@pytest.mark.parametrize("tapered", [True, False])
def test_grow_mask_matches_scipy_grey_morphology(expand, tapered):
    ndimage = pytest.importorskip("scipy.ndimage")
    mask = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(0))
    c = 0 if tapered else 1
    footprint = [[c, 1, c], [1, 1, 1], [c, 1, c]]
    expected = []
    for m in mask.numpy():
        for _ in range(abs(expand)):
            op = ndimage.grey_dilation if expand > 0 else ndimage.grey_erosion
            m = op(m, footprint=footprint)
        expected.append(torch.from_numpy(m))
    out = run(GrowMask, mask=mask, expand=expand, tapered_corners=tapered)[0]
    torch.testing.assert_close(out, torch.stack(expected))


# --- Through the executor -------------------------------------------------------------------------


def test_nodes_run_in_a_workflow_with_an_unlinked_optional_mask(tmp_path):
    engine = Executor(builtin_registry(), services=Services.create(FolderPaths(base=tmp_path), force_cpu=True))
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 4, "batch_size": 1, "color": 0x00FF00}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 2, "batch_size": 1, "color": 0xFFFFFF}},
        "4": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["2", 0], "source": ["3", 0],
                                                                "x": 1, "y": 1, "resize_source": False}},
        "5": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 5, "height": 5}},
        "6": {"class_type": "MaskComposite", "inputs": {"destination": ["5", 0], "source": ["5", 0], "x": 0,
                                                         "y": 0, "operation": "add"}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
    }
    result = engine.run(parse_api(graph), keep=["4"])
    assert result.ok, result.error
    image = result.values["4"][0]
    assert image[0, 0, 0].tolist() == [1, 0, 1] and image[0, 1:3, 1:3].min() == 1
