"""InstructPixToPixConditioning and SD_4XUpscale_Conditioning run through the engine with tiny checkpoints in the
real key layouts: what they put on the prompts, what the UNet is fed, whole runs against diffusers'
StableDiffusionInstructPix2PixPipeline and StableDiffusionUpscalePipeline (same weights, sampler and noise), and
the errors for a model that does not fit the prompts."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_checkpoint
from ldm.presets import make_checkpoint
from ldm.sampling import DiscreteSchedule
from ldm.unet import UNetModel
from ldm.upscaler_x4 import augment
from ldm.upscaler_x4 import schedule as x4_schedule
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.diffusers_reference import diffusers_unet, diffusers_vae, rel_err
from tests.ldm.test_instruct_pix2pix import write_tiny_ip2p
from tests.ldm.test_x4_upscaler import write_tiny_x4

diffusers = pytest.importorskip("diffusers")

SEED = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("concat_models")
    checkpoints = root / "models" / "checkpoints"
    write_tiny_ip2p(checkpoints / "ip2p.safetensors", seed=1)
    write_tiny_x4(checkpoints / "x4.safetensors", seed=2)
    make_checkpoint("tiny-sd2", checkpoints / "sd2.safetensors", seed=1)
    (root / "input").mkdir()
    generator = torch.Generator().manual_seed(0)
    for name, (width, height) in {"edit.png": (68, 60), "small.png": (16, 12)}.items():
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / "input" / name)
    return root


@pytest.fixture(scope="module")
def engine(root):
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


@pytest.fixture
def unet_calls(monkeypatch):
    """(input, y) of every UNet call."""
    seen = []
    forward = UNetModel.forward

    def spy(self, x, timesteps, context, y=None, **kwargs):
        seen.append((x.detach().clone(), None if y is None else y.detach().clone()))
        return forward(self, x, timesteps, context, y=y, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", spy)
    return seen


def run(engine, nodes: dict, *keep: str) -> list:
    result = engine.run(parse_api(nodes), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k] for k in keep]


def prompts(ckpt: str) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "make it a watercolour", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}}}


def ksampler(positive: list, negative: list, latent: list, cfg: float) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": SEED, "steps": 4, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": negative, "latent_image": latent, "denoise": 1.0}}


def ip2p_graph(cfg: float = 7.5) -> dict:
    return {**prompts("ip2p.safetensors"),
            "4": {"class_type": "LoadImage", "inputs": {"image": "edit.png"}},
            "5": {"class_type": "InstructPixToPixConditioning", "inputs": {
                "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "pixels": ["4", 0]}},
            "6": ksampler(["5", 0], ["5", 1], ["5", 2], cfg),
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
            "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}}


def start_noise(shape: tuple, sigma_max: float) -> torch.Tensor:
    """The pipelines' `latents` (which they multiply by sigma_max) for the KSampler's start at full denoise: its
    seeded unit noise times sqrt(1 + sigma_max^2), as ComfyUI starts."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    return noise * (1 + sigma_max**2) ** 0.5 / sigma_max


def references(root, ckpt: str):
    loaded = load_checkpoint(root / "models" / "checkpoints" / ckpt)
    return (diffusers_unet(loaded.family.unet_config, loaded.unet.state_dict()),
            diffusers_vae(loaded.family.vae_config, loaded.vae.state_dict()))


