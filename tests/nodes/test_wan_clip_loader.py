"""CLIPLoader type wan (Wan's UMT5-XXL) and CLIPTextEncode on tiny files in ComfyUI's layout, and the refusals of a
T5 file for type wan and of a UMT5 file for the other types."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.flux_presets import TINY_T5
from ldm.flux_text import load_flux_text_encoders
from ldm.t5 import build_t5
from ldm.umt5 import UMT5Tokenizer, load_wan_text_encoder, write_tiny_umt5
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.part_loaders import CLIPLoader, DualCLIPLoader

UMT5, T5 = "umt5-tiny.safetensors", "t5xxl-tiny.safetensors"
PROMPT = "a (red:1.5) fox running through fresh snow"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_clip")
    encoders = root / "models" / "text_encoders"
    write_tiny_umt5(encoders / UMT5, seed=7)
    t5 = build_t5(TINY_T5).model.state_dict()
    write_safetensors({k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"}, encoders / T5, {},
                      torch.float16)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, encoders
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(folders):
    return Executor(builtin_registry(), services=Services.create(folders[0]))


def workflow(clip_name: str = UMT5, clip_type: str = "wan") -> dict:
    return {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": clip_type}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": PROMPT}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def test_clip_text_encode_gives_wans_context(engine, folders) -> None:
    """[1, 512, d_model]: the prompt's states (its weights applied), then zeros; what ldm.umt5 gives for the file."""
    result = engine.run(parse_api(workflow()), keep=["1", "2"])
    assert result.ok, result.error
    [clip], [[(context, options)]] = result.values["1"], result.values["2"]
    assert clip.family_name == "wan" and options == {}
    assert context.shape == (1, 512, 32) and context.dtype == torch.float32
    length = len(UMT5Tokenizer().tokenize(PROMPT).ids)
    assert context[0, :length].ne(0).any(-1).all() and context[0, length:].eq(0).all()
    expected = load_wan_text_encoder([folders[1] / UMT5]).encoder.encode([PROMPT]).cond
    torch.testing.assert_close(context, expected, atol=1e-5, rtol=1e-5)
    assert CLIPLoader.output_facts(workflow()["1"]["inputs"], {}) == {0: {"family": "wan"}}


def test_a_t5_file_with_type_wan_is_refused(engine) -> None:
    assert CLIPLoader.check_inputs({"clip_name": T5, "type": "wan"}) == \
        f"{T5} holds t5xxl; type wan takes one UMT5-XXL (umt5xxl: umt5_xxl_fp16.safetensors or an fp8 copy)"
    [problem] = validate(parse_api(workflow(T5)), engine.registry).problems
    assert "type wan takes one UMT5-XXL" in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(workflow(T5)))


def test_a_umt5_file_with_other_types_is_refused(folders) -> None:
    assert CLIPLoader.check_inputs({"clip_name": UMT5, "type": "sd3"}) == \
        f"{UMT5} holds umt5xxl; type sd3 takes one of SD3's CLIP-L (clip_l), CLIP-G (clip_g) and T5-XXL (t5xxl)"
    assert CLIPLoader.check_inputs({"clip_name": UMT5, "type": "chroma"}) == \
        f"{UMT5} holds umt5xxl; type chroma takes one T5-XXL (t5xxl)"
    problem = CLIPLoader.check_inputs({"clip_name": UMT5, "type": "stable_diffusion"})
    assert "it looks like UMT5-XXL, Wan's text encoder" in problem and "Load CLIP, type wan" in problem
    assert DualCLIPLoader.check_inputs({"clip_name1": UMT5, "clip_name2": T5, "type": "flux"}) == \
        f"{UMT5} and {T5} hold umt5xxl + t5xxl; type flux needs one CLIP-L (clip_l) and one T5-XXL (t5xxl)"
    with pytest.raises(CheckpointError, match="it looks like UMT5-XXL, Wan's text encoder"):
        load_flux_text_encoders([folders[1] / UMT5, folders[1] / T5])  # past validation, the loader says so too


def test_unsupported_types_name_wan_among_the_supported() -> None:
    problem = CLIPLoader.check_inputs({"clip_name": UMT5, "type": "cosmos"})
    assert ("Loom loads type stable_diffusion, sd3, chroma, wan, ltxv, qwen_image, lumina2, hidream, flux2, "
            "stable_audio or hunyuan_image") in problem
