"""ComfyUI's data set nodes (nodes/sd/dataset.py): their declarations, folders of pictures, videos and captions as
lists, the per-item edits against transcriptions of ComfyUI's Pillow and NumPy arithmetic, the seeded shuffles and
crops, and a training data set made, saved as ComfyUI's shards, loaded back and trained on."""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.load import graph_from_data
from graph.ui_format import ui_to_api
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd import dataset
from nodes.sd.video import Video

# name: (display name, category, required inputs, optional inputs, outputs, output names, output is list)
IMG, STR, VID, LAT, CON = "IMAGE", "STRING", "VIDEO", "LATENT", "CONDITIONING"
INTERFACES = {
    "LoadImageDataSetFromFolder": ("Load Image (from Folder)", "image", ["folder"], [], [IMG], ["images"], [True]),
    "LoadImageTextDataSetFromFolder": ("Load Image-Text (from Folder)", "image", ["folder"], [], [IMG, STR],
                                       ["images", "texts"], [True, True]),
    "LoadVideoDataSetFromFolder": ("Load Video (from Folder)", "video", ["folder"], [], [VID], ["videos"], [True]),
    "LoadVideoTextDataSetFromFolder": ("Load Video-Text (from Folder)", "video", ["folder"], [], [VID, STR],
                                       ["videos", "texts"], [True, True]),
    "SaveImageDataSetToFolder": ("Save Image (to Folder) (DEPRECATED)", "image",
                                 ["images", "folder_name", "filename_prefix", "mode"], [], [], [], []),
    "SaveImageTextDataSetToFolder": ("Save Image-Text (to Folder)", "image",
                                     ["images", "folder_name", "filename_prefix", "mode"], ["texts"], [], [], []),
    "ResizeImagesByShorterEdge": ("Resize Images by Shorter Edge (DEPRECATED)", "image/transform",
                                  ["images", "shorter_edge"], [], [IMG], ["images"], [False]),
    "CenterCropImages": ("Crop Image (Center)", "image/transform", ["images", "width", "height"], [], [IMG],
                         ["images"], [False]),
    "RandomCropImages": ("Crop Image (Random)", "image/transform", ["images", "width", "height", "seed"], [], [IMG],
                         ["images"], [False]),
    "NormalizeImages": ("Normalize Image Colors", "image/color", ["images", "mean", "std"], [], [IMG], ["images"],
                        [False]),
    "AdjustBrightness": ("Adjust Brightness", "image/adjustments", ["images", "factor"], [], [IMG], ["images"],
                         [False]),
    "AdjustContrast": ("Adjust Contrast", "image/adjustments", ["images", "factor"], [], [IMG], ["images"], [False]),
    "ShuffleDataset": ("Shuffle Images List", "image/batch", ["images", "seed"], [], [IMG], ["images"], [True]),
    "ShuffleImageTextDataset": ("Shuffle Pairs of Image-Text", "image/batch", ["images", "texts", "seed"], [],
                                [IMG, STR], ["images", "texts"], [True, True]),
    "ImageDeduplication": ("Deduplicate Images", "image/batch", ["images", "similarity_threshold"], [], [IMG],
                           ["images"], [True]),
    "ImageGrid": ("Make Image Grid", "image/batch", ["images", "columns", "cell_width", "cell_height", "padding"],
                  [], [IMG], ["images"], [False]),
    "MergeImageLists": ("Merge Image Lists (DEPRECATED)", "image/batch", ["images"], [], [IMG], ["images"], [True]),
    "VideoFrameSample": ("Sample Video Frame", "video", ["video", "num_frames", "strategy", "seed"], [], [VID],
                         ["video"], [False]),
    "VideoTemporalCrop": ("Crop Video (Temporal)", "video/transform", ["video", "start_frame", "length"], [], [VID],
                          ["video"], [False]),
    "VideoRandomTemporalCrop": ("Crop Video (Temporal Random)", "video/transform", ["video", "length", "seed"], [],
                                [VID], ["video"], [False]),
    "ShuffleVideoDataset": ("Shuffle Videos List", "video/batch", ["videos", "seed"], [], [VID], ["videos"], [True]),
    "ShuffleVideoTextDataset": ("Shuffle Pairs of Video-Text", "video/batch", ["videos", "texts", "seed"], [],
                                [VID, STR], ["videos", "texts"], [True, True]),
    "TextToLowercase": ("Convert Text to Lowercase (DEPRECATED)", "text", ["texts"], [], [STR], ["texts"], [False]),
    "TextToUppercase": ("Convert Text to Uppercase (DEPRECATED)", "text", ["texts"], [], [STR], ["texts"], [False]),
    "TruncateText": ("Truncate Text", "text", ["texts", "max_length"], [], [STR], ["texts"], [False]),
    "AddTextPrefix": ("Add Text Prefix (DEPRECATED)", "text", ["texts", "prefix"], [], [STR], ["texts"], [False]),
    "AddTextSuffix": ("Add Text Suffix (DEPRECATED)", "text", ["texts", "suffix"], [], [STR], ["texts"], [False]),
    "ReplaceText": ("Replace Text (DEPRECATED)", "text", ["texts", "find", "replace"], [], [STR], ["texts"], [False]),
    "StripWhitespace": ("Strip Whitespace (DEPRECATED)", "text", ["texts"], [], [STR], ["texts"], [False]),
    "MergeTextLists": ("Merge Text Lists (DEPRECATED)", "text", ["texts"], [], [STR], ["texts"], [True]),
    "ResolutionBucket": ("Resolution Bucket", "model/training", ["latents", "conditioning"], [], [LAT, CON],
                         ["latents", "conditioning"], [True, True]),
    "MakeTrainingDataset": ("Make Training Dataset", "model/training", ["images", "vae", "clip"], ["texts"],
                            [LAT, CON], ["latents", "conditioning"], [True, True]),
    "SaveTrainingDataset": ("Save Training Dataset", "model/training",
                            ["latents", "conditioning", "folder_name", "shard_size"], [], [], [], []),
    "LoadTrainingDataset": ("Load Training Dataset", "model/training", ["folder_name"], [], [LAT, CON],
                            ["latents", "conditioning"], [True, True]),
}
# The nodes ComfyUI declares is_input_list (the others run once per item of a list).
TAKES_LISTS = {"SaveImageDataSetToFolder", "SaveImageTextDataSetToFolder", "ShuffleDataset", "ShuffleImageTextDataset",
               "ImageDeduplication", "ImageGrid", "MergeImageLists", "ShuffleVideoDataset", "ShuffleVideoTextDataset",
               "MergeTextLists", "ResolutionBucket", "MakeTrainingDataset", "SaveTrainingDataset"}


