"""Stable Video Diffusion img2vid as ComfyUI runs it, on a tiny SVD checkpoint in the real single-file layout:
declarations as ComfyUI's, the whole workflow (ImageOnlyCheckpointLoader -> SVD_img2vid_Conditioning ->
VideoLinearCFGGuidance -> KSampler -> VAEDecode -> SaveAnimatedWEBP) against a diffusers run of the same UNet
and VAE, what each node adds, and clear errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageSequence

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from ldm.sampling.model_patches import CfgArgs
from ldm.sampling.noise import prepare_noise
from ldm.svd_files import load_svd_checkpoint, make_svd_checkpoint, tiny_svd_parts
from ldm.zero123 import camera_embedding, make_zero123_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.svd import VideoCfg

FRAMES, WIDTH, HEIGHT, SEED = 3, 64, 48, 42


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("svd_nodes")
    make_svd_checkpoint(root / "models" / "checkpoints" / "svd.safetensors", seed=2)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_zero123_checkpoint(root / "models" / "checkpoints" / "zero123.safetensors", seed=4)
    (root / "input").mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        pixels = (torch.rand(48, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "input" / f"{name}.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def graph(image: str = "a.png", guidance: str | None = "VideoLinearCFGGuidance", fps: int = 6,
          augmentation: float = 0.0, cfg: float = 2.5) -> dict:
    nodes = {
        "1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "SVD_img2vid_Conditioning", "inputs": {
            "clip_vision": ["1", 1], "init_image": ["2", 0], "vae": ["1", 2], "width": WIDTH, "height": HEIGHT,
            "video_frames": FRAMES, "motion_bucket_id": 127, "fps": fps, "augmentation_level": augmentation}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0] if guidance else ["1", 0], "seed": SEED, "steps": 3, "cfg": cfg,
            "sampler_name": "euler", "scheduler": "karras", "positive": ["3", 0], "negative": ["3", 1],
            "latent_image": ["3", 2], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveAnimatedWEBP", "inputs": {
            "images": ["6", 0], "filename_prefix": "svd", "fps": 6.0, "lossless": True, "quality": 80,
            "method": "default"}},
    }
    if guidance:
        nodes["4"] = {"class_type": guidance, "inputs": {"model": ["1", 0], "min_cfg": 1.0}}
    return nodes


def run(engine, nodes: dict, keep: tuple[str, ...] = ("3", "5", "6")) -> dict:
    result = engine.run(parse_api(nodes), keep=list(keep))
    assert result.ok, result.error
    return result.values


def test_declarations_are_comfyuis(engine):
    names = ("ImageOnlyCheckpointLoader", "SVD_img2vid_Conditioning", "VideoLinearCFGGuidance",
             "VideoTriangleCFGGuidance", "UNetTemporalAttentionMultiply", "ImageOnlyCheckpointSave",
             "StableZero123_Conditioning")
    info = {name: engine.registry.get(name).object_info() for name in names}
    assert {name: i["input_order"]["required"] for name, i in info.items()} == {
        "ImageOnlyCheckpointLoader": ["ckpt_name"],
        "SVD_img2vid_Conditioning": ["clip_vision", "init_image", "vae", "width", "height", "video_frames",
                                     "motion_bucket_id", "fps", "augmentation_level"],
        "VideoLinearCFGGuidance": ["model", "min_cfg"], "VideoTriangleCFGGuidance": ["model", "min_cfg"],
        "UNetTemporalAttentionMultiply": ["model", "self_structural", "self_temporal", "cross_structural",
                                          "cross_temporal"],
        "ImageOnlyCheckpointSave": ["model", "clip_vision", "vae", "filename_prefix"],
        "StableZero123_Conditioning": ["clip_vision", "init_image", "vae", "width", "height", "batch_size",
                                       "elevation", "azimuth"]}
    assert [info[n]["output"] for n in names] == [["MODEL", "CLIP_VISION", "VAE"],
                                                  ["CONDITIONING", "CONDITIONING", "LATENT"], ["MODEL"], ["MODEL"],
                                                  ["MODEL"], [], ["CONDITIONING", "CONDITIONING", "LATENT"]]
    assert info["SVD_img2vid_Conditioning"]["output_name"] == ["positive", "negative", "latent"]
    conditioning = info["SVD_img2vid_Conditioning"]["input"]["required"]
    assert {k: (v[1]["default"], v[1]["min"]) for k, v in conditioning.items()
            if len(v) > 1 and "default" in v[1]} == {
        "width": (1024, 16), "height": (576, 16), "video_frames": (14, 1), "motion_bucket_id": (127, 1),
        "fps": (6, 1), "augmentation_level": (0.0, 0.0)}
    assert info["VideoLinearCFGGuidance"]["input"]["required"]["min_cfg"][1]["default"] == 1.0
    assert info["ImageOnlyCheckpointSave"]["input"]["required"]["filename_prefix"][1]["default"] == \
        "checkpoints/ComfyUI"
    assert info["ImageOnlyCheckpointSave"]["output_node"]
    assert [info[n]["category"] for n in names] == [
        "loaders/video_models", "conditioning/video_models", "sampling/video_models", "sampling/video_models",
        "_for_testing/attention_experiments", "advanced/model_merging", "conditioning/3d_models"]
    zero123 = info["StableZero123_Conditioning"]["input"]["required"]
    assert {k: (v[1]["default"], v[1]["min"], v[1]["max"]) for k, v in zero123.items()
            if len(v) > 1 and "default" in v[1]} == {
        "width": (256, 16, 16384), "height": (256, 16, 16384), "batch_size": (1, 1, 4096),
        "elevation": (0.0, -180.0, 180.0), "azimuth": (0.0, -180.0, 180.0)}
    assert zero123["elevation"][1]["round"] is False


def test_the_workflow_matches_a_diffusers_run_and_saves_an_animated_webp(engine):
    from diffusers import EulerDiscreteScheduler

    from tests.ldm.svd_reference import diffusers_svd_unet, diffusers_temporal_vae
    from tests.ldm.test_svd import SVD_SCHEDULER

    values = run(engine, graph())
    positive, negative, latent = values["3"]
    sampled, images = values["5"][0]["samples"], values["6"][0]
    embedding, options = positive[0]
    assert embedding.shape == (1, 1, 32) and latent["samples"].shape == (FRAMES, 4, HEIGHT // 8, WIDTH // 8)
    image_latent = options["concat_latent_image"]
    assert image_latent.shape == (1, 4, HEIGHT // 8, WIDTH // 8) and image_latent.abs().max() > 0
    assert torch.equal(negative[0][0], torch.zeros_like(embedding))
    assert torch.equal(negative[0][1]["concat_latent_image"], torch.zeros_like(image_latent))

    unet, vae, _ = tiny_svd_parts(seed=2)
    reference = diffusers_svd_unet(unet.config, unet.state_dict(), num_frames=FRAMES)
    reference_vae = diffusers_temporal_vae(vae.config, vae.state_dict())
    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
    scheduler.set_timesteps(3)
    scale = torch.linspace(1.0, 2.5, FRAMES).reshape(1, FRAMES, 1, 1, 1)
    with torch.no_grad():
        latents = prepare_noise(latent["samples"], SEED)[None] * scheduler.init_noise_sigma
        # As StableVideoDiffusionPipeline: the init image's unscaled latent beside each frame, zeros (and a zero
        # image embedding) for the unconditional half; ids (fps - 1, motion bucket, augmentation).
        image_latents = torch.cat([torch.zeros_like(image_latent), image_latent])[:, None].expand(
            -1, FRAMES, -1, -1, -1)
        context = torch.cat([torch.zeros_like(embedding), embedding])
        ids = torch.tensor([[5.0, 127.0, 0.0]]).repeat(2, 1)
        for t in scheduler.timesteps:
            model_input = torch.cat([scheduler.scale_model_input(torch.cat([latents] * 2), t), image_latents], dim=2)
            uncond, cond = reference(model_input, t, context, ids).sample.chunk(2)
            latents = scheduler.step(uncond + scale * (cond - uncond), t, latents).prev_sample
        theirs = latents[0] / vae.scaling_factor
        decoded = reference_vae.decode(theirs, num_frames=FRAMES).sample
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(sampled, theirs, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(images, ((decoded + 1) / 2).clamp(0, 1).movedim(1, -1), atol=2e-4, rtol=1e-4)

    saved = sorted((engine.services.paths.output).glob("svd_*.webp"))[-1]
    with Image.open(saved) as webp:
        frames = [frame.convert("RGB").copy() for frame in ImageSequence.Iterator(webp)]
    assert len(frames) == FRAMES and frames[0].size == (WIDTH, HEIGHT)


def test_the_init_image_the_fps_and_the_augmentation_each_change_the_video(engine):
    base = run(engine, graph())["5"][0]["samples"]
    for changed in (graph(image="b.png"), graph(fps=12), graph(augmentation=0.5)):
        assert (run(engine, changed)["5"][0]["samples"] - base).abs().max() > 1e-3
    # Augmentation noises the init image before it is encoded: only the image latent changes.
    plain, noised = (run(engine, graph(augmentation=a), keep=("3",))["3"][0][0][1] for a in (0.0, 0.5))
    assert (plain["concat_latent_image"] - noised["concat_latent_image"]).abs().max() > 1e-3
    assert noised["augmentation_level"] == 0.5 and noised["fps"] == 6 and noised["motion_bucket_id"] == 127


def test_video_guidance_scales_cfg_over_the_frames():
    cond, uncond = torch.ones(5, 4, 2, 2), torch.zeros(5, 4, 2, 2)
    args = CfgArgs(torch.zeros(5, 4, 2, 2), torch.ones(5), cond, uncond, cfg=3.0)
    linear = VideoCfg(1.0)(args)[:, 0, 0, 0]
    triangle = VideoCfg(1.0, triangle=True)(args)[:, 0, 0, 0]
    torch.testing.assert_close(linear, torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    torch.testing.assert_close(triangle, torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]))
    assert VideoCfg(1.0)(CfgArgs(args.x, args.sigma, cond, None, 3.0)) is cond


def test_linear_guidance_at_min_cfg_equal_to_cfg_is_plain_guidance(engine):
    flat = graph(cfg=1.0)  # min_cfg 1 and cfg 1: every frame at 1
    flat["4"]["inputs"]["min_cfg"] = 1.0
    plain = graph(guidance=None, cfg=1.0)
    torch.testing.assert_close(run(engine, flat)["5"][0]["samples"], run(engine, plain)["5"][0]["samples"])
    triangle = run(engine, graph(guidance="VideoTriangleCFGGuidance"))["5"][0]["samples"]
    linear = run(engine, graph())["5"][0]["samples"]
    assert (triangle - linear).abs().max() > 1e-3


def test_temporal_attention_multiply_scales_the_attention_outputs(engine):
    nodes = graph(guidance=None)
    nodes["4"] = {"class_type": "UNetTemporalAttentionMultiply", "inputs": {
        "model": ["1", 0], "self_structural": 1.0, "self_temporal": 0.5, "cross_structural": 1.0,
        "cross_temporal": 2.0}}
    nodes["5"]["inputs"]["model"] = ["4", 0]
    values = run(engine, nodes, keep=("1", "4", "5"))
    base, patched = values["1"][0].unet.state_dict(), values["4"][0].unet.state_dict()
    for key, tensor in patched.items():
        factor = (0.5 if ".time_stack." in key and "attn1.to_out" in key
                  else 2.0 if ".time_stack." in key and "attn2.to_out" in key else 1.0)
        torch.testing.assert_close(tensor, base[key] * factor)
        if factor == 1.0:
            assert tensor.data_ptr() == base[key].data_ptr()  # shared, not copied
    plain = run(engine, graph(guidance=None))["5"][0]["samples"]
    assert (values["5"][0]["samples"] - plain).abs().max() > 1e-4


def test_freeu_patches_the_video_unets_output_blocks(engine):
    nodes = graph(guidance=None)
    nodes["4"] = {"class_type": "FreeU_V2", "inputs": {"model": ["1", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9,
                                                       "s2": 0.2}}
    nodes["5"]["inputs"]["model"] = ["4", 0]
    plain = run(engine, graph(guidance=None))["5"][0]["samples"]
    assert (run(engine, nodes)["5"][0]["samples"] - plain).abs().max() > 1e-3


def test_image_only_checkpoint_save_writes_a_file_the_loader_reads_back(engine):
    nodes = {"1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd.safetensors"}},
             "2": {"class_type": "ImageOnlyCheckpointSave", "inputs": {
                 "model": ["1", 0], "clip_vision": ["1", 1], "vae": ["1", 2], "filename_prefix": "svd_copy"}}}
    result = engine.run(parse_api(nodes))
    assert result.ok, result.error
    saved = sorted(engine.services.paths.output.glob("svd_copy_*.safetensors"))[-1]
    loaded, original = load_svd_checkpoint(saved), tiny_svd_parts(seed=2)
    assert loaded.unused_keys == []
    for ours, back in zip(original, (loaded.unet, loaded.vae, loaded.clip_vision), strict=True):
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_an_image_checkpoint_is_refused_with_a_clear_error(engine):
    nodes = graph()
    nodes["1"]["inputs"]["ckpt_name"] = "sd1.safetensors"
    result = engine.run(parse_api(nodes))
    assert not result.ok
    assert "not a Stable Video Diffusion checkpoint" in str(result.error)


def test_stable_zero123_projects_the_image_and_camera_and_samples_as_the_plain_unet_would(engine):
    from ldm.sampling import sample
    from ldm.unet import UNetModel
    from nodes.sd.models import DEFAULT_SCHEDULE

    nodes = {"1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "zero123.safetensors"}},
             "2": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
             "3": {"class_type": "StableZero123_Conditioning", "inputs": {
                 "clip_vision": ["1", 1], "init_image": ["2", 0], "vae": ["1", 2], "width": 64, "height": 64,
                 "batch_size": 2, "elevation": 10.0, "azimuth": 30.0}},
             "5": {"class_type": "KSampler", "inputs": {
                 "model": ["1", 0], "seed": 7, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
                 "scheduler": "normal", "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["3", 2],
                 "denoise": 1.0}},
             "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
             "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}}
    values = run(engine, nodes, keep=("1", "3", "5"))
    (wide, options), = values["3"][0]
    (narrow, negative_options), = values["3"][1]
    assert wide.shape == (1, 1, 36) and narrow.shape == (1, 1, 32) and not narrow.any()
    torch.testing.assert_close(wide[..., 32:], camera_embedding(10.0, 30.0))
    image_latent = options["concat_latent_image"]
    assert image_latent.shape == (1, 4, 8, 8) and not negative_options["concat_latent_image"].any()
    assert values["3"][2]["samples"].shape == (2, 4, 8, 8)

    model = values["1"][0]
    projected = model.unet.cc_projection(wide).detach()
    plain = UNetModel(model.unet.config).eval()
    plain.load_state_dict({k: v for k, v in model.unet.state_dict().items() if not k.startswith("cc_projection.")})
    scale = model.family.latent_scale_factor
    with torch.no_grad():
        reference = sample(plain, DEFAULT_SCHEDULE, torch.zeros(2, 4, 8, 8), seed=7, steps=3, cfg=4.0,
                           sampler_name="euler", scheduler="normal", prediction="eps",
                           positive=[(projected, {"concat": image_latent})],
                           negative=[(narrow, {"concat": torch.zeros_like(image_latent)})])
    assert reference.abs().max() > 0.1
    # The reference batches both prompts in one call (as wide), the workflow cannot: float rounding apart (of
    # latents up to ~300), the same.
    torch.testing.assert_close(values["5"][0]["samples"], reference / scale, atol=1e-3, rtol=1e-4)


def test_make_svd_then_the_cli_runs_the_comfyui_workflow(tmp_path, capsys):
    import json

    import main

    assert main.main(["make-svd", str(tmp_path / "models")]) == 0
    (tmp_path / "input").mkdir()
    Image.new("RGB", (80, 48), (200, 40, 40)).save(tmp_path / "input" / "a.png")
    nodes = graph()
    nodes["1"]["inputs"]["ckpt_name"] = "svd-tiny.safetensors"
    (tmp_path / "svd.json").write_text(json.dumps(nodes))
    code = main.main(["run", str(tmp_path / "svd.json"), "--base-dir", str(tmp_path), "--no-bundled-models",
                      "--no-custom-nodes", "--cpu", "--quiet"])
    assert code == 0, capsys.readouterr()
    (saved,) = (tmp_path / "output").glob("svd_*.webp")
    with Image.open(saved) as webp:
        assert getattr(webp, "n_frames", 1) == FRAMES
