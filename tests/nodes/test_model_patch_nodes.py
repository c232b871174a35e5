"""The model patch nodes end to end on tiny random files in the released layouts: ModelPatchLoader reads
alibaba-pai's Z-Image Fun ControlNets (1.0, 2.1) and DiffSynth's blockwise Qwen-Image ControlNets (canny, inpaint);
ZImageFunControlnet and QwenImageDiffsynthControlnet give the model `ldm` patches it with the control context
ComfyUI's nodes form (checked against one built here by hand from the VAE's own encoding); the graphs sample; a
wrong pairing is refused at validation by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.controlnet_diffsynth import (
    TINY_DIFFSYNTH_CONTROLNET,
    with_diffsynth_control,
    write_tiny_diffsynth_controlnet,
)
from ldm.controlnet_z_image import with_fun_control, write_tiny_z_image_fun_controlnet
from ldm.flux_files import FLUX_VAE, LATENT_SHIFT
from ldm.qwen_image_presets import make_qwen_image_files
from ldm.wan_files import WAN21_MEAN, WAN21_STD
from ldm.z_image_files import TINY_Z_IMAGE
from ldm.z_image_presets import make_z_image_files
from nodes.folders import FolderPaths, get_paths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT = 64, 48  # the hint image's size too: no resizing, so the hand-built context is the VAE's encoding


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_patches")
    models = root / "models"
    z_image = make_z_image_files(models, seed=3, dtype=torch.float32)
    qwen = make_qwen_image_files(models, seed=4, dtype=torch.float32)
    patches = models / "model_patches"
    write_tiny_z_image_fun_controlnet(patches / "zfun-1.0.safetensors", TINY_Z_IMAGE, seed=5, version="1.0",
                                      dtype=torch.float32)
    write_tiny_z_image_fun_controlnet(patches / "zfun-2.1.safetensors", TINY_Z_IMAGE, seed=6, version="2.1",
                                      dtype=torch.float32)
    write_tiny_diffsynth_controlnet(patches / "qwen_canny_diffsynth.safetensors", TINY_DIFFSYNTH_CONTROLNET, seed=7,
                                    dtype=torch.float32)
    write_tiny_diffsynth_controlnet(patches / "qwen_inpaint_diffsynth.safetensors", TINY_DIFFSYNTH_CONTROLNET,
                                    seed=8, inpaint=True, dtype=torch.float32)
    (patches / "not_a_patch.safetensors").write_bytes(z_image["unet"].read_bytes())
    (root / "input").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "input" / "hint.png")
    rgba = np.concatenate([pixels, np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=-1)
    rgba[10:30, 20:50, 3] = 0  # LoadImage's mask: 1 where transparent, the part to repaint
    Image.fromarray(rgba).save(root / "input" / "masked.png")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), {"z_image": z_image, "qwen": qwen}
    set_paths(FolderPaths())


def graph(files: dict, family: str, patch_node: str, patch: str, **inputs) -> dict:
    """A model, its VAE, a model patch applied by `patch_node`, sampled by a KSampler at cfg 1."""
    text = {"z_image": ("qwen3", "lumina2"), "qwen": ("qwen25vl", "qwen_image")}[family]
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files[family]["unet"].name,
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": files[family]["vae"].name}},
        "3": {"class_type": "ModelPatchLoader", "inputs": {"name": patch}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "5": {"class_type": patch_node, "inputs": {"model": ["1", 0], "model_patch": ["3", 0], "vae": ["2", 0],
                                                   "strength": 0.8, **inputs}},
        "6": {"class_type": "CLIPLoader", "inputs": {"clip_name": files[family][text[0]].name, "type": text[1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["6", 0], "text": "a lighthouse"}},
        "8": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["7", 0], "negative": ["7", 0], "latent_image": ["8", 0], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["2", 0]}},
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
    }
    if "image" not in inputs and patch_node == "QwenImageDiffsynthControlnet":
        doc["5"]["inputs"]["image"] = ["4", 0]
    return doc


def values(engine: Executor, doc: dict, *keep: str) -> list:
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def picture(name: str) -> torch.Tensor:
    """An input picture as the VAE takes it: [1, 3, H, W] in -1..1."""
    with Image.open(get_paths().input / name) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(rgb).movedim(-1, 0)[None] * 2 - 1


def same_output(patched: torch.nn.Module, expected: torch.nn.Module, context_dim: int) -> None:
    """Both models' velocities for one latent, level and prompt agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=g)
    context = torch.randn(1, 7, context_dim, generator=g)
    t = torch.tensor([0.6])
    with torch.no_grad():
        ours, theirs = patched(x, t, context), expected(x, t, context)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_z_image_fun_controlnet_patches_with_the_control_images_latents(base) -> None:
    engine, files = base
    doc = graph(files, "z_image", "ZImageFunControlnet", "zfun-1.0.safetensors", image=["4", 0])
    model, vae, patch, patched = values(engine, doc, "1", "2", "3", "5")
    with torch.no_grad():
        latents = (vae.vae.encode(picture("hint.png")).mode() - LATENT_SHIFT) * FLUX_VAE.scaling_factor
    expected = with_fun_control(model.unet, patch.model, lambda h, w, device: latents, 0.8)
    same_output(patched.unet, expected, TINY_Z_IMAGE.cap_feat_dim)
    assert patch.kind == "z_image_fun" and not patch.model.inpaints
    assert "zfun-1.0.safetensors" in patched.loras


