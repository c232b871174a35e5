"""LTX-2 end to end on tiny random files in the released layouts (`ldm.ltx2_files.make_ltx2_files`): ComfyUI's
template graph (CheckpointLoaderSimple, LTXAVTextEncoderLoader, LTXVAudioVAELoader, LTXVConditioning,
EmptyLTXVLatentVideo + LTXVEmptyLatentAudio joined by LTXVConcatAVLatent, SamplerCustomAdvanced with CFGGuider,
euler and ManualSigmas) against an Euler loop over the transformer called by hand; image-to-video and a given
soundtrack kept by their noise masks; the nodes around it and the refusals a wrong graph gets."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.ltx2 import LTX2Model
from ldm.ltx2_files import load_ltx2_audio_codec, load_ltx2_unet, make_ltx2_files
from ldm.ltx2_text import load_ltx2_text_encoder
from ldm.ltxv_vae import load_ltxv_vae
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

SEED, CFG, FPS, FRAMES = 5, 3.0, 24.0, 9
SIGMAS = "1.0, 0.7, 0.4, 0.0"
PROMPT, NEGATIVE = "a dog barks in a meadow", "blurry, still frame"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx2")
    files = make_ltx2_files(root / "models", seed=3)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def run(engine: Executor, doc: dict, nodes: list[str]):
    return engine.run(parse_api(doc), keep=nodes, outputs=nodes)


def workflow(files: dict, cfg: float = CFG) -> dict:
    ckpt, gemma = files["checkpoint"].name, files["text_encoder"].name
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LTXAVTextEncoderLoader", "inputs": {"text_encoder": gemma, "ckpt_name": ckpt,
                                                                 "device": "default"}},
        "3": {"class_type": "LTXVAudioVAELoader", "inputs": {"ckpt_name": ckpt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": NEGATIVE}},
        "6": {"class_type": "LTXVConditioning", "inputs": {"positive": ["4", 0], "negative": ["5", 0],
                                                           "frame_rate": FPS}},
        "7": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 96, "length": FRAMES,
                                                               "batch_size": 1}},
        "8": {"class_type": "LTXVEmptyLatentAudio", "inputs": {"frames_number": FRAMES, "frame_rate": int(FPS),
                                                               "batch_size": 1, "audio_vae": ["3", 0]}},
        "9": {"class_type": "LTXVConcatAVLatent", "inputs": {"video_latent": ["7", 0], "audio_latent": ["8", 0]}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "11": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["6", 0], "negative": ["6", 1],
                                                     "cfg": cfg}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "ManualSigmas", "inputs": {"sigmas": SIGMAS}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["11", 0],
                                                                 "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                 "latent_image": ["9", 0]}},
        "15": {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["14", 0]}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "LTXVAudioVAEDecode", "inputs": {"samples": ["15", 1], "audio_vae": ["3", 0]}},
    }


def test_workflow_matches_an_euler_loop_over_the_model(base) -> None:
    engine, files = base
    result = run(engine, workflow(files), ["7", "8", "14", "15", "16", "17"])
    assert result.ok, result.error
    empty_video, empty_audio = result.values["7"][0]["samples"], result.values["8"][0]["samples"]
    assert empty_video.shape == (1, 128, 2, 3, 2) and empty_audio.shape == (1, 8, 10, 16)  # ceil(9 / 24 * 25)
    sampled = result.values["14"][0]
    video_out, audio_out = result.values["15"]
    assert torch.equal(video_out["samples"], sampled["samples"])
    assert torch.equal(audio_out["samples"], sampled["audio_samples"])

    loaded = load_ltx2_unet(files["checkpoint"], dtype=torch.float32)
    model: LTX2Model = loaded.unet.model
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (loaded.family.latent_mean, loaded.family.latent_std))
    encoder = load_ltx2_text_encoder(files["text_encoder"], files["checkpoint"]).encoder
    contexts = []
    with torch.no_grad():
        for text in (PROMPT, NEGATIVE):  # each prompt through the connectors on its own, as ComfyUI's extra_conds
            video_ctx, audio_ctx, mask = model.preprocess_text_embeds(encoder.encode([text]).cond)
            assert mask is None  # the registers fill the padding
            contexts.append((video_ctx, audio_ctx))

    def velocity(video: torch.Tensor, audio: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor([sigma])
        with torch.no_grad():
            (cv, ca), (uv, ua) = (model(video, audio, t, t, v_ctx, a_ctx, frame_rate=FPS)
                                  for v_ctx, a_ctx in contexts)
        return uv + CFG * (cv - uv), ua + CFG * (ca - ua)

    sigmas = [float(s) for s in SIGMAS.split(",")]
    g = torch.Generator().manual_seed(SEED)  # the video's noise, then the audio's, from one generator
    video = (empty_video - mean) / std * (1 - sigmas[0]) + torch.randn(empty_video.shape, generator=g) * sigmas[0]
    audio = empty_audio * (1 - sigmas[0]) + torch.randn(empty_audio.shape, generator=g) * sigmas[0]
    for sigma, following in zip(sigmas, sigmas[1:], strict=False):
        v_video, v_audio = velocity(video, audio, sigma)
        video, audio = video + v_video * (following - sigma), audio + v_audio * (following - sigma)
    video = video * std + mean  # back to the VAE's raw latents, which the LATENT holds
    assert (sampled["samples"] - video).abs().max() < 1e-4 * video.abs().max()
    assert (sampled["audio_samples"] - audio).abs().max() < 1e-4 * audio.abs().max()

    frames, sound = result.values["16"][0], result.values["17"][0]
    vae = load_ltxv_vae(files["checkpoint"], prefix="vae.")
    with torch.no_grad():
        expected = ((vae.decode(video) + 1) / 2).clamp(0, 1)[0].movedim(0, -1)
    assert frames.shape == (FRAMES, 96, 64, 3)
    torch.testing.assert_close(frames, expected, atol=1e-3, rtol=1e-3)
    codec = load_ltx2_audio_codec(files["checkpoint"])
    with torch.no_grad():
        torch.testing.assert_close(sound["waveform"], codec.decode(audio), atol=1e-4, rtol=1e-4)
    assert sound["sample_rate"] == 24000 and sound["waveform"].shape[:2] == (1, 2)


def test_a_start_image_and_a_given_soundtrack_are_kept(base) -> None:
    """LTXVImgToVideoInplace (strength 1) keeps the first latent frame; a soundtrack encoded with
    LTXVAudioVAEEncode under a zero noise mask (SetLatentNoiseMask) stays as it was, as in ComfyUI's ia2v
    template."""
    engine, files = base
    doc = workflow(files)
    doc["20"] = {"class_type": "LTXVImgToVideoInplace", "inputs": {"vae": ["1", 2], "image": ["24", 0],
                                                                   "latent": ["7", 0], "strength": 1.0,
                                                                   "bypass": False}}
    doc["24"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 96, "batch_size": 1,
                                                        "color": 0x3366CC}}
    doc["25"] = {"class_type": "LTXVAudioVAEEncode", "inputs": {"audio": ["26", 0], "audio_vae": ["3", 0]}}
    doc["26"] = {"class_type": "EmptyAudio", "inputs": {"duration": 0.36, "sample_rate": 22050, "channels": 1}}
    doc["27"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["25", 0], "mask": ["28", 0]}}
    doc["28"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    doc["9"]["inputs"].update(video_latent=["20", 0], audio_latent=["27", 0])
    result = run(engine, doc, ["20", "25", "14"])
    assert result.ok, result.error
    start, given, sampled = result.values["20"][0], result.values["25"][0], result.values["14"][0]
    assert start["noise_mask"].shape == (1, 1, 2, 1, 1) and start["noise_mask"][0, 0, 0].item() == 0.0
    kept = (sampled["samples"][:, :, :1] - start["samples"][:, :, :1]).abs().max()
    assert kept < 1e-5 * start["samples"].abs().max()  # the image's latent frame (through the model's scaling)
    assert (sampled["samples"][:, :, 1:] - start["samples"][:, :, 1:]).abs().max() > 0.1
    assert given["samples"].shape == sampled["audio_samples"].shape == (1, 8, 10, 16)
    assert torch.allclose(sampled["audio_samples"], given["samples"], atol=1e-6)  # the soundtrack as given
    assert sampled["audio_noise_mask"] is not None  # the masks go on with the latent, as ComfyUI's do


def test_latent_upsampler_doubles_the_video_and_drops_the_mask(base) -> None:
    engine, files = base
    doc = {k: v for k, v in workflow(files).items() if k in ("1", "7")}
    doc["7"]["inputs"].update(width=64, height=64)
    doc["30"] = {"class_type": "LatentUpscaleModelLoader", "inputs": {"model_name": files["upscaler"].name}}
    doc["31"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["7", 0], "mask": ["32", 0]}}
    doc["32"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    doc["33"] = {"class_type": "LTXVLatentUpsampler", "inputs": {"samples": ["31", 0], "upscale_model": ["30", 0],
                                                                 "vae": ["1", 2]}}
    result = run(engine, doc, ["33"])
    assert result.ok, result.error
    out = result.values["33"][0]
    assert out["samples"].shape == (1, 128, 2, 4, 4) and "noise_mask" not in out


def test_separate_and_concat_are_inverse_and_wrong_latents_are_refused(base) -> None:
    engine, files = base
    doc = workflow(files)
    doc["40"] = {"class_type": "LTXVConcatAVLatent", "inputs": {"video_latent": ["15", 0],
                                                                "audio_latent": ["15", 1]}}
    result = run(engine, {k: v for k, v in doc.items() if k not in ("16", "17")}, ["14", "40"])
    assert result.ok, result.error
    assert torch.equal(result.values["40"][0]["samples"], result.values["14"][0]["samples"])
    assert torch.equal(result.values["40"][0]["audio_samples"], result.values["14"][0]["audio_samples"])

    other = workflow(files)  # an SD1.5 model given the audio-video latent
    other["50"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    other["11"]["inputs"]["model"] = ["50", 0]
    for prompt in ("4", "5"):
        other[prompt]["inputs"]["clip"] = ["50", 1]
    result = run(engine, {k: v for k, v in other.items() if k not in ("15", "16", "17")}, ["14"])
    assert not result.ok
    assert "holds video and audio (LTXVConcatAVLatent), which only an LTX-2 model samples" in str(result.error)

    swapped = workflow(files)  # video and audio swapped at the join
    swapped["9"]["inputs"].update(video_latent=["8", 0], audio_latent=["7", 0])
    result = run(engine, {k: v for k, v in swapped.items() if k in ("3", "7", "8", "9")}, ["9"])
    assert not result.ok and "LTXVConcatAVLatent joins a video latent" in str(result.error)


def test_the_checkpoint_names_its_text_encoder(base) -> None:
    """CheckpointLoaderSimple's CLIP of an LTX-2 file says where the prompts' encoder comes from."""
    engine, files = base
    doc = {"1": workflow(files)["1"],
           "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}}}
    result = run(engine, doc, ["4"])
    assert not result.ok and "LTXAVTextEncoderLoader" in str(result.error)


def test_add_noise_noises_both_parts_as_the_sampler_would(base) -> None:
    engine, files = base
    doc = {k: v for k, v in workflow(files).items() if k in ("1", "3", "7", "8", "9", "10", "13")}
    doc["60"] = {"class_type": "AddNoise", "inputs": {"model": ["1", 0], "noise": ["10", 0], "sigmas": ["13", 0],
                                                      "latent_image": ["9", 0]}}
    result = run(engine, doc, ["9", "60"])
    assert result.ok, result.error
    before, after = result.values["9"][0], result.values["60"][0]
    g = torch.Generator().manual_seed(SEED)
    torch.randn(before["samples"].shape, generator=g)  # the video's noise first
    audio_noise = torch.randn(before["audio_samples"].shape, generator=g)
    torch.testing.assert_close(after["audio_samples"] - before["audio_samples"], audio_noise)  # sigma 1 to 0
    assert (after["samples"] - before["samples"]).abs().max() > 0.5


def test_ksampler_with_model_sampling_ltxv_samples_both_parts(base) -> None:
    """KSampler on the audio-video latent, the time shift from ModelSamplingLTXV (ComfyUI's LTXAV is an LTXV model;
    the shift follows the video's latent pixels)."""
    engine, files = base
    doc = {k: v for k, v in workflow(files).items() if int(k) <= 9}
    doc["70"] = {"class_type": "ModelSamplingLTXV", "inputs": {"model": ["1", 0], "max_shift": 2.05,
                                                               "base_shift": 0.95, "latent": ["9", 0]}}
    doc["71"] = {"class_type": "KSampler", "inputs": {
        "model": ["70", 0], "positive": ["6", 0], "negative": ["6", 1], "latent_image": ["9", 0], "seed": SEED,
        "steps": 2, "cfg": CFG, "sampler_name": "euler_ancestral", "scheduler": "simple", "denoise": 1.0}}
    result = run(engine, doc, ["9", "71"])
    assert result.ok, result.error
    before, after = result.values["9"][0], result.values["71"][0]
    assert after["samples"].shape == before["samples"].shape
    assert after["audio_samples"].shape == before["audio_samples"].shape
    assert after["audio_samples"].abs().max() > 0 and torch.isfinite(after["audio_samples"]).all()


def test_an_ltx23_checkpoint_runs_the_same_graph(base) -> None:
    """LTX-2.3's layout (gated attention, modulated prompts, the per-modality text projection, the BigVGAN vocoder
    with its bandwidth extension) through the same nodes: 48 kHz stereo."""
    engine, files = base
    doc = workflow(files)
    for node in ("1", "2", "3"):
        doc[node]["inputs"]["ckpt_name"] = files["checkpoint_23"].name
    result = run(engine, doc, ["14", "17"])
    assert result.ok, result.error
    sound = result.values["17"][0]
    assert sound["sample_rate"] == 48000 and sound["waveform"].shape[:2] == (1, 2)
    assert torch.isfinite(result.values["14"][0]["samples"]).all()


def test_a_picture_mask_on_the_video_and_the_prompts_an_av_latent_refuses(base) -> None:
    """SetLatentNoiseMask with a picture's mask on the video part (inpainting every frame) keeps what it masks off;
    area and mask prompts, which a packed latent cannot take, are refused by name."""
    engine, files = base
    doc = workflow(files)
    doc["80"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 96}}
    doc["81"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["7", 0], "mask": ["80", 0]}}
    doc["9"]["inputs"]["video_latent"] = ["81", 0]
    result = run(engine, doc, ["7", "14"])
    assert result.ok, result.error
    kept = result.values["14"][0]["samples"] - result.values["7"][0]["samples"]
    assert kept.abs().max() < 1e-5 and result.values["14"][0]["audio_samples"].abs().max() > 0.1

    doc = workflow(files)
    doc["82"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64, "height": 64,
                                                                 "x": 0, "y": 0, "strength": 1.0}}
    doc["11"]["inputs"]["positive"] = ["82", 0]
    result = run(engine, doc, ["14"])
    assert not result.ok and "area and mask prompts" in str(result.error) and "audio-video latent" in str(result.error)


