"""Wan 2.1 end to end on tiny random files in the real layouts (`main.py make-wan`): ComfyUI's declarations, the
text-to-video workflow against diffusers' WanPipeline (UMT5 prompts, transformer, shift, CFG, sampler), image-to-video
against WanImageToVideoPipeline's conditioning, and the refusals a wrong wiring gets."""

from __future__ import annotations

import lzma

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.sampling import prepare_noise
from ldm.umt5 import TINY_UMT5, umt5_transformers_config
from ldm.wan_files import load_wan_unet
from ldm.wan_presets import make_wan_files
from ldm.wan_vae_files import load_wan_vae
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_wan import diffusers_twin

WIDTH, HEIGHT, FRAMES, SEED, STEPS, CFG, SHIFT = 64, 48, 9, 5, 4, 4.0, 8.0  # 4 steps: `simple` = 1 - i / 4
PROMPT, NEGATIVE = "a fox running through snow", "blurry, static"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    files = make_wan_files(root / "models", seed=3, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def workflow(unet: str = "wan2.1_t2v-tiny.safetensors", i2v: bool = False) -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl-tiny.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae-tiny.safetensors"}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": NEGATIVE}},
        "7": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": WIDTH, "height": HEIGHT, "length": FRAMES, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0],
            "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "20": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    if i2v:
        doc.update({
            "10": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_h-tiny.safetensors"}},
            "11": {"class_type": "EmptyImage",
                   "inputs": {"width": 80, "height": 56, "batch_size": 1, "color": 0xD04020}},
            "12": {"class_type": "CLIPVisionEncode",
                   "inputs": {"clip_vision": ["10", 0], "image": ["11", 0], "crop": "none"}},
            "13": {"class_type": "WanImageToVideo", "inputs": {
                "positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": WIDTH, "height": HEIGHT,
                "length": FRAMES, "batch_size": 1, "clip_vision_output": ["12", 0], "start_image": ["11", 0]}},
        })
        doc["8"]["inputs"].update(positive=["13", 0], negative=["13", 1], latent_image=["13", 2])
    return doc


def run(engine, doc: dict, keep=("8", "9")):
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def reference_text(files, tmp_path):
    from transformers import T5TokenizerFast, UMT5EncoderModel

    from ldm.tokenizer import DATA_DIR

    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_bytes(lzma.decompress((DATA_DIR / "umt5_tokenizer.json.xz").read_bytes()))
    encoder = UMT5EncoderModel(umt5_transformers_config(TINY_UMT5))
    encoder.load_state_dict(load_file(files["umt5xxl"]), strict=False)
    return T5TokenizerFast(tokenizer_file=str(tokenizer_file)), encoder.eval()


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """diffusers' flow scheduler at SHIFT on `simple`'s unshifted levels (the Wan pipelines take no `sigmas`)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda *_, device=None, **__: set_timesteps(
        sigmas=[1 - i / STEPS for i in range(STEPS)], device=device)
    return scheduler


def reference_vae(files) -> AutoencoderKLWan:
    vae = load_wan_vae(files["vae"])
    c = vae.config
    twin = AutoencoderKLWan(base_dim=c.base_dim, decoder_base_dim=c.decoder_base_dim, z_dim=c.z_dim)
    twin.load_state_dict(convert_wan_vae_to_diffusers(dict(vae.state_dict())), strict=True)
    return twin.eval()


def test_declarations_are_comfyuis(engine) -> None:
    info = {name: engine.registry.get(name).object_info() for name in
            ("EmptyHunyuanLatentVideo", "WanImageToVideo", "WanFirstLastFrameToVideo", "Wan22ImageToVideoLatent")}
    assert {name: i["input_order"]["required"] for name, i in info.items()} == {
        "EmptyHunyuanLatentVideo": ["width", "height", "length", "batch_size"],
        "WanImageToVideo": ["positive", "negative", "vae", "width", "height", "length", "batch_size"],
        "WanFirstLastFrameToVideo": ["positive", "negative", "vae", "width", "height", "length", "batch_size"],
        "Wan22ImageToVideoLatent": ["vae", "width", "height", "length", "batch_size"]}
    assert info["WanImageToVideo"]["input_order"]["optional"] == ["clip_vision_output", "start_image"]
    assert info["WanImageToVideo"]["output"] == ["CONDITIONING", "CONDITIONING", "LATENT"]
    length = info["EmptyHunyuanLatentVideo"]["input"]["required"]["length"][1]
    assert (length["default"], length["min"], length["step"]) == (25, 1, 4)


def test_text_to_video_matches_wan_pipeline(engine, base, tmp_path) -> None:
    """UMT5 prompts, the transformer, ModelSamplingSD3's shift, CFG and euler against diffusers' WanPipeline from the
    prompts (its own text encoding) and the same noise. `simple` takes shift(1 - i / steps); diffusers is given those
    unshifted levels (`scheduler`), which it shifts the same way. The pipeline's latent is normalised per channel."""
    files = base[1]
    latent, video = run(engine, workflow())
    tokenizer, text_encoder = reference_text(files, tmp_path)
    unet = load_wan_unet(files["t2v"])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=diffusers_twin(unet.unet),
                       scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    noise = prepare_noise(torch.zeros(1, 16, 3, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                   num_inference_steps=STEPS, guidance_scale=CFG,
                   latents=noise, output_type="latent").frames
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1, 1) for v in (unet.family.latent_mean, unet.family.latent_std))
    expected = out * std + mean
    assert latent["samples"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8) and expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert video.shape == (FRAMES, HEIGHT, WIDTH, 3) and 0 <= video.min() and video.max() <= 1 and video.std() > 0.01