def test_ip2p_conditioning_carries_the_unscaled_image_latent_on_both_sides(engine, unet_calls):
    (pixels, _), (positive, negative, latent), (sampled,) = run(engine, ip2p_graph(), "4", "5", "6")
    image = positive[0][1]["concat_latent_image"]
    assert image.shape == (1, 4, 7, 8)  # 60x68 cropped to 56x64 about its centre, then / 8
    assert negative[0][1]["concat_latent_image"] is image
    assert torch.equal(latent["samples"], torch.zeros_like(image))
    [(encoded,)] = run(engine, {**ip2p_graph(), "9": {"class_type": "ImageCrop", "inputs": {
        "image": ["4", 0], "width": 64, "height": 56, "x": 2, "y": 2}},
        "10": {"class_type": "VAEEncode", "inputs": {"pixels": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}}}, "10")
    assert torch.equal(image, encoded["samples"])
    extra = unet_calls[-1][0][:, 4:]  # positive and negative rows: the latent as the VAE gives it, unscaled
    torch.testing.assert_close(extra, image.expand(2, -1, -1, -1))
    assert sampled["samples"].shape == (1, 4, 7, 8) and sampled["samples"].abs().max() > 0.1


def ip2p_pipeline(root, embeddings: tuple, pixels: torch.Tensor, shape: tuple, image_guidance: float):
    unet, vae = references(root, "ip2p.safetensors")
    pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, safety_checker=None, feature_extractor=None,
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        requires_safety_checker=False)
    noise = start_noise(shape, float(DiscreteSchedule().sigmas[-1]))
    with torch.no_grad():
        latents = pipe(prompt_embeds=embeddings[0], negative_prompt_embeds=embeddings[1], image=pixels,
                       num_inference_steps=4, guidance_scale=7.5, image_guidance_scale=image_guidance,
                       latents=noise, output_type="latent").images
        return latents, vae.decode(latents / 0.18215).sample


def test_ip2p_run_matches_the_diffusers_pipeline_at_image_guidance_1(engine, root):
    (pixels, _), (positive,), (negative,), (sampled,), (decoded,) = run(engine, ip2p_graph(), "4", "2", "3", "6", "7")
    cropped = pixels[:, 2:58, 2:66].movedim(-1, 1)
    latents, image = ip2p_pipeline(root, (positive[0][0], negative[0][0]), cropped, (1, 4, 7, 8), 1.0)
    assert rel_err(sampled["samples"] * 0.18215, latents) < 1e-4
    assert rel_err(decoded.movedim(-1, 1), ((image + 1) / 2).clamp(0, 1)) < 1e-4


def test_ip2p_image_guidance_is_dual_cfg_guider_against_the_plain_negative(engine, root):
    nodes = ip2p_graph()
    nodes["6"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["11", 0], "guider": ["12", 0], "sampler": ["13", 0], "sigmas": ["14", 0], "latent_image": ["5", 2]}}
    nodes.update({
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "12": {"class_type": "DualCFGGuider", "inputs": {  # text against image, image against nothing
            "model": ["1", 0], "cond1": ["5", 0], "cond2": ["5", 1], "negative": ["3", 0], "cfg_conds": 7.5,
            "cfg_cond2_negative": 1.5, "style": "regular"}},
        "13": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "14": {"class_type": "BasicScheduler", "inputs": {
            "model": ["1", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}}})
    (pixels, _), (positive,), (negative,), (sampled, _) = run(engine, nodes, "4", "2", "3", "6")
    cropped = pixels[:, 2:58, 2:66].movedim(-1, 1)
    latents, _ = ip2p_pipeline(root, (positive[0][0], negative[0][0]), cropped, (1, 4, 7, 8), 1.5)
    assert rel_err(sampled["samples"] * 0.18215, latents) < 1e-4


def test_an_ip2p_model_without_an_image_sees_zeros_as_in_comfyui(engine, unet_calls):
    nodes = {**prompts("ip2p.safetensors"),
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "6": ksampler(["2", 0], ["3", 0], ["4", 0], 5.0),
             "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}
    [(sampled,)] = run(engine, nodes, "6")
    assert torch.equal(unet_calls[-1][0][:, 4:], torch.zeros(2, 4, 8, 8))
    assert torch.isfinite(sampled["samples"]).all()


def x4_graph(scale: float = 4.0, augmentation: float = 0.2, ckpt: str = "x4.safetensors") -> dict:
    return {**prompts(ckpt),
            "4": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
            "5": {"class_type": "SD_4XUpscale_Conditioning", "inputs": {
                "images": ["4", 0], "positive": ["2", 0], "negative": ["3", 0], "scale_ratio": scale,
                "noise_augmentation": augmentation}},
            "6": ksampler(["5", 0], ["5", 1], ["5", 2], 5.0),
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "x4"}}}


