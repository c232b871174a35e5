"""Upscale models against spandrel (the library ComfyUI loads them with), on identical weights, in every key
layout; tiled upscaling; the nodes end to end."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError
from ldm.upscale import tiled_upscale, upscale_model_from_state_dict


@pytest.fixture(scope="module")
def spandrel():
    """spandrel, importable without torchvision: two of its other architectures (LaMa, RestoreFormer) import
    names from torchvision at load time; ESRGAN and Compact use none of them, so stub modules stand in while
    spandrel imports, and are taken out again (other libraries probe for a real torchvision)."""
    try:
        import torchvision  # noqa: F401

        return pytest.importorskip("spandrel")
    except ImportError:
        pass
    vision, transforms, functional = (types.ModuleType(n) for n in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
    functional.InterpolationMode, functional.rotate, functional.normalize = object, None, None
    vision.transforms, transforms.functional = transforms, functional
    stubs = {module.__name__: module for module in (vision, transforms, functional)}
    sys.modules.update(stubs)
    try:
        return pytest.importorskip("spandrel")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight drawn afresh (small), so a wrong wiring cannot hide behind zero-initialised layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def image(height: int = 13, width: int = 17, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(5))


def old_to_new_esrgan_x4(sd: dict, blocks: int) -> dict:
    """The old ESRGAN keys of an x4 RRDBNet in Real-ESRGAN's names, written out for this one layout."""
    names = {"model.0": "conv_first", f"model.1.sub.{blocks}": "conv_body", "model.3": "conv_up1",
             "model.6": "conv_up2", "model.8": "conv_hr", "model.10": "conv_last"}
    out = {}
    for key, value in sd.items():
        layer, _, kind = key.rpartition(".")
        if layer.startswith("model.1.sub.") and ".RDB" in layer:
            _, _, _, block, rdb, conv, _ = layer.split(".")
            layer = f"body.{block}.{rdb.lower()}.{conv}"
        out[f"{names.get(layer, layer)}.{kind}"] = value
    return out


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_esrgan_old_layout_matches_spandrel(spandrel, scale):
    from spandrel.architectures.ESRGAN import ESRGAN

    reference = randomized(ESRGAN(num_filters=16, num_blocks=2, scale=scale), seed=scale)
    ours = upscale_model_from_state_dict(reference.state_dict(), "x.pth")
    assert ours.scale == scale and ours.architecture.startswith("ESRGAN")
    x = image()
    with torch.no_grad():
        expected = reference(x)
        assert expected.shape[-2:] == (13 * scale, 17 * scale)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_real_esrgan_layout_and_params_ema_wrapper_give_the_same_model(spandrel):
    from spandrel.architectures.ESRGAN import ESRGAN

    reference = randomized(ESRGAN(num_filters=16, num_blocks=2, scale=4), seed=1)
    new = {"params_ema": old_to_new_esrgan_x4(reference.state_dict(), blocks=2)}
    ours = upscale_model_from_state_dict(new, "RealESRGAN_x4plus.pth")
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_real_esrgan_x2_unshuffles_its_input_like_spandrel(spandrel):
    from spandrel.architectures.ESRGAN import ESRGAN

    reference = randomized(ESRGAN(in_nc=12, out_nc=3, num_filters=16, num_blocks=1, scale=4, shuffle_factor=2), 2)
    ours = upscale_model_from_state_dict(reference.state_dict(), "RealESRGAN_x2plus.pth")
    assert ours.scale == 2
    x = image(14, 18)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_compact_matches_spandrel(spandrel):
    from spandrel.architectures.Compact import Compact

    reference = randomized(Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4), seed=3)
    ours = upscale_model_from_state_dict(reference.state_dict(), "realesr-general-x4v3.pth")
    assert ours.scale == 4 and "compact" in ours.architecture
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_tiles_blend_to_the_untiled_result():
    """A pointwise "model" sees the same pixels in any tile: the blended tiles must give exactly one pass."""
    def model(x):
        return F.interpolate(x, scale_factor=2, mode="nearest") * 2 - 0.5

    x = image(50, 37)
    torch.testing.assert_close(tiled_upscale(model, x, 2, tile=16, overlap=4), model(x))