def picture(path, width: int, height: int, seed: int) -> np.ndarray:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def write_video(path, values: list[int], fps: int = 8) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for value in values:
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), value, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset_nodes")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    pics = root / "input" / "pics"
    (pics / "2_more").mkdir(parents=True)
    picture(pics / "a.png", 20, 12, 1)
    picture(pics / "b.png", 10, 14, 2)
    (pics / "a.txt").write_text("  A Red Square\n")
    picture(pics / "2_more" / "d.png", 16, 16, 3)
    (pics / "2_more" / "d.txt").write_text("a blue square")
    clips = root / "input" / "clips"
    clips.mkdir()
    write_video(clips / "one.mp4", [0, 60, 120, 180])
    write_video(clips / "two.mp4", [200, 100])
    (clips / "two.txt").write_text("two frames")
    (root / "input" / "empty").mkdir()
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def run(engine, wf: dict, *keep: str):
    result = engine.run(parse_api(wf), keep=list(keep), outputs=list(keep))
    assert result.ok, result.error
    return result


def failure(engine, wf: dict, node: str) -> str:
    result = engine.run(parse_api(wf), keep=[node], outputs=[node])
    assert not result.ok
    return result.error.exception_message


def eight_bit(image: torch.Tensor) -> np.ndarray:
    """ComfyUI's tensor_to_pil bytes: int(255 * value), clipped."""
    return (image.reshape(image.shape[-3:]).numpy() * 255).clip(0, 255).astype(np.uint8)


# --- Declarations -----------------------------------------------------------------------------------------------------


def test_every_node_is_registered_with_comfyuis_declaration(engine):
    registry = engine.registry
    assert sorted(INTERFACES) == sorted(cls.name for cls in dataset.NODES)
    for name, (display, category, required, optional, outputs, names, is_list) in INTERFACES.items():
        cls = registry.get(name)
        info = cls.object_info()
        assert (info["display_name"], info["category"]) == (display, category), name
        assert info["input_order"] == {"required": required, "optional": optional}, name
        assert (info["output"], info["output_name"], info["output_is_list"]) == (outputs, names, is_list), name
        assert cls.input_is_list == (name in TAKES_LISTS), name


