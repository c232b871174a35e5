"""ComfyUI's newer utility nodes (nodes/sd/utility_nodes.py): BatchImagesNode, LatentCut, LatentCutToBatch,
ResolutionSelector, ResizeImageMaskNode, MaskPreview and ImageCompare, against hand-computed values and torch / Pillow
references, and in API prompts and a ComfyUI editor file that use their dotted (autogrow, dynamic combo) inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from executor.executor import Executor
from graph.document import parse_api
from graph.ui_format import ui_to_api
from graph.validate import validate
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd import utility_nodes
from nodes.sd.utility_nodes import (
    BatchImagesNode,
    LatentCut,
    LatentCutToBatch,
    ResizeImageMaskNode,
    ResolutionSelector,
)


@pytest.fixture(scope="module")
def registry():
    registry = builtin_registry()
    if "LatentCut" not in registry:  # until nodes/registry.py lists the module among the built-ins
        registry.register_module(utility_nodes, "builtin")
    return registry


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path, bundled_models=None)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def run(cls, **inputs):
    return cls().execute(**inputs)


def ramp(*shape):
    """A tensor of `shape` holding 0, 1, 2, ... in row-major order."""
    return torch.arange(float(np.prod(shape))).reshape(shape)


# --- Interface ------------------------------------------------------------------------------------


def test_interfaces_match_comfyui(registry):
    def info(name):
        return registry.get(name).object_info()

    batch = info("BatchImagesNode")
    assert (batch["display_name"], batch["category"]) == ("Batch Images", "image/batch")
    order = batch["input_order"]  # ComfyUI's newer autogrow template: min 1, max 50
    assert order["required"] == ["images.image0"]
    assert order["optional"] == [f"images.image{i}" for i in range(1, 50)]
    assert info("BatchImagesNode")["input"]["required"]["images.image0"] == ["IMAGE", {}]

    cut = info("LatentCut")
    assert cut["category"] == "latent/advanced" and cut["input_order"]["required"] == ["samples", "dim", "index",
                                                                                       "amount"]
    assert cut["input"]["required"]["dim"][0] == ["x", "y", "t"]
    assert {k: v for k, v in cut["input"]["required"]["index"][1].items() if k != "tooltip"} == {
        "default": 0, "min": -16384, "max": 16384, "step": 1}
    assert {k: v for k, v in cut["input"]["required"]["amount"][1].items() if k != "tooltip"} == {
        "default": 1, "min": 1, "max": 16384, "step": 1}
    to_batch = info("LatentCutToBatch")
    assert to_batch["input_order"]["required"] == ["samples", "dim", "slice_size"]
    assert to_batch["input"]["required"]["dim"][0] == ["t", "x", "y"]
    assert (cut["output"], to_batch["output"]) == (["LATENT"], ["LATENT"])

    resolution = info("ResolutionSelector")
    assert (resolution["display_name"], resolution["category"]) == ("Resolution Selector", "utils")
    assert resolution["input"]["required"]["aspect_ratio"][0] == [
        "1:1 (Square)", "3:2 (Photo)", "4:3 (Standard)", "16:9 (Widescreen)", "21:9 (Ultrawide)",
        "2:3 (Portrait Photo)", "3:4 (Portrait Standard)", "9:16 (Portrait Widescreen)"]
    megapixels = resolution["input"]["required"]["megapixels"][1]
    assert (megapixels["default"], megapixels["min"], megapixels["max"], megapixels["step"]) == (1.0, 0.1, 16.0, 0.1)
    assert (resolution["output"], resolution["output_name"]) == (["INT", "INT"], ["width", "height"])

    resize = info("ResizeImageMaskNode")
    assert (resize["display_name"], resize["category"]) == ("Resize Image/Mask", "transform")
    assert resize["input_order"]["required"] == ["input", "resize_type", "scale_method"]
    assert resize["input"]["required"]["resize_type"][0] == [
        "scale dimensions", "scale by multiplier", "scale longer dimension", "scale shorter dimension", "scale width",
        "scale height", "scale total pixels", "match size", "scale to multiple"]
    assert resize["input"]["required"]["scale_method"][0] == ["nearest-exact", "bilinear", "area", "bicubic",
                                                              "lanczos"]
    assert resize["input"]["required"]["scale_method"][1]["default"] == "area"
    optional = resize["input"]["optional"]
    multiplier = optional["resize_type.multiplier"][1]
    assert (multiplier["default"], multiplier["min"], multiplier["max"], multiplier["step"]) == (1.0, 0.01, 8.0, 0.01)
    assert optional["resize_type.megapixels"][1]["max"] == 16.0 and optional["resize_type.multiple"][1]["min"] == 1
    assert optional["resize_type.crop"][1]["default"] == "center"
    assert resize["output_name"] == ["resized"]

    assert info("MaskPreview")["output_node"] and info("MaskPreview")["display_name"] == "Preview Mask"
    compare = info("ImageCompare")
    assert compare["output_node"] and compare["output"] == []
    assert compare["input_order"]["optional"] == ["image_a", "image_b", "compare_view"]


# --- BatchImagesNode ------------------------------------------------------------------------------


def test_batch_images_joins_in_slot_order_with_alpha_and_resize():
    a = torch.full((2, 4, 6, 3), 0.25)
    b = torch.full((1, 4, 6, 4), 0.5)
    c = ramp(1, 8, 6, 3) / 144  # taller than a: centre-cropped to 4 x 6 then resized
    # Slot 10 comes after slot 2: numeric order, not the names' text order.
    (out,) = run(BatchImagesNode, **{"images.image0": a, "images.image10": c, "images.image2": b})
    assert out.shape == (4, 4, 6, 4)
    torch.testing.assert_close(out[:2, ..., :3], a[..., :3])
    assert bool((out[:2, ..., 3] == 1).all())  # the opaque alpha the RGB images get
    torch.testing.assert_close(out[2], b[0])
    crop = c[:, 2:6].movedim(-1, 1)  # 8 x 6 to the aspect of 4 x 6: rows 2..5
    reference = F.interpolate(crop, size=(4, 6), mode="bilinear", align_corners=False).movedim(1, -1)
    torch.testing.assert_close(out[3:, ..., :3], reference, atol=1e-6, rtol=0)


def test_batch_images_refuses_a_mask_shaped_input():
    with pytest.raises(ValueError, match=r"image 1 has shape \(1, 4, 4\)"):
        run(BatchImagesNode, **{"images.image0": torch.zeros(1, 4, 4, 3), "images.image1": torch.zeros(1, 4, 4)})


def test_batch_images_of_one_image_in_a_workflow(registry):
    """ComfyUI's newer BatchImagesNode needs one image only: the prompt runs, and the batch is that image."""
    doc = {"1": {"class_type": "EmptyImage", "inputs": {"width": 6, "height": 4, "batch_size": 2, "color": 0x336699}},
           "2": {"class_type": "BatchImagesNode", "inputs": {"images.image0": ["1", 0]}},
           "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    result = Executor(registry).run(parse_api(doc), keep=["1", "2"])
    assert result.ok, result.error
    (image,), (batched,) = result.values["1"], result.values["2"]
    assert batched.shape == (2, 4, 6, 3) and torch.equal(batched, image)
    torch.testing.assert_close(batched[0, 0, 0], torch.tensor([0x33, 0x66, 0x99]) / 255.0)


# --- LatentCut / LatentCutToBatch -----------------------------------------------------------------


@pytest.mark.parametrize(("dim", "index", "amount", "expected"), [
    ("x", 1, 2, (slice(None), slice(None), slice(None), slice(None), slice(1, 3))),
    ("x", 3, 5, (..., slice(3, 4))),  # amount clamped to what is left
    ("x", 9, 1, (..., slice(3, 4))),  # index clamped to the last step
    ("y", -2, 5, (..., slice(1, 3), slice(None))),  # negative: from the end, amount clamped to 2
    ("y", -9, 1, (..., slice(0, 1), slice(None))),  # clamped to the first step
    ("t", 2, 3, (slice(None), slice(None), slice(2, 5))),
])
def test_latent_cut(dim, index, amount, expected):
    samples = ramp(2, 3, 5, 3, 4)  # [B, C, T, H, W]
    mask = torch.ones(1, 1, 24, 32)
    (out,) = run(LatentCut, samples={"samples": samples, "noise_mask": mask}, dim=dim, index=index, amount=amount)
    torch.testing.assert_close(out["samples"], samples[expected])
    assert out["noise_mask"] is mask  # the other keys are kept as they are, as ComfyUI does


def test_latent_cut_refuses_t_of_an_image_latent():
    with pytest.raises(ValueError, match="dim 't' needs a video latent"):
        run(LatentCut, samples={"samples": torch.zeros(1, 4, 8, 8)}, dim="t", index=0, amount=1)


def test_latent_cut_to_batch():
    samples = ramp(2, 3, 6, 2, 2)  # two videos of six frames
    (out,) = run(LatentCutToBatch, samples={"samples": samples}, dim="t", slice_size=2)
    assert out["samples"].shape == (6, 3, 2, 2, 2)
    # Batch item 0's three pieces, then item 1's.
    for piece in range(6):
        video, start = divmod(piece, 3)
        torch.testing.assert_close(out["samples"][piece], samples[video, :, 2 * start:2 * start + 2])
    (cut,) = run(LatentCutToBatch, samples={"samples": samples}, dim="t", slice_size=4)
    torch.testing.assert_close(cut["samples"], samples[:, :, :4])  # the last two frames make no whole piece
    (whole,) = run(LatentCutToBatch, samples={"samples": samples}, dim="t", slice_size=9)
    torch.testing.assert_close(whole["samples"], samples)
    image = {"samples": ramp(1, 4, 2, 6)}
    (same,) = run(LatentCutToBatch, samples=image, dim="t", slice_size=1)
    assert same is image  # an image latent has no frames: left as it is
    (columns,) = run(LatentCutToBatch, samples=image, dim="x", slice_size=3)
    torch.testing.assert_close(columns["samples"], torch.stack([image["samples"][0, ..., :3],
                                                                image["samples"][0, ..., 3:]]))


# --- ResolutionSelector ---------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "megapixels", "size"), [
    ("1:1 (Square)", 1.0, (1024, 1024)),
    ("16:9 (Widescreen)", 1.0, (1368, 768)),  # unit sqrt(2**20 / 144) = 85.33: 170.7 and 96 eighths
    ("9:16 (Portrait Widescreen)", 1.0, (768, 1368)),
    ("3:2 (Photo)", 0.5, (888, 592)),  # unit sqrt(2**19 / 6) = 295.6: 110.85 and 73.90 eighths
    ("21:9 (Ultrawide)", 2.0, (2216, 952)),  # unit sqrt(2**21 / 189) = 105.34: 276.51 and 118.50 eighths
])
def test_resolution_selector(ratio, megapixels, size):
    assert run(ResolutionSelector, aspect_ratio=ratio, megapixels=megapixels) == size


