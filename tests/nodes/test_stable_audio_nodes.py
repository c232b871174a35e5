"""Stable Audio Open end to end on tiny random files in the released layouts (`ldm.stable_audio_presets`): ComfyUI's
graph (CheckpointLoaderSimple, CLIPLoader type stable_audio, CLIPTextEncode for both prompts, ConditioningStableAudio,
EmptyLatentAudio, KSampler, VAEDecodeAudio, SaveAudio) against an Euler loop over diffusers' StableAudioDiTModel and
StableAudioProjectionModel with the same weights, transformers' T5 encoder on the same tokens, the same noise and
levels; the decoded audio as ComfyUI's VAEDecodeAudio scales it; the saved FLAC; the refusals a wrong graph gets."""

from __future__ import annotations

import math

import av
import pytest
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from transformers import T5EncoderModel

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_state_dict
from ldm.oobleck import SAO_PREFIX, load_oobleck
from ldm.presets import make_checkpoint
from ldm.sampling import prepare_noise
from ldm.sampling.schedules import ContinuousVSchedule
from ldm.stable_audio_files import SIGMA_RANGE
from ldm.stable_audio_presets import TINY_STABLE_AUDIO_MODEL, make_stable_audio_files
from ldm.stable_audio_text import MIN_LENGTH
from ldm.t5 import T5Tokenizer
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_stable_audio import twins

SEED, STEPS, CFG, SECONDS = 5, 3, 4.0, 3.0
START, TOTAL = 1.5, 20.0
POSITIVE, NEGATIVE = "a warm analog synth pad, slow", "noise"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("stable_audio")
    files = make_stable_audio_files(root / "models", seed=2)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def workflow(files: dict) -> dict:
    """Comfy-Org's Stable Audio template's graph, short, with euler on the normal scheduler."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": files["checkpoint"].name}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["t5base"].name, "type": "stable_audio"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": POSITIVE}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": NEGATIVE}},
        "5": {"class_type": "ConditioningStableAudio", "inputs": {"positive": ["3", 0], "negative": ["4", 0],
                                                                  "seconds_start": START, "seconds_total": TOTAL}},
        "6": {"class_type": "EmptyLatentAudio", "inputs": {"seconds": SECONDS, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["6", 0], "seed": SEED,
            "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecodeAudio", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveAudio", "inputs": {"audio": ["8", 0], "filename_prefix": "audio/test"}},
    }


def t5_states(path, prompt: str) -> torch.Tensor:
    """transformers' T5 encoder on the file's weights: the prompt's ids padded to 128 with the mask, padding zeroed."""
    sd = load_state_dict(path)
    width = sd["shared.weight"].shape[1]
    from transformers import T5Config

    config = T5Config(vocab_size=sd["shared.weight"].shape[0], d_model=width, d_kv=width // 4, d_ff=2 * width,
                      num_layers=2, num_heads=4, feed_forward_proj="relu", is_encoder_decoder=False)
    model = T5EncoderModel(config).eval()
    model.load_state_dict({**sd, "encoder.embed_tokens.weight": sd["shared.weight"]})
    ids, _ = T5Tokenizer().batch([prompt], MIN_LENGTH)
    mask = torch.zeros_like(ids)
    mask[0, : int((ids[0] == 1).nonzero()[0]) + 1] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]