def test_widget_defaults_and_ranges_are_comfyuis(engine):
    def options(node, key):
        return engine.registry.get(node).object_info()["input"]["required"][key][1]

    assert options("RandomCropImages", "seed") | {"tooltip": None} == {
        "default": 0, "min": 0, "max": 2**64 - 1, "step": 1, "tooltip": None}
    assert [options("ImageGrid", k)["default"] for k in ("columns", "cell_width", "cell_height", "padding")] == [
        4, 256, 256, 4]
    assert options("ImageGrid", "cell_width")["advanced"] is True and "advanced" not in options("ImageGrid", "columns")
    assert (options("NormalizeImages", "std")["min"], options("NormalizeImages", "mean")["default"]) == (0.001, 0.5)
    assert (options("TruncateText", "max_length")["default"], options("ImageDeduplication", "similarity_threshold")[
        "default"]) == (77, 0.95)
    assert engine.registry.get("SaveImageTextDataSetToFolder").object_info()["input"]["required"]["mode"] == [
        ["overwrite", "increment"], {"default": "overwrite", "tooltip": options("SaveImageDataSetToFolder", "mode")[
            "tooltip"]}]
    assert options("SaveTrainingDataset", "folder_name")["default"] == "training_dataset"
    assert engine.registry.get("VideoFrameSample").object_info()["input"]["required"]["strategy"][0] == [
        "uniform", "head", "tail", "random"]
    assert engine.registry.get("TextToLowercase").widget_names() == ["texts"]


# --- Folders and saving -----------------------------------------------------------------------------------------------


def test_folders_load_as_lists_with_captions_and_kohya_repeats(engine):
    pics = engine.services.paths.input / "pics"
    wf = {"1": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "pics"}},
          "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "pics"}}}
    result = run(engine, wf, "1", "2")
    (alone,) = result.values["1"]
    images, texts = result.values["2"]
    files = {name: np.asarray(Image.open(pics / name).convert("RGB"), dtype=np.float32) / 255
             for name in ("a.png", "b.png", "2_more/d.png")}
    assert [tuple(i.shape) for i in alone] == [(1, 12, 20, 3), (1, 14, 10, 3)]  # each at its own size
    assert np.array_equal(alone[0][0].numpy(), files["a.png"]) and np.array_equal(alone[1][0].numpy(), files["b.png"])
    # The 2_more folder's d twice (by name, before a and b); captions trimmed, none for b.
    assert [np.array_equal(i[0].numpy(), files[n]) for i, n in zip(images, ["2_more/d.png"] * 2 + ["a.png", "b.png"],
                                                                        strict=True)] == [True] * 4
    assert list(texts) == ["a blue square", "a blue square", "A Red Square", ""]


def test_video_folders_load_each_video_and_caption(engine):
    wf = {"1": {"class_type": "LoadVideoTextDataSetFromFolder", "inputs": {"folder": "clips"}},
          "2": {"class_type": "LoadVideoDataSetFromFolder", "inputs": {"folder": "clips"}}}
    result = run(engine, wf, "1", "2")
    videos, texts = result.values["1"]
    assert [len(v.images) for v in videos] == [4, 2] and list(texts) == ["", "two frames"]
    assert [float(v.fps) for v in result.values["2"][0]] == [8.0, 8.0]
    # mpeg4 is lossy: solid grey levels come back within a few steps.
    assert (videos[0].images[:, 8, 8, 0] * 255 - torch.tensor([0, 60, 120, 180])).abs().max() < 4


def test_edited_pictures_and_captions_are_saved_to_an_output_folder(engine):
    wf = {"1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "pics"}},
          "2": {"class_type": "AdjustBrightness", "inputs": {"images": ["1", 0], "factor": 1.5}},
          "3": {"class_type": "AddTextPrefix", "inputs": {"texts": ["1", 1], "prefix": "photo, "}},
          "4": {"class_type": "SaveImageTextDataSetToFolder", "inputs": {
              "images": ["2", 0], "texts": ["3", 0], "folder_name": "sets/run1", "filename_prefix": "img",
              "mode": "overwrite"}},
          "5": {"class_type": "SaveImageDataSetToFolder", "inputs": {
              "images": ["1", 0], "folder_name": "plain", "filename_prefix": "pic", "mode": "increment"}}}
    run(engine, wf, "4", "5")
    folder = engine.services.paths.output / "sets" / "run1"
    assert sorted(p.name for p in folder.iterdir()) == [f"img_{i:05d}.{s}" for i in range(4) for s in ("png", "txt")]
    source = np.asarray(Image.open(engine.services.paths.input / "pics" / "a.png"), dtype=np.float32) / 255
    expected = (np.clip(source * 1.5, 0, 1) * 255).clip(0, 255).astype(np.uint8)  # brightened, then truncated
    assert np.array_equal(np.asarray(Image.open(folder / "img_00002.png")), expected)
    assert (folder / "img_00002.txt").read_text() == "photo, A Red Square"
    assert (folder / "img_00003.txt").read_text() == "photo, "
    # increment: a new counter past the files there (none yet), then the index.
    names = sorted(p.name for p in (engine.services.paths.output / "plain").iterdir())
    assert names[:4] == ["pic_00001_00000.png", "pic_00001_00001.png", "pic_00001_00002.png", "pic_00001_00003.png"]


