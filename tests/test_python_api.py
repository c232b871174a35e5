"""The Python API (`loom.Pipeline`), and end-to-end agreement with diffusers' pipeline on the same weights."""

import pytest
import torch
from PIL import Image

from ldm.presets import make_checkpoint
from loom import Pipeline
from nodes.folders import FolderPaths, set_paths


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    checkpoint = make_checkpoint("tiny-sd1", root / "tiny.safetensors", seed=2)
    pipeline = Pipeline.from_checkpoint(checkpoint, paths=FolderPaths(base=root))
    yield pipeline
    set_paths(FolderPaths())


def test_sample_generate_and_caching(pipe):
    images = pipe.sample("a red circle", num_steps=2, guidance_scale=5.0, seed=1, width=64, height=64,
                         batch_size=2, sampler="dpmpp_2m", scheduler="karras")
    assert len(images) == 2 and images[0].size == (64, 64)
    again = pipe.generate("a red circle", num_steps=2, guidance_scale=5.0, seed=1, width=64, height=64,
                          sampler="dpmpp_2m", scheduler="karras")
    assert isinstance(again, Image.Image)
    assert pipe.executor.services.models.loads == 1  # the checkpoint was loaded once for both calls


def test_img2img_inpaint_and_returned_workflow(pipe):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    out = pipe.img2img(init, "a blue square", strength=0.5, num_steps=2, seed=3)
    assert out.size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    result = pipe.inpaint(init, mask, "a green circle", num_steps=2, seed=4, return_workflow=True)
    assert result.images[0].size == (64, 64)
    assert result.workflow["5"]["class_type"] == "VAEEncodeForInpaint"


def test_bad_checkpoint_path():
    with pytest.raises(FileNotFoundError):
        Pipeline.from_checkpoint("/nonexistent/model.safetensors")


def test_txt2img_matches_diffusers_pipeline(pipe):
    """Same weights, prompt, seed-drawn initial latents and sampler: within 1/255 per pixel on average."""
    from benchmarks.diffusers_reference import diffusers_sd1_pipeline, diffusers_txt2img

    ours = pipe.generate("a red circle on a blue background", num_steps=8, guidance_scale=7.5, seed=11,
                         width=64, height=64, sampler="euler", scheduler="normal")
    ours = torch.from_numpy(__import__("numpy").asarray(ours, dtype="float32") / 255.0)
    reference = diffusers_txt2img(diffusers_sd1_pipeline(pipe.checkpoint), "a red circle on a blue background",
                                  seed=11, steps=8, cfg=7.5, size=64)[0]
    # Ours is quantised to 8 bits by the PIL round trip; diffusers' is not.
    assert (ours - reference).abs().mean() < 1 / 255
