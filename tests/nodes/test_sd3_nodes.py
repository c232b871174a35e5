"""The SD3 nodes and loaders end to end on tiny random SD3.5 files in the real layouts: ComfyUI's declarations, a
workflow against diffusers' StableDiffusion3Pipeline (text encoders, transformer, sampler), the checkpoint without
its text encoders with TripleCLIPLoader, and refusals."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.presets import make_checkpoint
from ldm.sampling import prepare_noise
from ldm.sd3_files import LATENT_SCALE, LATENT_SHIFT, load_sd3_checkpoint
from ldm.sd3_presets import make_sd3_files, random_clip, random_t5
from ldm.tokenizer import DATA_DIR
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.mmdit_reference import diffusers_twin

WIDTH, HEIGHT, SEED, STEPS, CFG, SEED_FILES = 64, 48, 7, 4, 4.5, 2
TEXTS = {"clip_l": "a red circle", "clip_g": "a red circle on a blue square", "t5xxl": "a red circle on blue"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    files = make_sd3_files(root / "models", "sd3.5-medium", seed=SEED_FILES, dtype=torch.float32)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def workflow(checkpoint: str = "sd3.5-medium-tiny-incl-clips-t5.safetensors", triple: bool = False,
             negative: str = "", shift: float = 3.0) -> dict:
    clip = ["2", 0] if triple else ["1", 1]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "TripleCLIPLoader", "inputs": {
            "clip_name1": "sd3-t5xxl-tiny.safetensors", "clip_name2": "sd3-clip_l-tiny.safetensors",
            "clip_name3": "sd3-clip_g-tiny.safetensors"}},
        "3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": shift}},
        "4": {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": clip, **TEXTS, "empty_padding": "empty_prompt"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": negative}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": SEED, "steps": STEPS, "cfg": CFG,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def run(engine: Executor, doc: dict) -> tuple[dict, torch.Tensor]:
    result = engine.run(parse_api(doc), keep=["7", "8"])
    assert result.ok, result.error
    return result.values["7"][0], result.values["8"][0]


def reference_pipeline(checkpoint, tmp_path) -> StableDiffusion3Pipeline:
    """diffusers' pipeline with the checkpoint's transformer and the same text encoders (make_sd3_files' seeds)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    t5_file = tmp_path / "tokenizer.json"
    t5_file.write_bytes(gzip.decompress((DATA_DIR / "t5_tokenizer.json.gz").read_bytes()))
    (tmp_path / "clip").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA_DIR / name, tmp_path / "clip" / name)
    clip = str(tmp_path / "clip")
    pipe = StableDiffusion3Pipeline(
        transformer=diffusers_twin(load_sd3_checkpoint(checkpoint, text_encoder=False).unet),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=random_clip("clip_l", SEED_FILES + 2), tokenizer=CLIPTokenizer.from_pretrained(clip,
                                                                                                    model_max_length=77),
        text_encoder_2=random_clip("clip_g", SEED_FILES + 3),
        tokenizer_2=CLIPTokenizer.from_pretrained(clip, model_max_length=77, pad_token="!"),
        text_encoder_3=random_t5(SEED_FILES + 4), tokenizer_3=T5TokenizerFast(tokenizer_file=str(t5_file)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_declarations_are_comfyuis(engine) -> None:
    info = {name: engine.registry.get(name).object_info() for name in
            ("TripleCLIPLoader", "CLIPTextEncodeSD3", "ModelSamplingSD3")}
    assert {name: i["input_order"]["required"] for name, i in info.items()} == {
        "TripleCLIPLoader": ["clip_name1", "clip_name2", "clip_name3"],
        "CLIPTextEncodeSD3": ["clip", "clip_l", "clip_g", "t5xxl", "empty_padding"],
        "ModelSamplingSD3": ["model", "shift"]}
    assert {name: i["category"] for name, i in info.items()} == {
        "TripleCLIPLoader": "advanced/loaders", "CLIPTextEncodeSD3": "advanced/conditioning",
        "ModelSamplingSD3": "advanced/model"}
    assert [i["output"] for i in info.values()] == [["CLIP"], ["CONDITIONING"], ["MODEL"]]
    required = info["CLIPTextEncodeSD3"]["input"]["required"]
    assert required["empty_padding"][0] == ["none", "empty_prompt"] and required["t5xxl"][1]["multiline"]
    shift = info["ModelSamplingSD3"]["input"]["required"]["shift"][1]
    assert (shift["default"], shift["min"], shift["max"], shift["step"]) == (3.0, 0.0, 100.0, 0.01)
    assert "sd3-clip_g-tiny.safetensors" in info["TripleCLIPLoader"]["input"]["required"]["clip_name3"][0]


def test_workflow_matches_stable_diffusion_3_pipeline(engine, base, tmp_path) -> None:
    """Checkpoint, the three prompts, cfg, ModelSamplingSD3's shift, euler and the latent's shift and scale against
    diffusers' StableDiffusion3Pipeline from the prompts (its own text encoding) and the same noise. `simple` takes
    shift(1 - i / steps); diffusers is given those unshifted levels, which it shifts the same way."""
    latent, image = run(engine, workflow(negative="blurry"))
    pipe = reference_pipeline(base[1]["checkpoint"], tmp_path)
    noise = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        out = pipe(prompt=TEXTS["clip_l"], prompt_2=TEXTS["clip_g"], prompt_3=TEXTS["t5xxl"],
                   negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   sigmas=[1 - i / STEPS for i in range(STEPS)], guidance_scale=CFG, latents=noise,
                   max_sequence_length=77, output_type="latent").images
    expected = out / LATENT_SCALE + LATENT_SHIFT  # as the pipeline decodes
    assert expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and 0 <= image.min() and image.max() <= 1 and image.std() > 0.01


def test_bare_checkpoint_with_triple_clip_loader_equals_the_all_in_one(engine) -> None:
    full_latent, full_image = run(engine, workflow())
    latent, image = run(engine, workflow("sd3.5-medium-tiny.safetensors", triple=True))
    assert torch.equal(latent["samples"], full_latent["samples"]) and torch.equal(image, full_image)


def test_bare_checkpoint_clip_says_to_add_triple_clip_loader(engine) -> None:
    result = engine.run(parse_api(workflow("sd3.5-medium-tiny.safetensors")))
    assert not result.ok
    assert "sd3.5-medium-tiny.safetensors holds no text encoders: load CLIP-L, CLIP-G and T5-XXL with " \
           "TripleCLIPLoader" in str(result.error)


def test_shift_and_empty_padding_change_what_they_should(engine) -> None:
    doc = workflow()
    result = engine.run(parse_api(doc), keep=["3"])
    assert result.values["3"][0].schedule.sigmas[499].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert not torch.equal(run(engine, workflow(shift=6.0))[0]["samples"], run(engine, doc)[0]["samples"])
    doc["4"]["inputs"].update(t5xxl="", empty_padding="none")
    dropped = engine.run(parse_api(doc), keep=["4"]).values["4"][0]
    doc["4"]["inputs"]["empty_padding"] = "empty_prompt"
    padded = engine.run(parse_api(doc), keep=["4"]).values["4"][0]
    assert dropped[0][0].shape == (1, 77, 96) and padded[0][0].shape == (1, 154, 96)
    torch.testing.assert_close(dropped[0][0], padded[0][0][:, :77])
    assert dropped[0][1]["pooled_output"].shape == (1, 80)


def test_sd3_nodes_refuse_other_families(engine) -> None:
    sd1 = workflow(checkpoint="sd1.safetensors")  # refused at validation: the checkpoint's header says SD1
    refusal = "ModelSamplingSD3 is for SD3, Wan, Qwen-Image and HiDream models; the MODEL linked is SD1"
    with pytest.raises(WorkflowInvalid, match=refusal):
        engine.run(parse_api(sd1))
    sd1["7"]["inputs"]["model"] = ["1", 0]
    with pytest.raises(WorkflowInvalid, match="CLIPTextEncodeSD3 needs SD3's text encoders .*; the CLIP linked is "
                                              "SD1"):
        engine.run(parse_api(sd1))


def test_wrong_text_encoder_files_are_refused_at_validation(engine) -> None:
    doc = workflow("sd3.5-medium-tiny.safetensors", triple=True)
    doc["2"]["inputs"]["clip_name3"] = "sd3-clip_l-tiny.safetensors"
    [problem] = validate(parse_api(doc), engine.registry).problems
    assert problem.type == "custom_validation_failed"
    assert ("sd3-t5xxl-tiny.safetensors, sd3-clip_l-tiny.safetensors, sd3-clip_l-tiny.safetensors hold t5xxl + "
            "clip_l + clip_l; TripleCLIPLoader takes SD3's CLIP-L") in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(doc))