def test_z_image_fun_controlnet_inpaints_with_the_masked_picture(base) -> None:
    """A 2.x file: [control latents, keep mask, latents of the picture with its repainted part grey]."""
    engine, files = base
    doc = graph(files, "z_image", "ZImageFunControlnet", "zfun-2.1.safetensors", image=["4", 0],
                inpaint_image=["10", 0], mask=["10", 1])
    doc["10"] = {"class_type": "LoadImage", "inputs": {"image": "masked.png"}}
    model, vae, patch, patched = values(engine, doc, "1", "2", "3", "5")
    keep = torch.ones(1, 1, HEIGHT, WIDTH)
    keep[..., 10:30, 20:50] = 0
    pixels = picture("masked.png") * keep  # grey (0 in -1..1) where repainted
    with torch.no_grad():
        def latents(x: torch.Tensor) -> torch.Tensor:
            return (vae.vae.encode(x).mode() - LATENT_SHIFT) * FLUX_VAE.scaling_factor

        small_keep = torch.nn.functional.interpolate(keep, size=(HEIGHT // 8, WIDTH // 8), mode="nearest")
        context = torch.cat([latents(picture("hint.png")), small_keep, latents(pixels)], dim=1)
    expected = with_fun_control(model.unet, patch.model, lambda h, w, device: context, 0.8)
    same_output(patched.unet, expected, TINY_Z_IMAGE.cap_feat_dim)


def test_qwen_image_diffsynth_controlnet_patches_with_the_hints_normalised_latents(base) -> None:
    engine, files = base
    for name, inputs in (("qwen_canny_diffsynth.safetensors", {}),
                         ("qwen_inpaint_diffsynth.safetensors", {"mask": ["10", 1]})):
        doc = graph(files, "qwen", "QwenImageDiffsynthControlnet", name, **inputs)
        doc["10"] = {"class_type": "LoadImage", "inputs": {"image": "masked.png"}}
        model, vae, patch, patched = values(engine, doc, "1", "2", "3", "5")
        shape = (1, -1, 1, 1)
        with torch.no_grad():
            raw = vae.vae.encode(picture("hint.png")[:, :, None]).mode()[:, :, 0]
            hint = (raw - torch.tensor(WAN21_MEAN).reshape(shape)) / torch.tensor(WAN21_STD).reshape(shape)
        if inputs:  # the keep mask, bilinear at the latent's size
            keep = torch.ones(1, 1, HEIGHT, WIDTH)
            keep[..., 10:30, 20:50] = 0
            small = torch.nn.functional.interpolate(keep, size=(HEIGHT // 8, WIDTH // 8), mode="bilinear",
                                                    align_corners=False)
            hint = torch.cat([hint, small], dim=1)
        expected = with_diffsynth_control(model.unet, patch.model, lambda h, w, device, hint=hint: hint, 0.8)
        same_output(patched.unet, expected, 32)


def test_the_graphs_sample_and_strength_zero_changes_nothing(base) -> None:
    engine, files = base
    for family, node, name, inputs in (("z_image", "ZImageFunControlnet", "zfun-1.0.safetensors",
                                        {"image": ["4", 0]}),
                                       ("qwen", "QwenImageDiffsynthControlnet", "qwen_canny_diffsynth.safetensors",
                                        {})):
        doc = graph(files, family, node, name, **inputs)
        [guided] = values(engine, doc, "9")
        doc["5"]["inputs"]["strength"] = 0.0
        [off] = values(engine, doc, "9")
        doc["9"]["inputs"]["model"] = ["1", 0]
        [plain] = values(engine, doc, "9")
        assert torch.equal(off["samples"], plain["samples"])
        assert (guided["samples"] - plain["samples"]).abs().max() > 1e-3


def test_wrong_pairings_are_refused_by_name(base) -> None:
    engine, files = base
    doc = graph(files, "z_image", "QwenImageDiffsynthControlnet", "qwen_canny_diffsynth.safetensors")
    with pytest.raises(WorkflowInvalid, match="qwen_canny_diffsynth.safetensors is a DiffSynth blockwise ControlNet "
                                              "for Qwen-Image; the MODEL linked is Z_IMAGE"):
        engine.run(parse_api(doc))
    doc = graph(files, "qwen", "ZImageFunControlnet", "qwen_canny_diffsynth.safetensors", image=["4", 0])
    with pytest.raises(WorkflowInvalid, match="ZImageFunControlnet applies a Z-Image Fun ControlNet"):
        engine.run(parse_api(doc))
    doc = graph(files, "z_image", "ZImageFunControlnet", "zfun-1.0.safetensors")  # no image at all
    result = engine.run(parse_api(doc), keep=["5"])
    assert not result.ok and "needs an image" in str(result.error)
    doc = graph(files, "z_image", "ZImageFunControlnet", "not_a_patch.safetensors", image=["4", 0])
    result = engine.run(parse_api(doc), keep=["3"])
    assert not result.ok and "not a model patch this engine runs" in str(result.error)


def test_a_diffsynth_inpaint_hint_spreads_one_mask_or_image_over_the_others() -> None:
    from nodes.sd.model_patch import diffsynth_context

    def latents_of(count: int):
        return lambda image, height, width: torch.zeros(count, 16, height, width)

    masks = torch.zeros(2, 1, 16, 16)
    masks[1] = 1
    context = diffsynth_context(latents_of(1), None, masks, 1)(2, 2, torch.device("cpu"))
    assert context.shape == (2, 17, 2, 2) and context[0, 16].eq(0).all() and context[1, 16].eq(1).all()
    with pytest.raises(ValueError, match="2 hint images and 3 masks"):
        diffsynth_context(latents_of(2), None, torch.zeros(3, 1, 16, 16), 1)(2, 2, torch.device("cpu"))
