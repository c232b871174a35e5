"""Inpainting models (9 input channels): their UNet against diffusers', what the sampler feeds them beside the
latent, and the two ways ComfyUI workflows use them (VAEEncodeForInpaint, InpaintModelConditioning)."""

import dataclasses

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.presets import PRESETS, make_checkpoint, randomize_
from ldm.unet import UNetModel
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.inpaint import GREY_LATENT
from tests.ldm.diffusers_reference import diffusers_unet, rel_err

INPAINT = dataclasses.replace(PRESETS["tiny-sd1"][2], in_channels=9, num_heads=8)


def test_inpainting_unet_matches_diffusers():
    unet = randomize_(UNetModel(INPAINT), torch.Generator().manual_seed(0)).eval()
    reference = diffusers_unet(INPAINT, unet.state_dict())
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 9, 8, 8, generator=g), torch.randn(2, 7, INPAINT.context_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        assert rel_err(unet(x, t, context), reference(x, t, encoder_hidden_states=context).sample) < 1e-4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint_models")
    original = PRESETS["tiny-sd1"]
    PRESETS["tiny-sd1"] = (original[0], original[1], dataclasses.replace(original[2], in_channels=9), original[3])
    try:
        make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "inpaint.safetensors", seed=1)
    finally:
        PRESETS["tiny-sd1"] = original
    PRESETS["tiny-sd1"] = (original[0], original[1], dataclasses.replace(original[2], in_channels=6), original[3])
    try:  # 8 would be InstructPix2Pix's (nodes.sd.concat_models)
        make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "six.safetensors", seed=1)
    finally:
        PRESETS["tiny-sd1"] = original
    from PIL import Image

    (root / "input").mkdir()
    picture = Image.new("RGBA", (64, 64), (200, 40, 40, 255))
    for x in range(32, 64):  # the right half transparent: LoadImage's mask is 1 there
        for y in range(64):
            picture.putpixel((x, y), (200, 40, 40, 0))
    picture.save(root / "input" / "half.png")
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def graph(latent: dict, ckpt: str = "inpaint.safetensors", positive=("2", 0), negative=("3", 0)) -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
            "4": {"class_type": "LoadImage", "inputs": {"image": "half.png"}},
            "5": latent,
            "6": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 3, "steps": 3, "cfg": 5.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": list(positive), "negative": list(negative),
                "latent_image": ["5", 0] if latent["class_type"] != "InpaintModelConditioning" else ["5", 2],
                "denoise": 1.0}},
            "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}


@pytest.fixture
def unet_inputs(monkeypatch):
    """Every input the UNet is called with."""
    seen = []
    forward = UNetModel.forward

    def spy(self, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", spy)
    return seen


def run(engine, nodes: dict, *keep: str) -> list:
    result = engine.run(parse_api(nodes), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k] for k in keep]


def test_vae_encode_for_inpaint_feeds_the_mask_and_greyed_latent_and_keeps_the_rest(engine, unet_inputs):
    encode = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["4", 0], "vae": ["1", 2], "mask": ["4", 1],
                                                               "grow_mask_by": 0}}
    (latent,), (sampled,) = run(engine, graph(encode), "5", "6")
    mask = latent["noise_mask"].reshape(1, 1, 64, 64)[:, :, ::8, ::8]  # 0 left, 1 right: exact at 1/8 size
    extra = unet_inputs[-1][:, 4:]
    assert extra.shape == (2, 5, 8, 8)  # positive and negative rows, one call
    assert torch.equal(extra[:, :1], mask.expand(2, -1, -1, -1))
    torch.testing.assert_close(extra[:, 1:], (latent["samples"] * 0.18215).expand(2, -1, -1, -1))
    # Unmasked: the input (to the rounding of scaling into the model's space and back); masked: repainted.
    torch.testing.assert_close(sampled["samples"][..., :4], latent["samples"][..., :4], rtol=1e-6, atol=1e-7)
    assert (sampled["samples"][..., 4:] - latent["samples"][..., 4:]).abs().max() > 0.1


def test_inpaint_model_conditioning(engine, unet_inputs):
    node = {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2], "pixels": ["4", 0], "mask": ["4", 1],
        "noise_mask": True}}
    nodes = graph(node, positive=("5", 0), negative=("5", 1))
    nodes["9"] = {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["4", 0], "vae": ["1", 2],
                                                                 "mask": ["4", 1], "grow_mask_by": 0}}
    nodes["10"] = {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}
    (positive, negative, latent), (sampled,), (greyed_latent,) = run(engine, nodes, "5", "6", "9")
    greyed = positive[0][1]["concat_latent_image"]
    assert torch.equal(greyed, greyed_latent["samples"])  # the masked half greyed out, as VAEEncodeForInpaint does
    assert torch.equal(negative[0][1]["concat_latent_image"], greyed)
    assert not torch.equal(greyed, latent["samples"])  # and the latent to sample is the whole image's
    extra = unet_inputs[-1][:, 4:]
    assert torch.equal(extra[:, :1], latent["noise_mask"][:, :, ::8, ::8].round().expand(2, -1, -1, -1))
    torch.testing.assert_close(extra[:, 1:], (greyed * 0.18215).expand(2, -1, -1, -1))
    torch.testing.assert_close(sampled["samples"][..., :4], latent["samples"][..., :4], rtol=1e-6, atol=1e-7)
    # Without the noise mask the whole latent is sampled, still with the mask and greyed image beside it.
    node["inputs"]["noise_mask"] = False
    [(whole,)] = run(engine, graph(node, positive=("5", 0), negative=("5", 1)), "6")
    assert (whole["samples"][..., :4] - latent["samples"][..., :4]).abs().max() > 0.1
    torch.testing.assert_close(unet_inputs[-1][:, 5:], (greyed * 0.18215).expand(2, -1, -1, -1))


def test_txt2img_with_an_inpainting_model_sees_a_grey_image_and_no_mask(engine, unet_inputs):
    empty = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    [(sampled,)] = run(engine, graph(empty), "6")
    extra = unet_inputs[-1][:, 4:]
    assert torch.equal(extra[:, 0], torch.ones(2, 8, 8))
    assert torch.equal(extra[:, 1:, 0, 0], torch.tensor([GREY_LATENT, GREY_LATENT]))
    assert torch.isfinite(sampled["samples"]).all()


def test_a_unet_with_other_extra_channels_is_refused_clearly(engine):
    empty = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    result = engine.run(parse_api(graph(empty, ckpt="six.safetensors")), keep=["6"])
    assert not result.ok and "takes 6 input channels" in str(result.error)