def test_save_pictures_counts_on_past_existing_files(tmp_path):
    images = [torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3)]
    assert dataset.save_pictures(images, tmp_path, "x", overwrite=False) == ["x_00001_00000.png", "x_00001_00001.png"]
    assert dataset.save_pictures(images, tmp_path, "x", overwrite=False) == ["x_00002_00000.png", "x_00002_00001.png"]
    assert dataset.save_pictures(images[:1], tmp_path, "x", overwrite=True) == ["x_00000.png"]


def test_folders_outside_input_and_output_and_empty_folders_are_refused(engine):
    save = {"class_type": "SaveImageDataSetToFolder", "inputs": {
        "images": ["1", 0], "folder_name": "../escape", "filename_prefix": "image", "mode": "overwrite"}}
    wf = {"1": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "pics"}}, "2": save}
    with pytest.raises(WorkflowInvalid, match="leads outside the output folder"):
        engine.run(parse_api(wf), outputs=["2"])
    wf["2"] = {**save, "inputs": {**save["inputs"], "folder_name": "ok", "filename_prefix": "../x"}}
    with pytest.raises(WorkflowInvalid, match="must be a plain file name"):
        engine.run(parse_api(wf), outputs=["2"])
    assert "holds no pictures" in failure(engine, {"1": {"class_type": "LoadImageDataSetFromFolder",
                                                         "inputs": {"folder": "empty"}}}, "1")
    with pytest.raises(ValueError, match="leads outside the input folder"):
        dataset.LoadImageDataSetFromFolder().execute("../..")
    assert not (engine.services.paths.base / "escape").exists()


# --- Per-item picture edits -------------------------------------------------------------------------------------------


def images_list(*shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(1, h, w, 3, generator=gen) for h, w in shapes]


def test_resize_by_shorter_edge_is_pillows_lanczos_with_truncated_sides():
    [image] = images_list((10, 23))
    (out,) = dataset.ResizeImagesByShorterEdge().execute(image, 16)
    size = (int(23 * (16 / 10)), 16)  # 36.8 -> 36
    expected = np.asarray(Image.fromarray(eight_bit(image)).resize(size, Image.Resampling.LANCZOS)) / np.float32(255)
    assert out.shape == (1, 16, 36, 3) and np.array_equal(out[0].numpy(), expected.astype(np.float32))
    [tall] = images_list((30, 7))
    assert dataset.ResizeImagesByShorterEdge().execute(tall, 5)[0].shape == (1, 21, 5, 3)  # int(30 * 5 / 7)


def test_crops_take_comfyuis_boxes_and_the_seeds_place():
    [image] = images_list((11, 20))
    (centre,) = dataset.CenterCropImages().execute(image, 8, 30)  # taller than the picture: its whole height
    assert np.array_equal(eight_bit(centre), eight_bit(image)[:, 6:14])  # left (20 - 8) // 2
    batch = torch.cat(images_list((11, 20), (11, 20)))
    (cropped,) = dataset.RandomCropImages().execute(batch, 5, 4, 2**40 + 7)
    np.random.seed((2**40 + 7) % (2**32 - 1))
    left, top = np.random.randint(0, 16), np.random.randint(0, 8)
    assert cropped.shape == (2, 4, 5, 3)
    for i in range(2):  # every picture of a batch at the same place
        assert np.array_equal(eight_bit(cropped[i:i + 1]), eight_bit(batch[i:i + 1])[top:top + 4, left:left + 5])
    assert dataset.RandomCropImages().execute(batch, 64, 64, 0)[0].shape == (2, 11, 20, 3)


def test_colour_arithmetic():
    image = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0]).reshape(1, 1, 5, 1).expand(1, 1, 5, 3)
    bright = dataset.AdjustBrightness().execute(image, 1.5)[0][0, 0, :, 0]
    contrast = dataset.AdjustContrast().execute(image, 2.0)[0][0, 0, :, 0]
    normal = dataset.NormalizeImages().execute(image, 0.25, 0.5)[0][0, 0, :, 0]
    assert bright.tolist() == pytest.approx([0.0, 0.375, 0.75, 1.0, 1.0])
    assert contrast.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    assert normal.tolist() == pytest.approx([-0.5, 0.0, 0.5, 1.3, 1.5])  # not clamped


# --- Lists ------------------------------------------------------------------------------------------------------------