def test_batch_nodes_take_the_audio_with_the_video(base) -> None:
    engine, files = base
    doc = {k: v for k, v in workflow(files).items() if k in ("3", "7", "8", "9")}
    doc["7"]["inputs"]["batch_size"] = doc["8"]["inputs"]["batch_size"] = 2
    doc["91"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["9", 0], "batch_index": 1, "length": 1}}
    doc["92"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["91", 0], "amount": 3}}
    result = run(engine, doc, ["91", "92"])
    assert result.ok, result.error
    one, three = result.values["91"][0], result.values["92"][0]
    assert one["samples"].shape[0] == one["audio_samples"].shape[0] == 1 and one["batch_index"] == [1]
    assert three["samples"].shape[0] == three["audio_samples"].shape[0] == 3


def test_a_text_encoder_lora_is_named_and_strength_zero_turns_a_lora_off(base) -> None:
    """A LoRA for Gemma 3 (as the LTX-2.3 image+audio template loads one) patches no layer Loom patches: the error
    says so; at both strengths 0 LoraLoader hands its inputs on untouched, as ComfyUI's does."""
    import safetensors.torch

    engine, files = base
    loras = files["checkpoint"].parent.parent / "loras"
    loras.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32, generator=g),
                                 "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4, generator=g)},
                                loras / "gemma-3-12b-it-lora.safetensors")
    doc = {k: v for k, v in workflow(files).items() if k in ("1", "2")}
    doc["95"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["2", 0],
                                                        "lora_name": "gemma-3-12b-it-lora.safetensors",
                                                        "strength_model": 1.0, "strength_clip": 1.0}}
    result = run(engine, doc, ["95"])
    assert not result.ok and "Loom applies none to that encoder yet" in str(result.error)
    doc["95"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    result = run(engine, doc, ["1", "2", "95"])
    assert result.ok, result.error
    assert result.values["95"][0] is result.values["1"][0] and result.values["95"][1] is result.values["2"][0]
