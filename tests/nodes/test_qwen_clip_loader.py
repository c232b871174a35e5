"""CLIPLoader type qwen_image (Qwen-Image's Qwen2.5-VL-7B) and CLIPTextEncode on a tiny file in ComfyUI's layout,
and the refusals of a UMT5 file for type qwen_image and of a Qwen2.5-VL file for the other types."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.checkpoint import CheckpointError
from ldm.qwen_text import load_qwen_image_text_encoder, tokenize, write_tiny_qwen25vl
from ldm.umt5 import load_wan_text_encoder, write_tiny_umt5
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.part_loaders import CLIPLoader

QWEN, UMT5 = "qwen_2.5_vl_7b-tiny.safetensors", "umt5-tiny.safetensors"
PROMPT = "a (red:1.5) fox running through fresh snow"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_clip")
    encoders = root / "models" / "text_encoders"
    write_tiny_qwen25vl(encoders / QWEN, seed=3, dtype=torch.float16)
    write_tiny_umt5(encoders / UMT5, seed=7)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, encoders
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(folders):
    return Executor(builtin_registry(), services=Services.create(folders[0]))


def workflow(clip_name: str = QWEN, clip_type: str = "qwen_image") -> dict:
    return {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": clip_type}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": PROMPT}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def test_clip_text_encode_gives_qwen_images_context(engine, folders) -> None:
    """[1, L, 32]: the states from the user turn's text on (the template's 34 tokens dropped, brackets read as
    text), the attention mask in the options; what ldm.qwen_text gives for the file."""
    result = engine.run(parse_api(workflow()), keep=["1", "2"])
    assert result.ok, result.error
    [clip], [[(context, options)]] = result.values["1"], result.values["2"]
    length = len(tokenize(PROMPT)) - 34
    assert clip.family_name == "qwen_image" and set(options) == {"attention_mask"}
    assert context.shape == (1, length, 32) and context.dtype == torch.float32
    assert options["attention_mask"].tolist() == [[1] * length]
    expected = load_qwen_image_text_encoder([folders[1] / QWEN]).encoder.encode([PROMPT]).cond
    torch.testing.assert_close(context, expected.float(), atol=1e-5, rtol=1e-5)
    assert CLIPLoader.output_facts(workflow()["1"]["inputs"], {}) == {0: {"family": "qwen_image"}}


def test_a_umt5_file_with_type_qwen_image_is_refused(engine) -> None:
    assert CLIPLoader.check_inputs({"clip_name": UMT5, "type": "qwen_image"}) == (
        f"{UMT5} holds umt5xxl; type qwen_image takes one Qwen2.5-VL-7B, Qwen-Image's (qwen_2.5_vl_7b.safetensors or "
        "an fp8 copy), or Qwen3-VL-8B, Qwen-Image 2.1's (qwen3vl_8b_bf16.safetensors)")
    [problem] = validate(parse_api(workflow(UMT5)), engine.registry).problems
    assert "type qwen_image takes one Qwen2.5-VL-7B" in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(workflow(UMT5)))


def test_a_qwen_file_with_other_types_is_refused(folders) -> None:
    assert CLIPLoader.check_inputs({"clip_name": QWEN, "type": "wan"}) == \
        f"{QWEN} holds qwen25_7b; type wan takes one UMT5-XXL (umt5xxl: umt5_xxl_fp16.safetensors or an fp8 copy)"
    problem = CLIPLoader.check_inputs({"clip_name": QWEN, "type": "stable_diffusion"})
    assert "it looks like Qwen2.5-VL, Qwen-Image's" in problem and "type qwen_image" in problem
    with pytest.raises(CheckpointError, match="not UMT5-XXL.*Qwen2.5-VL, Qwen-Image's"):
        load_wan_text_encoder([folders[1] / QWEN])  # past validation, the loader says so too
