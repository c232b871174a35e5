"""Regressions from the audit of ComfyUI's Wan and LTX-Video workflow files (session 15): the built-in nodes they
use that Loom lacks are named as ComfyUI's, not as a custom pack's; a latent of the wrong family says which node
makes the right one; the workflow a saved MP4 or WebM carries loads back."""

import pytest
import torch

from executor.executor import Executor
from graph.document import DocumentError, parse_api
from graph.load import graph_from_data, load_workflow_data
from graph.validate import validate
from ldm.wan_files import WanFamily, tiny_wan_config
from nodes.comfy_compat import COMFY_CORE_NODES_MISSING
from nodes.context import NodeContext
from nodes.registry import builtin_registry
from nodes.sd.models import DiffusionModel
from nodes.sd.video import CreateVideo, SaveVideo, SaveWEBM
from tests.nodes.test_video_nodes import PROMPT, WORKFLOW, clip, folders, run  # noqa: F401 (folders: a fixture)

BUILT_IN = "it is one of ComfyUI's built-in nodes, which Loom does not provide yet"


@pytest.fixture(scope="module")
def builtins():
    return builtin_registry()


@pytest.mark.parametrize("class_type", sorted(COMFY_CORE_NODES_MISSING))
def test_the_video_workflows_missing_built_ins_are_named_as_comfyuis(builtins, class_type):
    """ComfyUI_examples' wan/vace_reference_to_video.json, wan/camera_image_to_video_wan_example.json and
    ltxv/ltxv_image_to_video.0.9.5.json, and the Wan 2.2 14B i2v template, were told a custom node pack might
    provide these nodes (and WanVaceToVideo that Loom's WanImageToVideo might be meant). (Those, LTXVPreprocess,
    WanVaceToVideo, LTXVAddGuide, LTXVCropGuides, WanCameraEmbedding and WanCameraImageToVideo, are all Loom's now:
    the built-ins still missing are checked.)"""
    api = {"1": {"class_type": class_type, "inputs": {}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    [problem] = validate(parse_api(api), builtins).problems
    assert problem.node_id == "1" and problem.details == f"Node ID '#1'; {BUILT_IN}"


def test_a_switch_inside_the_wan22_i2v_templates_subgraph_runs(builtins):
    """Comfy-Org/workflow_templates' video_wan2_2_14B_i2v.json: a subgraph whose ComfySwitchNode picks the
    4-step LoRA model or the plain one by a boolean. Validation named it as a built-in Loom lacked, by its path
    129:116; it now runs there, under that id."""
    sub = {"id": "84e2cf3f-de93-40ef-ab22-b9375296917b", "name": "Image to Video (Wan2.2)",
           "inputNode": {"id": -10}, "outputNode": {"id": -20},
           "inputs": [], "outputs": [{"id": "o", "name": "output", "type": "BOOLEAN", "linkIds": [3]}],
           "nodes": [{"id": 131, "type": "PrimitiveBoolean", "mode": 0, "inputs": [],
                      "outputs": [{"name": "BOOLEAN", "type": "BOOLEAN", "links": [1, 2]}], "widgets_values": [True]},
                     {"id": 116, "type": "ComfySwitchNode", "mode": 0,
                      "inputs": [{"name": "on_false", "type": "BOOLEAN", "link": 1},
                                 {"name": "on_true", "type": "BOOLEAN", "link": 2},
                                 {"name": "switch", "type": "BOOLEAN", "widget": {"name": "switch"}, "link": None}],
                      "outputs": [{"name": "output", "type": "BOOLEAN", "links": [3]}], "widgets_values": [False]}],
           "links": [{"id": 1, "origin_id": 131, "origin_slot": 0, "target_id": 116, "target_slot": 0},
                     {"id": 2, "origin_id": 131, "origin_slot": 0, "target_id": 116, "target_slot": 1},
                     {"id": 3, "origin_id": 116, "origin_slot": 0, "target_id": -20, "target_slot": 0}]}
    ui = {"nodes": [{"id": 129, "type": sub["id"], "mode": 0, "inputs": [],
                     "outputs": [{"name": "output", "type": "BOOLEAN", "links": [10]}]},
                    {"id": 108, "type": "PreviewAny", "mode": 0,
                     "inputs": [{"name": "source", "type": "*", "link": 10}], "outputs": []}],
          "links": [[10, 129, 0, 108, 0, "BOOLEAN"]], "definitions": {"subgraphs": [sub]}, "version": 0.4}
    graph = graph_from_data(ui, builtins)
    assert validate(graph, builtins).ok
    result = Executor(builtins).run(graph)
    assert result.ok and "129:116" in result.executed and result.outputs["108"] == {"text": ["True"]}


def test_a_wan22_5b_model_given_a_16_channel_latent_names_the_node_that_makes_its_own():
    """A Wan 2.2 5B model (48-channel latents) sampling EmptyHunyuanLatentVideo's 16-channel latent (the Wan 2.1
    text-to-video workflow with the 5B file chosen) was told to use EmptyHunyuanLatentVideo."""
    model = DiffusionModel(unet=torch.nn.Identity(), family=WanFamily(tiny_wan_config("ti2v")),
                           source="wan2.2_ti2v_5B_fp16.safetensors")
    with pytest.raises(ValueError, match="48-channel video latents") as caught:
        model.latent_in(torch.zeros(1, 16, 3, 8, 8))
    assert "Wan22ImageToVideoLatent for Wan 2.2 5B" in str(caught.value)
    assert model.latent_in(torch.zeros(1, 48, 3, 4, 4)).shape == (1, 48, 3, 4, 4)


def test_the_workflow_in_a_saved_webm_or_mp4_loads_back(folders):  # noqa: F811
    """The videos ComfyUI's (and Loom's) SaveWEBM and SaveVideo write carry the workflow in their container's
    metadata, as the PNGs and WEBPs of the image savers do; `main.py run clip.mp4` answered "not valid JSON:
    'utf-32-be' codec can't decode bytes"."""
    run(SaveWEBM, images=clip(frames=2), filename_prefix="clip", codec="vp9", fps=8.0, crf=30.0)
    (video,) = CreateVideo().execute(images=clip(frames=2), fps=8.0)
    run(SaveVideo, video=video, filename_prefix="clip", format="mp4", codec="h264")
    assert load_workflow_data(folders.output / "clip_00001_.webm") == PROMPT  # Matroska's upper-cased PROMPT tag
    assert load_workflow_data(folders.output / "clip_00001_.mp4") == PROMPT


def test_a_video_without_a_workflow_or_not_a_video_says_so(folders):  # noqa: F811
    bare = CreateVideo().execute(images=clip(frames=2), fps=8.0)[0]
    node = SaveVideo()
    node.ctx = NodeContext()  # a run without a prompt (the Python API's): no metadata
    node.execute(video=bare, filename_prefix="bare", format="mp4", codec="h264")
    with pytest.raises(DocumentError, match="bare_00001_.mp4: this MP4 carries no workflow"):
        load_workflow_data(folders.output / "bare_00001_.mp4")
    broken = folders.output / "broken.mp4"
    broken.write_bytes(b"\0\0\0\x18ftypisom" + b"\0" * 40)
    with pytest.raises(DocumentError, match="broken.mp4: cannot read this MP4"):
        load_workflow_data(broken)