@pytest.mark.parametrize(("ratio", "megapixels", "multiple", "minimum", "size"), [
    ("16:9 (Widescreen)", 1.0, 32, 256, (1376, 768)),  # 42.7 and 24 thirty-seconds
    ("21:9 (Ultrawide)", 0.1, 8, 256, (672, 288)),  # 496 x 208 is under 256: k = 32, the least multiple of 8 >= 256 / 9
    ("21:9 (Ultrawide)", 0.1, 8, 320, (840, 360)),  # k = 40: 21 * 40 and 9 * 40, both multiples of 8, 360 >= 320
    ("1:1 (Square)", 0.1, 64, 256, (320, 320)),  # 323.8 rounds to 5 sixty-fourths
])
def test_resolution_selector_multiple_and_minimum(ratio, megapixels, multiple, minimum, size):
    width, height = run(ResolutionSelector, aspect_ratio=ratio, megapixels=megapixels, multiple=multiple,
                        minimum=minimum)
    assert (width, height) == size and width % multiple == 0 and height % multiple == 0


# --- ResizeImageMaskNode --------------------------------------------------------------------------


def resize(image, resize_type, scale_method="bilinear", **options):
    (out,) = run(ResizeImageMaskNode, input=image, resize_type=resize_type, scale_method=scale_method,
                 **{f"resize_type.{k}": v for k, v in options.items()})
    return out


