"""TextEncodeQwenImageEdit and TextEncodeQwenImageEditPlus through the engine with tiny Qwen2.5-VL and Wan 2.1 VAE
files in Comfy-Org's layouts: ComfyUI's declarations, the pictures' sizes, the prompt states (those ldm.qwen_vl gives
for the pictures as ComfyUI scales them; ldm.qwen_vl is matched to diffusers in tests/ldm/test_qwen_vl.py), the
reference latents (VAEEncode's of the scaled picture), and the refusals.

The reference latents' area is made small here (REFERENCE_AREA, a megapixel in ComfyUI: the tiny Wan VAE takes half
a minute per megapixel on two cores); the real sizes are checked on `scaled` itself."""

from __future__ import annotations

import math
import re

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.qwen_text import load_qwen_image_text_encoder, write_tiny_qwen25vl
from ldm.qwen_vl import EDIT_PLUS_TEMPLATE, PICTURE, VISION_BLOCK
from ldm.wan_vae_files import write_tiny_wan_vae
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd import qwen_image_edit
from nodes.sd.models import Clip
from nodes.sd.qwen_image_edit import PLUS_VISION_AREA, TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus, scaled

QWEN, TEXT_ONLY, VAE = ("qwen_2.5_vl_7b-tiny.safetensors", "qwen_2.5_vl_7b-text-only.safetensors",
                        "qwen_image_vae-tiny.safetensors")
PROMPT = "make the sky green"
SMALL_AREA = 128 * 96  # the reference latents' area in these runs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_edit")
    encoders, vaes, inputs = root / "models" / "text_encoders", root / "models" / "vae", root / "input"
    for folder in (encoders, vaes, inputs):
        folder.mkdir(parents=True)
    write_tiny_qwen25vl(encoders / QWEN, seed=4, dtype=torch.float32)
    state = safetensors.torch.load_file(encoders / QWEN)
    safetensors.torch.save_file({k: v for k, v in state.items() if not k.startswith("visual.")}, encoders / TEXT_ONLY)
    write_tiny_wan_vae(vaes / VAE, version="2.1", seed=2)
    generator = torch.Generator().manual_seed(0)
    for name, (height, width) in {"photo.png": (48, 64), "sketch.png": (60, 36)}.items():
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(inputs / name)
    return root


@pytest.fixture(scope="module")
def engine(root):
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


@pytest.fixture
def small_references(monkeypatch):
    monkeypatch.setattr(qwen_image_edit, "REFERENCE_AREA", SMALL_AREA)


def loaders(clip: str = QWEN) -> dict:
    return {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip, "type": "qwen_image"}},
            "2": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
            "3": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "4": {"class_type": "LoadImage", "inputs": {"image": "sketch.png"}}}


def vae_encode(doc: dict, node: str, image: str, width: int, height: int) -> None:
    """ComfyUI's way to a picture's latent: ImageScale ("area") then VAEEncode, as nodes `node` and `node`+"e"."""
    doc[node] = {"class_type": "ImageScale", "inputs": {"image": [image, 0], "upscale_method": "area", "width": width,
                                                        "height": height, "crop": "disabled"}}
    doc[node + "e"] = {"class_type": "VAEEncode", "inputs": {"pixels": [node, 0], "vae": ["2", 0]}}


def area_scaled(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """An IMAGE [B, H, W, C] resized as ComfyUI's common_upscale "area" does (torch's adaptive average pooling)."""
    return F.interpolate(image.movedim(-1, 1), size=(height, width), mode="area").movedim(1, -1).clamp(0, 1)


def run(engine, doc: dict, keep: list[str]) -> dict:
    """The values of the nodes `keep`, each shown by a PreviewAny."""
    shown = {f"show{k}": {"class_type": "PreviewAny", "inputs": {"source": [k, 0]}} for k in keep}
    result = engine.run(parse_api(doc | shown), keep=keep)
    assert result.ok, result.error
    return result.values


def test_declarations_are_comfyuis(engine) -> None:
    info = {name: engine.registry.get(name).object_info()
            for name in ("TextEncodeQwenImageEdit", "TextEncodeQwenImageEditPlus")}
    assert {n: (i["input_order"].get("required"), i["input_order"].get("optional"), i["output"])
            for n, i in info.items()} == {
        "TextEncodeQwenImageEdit": (["clip", "prompt"], ["vae", "image"], ["CONDITIONING"]),
        "TextEncodeQwenImageEditPlus": (["clip", "prompt"], ["vae", "image1", "image2", "image3"], ["CONDITIONING"])}
    assert info["TextEncodeQwenImageEdit"]["input"]["required"]["prompt"][1]["multiline"] is True


def test_sizes_are_comfyuis() -> None:
    """A megapixel for the reference latents (sides multiples of 8 for Plus), 384x384 for Plus' vision tower."""
    image = torch.rand(1, 48, 64, 3)
    scale = math.sqrt(1024 * 1024 / (64 * 48))
    assert scaled(image, 1024 * 1024).shape == (1, round(48 * scale), round(64 * scale), 3) == (1, 887, 1182, 3)
    assert scaled(image, 1024 * 1024, 8).shape == (1, 888, 1184, 3)
    assert scaled(image, PLUS_VISION_AREA).shape == (1, 333, 443, 3)
    torch.testing.assert_close(scaled(image, PLUS_VISION_AREA), area_scaled(image, 443, 333))


def test_edit_with_a_picture(engine, root, small_references) -> None:
    doc = loaders() | {"5": {"class_type": "TextEncodeQwenImageEdit", "inputs": {
        "clip": ["1", 0], "prompt": PROMPT, "vae": ["2", 0], "image": ["3", 0]}}}
    vae_encode(doc, "6", "3", 128, 96)
    values = run(engine, doc, ["3", "5", "6e"])
    [[(context, options)]], [photo, _mask] = values["5"], values["3"]
    [latent] = values["6e"]
    assert set(options) == {"attention_mask", "reference_latents"}
    [reference] = options["reference_latents"]
    assert reference.shape == (1, 16, 1, 12, 16) and torch.equal(reference, latent["samples"])
    encoder = load_qwen_image_text_encoder([root / "models" / "text_encoders" / QWEN]).encoder
    expected = encoder.encode([PROMPT], images=[area_scaled(photo, 128, 96)[0]])
    # 96 x 128 px -> the processor's 84 x 140: 6 x 10 patches, 15 merged; kept from <|vision_start|> on
    assert context.shape == (1, 1 + 15 + 1 + 4 + 5, 32)
    torch.testing.assert_close(context, expected.cond, atol=1e-5, rtol=1e-5)
    assert torch.equal(options["attention_mask"], expected.extra["attention_mask"])


def test_edit_without_a_picture_is_a_plain_qwen_image_prompt(engine) -> None:
    doc = loaders() | {"5": {"class_type": "TextEncodeQwenImageEdit", "inputs": {"clip": ["1", 0], "prompt": PROMPT,
                                                                                 "vae": ["2", 0]}},
                       "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": PROMPT}}}
    values = run(engine, doc, ["5", "6"])
    [[(context, options)]], [[(plain, _)]] = values["5"], values["6"]
    assert "reference_latents" not in options and torch.equal(context, plain)