def test_shuffles_follow_numpys_permutation_and_keep_pairs():
    images = [torch.full((1, 2, 2, 3), i / 10) for i in range(6)]
    np.random.seed(123)
    order = np.random.permutation(6).tolist()
    (shuffled,) = dataset.ShuffleDataset().execute([torch.cat(images[:4]), *images[4:]], [123])  # a batch splits
    assert [round(s[0, 0, 0, 0].item() * 10) for s in shuffled] == order
    texts = [f"t{i}" for i in range(6)]
    pictures, captions = dataset.ShuffleImageTextDataset().execute(images, texts, [123])
    assert captions == [f"t{i}" for i in order] and all(torch.equal(p, images[i]) for p, i in zip(pictures, order,
                                                                                                   strict=True))
    videos = [Video(torch.full((1, 2, 2, 3), i / 10), 8) for i in range(6)]
    assert dataset.ShuffleVideoDataset().execute(videos, [123])[0] == [videos[i] for i in order]
    assert dataset.ShuffleVideoTextDataset().execute(videos, texts, [123])[1] == [f"t{i}" for i in order]
    with pytest.raises(ValueError, match="6 pictures and 5 captions"):
        dataset.ShuffleImageTextDataset().execute(images, texts[:5], [0])


def comfyui_hash(image: torch.Tensor) -> str:
    """A transcription of ComfyUI's compute_hash: 8x8 LANCZOS, grey, '1' for pixels above the mean."""
    small = Image.fromarray(eight_bit(image)).resize((8, 8), Image.Resampling.LANCZOS).convert("L")
    pixels = np.asarray(small).ravel().tolist()
    mean = sum(pixels) / len(pixels)
    return "".join("1" if p > mean else "0" for p in pixels)


def test_deduplication_drops_pictures_as_similar_as_the_threshold_to_one_kept():
    base = images_list((32, 32))[0]
    near = (base + 0.01).clamp(0, 1)
    other = images_list((32, 32), (32, 32))[1]
    flipped = base.flip(2)
    pictures = [base, near, other, flipped, base.clone()]
    hashes = [comfyui_hash(p) for p in pictures]
    similarity = [[1 - sum(a != b for a, b in zip(x, y, strict=True)) / 64 for y in hashes] for x in hashes]
    for threshold in (0.95, 0.5, 0.0):
        kept: list[int] = []
        for i in range(len(pictures)):
            if all(similarity[i][j] < threshold for j in kept):
                kept.append(i)
        (out,) = dataset.ImageDeduplication().execute(pictures, [threshold])
        assert len(out) == len(kept) and all(torch.equal(o, pictures[i]) for o, i in zip(out, kept, strict=True))
    assert len(dataset.ImageDeduplication().execute(pictures, [0.95])[0]) == 3  # near and the copy dropped


