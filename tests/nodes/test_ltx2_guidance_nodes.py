"""LTX-2's guidance nodes (nodes/sd/ltx2_guidance.py) in ComfyUI's template graph on tiny random files: STG, modality
guidance and the reference audio on the model, the dual-CFG guider, sampled end to end; the reference clip's tokens
as the audio VAE encodes it; a model that is not LTX-2 refused by name."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from ldm.ltx2_files import load_ltx2_audio_codec, make_ltx2_files
from ldm.ltx2_guidance import REF_AUDIO, reference_audio_tokens
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.ltx2_guidance import LTXVDualCFGGuider, LTXVSpatioTemporalGuidance
from tests.nodes.test_ltx2_nodes import CFG, run, workflow


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx2_guidance")
    files = make_ltx2_files(root / "models", seed=3)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def _dual(doc: dict, model: list, positive: list, negative: list, video_cfg: float, audio_cfg: float) -> None:
    doc["11"] = {"class_type": "LTXVDualCFGGuider", "inputs": {"model": model, "positive": positive,
                                                               "negative": negative, "video_cfg": video_cfg,
                                                               "audio_cfg": audio_cfg}}


def test_the_guidance_nodes_sample_an_audio_video_latent(base) -> None:
    engine, files = base
    plain = run(engine, workflow(files), ["14"])
    assert plain.ok, plain.error
    doc = workflow(files)
    doc["20"] = {"class_type": "LTXVAudioVAEDecode", "inputs": {"samples": ["8", 0], "audio_vae": ["3", 0]}}
    doc["21"] = {"class_type": "LTXVReferenceAudio", "inputs": {
        "model": ["1", 0], "positive": ["6", 0], "negative": ["6", 1], "reference_audio": ["20", 0],
        "audio_vae": ["3", 0], "identity_guidance_scale": 2.0, "start_percent": 0.0, "end_percent": 1.0}}
    doc["22"] = {"class_type": "LTXVSpatioTemporalGuidance", "inputs": {
        "model": ["21", 0], "scale": 1.0, "blocks": "0, 1", "start_percent": 0.0, "end_percent": 1.0}}
    doc["23"] = {"class_type": "LTXVModalityGuidance", "inputs": {
        "model": ["22", 0], "modality_scale": 3.0, "start_percent": 0.0, "end_percent": 0.5}}
    _dual(doc, ["23", 0], ["21", 1], ["21", 2], 3.0, 7.0)
    result = run(engine, doc, ["20", "21", "14"])
    assert result.ok, result.error

    # The reference: the decoded clip (24 kHz) encoded by the audio VAE (at its 16 kHz), as audio tokens, on both
    # prompts.
    clip = result.values["20"][0]
    codec = load_ltx2_audio_codec(files["checkpoint"])
    with torch.no_grad():
        expected = reference_audio_tokens(codec.encode(clip["waveform"], clip["sample_rate"]).float())
    _, positive, negative = result.values["21"]
    for side in (positive, negative):
        tokens = side[0][1][REF_AUDIO]
        assert tokens.shape == expected.shape and tokens.shape[0] == 1 and tokens.shape[2] == 128
        torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)

    sampled, before = result.values["14"][0], plain.values["14"][0]
    for key in ("samples", "audio_samples"):
        assert sampled[key].shape == before[key].shape and torch.isfinite(sampled[key]).all()
        assert (sampled[key] - before[key]).abs().max() > 1e-3


def test_the_dual_cfg_guider_at_equal_scales_is_the_cfg_guider(base) -> None:
    engine, files = base
    plain = run(engine, workflow(files), ["14"])
    doc = workflow(files)
    _dual(doc, ["1", 0], ["6", 0], ["6", 1], CFG, CFG)
    dual = run(engine, doc, ["14"])
    assert plain.ok and dual.ok, (plain.error, dual.error)
    for key in ("samples", "audio_samples"):
        torch.testing.assert_close(dual.values["14"][0][key], plain.values["14"][0][key], rtol=1e-5, atol=1e-5)

    _dual(doc, ["1", 0], ["6", 0], ["6", 1], CFG, 7.0)  # the audio guided harder
    harder = run(engine, doc, ["14"])
    assert harder.ok, harder.error
    assert (harder.values["14"][0]["audio_samples"] - plain.values["14"][0]["audio_samples"]).abs().max() > 1e-3


@pytest.mark.parametrize("node", ["LTXVSpatioTemporalGuidance", "LTXVModalityGuidance", "LTXVDualCFGGuider"])
def test_a_model_that_is_not_ltx2_is_refused(base, node) -> None:
    engine, files = base
    doc = workflow(files)
    doc["30"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}
    if node == "LTXVDualCFGGuider":
        _dual(doc, ["30", 0], ["6", 0], ["6", 1], 3.0, 7.0)
    else:
        extra = {"scale": 1.0, "blocks": "1"} if node == "LTXVSpatioTemporalGuidance" else {"modality_scale": 3.0}
        doc["31"] = {"class_type": node, "inputs": {"model": ["30", 0], "start_percent": 0.0, "end_percent": 1.0,
                                                    **extra}}
        doc["11"]["inputs"]["model"] = ["31", 0]
    with pytest.raises(WorkflowInvalid, match=f"{node} is for LTX-2 models; the MODEL linked is SD1"):
        run(engine, doc, ["14"])


def test_stg_blocks_past_the_last_are_refused(base) -> None:
    engine, files = base
    doc = workflow(files)
    doc["31"] = {"class_type": "LTXVSpatioTemporalGuidance", "inputs": {
        "model": ["1", 0], "scale": 1.0, "blocks": "29", "start_percent": 0.0, "end_percent": 1.0}}
    doc["11"]["inputs"]["model"] = ["31", 0]
    result = run(engine, doc, ["14"])
    assert not result.ok and "block 29 out of range; this model has 2 transformer blocks" in str(result.error)


def test_a_model_that_is_not_ltx2_is_refused_when_the_graph_could_not_tell(base) -> None:
    engine, _ = base
    loaded = run(engine, {"30": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}}},
                 ["30"])
    assert loaded.ok, loaded.error
    sd1 = loaded.values["30"][0]
    with pytest.raises(ValueError, match="LTXVSpatioTemporalGuidance is for LTX-2 models .*sd1.safetensors is SD1"):
        LTXVSpatioTemporalGuidance().execute(sd1, 1.0, "1", 0.0, 1.0)
    with pytest.raises(ValueError, match="LTXVDualCFGGuider is for LTX-2 models"):
        LTXVDualCFGGuider().execute(sd1, [], [], 3.0, 7.0)


def declaration(node) -> list[tuple]:
    """(section, name, type, default, min, max, step) per input, in order, from the node's object_info."""
    info = node.object_info()
    return [(section, name, spec[0], *(spec[1].get(k) if len(spec) > 1 else None
                                       for k in ("default", "min", "max", "step")))
            for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()]