IMAGE = ramp(2, 6, 10, 3) / 180  # two 10 x 6 images


def torch_resize(image, height, width, mode="bilinear"):
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(image.movedim(-1, 1), size=(height, width), mode=mode, **kwargs).movedim(1, -1)


@pytest.mark.parametrize(("resize_type", "options", "size"), [
    ("scale dimensions", {"width": 20, "height": 12, "crop": "disabled"}, (12, 20)),
    ("scale dimensions", {"width": 5, "height": 0, "crop": "disabled"}, (3, 5)),  # height follows: round(6 / 2)
    ("scale dimensions", {"width": 0, "height": 0, "crop": "center"}, (6, 10)),  # both 0: unchanged
    ("scale by multiplier", {"multiplier": 1.5}, (9, 15)),
    ("scale longer dimension", {"longer_size": 15}, (9, 15)),
    ("scale shorter dimension", {"shorter_size": 3}, (3, 5)),
    ("scale width", {"width": 15}, (9, 15)),
    ("scale height", {"height": 3}, (3, 5)),
    ("scale total pixels", {"megapixels": 240 / 2**20}, (12, 20)),  # 240 pixels: twice each side
])
def test_resize_rules_give_comfyui_sizes_and_torch_values(resize_type, options, size):
    out = resize(IMAGE, resize_type, **options)
    assert out.shape == (2, *size, 3)
    torch.testing.assert_close(out, torch_resize(IMAGE, *size), atol=1e-6, rtol=0)