def test_files_that_are_not_upscalers_are_refused_by_name():
    with pytest.raises(CheckpointError, match="unet.pth is not an upscale model"):
        upscale_model_from_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "unet.pth")


def test_the_nodes_upscale_an_input_image(spandrel, tmp_path):
    from spandrel.architectures.ESRGAN import ESRGAN

    from executor.executor import Executor
    from executor.services import Services
    from graph.document import parse_api
    from nodes.folders import FolderPaths, set_paths
    from nodes.registry import builtin_registry

    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    reference = randomized(ESRGAN(num_filters=8, num_blocks=1, scale=2), seed=4)
    torch.save(reference.state_dict(), folder / "2x_tiny.pth")
    paths = FolderPaths(base=tmp_path)
    paths.seed_input_examples()
    set_paths(paths)
    try:
        engine = Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
        graph = {"1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "2x_tiny.pth"}},
                 "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
                 "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["1", 0],
                                                                         "image": ["2", 0]}},
                 "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
        result = engine.run(parse_api(graph), keep=["2", "3"])
        assert result.ok, result.error
        [source], [upscaled] = result.values["2"][0], result.values["3"][0]
        assert upscaled.shape == (source.shape[0] * 2, source.shape[1] * 2, 3)
        with torch.no_grad():  # the image is larger than a tile: the tiled result is near the one-pass one
            whole = reference(source[None].movedim(-1, 1)).clamp(0, 1).movedim(1, -1)[0]
        assert (upscaled - whole).abs().mean() < 0.01
        (folder / "broken.pth").write_bytes(b"not a model")
        graph["1"]["inputs"]["model_name"] = "broken.pth"
        result = engine.run(parse_api(graph))
        assert not result.ok and "broken.pth" in str(result.error)
    finally:
        set_paths(FolderPaths())


def test_real_esrgan_files_wrapped_in_params_ema_load_from_disk(spandrel, tmp_path):
    from spandrel.architectures.ESRGAN import ESRGAN

    from ldm.upscale import load_upscale_model

    reference = randomized(ESRGAN(num_filters=8, num_blocks=1, scale=4), seed=6)
    torch.save({"params_ema": old_to_new_esrgan_x4(reference.state_dict(), blocks=1), "params": {}},
               tmp_path / "RealESRGAN_x4plus.pth")
    loaded = load_upscale_model(tmp_path / "RealESRGAN_x4plus.pth")
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)


def test_nearly_right_files_get_one_clear_line(spandrel):
    from spandrel.architectures.ESRGAN import ESRGAN

    sd = randomized(ESRGAN(num_filters=8, num_blocks=1, scale=4), seed=7).state_dict()
    missing = {k: v for k, v in sd.items() if not k.startswith("model.10.")}
    with pytest.raises(CheckpointError, match="x.pth: .*(incomplete|do not fit)"):
        upscale_model_from_state_dict(missing, "x.pth")
    wrong = dict(sd, **{"model.8.weight": torch.zeros(8, 8, 5, 5)})
    with pytest.raises(CheckpointError, match="x.pth: the ESRGAN .* weights do not fit") as err:
        upscale_model_from_state_dict(wrong, "x.pth")
    assert "\n" not in str(err.value)
    gray = randomized(ESRGAN(in_nc=1, out_nc=1, num_filters=8, num_blocks=1, scale=4), seed=8).state_dict()
    with pytest.raises(CheckpointError, match="takes 1-channel images; only RGB"):
        upscale_model_from_state_dict(gray, "gray.pth")


def test_an_unshuffling_model_takes_an_image_smaller_than_its_fold(spandrel):
    from spandrel.architectures.ESRGAN import ESRGAN

    reference = randomized(ESRGAN(in_nc=12, out_nc=3, num_filters=8, num_blocks=1, scale=4, shuffle_factor=2), 9)
    ours = upscale_model_from_state_dict(reference.state_dict(), "x2.pth")
    with torch.no_grad():
        assert ours(image(1, 5)).shape == (1, 3, 2, 10)