def test_workflow_matches_an_euler_loop_over_diffusers(base) -> None:
    engine, files = base
    result = engine.run(parse_api(workflow(files)), keep=["6", "7", "8"])
    assert result.ok, result.error
    empty, latent, audio = (result.values[k][0] for k in ("6", "7", "8"))
    assert empty["samples"].shape == (1, 64, 64)  # ComfyUI's round(3 * 44100 / 2048 / 2) * 2

    sd = load_state_dict(files["checkpoint"])
    length = empty["samples"].shape[-1]
    transformer, projection = twins(sd, TINY_STABLE_AUDIO_MODEL, length)
    with torch.no_grad():
        seconds = projection(start_seconds=torch.tensor([START]), end_seconds=torch.tensor([TOTAL]))
    start, total = seconds.seconds_start_hidden_states, seconds.seconds_end_hidden_states
    contexts = [torch.cat([t5_states(files["t5base"], text), start, total], dim=1) for text in (NEGATIVE, POSITIVE)]
    global_states = torch.cat([start, total], dim=-1)
    rope = get_1d_rotary_pos_embed(TINY_STABLE_AUDIO_MODEL.rotary_dim, length + 1, use_real=True,
                                   repeat_interleave_real=False)

    def x0(x: torch.Tensor, sigma: float, context: torch.Tensor) -> torch.Tensor:  # v-prediction, sigma_data 1
        t = torch.tensor([math.atan(sigma) * 2 / math.pi])
        with torch.no_grad():
            v = transformer(x / math.sqrt(sigma**2 + 1), t, encoder_hidden_states=context,
                            global_hidden_states=global_states, rotary_embedding=rope, return_dict=False)[0]
        return x / (sigma**2 + 1) - v * sigma / math.sqrt(sigma**2 + 1)

    schedule = ContinuousVSchedule(*SIGMA_RANGE)
    # the normal scheduler: steps evenly spaced in the model's timestep, then 0
    t = torch.linspace(schedule.sigma_to_t(torch.tensor(SIGMA_RANGE[1])).item(),
                       schedule.sigma_to_t(torch.tensor(SIGMA_RANGE[0])).item(), STEPS)
    sigmas = [*schedule.t_to_sigma(t).tolist(), 0.0]
    x = prepare_noise(empty["samples"], SEED) * sigmas[0]
    for sigma, following in zip(sigmas, sigmas[1:], strict=False):
        uncond, cond = (x0(x, sigma, context) for context in contexts)
        denoised = uncond + CFG * (cond - uncond)
        x = x + (x - denoised) / sigma * (following - sigma)
    assert (latent["samples"] - x).abs().max() < 2e-4 * x.abs().max()  # float32 through CFG 4, three steps

    # the tiny VAE's encoder is narrower than diffusers can build (tests/ldm/test_oobleck.py matches Loom's to it)
    vae = load_oobleck(sd, prefix=SAO_PREFIX)
    with torch.no_grad():
        expected = vae.decode(latent["samples"])
    expected = expected / (expected.std(dim=(1, 2), keepdim=True) * 5.0).clamp(min=1.0)  # ComfyUI's VAEDecodeAudio
    assert audio["sample_rate"] == 44100 and audio["waveform"].shape == (1, 2, 64 * 2048)
    torch.testing.assert_close(audio["waveform"], expected, rtol=1e-4, atol=1e-4)


def test_the_saved_flac_holds_the_clip_and_the_prompt(base) -> None:
    engine, files = base
    result = engine.run(parse_api(workflow(files)))
    assert result.ok, result.error
    [item] = result.outputs["9"]["audio"]
    path = engine.services.paths.output / item["subfolder"] / item["filename"]
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        assert stream.rate == 44100 and stream.channels == 2 and samples == 64 * 2048
        assert "prompt" in {k.lower() for k in container.metadata}


