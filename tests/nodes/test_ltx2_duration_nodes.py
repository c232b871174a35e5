"""LTXVDurationPredictor end to end on tiny random files: ModelPatchLoader reads LTX 2.4 duration heads in each key
layout, the node runs the first prompt through the LTX-2.3 model's connectors and the head (checked against the
connectors called by hand and a float64 transcription of the head), and its frame count sets EmptyLTXVLatentVideo's
length; a model of another family, a patch of another kind and a head made for other connector widths are refused
by name."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_state_dict
from ldm.controlnet_diffsynth import TINY_DIFFSYNTH_CONTROLNET, write_tiny_diffsynth_controlnet
from ldm.ltx2_duration import PREFIXES, normalize_state_dict, seconds_to_num_frames, write_tiny_duration_head
from ldm.ltx2_files import TINY_LTX23, load_ltx2_unet, make_ltx2_files
from ldm.ltx2_text import load_ltx2_text_encoder
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_ltx2_duration import transcribed

PROMPT, OTHER = "a dog barks in a meadow, then runs off", "a still lake"
FPS = 24.0
HEADS = {"ltx-2.4-duration-head.safetensors": PREFIXES[0], "duration_head_prefixed.safetensors": PREFIXES[1],
         "duration_head_bare.safetensors": ""}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx2_duration")
    models = root / "models"
    files = make_ltx2_files(models, seed=3)
    make_checkpoint("tiny-sd1", models / "checkpoints" / "sd1.safetensors", seed=1)
    patches = models / "model_patches"
    for name, prefix in HEADS.items():  # one head, three layouts
        write_tiny_duration_head(patches / name, TINY_LTX23.connector_dim, TINY_LTX23.audio_connector_dim, seed=9,
                                 prefix=prefix, seconds=4.0)
    diffsynth = write_tiny_diffsynth_controlnet(patches / "qwen_canny_diffsynth.safetensors",
                                                TINY_DIFFSYNTH_CONTROLNET, seed=7, dtype=torch.float32)
    torch.save(load_state_dict(diffsynth), patches / "qwen_canny_diffsynth.pt")  # no header: known only once loaded
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def run(engine: Executor, doc: dict, nodes: list[str]):
    return engine.run(parse_api(doc), keep=nodes, outputs=nodes)


def graph(files: dict, head: str, checkpoint: str = "checkpoint_23", low: float = 1.0, high: float = 20.0) -> dict:
    ckpt = files[checkpoint].name if checkpoint in files else checkpoint
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LTXAVTextEncoderLoader", "inputs": {"text_encoder": files["text_encoder"].name,
                                                                 "ckpt_name": files["checkpoint_23"].name,
                                                                 "device": "default"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "4": {"class_type": "ModelPatchLoader", "inputs": {"name": head}},
        "5": {"class_type": "LTXVDurationPredictor", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "duration_head": ["4", 0], "frame_rate": FPS,
            "min_seconds": low, "max_seconds": high}},
        "6": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 64, "length": ["5", 0],
                                                               "batch_size": 1}},
    }


def expected_seconds(files: dict, head: str, text: str) -> float:
    """The prompt through the connectors called by hand, then the head transcribed in float64."""
    model = load_ltx2_unet(files["checkpoint_23"], dtype=torch.float32).unet.model
    encoder = load_ltx2_text_encoder(files["text_encoder"], files["checkpoint_23"]).encoder
    weights = {k: v.double() for k, v in normalize_state_dict(load_state_dict(
        files["checkpoint_23"].parent.parent / "model_patches" / head)).items()}
    with torch.no_grad():
        video, audio, _ = model.preprocess_text_embeds(encoder.encode([text]).cond)
    return float(transcribed(weights, video.double(), audio.double())[0])


def test_the_prediction_sets_the_video_length(base) -> None:
    engine, files = base
    name = "ltx-2.4-duration-head.safetensors"
    result = run(engine, graph(files, name), ["5", "6"])
    assert result.ok, result.error
    num_frames, seconds = result.values["5"]
    expected = expected_seconds(files, name, PROMPT)
    assert seconds == pytest.approx(expected, rel=1e-4)
    assert isinstance(num_frames, int) and num_frames == seconds_to_num_frames(expected, FPS, 1.0, 20.0)
    assert (num_frames - 1) % 8 == 0 and num_frames > 1
    assert result.values["6"][0]["samples"].shape == (1, 128, (num_frames - 1) // 8 + 1, 2, 2)

    # clamped to a range it falls outside of: the seconds stay raw, the frames follow the range
    result = run(engine, graph(files, name, low=seconds + 2, high=seconds + 5), ["5"])
    assert result.ok, result.error
    clamped, raw = result.values["5"]
    assert raw == seconds and clamped == seconds_to_num_frames(seconds, FPS, seconds + 2, seconds + 5)
    assert clamped >= round((seconds + 2) * FPS)


@pytest.mark.parametrize("name", list(HEADS)[1:])
def test_each_key_layout_predicts_the_same(base, name: str) -> None:
    engine, files = base
    results = [run(engine, graph(files, head), ["5"]) for head in ("ltx-2.4-duration-head.safetensors", name)]
    assert all(r.ok for r in results), [r.error for r in results]
    assert results[0].values["5"] == results[1].values["5"]


def test_the_first_prompt_is_the_one_read(base) -> None:
    engine, files = base
    name = "ltx-2.4-duration-head.safetensors"
    doc = graph(files, name)
    doc["7"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": OTHER}}
    doc["8"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["7", 0],
                                                                "conditioning_2": ["3", 0]}}
    doc["5"]["inputs"]["positive"] = ["8", 0]
    result = run(engine, doc, ["5"])
    assert result.ok, result.error
    seconds = result.values["5"][1]
    assert seconds == pytest.approx(expected_seconds(files, name, OTHER), rel=1e-4)
    assert seconds != pytest.approx(expected_seconds(files, name, PROMPT), rel=1e-3)


def test_wrong_models_and_patches_are_refused_by_name(base) -> None:
    engine, files = base
    name = "ltx-2.4-duration-head.safetensors"
    with pytest.raises(WorkflowInvalid, match="LTXVDurationPredictor predicts with an LTX-2 model's prompt "
                                              "connectors; the MODEL linked is SD1"):
        run(engine, graph(files, name, checkpoint="sd1.safetensors"), ["5"])
    with pytest.raises(WorkflowInvalid, match="LTXVDurationPredictor takes an LTX 2.4 duration head as its "
                                              "duration_head; qwen_canny_diffsynth.safetensors is a DiffSynth "
                                              "blockwise ControlNet for Qwen-Image"):
        run(engine, graph(files, "qwen_canny_diffsynth.safetensors"), ["5"])

    # a file without a header passes validation; the node refuses what it loads
    result = run(engine, graph(files, "qwen_canny_diffsynth.pt"), ["5"])
    assert not result.ok and "qwen_canny_diffsynth.pt is a DiffSynth blockwise ControlNet" in str(result.error)

    # LTX-2.0's connectors give 48-wide tokens to both streams; the head takes LTX-2.3's 64 and 32
    result = run(engine, graph(files, name, checkpoint="checkpoint"), ["5"])
    assert not result.ok
    assert (f"{name}: this duration head is for an LTX-2 model whose prompt connectors give 64-wide video and "
            "32-wide audio tokens") in str(result.error)
    assert f"the MODEL linked ({files['checkpoint'].name}) has 48 and 48" in str(result.error)


def test_other_model_patch_nodes_refuse_a_duration_head(base) -> None:
    engine, files = base
    doc = graph(files, "ltx-2.4-duration-head.safetensors")
    doc["9"] = {"class_type": "QwenImageDiffsynthControlnet", "inputs": {
        "model": ["1", 0], "model_patch": ["4", 0], "vae": ["1", 2], "image": ["10", 0], "strength": 1.0}}
    doc["10"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    with pytest.raises(WorkflowInvalid, match="ltx-2.4-duration-head.safetensors is an LTX 2.4 duration head; "
                                              "QwenImageDiffsynthControlnet applies"):
        run(engine, {k: v for k, v in doc.items() if k in ("1", "4", "9", "10")}, ["9"])


def test_the_declaration_is_comfyuis() -> None:
    """Input names, order, types and ranges, and outputs, as nodes_lt.py's define_schema declares them."""
    from nodes.sd.ltx2_duration import LTXVDurationPredictor
    from tests.nodes.test_ltx2_guidance_nodes import declaration

    assert declaration(LTXVDurationPredictor) == [
        ("required", "model", "MODEL", None, None, None, None),
        ("required", "positive", "CONDITIONING", None, None, None, None),
        ("required", "duration_head", "MODEL_PATCH", None, None, None, None),
        ("required", "frame_rate", "FLOAT", 24.0, 1.0, 120.0, 0.01),
        ("required", "min_seconds", "FLOAT", 1.0, 0.5, 120.0, 0.1),
        ("required", "max_seconds", "FLOAT", 20.0, 0.5, 120.0, 0.1)]
    info = LTXVDurationPredictor.object_info()
    assert (info["output"], info["output_name"]) == (["INT", "FLOAT"], ["num_frames", "seconds"])
    assert (info["display_name"], info["category"]) == ("LTXV Duration Predictor", "model/conditioning/ltxv")
