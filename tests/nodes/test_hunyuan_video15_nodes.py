"""HunyuanVideo 1.5 end to end on tiny random files in the real layouts (`main.py make-hunyuan-video15`): ComfyUI's
declarations, text-to-video and image-to-video graphs against diffusers' HunyuanVideo15Pipeline and
HunyuanVideo15ImageToVideoPipeline given the same prompt states, image and noise, the super-resolution model's
conditioning and MeanFlow step ends, --lowvram, and the refusals a wrong wiring gets."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from diffusers import (
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
)

from executor.devices import EngineOptions
from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.hunyuan_video15_files import LATENT_SCALE, load_hunyuan_video15_unet, make_hunyuan_video15_files
from ldm.sampling import prepare_noise
from ldm.sampling.run import current_run, sampling_run
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_hunyuan_video15 import twin

WIDTH, HEIGHT, FRAMES, SEED, STEPS, CFG = 64, 48, 9, 5, 4, 6.0
LATENT = (1, 32, 3, HEIGHT // 16, WIDTH // 16)
PROMPT, NEGATIVE = 'a neon sign reading "OPEN" over a wet street', ""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hv15")
    files = make_hunyuan_video15_files(root / "models", seed=3, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def workflow(unet: str = "hunyuanvideo1.5_720p_t2v-tiny.safetensors", i2v: bool = False) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "qwen_2.5_vl_7b-hunyuan_video15-tiny.safetensors",
            "clip_name2": "byt5_small_glyphxl-tiny.safetensors", "type": "hunyuan_video_15"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "hunyuanvideo15_vae-tiny.safetensors"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": NEGATIVE}},
        "7": {"class_type": "EmptyHunyuanVideo15Latent",
              "inputs": {"width": WIDTH, "height": HEIGHT, "length": FRAMES, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "20": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    if i2v:
        doc.update({
            "10": {"class_type": "CLIPVisionLoader",
                   "inputs": {"clip_name": "sigclip_vision_patch14_384-tiny.safetensors"}},
            "11": {"class_type": "EmptyImage",
                   "inputs": {"width": 80, "height": 56, "batch_size": 1, "color": 0xD04020}},
            "12": {"class_type": "CLIPVisionEncode",
                   "inputs": {"clip_vision": ["10", 0], "image": ["11", 0], "crop": "center"}},
            "13": {"class_type": "HunyuanVideo15ImageToVideo", "inputs": {
                "positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": WIDTH, "height": HEIGHT,
                "length": FRAMES, "batch_size": 1, "start_image": ["11", 0], "clip_vision_output": ["12", 0]}},
        })
        doc["8"]["inputs"].update(positive=["13", 0], negative=["13", 1], latent_image=["13", 2])
    return doc


def run(engine, doc: dict, keep=("8", "9")):
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def diffusers_transformer(path) -> torch.nn.Module:
    """diffusers' transformer holding the file's weights."""
    loaded = load_hunyuan_video15_unet(path, dtype=torch.float32)
    return twin(loaded.family.unet_config, loaded.unet.model.state_dict())


def prompt_states(conditioning: list) -> dict[str, torch.Tensor]:
    """What diffusers' pipelines take for one side: the Qwen states and mask, the byT5 states and mask (a masked zero
    row where the prompt quotes nothing, as diffusers encodes it)."""
    embedding, options = conditioning[0]
    byt5 = options.get("conditioning_byt5small")
    if byt5 is None:
        byt5, byt5_mask = torch.zeros(1, 1, embedding.shape[-1]), torch.zeros(1, 1, dtype=torch.long)
    else:
        byt5_mask = options["byt5_attention_mask"]
    return {"embeds": embedding, "mask": options["attention_mask"], "embeds_2": byt5, "mask_2": byt5_mask}


def pipeline_inputs(positive: list, negative: list) -> dict:
    p, n = prompt_states(positive), prompt_states(negative)
    return {"prompt_embeds": p["embeds"], "prompt_embeds_mask": p["mask"], "prompt_embeds_2": p["embeds_2"],
            "prompt_embeds_mask_2": p["mask_2"], "negative_prompt_embeds": n["embeds"],
            "negative_prompt_embeds_mask": n["mask"], "negative_prompt_embeds_2": n["embeds_2"],
            "negative_prompt_embeds_mask_2": n["mask_2"], "height": HEIGHT, "width": WIDTH, "num_frames": FRAMES,
            "num_inference_steps": STEPS, "sigmas": [1 - i / STEPS for i in range(STEPS)],
            "latents": prepare_noise(torch.zeros(LATENT), SEED), "output_type": "latent"}


class _VaeShape:
    temporal_compression_ratio, spatial_compression_ratio = 4, 16
    config = type("Config", (), {"scaling_factor": LATENT_SCALE, "latent_channels": 32})()


def test_declarations_are_comfyuis(engine) -> None:
    names = ("EmptyHunyuanVideo15Latent", "HunyuanVideo15ImageToVideo", "HunyuanVideo15SuperResolution",
             "HunyuanVideo15LatentUpscaleWithModel")
    info = {name: engine.registry.get(name).object_info() for name in names}
    assert {name: i["input_order"]["required"] for name, i in info.items()} == {
        "EmptyHunyuanVideo15Latent": ["width", "height", "length", "batch_size"],
        "HunyuanVideo15ImageToVideo": ["positive", "negative", "vae", "width", "height", "length", "batch_size"],
        "HunyuanVideo15SuperResolution": ["positive", "negative", "latent", "noise_augmentation"],
        "HunyuanVideo15LatentUpscaleWithModel": ["model", "samples", "upscale_method", "width", "height", "crop"]}
    assert info["HunyuanVideo15ImageToVideo"]["input_order"]["optional"] == ["start_image", "clip_vision_output"]
    assert info["HunyuanVideo15SuperResolution"]["input_order"]["optional"] == ["vae", "start_image",
                                                                                 "clip_vision_output"]
    length = info["HunyuanVideo15ImageToVideo"]["input"]["required"]["length"][1]
    assert (length["default"], length["step"]) == (33, 4)


def test_text_to_video_matches_diffusers_pipeline(engine, base) -> None:
    """The prompts (a quoted one: byT5 too), the transformer, shift 7, CFG and euler against diffusers'
    HunyuanVideo15Pipeline given the same prompt states and noise. `simple` takes shift(1 - i / steps); diffusers
    is given those unshifted levels, which it shifts the same way. The pipeline's latent is the model's (x 1.03682)."""
    latent, video, positive, negative = run(engine, workflow(), keep=("8", "9", "5", "6"))
    assert "conditioning_byt5small" in positive[0][1] and "conditioning_byt5small" not in negative[0][1]
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=diffusers_transformer(base[1]["t2v"]),
                                  vae=_VaeShape(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                  text_encoder_2=None, tokenizer_2=None,
                                  guider=ClassifierFreeGuidance(guidance_scale=CFG))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(**pipeline_inputs(positive, negative)).frames
    expected = out / LATENT_SCALE
    assert latent["samples"].shape == LATENT and expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert video.shape == (FRAMES, HEIGHT, WIDTH, 3) and 0 <= video.min() and video.max() <= 1 and video.std() > 0.01


def test_image_to_video_matches_diffusers_pipeline(engine, base) -> None:
    """HunyuanVideo15ImageToVideo's start picture (its latent in the first frame, the mask) and CLIPVisionEncode's
    SigLIP states through the i2v transformer, against HunyuanVideo15ImageToVideoPipeline given the same picture
    latent, image states and noise."""
    doc = workflow("hunyuanvideo1.5_720p_i2v-tiny.safetensors", i2v=True)
    latent, positive, negative, vision, image_conditioning = run(engine, doc, keep=("8", "5", "6", "12", "13"))
    options = image_conditioning[0][1]
    assert options["concat_latent_image"].shape == LATENT and options["concat_latent_image"][:, :, 1:].eq(0).all()
    assert options["concat_mask"][0, 0, :, 0, 0].tolist() == [0.0, 1.0, 1.0]
    assert vision.last_hidden_state.shape == (1, 16, 32)
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=diffusers_transformer(base[1]["i2v"]), vae=_VaeShape(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=CFG), image_encoder=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    picture = options["concat_latent_image"][:, :, :1] * LATENT_SCALE  # the VAE itself is checked on its own
    pipe._get_image_latents = lambda **_: picture
    pipe.encode_image = lambda **_: vision.last_hidden_state
    inputs = {k: v for k, v in pipeline_inputs(positive, negative).items() if k not in ("height", "width")}
    with torch.no_grad():  # the picture sets only the pipeline's size, which the given noise overrides
        out = pipe(image=PIL.Image.new("RGB", (WIDTH, HEIGHT)), **inputs).frames
    torch.testing.assert_close(latent["samples"], out / LATENT_SCALE, rtol=1e-4, atol=1e-4)
    text_only, = run(engine, workflow("hunyuanvideo1.5_720p_i2v-tiny.safetensors"), keep=("8",))
    assert (text_only["samples"] - latent["samples"]).abs().max() > 0.01  # the picture changed the video


def test_lowvram_streams_the_transformer_to_the_same_video(base) -> None:
    engine = Executor(builtin_registry(), services=Services.create(base[0], options=EngineOptions(lowvram=True)))
    streamed, = run(engine, workflow(), keep=("8",))
    plain, = run(Executor(builtin_registry(), services=Services.create(base[0])), workflow(), keep=("8",))
    torch.testing.assert_close(streamed["samples"], plain["samples"], rtol=0, atol=0)


def test_super_resolution_conditioning_and_meanflow_step_ends(engine, base) -> None:
    """HunyuanVideo15SuperResolution's 66 channels (the enlarged latent mixed with noise from the seed less 10,
    ComfyUI's), and the SR model told each step's end (the schedule's next level) as MeanFlow's second time."""
    from nodes.sd.hunyuan_video15 import HunyuanVideo15SuperResolution, hunyuan_video15_inputs
    from nodes.sd.models import DiffusionModel, schedule_of

    low = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    prompt = [(torch.zeros(1, 5, 32), {})]
    positive, negative, latent = HunyuanVideo15SuperResolution().execute(prompt, prompt, {"samples": low}, 0.7)
    cond = positive[0][1]["concat_latent_image"]
    assert cond.shape == (1, 66, *LATENT[2:]) and cond[:, 65].eq(1).all() and cond[:, :33].eq(0).all()
    assert torch.equal(cond[:, 33:65], low) and negative[0][1]["noise_augmentation"] == 0.7 and latent["samples"] is low
    assert "conditioning_byt5small" not in positive[0][1]
    loaded = load_hunyuan_video15_unet(base[1]["sr"], dtype=torch.float32)
    model = DiffusionModel(loaded.unet, loaded.family, "sr", schedule=schedule_of(loaded.family))
    assert loaded.family.shift == 2.0 and loaded.family.super_resolution and loaded.unet.config.meanflow
    _, [[(_, entry)]] = hunyuan_video15_inputs(model, {"samples": torch.zeros(LATENT)}, 889, positive)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(879))
    torch.testing.assert_close(entry["concat"][:, 33:65], 0.7 * noise + 0.3 * low)
    with sampling_run(torch.tensor([1.0, 0.75, 0.5])):
        assert loaded.unet.step_end(torch.tensor([1.0, 0.75, 0.5])).tolist() == [750.0, 500.0, 0.0]
        assert loaded.unet.step_end(torch.tensor([0.3])) is None  # off the schedule (a midpoint): none, as ComfyUI
    assert loaded.unet.step_end(torch.tensor([0.75])) is None  # outside a sampling run

    seen = []
    model_forward = loaded.unet.model.forward
    runs = []

    def recording(*args):
        seen.append(args[-1])
        runs.append(current_run().sigmas)
        return model_forward(*args)

    loaded.unet.model.forward = recording
    from ldm.sampling.ksampler import sample

    with torch.no_grad():
        sample(loaded.unet, model.schedule, torch.zeros(LATENT), seed=1, steps=3, cfg=2.0, sampler_name="euler",
               scheduler="simple", positive=[(torch.randn(1, 5, 32), {})], negative=[(torch.randn(1, 5, 32), {})],
               prediction="flow", concat=torch.zeros(1, 66, *LATENT[2:]))
    sigmas = runs[0]  # the run's schedule, which the model read
    assert all(r is sigmas for r in runs)
    assert len(sigmas) == 4 and sigmas[0] == 1 and sigmas[-1] == 0
    expected = [torch.full((2,), float(s) * 1000) for s in sigmas[1:]]  # both prompts in one call
    assert len(seen) == 3 and all(torch.allclose(r, e) for r, e in zip(seen, expected, strict=True))


def test_refusals(engine) -> None:
    doc = workflow()
    doc["2"]["inputs"]["clip_name2"] = "qwen_2.5_vl_7b-hunyuan_video15-tiny.safetensors"
    with pytest.raises(WorkflowInvalid, match="byT5 glyph encoder"):
        engine.run(parse_api(doc), keep=["8"])
    doc = workflow()
    doc["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}}
    doc["9"]["inputs"]["samples"] = ["8", 0]
    result = engine.run(parse_api(doc), keep=["8"])
    assert result.ok  # an empty image latent takes the model's channels and a frame axis, as ComfyUI fits it
    doc = workflow()
    doc["13"] = {"class_type": "HunyuanVideo15ImageToVideo", "inputs": {
        "positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": WIDTH, "height": HEIGHT,
        "length": FRAMES, "batch_size": 1, "start_image": ["14", 0]}}
    doc["14"] = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}}
    doc["15"] = {"class_type": "VAELoader", "inputs": {"vae_name": "missing_vae.safetensors"}}
    doc["13"]["inputs"]["vae"] = ["15", 0]
    doc["8"]["inputs"].update(positive=["13", 0], negative=["13", 1], latent_image=["13", 2])
    with pytest.raises(WorkflowInvalid, match="missing_vae"):
        engine.run(parse_api(doc), keep=["8"])


def test_the_1080p_pass_upscales_and_refines_with_the_sr_model(engine, base) -> None:
    """The template's SR group: the base pass's latent enlarged (bilinear in latent space to width / 16, then the
    upsampler), HunyuanVideo15SuperResolution's prompts, the SR model sampling them at cfg 1."""
    from ldm.hunyuan_video15_upsampler import load_hunyuan_video15_upsampler
    from nodes.sd.latent import upscale_latent

    doc = workflow()
    doc.update({
        "40": {"class_type": "LatentUpscaleModelLoader",
               "inputs": {"model_name": "hunyuanvideo15_latent_upsampler_1080p-tiny.safetensors"}},
        "41": {"class_type": "HunyuanVideo15LatentUpscaleWithModel", "inputs": {
            "model": ["40", 0], "samples": ["8", 0], "upscale_method": "bilinear", "width": 2 * WIDTH, "height": 0,
            "crop": "disabled"}},
        "42": {"class_type": "UNETLoader", "inputs": {
            "unet_name": "hunyuanvideo1.5_1080p_sr_distilled-tiny.safetensors", "weight_dtype": "default"}},
        "43": {"class_type": "HunyuanVideo15SuperResolution", "inputs": {
            "positive": ["5", 0], "negative": ["6", 0], "latent": ["41", 0], "noise_augmentation": 0.7}},
        "44": {"class_type": "KSampler", "inputs": {
            "model": ["42", 0], "seed": 889, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["43", 0], "negative": ["43", 1], "latent_image": ["43", 2], "denoise": 1.0}},
        "45": {"class_type": "VAEDecode", "inputs": {"samples": ["44", 0], "vae": ["3", 0]}},
        "46": {"class_type": "PreviewImage", "inputs": {"images": ["45", 0]}},
    })
    low, enlarged, sharp, video = run(engine, doc, keep=("8", "41", "44", "45"))
    assert enlarged["samples"].shape == (1, 32, 3, HEIGHT // 8, WIDTH // 8)  # height 0: kept to the aspect ratio
    upsampler = load_hunyuan_video15_upsampler(base[1]["upsampler"])
    frames = low["samples"].movedim(2, 1).flatten(0, 1)
    resized = upscale_latent(frames, WIDTH // 8, HEIGHT // 8, "bilinear", "disabled").unflatten(0, (1, 3)).movedim(1, 2)
    torch.testing.assert_close(enlarged["samples"], upsampler(resized), rtol=1e-5, atol=1e-5)
    assert sharp["samples"].shape == enlarged["samples"].shape and video.shape == (FRAMES, 2 * HEIGHT, 2 * WIDTH, 3)
    doc["47"] = {"class_type": "LTXVLatentUpsampler",
                 "inputs": {"samples": ["8", 0], "upscale_model": ["40", 0], "vae": ["3", 0]}}
    doc["48"] = {"class_type": "PreviewAny", "inputs": {"source": ["47", 0]}}
    result = engine.run(parse_api(doc), keep=["47"])
    assert not result.ok and "HunyuanVideo15LatentUpscaleWithModel" in result.error.exception_message


def test_a_lora_patches_the_transformer_through_loraloadermodelonly(engine, base) -> None:
    """A LoRA in ComfyUI's names (`diffusion_model.double_blocks.0.img_attn_qkv`) through LoraLoaderModelOnly: it
    changes the video; at strength 0 it is the plain model's (the names themselves: tests/ldm)."""
    from safetensors.torch import save_file

    config = load_hunyuan_video15_unet(base[1]["t2v"], dtype=torch.float32).family.unet_config
    g = torch.Generator().manual_seed(7)
    rank, width = 4, config.hidden_size
    lora = {"diffusion_model.double_blocks.0.img_attn_qkv.lora_down.weight": torch.randn(rank, width, generator=g),
            "diffusion_model.double_blocks.0.img_attn_qkv.lora_up.weight": torch.randn(3 * width, rank, generator=g),
            "diffusion_model.double_blocks.0.img_attn_qkv.alpha": torch.tensor(float(rank))}
    (base[0].base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    save_file(lora, base[0].base / "models" / "loras" / "hv15_tiny_lora.safetensors")
    plain, = run(engine, workflow(), keep=("8",))
    for strength, changed in ((1.0, True), (0.0, False)):
        doc = workflow()
        doc["40"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": "hv15_tiny_lora.safetensors", "strength_model": strength}}
        doc["8"]["inputs"]["model"] = ["40", 0]
        patched, = run(engine, doc, keep=("8",))
        assert ((patched["samples"] - plain["samples"]).abs().max() > 1e-3) == changed


def test_super_resolution_prompts_on_the_720p_model_name_the_sr_model(base) -> None:
    from nodes.sd.hunyuan_video15 import hunyuan_video15_inputs
    from nodes.sd.models import DiffusionModel

    loaded = load_hunyuan_video15_unet(base[1]["t2v"], dtype=torch.float32)
    model = DiffusionModel(loaded.unet, loaded.family, "hunyuanvideo1.5_720p_t2v")
    prompts = [(torch.zeros(1, 5, 32), {"concat_latent_image": torch.zeros(1, 66, *LATENT[2:])})]
    with pytest.raises(ValueError, match="HunyuanVideo15SuperResolution for the 1080p super-resolution model"):
        hunyuan_video15_inputs(model, {"samples": torch.zeros(LATENT)}, 0, prompts)
