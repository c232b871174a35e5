"""ACE-Step 1.5 end to end on tiny random files in the released layouts (`ldm.ace_step15_presets`): ComfyUI's
template graph (UNETLoader, DualCLIPLoader type ace, VAELoader, ModelSamplingAuraFlow 3, TextEncodeAceStepAudio1.5
with the language model writing the audio codes, ConditioningZeroOut, EmptyAceStep1.5LatentAudio, KSampler,
VAEDecodeAudio, SaveAudioMP3) against an Euler loop over the model called by hand with the prompt's encodings, the
silence latent and the null embedding for the zeroed prompt, on ComfyUI's simple schedule; the saved MP3; a
reference covered (ReferenceTimbreAudio); the graph as ComfyUI's editor saves its ACE-Step 1.5 blueprint; the
refusals a wrong graph gets."""

from __future__ import annotations

import json
import math
import shutil

import av
import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.ace_step15 import AceStep15Model, silence_latent
from ldm.ace_step15_files import peek_ace_step15
from ldm.ace_step15_presets import make_ace_step15_files
from ldm.checkpoint import load_state_dict
from ldm.oobleck import load_oobleck
from ldm.presets import make_checkpoint
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

SEED, LM_SEED, STEPS, CFG, SECONDS = 7, 11, 3, 2.0, 2.0
TAGS, LYRICS = "lo-fi hip hop, dusty drums, warm piano", "[verse]\nslow morning light\n[chorus]\nstay a while"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ace_step")
    files = make_ace_step15_files(root / "models", seed=2)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_checkpoint("tiny-sdxl", root / "models" / "checkpoints" / "sdxl.safetensors", seed=1)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def workflow(files: dict, cfg: float = CFG) -> dict:
    """The ACE-Step 1.5 template's graph, short."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["diffusion_model"].name,
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files["text_encoder"].name,
                                                         "clip_name2": files["lm"].name, "type": "ace"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"].name}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "5": {"class_type": "TextEncodeAceStepAudio1.5", "inputs": {
            "clip": ["2", 0], "tags": TAGS, "lyrics": LYRICS, "seed": LM_SEED, "bpm": 90, "duration": SECONDS,
            "timesignature": "4", "language": "en", "keyscale": "A minor", "generate_audio_codes": True,
            "cfg_scale": 2.0, "temperature": 0.85, "top_p": 0.9, "top_k": 0, "min_p": 0.0}},
        "6": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["5", 0]}},
        "7": {"class_type": "EmptyAceStep1.5LatentAudio", "inputs": {"seconds": SECONDS, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["5", 0], "negative": ["6", 0], "latent_image": ["7", 0], "seed": SEED,
            "steps": STEPS, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "VAEDecodeAudio", "inputs": {"samples": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "SaveAudioMP3", "inputs": {"audio": ["9", 0], "filename_prefix": "audio/ace",
                                                        "quality": "V0"}},
    }


def simple_sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """ComfyUI's simple scheduler over the 1,000 shifted flow levels (ModelSamplingDiscreteFlow), then 0."""
    levels = [shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) for t in range(1, 1001)]
    return [levels[-(1 + int(i * 1000 / steps))] for i in range(steps)] + [0.0]


