"""SD3 ControlNets in workflows: ControlNetLoader with a tiny InstantX-layout file, ControlNetApplySD3 ("Apply
Controlnet with VAE") against diffusers' StableDiffusion3ControlNetPipeline (text encoders, VAE, ControlNet,
transformer), the ControlNet family checks at validation, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import StableDiffusion3ControlNetPipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.controlnet_sd3 import HINT_LATENT_SCALE
from ldm.presets import make_checkpoint, make_controlnet
from ldm.sampling import prepare_noise
from ldm.sd3_files import LATENT_SCALE, LATENT_SHIFT
from ldm.sd3_presets import VARIANTS, make_sd3_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_controlnet_sd3 import diffusers_controlnet
from tests.nodes.test_sd3_nodes import CFG, HEIGHT, SEED, SEED_FILES, STEPS, TEXTS, WIDTH, reference_pipeline
from tests.nodes.test_sd3_nodes import workflow as sd3_workflow

CHECKPOINT = "sd3-medium-tiny-incl-clips-t5.safetensors"
STRENGTH = 0.7


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The SD3 checkpoint's VAE has its log-variance pinned at -30, so that diffusers' posterior sample (the
    pipeline's) is the mean Loom encodes with."""
    root = tmp_path_factory.mktemp("sd3cn")
    files = pinned_sd3_files(root / "models", "sd3-medium")
    reference = diffusers_controlnet(VARIANTS["sd3-medium"], blocks=1, seed=9)
    (root / "models" / "controlnet").mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
                                root / "models" / "controlnet" / "instantx-sd3-tiny.safetensors")
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_controlnet("tiny-sd1", root / "models" / "controlnet" / "sd1_canny.safetensors", seed=5)
    (root / "input").mkdir()
    hint = torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(3))
    Image.fromarray((hint * 255).round().byte().numpy()).save(root / "input" / "hint.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files, reference
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def controlled(checkpoint: str = CHECKPOINT, controlnet: str = "instantx-sd3-tiny.safetensors",
               node: str = "ControlNetApplySD3", **inputs) -> dict:
    doc = sd3_workflow(checkpoint, negative="blurry")
    doc["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
    doc["11"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
    doc["12"] = {"class_type": node, "inputs": {
        "positive": ["4", 0], "negative": ["5", 0], "control_net": ["10", 0], "vae": ["1", 2], "image": ["11", 0],
        "strength": STRENGTH, "start_percent": 0.25, "end_percent": 1.0, **inputs}}
    doc["7"]["inputs"].update(positive=["12", 0], negative=["12", 1])
    return doc


def diffusers_vae(files: dict) -> DiffusersVAE:
    """diffusers' AutoencoderKL with the checkpoint's VAE."""
    vae = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                       layers_per_block=1, latent_channels=16, scaling_factor=LATENT_SCALE, shift_factor=LATENT_SHIFT,
                       use_quant_conv=False, use_post_quant_conv=False)
    checkpoint = safetensors.torch.load_file(files["checkpoint"])
    state = convert_ldm_vae_checkpoint({k.removeprefix("first_stage_model."): v for k, v in checkpoint.items()
                                        if k.startswith("first_stage_model.")}, dict(vae.config))
    vae.load_state_dict(state, strict=True)
    return vae.eval()


def pinned_sd3_files(models, variant: str) -> dict:
    """make_sd3_files' files, the VAE's log-variance pinned at -30 (diffusers' posterior sample is its mean)."""
    files = make_sd3_files(models, variant, seed=SEED_FILES, dtype=torch.float32)
    sd = safetensors.torch.load_file(files["checkpoint"])
    sd["first_stage_model.encoder.conv_out.weight"][16:] = 0
    sd["first_stage_model.encoder.conv_out.bias"][16:] = -30
    safetensors.torch.save_file(sd, files["checkpoint"], metadata=safetensors.safe_open(
        files["checkpoint"], "pt").metadata())
    return files


def samples(engine: Executor, doc: dict) -> torch.Tensor:
    result = engine.run(parse_api(doc), keep=["7"])
    assert result.ok, result.error
    return result.values["7"][0]["samples"]


def test_declaration_is_comfyuis(engine) -> None:
    info = engine.registry.get("ControlNetApplySD3").object_info()
    assert info["input_order"]["required"] == ["positive", "negative", "control_net", "vae", "image", "strength",
                                               "start_percent", "end_percent"]
    assert info["display_name"] == "Apply Controlnet with VAE" and info["category"] == "conditioning/controlnet"
    assert info["output"] == ["CONDITIONING", "CONDITIONING"] and info["output_name"] == ["positive", "negative"]


def test_workflow_matches_stable_diffusion_3_controlnet_pipeline(engine, base, tmp_path) -> None:
    """The hint (48 x 64, the latent's size times 8: no resizing), strength 0.7 from a quarter of the run: steps 1
    to 3 of 4 by ComfyUI's rule (levels) and by diffusers' (i / N >= start)."""
    paths, files, reference_net = base
    latent = samples(engine, controlled())
    plain = samples(engine, sd3_workflow(CHECKPOINT, negative="blurry"))
    pipe = reference_pipeline(files["checkpoint"], tmp_path)
    assert LATENT_SCALE == HINT_LATENT_SCALE
    controlnet_pipe = StableDiffusion3ControlNetPipeline(**{**pipe.components, "vae": diffusers_vae(files)},
                                                         controlnet=reference_net)
    controlnet_pipe.set_progress_bar_config(disable=True)
    hint = torch.from_numpy(np.array(Image.open(paths.base / "input" / "hint.png"))).float() / 255
    noise = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        out = controlnet_pipe(
            prompt=TEXTS["clip_l"], prompt_2=TEXTS["clip_g"], prompt_3=TEXTS["t5xxl"], negative_prompt="blurry",
            height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, sigmas=[1 - i / STEPS for i in range(STEPS)],
            guidance_scale=CFG, latents=noise, max_sequence_length=77, output_type="latent",
            control_image=hint.movedim(-1, 0)[None] * 2 - 1, controlnet_conditioning_scale=STRENGTH,
            control_guidance_start=0.25, control_guidance_end=1.0).images
    expected = out / LATENT_SCALE + LATENT_SHIFT
    assert (latent - plain).abs().mean() > 1e-2
    torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)
    # Apply ControlNet with its optional VAE linked is the same node for an SD3 ControlNet.
    assert torch.equal(samples(engine, controlled(node="ControlNetApplyAdvanced")), latent)


def test_family_mismatches_are_refused_at_validation(engine) -> None:
    with pytest.raises(WorkflowInvalid, match="sd1_canny.safetensors is a ControlNet for SD1; the positive "
                                              "conditioning linked was encoded for SD3"):
        engine.run(parse_api(controlled(controlnet="sd1_canny.safetensors")))
    sd1 = controlled(checkpoint="sd1.safetensors")
    sd1["4"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}}
    del sd1["3"]  # ModelSamplingSD3, which would refuse the SD1 model too
    sd1["7"]["inputs"]["model"] = ["1", 0]
    with pytest.raises(WorkflowInvalid, match="instantx-sd3-tiny.safetensors is a ControlNet for SD3; the positive "
                                              "conditioning linked was encoded for SD1"):
        engine.run(parse_api(sd1))