def test_image_to_video_conditioning_matches_diffusers(engine, base) -> None:
    """WanImageToVideo's start image and mask, and CLIPVisionEncode's penultimate states, through the i2v
    transformer against WanImageToVideoPipeline given the same image, image states and noise."""
    files = base[1]
    doc = workflow("wan2.1_i2v-tiny.safetensors", i2v=True)
    latent, video, conditioning, image, vision = run(engine, doc, keep=("8", "9", "13", "11", "12"))
    prompts = conditioning[0][1]
    assert prompts["concat_latent_image"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    assert prompts["concat_mask"][0, 0, :, 0, 0].tolist() == [0.0, 1.0, 1.0]
    unet = load_wan_unet(files["i2v"])
    positive, negative = run(engine, doc, keep=("5", "6"))
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=reference_vae(files),
                                   transformer=diffusers_twin(unet.unet), scheduler=scheduler(),
                                   image_encoder=None, image_processor=None)
    pipe.set_progress_bar_config(disable=True)
    # The image's CLIP states as CLIPVisionEncode gave them (the tower itself is checked in test_clip_vision).
    pipe.encode_image = lambda image, device=None: vision.penultimate_hidden_states
    noise = prepare_noise(torch.zeros(1, 16, 3, HEIGHT // 8, WIDTH // 8), SEED)
    start = image[:, :HEIGHT, :WIDTH].movedim(-1, 1)  # one colour: any crop or resize of it is the same
    with torch.no_grad():
        out = pipe(image=start, prompt_embeds=positive[0][0], negative_prompt_embeds=negative[0][0], height=HEIGHT,
                   width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=CFG, latents=noise,
                   output_type="latent").frames
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1, 1) for v in (unet.family.latent_mean, unet.family.latent_std))
    torch.testing.assert_close(latent["samples"], out * std + mean, rtol=1e-4, atol=1e-4)
    assert video.shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_an_empty_image_latent_is_fitted_and_a_full_one_refused(engine) -> None:
    """As ComfyUI's samplers do: EmptyLatentImage's 4 zero channels become the model's 16, with one frame."""
    from nodes.sd.sampling import _fit_empty_latent

    doc = workflow()
    doc["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}}
    latent, video = run(engine, doc)
    doc["7"] = {"class_type": "EmptyHunyuanLatentVideo",
                "inputs": {"width": WIDTH, "height": HEIGHT, "length": 1, "batch_size": 1}}
    one_frame, _ = run(engine, doc)
    assert latent["samples"].shape == (1, 16, 1, HEIGHT // 8, WIDTH // 8) and video.shape == (1, HEIGHT, WIDTH, 3)
    assert torch.equal(latent["samples"], one_frame["samples"])
    model = run(engine, workflow(), keep=("4",))[0]
    with pytest.raises(ValueError, match="sampling 16-channel video latents; the latent \\(1, 4, 1, 6, 8\\)"):
        model.latent_in(_fit_empty_latent(model, {"samples": torch.ones(1, 4, HEIGHT // 8, WIDTH // 8)}))


def test_wrong_wiring_is_refused(engine) -> None:
    doc = workflow()
    doc["3"]["inputs"]["vae_name"] = "missing.safetensors"
    with pytest.raises(WorkflowInvalid, match="missing.safetensors"):
        engine.run(parse_api(doc))


def test_model_sampling_aura_flow_sets_the_shift_of_sd3_and_wan_models(engine) -> None:
    info = engine.registry.get("ModelSamplingAuraFlow").object_info()
    assert info["input"]["required"]["shift"][1]["default"] == 1.73 and info["category"] == "advanced/model"
    doc = workflow()
    doc["4"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.1}}
    model = run(engine, doc, keep=("4",))[0]
    assert model.schedule.sigmas[499].item() == pytest.approx(3.1 * 0.5 / (1 + 2.1 * 0.5))
    doc["4"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["9", 0], "shift": 3.1}}
    with pytest.raises(WorkflowInvalid):  # an IMAGE where a MODEL goes
        engine.run(parse_api(doc))


def _conditioning_doc(node: dict) -> dict:
    doc = workflow("wan2.1_i2v-tiny.safetensors", i2v=True)
    doc["13"] = node
    return doc


def test_first_last_frame_masks_both_ends_and_fun_inpaint_is_the_same(engine) -> None:
    common = {"positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": WIDTH, "height": HEIGHT,
              "length": FRAMES, "batch_size": 1, "start_image": ["11", 0], "end_image": ["11", 0]}
    flf = _conditioning_doc({"class_type": "WanFirstLastFrameToVideo",
                             "inputs": {**common, "clip_vision_start_image": ["12", 0]}})
    latent, conditioning = run(engine, flf, keep=("8", "13"))
    options = conditioning[0][1]
    # 9 pictures in 3 latent frames of 4 mask channels (12 slots): the first frame's 4 and the very last slot given
    assert options["concat_mask"].shape == (1, 4, 3, HEIGHT // 8, WIDTH // 8)
    assert options["concat_mask"][0, :, :, 0, 0].T.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert latent["samples"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8) and latent["samples"].std() > 0.1
    fun = _conditioning_doc({"class_type": "WanFunInpaintToVideo",
                             "inputs": {**common, "clip_vision_output": ["12", 0]}})
    fun_latent, fun_conditioning = run(engine, fun, keep=("8", "13"))
    torch.testing.assert_close(fun_conditioning[0][1]["concat_latent_image"], options["concat_latent_image"])
    torch.testing.assert_close(fun_latent["samples"], latent["samples"])


def test_fun_control_carries_control_and_start_latents(engine, base, tmp_path) -> None:
    import dataclasses

    from ldm.checkpoint import UNET_PREFIX, write_safetensors
    from ldm.wan_files import TINY_WAN, random_wan

    model = random_wan(dataclasses.replace(TINY_WAN, in_dim=48), seed=9)  # a Fun Control model: 16 + 32 channels
    folder = base[0].base / "models" / "diffusion_models"
    write_safetensors({UNET_PREFIX + k: v for k, v in model.state_dict().items()},
                      folder / "wan2.1_fun_control-tiny.safetensors", {"loom.wan_num_heads": "2"})
    doc = _conditioning_doc({"class_type": "WanFunControlToVideo", "inputs": {
        "positive": ["5", 0], "negative": ["6", 0], "vae": ["3", 0], "width": WIDTH, "height": HEIGHT,
        "length": FRAMES, "batch_size": 1, "control_video": ["14", 0]}})
    doc["14"] = {"class_type": "EmptyImage",
                 "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": FRAMES, "color": 0x808080}}
    doc["1"]["inputs"]["unet_name"] = "wan2.1_fun_control-tiny.safetensors"
    latent, conditioning = run(engine, doc, keep=("8", "13"))
    concat = conditioning[0][1]["concat_latent_image"]
    assert concat.shape == (1, 32, 3, HEIGHT // 8, WIDTH // 8)
    from ldm.wan_files import WAN21_MEAN

    # no start image: its half is the latent space's zero (its mean unnormalised); the control half is encoded
    torch.testing.assert_close(concat[:, 16:], torch.tensor(WAN21_MEAN).reshape(1, -1, 1, 1, 1).expand(1, 16, 3,
                               HEIGHT // 8, WIDTH // 8))
    assert not torch.allclose(concat[:, :16], concat[:, 16:])
    assert latent["samples"].shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8) and torch.isfinite(latent["samples"]).all()