def test_resize_centre_crop_and_match_size_with_a_mask():
    # 10 x 6 to 6 x 6 with centre crop: columns 2..7 kept, nearest-exact at the same size is a copy.
    out = resize(IMAGE, "scale dimensions", "nearest-exact", width=6, height=6, crop="center")
    torch.testing.assert_close(out, IMAGE[:, :, 2:8])
    match = torch.zeros(1, 3, 5)  # a MASK 5 wide, 3 high
    stretched = resize(IMAGE, "match size", "area", match=match, crop="disabled")
    torch.testing.assert_close(stretched, torch_resize(IMAGE, 3, 5, "area"))


def test_resize_a_mask_gives_a_mask():
    mask = ramp(1, 4, 8) / 32
    out = resize(mask, "scale by multiplier", "bicubic", multiplier=0.5)
    assert out.shape == (1, 2, 4)
    reference = F.interpolate(mask[:, None], size=(2, 4), mode="bicubic", align_corners=False)[:, 0]
    torch.testing.assert_close(out, reference)
    single = resize(mask[0], "scale width", "nearest-exact", width=4)  # an [H, W] mask is a batch of one
    torch.testing.assert_close(single, mask[:, 1::2, 1::2])  # nearest-exact halving takes the odd rows, columns


def test_resize_lanczos_is_pillows():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).float().div(255)[None]
    out = resize(image, "scale longer dimension", "lanczos", longer_size=25)
    reference = np.array(Image.fromarray(pixels).resize((25, 15), Image.Resampling.LANCZOS))
    assert out.shape == (1, 15, 25, 3)
    torch.testing.assert_close(out[0], torch.from_numpy(reference).float().div(255))


def test_resize_to_multiple_covers_then_crops():
    image = ramp(1, 7, 10, 1) / 70
    out = resize(image, "scale to multiple", multiple=4)
    # 10 x 7 to 8 x 4: the width's scale 0.8 is the larger, so 8 x ceil(5.6) = 8 x 6, then rows 1..4.
    assert out.shape == (1, 4, 8, 1)
    torch.testing.assert_close(out, torch_resize(image, 6, 8)[:, 1:5])
    assert torch.equal(resize(image, "scale to multiple", multiple=1), image)
    assert torch.equal(resize(image, "scale to multiple", multiple=11), image)  # a side shorter than the multiple
    assert torch.equal(resize(image, "scale to multiple", multiple=7), image[:, :, 1:8])  # 10 x 7: 7 x 7 covers


def test_resize_refuses_bad_input():
    with pytest.raises(ValueError, match="needs the input resize_type.multiplier"):
        resize(IMAGE, "scale by multiplier")
    with pytest.raises(ValueError, match="longer_size 0 would leave no pixels"):
        resize(IMAGE, "scale longer dimension", longer_size=0)
    with pytest.raises(ValueError, match=r"expected an IMAGE .* or a MASK"):
        resize(torch.zeros(1, 1, 4, 4, 3), "scale width", width=2)