def test_an_sd3_controlnet_without_a_vae_is_refused_clearly(engine) -> None:
    doc = controlled(node="ControlNetApplyAdvanced")
    del doc["12"]["inputs"]["vae"]
    result = engine.run(parse_api(doc), keep=["7"])
    assert not result.ok and ("instantx-sd3-tiny.safetensors is an SD3 ControlNet, whose hint image is VAE-encoded: "
                              "link the model's VAE") in str(result.error)


def test_one_controlnet_applied_twice_gets_each_range_fitted_to_the_models_schedule(engine) -> None:
    """A regression test: `_place_controls` fits every application to the model's schedule, also those of a
    ControlNet already placed (before, the second application kept the levels of SD's schedule from Apply)."""
    doc = controlled(start_percent=0.0, end_percent=0.5)
    doc["13"] = {"class_type": "ControlNetApplySD3", "inputs": {
        "positive": ["12", 0], "negative": ["12", 1], "control_net": ["10", 0], "vae": ["1", 2], "image": ["11", 0],
        "strength": 0.4, "start_percent": 0.3, "end_percent": 0.9}}
    doc["7"]["inputs"].update(positive=["13", 0], negative=["13", 1])
    result = engine.run(parse_api(doc), keep=["3", "7", "13"])
    assert result.ok, result.error
    schedule = result.values["3"][0].schedule
    second, first = result.values["13"][0][0][1]["control"].chain()
    assert first.model is second.model and (first.strength, second.strength) == (STRENGTH, 0.4)
    for control, (start, end) in ((first, (0.0, 0.5)), (second, (0.3, 0.9))):
        assert control.sigma_range == (schedule.sigma_at_percent(start), schedule.sigma_at_percent(end))
    assert 0 < second.sigma_range[0] < 1  # a flow level (SD's schedule puts 30% of the way near 4)
    assert not torch.equal(result.values["7"][0]["samples"], samples(engine, controlled(start_percent=0.0,
                                                                                         end_percent=0.5)))