def test_wrong_graphs_are_refused_by_name(base) -> None:
    engine, files = base
    doc = workflow(files)  # an SD1 prompt for the Stable Audio model
    doc["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    doc["4"]["inputs"]["clip"] = ["10", 1]
    result = engine.run(parse_api(doc), keep=["7"])
    assert not result.ok and "CLIPLoader type stable_audio" in str(result.error)
    doc = workflow(files)  # the checkpoint's own CLIP: it has none
    doc["3"]["inputs"]["clip"] = ["1", 1]
    result = engine.run(parse_api(doc), keep=["3"])
    assert not result.ok and "holds no text encoders: load T5-base (t5-base.safetensors)" in str(result.error)
    doc = workflow(files)  # the T5-base file as SD3's T5-XXL
    doc["2"]["inputs"]["type"] = "sd3"
    with pytest.raises(WorkflowInvalid, match="t5base"):
        engine.run(parse_api(doc))
    doc = workflow(files)  # an image VAE for the audio latent
    doc["8"]["inputs"]["vae"] = ["10", 2]
    doc["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    result = engine.run(parse_api(doc), keep=["8"])
    assert not result.ok and "VAEDecodeAudio takes an audio VAE" in str(result.error)


def _ui_node(nid: int, kind: str, widgets: list, inputs: list[tuple[str, str, int]] = (),
             outputs: list[tuple[str, str]] = ()) -> dict:
    return {"id": nid, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs], "properties": {},
            "widgets_values": widgets}


def test_comfyuis_template_in_the_editor_format_runs(base, tmp_path) -> None:
    """Comfy-Org's Stable Audio template as the editor saves it (UI format: its nodes, widget values and links;
    no ConditioningStableAudio, so the model takes 0 s and the latent's length; SaveAudioAdvanced's FLAC), on tiny
    files under the template's file names."""
    import json
    import shutil

    from graph.load import load_workflow

    engine, files = base
    models = engine.services.paths.base / "models"
    shutil.copy(files["checkpoint"], models / "checkpoints" / "stable-audio-open-1.0.safetensors")
    shutil.copy(files["t5base"], models / "text_encoders" / "t5-base.safetensors")
    nodes = [
        _ui_node(4, "CheckpointLoaderSimple", ["stable-audio-open-1.0.safetensors"],
                 outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
        _ui_node(6, "CLIPTextEncode", ["heaven church electronic dance music"], [("clip", "CLIP", 25)],
                 [("CONDITIONING", "CONDITIONING")]),
        _ui_node(7, "CLIPTextEncode", [""], [("clip", "CLIP", 26)], [("CONDITIONING", "CONDITIONING")]),
        _ui_node(10, "CLIPLoader", ["t5-base.safetensors", "stable_audio", "default"], outputs=[("CLIP", "CLIP")]),
        _ui_node(11, "EmptyLatentAudio", [2.0, 1], outputs=[("LATENT", "LATENT")]),
        _ui_node(3, "KSampler", [840755638734093, "randomize", 2, 4.98, "dpmpp_3m_sde_gpu", "exponential", 1],
                 [("model", "MODEL", 18), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
                  ("latent_image", "LATENT", 12)], [("LATENT", "LATENT")]),
        _ui_node(12, "VAEDecodeAudio", [], [("samples", "LATENT", 13), ("vae", "VAE", 14)], [("AUDIO", "AUDIO")]),
        _ui_node(18, "MarkdownNote", ["## Model links"]),
        _ui_node(20, "SaveAudioAdvanced", ["audio/ComfyUI", "flac"], [("audio", "AUDIO", 28)],
                 [("audio", "AUDIO")]),
    ]
    links = [[4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"], [12, 11, 0, 3, 3, "LATENT"],
             [13, 3, 0, 12, 0, "LATENT"], [14, 4, 2, 12, 1, "VAE"], [18, 4, 0, 3, 0, "MODEL"],
             [25, 10, 0, 6, 0, "CLIP"], [26, 10, 0, 7, 0, "CLIP"], [28, 12, 0, 20, 0, "AUDIO"]]
    path = tmp_path / "audio_stable_audio_example.json"
    path.write_text(json.dumps({"last_node_id": 20, "last_link_id": 28, "nodes": nodes, "links": links,
                                "groups": [], "config": {}, "extra": {}, "version": 0.4}))
    result = engine.run(load_workflow(path, engine.registry))
    assert result.ok, result.error
    [item] = result.outputs["20"]["audio"]
    assert item["filename"].endswith(".flac") and item["subfolder"] == "audio"


def test_audio_to_audio_encodes_the_clip_at_the_vaes_rate(base) -> None:
    """LoadAudio (a mono clip at 22.05 kHz) -> VAEEncodeAudio (resampled to 44.1 kHz, the channel doubled for the
    stereo VAE) -> KSampler at denoise 0.5 -> VAEDecodeAudio -> PreviewAudio."""
    import numpy as np

    from nodes.sd.audio import resample

    engine, files = base
    rate, seconds = 22050, 1.0
    tone = (0.4 * np.sin(2 * np.pi * 330 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    path = engine.services.paths.input / "tone.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_f32le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    doc = workflow(files)
    doc["10"] = {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}}
    doc["11"] = {"class_type": "VAEEncodeAudio", "inputs": {"audio": ["10", 0], "vae": ["1", 2]}}
    doc["7"]["inputs"].update(latent_image=["11", 0], denoise=0.5)
    doc["9"] = {"class_type": "PreviewAudio", "inputs": {"audio": ["8", 0]}}
    result = engine.run(parse_api(doc), keep=["1", "10", "11"])
    assert result.ok, result.error
    _, _, vae = result.values["1"]
    loaded, latent = result.values["10"][0], result.values["11"][0]["samples"]
    stereo = resample(loaded["waveform"], rate, 44100).expand(-1, 2, -1)
    with torch.no_grad():
        expected = vae.vae.encode(stereo)
    assert latent.shape == (1, 64, math.ceil(44100 * seconds / 2048))
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)
    [item] = result.outputs["9"]["audio"]
    assert item["type"] == "temp" and item["filename"].endswith(".flac")


def test_vae_loader_loads_an_oobleck_vae_file_or_the_checkpoints_own(base) -> None:
    """ComfyUI's VAELoader loads audio VAEs too: a bare Oobleck file (stable-audio-tools' names, as Comfy-Org ships
    ACE-Step 1.5's) and Stable Audio's checkpoint (its pretransform.model. part) decode as the checkpoint's VAE."""
    from ldm.checkpoint import write_safetensors
    from ldm.oobleck import tiny_oobleck_weights

    engine, files = base
    vae_dir = engine.services.paths.base / "models" / "vae"
    write_safetensors(tiny_oobleck_weights(seed=3), vae_dir / "oobleck-tiny.safetensors", {})
    (vae_dir / "stable-audio-open-1.0.safetensors").write_bytes(files["checkpoint"].read_bytes())
    doc = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": files["checkpoint"].name}},
           "2": {"class_type": "VAELoader", "inputs": {"vae_name": "oobleck-tiny.safetensors"}},
           "3": {"class_type": "VAELoader", "inputs": {"vae_name": "stable-audio-open-1.0.safetensors"}},
           "4": {"class_type": "EmptyLatentAudio", "inputs": {"seconds": 1.0, "batch_size": 1}},
           **{f"{k}5": {"class_type": "VAEDecodeAudio",
                        "inputs": {"samples": ["4", 0], "vae": [k, 2 if k == "1" else 0]}} for k in "123"},
           **{f"{k}6": {"class_type": "PreviewAudio", "inputs": {"audio": [f"{k}5", 0]}} for k in "123"}}
    result = engine.run(parse_api(doc), keep=["1", "2", "3"])
    assert result.ok, result.error
    own, bare, whole = result.values["1"][2].vae, result.values["2"][0].vae, result.values["3"][0].vae
    latents = torch.randn(1, 64, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = own.decode(latents)
        assert bare.dtype == torch.float32
        torch.testing.assert_close(bare.decode(latents), expected, rtol=0, atol=0)
        torch.testing.assert_close(whole.decode(latents), expected, rtol=0, atol=0)


def test_tiled_decoding_gives_the_same_sound_and_the_savers_pass_the_audio_on(base) -> None:
    engine, files = base
    doc = workflow(files)
    doc["6"]["inputs"]["seconds"] = 6.0  # 130 latent frames: five pieces of 32
    doc["12"] = {"class_type": "VAEDecodeAudioTiled", "inputs": {"samples": ["7", 0], "vae": ["1", 2],
                                                                 "tile_size": 32, "overlap": 8}}
    doc["13"] = {"class_type": "JoinAudioChannels", "inputs": {"audio_left": ["14", 0], "audio_right": ["14", 1]}}
    doc["14"] = {"class_type": "SplitAudioChannels", "inputs": {"audio": ["9", 0]}}  # SaveAudio's output
    doc["15"] = {"class_type": "PreviewAudio", "inputs": {"audio": ["13", 0]}}
    doc["16"] = {"class_type": "PreviewAudio", "inputs": {"audio": ["12", 0]}}
    result = engine.run(parse_api(doc), keep=["8", "12", "13"])
    assert result.ok, result.error
    whole, tiled, joined = (result.values[k][0] for k in ("8", "12", "13"))
    assert whole["waveform"].shape == (1, 2, 130 * 2048)
    torch.testing.assert_close(tiled["waveform"], whole["waveform"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(joined["waveform"], whole["waveform"], rtol=0, atol=0)
