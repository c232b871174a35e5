"""TextGenerate end to end: ComfyUI API prompts (CLIPLoader of a tiny Qwen3-4B file, TextGenerate with its dynamic
combo's `sampling_mode.*` keys, PreviewAny) through the executor give ldm.textgen's text; CLIPs and inputs it cannot
take are refused."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.qwen3_text import load_z_image_text_encoder, write_tiny_qwen3
from ldm.qwen_text import write_tiny_qwen25vl
from ldm.textgen import Sampling, generate_text
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd import textgen

PROMPT = "a lighthouse at dusk"
ON = {"sampling_mode": "on", "sampling_mode.temperature": 0.9, "sampling_mode.top_k": 8, "sampling_mode.top_p": 0.9,
      "sampling_mode.min_p": 0.0, "sampling_mode.repetition_penalty": 1.1, "sampling_mode.seed": 4,
      "sampling_mode.presence_penalty": 0.2}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("textgen_node")
    encoders = root / "models" / "text_encoders"
    encoders.mkdir(parents=True)
    files = {"qwen3": write_tiny_qwen3(encoders / "qwen_3_4b.safetensors", seed=3, dtype=torch.float32),
             "qwen25": write_tiny_qwen25vl(encoders / "qwen_2.5_vl_7b.safetensors", dtype=torch.float32)}
    paths = FolderPaths(base=root)
    set_paths(paths)
    registry = builtin_registry()
    encoder = load_z_image_text_encoder([files["qwen3"]]).encoder
    yield Executor(registry, services=Services.create(paths)), files, encoder
    set_paths(FolderPaths())


def graph(clip_name: str, clip_type: str = "lumina2", **inputs) -> dict:
    return {
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": clip_type}},
        "2": {"class_type": "TextGenerate", "inputs": {"clip": ["1", 0], "prompt": PROMPT, "max_length": 10,
                                                       **inputs}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }


def generated(engine: Executor, doc: dict) -> str:
    result = engine.run(parse_api(doc), keep=["2"])
    assert result.ok, result.error
    return result.values["2"][0]


@pytest.mark.parametrize("inputs", [{"sampling_mode": "off"}, ON, {**ON, "thinking": True},
                                    {"sampling_mode": "off", "use_default_template": False}])
def test_text_generate_runs_in_a_comfyui_prompt(base, inputs) -> None:
    engine, files, encoder = base
    text = generated(engine, graph(files["qwen3"].name, **inputs))
    options = {k.removeprefix("sampling_mode."): v for k, v in inputs.items() if k.startswith("sampling_mode.")}
    sampling = Sampling(**options) if inputs["sampling_mode"] == "on" else None
    expected = generate_text(encoder, PROMPT, 10, sampling, inputs.get("thinking", False),
                             inputs.get("use_default_template", True))
    assert isinstance(text, str) and text and text == expected


def test_sampling_mode_on_takes_comfyuis_defaults(base) -> None:
    engine, files, encoder = base
    text = generated(engine, graph(files["qwen3"].name, sampling_mode="on"))
    assert text == generate_text(encoder, PROMPT, 10, Sampling())
    assert Sampling() == Sampling(0.7, 64, 0.95, 0.05, 1.05, 0.0, 0)


def test_a_clip_without_a_language_model_is_refused(base) -> None:
    engine, files, _ = base
    with pytest.raises(WorkflowInvalid, match="the CLIP linked is qwen_image's. TextGenerate needs a CLIP holding"):
        engine.run(parse_api(graph(files["qwen25"].name, "qwen_image", sampling_mode="off")), keep=["2"])


def test_media_inputs_are_refused(base) -> None:
    engine, files, _ = base
    doc = graph(files["qwen3"].name, sampling_mode="off", image=["4", 0])
    doc["4"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
    result = engine.run(parse_api(doc), keep=["2"])
    assert not result.ok and "read text only" in str(result.error)


def test_editor_widgets_line_up_with_the_dynamic_combo() -> None:
    on = textgen.TextGenerate.widgets_from_ui(["a lighthouse", 512, "on", 0.7, 64, 0.95, 0.05, 1.05, 0, 0.0, True,
                                               False])
    assert on == {"prompt": "a lighthouse", "max_length": 512, "sampling_mode": "on",
                  "sampling_mode.temperature": 0.7, "sampling_mode.top_k": 64, "sampling_mode.top_p": 0.95,
                  "sampling_mode.min_p": 0.05, "sampling_mode.repetition_penalty": 1.05, "sampling_mode.seed": 0,
                  "sampling_mode.presence_penalty": 0.0, "thinking": True, "use_default_template": False}
    off = textgen.TextGenerate.widgets_from_ui(["a lighthouse", 256, "off", False, True])
    assert off == {"prompt": "a lighthouse", "max_length": 256, "sampling_mode": "off", "thinking": False,
                   "use_default_template": True}
    older = textgen.TextGenerate.widgets_from_ui(["x", 256, "on", 0.7, 64, 0.95, 0.05, 1.05, 7])
    assert older["sampling_mode.seed"] == 7 and "sampling_mode.presence_penalty" not in older
    assert textgen.TextGenerate.widgets_from_ui(["x", 256, "maybe"]) is None
