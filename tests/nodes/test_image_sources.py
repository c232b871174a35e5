"""LoadImageOutput and WebcamCapture: files from output/ (and the annotated names ComfyUI's editor writes), the
webcam picture stretched to its capture size, and clear refusals of missing files and paths out of their folder."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

import nodes.sd.image
import nodes.sd.image_sources
from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import NodeRegistry
from nodes.sd.image import SaveImage, resize_image
from nodes.sd.image_sources import LoadImageOutput, WebcamCapture, list_output_images
from nodes.sd.imageio import load_image_file


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path)
    for folder in (paths.input, paths.output, paths.temp):
        folder.mkdir(parents=True)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def run(cls, **inputs):
    node = cls()
    node.ctx = NodeContext()
    return node.execute(**inputs)


def picture(path, size=(6, 4), alpha=True):
    """A small RGBA (or RGB) picture with distinct pixels; the top-left one transparent."""
    image = Image.new("RGBA" if alpha else "RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            image.putpixel((x, y), (40 * x, 60 * y, 200, 255) if alpha else (40 * x, 60 * y, 200))
    if alpha:
        image.putpixel((0, 0), (0, 0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_load_image_output_reads_a_saved_result(folders):
    saved = torch.rand(1, 8, 12, 3)
    name = run(SaveImage, images=saved, filename_prefix="runs/cat").ui["images"][0]["filename"]
    assert LoadImageOutput.check_inputs({"image": f"runs/{name}"}) is None
    image, mask = run(LoadImageOutput, image=f"runs/{name}")
    assert image.shape == (1, 8, 12, 3) and mask.shape == (1, 8, 12) and mask.abs().sum() == 0
    torch.testing.assert_close(image, (saved * 255).round() / 255, rtol=0, atol=1e-6)  # 8-bit PNG


def test_load_image_output_is_load_image_of_that_file(folders):
    picture(folders.output / "a.png")
    expected_image, expected_mask = load_image_file(folders.output / "a.png")
    for name in ("a.png", "a.png [output]", "a.png[output]"):
        image, mask = run(LoadImageOutput, image=name)
        assert torch.equal(image, expected_image) and torch.equal(mask, expected_mask)
    assert mask[0, 0, 0] == 1.0 and mask[0, 1, 1] == 0.0  # 1 - alpha, as LoadImage


def test_annotations_pick_the_folder(folders):
    picture(folders.input / "in.png", size=(3, 3))
    picture(folders.temp / "webcam" / "cam.png", size=(5, 2))
    assert run(LoadImageOutput, image="in.png [input]")[0].shape == (1, 3, 3, 3)
    assert run(LoadImageOutput, image="webcam/cam.png [temp]")[0].shape == (1, 2, 5, 3)
    assert "not found in the output folder" in LoadImageOutput.check_inputs({"image": "in.png"})


def test_the_list_is_newest_first_and_only_images(folders):
    for i, name in enumerate(["old.png", "sub/mid.png", "new.png"]):
        os.utime(picture(folders.output / name), ns=(10**18 + i * 10**9,) * 2)
    (folders.output / "notes.txt").write_text("not an image")
    assert list_output_images() == ["new.png", "sub/mid.png", "old.png"]
    assert LoadImageOutput.object_info()["input"]["required"]["image"] == [
        ["new.png", "sub/mid.png", "old.png"], {"image_upload": True, "image_folder": "output"}]


@pytest.mark.parametrize("name", ["../secret.png", "../input/in.png", "sub/../../secret.png", "link.png",
                                  "../secret.png [output]", "../../secret.png [temp]"])
def test_paths_out_of_the_folder_are_refused(folders, name):
    picture(folders.base / "secret.png")
    picture(folders.input / "in.png")
    (folders.output / "link.png").symlink_to(folders.base / "secret.png")
    problem = LoadImageOutput.check_inputs({"image": name})
    assert "is outside the" in problem and "folder" in problem
    with pytest.raises(FileNotFoundError, match="is outside the"):
        run(LoadImageOutput, image=name)
    assert LoadImageOutput.fingerprint({"image": name}) is None


def test_an_absolute_path_is_refused(folders):
    path = picture(folders.base / "secret.png")
    assert "is outside the output folder" in LoadImageOutput.check_inputs({"image": str(path)})
    assert "is outside the input folder" in WebcamCapture.check_inputs({"image": str(path)})


def test_missing_and_unreadable_files_get_clear_errors(folders):
    assert LoadImageOutput.check_inputs({"image": "gone.png"}) == (
        f"image 'gone.png' not found in the output folder ({folders.output.resolve()})")
    with pytest.raises(FileNotFoundError, match="'gone.png' not found in the output folder"):
        run(LoadImageOutput, image="gone.png")
    assert "no image named" in LoadImageOutput.check_inputs({"image": ""})
    (folders.output / "fake.png").write_text("not an image")
    assert "fake.png is not a readable image" in LoadImageOutput.check_inputs({"image": "fake.png"})
    assert "'cam.png' not found in the temp folder" in WebcamCapture.check_inputs({"image": "cam.png [temp]"})


def test_the_fingerprint_follows_the_files_bytes(folders):
    picture(folders.output / "a.png")
    before = LoadImageOutput.fingerprint({"image": "a.png"})
    assert before == LoadImageOutput.fingerprint({"image": "a.png [output]"})
    picture(folders.output / "a.png", size=(7, 4))
    assert LoadImageOutput.fingerprint({"image": "a.png"}) not in (None, before)


def test_webcam_capture_is_the_picture_at_its_own_size_by_default(folders):
    picture(folders.temp / "webcam" / "1700000000.png", size=(8, 6), alpha=False)
    (image,) = run(WebcamCapture, image="webcam/1700000000.png [temp]", width=0, height=0, capture_on_queue=True)
    assert torch.equal(image, load_image_file(folders.temp / "webcam" / "1700000000.png")[0])
    assert WebcamCapture.check_inputs({"image": "webcam/1700000000.png [temp]"}) is None


def test_webcam_capture_stretches_to_the_capture_size(folders):
    picture(folders.input / "cam.png", size=(8, 6), alpha=False)
    original = load_image_file(folders.input / "cam.png")[0]
    (image,) = run(WebcamCapture, image="cam.png", width=16, height=6, capture_on_queue=False)
    assert image.shape == (1, 6, 16, 3)  # stretched, not cropped: the aspect ratio is not kept
    assert torch.equal(image, resize_image(original, 16, 6, "bilinear"))
    # One side 0 keeps that side of the picture (the browser's capture uses the camera's own size for it).
    assert run(WebcamCapture, image="cam.png", width=0, height=3, capture_on_queue=True)[0].shape == (1, 3, 8, 3)
    assert run(WebcamCapture, image="cam.png", width=4, height=0, capture_on_queue=True)[0].shape == (1, 6, 4, 3)


def test_schemas_are_comfyuis():
    webcam = WebcamCapture.object_info()
    assert webcam["input_order"]["required"] == ["image", "width", "height", "capture_on_queue"]
    assert webcam["input"]["required"]["width"][1] == {"default": 0, "min": 0, "max": 16384, "step": 1}
    assert webcam["input"]["required"]["capture_on_queue"] == ["BOOLEAN", {"default": True}]
    assert webcam["output"] == ["IMAGE"] and webcam["category"] == "image"
    output = LoadImageOutput.object_info()
    assert output["input_order"]["required"] == ["image"] and output["output"] == ["IMAGE", "MASK"]
    assert output["display_name"] == "Load Image (from Outputs)"


@pytest.fixture
def engine(folders):
    registry = NodeRegistry()
    registry.register_module(nodes.sd.image)
    registry.register_module(nodes.sd.image_sources)
    return Executor(registry, services=Services.create(folders, force_cpu=True))


def test_a_workflow_reloads_its_last_result_and_validation_names_bad_files(engine, folders):
    picture(folders.input / "cam.png", size=(8, 6))
    first = {"1": {"class_type": "WebcamCapture", "inputs": {"image": "cam.png", "width": 16, "height": 12,
                                                             "capture_on_queue": True}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cam"}}}
    result = engine.run(parse_api(first))
    assert result.ok, result.error
    saved = result.outputs["2"]["images"][0]["filename"]
    second = {"1": {"class_type": "LoadImageOutput", "inputs": {"image": f"{saved} [output]"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    result = engine.run(parse_api(second), keep=["1"])
    assert result.ok, result.error
    assert result.values["1"][0].shape == (1, 12, 16, 3)

    second["1"]["inputs"]["image"] = "../input/cam.png"
    with pytest.raises(WorkflowInvalid) as err:
        engine.run(parse_api(second))
    [problem] = err.value.problems
    assert (problem.node_id, problem.type) == ("1", "custom_validation_failed")
    assert "'../input/cam.png' is outside the output folder" in problem.details


def test_an_image_larger_than_pillow_decodes_is_refused_at_validation(engine, folders):
    # 20000 x 20000 one-bit pixels: a 50 kB file whose header claims more than Pillow's decompression-bomb limit.
    from PIL import Image

    Image.new("1", (20000, 20000)).save(folders.output / "huge.png")
    Image.new("1", (20000, 20000)).save(folders.input / "huge.png")
    for node in ({"class_type": "LoadImageOutput", "inputs": {"image": "huge.png [output]"}},
                 {"class_type": "WebcamCapture", "inputs": {"image": "huge.png", "width": 0, "height": 0,
                                                             "capture_on_queue": True}}):
        with pytest.raises(WorkflowInvalid) as err:
            engine.run(parse_api({"1": node, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}))
        [problem] = err.value.problems
        assert (problem.node_id, problem.type) == ("1", "custom_validation_failed")
        assert "huge.png" in problem.details and "is too large to load" in problem.details
