"""The Flux nodes and loaders end to end on tiny random Flux files in the real layouts: ComfyUI's declarations, a
parts workflow against diffusers' FluxPipeline, the all-in-one checkpoint, guidance, and refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.flux_files import LATENT_SHIFT, load_flux_unet
from ldm.flux_presets import make_flux_files
from ldm.presets import make_checkpoint
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.flux_reference import diffusers_twin

# 4 steps: `simple` then takes table entries exactly at diffusers' levels (10000 / 4 is whole).
WIDTH, HEIGHT, SEED, STEPS = 64, 48, 7, 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    models = root / "models"
    files = {variant: make_flux_files(models, variant, seed=2) for variant in ("dev", "schnell")}
    shutil.copy(files["dev"]["clip_l"], models / "text_encoders" / "clip_l-copy.safetensors")
    make_checkpoint("tiny-sd1", models / "checkpoints" / "sd1.safetensors", seed=1)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def workflow(unet: str = "flux1-tiny-dev.safetensors", guidance: float = 3.5, checkpoint: str | None = None,
             clip: tuple[str, str] = ("t5xxl-tiny.safetensors", "clip_l-tiny.safetensors")) -> dict:
    if checkpoint is None:
        loaders = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
                   "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": clip[0], "clip_name2": clip[1],
                                                                    "type": "flux"}},
                   "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-tiny.safetensors"}}}
        model, text, vae = ["1", 0], ["2", 0], ["3", 0]
    else:
        loaders = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
        model, text, vae = ["1", 0], ["1", 1], ["1", 2]
    return {
        **loaders,
        "4": {"class_type": "ModelSamplingFlux", "inputs": {"model": model, "max_shift": 1.15, "base_shift": 0.5,
                                                             "width": WIDTH, "height": HEIGHT}},
        "6": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": text, "clip_l": "a red circle",
                                                              "t5xxl": "a red (circle:1.2) on a blue square",
                                                              "guidance": guidance}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": vae}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def run(engine: Executor, doc: dict) -> tuple[dict, torch.Tensor, list]:
    result = engine.run(parse_api(doc), keep=["6", "8", "9"])
    assert result.ok, result.error
    return result.values["8"][0], result.values["9"][0], result.values["6"][0]


def test_declarations_are_comfyuis(engine) -> None:
    info = {name: engine.registry.get(name).object_info() for name in
            ("CLIPTextEncodeFlux", "FluxGuidance", "FluxDisableGuidance", "EmptySD3LatentImage", "ModelSamplingFlux")}
    assert {name: i["input_order"]["required"] for name, i in info.items()} == {
        "CLIPTextEncodeFlux": ["clip", "clip_l", "t5xxl", "guidance"], "FluxGuidance": ["conditioning", "guidance"],
        "FluxDisableGuidance": ["conditioning"], "EmptySD3LatentImage": ["width", "height", "batch_size"],
        "ModelSamplingFlux": ["model", "max_shift", "base_shift", "width", "height"]}
    assert {name: i["category"] for name, i in info.items()} == {
        "CLIPTextEncodeFlux": "advanced/conditioning/flux", "FluxGuidance": "advanced/conditioning/flux",
        "FluxDisableGuidance": "advanced/conditioning/flux", "EmptySD3LatentImage": "latent/sd3",
        "ModelSamplingFlux": "advanced/model"}
    guidance = info["CLIPTextEncodeFlux"]["input"]["required"]["guidance"][1]
    assert (guidance["default"], guidance["min"], guidance["max"], guidance["step"]) == (3.5, 0.0, 100.0, 0.1)
    assert info["CLIPTextEncodeFlux"]["input"]["required"]["t5xxl"][1]["multiline"]
    size = info["EmptySD3LatentImage"]["input"]["required"]["width"][1]
    assert (size["default"], size["min"], size["step"]) == (1024, 16, 16)
    sampling = info["ModelSamplingFlux"]["input"]["required"]
    assert [sampling[k][1]["default"] for k in ("max_shift", "base_shift", "width", "height")] == [1.15, 0.5, 1024,
                                                                                                     1024]
    assert sampling["width"][1]["step"] == 8 and sampling["max_shift"][1]["step"] == 0.01
    assert [i["output"] for i in info.values()] == [["CONDITIONING"]] * 3 + [["LATENT"], ["MODEL"]]


def test_parts_workflow_matches_flux_pipeline(engine, base) -> None:
    """The whole chain (loaders, T5 and CLIP-L prompts, guidance, the resolution's time shift, the latent's shift
    and scale) against diffusers' FluxPipeline given the same transformer, prompt embeddings and noise."""
    latent, image, conditioning = run(engine, workflow())
    [(context, options)] = conditioning
    assert context.shape == (1, 256, 32) and options["guidance"] == 3.5 and options["pooled_output"].shape == (1, 32)
    model = load_flux_unet(base[1]["dev"]["unet"]).unet
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=diffusers_twin(model))
    pipe.set_progress_bar_config(disable=True)
    h, w = HEIGHT // 8, WIDTH // 8
    noise = prepare_noise(torch.zeros(1, 16, h, w), SEED)
    with torch.no_grad():
        packed = pipe(prompt_embeds=context, pooled_prompt_embeds=options["pooled_output"], height=HEIGHT, width=WIDTH,
                      num_inference_steps=STEPS, guidance_scale=3.5, output_type="latent",
                      latents=FluxPipeline._pack_latents(noise, 1, 16, h, w)).images
    expected = FluxPipeline._unpack_latents(packed, HEIGHT, WIDTH, 8) / 0.3611 + LATENT_SHIFT  # as FluxPipeline decodes
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and 0 <= image.min() and image.max() <= 1 and image.std() > 0.01


