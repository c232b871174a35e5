"""The Python API (`loom.Pipeline`), and end-to-end agreement with diffusers' pipeline on the same weights."""

import pytest
import torch
from PIL import Image

from ldm.presets import make_checkpoint
from loom import Pipeline
from nodes.folders import FolderPaths, get_paths, set_paths


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


def test_engine_options_reach_the_models(tmp_path):
    """`options` are the command line's device options: here fp8 UNet weights."""
    from executor.devices import EngineOptions
    from ldm.quant import is_fp8

    checkpoint = make_checkpoint("tiny-sd1", tmp_path / "tiny.safetensors", seed=2)
    before = get_paths()
    try:
        small = Pipeline(checkpoint, paths=FolderPaths(base=tmp_path), cpu=True,
                         options=EngineOptions(weights_dtype="fp8"))
        assert small.generate("a red circle", num_steps=2, seed=1, width=64, height=64).size == (64, 64)
        [unet] = [m for m in small.executor.services.devices.resident() if type(m).__name__ == "UNetModel"]
        assert is_fp8(unet.middle_block[1].proj_in)
    finally:
        set_paths(before)  # the module's pipeline keeps its own folders


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


def test_img2img_matches_diffusers_img2img_pipeline(pipe):
    """Same weights, prompt, init image, seed-drawn noise and sampler: within 1/255 per pixel on average.

    The step counts are set so that both run the same schedule: ComfyUI's (and our) denoise 0.5 with
    4 steps runs the last 4 steps of an 8-step schedule; diffusers' strength 0.5 with 8 inference steps
    runs the last int(8 * 0.5) = 4 of the same 8. The init latent is the VAE posterior's mean on
    both sides (see `diffusers_img2img`).
    """
    import numpy as np

    from benchmarks.diffusers_reference import diffusers_img2img, diffusers_sd1_pipeline

    pixels = np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    init = Image.fromarray(pixels).resize((64, 64), Image.BILINEAR)
    ours = pipe.img2img(init, "a red circle on a blue background", strength=0.5, num_steps=4,
                        guidance_scale=7.5, seed=13, sampler="euler", scheduler="normal")
    ours = torch.from_numpy(np.asarray(ours, dtype="float32") / 255.0)
    init_tensor = torch.from_numpy(np.asarray(init, dtype="float32") / 255.0)[None]
    reference = diffusers_sd1_pipeline(pipe.checkpoint)
    same_seed, other_seed = (diffusers_img2img(reference, "a red circle on a blue background", init_tensor, seed=seed,
                                               steps=8, strength=0.5, cfg=7.5)[0] for seed in (13, 14))
    assert (ours - same_seed).abs().mean() < 1 / 255
    assert (ours - other_seed).abs().mean() > 2 / 255  # the noise matters: the agreement is not trivial


def test_sample_with_a_controlnet_and_its_hint(pipe, tmp_path):
    from PIL import ImageDraw

    from ldm.presets import make_controlnet

    controlnet = make_controlnet("tiny-sd1", tmp_path / "tiny_canny.safetensors", seed=5)
    edges = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(edges).rectangle((8, 8, 40, 40), outline="white", width=2)
    options = {"num_steps": 2, "seed": 1, "width": 64, "height": 64}
    plain = pipe.generate("a square", **options)
    result = pipe.sample("a square", controlnet=controlnet, control_image=edges, return_workflow=True, **options)
    assert result.workflow["13"]["class_type"] == "ControlNetApplyAdvanced"
    assert result.images[0].tobytes() != plain.tobytes()
    with pytest.raises(ValueError, match="needs both"):
        pipe.sample("a square", controlnet=controlnet, **options)


def test_sample_through_loras_in_order_and_with_their_strengths(pipe, tmp_path):
    from tests.nodes.test_sd_workflows import write_lora

    write_lora(tmp_path / "one.safetensors")
    options = {"num_steps": 2, "seed": 1, "width": 64, "height": 64}
    plain = pipe.generate("a square", **options)
    result = pipe.sample("a square", loras=[(tmp_path / "one.safetensors", 0.5)], return_workflow=True, **options)
    loader = result.workflow["20"]
    assert loader["class_type"] == "LoraLoader" and loader["inputs"]["strength_model"] == 0.5
    assert result.workflow["3"]["inputs"]["model"] == ["20", 0] and result.workflow["6"]["inputs"]["clip"] == ["20", 1]
    assert result.images[0].tobytes() != plain.tobytes()
    # One file alone is one LoRA at strength 1; strength 0 is the plain model.
    assert pipe.sample("a square", loras=tmp_path / "one.safetensors", return_workflow=True,
                       **options).workflow["20"]["inputs"]["strength_clip"] == 1.0
    off = pipe.generate("a square", loras=[(tmp_path / "one.safetensors", 0.0)], **options)
    assert off.tobytes() == plain.tobytes()
    with pytest.raises(FileNotFoundError, match="LoRA .*missing.safetensors not found"):
        pipe.generate("a square", loras=[tmp_path / "missing.safetensors"], **options)


def test_loras_given_as_one_pair_and_the_files_a_user_means(pipe, tmp_path):
    from tests.nodes.test_sd_workflows import write_lora

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_lora(tmp_path / "a" / "lora.safetensors")
    write_lora(tmp_path / "b" / "lora.safetensors")
    options = {"num_steps": 2, "seed": 1, "width": 64, "height": 64, "return_workflow": True}
    one = pipe.sample("a square", loras=(tmp_path / "a" / "lora.safetensors", 0.7), **options)
    assert one.workflow["20"]["inputs"]["strength_model"] == 0.7 and "21" not in one.workflow
    with pytest.raises(ValueError, match="same file name from different folders"):
        pipe.sample("a square", loras=[tmp_path / "a" / "lora.safetensors", tmp_path / "b" / "lora.safetensors"],
                    **options)
    # The folder of the file given goes first: the same name elsewhere cannot stand in for it.
    pipe.sample("a square", loras=[tmp_path / "b" / "lora.safetensors"], **options)
    assert pipe.paths.find_model("loras", "lora.safetensors") == tmp_path / "b" / "lora.safetensors"
    # A file that is not a LoRA (here a checkpoint) is refused, not applied as nothing.
    checkpoint = make_checkpoint("tiny-sd1", tmp_path / "not_a_lora.safetensors", seed=3, text_encoder=False)
    with pytest.raises(RuntimeError, match="holds no LoRA weights"):
        pipe.sample("a square", loras=[checkpoint], **options)