def test_image_grid_places_resized_cells_on_black():
    colours = [torch.full((1, 5 + i, 7, 3), (i + 1) / 8) for i in range(5)]
    (grid,) = dataset.ImageGrid().execute(colours, [2], [32], [40], [3])
    assert grid.shape == (1, 3 * 40 + 2 * 3, 2 * 32 + 3, 3)
    for i in range(5):
        x, y = (i % 2) * 35, (i // 2) * 43
        level = int((i + 1) / 8 * 255) / 255
        assert torch.allclose(grid[0, y:y + 40, x:x + 32], torch.tensor(level), atol=1e-6)
    assert grid[0, :, 32:35].abs().sum() == 0 and grid[0, 86:, 35:].abs().sum() == 0  # the gap, the empty cell
    with pytest.raises(ValueError, match="no pictures"):
        dataset.ImageGrid().execute([], [2], [32], [32], [0])


def test_per_item_nodes_run_once_per_list_item_in_a_workflow(engine):
    wf = {"1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "pics"}},
          "2": {"class_type": "CenterCropImages", "inputs": {"images": ["1", 0], "width": 8, "height": 8}},
          "3": {"class_type": "ImageGrid", "inputs": {"images": ["2", 0], "columns": 3, "cell_width": 32,
                                                      "cell_height": 32, "padding": 0}},
          "4": {"class_type": "StripWhitespace", "inputs": {"texts": ["1", 1]}},
          "5": {"class_type": "TextToUppercase", "inputs": {"texts": ["4", 0]}},
          "6": {"class_type": "ReplaceText", "inputs": {"texts": ["5", 0], "find": "SQUARE", "replace": "box"}},
          "7": {"class_type": "TruncateText", "inputs": {"texts": ["6", 0], "max_length": 5}},
          "8": {"class_type": "MergeTextLists", "inputs": {"texts": ["6", 0]}},
          "9": {"class_type": "MergeImageLists", "inputs": {"images": ["2", 0]}},
          "10": {"class_type": "TextToLowercase", "inputs": {"texts": "  MiXed  "}},
          "11": {"class_type": "AddTextSuffix", "inputs": {"texts": ["10", 0], "suffix": "!"}}}
    result = run(engine, wf, "2", "3", "6", "7", "8", "9", "11")
    assert [tuple(i.shape) for i in result.values["2"][0]] == [(1, 8, 8, 3)] * 4
    assert result.values["3"][0].shape == (1, 64, 96, 3)  # 4 cells in rows of 3
    assert list(result.values["6"][0]) == ["A BLUE box", "A BLUE box", "A RED box", ""]
    assert list(result.values["7"][0]) == ["A BLU", "A BLU", "A RED", ""]
    assert list(result.values["8"][0]) == list(result.values["6"][0])
    assert len(result.values["9"][0]) == 4
    assert result.values["11"][0] == "  mixed  !"


def test_list_nodes_in_a_workflow_agree_with_direct_calls(engine):
    wf = {"1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "pics"}},
          "2": {"class_type": "RandomCropImages", "inputs": {"images": ["1", 0], "width": 8, "height": 8, "seed": 4}},
          "3": {"class_type": "AdjustContrast", "inputs": {"images": ["2", 0], "factor": 0.5}},
          "4": {"class_type": "NormalizeImages", "inputs": {"images": ["3", 0], "mean": 0.5, "std": 0.5}},
          "5": {"class_type": "ShuffleImageTextDataset", "inputs": {"images": ["4", 0], "texts": ["1", 1], "seed": 8}},
          "6": {"class_type": "ShuffleDataset", "inputs": {"images": ["5", 0], "seed": 1}},
          "7": {"class_type": "ImageDeduplication", "inputs": {"images": ["6", 0], "similarity_threshold": 0.95}}}
    result = run(engine, wf, "1", "4", "5", "7")
    images, texts = result.values["1"]
    expected = [dataset.RandomCropImages().execute(i, 8, 8, 4)[0] for i in images]
    expected = [((e - 0.5) * 0.5 + 0.5).clamp(0, 1) / 0.5 - 1 for e in expected]
    assert all(torch.allclose(a, b) for a, b in zip(result.values["4"][0], expected, strict=True))
    np.random.seed(8)
    order = np.random.permutation(4).tolist()
    assert list(result.values["5"][1]) == [texts[i] for i in order]
    assert len(result.values["7"][0]) == 3  # d's repeat is a duplicate

    videos = {"1": {"class_type": "LoadVideoTextDataSetFromFolder", "inputs": {"folder": "clips"}},
              "2": {"class_type": "VideoTemporalCrop", "inputs": {"video": ["1", 0], "start_frame": 1, "length": 2}},
              "3": {"class_type": "VideoFrameSample", "inputs": {"video": ["2", 0], "num_frames": 1,
                                                                 "strategy": "head", "seed": 0}},
              "4": {"class_type": "VideoRandomTemporalCrop", "inputs": {"video": ["1", 0], "length": 3, "seed": 2}},
              "5": {"class_type": "ShuffleVideoTextDataset", "inputs": {"videos": ["3", 0], "texts": ["1", 1],
                                                                        "seed": 3}},
              "6": {"class_type": "ShuffleVideoDataset", "inputs": {"videos": ["4", 0], "seed": 3}}}
    result = run(engine, videos, "1", "3", "4", "5", "6")
    clips = result.values["1"][0]
    assert [len(v.images) for v in result.values["3"][0]] == [1, 1]
    assert torch.equal(result.values["3"][0][0].images[0], clips[0].images[1])  # frame 1 of one.mp4
    assert torch.equal(result.values["3"][0][1].images[0], clips[1].images[1])  # two.mp4 has 2: its last
    assert [len(v.images) for v in result.values["4"][0]] == [3, 2]
    np.random.seed(3)
    order = np.random.permutation(2).tolist()
    assert list(result.values["5"][1]) == [["", "two frames"][i] for i in order]
    assert [len(v.images) for v in result.values["6"][0]] == [[3, 2][i] for i in order]


def test_an_editor_workflow_fills_the_widgets_in_comfyuis_order(engine):
    def node(id_, type_, inputs, widgets):
        return {"id": id_, "type": type_, "pos": [0, 0], "size": [200, 100], "mode": 0, "outputs": [],
                "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs], "widgets_values": widgets}

    ui = {"last_node_id": 3, "last_link_id": 2, "nodes": [
        node(1, "LoadImageTextDataSetFromFolder", [], ["pics"]),
        node(2, "ImageGrid", [("images", "IMAGE", 1)], [3, 64, 48, 2]),
        node(3, "SaveImageTextDataSetToFolder", [("images", "IMAGE", 2), ("texts", "STRING", None)],
             ["grids", "grid", "increment"])],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]}
    api = ui_to_api(ui, engine.registry)
    assert api["2"]["inputs"] == {"images": ["1", 0], "columns": 3, "cell_width": 64, "cell_height": 48,
                                  "padding": 2}
    assert api["3"]["inputs"] == {"images": ["2", 0], "folder_name": "grids", "filename_prefix": "grid",
                                  "mode": "increment"}
    result = engine.run(graph_from_data(ui, engine.registry), keep=["2"])
    assert result.ok, result.error
    assert result.values["2"][0].shape == (1, 2 * 48 + 2, 3 * 64 + 2 * 2, 3)
    assert [p.name for p in (engine.services.paths.output / "grids").iterdir()] == ["grid_00001_00000.png"]


# --- Videos -----------------------------------------------------------------------------------------------------------


def numbered_video(frames: int, fps: int = 4, rate: int = 100) -> Video:
    images = torch.arange(frames, dtype=torch.float32).reshape(frames, 1, 1, 1).expand(frames, 2, 2, 3) / 100
    audio = {"waveform": torch.arange(frames * rate // fps, dtype=torch.float32).reshape(1, 1, -1),
             "sample_rate": rate}
    return Video(images, fps, audio)


def frame_numbers(video: Video) -> list[int]:
    return [round(v) for v in (video.images[:, 0, 0, 0] * 100).tolist()]


def test_frame_sampling_strategies():
    video = numbered_video(10)
    sample = dataset.VideoFrameSample()
    head = sample.execute(video, 3, "head", 0)[0]
    assert frame_numbers(head) == [0, 1, 2] and head.audio["waveform"].shape[-1] == 75  # 3 frames at 4 fps, 100 Hz
    tail = sample.execute(video, 3, "tail", 0)[0]
    assert frame_numbers(tail) == [7, 8, 9] and tail.audio["waveform"][0, 0, 0].item() == 175
    assert frame_numbers(sample.execute(video, 4, "uniform", 0)[0]) == [0, 3, 6, 9]
    assert frame_numbers(sample.execute(video, 1, "uniform", 0)[0]) == [5]
    expected = sorted(np.random.RandomState(9).choice(10, size=4, replace=False).tolist())
    randomly = sample.execute(video, 4, "random", 9)[0]
    assert frame_numbers(randomly) == expected and randomly.audio is None
    assert len(sample.execute(video, 50, "uniform", 0)[0].images) == 10


def test_temporal_crops():
    video = numbered_video(10)
    crop = dataset.VideoTemporalCrop().execute(video, 4, 3)[0]
    assert frame_numbers(crop) == [4, 5, 6] and crop.audio["waveform"][0, 0, [0, -1]].tolist() == [100, 174]
    assert frame_numbers(dataset.VideoTemporalCrop().execute(video, 50, 16)[0]) == [9]
    np.random.seed(5)
    start = np.random.randint(0, 10 - 4 + 1)
    assert frame_numbers(dataset.VideoRandomTemporalCrop().execute(video, 4, 5)[0]) == list(range(start, start + 4))
    assert frame_numbers(dataset.VideoRandomTemporalCrop().execute(video, 40, 5)[0]) == list(range(10))


# --- Training data sets -----------------------------------------------------------------------------------------------


def test_resolution_buckets_group_latents_with_their_prompts():
    def latent(size, first):
        return {"samples": torch.arange(first, first + 2).float().reshape(2, 1, 1, 1).expand(2, 4, *size)}

    def prompts(*values):
        return [(torch.full((1, 3, 8), float(v)), {}) for v in values]

    latents, conditioning = dataset.ResolutionBucket().execute(
        [latent((8, 8), 0), latent((8, 6), 2), latent((8, 8), 4)], [prompts(0, 1), prompts(2, 3), prompts(4, 5)])
    assert [tuple(b["samples"].shape) for b in latents] == [(4, 4, 8, 8), (2, 4, 8, 6)]
    assert latents[0]["samples"][:, 0, 0, 0].tolist() == [0, 1, 4, 5]
    assert [[e[0, 0, 0].item() for e, _ in c] for c in conditioning] == [[0, 1, 4, 5], [2, 3]]
    with pytest.raises(ValueError, match="2 latents and 1 conditionings"):
        dataset.ResolutionBucket().execute([latent((8, 8), 0)] * 2, [prompts(0, 1)])
    with pytest.raises(ValueError, match="batch of 2 has 1 conditioning entries"):
        dataset.ResolutionBucket().execute([latent((8, 8), 0)], [prompts(0)])


def test_a_training_data_set_is_made_saved_as_comfyuis_shards_loaded_and_trained_on(engine):
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
          "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "pics"}},
          "3": {"class_type": "ResizeImagesByShorterEdge", "inputs": {"images": ["2", 0], "shorter_edge": 16}},
          "4": {"class_type": "CenterCropImages", "inputs": {"images": ["3", 0], "width": 16, "height": 16}},
          "5": {"class_type": "MakeTrainingDataset", "inputs": {
              "images": ["4", 0], "vae": ["1", 2], "clip": ["1", 1], "texts": ["2", 1]}},
          "6": {"class_type": "SaveTrainingDataset", "inputs": {
              "latents": ["5", 0], "conditioning": ["5", 1], "folder_name": "proj/run1", "shard_size": 3}},
          "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
          "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["1", 1]}},
          "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}}}
    result = run(engine, wf, "5", "6", "7", "8", "9")
    latents, conditioning = result.values["5"]
    encoded = result.values["7"][0]  # VAEEncode ran once per picture
    assert len(latents) == 4 and all(torch.equal(a["samples"], b["samples"]) for a, b in zip(latents, encoded,
                                                                                            strict=True))
    blue, empty = result.values["8"][0][0], result.values["9"][0][0]
    assert torch.equal(conditioning[0][0][0], blue[0]) and torch.equal(conditioning[3][0][0], empty[0])
    assert torch.equal(conditioning[3][0][1]["pooled_output"], empty[1]["pooled_output"])

    folder = engine.services.paths.base / "datasets" / "proj" / "run1"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "shard_0000.pkl", "shard_0001.pkl"]
    assert json.loads((folder / "metadata.json").read_text()) == {"num_samples": 4, "num_shards": 2, "shard_size": 3}
    shard = torch.load(folder / "shard_0001.pkl", weights_only=True)  # as ComfyUI reads it
    assert list(shard) == ["latents", "conditioning"] and len(shard["latents"]) == 1
    assert isinstance(shard["conditioning"][0][0], list) and torch.equal(shard["conditioning"][0][0][0], empty[0])

    assert dataset.dataset_folders() == ["proj/run1"]
    load = {"10": {"class_type": "LoadTrainingDataset", "inputs": {"folder_name": "proj/run1"}},
            "1": wf["1"],
            "11": {"class_type": "ResolutionBucket", "inputs": {"latents": ["10", 0], "conditioning": ["10", 1]}},
            "12": {"class_type": "TrainLoraNode", "inputs": {
                "model": ["1", 0], "latents": ["11", 0], "positive": ["11", 1], "batch_size": 2,
                "grad_accumulation_steps": 1, "steps": 1, "learning_rate": 0.001, "rank": 2, "optimizer": "AdamW",
                "loss_function": "MSE", "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32",
                "algorithm": "LoRA", "gradient_checkpointing": False, "existing_lora": "[None]"}}}
    loaded = run(engine, load, "10", "11", "12")
    back, prompts = loaded.values["10"]
    assert all(torch.equal(a["samples"], b["samples"]) for a, b in zip(back, latents, strict=True))
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(prompts, conditioning, strict=True))
    assert [tuple(b["samples"].shape) for b in loaded.values["11"][0]] == [(4, 4, 2, 2)]
    assert len(loaded.values["12"][2]["loss"]) == 1


