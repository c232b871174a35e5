"""The toolkit nodes (nodes/sd/toolkit.py): lists, number and colour conversion, saved text, bounding boxes and the
crops they drive, checked through the executor against independent transcriptions of ComfyUI's arithmetic (numpy
block means, Pillow's own RGB Lanczos), with their declarations and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.toolkit import (
    ColorToRGBInt,
    ComfyNumberConvert,
    CreateBoundingBoxes,
    CreateList,
    CropByBBoxes,
    ImageCropToMask,
    ImageCropV2,
    PrimitiveBoundingBox,
    SaveText,
    convert_number,
    crop_box,
    crop_by_boxes,
    crop_to_mask,
    parse_color,
)


@pytest.fixture
def engine(tmp_path):
    set_paths(FolderPaths(base=tmp_path))
    try:
        yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=tmp_path), force_cpu=True))
    finally:
        set_paths(FolderPaths())


def run_graph(engine, graph, keep):
    result = engine.run(parse_api(graph), keep=keep)
    assert result.ok, result.error
    return result


def ramp(batch=1, h=40, w=60, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, h, w, channels, generator=generator)


def block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """[H, W, C] shrunk by an integer factor: the mean of each factor x factor block (what "area" resizing is)."""
    h, w, c = pixels.shape
    return pixels.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def pil_lanczos(chw: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's RGB Lanczos of a [3, H, W] 0..1 picture truncated to 8 bits, as ComfyUI's comfy.utils.lanczos."""
    picture = Image.fromarray(np.clip(255.0 * chw.transpose(1, 2, 0), 0, 255).astype(np.uint8))
    return np.asarray(picture.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0


# --- Declarations -----------------------------------------------------------------------------------------------


def test_declarations_follow_comfyui():
    info = CreateList.object_info()
    assert info["category"] == "utilities" and info["display_name"] == "Create List"
    assert info["input_order"]["required"] == ["inputs.input0"]
    assert info["input_order"]["optional"] == [f"inputs.input{i}" for i in range(1, 10)]
    assert info["output"] == ["*"] and info["output_is_list"] == [True] and info["output_name"] == ["list"]

    info = ComfyNumberConvert.object_info()
    assert (info["display_name"], info["category"]) == ("Convert Number", "utils")
    assert info["input"]["required"]["value"] == ["INT,FLOAT,STRING,BOOLEAN", {"display_name": "value"}]
    assert info["output"] == ["FLOAT", "INT"] and info["output_name"] == ["FLOAT", "INT"]

    info = ColorToRGBInt.object_info()
    assert (info["display_name"], info["category"]) == ("Color Picker", "utilities")
    assert info["input"]["required"]["color"] == ["COLOR", {"default": "#ffffff", "socketless": True}]
    assert info["output"] == ["INT", "COLOR", "FLOAT"]
    assert info["output_name"] == ["rgb_int", "hex", "transparency"]

    info = SaveText.object_info()
    assert info["output_node"] is True and info["category"] == "text"
    assert info["input_order"]["required"] == ["text", "filename_prefix", "format"]
    assert info["input"]["required"]["text"] == ["STRING", {"forceInput": True}]
    assert info["input"]["required"]["format"] == [["txt", "csv", "md", "json"], {"default": "txt"}]
    assert SaveText.widget_names() == ["filename_prefix", "format"]

    info = PrimitiveBoundingBox.object_info()
    assert (info["display_name"], info["category"]) == ("Bounding Box", "utilities/primitive")
    assert info["input"]["required"]["width"] == ["INT", {"default": 512, "min": 1, "max": 16384}]
    assert info["input_order"]["required"] == ["x", "y", "width", "height"] and info["output"] == ["BOUNDING_BOX"]

    info = ImageCropV2.object_info()
    assert (info["display_name"], info["category"]) == ("Crop Image", "image/transform")
    assert info["input"]["required"]["crop_region"] == ["BOUNDING_BOX", {
        "default": {"x": 0, "y": 0, "width": 512, "height": 512}, "socketless": True, "component": "ImageCrop"}]

    info = CropByBBoxes.object_info()
    assert info["display_name"] == "Crop By Bounding Boxes"
    assert info["input_order"]["required"] == ["image", "bboxes", "output_width", "output_height", "padding",
                                               "keep_aspect"]
    assert info["input"]["required"]["bboxes"][1]["forceInput"] is True
    assert info["input"]["required"]["keep_aspect"][0] == ["stretch", "pad"]

    info = ImageCropToMask.object_info()
    assert info["input_order"]["required"] == ["images", "masks", "width", "height", "pad_factor", "grow_mask",
                                               "background"]
    assert info["input"]["required"]["background"][1]["default"] == "#000000"
    assert info["input"]["required"]["pad_factor"][1] | {} == {
        "default": 1.0, "min": 1.0, "max": 2.0, "step": 0.01,
        "tooltip": "Extra margin around the mask bounding box as a multiplier."}
    assert info["output_name"] == ["images"]

    info = CreateBoundingBoxes.object_info()
    assert info["input_order"] == {"required": ["width", "height", "editor_state"],
                                   "optional": ["background", "bboxes", "last_incoming"]}
    assert info["input"]["optional"]["bboxes"][0] == "BOUNDING_BOX,ARRAY,STRING"
    assert info["input"]["required"]["editor_state"][1]["socketless"] is False
    assert info["output"] == ["IMAGE", "BOUNDING_BOX", "ARRAY"]
    assert info["output_name"] == ["preview", "bboxes", "elements"] and info["output_node"] is True


def test_editor_files_give_the_socketless_widgets_their_values():
    region = {"x": 1, "y": 2, "width": 64, "height": 32}
    document = {"links": [], "nodes": [
        {"id": 1, "type": "ColorToRGBInt", "widgets_values": ["#123456"], "inputs": [], "outputs": []},
        {"id": 2, "type": "ImageCropV2", "widgets_values": [region, 1, 2, 64, 32], "inputs": [], "outputs": []},
        {"id": 3, "type": "ImageCropToMask", "widgets_values": [512, 256, 1.2, -2, "#102030"], "inputs": [],
         "outputs": []}]}
    api = ui_to_api(document, builtin_registry())
    assert api["1"]["inputs"] == {"color": "#123456"}
    assert api["2"]["inputs"] == {"crop_region": region}
    assert api["3"]["inputs"] == {"width": 512, "height": 256, "pad_factor": 1.2, "grow_mask": -2,
                                  "background": "#102030"}


# --- CreateList -------------------------------------------------------------------------------------------------


def test_create_list_joins_its_inputs_items_in_slot_order(engine):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SplitImageToTileList", "inputs": {"image": ["1", 0], "tile_width": 64,
                                                               "tile_height": 64, "overlap": 0}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 16, "batch_size": 1,
                                                     "color": 0xFFFFFF}},
        # slot 1 before slot 0 in the prompt: the list still follows the slots
        "4": {"class_type": "CreateList", "inputs": {"inputs.input1": ["3", 0], "inputs.input0": ["2", 0]}},
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},  # runs once per item
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    result = run_graph(engine, graph, keep=["4", "5"])
    items = result.values["4"][0]
    assert [tuple(item.shape) for item in items] == [(1, 64, 64, 3), (1, 64, 64, 3), (1, 16, 32, 3)]
    inverted = result.values["5"][0]
    assert len(inverted) == 3
    torch.testing.assert_close(inverted[2], torch.zeros(1, 16, 32, 3))
    torch.testing.assert_close(inverted[0], torch.ones(1, 64, 64, 3))


