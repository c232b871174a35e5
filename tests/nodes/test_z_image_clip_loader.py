"""CLIPLoader type lumina2 (Z-Image's Qwen3-4B) and CLIPTextEncode on a tiny file in ComfyUI's layout, and the
refusals, at validation and at load, of a UMT5, a Qwen2.5-VL and a Gemma file for type lumina2 and of a Qwen3 file
for the other types."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.checkpoint import CheckpointError
from ldm.qwen3_text import load_z_image_text_encoder, tokenize, write_tiny_qwen3
from ldm.qwen_text import load_qwen_image_text_encoder, write_tiny_qwen25vl
from ldm.umt5 import write_tiny_umt5
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.part_loaders import CLIPLoader

QWEN3, QWEN25, UMT5, GEMMA = ("qwen_3_4b-tiny.safetensors", "qwen_2.5_vl_7b-tiny.safetensors",
                              "umt5-tiny.safetensors", "gemma_2_2b_fp16.safetensors")
PROMPT = "a (red:1.5) fox running through fresh snow"
NEEDS = ("type lumina2 takes one Gemma-2-2B, Lumina Image 2.0's text encoder (gemma_2_2b_fp16.safetensors), or "
         "Qwen3-4B, Z-Image's (qwen_3_4b.safetensors or an fp8 copy)")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("z_image_clip")
    encoders = root / "models" / "text_encoders"
    write_tiny_qwen3(encoders / QWEN3, seed=3, dtype=torch.bfloat16)
    write_tiny_qwen25vl(encoders / QWEN25, seed=3)
    write_tiny_umt5(encoders / UMT5, seed=7)
    gemma = {"model.embed_tokens.weight": torch.zeros(4, 2304)} | {
        f"model.layers.0.{name}.weight": torch.zeros(2) for name in (
            "self_attn.q_proj", "mlp.gate_proj", "pre_feedforward_layernorm", "post_feedforward_layernorm")}
    safetensors.torch.save_file(gemma, encoders / GEMMA)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, encoders
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(folders):
    return Executor(builtin_registry(), services=Services.create(folders[0]))


def workflow(clip_name: str = QWEN3, clip_type: str = "lumina2") -> dict:
    return {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": clip_type}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": PROMPT}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def test_clip_text_encode_gives_z_images_context(engine, folders) -> None:
    """[1, L, 32]: the states of the whole templated prompt (brackets read as text), the attention mask in the
    options; what ldm.qwen3_text gives for the file."""
    result = engine.run(parse_api(workflow()), keep=["1", "2"])
    assert result.ok, result.error
    [clip], [[(context, options)]] = result.values["1"], result.values["2"]
    length = len(tokenize(PROMPT))
    assert clip.family_name == "z_image" and set(options) == {"attention_mask"}
    assert context.shape == (1, length, 32) and context.dtype == torch.float32
    assert options["attention_mask"].tolist() == [[1] * length]
    expected = load_z_image_text_encoder([folders[1] / QWEN3]).encoder.encode([PROMPT]).cond
    torch.testing.assert_close(context, expected.float(), atol=1e-5, rtol=1e-5)
    assert CLIPLoader.output_facts(workflow()["1"]["inputs"], {}) == {0: {"family": "z_image"}}


@pytest.mark.parametrize("name, kind", [(UMT5, "umt5xxl"), (QWEN25, "qwen25_7b")])
def test_other_files_with_type_lumina2_are_refused(engine, folders, name, kind) -> None:
    assert CLIPLoader.check_inputs({"clip_name": name, "type": "lumina2"}) == f"{name} holds {kind}; {NEEDS}"
    [problem] = validate(parse_api(workflow(name)), engine.registry).problems
    assert "type lumina2 takes one Gemma-2-2B" in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(workflow(name)))
    with pytest.raises(CheckpointError, match=f"{name}: not Qwen3-4B, Z-Image's text encoder"):
        load_z_image_text_encoder([folders[1] / name])  # past validation, the loader says so too


def test_a_qwen3_file_with_other_types_is_refused(folders) -> None:
    assert CLIPLoader.check_inputs({"clip_name": QWEN3, "type": "qwen_image"}) == (
        f"{QWEN3} holds qwen3_4b; type qwen_image takes one Qwen2.5-VL-7B, Qwen-Image's (qwen_2.5_vl_7b.safetensors or "
        "an fp8 copy), or Qwen3-VL-8B, Qwen-Image 2.1's (qwen3vl_8b_bf16.safetensors)")
    problem = CLIPLoader.check_inputs({"clip_name": QWEN3, "type": "stable_diffusion"})
    assert "it looks like Qwen3 (Qwen3-4B is Z-Image's text encoder" in problem and "type lumina2" in problem
    with pytest.raises(CheckpointError, match="not Qwen2.5-VL-7B.*it holds Qwen3 \\(Qwen3-4B is Z-Image's"):
        load_qwen_image_text_encoder([folders[1] / QWEN3])
    assert "lumina2" in CLIPLoader.check_inputs({"clip_name": QWEN3, "type": "cosmos"})


def test_type_lumina2_takes_a_gemma_file_as_lumina_2s(folders) -> None:
    """Gemma-2-2B is the type's other encoder (Lumina Image 2.0's, ldm.gemma_text): validation names its family."""
    assert CLIPLoader.check_inputs({"clip_name": GEMMA, "type": "lumina2"}) is None
    assert CLIPLoader.output_facts({"clip_name": GEMMA, "type": "lumina2"}, {}) == {0: {"family": "lumina2"}}
