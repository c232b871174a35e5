"""HunyuanImage 2.1 end to end on tiny random files in the real layouts (`main.py make-hunyuan-image21`): the
text-to-image graph against diffusers' HunyuanImagePipeline (plain CFG as its guider) given the same prompt states and
noise, the distilled model's guidance and MeanFlow step ends, and the refusals a wrong wiring gets."""

from __future__ import annotations

import pytest
import torch
from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.hunyuan_image21_files import LATENT_SCALE, load_hunyuan_image21_unet, make_hunyuan_image21_files
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_hunyuan_image21 import twin

WIDTH, HEIGHT, SEED, STEPS, CFG = 128, 96, 5, 4, 3.5
LATENT = (1, 64, HEIGHT // 32, WIDTH // 32)
PROMPT, NEGATIVE = 'a poster that says "HELLO" in bold letters', "blurry"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hy21")
    files = make_hunyuan_image21_files(root / "models", seed=3, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def workflow(unet: str = "hunyuanimage2.1-tiny.safetensors", cfg: float = CFG) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "qwen_2.5_vl_7b-hunyuan_image21-tiny.safetensors",
            "clip_name2": "byt5_small_glyphxl-hunyuan_image21-tiny.safetensors", "type": "hunyuan_image"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "hunyuan_image_2.1_vae-tiny.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": NEGATIVE}},
        "7": {"class_type": "EmptyHunyuanImageLatent", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "20": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def run(engine, doc: dict, keep=("8", "9")):
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def side(conditioning: list) -> tuple[torch.Tensor, ...]:
    """One side's prompt states as diffusers' pipeline takes them (a masked zero row of byT5 states where the prompt
    quotes nothing, as diffusers encodes it)."""
    embedding, options = conditioning[0]
    byt5 = options.get("conditioning_byt5small")
    if byt5 is None:
        return embedding, options["attention_mask"], torch.zeros(1, 1, 32), torch.zeros(1, 1, dtype=torch.long)
    return embedding, options["attention_mask"], byt5, options["byt5_attention_mask"]


def pipeline(path, cfg: float | None) -> HunyuanImagePipeline:
    loaded = load_hunyuan_image21_unet(path, dtype=torch.float32)
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None,
        transformer=twin(loaded.family.unet_config, loaded.unet.model.state_dict()),
        guider=None if cfg is None else ClassifierFreeGuidance(guidance_scale=cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe: HunyuanImagePipeline, positive: list, negative: list, **kwargs) -> torch.Tensor:
    p, n = side(positive), side(negative)
    with torch.no_grad():
        out = pipe(prompt_embeds=p[0], prompt_embeds_mask=p[1], prompt_embeds_2=p[2], prompt_embeds_mask_2=p[3],
                   negative_prompt_embeds=n[0], negative_prompt_embeds_mask=n[1], negative_prompt_embeds_2=n[2],
                   negative_prompt_embeds_mask_2=n[3], height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   sigmas=[1 - i / STEPS for i in range(STEPS)], latents=prepare_noise(torch.zeros(LATENT), SEED),
                   output_type="latent", **kwargs).images
    return out / LATENT_SCALE


def test_text_to_image_matches_diffusers_pipeline(engine, base) -> None:
    """The prompts (a quoted one: byT5 too), the transformer, shift 5, CFG and euler against diffusers'
    HunyuanImagePipeline with plain CFG as its guider (ComfyUI's), from the same prompt states and noise."""
    latent, image, positive, negative = run(engine, workflow(), keep=("8", "9", "5", "6"))
    assert "conditioning_byt5small" in positive[0][1] and "conditioning_byt5small" not in negative[0][1]
    expected = reference(pipeline(base[1]["unet"], CFG), positive, negative)
    assert latent["samples"].shape == LATENT and expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and 0 <= image.min() and image.max() <= 1 and image.std() > 0.01


def test_the_distilled_model_takes_fluxguidance_and_step_ends(engine, base) -> None:
    """The distilled model at cfg 1: FluxGuidance's strength (x 1000) and MeanFlow's step ends, averaged into the time
    embedding, against diffusers' pipeline with its guider off."""
    doc = workflow("hunyuanimage2.1_distilled-tiny.safetensors", cfg=1.0)
    doc["30"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": 3.25}}
    doc["8"]["inputs"]["positive"] = ["30", 0]
    latent, positive, negative = run(engine, doc, keep=("8", "5", "6"))
    expected = reference(pipeline(base[1]["distilled"], None), positive, negative, distilled_guidance_scale=3.25)
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    default, = run(engine, workflow("hunyuanimage2.1_distilled-tiny.safetensors", cfg=1.0), keep=("8",))
    assert (default["samples"] - latent["samples"]).abs().max() > 1e-3  # without FluxGuidance: ComfyUI's 6


def test_an_empty_latent_image_is_refitted_and_refusals(engine, base) -> None:
    doc = workflow()
    doc["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}}
    latent, = run(engine, doc, keep=("8",))
    assert latent["samples"].shape == LATENT  # 1/8 and 4 channels refitted to 1/32 and 64, as ComfyUI does
    doc = workflow()
    doc["2"]["inputs"]["clip_name2"] = "qwen_2.5_vl_7b-hunyuan_image21-tiny.safetensors"
    with pytest.raises(WorkflowInvalid, match="type hunyuan_image needs"):
        engine.run(parse_api(doc), keep=["8"])
    from ldm.checkpoint import CheckpointError, write_safetensors
    from ldm.hunyuan_image21 import refiner_tiny_config, tiny_state_dict
    from ldm.hunyuan_image21_files import peek_hunyuan_image21

    refiner = base[0].base / "models" / "diffusion_models" / "hunyuanimage2.1_refiner-tiny.safetensors"
    write_safetensors({"model.diffusion_model." + k: v for k, v in tiny_state_dict(0, refiner_tiny_config()).items()},
                      refiner, {})
    with pytest.raises(CheckpointError, match="refiner, which Loom does not run yet"):
        peek_hunyuan_image21(refiner)
    doc = workflow("hunyuanimage2.1_refiner-tiny.safetensors")
    with pytest.raises(WorkflowInvalid, match="refiner"):
        engine.run(parse_api(doc), keep=["8"])


def test_fp8_weights_run_and_stay_near(engine) -> None:
    """UNETLoader's fp8_e4m3fn: the weights stored in fp8, the patch convolution (whose dtype is the compute dtype)
    left as it is."""
    plain, = run(engine, workflow(), keep=("8",))
    doc = workflow()
    doc["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    fp8, = run(engine, doc, keep=("8",))
    error = (fp8["samples"] - plain["samples"]).abs().mean() / plain["samples"].abs().mean()
    assert torch.isfinite(fp8["samples"]).all() and 0 < error < 0.2


def test_loras_and_other_latents_are_refused_by_name(engine, base) -> None:
    doc = workflow()
    doc["40"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "any.safetensors", "strength_model": 1.0}}
    doc["8"]["inputs"]["model"] = ["40", 0]
    (base[0].base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    (base[0].base / "models" / "loras" / "any.safetensors").write_bytes(b"")
    with pytest.raises(WorkflowInvalid, match="does not apply LoRAs to HunyuanImage 2.1"):
        engine.run(parse_api(doc), keep=["8"])
    doc = workflow()
    doc["7"] = {"class_type": "EmptyHunyuanVideo15Latent",
                "inputs": {"width": WIDTH, "height": HEIGHT, "length": 5, "batch_size": 1}}
    result = engine.run(parse_api(doc), keep=["8"])
    assert not result.ok and "EmptyHunyuanImageLatent" in result.error.exception_message