def test_x4_upscale_makes_a_four_times_larger_image(engine, root, unet_calls):
    (pixels, _), (positive, negative, latent), (decoded,) = run(engine, x4_graph(), "4", "5", "7")
    assert latent["samples"].shape == (1, 4, 12, 16)  # the image's size: decoded at four times it
    assert decoded.shape == (1, 48, 64, 3)
    [saved] = sorted((root / "output").glob("x4_*.png"))
    assert Image.open(saved).size == (64, 48)
    options = positive[0][1]
    assert options["noise_augmentation"] == 0.2 and negative[0][1]["concat_image"] is options["concat_image"]
    torch.testing.assert_close(options["concat_image"], pixels.movedim(-1, 1) * 2 - 1)  # already the latent's size
    x, y = unet_calls[-1]
    assert y.tolist() == [70.0, 70.0]  # round(350 * 0.2): the noise level, as a class label
    noised = augment(options["concat_image"], 70, SEED - 10)  # seeded as ComfyUI seeds it
    torch.testing.assert_close(x[:, 4:], noised.expand(2, -1, -1, -1))


def test_x4_scale_ratio_sizes_the_latent_and_the_image_beside_it(engine, unet_calls):
    (pixels, _), (positive, _, latent) = run(engine, x4_graph(scale=2.0, augmentation=0.0), "4", "5")
    assert latent["samples"].shape == (1, 4, 6, 8)  # 16x12 * 2 / 4
    expected = torch.nn.functional.interpolate(pixels.movedim(-1, 1) * 2 - 1, size=(6, 8), mode="bilinear")
    torch.testing.assert_close(positive[0][1]["concat_image"], expected)
    x, y = unet_calls[-1]
    assert y.tolist() == [0.0, 0.0]
    torch.testing.assert_close(x[:, 4:], expected.expand(2, -1, -1, -1))  # no augmentation: as it is


def test_x4_run_matches_the_diffusers_upscale_pipeline(engine, root):
    (pixels, _), (positive,), (negative,), (sampled,) = run(engine, x4_graph(), "4", "2", "3", "6")
    unet, vae = references(root, "x4.safetensors")
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet,
        low_res_scheduler=diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
        scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                                   prediction_type="v_prediction"))
    noise = start_noise((1, 4, 12, 16), float(x4_schedule().sigmas[-1]))
    with torch.no_grad():  # the generator's first draw is the low-res image's noise: seeded as Loom seeds it
        latents = pipe(prompt_embeds=positive[0][0], negative_prompt_embeds=negative[0][0],
                       image=pixels.movedim(-1, 1), num_inference_steps=4, guidance_scale=5.0, noise_level=70,
                       generator=torch.Generator().manual_seed(SEED - 10), latents=noise, output_type="latent").images
    assert rel_err(sampled["samples"] * 0.08333, latents) < 1e-4


def test_upscaler_prompts_with_another_model_are_refused(engine):
    result = engine.run(parse_api(x4_graph(ckpt="sd2.safetensors")), keep=["6"])
    assert not result.ok
    assert "prepared for the x4 upscaler" in str(result.error) and "SD2" in str(result.error)


def test_the_upscaler_without_its_conditioning_is_refused(engine):
    nodes = {**prompts("x4.safetensors"),
             "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "6": ksampler(["2", 0], ["3", 0], ["4", 0], 5.0),
             "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}
    result = engine.run(parse_api(nodes), keep=["6"])
    assert not result.ok and "SD_4XUpscale_Conditioning" in str(result.error)