# --- ComfyNumberConvert -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (True, (1.0, 1)), (False, (0.0, 0)), (7, (7.0, 7)), (-2.75, (-2.75, -2)), (3.99, (3.99, 3)),
    (" 42 ", (42.0, 42)), ("1e3", (1000.0, 1000)), ("-0.5", (-0.5, 0)), ("12345678901234567890", (
        1.2345678901234567e19, 12345678901234567890)),
])
def test_number_convert_follows_comfyui(value, expected):
    as_float, as_int = convert_number(value)
    assert (as_float, as_int) == expected and type(as_float) is float and type(as_int) is int


@pytest.mark.parametrize("value, message", [
    ("", "empty string"), ("abc", "cannot convert the string 'abc'"), ("inf", "non-finite"),
    (math.nan, "non-finite"), ([1], "must be an INT, FLOAT, STRING or BOOLEAN"),
])
def test_number_convert_refuses_what_is_not_a_finite_number(value, message):
    with pytest.raises(ValueError, match=f"ComfyNumberConvert: .*{message}"):
        convert_number(value)


def test_number_convert_in_a_workflow(engine):
    graph = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "-7.9"}},
        "2": {"class_type": "ComfyNumberConvert", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "ComfyNumberConvert", "inputs": {"value": True}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    result = run_graph(engine, graph, keep=["2", "3"])
    assert result.values["2"] == (-7.9, -7) and result.values["3"] == (1.0, 1)
    graph["3"]["inputs"]["value"] = {"not": "a number"}
    with pytest.raises(WorkflowInvalid, match="must be an INT, FLOAT, STRING or BOOLEAN"):
        engine.run(parse_api(graph))


# --- ColorToRGBInt ----------------------------------------------------------------------------------------------


def test_color_to_rgb_int():
    assert parse_color("#ff8000") == (0xFF8000, "#ff8000", 1.0)
    assert parse_color("#000000") == (0, "#000000", 1.0)
    rgb, hex_color, transparency = parse_color("#0A0B0C80")
    assert rgb == 10 * 65536 + 11 * 256 + 12 and hex_color == "#0A0B0C" and transparency == 128 / 255
    for bad in ("ff8000", "#ff80", "#gg0000", "#ff0000zz", 0xFF0000):
        with pytest.raises(ValueError, match="ColorToRGBInt: .*"):
            parse_color(bad)


def test_color_to_rgb_int_in_a_workflow(engine):
    graph = {"1": {"class_type": "ColorToRGBInt", "inputs": {"color": "#336699CC"}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    result = run_graph(engine, graph, keep=["1"])
    assert result.values["1"] == (0x336699, "#336699", 0xCC / 255)
    graph["1"]["inputs"]["color"] = "blue"
    with pytest.raises(WorkflowInvalid, match="#RRGGBB"):
        engine.run(parse_api(graph))


# --- SaveText ---------------------------------------------------------------------------------------------------


def test_save_text_writes_numbered_files_and_pretty_json(engine, tmp_path):
    graph = {"1": {"class_type": "PrimitiveString", "inputs": {"value": 'héllo {"a": [1, 2]}'}},
             "2": {"class_type": "SaveText", "inputs": {"text": ["1", 0], "filename_prefix": "notes/day",
                                                       "format": "txt"}}}
    first = run_graph(engine, graph, keep=["2"])
    assert first.values["2"] == ('héllo {"a": [1, 2]}',)
    assert first.outputs["2"] == {"text": ['héllo {"a": [1, 2]}'],
                             "files": [{"filename": "day_00001.txt", "subfolder": "notes", "type": "output"}]}
    graph["1"]["inputs"]["value"] = "second"
    run_graph(engine, graph, keep=[])
    folder = tmp_path / "output" / "notes"
    assert (folder / "day_00001.txt").read_text(encoding="utf-8") == 'héllo {"a": [1, 2]}'
    assert (folder / "day_00002.txt").read_text(encoding="utf-8") == "second"

    graph["1"]["inputs"]["value"] = '{"b": [1, "ü"]}'
    graph["2"]["inputs"].update(filename_prefix="data", format="json")
    run_graph(engine, graph, keep=[])
    written = (tmp_path / "output" / "data_00001.json").read_text(encoding="utf-8")
    assert written == json.dumps({"b": [1, "ü"]}, indent=2, ensure_ascii=False)
    graph["1"]["inputs"]["value"] = "not json"
    run_graph(engine, graph, keep=[])
    assert (tmp_path / "output" / "data_00002.json").read_text(encoding="utf-8") == "not json"

    graph["2"]["inputs"]["filename_prefix"] = "../outside"
    with pytest.raises(WorkflowInvalid, match="inside the output folder"):
        engine.run(parse_api(graph))


# --- Bounding box crops -----------------------------------------------------------------------------------------


def test_bounding_box_primitive_drives_the_crop(engine):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 60, "height": 40, "batch_size": 2, "color": 0}},
        "2": {"class_type": "PrimitiveBoundingBox", "inputs": {"x": 10, "y": 5, "width": 20, "height": 30}},
        "3": {"class_type": "ImageCropV2", "inputs": {"image": ["1", 0], "crop_region": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    result = run_graph(engine, graph, keep=["2", "3"])
    assert result.values["2"] == ({"x": 10, "y": 5, "width": 20, "height": 30},)
    assert result.values["3"][0].shape == (2, 30, 20, 3)


def test_crop_v2_clamps_the_corner_inside_the_image(engine):
    image = ramp(h=40, w=60)
    for box, (rows, columns) in [({"x": 10, "y": 5, "width": 20, "height": 30}, (slice(5, 35), slice(10, 30))),
                                 ({"x": 100, "y": 90, "width": 8, "height": 8}, (slice(39, 40), slice(59, 60))),
                                 ({"x": 50, "y": 0, "width": 512, "height": 512}, (slice(0, 40), slice(50, 60))),
                                 ({"width": 16}, (slice(0, 40), slice(0, 16)))]:
        torch.testing.assert_close(crop_box(image, box), image[:, rows, columns])
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 60, "height": 40, "batch_size": 1, "color": 0}},
             "2": {"class_type": "ImageCropV2", "inputs": {"image": ["1", 0], "crop_region": {"x": -1, "y": 0}}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    with pytest.raises(WorkflowInvalid, match="x of the bounding box is too small"):
        engine.run(parse_api(graph))
    graph["2"]["inputs"]["crop_region"] = {"__value__": [{"x": 0, "y": 0, "width": 8, "height": 8}]}
    with pytest.raises(WorkflowInvalid, match="a bounding box is a dict"):
        engine.run(parse_api(graph))
    graph["2"]["inputs"]["crop_region"] = {"x": 50, "y": 30, "width": 20, "height": 20}
    result = run_graph(engine, graph, keep=["2"])
    assert result.values["2"][0].shape == (1, 10, 10, 3)


def test_crop_by_bboxes_unions_each_frames_boxes_and_resizes_by_area():
    image = ramp(batch=3, h=160, w=200)
    frames = [[{"x": 10, "y": 20, "width": 50, "height": 60}, {"x": 70, "y": 100, "width": 68, "height": 48}],
              [],  # a frame without boxes gives no crop
              [{"x": 0, "y": 0, "width": 128, "height": 64}]]
    stretched = crop_by_boxes(image, frames, 64, 64, padding=0, keep_aspect="stretch")
    assert stretched.shape == (2, 64, 64, 3)
    # frame 0: the union is x 10..138, y 20..148, 128 x 128 -> a 2 x 2 block mean
    np.testing.assert_allclose(stretched[0].numpy(), block_mean(image[0, 20:148, 10:138].numpy(), 2), atol=1e-6)

    padded = crop_by_boxes(image, frames, 64, 64, padding=0, keep_aspect="pad")
    # frame 2: 128 x 64 fits as 64 x 32, centred 16 rows down on black
    want = np.zeros((64, 64, 3), dtype=np.float32)
    want[16:48] = block_mean(image[2, 0:64, 0:128].numpy(), 2)
    np.testing.assert_allclose(padded[1].numpy(), want, atol=1e-6)

    # padding widens the union and is cut at the image's edges; one box list serves every frame
    grown = crop_by_boxes(image, [[{"x": 4, "y": 8, "width": 60, "height": 60}]], 32, 32, padding=4,
                          keep_aspect="stretch")
    assert grown.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(grown[1].numpy(), torch.nn.functional.interpolate(
        image[1:2, 4:72, 0:68].permute(0, 3, 1, 2), size=(32, 32), mode="area")[0].permute(1, 2, 0).numpy(),
        atol=1e-6)

    # an empty union falls back to a centred square of 0.3 of the shorter side, 0.1 of the height down
    fallback = crop_by_boxes(image[:1], [[{"x": 300, "y": 300, "width": 10, "height": 10}]], 48, 48, 0, "stretch")
    np.testing.assert_allclose(fallback[0].numpy(), image[0, 16:64, 76:124].numpy(), atol=1e-6)
    assert crop_by_boxes(image, [[]], 64, 64, 0, "stretch") is None


def test_crop_by_bboxes_in_a_workflow_and_bad_boxes(engine):
    node = CropByBBoxes()
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1,
                                                     "color": 0x102030}},
        "2": {"class_type": "PrimitiveBoundingBox", "inputs": {"x": 0, "y": 0, "width": 64, "height": 32}},
        "3": {"class_type": "CropByBBoxes", "inputs": {"image": ["1", 0], "bboxes": ["2", 0], "output_width": 64,
                                                       "output_height": 64, "padding": 0, "keep_aspect": "pad"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    shown = {}
    result = engine.run(parse_api(graph), keep=["3"], on_event=lambda event: shown.update(
        {event.node: event.output} if getattr(event, "kind", "") == "executed" else {}))
    assert result.ok, result.error
    out = result.values["3"][0]
    assert out.shape == (1, 64, 64, 3)
    colour = torch.tensor([0x10, 0x20, 0x30]) / 255
    torch.testing.assert_close(out[0, 16:48], colour.expand(32, 64, 3), atol=1e-6, rtol=0)
    assert out[0, :16].abs().max() == 0 and out[0, 48:].abs().max() == 0
    assert shown["3"]["input_bboxes"] == [{"x": 0, "y": 0, "width": 64, "height": 32}]
    assert shown["3"]["source_images"][0]["type"] == "temp"  # the first source picture, for the editor
    with pytest.raises(ValueError, match="CropByBBoxes: each box needs numbers x, y, width and height"):
        node.execute(ramp(), [[{"x": 0, "y": 0}]], 64, 64, 0)
    with pytest.raises(ValueError, match="CropByBBoxes: bboxes must be a box or a list of box lists"):
        node.execute(ramp(), [{"x": 0, "y": 0, "width": 4, "height": 4}], 64, 64, 0)


# --- ImageCropToMask --------------------------------------------------------------------------------------------


def test_crop_to_mask_composites_the_widened_box_over_the_background():
    image = ramp(h=40, w=60)
    mask = torch.zeros(1, 40, 60)
    mask[:, 10:20, 20:40] = 1.0
    node = ImageCropToMask()
    (out,) = node.execute(image, mask, 64, 64, 1.0, 0, "#ff0000")
    # the box is 20 x 10 around (29.5, 14.5); square output -> 20 x 20 from (19, 4) to (39, 24)
    red = np.array([1.0, 0.0, 0.0], dtype=np.float32)[:, None, None]
    region = image[0, 4:24, 19:39].permute(2, 0, 1).numpy()
    inside = mask[0, 4:24, 19:39].numpy()[None]
    want = pil_lanczos(region * inside + red * (1 - inside), 64, 64)
    np.testing.assert_allclose(out[0].numpy(), want, atol=1e-6)


def test_crop_to_mask_pads_outside_the_picture_and_flips_an_inverted_mask():
    image = ramp(h=32, w=32, seed=3)
    mask = torch.ones(32, 32)
    mask[0:8, 0:16] = 0.0  # border mostly 1, centre mostly 1 too: not flipped
    composite = crop_to_mask(image[0], mask, 1024, 1.0, 0, (0.0, 0.0, 1.0), 1.0)
    assert composite.shape == (1, 3, 32, 32)  # the whole picture is the mask's box

    mask = torch.ones(32, 32)
    mask[12:20, 0:8] = 0.0  # the subject (0) touches the left edge; border mean > 0.5, centre < 0.5 -> flipped
    mask[8:24, 8:24] = 0.0
    composite = crop_to_mask(image[0], mask, 1024, 1.0, 0, (0.0, 0.0, 1.0), 1.0)
    # flipped subject spans x 0..23, y 8..23: 24 wide -> 24 x 24 about (11.5, 15.5) -> x -0.5 -> 0 .. 24, y 3 .. 27
    assert composite.shape == (1, 3, 24, 24)
    flipped = 1.0 - mask[3:27, 0:24]
    blue = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    want = image[0, 3:27, 0:24].permute(2, 0, 1) * flipped + blue * (1 - flipped)
    torch.testing.assert_close(composite[0], want)

    mask = torch.zeros(32, 32)
    mask[0:4, 0:4] = 1.0  # a corner subject at pad 2: the crop runs off the picture, zero-padded
    composite = crop_to_mask(image[0], mask, 1024, 2.0, 0, (0.0, 1.0, 0.0), 1.0)
    # box 4 x 4 about (1.5, 1.5), 8 x 8 -> from (-2, -2): two padded rows and columns of background
    assert composite.shape == (1, 3, 8, 8)
    torch.testing.assert_close(composite[0, :, :2, :], torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 2, 8))
    torch.testing.assert_close(composite[0, :, 2:6, 2:6], image[0, 0:4, 0:4].permute(2, 0, 1))


def test_crop_to_mask_grows_the_mask_and_checks_its_input(engine):
    image = ramp(h=24, w=24, seed=5)
    mask = torch.zeros(24, 24)
    mask[10:14, 10:14] = 1.0
    composite = crop_to_mask(image[0], mask, 1024, 1.0, 2, (0.0, 0.0, 0.0), 1.0)
    # grown to rows and columns 8..15; the 8 x 8 crop about 11.5 starts at int(7.5) = 7, one row and column early
    grown = torch.zeros(24, 24)
    grown[8:16, 8:16] = 1.0
    assert composite.shape == (1, 3, 8, 8)
    torch.testing.assert_close(composite[0], (image[0, 7:15, 7:15] * grown[7:15, 7:15, None]).permute(2, 0, 1))
    node = ImageCropToMask()
    with pytest.raises(ValueError, match="ImageCropToMask: 2 masks for 3 images"):
        node.execute(ramp(batch=3), torch.ones(2, 40, 60), 64, 64, 1.0, 0, "#000000")
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
             "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
             "3": {"class_type": "ImageCropToMask", "inputs": {
                 "images": ["1", 0], "masks": ["2", 0], "width": 64, "height": 64, "pad_factor": 1.0,
                 "grow_mask": 0, "background": "#zz0000"}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    with pytest.raises(WorkflowInvalid, match="ImageCropToMask: 'zz' is not a hexadecimal colour"):
        engine.run(parse_api(graph))
    graph["3"]["inputs"]["background"] = "#000000"
    out = run_graph(engine, graph, keep=["3"]).values["3"][0]
    assert out.shape == (1, 64, 64, 3) and out.abs().max() == 0  # a black picture on black


# --- CreateBoundingBoxes ----------------------------------------------------------------------------------------


def test_create_bounding_boxes_from_the_canvas(engine):
    state = [{"x": 100, "y": 50, "width": 200, "height": 100,
              "metadata": {"type": "text", "text": "Hi", "desc": "title", "palette": ["#ff0000", "#00ff00"]}},
             {"x": 0, "y": 0, "width": 1000, "height": 400}]
    graph = {"1": {"class_type": "CreateBoundingBoxes", "inputs": {"width": 1000, "height": 400,
                                                                   "editor_state": {"__value__": state}}}}
    result = run_graph(engine, graph, keep=["1"])
    preview, boxes, elements = result.values["1"]
    assert boxes == [[{"x": 100, "y": 50, "width": 200, "height": 100}, {"x": 0, "y": 0, "width": 1000,
                                                                          "height": 400}]]
    assert elements == [{"type": "text", "bbox": [125, 100, 375, 300], "text": "Hi", "desc": "title",
                         "color_palette": ["#FF0000", "#00FF00"]},
                        {"type": "obj", "bbox": [0, 0, 1000, 1000], "desc": ""}]
    assert result.outputs["1"] == {"dims": [1000, 400]}
    assert preview.shape == (1, 400, 1000, 3)
    grey = round(0.25 * 128) / 255
    assert preview[0, 200, 500].tolist() == pytest.approx([grey] * 3)  # inside the second box, away from text
    assert preview[0, 75, 100].tolist() == pytest.approx([1.0, 0.0, 0.0])  # the red outline, left side


def test_create_bounding_boxes_takes_a_new_upstream_value_over_the_canvas():
    node = CreateBoundingBoxes()
    elements = json.dumps([{"type": "obj", "bbox": [100, 200, 500, 600], "desc": "cat",
                            "color_palette": ["#0000ff"]}])
    canvas = [{"x": 1, "y": 2, "width": 3, "height": 4}]
    result = node.execute(width=512, height=256, editor_state=canvas, bboxes=elements)
    incoming = [{"x": round(0.2 * 512), "y": round(0.1 * 256), "width": round(0.4 * 512), "height": round(0.4 * 256),
                 "metadata": {"type": "obj", "text": "", "desc": "cat", "palette": ["#0000ff"]}}]
    assert result.ui["input_bboxes"] == incoming
    assert result.outputs[1] == [[{k: incoming[0][k] for k in ("x", "y", "width", "height")}]]
    # the element comes back from the pixel box: 26 / 256 -> 102, 102 / 512 -> 199 on the 0..1000 grid
    assert result.outputs[2] == [{"type": "obj", "bbox": [102, 199, 500, 600], "desc": "cat",
                                  "color_palette": ["#0000FF"]}]
    # once the canvas has taken that value, its own boxes stand
    again = node.execute(width=512, height=256, editor_state=canvas, bboxes=elements, last_incoming=incoming)
    assert again.outputs[1] == [canvas]
    # a background image is dimmed to a quarter
    background = torch.full((1, 64, 128, 3), 0.8)
    dimmed = node.execute(width=512, height=256, editor_state=[], background=background).outputs[0]
    assert dimmed.shape == (1, 64, 128, 3)
    assert dimmed[0, 10, 10].tolist() == pytest.approx([round(204 * 0.25) / 255] * 3, abs=1.5 / 255)
    with pytest.raises(ValueError, match="CreateBoundingBoxes: bboxes element is missing a valid 'bbox'"):
        node.execute(width=512, height=256, editor_state=[], bboxes=[{"bbox": [1, 2, 3, 4]}, {"bbox": [1, 2]}])
    with pytest.raises(ValueError, match="CreateBoundingBoxes: bboxes string input is not valid JSON"):
        node.execute(width=512, height=256, editor_state=[], bboxes="[{")
