"""Stable Video Diffusion's models against diffusers with the same weights and inputs: the spatio-temporal UNet
(UNetSpatioTemporalConditionModel), the video VAE (AutoencoderKLTemporalDecoder), the added conditioning
(StableVideoDiffusionPipeline's add_time_ids), an Euler run on SVD's EDM schedule (EulerDiscreteScheduler as SVD
configures it) with per-frame guidance; and the single-file layout: detection, round trip, clear refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldm.checkpoint import CheckpointError, load_checkpoint
from ldm.presets import make_checkpoint
from ldm.sampling import get_sigmas, samplers
from ldm.sampling.denoiser import Conditioning, Denoiser
from ldm.sampling.schedules import ContinuousSchedule
from ldm.svd import svd_y, with_frame_count
from ldm.svd_files import (
    CLIP_PREFIX,
    SIGMA_MAX,
    SIGMA_MIN,
    load_svd_checkpoint,
    make_svd_checkpoint,
    tiny_svd_parts,
)

pytest.importorskip("diffusers")
from tests.ldm.svd_reference import diffusers_svd_unet, diffusers_temporal_vae  # noqa: E402

FRAMES = 3
# SVD's scheduler_config.json (stabilityai/stable-video-diffusion-img2vid), the keys EulerDiscreteScheduler reads.
SVD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "interpolation_type":
                 "linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction", "sigma_max": 700.0,
                 "sigma_min": 0.002, "steps_offset": 1, "timestep_spacing": "leading",
                 "timestep_type": "continuous", "use_karras_sigmas": True}


@pytest.fixture(scope="module")
def parts():
    unet, vae, encoder = tiny_svd_parts(seed=3)
    return SimpleNamespace(unet=unet, vae=vae, encoder=encoder,
                           reference=diffusers_svd_unet(unet.config, unet.state_dict(), num_frames=FRAMES))


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * FRAMES, 8, 8, 8, generator=g)
    context = torch.randn(2, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [4.0, 40.0, 0.1]])  # (fps - 1, motion bucket, augmentation) per video
    return x, context, ids


def test_the_unet_matches_diffusers_spatio_temporal_unet_for_two_videos(parts):
    x, context, ids = _inputs()
    t = torch.tensor([0.7, -1.2])
    y = torch.cat([svd_y(fps + 1, motion, aug) for fps, motion, aug in ids.tolist()])
    with torch.no_grad():
        ours = parts.unet(x, t.repeat_interleave(FRAMES), context.repeat_interleave(FRAMES, 0),
                          y.repeat_interleave(FRAMES, 0), num_frames=FRAMES)
        theirs = parts.reference(x.reshape(2, FRAMES, 8, 8, 8), t, context, ids).sample.flatten(0, 1)
        # The frame count riding in y, as a sampler hands it over, gives the same; so does one video at a time.
        carried = parts.unet(x, t.repeat_interleave(FRAMES), context.repeat_interleave(FRAMES, 0),
                             with_frame_count(y, FRAMES).repeat_interleave(FRAMES, 0))
        first = parts.unet(x[:FRAMES], t[:1].expand(FRAMES), context[:1].expand(FRAMES, -1, -1),
                           y[:1].expand(FRAMES, -1), num_frames=FRAMES)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(carried, ours)
    torch.testing.assert_close(first, ours[:FRAMES], atol=1e-6, rtol=1e-5)
    # The frames see each other: another frame count mixes other rows, and gives another prediction.
    with torch.no_grad():
        six = parts.unet(x, t.repeat_interleave(FRAMES), context.repeat_interleave(FRAMES, 0),
                         y.repeat_interleave(FRAMES, 0), num_frames=2 * FRAMES)
    assert (six - ours).abs().max() > 1e-3
    with pytest.raises(ValueError, match="whole number of 4-frame videos"):
        parts.unet(x, t.repeat_interleave(FRAMES), context.repeat_interleave(FRAMES, 0),
                   y.repeat_interleave(FRAMES, 0), num_frames=4)
    with pytest.raises(ValueError, match="num_frames"):
        parts.unet(x, t.repeat_interleave(FRAMES), context.repeat_interleave(FRAMES, 0), y.repeat_interleave(FRAMES, 0))


def test_svd_y_embeds_the_pipelines_add_time_ids():
    from diffusers import StableVideoDiffusionPipeline

    holder = SimpleNamespace(unet=SimpleNamespace(
        config=SimpleNamespace(addition_time_embed_dim=256),
        add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=768))))
    # The pipeline passes fps - 1 (its __call__ subtracts 1 first), as ComfyUI and SGM do.
    ids = StableVideoDiffusionPipeline._get_add_time_ids(holder, 7 - 1, 127, 0.02, torch.float32, 1, 1, False)
    expected = torch.cat([torch.cat([torch.cos(a), torch.sin(a)]) for a in (
        ids[0, i] * torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128) for i in range(3))])
    torch.testing.assert_close(svd_y(7, 127, 0.02)[0], expected)
    assert svd_y(7, 127, 0.02, rows=2).shape == (2, 768)


def test_the_video_vae_matches_diffusers_temporal_decoder(parts):
    reference = diffusers_temporal_vae(parts.vae.config, parts.vae.state_dict())
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2 * FRAMES, 4, 8, 8, generator=g)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        ours, theirs = parts.vae.decode(z, num_frames=FRAMES), reference.decode(z, num_frames=FRAMES).sample
        whole = parts.vae.decode(z)  # without a frame count: the batch is one video
        whole_theirs = reference.decode(z, num_frames=2 * FRAMES).sample
        encoded, encoded_theirs = parts.vae.encode(pixels).mode(), reference.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(whole, whole_theirs, atol=1e-5, rtol=1e-4)
    assert (whole - ours).abs().max() > 1e-4  # the temporal layers mix the frames they are given
    torch.testing.assert_close(encoded, encoded_theirs, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="4-frame"):
        parts.vae.decode(z, num_frames=4)


def test_an_euler_run_with_per_frame_guidance_matches_diffusers_svd_scheduler(parts):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
    scheduler.set_timesteps(5)
    schedule = ContinuousSchedule(SIGMA_MIN, SIGMA_MAX, 1.0)
    # SVD's karras levels are Loom's karras scheduler on the continuous schedule
    torch.testing.assert_close(get_sigmas("karras", schedule, 5), scheduler.sigmas, rtol=1e-4, atol=1e-6)
    g = torch.Generator().manual_seed(4)
    image_latent = torch.randn(1, 4, 8, 8, generator=g)
    embedding = torch.randn(1, 1, 32, generator=g)
    noise = torch.randn(FRAMES, 4, 8, 8, generator=g)
    y = svd_y(7, 127, 0.02, rows=FRAMES)
    cfg_scale = torch.linspace(1.0, 2.5, FRAMES).reshape(FRAMES, 1, 1, 1)  # VideoLinearCFGGuidance's, min_cfg 1
    sigmas = scheduler.sigmas.clone()

    denoiser = Denoiser(parts.unet, schedule, "v")
    positive = Conditioning(embedding.expand(FRAMES, -1, -1), with_frame_count(y, FRAMES),
                            concat=image_latent.expand(FRAMES, -1, -1, -1))
    negative = Conditioning(torch.zeros(FRAMES, 1, 32), with_frame_count(y, FRAMES),
                            concat=torch.zeros(FRAMES, 4, 8, 8))

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, uncond = denoiser(x, sigma, positive), denoiser(x, sigma, negative)
        return uncond + cfg_scale * (cond - uncond)

    with torch.no_grad():
        ours = samplers.sample_euler(guided, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas)
        latents = noise[None] * scheduler.init_noise_sigma
        image_latents = torch.cat([torch.zeros_like(image_latent), image_latent])[:, None].expand(-1, FRAMES, -1, -1,
                                                                                                   -1)
        ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(2, 1)
        context = torch.cat([torch.zeros_like(embedding), embedding])
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            model_input = torch.cat([model_input, image_latents], dim=2)
            out = parts.reference(model_input, t, context, ids).sample
            uncond, cond = out.chunk(2)
            out = uncond + cfg_scale[None] * (cond - uncond)
            latents = scheduler.step(out, t, latents).prev_sample
    assert latents.abs().max() > 0.1
    torch.testing.assert_close(ours, latents[0], atol=1e-4, rtol=1e-4)


def test_a_checkpoint_round_trips_in_sgms_layout(tmp_path):
    path = make_svd_checkpoint(tmp_path / "svd.safetensors", seed=5)
    loaded = load_svd_checkpoint(path)
    unet, vae, encoder = tiny_svd_parts(seed=5)
    assert loaded.unused_keys == [] and loaded.family.name == "svd" and loaded.family.prediction == "v"
    assert loaded.family.unet_config == unet.config and loaded.family.vae_config == vae.config
    for ours, saved in ((unet, loaded.unet), (vae, loaded.vae), (encoder, loaded.clip_vision)):
        expected, got = ours.state_dict(), saved.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    import safetensors.torch

    keys = safetensors.torch.load_file(path).keys()
    assert f"{CLIP_PREFIX}visual.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.input_blocks.1.1.time_stack.0.ff_in.net.0.proj.weight" in keys
    assert "first_stage_model.decoder.conv_out.time_mix_conv.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.mix_factor" in keys


def test_other_files_are_refused_by_name(tmp_path):
    sd1 = make_checkpoint("tiny-sd1", tmp_path / "sd1.safetensors", seed=1)
    with pytest.raises(CheckpointError, match="sd1.safetensors: not a Stable Video Diffusion checkpoint"):
        load_svd_checkpoint(sd1)
    import safetensors.torch

    path = make_svd_checkpoint(tmp_path / "svd.safetensors")
    # The image-model loader says where a video model goes, rather than loading its spatial half.
    with pytest.raises(CheckpointError, match="svd.safetensors: a Stable Video Diffusion .* ImageOnlyCheckpointLoader"):
        load_checkpoint(path)
    tensors = safetensors.torch.load_file(path)
    del tensors["first_stage_model.decoder.up.0.block.0.time_stack.in_layers.2.weight"]
    safetensors.torch.save_file(tensors, tmp_path / "cut.safetensors", metadata={
        "loom.unet_config": safetensors.safe_open(path, "pt").metadata()["loom.unet_config"]})
    with pytest.raises(CheckpointError, match="cut.safetensors: the video VAE is missing 1 weights"):
        load_svd_checkpoint(tmp_path / "cut.safetensors")
    without_clip = {k: v for k, v in tensors.items() if not k.startswith(CLIP_PREFIX)}
    safetensors.torch.save_file(without_clip, tmp_path / "noclip.safetensors")
    with pytest.raises(CheckpointError, match="noclip.safetensors"):
        load_svd_checkpoint(tmp_path / "noclip.safetensors")
