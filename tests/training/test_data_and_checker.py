"""The datasets (reproducible, held-out split, buckets), the adherence checker on ground truth, the CLI parser."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from benchmarks.prompt_adherence import generate, judge_image, score
from ldm.training.data import (
    COLORS,
    POSITIONS,
    bucket_sizes,
    caption_folder,
    evaluation_scenes,
    render_scenes,
    shapes_dataset,
    split_scenes,
)


def test_shapes_dataset_is_reproducible_from_its_seed():
    a, b, c = shapes_dataset(20, seed=5), shapes_dataset(20, seed=5), shapes_dataset(20, seed=6)
    assert torch.equal(a.pixels, b.pixels) and a.captions == b.captions
    assert a.captions != c.captions
    assert a.pixels.shape == (20, 3, 64, 64) and -1 <= a.pixels.min() and a.pixels.max() <= 1


def test_held_out_captions_never_appear_in_training():
    train, held = split_scenes()
    assert not {s.caption for s in train} & {s.caption for s in held}
    assert len(held) >= 100
    assert {s.caption for s in evaluation_scenes(100)} <= {s.caption for s in held}
    assert not set(shapes_dataset(200, seed=1).captions) & {s.caption for s in held}


def test_captions_read_naturally():
    captions = {s.caption for s in split_scenes()[0] + split_scenes()[1]}
    assert "a red circle on a blue background" in captions
    assert "a small yellow triangle at the top left on a black background" in captions


def test_checker_judges_rendered_ground_truth():
    scenes = evaluation_scenes(100)
    images = (render_scenes(scenes, seed=11) + 1) / 2
    figures = score(images.permute(0, 2, 3, 1), scenes)
    assert figures["all"] == 1.0
    assert figures["shuffled_shape_color"] < 0.35  # chance is 1/7 (plus accidental matches)


def test_checker_survives_blur_and_off_palette_colours():
    scenes = evaluation_scenes(60)
    images = (render_scenes(scenes, seed=11) + 1) / 2
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert score((blurred * 0.9 + 0.05).permute(0, 2, 3, 1), scenes)["all"] >= 0.95


def test_checker_on_a_blank_image_finds_no_shape():
    image = torch.ones(64, 64, 3) * torch.tensor([30, 60, 220]) / 255
    judged = judge_image(image)
    assert judged.background_color == "blue" and judged.shape_color is None
    assert len(COLORS) == 8 and len(POSITIONS) == 9


def test_a_base_size_off_the_bucket_step_still_has_its_square():
    for base in (96, 160, 64, 512):
        assert (base, base) in bucket_sizes(base)


def test_pictures_without_captions_are_warned_about(tmp_path):
    from PIL import Image

    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a red circle")
    with pytest.warns(UserWarning, match="2 of 3 pictures have no caption"):
        caption_folder(tmp_path, base=64)


def test_caption_folder_buckets_by_aspect(tmp_path):
    Image.new("RGB", (200, 100), "red").save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a red picture\n")
    Image.new("RGB", (90, 100), "blue").save(tmp_path / "square.jpg")
    assert (128, 128) in bucket_sizes(128, 32) and (192, 96) in bucket_sizes(128, 32)
    buckets = caption_folder(tmp_path, base=128, step=32)
    by_size = {tuple(b.pixels.shape[-2:]): b.captions for b in buckets}
    assert by_size == {(96, 192): ["a red picture"], (128, 128): [""]}


def test_engine_txt2img_runs_on_a_random_checkpoint(tmp_path):
    from ldm.presets import make_checkpoint

    path = make_checkpoint("tiny-sd1", tmp_path / "tiny.safetensors")
    images = generate(path, ["a red circle on a blue background"], steps=2)
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()


def test_train_command_parses():
    from main import build_parser

    args = build_parser().parse_args(["train", "unet", "--out", "x", "--vae", "v.safetensors", "--max-steps", "1"])
    assert args.stage == "unet" and args.func.__name__ == "run_train"
