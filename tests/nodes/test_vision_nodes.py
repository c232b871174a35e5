"""Image prompts through the engine as ComfyUI writes them: an unCLIP workflow end to end on a tiny random unCLIP
checkpoint in the real key layout, CLIP vision files, T2I-Adapter style models, and the errors of wrong files."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import load_checkpoint
from ldm.clip_vision import ClipVisionOutput
from ldm.presets import make_checkpoint
from ldm.style_model import StyleAdapter, StyleAdapterConfig
from ldm.unclip import make_unclip_checkpoint, unclip_adm
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.models import DiffusionModel
from nodes.sd.sampling import _with_adm
from tests.ldm.test_clip_vision import _randomize, _reference
from tests.nodes.test_device_options import txt2img


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    checkpoints = root / "models" / "checkpoints"
    make_unclip_checkpoint(checkpoints / "tiny-unclip.safetensors", seed=1)
    make_checkpoint("tiny-sd1", checkpoints / "tiny.safetensors", seed=2)
    vision = root / "models" / "clip_vision"
    vision.mkdir(parents=True)
    safetensors.torch.save_file(_reference(seed=3).state_dict(), vision / "vit-tiny.safetensors")
    safetensors.torch.save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)},
                                vision / "not-vision.safetensors")
    styles = root / "models" / "style_models"
    styles.mkdir(parents=True)
    adapter = _randomize(StyleAdapter(StyleAdapterConfig(width=32, context_dim=32)), seed=4)
    torch.save(adapter.state_dict(), styles / "t2iadapter_style_tiny.pth")
    torch.save(_randomize(StyleAdapter(StyleAdapterConfig(width=32, context_dim=24)), seed=5).state_dict(),
               styles / "style_for_another_width.pth")
    (root / "input").mkdir()
    for name, colour, box in (("red.png", "red", (4, 4, 40, 30)), ("blue.png", "blue", (20, 10, 60, 44))):
        picture = Image.new("RGB", (64, 48), "white")
        ImageDraw.Draw(picture).ellipse(box, fill=colour)
        picture.save(root / "input" / name)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def unclip_workflow(strength: float = 1.0, noise_augmentation: float = 0.0, picture: str = "red.png",
                    ckpt: str = "tiny-unclip.safetensors") -> dict:
    """unCLIPCheckpointLoader -> CLIPVisionEncode -> unCLIPConditioning -> KSampler -> VAEDecode -> SaveImage."""
    graph = txt2img(loader={"class_type": "unCLIPCheckpointLoader", "inputs": {"ckpt_name": ckpt}})
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "unclip"}}
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": picture}}
    graph["11"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["4", 3], "image": ["10", 0],
                                                                "crop": "center"}}
    graph["12"] = {"class_type": "unCLIPConditioning", "inputs": {
        "conditioning": ["6", 0], "clip_vision_output": ["11", 0], "strength": strength,
        "noise_augmentation": noise_augmentation}}
    graph["3"]["inputs"]["positive"] = ["12", 0]
    return graph


@pytest.fixture(scope="module")
def engine(base):
    """One engine for the module: each checkpoint loads once."""
    return Executor(builtin_registry(), services=Services.create(base, force_cpu=True))


def run(engine: Executor, graph: dict, keep: tuple[str, ...] = ("8",)):
    return engine.run(parse_api(graph), keep=list(keep))


def image(engine: Executor, graph: dict) -> torch.Tensor:
    result = run(engine, graph)
    assert result.ok, result.error
    return result.values["8"][0]


def test_an_unclip_workflow_runs_end_to_end_and_follows_its_image(base, engine):
    result = run(engine, unclip_workflow(), keep=("8", "11", "4", "10"))
    assert result.ok, result.error
    picture = result.values["8"][0]
    assert picture.shape == (1, 64, 64, 3) and picture.isfinite().all()
    saved = sorted((base.output).glob("unclip_*.png"))
    assert saved and Image.open(saved[-1]).size == (64, 64)
    encoded = result.values["11"][0]
    assert isinstance(encoded, ClipVisionOutput) and encoded["image_embeds"].shape == (1, 16)
    assert encoded.last_hidden_state.shape == encoded.penultimate_hidden_states.shape == (1, 17, 32)
    # A plugin calling the CLIP_VISION value as ComfyUI's (clip_vision.encode_image) gets the same encoding.
    again = result.values["4"][3].encode_image(result.values["10"][0])
    torch.testing.assert_close(again.image_embeds, encoded.image_embeds)
    fresh = Executor(builtin_registry(), services=Services.create(base, force_cpu=True))
    assert torch.equal(image(fresh, unclip_workflow()), picture)  # seeded: the same image again
    for other in (unclip_workflow(strength=0.0), unclip_workflow(picture="blue.png"),
                  unclip_workflow(noise_augmentation=0.9)):
        assert (image(engine, other) - picture).abs().max() > 1e-3


def test_y_is_built_from_each_entrys_image_prompts_and_zeros_without(base):
    loaded = load_checkpoint(base.base / "models" / "checkpoints" / "tiny-unclip.safetensors")
    model = DiffusionModel(loaded.unet, loaded.family, "tiny-unclip", noise_augmentor=loaded.noise_augmentor)
    embeds = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    output = ClipVisionOutput(torch.zeros(1, 17, 32), embeds, torch.zeros(1, 17, 32))
    prompt = {"clip_vision_output": output, "strength": 0.8, "noise_augmentation": 0.25}
    conditioning = [(torch.zeros(1, 77, 32), {"unclip_conditioning": [prompt, prompt]}), (torch.zeros(1, 77, 32), {})]
    y = [options["y"] for _, options in _with_adm(conditioning, model, torch.zeros(1, 4, 8, 8), seed=7)]
    torch.testing.assert_close(y[0], unclip_adm([(embeds, 0.8, 0.25)] * 2, loaded.noise_augmentor, seed=7))
    assert torch.equal(y[1], torch.zeros(1, 32))


def test_unclip_conditioning_on_another_model_is_ignored_with_a_warning(engine, caplog):
    graph = unclip_workflow()
    graph["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}}
    graph["13"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vit-tiny.safetensors"}}
    graph["11"]["inputs"]["clip_vision"] = ["13", 0]
    with caplog.at_level(logging.WARNING, logger="nodes.sd.vision"):
        prompted = image(engine, graph)
    assert "tiny.safetensors is not an unCLIP model: the image prompts of unCLIP Conditioning are ignored" in (
        caplog.text)
    assert torch.equal(prompted, image(engine, txt2img()))


def test_wrong_files_are_refused_by_name(engine):
    result = run(engine, unclip_workflow(ckpt="tiny.safetensors"))
    assert not result.ok and "tiny.safetensors is not an unCLIP checkpoint" in str(result.error)
    graph = style_workflow()
    graph["11"]["inputs"]["clip_name"] = "not-vision.safetensors"
    result = run(engine, graph)
    assert not result.ok and "not-vision.safetensors: not a CLIP vision model" in str(result.error)


def style_workflow(strength: float = 1.0, strength_type: str = "multiply",
                   style: str = "t2iadapter_style_tiny.pth") -> dict:
    graph = txt2img()
    graph.update({
        "10": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
        "11": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vit-tiny.safetensors"}},
        "12": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["11", 0], "image": ["10", 0],
                                                            "crop": "center"}},
        "13": {"class_type": "StyleModelLoader", "inputs": {"style_model_name": style}},
        "14": {"class_type": "StyleModelApply", "inputs": {
            "conditioning": ["6", 0], "style_model": ["13", 0], "clip_vision_output": ["12", 0],
            "strength": strength, "strength_type": strength_type}},
    })
    graph["3"]["inputs"]["positive"] = ["14", 0]
    return graph


def test_a_style_model_appends_its_tokens_to_the_prompt(engine, caplog):
    result = run(engine, style_workflow(), keep=("8", "12", "14", "6"))
    assert result.ok, result.error
    (prompt, _), = result.values["6"][0]
    (styled, _), = result.values["14"][0]
    adapter = _randomize(StyleAdapter(StyleAdapterConfig(width=32, context_dim=32)), seed=4)
    with torch.no_grad():
        tokens = adapter(result.values["12"][0].last_hidden_state)
    assert styled.shape == (1, 77 + 8, 32)
    assert torch.equal(styled[:, :77], prompt)
    torch.testing.assert_close(styled[:, 77:], tokens, rtol=1e-5, atol=1e-5)
    assert (result.values["8"][0] - image(engine, txt2img())).abs().max() > 1e-3
    half = run(engine, style_workflow(strength=0.5), keep=("14",)).values["14"][0][0][0]
    torch.testing.assert_close(half[:, 77:], 0.5 * tokens, rtol=1e-5, atol=1e-5)
    with caplog.at_level(logging.WARNING, logger="nodes.sd.vision"):
        biased = run(engine, style_workflow(strength=0.5, strength_type="attn_bias"), keep=("14",)).values["14"][0]
    torch.testing.assert_close(biased[0][0][:, 77:], tokens, rtol=1e-5, atol=1e-5)
    assert "attn_bias weighs the style tokens in attention masks, which the SD UNet has none of" in caplog.text


def test_a_style_model_for_another_width_or_an_unknown_file_is_refused(base, engine):
    result = run(engine, style_workflow(style="style_for_another_width.pth"))
    assert not result.ok and "makes 24-wide tokens and the prompt is 32 wide" in str(result.error)
    unknown = base.base / "models" / "style_models" / "unknown.safetensors"
    safetensors.torch.save_file({"conv_in.weight": torch.zeros(4, 4)}, unknown)
    try:
        result = run(engine, style_workflow(style="unknown.safetensors"))
    finally:
        unknown.unlink()
    assert not result.ok and "unknown.safetensors: not a style model this engine knows" in str(result.error)


def test_the_nodes_declare_comfyuis_inputs():
    registry = builtin_registry()

    def inputs(name: str) -> dict:
        return registry.get(name).object_info()["input"]["required"]

    assert list(inputs("CLIPVisionEncode")) == ["clip_vision", "image", "crop"]
    assert inputs("CLIPVisionEncode")["crop"][0] == ["center", "none"]
    unclip = inputs("unCLIPConditioning")
    assert list(unclip) == ["conditioning", "clip_vision_output", "strength", "noise_augmentation"]
    assert {k: unclip["strength"][1][k] for k in ("default", "min", "max", "step")} == \
        {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
    assert {k: unclip["noise_augmentation"][1][k] for k in ("default", "min", "max")} == \
        {"default": 0.0, "min": 0.0, "max": 1.0}
    style = inputs("StyleModelApply")
    assert list(style) == ["conditioning", "style_model", "clip_vision_output", "strength", "strength_type"]
    assert style["strength_type"][0] == ["multiply", "attn_bias"]
    assert registry.get("unCLIPCheckpointLoader").object_info()["output"] == ["MODEL", "CLIP", "VAE",
                                                                                 "CLIP_VISION"]
    assert list(inputs("CLIPVisionLoader")) == ["clip_name"]
    assert list(inputs("StyleModelLoader")) == ["style_model_name"]


def test_display_names_and_categories_are_comfyuis():
    registry = builtin_registry()
    shown = {name: (registry.get(name).object_info()["display_name"], registry.get(name).object_info()["category"])
             for name in ("CLIPVisionLoader", "CLIPVisionEncode", "unCLIPConditioning", "unCLIPCheckpointLoader",
                          "StyleModelLoader", "StyleModelApply")}
    # unCLIPConditioning and unCLIPCheckpointLoader have no display name in ComfyUI: its editor shows the class name.
    assert shown == {"CLIPVisionLoader": ("Load CLIP Vision", "loaders"),
                     "CLIPVisionEncode": ("CLIP Vision Encode", "conditioning"),
                     "unCLIPConditioning": ("unCLIPConditioning", "conditioning"),
                     "unCLIPCheckpointLoader": ("unCLIPCheckpointLoader", "loaders"),
                     "StyleModelLoader": ("Load Style Model", "loaders"),
                     "StyleModelApply": ("Apply Style Model", "conditioning/style_model")}


def test_a_truncated_clip_vision_file_is_named_as_such(base, engine):
    vision = base.base / "models" / "clip_vision"
    (vision / "cut.safetensors").write_bytes((vision / "vit-tiny.safetensors").read_bytes()[:300])
    graph = style_workflow()
    graph["11"]["inputs"]["clip_name"] = "cut.safetensors"
    try:
        result = run(engine, graph)
    finally:
        (vision / "cut.safetensors").unlink()
    assert not result.ok and result.error.node_id == "11"
    assert "cut.safetensors: unreadable or truncated safetensors file" in result.error.exception_message