def test_workflow_matches_an_euler_loop_over_the_model(base) -> None:
    engine, files = base
    result = engine.run(parse_api(workflow(files)), keep=["5", "6", "7", "8", "9"])
    assert result.ok, result.error
    [(cond, options)] = result.values["5"][0]
    [(zeroed, zero_options)] = result.values["6"][0]
    empty, latent, audio = result.values["7"][0], result.values["8"][0], result.values["9"][0]
    length = empty["samples"].shape[-1]
    assert length == 50  # ComfyUI's round(2 * 48000 / 1920)
    codes, lyrics = options["audio_codes"], options["conditioning_lyrics"]
    assert codes.shape == (1, 10) and codes.dtype == torch.long and 0 <= int(codes.min()) <= int(codes.max()) < 64000
    assert lyrics.shape[0] == 1 and lyrics.shape[2] == cond.shape[2] == 32 and lyrics.abs().max() > 0
    assert not zeroed.any() and not zero_options["conditioning_lyrics"].any()
    assert torch.equal(zero_options["audio_codes"], codes)  # ComfyUI's ConditioningZeroOut keeps the codes

    model = AceStep15Model(peek_ace_step15(files["diffusion_model"]).unet_config)
    model.load_state_dict({k: v.float() for k, v in load_state_dict(files["diffusion_model"]).items()})
    model.eval()
    silence = silence_latent(length)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.tensor([sigma])
        with torch.no_grad():
            v_cond = model(x, t, cond, lyrics, silence, audio_codes=codes)
            v_uncond = model(x, t, zeroed, zero_options["conditioning_lyrics"], silence, audio_codes=codes,
                             null_condition=True)
        return v_uncond + CFG * (v_cond - v_uncond)

    sigmas = simple_sigmas(STEPS)
    x = prepare_noise(empty["samples"], SEED) * sigmas[0]
    for sigma, following in zip(sigmas, sigmas[1:], strict=False):
        x = x + velocity(x, sigma) * (following - sigma)  # Euler on the flow: x0 = x - sigma * v
    assert (latent["samples"] - x).abs().max() < 1e-4 * x.abs().max()

    vae = load_oobleck(load_state_dict(files["vae"]))
    with torch.no_grad():
        expected = vae.decode(latent["samples"])
    expected = expected / (expected.std(dim=(1, 2), keepdim=True) * 5.0).clamp(min=1.0)  # ComfyUI's VAEDecodeAudio
    assert audio["sample_rate"] == 48000 and audio["waveform"].shape == (1, 2, length * 1920)
    torch.testing.assert_close(audio["waveform"], expected, rtol=1e-4, atol=1e-4)


def test_the_saved_mp3_holds_the_song_and_the_workflow(base) -> None:
    engine, files = base
    result = engine.run(parse_api(workflow(files, cfg=1.0)))
    assert result.ok, result.error
    [item] = result.outputs["10"]["audio"]
    path = engine.services.paths.output / item["subfolder"] / item["filename"]
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        assert stream.rate == 48000 and stream.channels == 2
        assert abs(samples - SECONDS * 48000) <= 2 * 1152  # an MP3's frames: within the encoder's padding
        assert "prompt" in {k.lower() for k in container.metadata}


def test_the_all_in_one_checkpoint_sings_as_the_split_files(base) -> None:
    """CheckpointLoaderSimple on ace_step_1.5_turbo_aio (the same weights, each part under ComfyUI's prefix): the
    same song, bit for bit, as UNETLoader + DualCLIPLoader + VAELoader."""
    engine, files = base
    split = engine.run(parse_api(workflow(files)), keep=["9"])
    doc = workflow(files)
    doc["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": files["checkpoint"].name}}
    doc["5"]["inputs"]["clip"] = ["1", 1]
    doc["9"]["inputs"]["vae"] = ["1", 2]
    del doc["2"], doc["3"]
    whole = engine.run(parse_api(doc), keep=["1", "9"])
    assert split.ok and whole.ok, (split.error, whole.error)
    assert torch.equal(split.values["9"][0]["waveform"], whole.values["9"][0]["waveform"])
    model, clip, _ = whole.values["1"]
    assert model.family.name == clip.family_name == "ace_step15" and clip.encoder.lm is not None