def test_resize_reads_comfyui_editor_widgets():
    assert ResizeImageMaskNode.widgets_from_ui(["scale dimensions", 720, 1280, "center", "lanczos"]) == {
        "resize_type": "scale dimensions", "resize_type.width": 720, "resize_type.height": 1280,
        "resize_type.crop": "center", "scale_method": "lanczos"}
    assert ResizeImageMaskNode.widgets_from_ui(["match size", "disabled", "area"]) == {
        "resize_type": "match size", "resize_type.crop": "disabled", "scale_method": "area"}
    loom_layout = ["scale width", "area", 512, 512, "center", 1.0, 512, 512, 1.0, 8]  # every widget, declared order
    assert ResizeImageMaskNode.widgets_from_ui(loom_layout) is None


# --- Validation -----------------------------------------------------------------------------------


def problems(registry, doc):
    return [(p.type, p.node_id, p.input_name, p.details) for p in validate(parse_api(doc), registry).problems]


def test_validation_of_dotted_inputs(registry):
    image = {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}}
    doc = {"1": image,
           "2": {"class_type": "BatchImagesNode", "inputs": {}},
           "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    assert problems(registry, doc) == [("required_input_missing", "2", "images.image0", "images.image0")]
    doc["2"]["inputs"]["images.image0"] = ["1", 0]
    assert problems(registry, doc) == []  # one image is enough
    doc["2"]["inputs"].update({"images.image1": ["1", 0], "images.image50": ["1", 0]})
    [(kind, node, _, details)] = problems(registry, doc)
    assert (kind, node) == ("custom_validation_failed", "2") and "no input images.image50" in details
    del doc["2"]["inputs"]["images.image50"]
    doc["2"]["inputs"]["images.image2"] = ["4", 0]
    doc["4"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 4, "height": 4}}
    assert problems(registry, doc)[0][:3] == ("return_type_mismatch", "2", "images.image2")

    resize = {"class_type": "ResizeImageMaskNode", "inputs": {"input": ["1", 0], "resize_type": "scale by multiplier",
                                                              "scale_method": "area"}}
    doc = {"1": image, "2": resize, "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    [(kind, _, _, details)] = problems(registry, doc)
    assert kind == "custom_validation_failed" and "needs the input resize_type.multiplier" in details
    resize["inputs"]["resize_type.multiplier"] = 9.0
    assert problems(registry, doc)[0][:3] == ("value_bigger_than_max", "2", "resize_type.multiplier")
    resize["inputs"]["resize_type.multiplier"] = 0.5
    assert problems(registry, doc) == []


# --- In workflows ---------------------------------------------------------------------------------


def test_api_prompt_with_several_utility_nodes(registry, folders):
    doc = {
        "1": {"class_type": "ResolutionSelector", "inputs": {"aspect_ratio": "16:9 (Widescreen)", "megapixels": 0.1,
                                                             "minimum": 32}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": ["1", 0], "height": ["1", 1], "batch_size": 1}},
        "3": {"class_type": "LatentCut", "inputs": {"samples": ["2", 0], "dim": "x", "index": -10, "amount": 8}},
        "4": {"class_type": "LatentCutToBatch", "inputs": {"samples": ["3", 0], "dim": "x", "slice_size": 4}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 4, "batch_size": 2, "color": 0xFF0000}},
        "7": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0x0000FF}},
        "8": {"class_type": "BatchImagesNode", "inputs": {"images.image0": ["6", 0], "images.image1": ["7", 0]}},
        "9": {"class_type": "ResizeImageMaskNode", "inputs": {
            "input": ["8", 0], "resize_type": "scale longer dimension", "resize_type.longer_size": 16,
            "scale_method": "nearest-exact"}},
        "10": {"class_type": "ImageCompare", "inputs": {"image_a": ["8", 0], "image_b": ["9", 0],
                                                        "compare_view": {"position": 0.5}}},  # the slider: unused
        "11": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 4, "height": 2}},
        "12": {"class_type": "ResizeImageMaskNode", "inputs": {
            "input": ["11", 0], "resize_type": "match size", "resize_type.match": ["9", 0],
            "resize_type.crop": "disabled", "scale_method": "bilinear"}},
        "13": {"class_type": "MaskPreview", "inputs": {"mask": ["12", 0]}},
        "14": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},
    }
    result = Executor(registry).run(parse_api(doc), keep=["2", "4", "9", "12"], extra={"prompt": doc})
    assert result.ok, result.error
    # 0.1 MP at 16:9: unit sqrt(104857.6 / 144) = 26.98, 53.97 and 30.36 eighths: 432 x 240, a 54 x 30 latent.
    assert result.outputs["5"]["text"] == ["432"]
    assert result.values["2"][0]["samples"].shape == (1, 4, 30, 54)
    assert result.values["4"][0]["samples"].shape == (2, 4, 30, 4)  # the last 8 columns in two pieces of 4
    resized = result.values["9"][0]
    assert resized.shape == (3, 8, 16, 3)
    assert resized[:2, ..., 0].eq(1).all() and resized[2, :, :, 2].eq(1).all()  # red, red, then the blue square
    assert result.values["12"][0].shape == (1, 8, 16)
    torch.testing.assert_close(result.values["12"][0], torch.full((1, 8, 16), 0.5))

    compare = result.outputs["10"]
    assert [len(compare["a_images"]), len(compare["b_images"])] == [3, 3]
    first_b = compare["b_images"][0]
    assert first_b["type"] == "temp" and first_b["filename"].startswith("comfy.compare.b")
    with Image.open(folders.temp / first_b["subfolder"] / first_b["filename"]) as saved:
        assert saved.size == (16, 8) and saved.getpixel((0, 0)) == (255, 0, 0)
        assert '"ImageCompare"' in saved.text["prompt"]
    [mask_file] = result.outputs["13"]["images"]
    with Image.open(folders.temp / mask_file["subfolder"] / mask_file["filename"]) as saved:
        assert saved.mode == "RGB" and saved.size == (16, 8) and saved.getpixel((3, 3)) == (128, 128, 128)