def test_all_in_one_checkpoint_gives_the_parts_latent_and_image(engine) -> None:
    parts_latent, parts_image, _ = run(engine, workflow())
    latent, image, _ = run(engine, workflow(checkpoint="flux1-tiny-dev-checkpoint.safetensors"))
    assert torch.equal(latent["samples"], parts_latent["samples"]) and torch.equal(image, parts_image)


def test_guidance_moves_dev_and_not_schnell(engine) -> None:
    for unet, moves in (("flux1-tiny-dev.safetensors", True), ("flux1-tiny-schnell.safetensors", False)):
        guided = run(engine, workflow(unet, guidance=3.5))[0]["samples"]
        other = run(engine, workflow(unet, guidance=1.0))[0]["samples"]
        assert torch.equal(guided, other) != moves, unet


def test_guidance_nodes_set_what_the_transformer_gets(engine) -> None:
    from nodes.sd.flux import flux_y

    conditioning = [(torch.zeros(1, 256, 32), {"pooled_output": torch.ones(1, 32)})]
    set_guidance = engine.registry.get("FluxGuidance")().execute(conditioning, 2.5)[0]
    disabled = engine.registry.get("FluxDisableGuidance")().execute(set_guidance)[0]
    assert set_guidance[0][1]["guidance"] == 2.5 and disabled[0][1]["guidance"] is None
    dev = engine.run(parse_api(workflow()), keep=["4"]).values["4"][0]
    assert dev.schedule.shift == pytest.approx(0.5 + (0.65 / 3840) * (WIDTH * HEIGHT / 256 - 256))
    [(_, with_default)], [(_, guided)], [(_, unguided)] = (flux_y(c, dev) for c in
                                                           (conditioning, set_guidance, disabled))
    assert with_default["y"][0, -1] == 3.5 and guided["y"][0, -1] == 2.5  # pooled, then the guidance
    assert with_default["y"].shape == (1, 33) and unguided["y"].shape == (1, 32)


def test_empty_latent_is_16_channels(engine) -> None:
    [latent] = engine.registry.get("EmptySD3LatentImage")().execute(96, 64, 2)
    assert latent["samples"].shape == (2, 16, 8, 12) and not latent["samples"].any()


def test_wrong_text_encoder_files_are_refused_at_validation(engine) -> None:
    doc = workflow(clip=("clip_l-tiny.safetensors", "clip_l-copy.safetensors"))
    [problem] = validate(parse_api(doc), engine.registry).problems
    assert problem.type == "custom_validation_failed"
    assert "hold clip_l + clip_l; type flux needs one CLIP-L (clip_l) and one T5-XXL (t5xxl)" in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(doc))


def test_flux_nodes_refuse_other_families(engine) -> None:
    sd1 = workflow(checkpoint="sd1.safetensors")  # refused at validation: the checkpoint's header says SD1
    with pytest.raises(WorkflowInvalid, match="ModelSamplingFlux is for Flux models; the MODEL linked is SD1"):
        engine.run(parse_api(sd1))
    del sd1["4"]
    sd1["8"]["inputs"]["model"] = ["1", 0]
    with pytest.raises(WorkflowInvalid, match="CLIPTextEncodeFlux needs Flux's text encoders .*; the CLIP linked is "
                                              "SD1"):
        engine.run(parse_api(sd1))


def test_fp8_weight_dtype_stores_the_transformer_in_fp8(engine) -> None:
    from ldm.quant import is_fp8

    doc = workflow()
    doc["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    result = engine.run(parse_api(doc), keep=["1", "8"])
    assert result.ok, result.error
    model = result.values["1"][0].unet
    assert is_fp8(model.double_blocks[0].img_attn.qkv) and is_fp8(model.single_blocks[1].linear1)
    fp8 = result.values["8"][0]["samples"]
    full = run(engine, workflow())[0]["samples"]
    assert torch.isfinite(fp8).all() and torch.corrcoef(torch.stack([fp8.flatten(), full.flatten()]))[0, 1] > 0.9


def test_empty_latent_image_serves_flux_as_in_comfyui(engine) -> None:
    """EmptyLatentImage's 4 zero channels take Flux's 16 (ComfyUI's fix_empty_latent_channels): the same picture
    as EmptySD3LatentImage's."""
    doc = workflow()
    reference = run(engine, doc)[0]
    doc["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}}
    latent = run(engine, doc)[0]
    assert latent["samples"].shape == reference["samples"].shape
    assert torch.equal(latent["samples"], reference["samples"])