def test_training_data_sets_refuse_bad_input(engine, tmp_path):
    images = [torch.zeros(1, 16, 16, 3)] * 3
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        dataset.MakeTrainingDataset().execute(images, [None], [None], ["a", "b"])
    save = dataset.SaveTrainingDataset()
    with pytest.raises(ValueError, match="leads outside the datasets folder"):
        save.execute([{"samples": torch.zeros(1, 4, 2, 2)}], [[(torch.zeros(1, 3, 8), {})]], ["../out"], [10])
    with pytest.raises(ValueError, match="must name a folder inside the datasets folder"):
        save.execute([{"samples": torch.zeros(1, 4, 2, 2)}], [[(torch.zeros(1, 3, 8), {})]], ["."], [10])
    with pytest.raises(ValueError, match=r"option\(s\) hooks"):
        save.execute([{"samples": torch.zeros(1, 4, 2, 2)}], [[(torch.zeros(1, 3, 8), {"hooks": object()})]],
                     ["x"], [10])
    with pytest.raises(ValueError, match="no data set 'missing'"):
        dataset.LoadTrainingDataset().execute("missing")
    broken = engine.services.paths.base / "datasets" / "broken"
    broken.mkdir(parents=True)
    (broken / "metadata.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no shard"):
        dataset.LoadTrainingDataset().execute("broken")
