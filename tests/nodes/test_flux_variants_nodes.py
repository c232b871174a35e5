"""Flux Kontext, Fill and Depth / Canny through the engine with tiny files in the real layouts (`make_flux_files`):
ComfyUI's declarations, whole workflows (ReferenceLatent, InpaintModelConditioning, InstructPixToPixConditioning)
against diffusers' FluxKontextPipeline, FluxFillPipeline and FluxControlPipeline given the same transformer, VAE,
prompt embeddings and noise, and the refusals of prompts a model cannot take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxPipeline,
)
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_state_dict, write_safetensors
from ldm.flux_files import LATENT_SHIFT, load_flux_unet
from ldm.flux_presets import make_flux_files
from ldm.presets import make_checkpoint
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.flux_reference import diffusers_twin

WIDTH, HEIGHT, SEED, STEPS = 64, 48, 5, 4
SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "use_dynamic_shifting": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_variants")
    models = root / "models"
    files = {variant: make_flux_files(models, variant, seed=3, dtype=torch.float32)
             for variant in ("kontext", "fill", "depth")}
    # The VAE with a posterior of no spread (log-variance -30): diffusers' Fill and Control pipelines sample it.
    vae = load_state_dict(files["fill"]["vae"])
    vae["encoder.conv_out.weight"][16:] = 0
    vae["encoder.conv_out.bias"][16:] = -30
    write_safetensors(vae, models / "vae" / "ae-sharp.safetensors", {}, torch.float32)
    make_checkpoint("tiny-sd1", models / "checkpoints" / "sd1.safetensors", seed=1)
    (root / "input").mkdir()
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(HEIGHT, WIDTH, 4, generator=generator) * 255).to(torch.uint8)
    pixels[..., 3] = 255
    pixels[5:30, 11:47, 3] = 0  # transparent: LoadImage's mask is 1 there, off the 8x8 grid
    Image.fromarray(pixels.numpy(), "RGBA").save(root / "input" / "photo.png")
    return root


@pytest.fixture(scope="module")
def engine(root):
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def workflow(variant: str, cfg: float = 1.0) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"flux1-tiny-{variant}.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                         "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-sharp.safetensors"}},
        "4": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                             "width": WIDTH, "height": HEIGHT}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["2", 0], "clip_l": "a cat",
                                                              "t5xxl": "make the cat blue", "guidance": 3.5}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "11": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["12", 0], "negative": ["12", 1],
                                                   "latent_image": ["12", 2], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    if variant in ("kontext", "dev"):
        doc["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["3", 0]}}
        doc["12"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["13", 0]}}
        doc["8"]["inputs"].update(negative=["7", 0], latent_image=["5", 0])
    elif variant == "fill":
        doc["12"] = {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "vae": ["3", 0], "pixels": ["11", 0], "mask": ["11", 1],
            "noise_mask": False}}  # diffusers' FluxFillPipeline keeps no part of the latent
    else:
        doc["12"] = {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "vae": ["3", 0], "pixels": ["11", 0]}}
    return doc


def run(engine, doc: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
    result = engine.run(parse_api(doc), keep=["6", "8", "9"])
    assert result.ok, result.error
    return result.values["8"][0]["samples"], result.values["9"][0], result.values["6"][0]


def refusal(engine, doc: dict) -> str:
    """Why the workflow is refused: at validation where the files' headers tell (tests/nodes/
    test_edit_input_validation.py), else when it runs."""
    try:
        result = engine.run(parse_api(doc))
    except WorkflowInvalid as e:
        return str(e)
    assert not result.ok
    return str(result.error)


def diffusers_parts(root, variant: str) -> dict:
    """The pipeline parts diffusers builds from the same files: its transformer and AutoencoderKL."""
    models = root / "models"
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=16,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    state = convert_ldm_vae_checkpoint(load_state_dict(models / "vae" / "ae-sharp.safetensors"), dict(vae.config))
    vae.load_state_dict(state, strict=True)
    transformer = diffusers_twin(load_flux_unet(models / "diffusion_models" / f"flux1-tiny-{variant}.safetensors").unet)
    return {"scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER), "vae": vae.eval(), "text_encoder": None,
            "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None, "transformer": transformer}


def pictures(root) -> tuple[Image.Image, Image.Image]:
    rgba = Image.open(root / "input" / "photo.png")
    mask = Image.fromarray((255 - np.asarray(rgba)[..., 3]).astype(np.uint8), "L")
    return rgba.convert("RGB"), mask


@pytest.mark.parametrize("variant", ["kontext", "fill", "depth"])
def test_workflow_matches_diffusers_pipeline(engine, root, variant: str) -> None:
    ours, image, [(context, options)] = run(engine, workflow(variant))
    picture, mask = pictures(root)
    h, w = HEIGHT // 8, WIDTH // 8
    noise = FluxPipeline._pack_latents(prepare_noise(torch.zeros(1, 16, h, w), SEED), 1, 16, h, w)
    common = {"prompt_embeds": context, "pooled_prompt_embeds": options["pooled_output"], "height": HEIGHT,
              "width": WIDTH, "num_inference_steps": STEPS, "guidance_scale": 3.5, "output_type": "latent",
              "latents": noise}
    if variant == "kontext":
        pipe = FluxKontextPipeline(**diffusers_parts(root, variant))
        call = {"image": picture, "max_area": HEIGHT * WIDTH, "_auto_resize": False}
    elif variant == "fill":
        pipe = FluxFillPipeline(**diffusers_parts(root, variant))
        call = {"image": picture, "mask_image": mask}
    else:
        pipe = FluxControlPipeline(**diffusers_parts(root, variant))
        call = {"control_image": picture}
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        packed = pipe(**common, **call).images
    expected = FluxPipeline._unpack_latents(packed, HEIGHT, WIDTH, 8) / 0.3611 + LATENT_SHIFT
    assert (expected - LATENT_SHIFT).abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3)


def test_the_reference_and_the_concat_matter(engine) -> None:
    """Each edit input moves the result: without it the same model and noise give another latent."""
    for variant, node, key in (("kontext", "12", "latent"), ("fill", "12", "mask"), ("depth", "11", "image")):
        doc = workflow(variant)
        ours = run(engine, doc)[0]
        if variant == "depth":
            doc["14"] = {"class_type": "ImageInvert", "inputs": {"image": ["11", 0]}}
            doc["12"]["inputs"]["pixels"] = ["14", 0]
        elif variant == "fill":
            doc["14"] = {"class_type": "InvertMask", "inputs": {"mask": ["11", 1]}}
            doc[node]["inputs"][key] = ["14", 0]
        else:
            del doc[node]["inputs"][key]
        assert (run(engine, doc)[0] - ours).abs().mean() > 1e-3, variant


def test_several_references_and_their_placement(engine) -> None:
    doc = workflow("kontext", cfg=2.0)
    doc["14"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["12", 0], "latent": ["5", 0]}}
    doc["8"]["inputs"]["positive"] = ["14", 0]
    doc["15"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 0], "latent": ["13", 0]}}
    doc["8"]["inputs"]["negative"] = ["15", 0]
    results = {}
    for method in ("offset", "index", "uxo/uno"):
        doc["16"] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
                     "inputs": {"conditioning": ["14", 0], "reference_latents_method": method}}
        doc["8"]["inputs"]["positive"] = ["16", 0]
        result = engine.run(parse_api(doc), keep=["16", "8"])
        assert result.ok, result.error
        [(_, options)] = result.values["16"][0]
        assert len(options["reference_latents"]) == 2
        assert options["reference_latents_method"] == {"uxo/uno": "uxo"}.get(method, method)
        results[method] = result.values["8"][0]["samples"]
    assert all((results[a] - results[b]).abs().mean() > 1e-4 for a, b in [("offset", "index"), ("index", "uxo/uno")])


def test_declarations_are_comfyuis(engine) -> None:
    info = {name: engine.registry.get(name).object_info() for name in
            ("ReferenceLatent", "FluxKontextImageScale", "FluxKontextMultiReferenceLatentMethod")}
    assert {n: (i["input_order"].get("required"), i["input_order"].get("optional"), i["output"], i["category"])
            for n, i in info.items()} == {
        "ReferenceLatent": (["conditioning"], ["latent"], ["CONDITIONING"], "advanced/conditioning/edit_models"),
        "FluxKontextImageScale": (["image"], [], ["IMAGE"], "advanced/conditioning/flux"),
        "FluxKontextMultiReferenceLatentMethod": (["conditioning", "reference_latents_method"], [],
                                                  ["CONDITIONING"], "advanced/conditioning/flux")}
    methods = info["FluxKontextMultiReferenceLatentMethod"]["input"]["required"]["reference_latents_method"][0]
    assert methods == ["offset", "index", "uxo/uno", "index_timestep_zero"]


def test_kontext_image_scale_picks_the_closest_training_size(engine) -> None:
    scale = engine.registry.get("FluxKontextImageScale")()
    wide = torch.rand(1, 48, 64, 3)  # 4:3 -> 1184 x 880 (1.345)
    [out] = scale.execute(wide)
    assert out.shape == (1, 880, 1184, 3) and 0 <= out.min() and out.max() <= 1
    assert scale.execute(torch.rand(2, 100, 40, 3))[0].shape == (2, 1568, 672, 3)  # the tallest one
    assert scale.execute(torch.rand(1, 30, 30, 3))[0].shape == (1, 1024, 1024, 3)
    [reference] = engine.registry.get("ReferenceLatent")().execute([(torch.zeros(1, 4, 8), {"a": 1})], None)
    assert reference == [(reference[0][0], {"a": 1})]


def test_prompts_a_model_cannot_take_are_refused(engine) -> None:
    sd1 = workflow("kontext")
    sd1["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    sd1["4"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}}
    sd1["6"] = sd1["4"]
    sd1["8"]["inputs"]["model"] = ["1", 0]
    sd1["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}}
    assert "(ReferenceLatent), which Flux Kontext, FLUX.2 and Qwen-Image-Edit take; sd1.safetensors is SD1" in refusal(
        engine, sd1)
    fill_with_reference = workflow("kontext")
    fill_with_reference["1"]["inputs"]["unet_name"] = "flux1-tiny-fill.safetensors"
    assert "is a Flux Fill (inpainting) model, which takes none" in refusal(engine, fill_with_reference)
    depth_with_mask = workflow("fill")
    depth_with_mask["1"]["inputs"]["unet_name"] = "flux1-tiny-depth.safetensors"
    assert "carry an inpainting mask (InpaintModelConditioning) and flux1-tiny-depth.safetensors is a Flux Depth" \
        in refusal(engine, depth_with_mask)
    plain_with_control = workflow("depth")
    plain_with_control["1"]["inputs"]["unet_name"] = "flux1-tiny-kontext.safetensors"
    assert "carry a control image (InstructPixToPixConditioning) and flux1-tiny-kontext.safetensors takes none" \
        in refusal(engine, plain_with_control)
    # A plain model given InpaintModelConditioning's prompts inpaints by the noise mask alone, as in ComfyUI.
    plain_inpaint = workflow("fill")
    plain_inpaint["1"]["inputs"]["unet_name"] = "flux1-tiny-kontext.safetensors"
    plain_inpaint["12"]["inputs"]["noise_mask"] = True
    assert run(engine, plain_inpaint)[0].shape == (1, 16, HEIGHT // 8, WIDTH // 8)
