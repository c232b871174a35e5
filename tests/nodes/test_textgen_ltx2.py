"""TextGenerateLTX2Prompt on a tiny LTX-2 text encoder (ldm.ltx2_text's tiny Gemma 3): the text is ldm.textgen's
for LTX-2's enhancement prompt, stripped (the prompt itself when nothing is written), greedy and sampled; a linked
system prompt; the image (the first frame) read by a Gemma 3 with its vision tower, refused by one without; and
the LTX-2.3 templates' editor wiring (PrimitiveStringMultiline -> the node,
widgets [prompt, 256, "on", 0.7, 64, 0.95, 0.05, 1.05, 0]) run by the engine, the CLIP from a stand-in loader (the
LTX-2 text encoder loader is not this module's)."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.load import graph_from_data
from graph.ui_format import ui_to_api
from ldm.ltx2_text import FAMILY, ltx2_text_encoder_from_state_dicts, tiny_gemma3_state, tiny_projection_state
from ldm.textgen import Sampling, TextGenerationError, generate_text, ltx2_enhancement_prompt
from nodes.folders import FolderPaths, set_paths
from nodes.node import Node
from nodes.registry import builtin_registry
from nodes.sd import textgen
from nodes.sd.models import Clip
from nodes.sd.textgen import IMAGE_REFUSED, TextGenerateLTX2Prompt
from nodes.spec import Output

PROMPT = "a lighthouse at dusk"
WIDGETS = [PROMPT, 256, "on", 0.7, 64, 0.95, 0.05, 1.05, 0]  # video_ltx2_3_i2v.json's, the prompt put in
LENGTH = 6


@pytest.fixture(scope="module")
def encoder():
    state = tiny_gemma3_state(seed=5, hidden=32, layers=3)
    return ltx2_text_encoder_from_state_dicts(state, tiny_projection_state(seed=6, hidden=32, layers=3)).encoder


def run(encoder, **inputs) -> str:
    node = TextGenerateLTX2Prompt()
    node.ctx = None  # outside an engine: the CPU
    options = {"prompt": PROMPT, "max_length": LENGTH, "sampling_mode": "off"} | inputs
    (text,) = node.execute(Clip(encoder, FAMILY, "tiny"), **options)
    return text


def test_greedy_text_is_the_enhancement_prompts(encoder) -> None:
    text = run(encoder)
    assert text and text == generate_text(encoder, ltx2_enhancement_prompt(PROMPT), LENGTH).strip()
    assert text != generate_text(encoder, PROMPT, LENGTH).strip()  # not TextGenerate's


def test_sampled_text_follows_the_sampling_inputs(encoder) -> None:
    options = {f"sampling_mode.{k}": v for k, v in zip(textgen.SAMPLING_KEYS, (1.2, 8, 0.9, 0.0, 1.1, 4, 0.0),
                                                         strict=True)}
    text = run(encoder, sampling_mode="on", **options)
    sampling = Sampling(temperature=1.2, top_k=8, top_p=0.9, min_p=0.0, repetition_penalty=1.1, seed=4)
    assert text == generate_text(encoder, ltx2_enhancement_prompt(PROMPT), LENGTH, sampling).strip()


def test_a_linked_system_prompt_replaces_ltx2s(encoder) -> None:
    text = run(encoder, system_prompt="Write one short sentence.")
    chat = ltx2_enhancement_prompt(PROMPT, system_prompt="Write one short sentence.")
    assert text == generate_text(encoder, chat, LENGTH).strip()


def test_nothing_written_gives_the_prompt_back(encoder, monkeypatch) -> None:
    monkeypatch.setattr(textgen, "generate_text", lambda *args: " \n ")
    assert run(encoder) == PROMPT


def test_without_a_vision_tower_the_image_is_refused_clearly(encoder) -> None:
    with pytest.raises(TextGenerationError, match="needs Gemma 3's vision tower") as error:
        run(encoder, image=torch.zeros(1, 8, 8, 3))
    assert str(error.value) == IMAGE_REFUSED


@pytest.fixture(scope="module")
def seeing():
    state = tiny_gemma3_state(seed=5, hidden=32, layers=3, vision=True)
    return ltx2_text_encoder_from_state_dicts(state, tiny_projection_state(seed=6, hidden=32, layers=3)).encoder


def test_the_first_frame_makes_an_image_to_video_prompt(seeing) -> None:
    torch.manual_seed(2)
    frame = torch.rand(1, 64, 96, 3)
    text = run(seeing, image=frame)
    chat = ltx2_enhancement_prompt(PROMPT, image=True)
    assert text and text == generate_text(seeing, chat, LENGTH, image=frame).strip()
    assert text != run(seeing)  # not the text-to-video prompt's
    node = textgen.TextGenerate()
    node.ctx = None
    (plain,) = node.execute(Clip(seeing, FAMILY, "tiny"), PROMPT, LENGTH, "off", image=frame)
    assert plain == generate_text(seeing, PROMPT, LENGTH, image=frame)  # TextGenerate reads it too


class TinyLTX2Clip(Node):
    """A stand-in for the LTX-2 text encoder loader: the tiny encoder as a CLIP of family ltx2."""

    outputs = (Output("CLIP"),)
    encoder = None

    @classmethod
    def output_facts(cls, inputs, linked):
        return {0: {"family": FAMILY}}

    def execute(self) -> tuple[Clip]:
        return (Clip(self.encoder, FAMILY, "tiny"),)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, encoder):
    paths = FolderPaths(base=tmp_path_factory.mktemp("textgen_ltx2"))
    set_paths(paths)
    registry = builtin_registry()
    TinyLTX2Clip.encoder = encoder
    registry.register(TinyLTX2Clip, "test")
    yield Executor(registry, services=Services.create(paths, force_cpu=True))
    set_paths(FolderPaths())


def ui_workflow(max_length: int) -> dict:
    widgets = [PROMPT, max_length, *WIDGETS[2:]]
    return {
        "last_node_id": 4, "last_link_id": 3,
        "nodes": [
            {"id": 1, "type": "TinyLTX2Clip", "pos": [0, 0], "size": [200, 60], "mode": 0, "inputs": [],
             "outputs": [{"name": "CLIP", "type": "CLIP", "links": [1]}], "widgets_values": []},
            {"id": 2, "type": "PrimitiveStringMultiline", "pos": [0, 100], "size": [200, 100], "mode": 0,
             "inputs": [], "outputs": [{"name": "STRING", "type": "STRING", "links": [2]}],
             "widgets_values": [PROMPT]},
            {"id": 3, "type": "TextGenerateLTX2Prompt", "pos": [300, 0], "size": [400, 300], "mode": 0,
             "inputs": [{"name": "clip", "type": "CLIP", "link": 1},
                        {"name": "image", "shape": 7, "type": "IMAGE", "link": None},
                        {"name": "prompt", "type": "STRING", "widget": {"name": "prompt"}, "link": 2}],
             "outputs": [{"name": "generated_text", "type": "STRING", "links": [3]}], "widgets_values": widgets},
            {"id": 4, "type": "PreviewAny", "pos": [800, 0], "size": [200, 100], "mode": 0,
             "inputs": [{"name": "source", "type": "*", "link": 3}], "outputs": [], "widgets_values": []},
        ],
        "links": [[1, 1, 0, 3, 0, "CLIP"], [2, 2, 0, 3, 2, "STRING"], [3, 3, 0, 4, 0, "STRING"]],
    }


def test_the_templates_editor_wiring_runs(engine, encoder) -> None:
    api = ui_to_api(ui_workflow(LENGTH), engine.registry)
    assert api["3"]["inputs"] == {"clip": ["1", 0], "prompt": ["2", 0], "max_length": LENGTH, "sampling_mode": "on",
                                  "sampling_mode.temperature": 0.7, "sampling_mode.top_k": 64,
                                  "sampling_mode.top_p": 0.95, "sampling_mode.min_p": 0.05,
                                  "sampling_mode.repetition_penalty": 1.05, "sampling_mode.seed": 0,
                                  # the defaults of the inputs this older editor file lacks
                                  "sampling_mode.presence_penalty": 0.0, "thinking": False,
                                  "use_default_template": True}
    result = engine.run(graph_from_data(ui_workflow(LENGTH), engine.registry), keep=["3"])
    assert result.ok, result.error
    expected = generate_text(encoder, ltx2_enhancement_prompt(PROMPT), LENGTH, Sampling()).strip()
    assert result.values["3"] == (expected,) and result.outputs["4"] == {"text": [expected]}