def test_without_codes_or_with_a_reference_the_song_changes(base) -> None:
    """generate_audio_codes off: no codes ride in the conditioning (the model is led by silence); a reference latent
    through ReferenceTimbreAudio: covered (its latent the timbre reference and the lead)."""
    engine, files = base
    plain = engine.run(parse_api(workflow(files, cfg=1.0)), keep=["8"])
    doc = workflow(files, cfg=1.0)
    doc["5"]["inputs"]["generate_audio_codes"] = False
    silent = engine.run(parse_api(doc), keep=["5", "8"])
    assert plain.ok and silent.ok, (plain.error, silent.error)
    [(_, options)] = silent.values["5"][0]
    assert "audio_codes" not in options and "conditioning_lyrics" in options
    doc = workflow(files, cfg=1.0)
    doc["11"] = {"class_type": "EmptyAudio", "inputs": {"duration": 1.0, "sample_rate": 48000, "channels": 2}}
    doc["12"] = {"class_type": "VAEEncodeAudio", "inputs": {"audio": ["11", 0], "vae": ["3", 0]}}
    doc["13"] = {"class_type": "ReferenceTimbreAudio", "inputs": {"conditioning": ["5", 0], "latent": ["12", 0]}}
    doc["8"]["inputs"]["positive"] = ["13", 0]
    covered = engine.run(parse_api(doc), keep=["8", "12", "13"])
    assert covered.ok, covered.error
    [(_, options)] = covered.values["13"][0]
    assert torch.equal(options["reference_audio_timbre_latents"], covered.values["12"][0]["samples"])
    songs = [run.values["8"][0]["samples"] for run in (plain, silent, covered)]
    assert (songs[0] - songs[1]).abs().max() > 1e-3 and (songs[0] - songs[2]).abs().max() > 1e-3