def test_the_declarations_are_comfyuis() -> None:
    """Input names, order, types and ranges, and outputs, as nodes_lt.py's define_schema declares them."""
    from nodes.sd.ltx2_guidance import LTXVModalityGuidance, LTXVReferenceAudio

    percents = [("required", "start_percent", "FLOAT", 0.0, 0.0, 1.0, 0.001),
                ("required", "end_percent", "FLOAT", 1.0, 0.0, 1.0, 0.001)]
    model = ("required", "model", "MODEL", None, None, None, None)
    prompts = [("required", side, "CONDITIONING", None, None, None, None) for side in ("positive", "negative")]
    assert declaration(LTXVSpatioTemporalGuidance) == [
        model, ("required", "scale", "FLOAT", 1.0, 0.0, 100.0, 0.01),
        ("required", "blocks", "STRING", "29", None, None, None), *percents]
    assert declaration(LTXVModalityGuidance) == [
        model, ("required", "modality_scale", "FLOAT", 3.0, 1.0, 100.0, 0.1), *percents]
    assert declaration(LTXVDualCFGGuider) == [
        model, *prompts, ("required", "video_cfg", "FLOAT", 3.0, 0.0, 100.0, 0.1),
        ("required", "audio_cfg", "FLOAT", 7.0, 0.0, 100.0, 0.1)]
    assert declaration(LTXVReferenceAudio) == [
        model, *prompts, ("required", "reference_audio", "AUDIO", None, None, None, None),
        ("required", "audio_vae", "VAE", None, None, None, None),
        ("required", "identity_guidance_scale", "FLOAT", 3.0, 0.0, 100.0, 0.01), *percents]
    outputs = {node: (node.object_info()["output"], node.object_info()["output_name"])
               for node in (LTXVSpatioTemporalGuidance, LTXVModalityGuidance, LTXVDualCFGGuider, LTXVReferenceAudio)}
    assert list(outputs.values()) == [(["MODEL"], ["MODEL"])] * 2 + [
        (["GUIDER"], ["GUIDER"]), (["MODEL", "CONDITIONING", "CONDITIONING"], ["MODEL", "positive", "negative"])]
    assert LTXVReferenceAudio.object_info()["input"]["required"]["audio_vae"][1]["display_name"] == "Audio VAE"
    assert LTXVSpatioTemporalGuidance.object_info()["input"]["required"]["start_percent"][1]["advanced"] is True