def test_edit_plus_with_two_of_three_pictures(engine, root, small_references) -> None:
    doc = loaders() | {"5": {"class_type": "TextEncodeQwenImageEditPlus", "inputs": {
        "clip": ["1", 0], "prompt": PROMPT, "vae": ["2", 0], "image1": ["3", 0], "image3": ["4", 0]}}}
    scale = math.sqrt(SMALL_AREA / (36 * 60))  # the sketch's 36 x 60 px to SMALL_AREA, sides multiples of 8
    width, height = round(36 * scale / 8) * 8, round(60 * scale / 8) * 8
    assert (width, height) == (88, 144)
    vae_encode(doc, "6", "3", 128, 96)
    vae_encode(doc, "7", "4", width, height)
    values = run(engine, doc, ["3", "4", "5", "6e", "7e"])
    [[(context, options)]] = values["5"]
    first, second = options["reference_latents"]
    assert first.shape == (1, 16, 1, 12, 16) and second.shape == (1, 16, 1, height // 8, width // 8)
    assert torch.equal(first, values["6e"][0]["samples"]) and torch.equal(second, values["7e"][0]["samples"])
    pictures = []
    for image in (values["3"][0], values["4"][0]):  # 384 x 384 px for the vision tower
        s = math.sqrt(PLUS_VISION_AREA / (image.shape[1] * image.shape[2]))
        pictures.append(area_scaled(image, round(image.shape[2] * s), round(image.shape[1] * s))[0])
    encoder = load_qwen_image_text_encoder([root / "models" / "text_encoders" / QWEN]).encoder
    labelled = f"Picture 1: {VISION_BLOCK}Picture 3: {VISION_BLOCK}{PROMPT}"  # numbered by input, as ComfyUI does
    assert labelled == PICTURE.format(1) + PICTURE.format(3) + PROMPT
    expected = encoder.encode([labelled], images=pictures, template=EDIT_PLUS_TEMPLATE)
    torch.testing.assert_close(context, expected.cond, atol=1e-5, rtol=1e-5)


def test_edit_plus_without_vae_adds_no_references(engine) -> None:
    doc = loaders() | {"5": {"class_type": "TextEncodeQwenImageEditPlus", "inputs": {
        "clip": ["1", 0], "prompt": PROMPT, "image2": ["4", 0]}}}
    [[(context, options)]] = run(engine, doc, ["5"])["5"]
    assert set(options) == {"attention_mask"} and context.shape[0] == 1
    facts = engine.registry.get("TextEncodeQwenImageEditPlus").output_facts
    assert facts({}, {"clip": {"family": "qwen_image"}, "image2": {}}) == {0: {"family": "qwen_image"}}
    assert facts({}, {"clip": {"family": "qwen_image"}, "vae": {}, "image2": {}}) == {
        0: {"family": "qwen_image", "reference_latents": True}}


def test_a_text_encoder_without_vision_tower_is_refused(engine) -> None:
    doc = loaders(TEXT_ONLY) | {"5": {"class_type": "TextEncodeQwenImageEdit", "inputs": {
        "clip": ["1", 0], "prompt": PROMPT, "image": ["3", 0]}}}
    result = engine.run(parse_api(doc | {"6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}))
    assert not result.ok and f"{TEXT_ONLY} has no vision tower (visual.*)" in str(result.error)


def test_another_text_encoder_is_refused() -> None:
    """At validation from the CLIP's family, and at the run from the CLIP itself (before any encoding)."""
    needs = "needs Qwen-Image's text encoder, Qwen2.5-VL-7B (CLIPLoader type qwen_image); {} is WAN"
    for node in (TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus):
        assert node.check_links({}, {"clip": {"family": "wan"}}).endswith(needs.format("the CLIP linked"))
        assert node.check_links({}, {"clip": {"family": "qwen_image"}}) is None
    umt5 = Clip(encoder=torch.nn.Identity(), family_name="wan", source="umt5_xxl_fp16.safetensors")
    with pytest.raises(ValueError, match=re.escape(needs.format("umt5_xxl_fp16.safetensors"))):
        TextEncodeQwenImageEditPlus().execute(umt5, PROMPT)