def test_comfyui_editor_file_runs(registry, folders):
    def socket(name, link):
        return {"name": name, "type": "IMAGE", "link": link}

    nodes = [
        {"id": 1, "type": "EmptyImage", "mode": 0, "inputs": [], "widgets_values": [6, 4, 1, 0x00FF00]},
        {"id": 2, "type": "EmptyImage", "mode": 0, "inputs": [], "widgets_values": [6, 4, 1, 0xFFFFFF]},
        {"id": 3, "type": "BatchImagesNode", "mode": 0, "widgets_values": [],
         "inputs": [socket("images.image0", 1), socket("images.image1", 2), socket("images.image2", None)]},
        {"id": 4, "type": "ResizeImageMaskNode", "mode": 0, "widgets_values": ["scale dimensions", 3, 2, "center",
                                                                               "area"],
         "inputs": [{"name": "input", "type": "IMAGE,MASK", "link": 3}]},
        {"id": 5, "type": "ImageCompare", "mode": 0, "widgets_values": [],
         "inputs": [socket("image_a", 4), socket("image_b", None)]},
    ]
    links = [[1, 1, 0, 3, 0, "IMAGE"], [2, 2, 0, 3, 1, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"], [4, 4, 0, 5, 0, "IMAGE"]]
    api = ui_to_api({"nodes": nodes, "links": links}, registry)
    assert api["3"]["inputs"] == {"images.image0": ["1", 0], "images.image1": ["2", 0]}
    inputs = api["4"]["inputs"]
    assert (inputs["resize_type"], inputs["resize_type.width"], inputs["resize_type.height"],
            inputs["resize_type.crop"], inputs["scale_method"]) == ("scale dimensions", 3, 2, "center", "area")
    result = Executor(registry).run(parse_api(api))
    assert result.ok, result.error
    [green, white] = result.outputs["5"]["a_images"]
    assert result.outputs["5"]["b_images"] == []
    with Image.open(folders.temp / white["subfolder"] / white["filename"]) as saved:
        assert saved.size == (3, 2) and saved.getpixel((1, 1)) == (255, 255, 255)