@pytest.mark.parametrize(("control_type", "prepare"), [(0, lambda a: a * 2 - 1), (1, lambda a: a * 127.5 + 0.5)],
                         ids=["blur", "canny"])
def test_sd35_large_controlnet_workflow_matches_the_pipeline(engine, base, tmp_path, control_type, prepare) -> None:
    """Stability's SD3.5 Large canny ControlNet layout (`ldm.controlnet_sd35`) through ControlNetLoader and
    ControlNetApplySD3 with an SD3.5 Large checkpoint, against StableDiffusion3ControlNetPipeline given the VAE's
    input as Stability prepares it (a blur hint 2x - 1, a canny one x * 127.5 + 0.5, which Stability's model card
    passes through an image processor that does not normalize)."""
    from diffusers.image_processor import VaeImageProcessor

    from tests.ldm.test_controlnet_sd35 import diffusers_controlnet as diffusers_sd35_controlnet
    from tests.ldm.test_controlnet_sd35 import stability_file

    paths = base[0]
    files = pinned_sd3_files(paths.base / "models", "sd3.5-large")
    net = stability_file(paths.base / "models" / "controlnet" / "sd3.5_large_controlnet_canny-tiny.safetensors",
                         VARIANTS["sd3.5-large"], blocks=2, control_type=control_type, seed=9)
    checkpoint = "sd3.5-large-tiny-incl-clips-t5.safetensors"
    latent = samples(engine, controlled(checkpoint=checkpoint, controlnet=net.name))
    plain = samples(engine, sd3_workflow(checkpoint, negative="blurry"))
    pipe = reference_pipeline(files["checkpoint"], tmp_path)
    controlnet_pipe = StableDiffusion3ControlNetPipeline(
        **{**pipe.components, "vae": diffusers_vae(files)},
        controlnet=diffusers_sd35_controlnet(net, VARIANTS["sd3.5-large"]))
    controlnet_pipe.set_progress_bar_config(disable=True)
    controlnet_pipe.image_processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False)
    hint = torch.from_numpy(np.array(Image.open(paths.base / "input" / "hint.png"))).float() / 255
    noise = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        out = controlnet_pipe(
            prompt=TEXTS["clip_l"], prompt_2=TEXTS["clip_g"], prompt_3=TEXTS["t5xxl"], negative_prompt="blurry",
            height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, sigmas=[1 - i / STEPS for i in range(STEPS)],
            guidance_scale=CFG, latents=noise, max_sequence_length=77, output_type="latent",
            control_image=prepare(hint.movedim(-1, 0)[None]),
            controlnet_conditioning_scale=STRENGTH, control_guidance_start=0.25, control_guidance_end=1.0).images
    expected = out / LATENT_SCALE + LATENT_SHIFT
    assert (latent - plain).abs().mean() > 1e-2
    torch.testing.assert_close(latent, expected, rtol=1e-4, atol=1e-4)
