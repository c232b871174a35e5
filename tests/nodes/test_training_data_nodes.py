"""The training data set nodes: pictures of an input folder as a batch (sizes fitted as asked), their captions
encoded one per picture as CLIPTextEncode would, kohya's repeat folders, and a data set trained on by Train LoRA."""

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.training_data import input_subfolders


def picture(path, width: int, height: int, value: int) -> None:
    rows = np.arange(height, dtype=np.uint8)[:, None, None] * 8
    array = np.broadcast_to(rows + np.array([value, 0, 255 - value], dtype=np.uint8), (height, width, 3))
    Image.fromarray(np.ascontiguousarray(array)).save(path)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    shapes = root / "input" / "shapes"
    (shapes / "2_extra").mkdir(parents=True)
    picture(shapes / "a.png", 16, 16, 200)
    picture(shapes / "b.png", 16, 16, 100)
    picture(shapes / "c.png", 8, 12, 50)  # 8 wide, 12 high
    (shapes / "a.txt").write_text("a red square\n")
    (shapes / "c.txt").write_text("")
    picture(shapes / "2_extra" / "d.png", 16, 16, 0)
    (shapes / "2_extra" / "d.txt").write_text("a blue square")
    (root / "input" / "empty").mkdir()
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def run(engine, wf: dict, node: str):
    return engine.run(parse_api(wf), keep=[node], outputs=[node])


def images(engine, method: str) -> torch.Tensor:
    wf = {"1": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "shapes", "resize_method": method}}}
    result = run(engine, wf, "1")
    assert result.ok, result.error
    return result.values["1"][0]


def test_the_folder_combo_lists_the_input_subfolders(engine):
    assert input_subfolders() == ["empty", "shapes", "shapes/2_extra"]


def test_pictures_of_another_size_are_fitted_as_asked(engine):
    result = run(engine, {"1": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "shapes"}}}, "1")
    assert not result.ok and "c.png is 8x12 and the data set 16x16" in result.error.exception_message
    stretched, cropped, padded = (images(engine, m) for m in ("Stretch", "Crop", "Pad"))
    assert stretched.shape == cropped.shape == padded.shape == (3, 16, 16, 3)  # the folder alone, sub-folders not
    assert torch.equal(stretched[0], cropped[0])  # the first picture sets the size and stays as it is
    with Image.open(engine.services.paths.input / "shapes" / "c.png") as source:
        original = torch.from_numpy(np.asarray(source.convert("RGB"), dtype=np.float32) / 255)
    # Crop: the top left 8x12 is the picture, the rest black; Pad: scaled to 11x16 (aspect kept), centred.
    assert torch.equal(cropped[2, :12, :8], original) and cropped[2, 12:].abs().sum() == 0
    assert padded[2, :, :2].abs().sum() == 0 and padded[2, :, 13:].abs().sum() == 0
    assert padded[2, :, 3:13].abs().sum() > 0


def test_captions_are_encoded_one_per_picture_as_clip_text_encode_would(engine):
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
          "2": {"class_type": "LoadImageTextSetFromFolderNode", "inputs": {
              "folder": "shapes", "clip": ["1", 1], "resize_method": "Stretch", "width": 24, "height": -1}}}
    for i, text in enumerate(("a red square", "", "a blue square")):
        wf[f"t{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
    result = engine.run(parse_api(wf), keep=["2", "t0", "t1", "t2"], outputs=["2", "t0", "t1", "t2"])
    assert result.ok, result.error
    pictures, conditioning = result.values["2"]
    # By name: the 2_extra folder's d twice, then a, b, c; stretched to 24 wide and the first picture's 16 high.
    assert pictures.shape == (5, 16, 24, 3)
    assert torch.equal(pictures[0], pictures[1]) and not torch.equal(pictures[1], pictures[2])
    red, empty, blue = (result.values[f"t{i}"][0][0][0] for i in range(3))
    expected = [blue, blue, red, empty, empty]  # b has no caption file, c an empty one
    assert len(conditioning) == 5 and all(torch.equal(c[0], e) for c, e in zip(conditioning, expected, strict=True))


def test_a_data_set_trains_with_one_prompt_per_picture(engine):
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
          "2": {"class_type": "LoadImageTextSetFromFolderNode", "inputs": {
              "folder": "shapes", "clip": ["1", 1], "resize_method": "Pad"}},
          "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
          "4": {"class_type": "TrainLoraNode", "inputs": {
              "model": ["1", 0], "latents": ["3", 0], "positive": ["2", 1], "batch_size": 5,
              "grad_accumulation_steps": 2, "steps": 2, "learning_rate": 0.001, "rank": 2, "optimizer": "Adam",
              "loss_function": "Huber", "seed": 3, "training_dtype": "fp32", "lora_dtype": "fp32",
              "algorithm": "LoRA", "gradient_checkpointing": False, "existing_lora": "[None]"}}}
    result = run(engine, wf, "4")
    assert result.ok, result.error
    assert len(result.values["4"][2]["loss"]) == 2 and result.values["4"][3] == 2


def test_missing_and_empty_folders_are_refused(engine):
    result = run(engine, {"1": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "empty"}}}, "1")
    assert not result.ok and "input folder 'empty' holds no pictures" in result.error.exception_message
    with pytest.raises(WorkflowInvalid, match="nowhere"):
        run(engine, {"1": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "nowhere"}}}, "1")