def test_wrong_graphs_are_refused_by_name(base) -> None:
    engine, files = base
    doc = workflow(files)  # SD1's CLIP for the song
    doc["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    doc["5"]["inputs"]["clip"] = ["20", 1]
    with pytest.raises(WorkflowInvalid, match="TextEncodeAceStepAudio1.5 needs ACE-Step 1.5's text encoders"):
        engine.run(parse_api(doc))
    doc = workflow(files)  # the encoder twice
    doc["2"]["inputs"]["clip_name2"] = files["text_encoder"].name
    with pytest.raises(WorkflowInvalid, match="type ace needs ACE-Step 1.5's Qwen3-0.6B text encoder"):
        engine.run(parse_api(doc))
    doc = workflow(files)  # an SDXL prompt (64 wide, the tiny model takes 32) for the ACE-Step model
    doc["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}}
    doc["21"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["20", 1], "text": "a song"}}
    doc["8"]["inputs"]["positive"] = ["21", 0]
    result = engine.run(parse_api(doc), keep=["8"])
    assert not result.ok and "TextEncodeAceStepAudio1.5 on the CLIP of DualCLIPLoader type ace" in str(result.error)
    doc = workflow(files)  # an image latent for the song
    doc["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    result = engine.run(parse_api(doc), keep=["8"])
    assert not result.ok and "latent" in str(result.error).lower()
    doc = workflow(files)  # ACE-Step 1.0's nodes are ComfyUI's, not Loom's
    doc["5"] = {"class_type": "TextEncodeAceStepAudio", "inputs": {"clip": ["2", 0], "tags": TAGS, "lyrics": "",
                                                                   "lyrics_strength": 1.0}}
    with pytest.raises(WorkflowInvalid, match="TextEncodeAceStepAudio"):
        engine.run(parse_api(doc))


def _ui_node(nid: int, kind: str, widgets: list, inputs: list[tuple[str, str, int]] = (),
             outputs: list[tuple[str, str]] = (), widget_inputs: tuple[str, ...] = ()) -> dict:
    linked = [{"name": n, "type": t, "link": link, **({"widget": {"name": n}} if n in widget_inputs else {})}
              for n, t, link in inputs]
    return {"id": nid, "type": kind, "pos": [0, 0], "size": [200, 100], "flags": {}, "mode": 0, "inputs": linked,
            "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs], "properties": {},
            "widgets_values": widgets}


def test_comfyuis_blueprint_graph_in_the_editor_format_runs(base, tmp_path) -> None:
    """ComfyUI's "Text to Audio (ACE-Step 1.5)" graph as its editor saves it (UI format: the nodes' widget values in
    ComfyUI's order, the seed from a PrimitiveNode and the duration from a PrimitiveFloat feeding both the prompt and
    the latent), on tiny files under the blueprint's file names."""
    from graph.load import load_workflow

    engine, files = base
    models = engine.services.paths.base / "models"
    for part, name in (("diffusion_model", "diffusion_models/acestep_v1.5_turbo.safetensors"),
                       ("text_encoder", "text_encoders/qwen_0.6b_ace15.safetensors"),
                       ("lm", "text_encoders/qwen_4b_ace15.safetensors"), ("vae", "vae/ace_1.5_vae.safetensors")):
        shutil.copy(files[part], models / name)
    nodes = [
        _ui_node(104, "UNETLoader", ["acestep_v1.5_turbo.safetensors", "default"], outputs=[("MODEL", "MODEL")]),
        _ui_node(105, "DualCLIPLoader", ["qwen_0.6b_ace15.safetensors", "qwen_4b_ace15.safetensors", "ace",
                                         "default"], outputs=[("CLIP", "CLIP")]),
        _ui_node(106, "VAELoader", ["ace_1.5_vae.safetensors"], outputs=[("VAE", "VAE")]),
        _ui_node(78, "ModelSamplingAuraFlow", [3], [("model", "MODEL", 1)], [("MODEL", "MODEL")]),
        _ui_node(102, "PrimitiveNode", [0, "randomize"], outputs=[("INT", "INT")]),
        _ui_node(110, "PrimitiveFloat", [1.2], outputs=[("FLOAT", "FLOAT")]),
        _ui_node(94, "TextEncodeAceStepAudio1.5",
                 [TAGS, LYRICS, 0, "fixed", 190, 120, "4", "en", "E minor", True, 2, 0.85, 0.9, 0, 0],
                 [("clip", "CLIP", 2), ("seed", "INT", 3), ("duration", "FLOAT", 4)],
                 [("CONDITIONING", "CONDITIONING")], widget_inputs=("seed", "duration")),
        _ui_node(47, "ConditioningZeroOut", [], [("conditioning", "CONDITIONING", 5)],
                 [("CONDITIONING", "CONDITIONING")]),
        _ui_node(98, "EmptyAceStep1.5LatentAudio", [120, 1], [("seconds", "FLOAT", 6)], [("LATENT", "LATENT")],
                 widget_inputs=("seconds",)),
        _ui_node(3, "KSampler", [0, "fixed", 2, 1, "euler", "simple", 1],
                 [("model", "MODEL", 7), ("positive", "CONDITIONING", 8), ("negative", "CONDITIONING", 9),
                  ("latent_image", "LATENT", 10), ("seed", "INT", 11)], [("LATENT", "LATENT")],
                 widget_inputs=("seed",)),
        _ui_node(18, "VAEDecodeAudio", [], [("samples", "LATENT", 12), ("vae", "VAE", 13)], [("AUDIO", "AUDIO")]),
        _ui_node(107, "SaveAudioMP3", ["audio/ComfyUI", "V0"], [("audio", "AUDIO", 14)], [("AUDIO", "AUDIO")]),
    ]
    links = [[1, 104, 0, 78, 0, "MODEL"], [2, 105, 0, 94, 0, "CLIP"], [3, 102, 0, 94, 1, "INT"],
             [4, 110, 0, 94, 2, "FLOAT"], [5, 94, 0, 47, 0, "CONDITIONING"], [6, 110, 0, 98, 0, "FLOAT"],
             [7, 78, 0, 3, 0, "MODEL"], [8, 94, 0, 3, 1, "CONDITIONING"], [9, 47, 0, 3, 2, "CONDITIONING"],
             [10, 98, 0, 3, 3, "LATENT"], [11, 102, 0, 3, 4, "INT"], [12, 3, 0, 18, 0, "LATENT"],
             [13, 106, 0, 18, 1, "VAE"], [14, 18, 0, 107, 0, "AUDIO"]]
    path = tmp_path / "text_to_audio_ace_step_1_5.json"
    path.write_text(json.dumps({"last_node_id": 110, "last_link_id": 14, "nodes": nodes, "links": links,
                                "groups": [], "config": {}, "extra": {}, "version": 0.4}))
    result = engine.run(load_workflow(path, engine.registry), keep=["94", "98"])
    assert result.ok, result.error
    [(_, options)] = result.values["94"][0]
    assert options["audio_codes"].shape == (1, 5 * math.ceil(1.2))  # five codes a second, the seconds rounded up
    assert result.values["98"][0]["samples"].shape == (1, 64, 30)
    [item] = result.outputs["107"]["audio"]
    assert item["filename"].endswith(".mp3") and item["subfolder"] == "audio"
