"""SPAN, SwinIR, HAT and DAT upscale models against spandrel (the library ComfyUI loads them with), on identical
weights in the files' key layouts: outputs, the detected scale, image sizes that need window padding; tiled
upscaling through the nodes; clear errors for files that are not quite right."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import CheckpointError
from ldm.upscale import load_upscale_model, tiled_upscale, upscale_model_from_state_dict
from tests.ldm import test_upscale
from tests.ldm.test_upscale import image, randomized

spandrel = test_upscale.spandrel  # the fixture that imports spandrel with torchvision stubbed

WINDOWED = [(16, 24), (13, 19)]  # a whole number of 4-pixel windows, and sizes that need padding


def randomized_with_stats(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`randomized`, and BatchNorm statistics that are not the identity (DAT's gates use them)."""
    module = randomized(module, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
    return module


def assert_matches(spandrel, reference: torch.nn.Module, sd: dict, name: str, sizes=WINDOWED) -> None:
    """Loom's model from `sd` gives the reference's output at each size (to 1e-5 of the output's magnitude: random
    weights give outputs up to ~15), and spandrel's scale and kind."""
    ours = upscale_model_from_state_dict(sd, "model.pth")
    described = spandrel.ModelLoader().load_from_state_dict(dict(sd))
    assert (ours.scale, ours.architecture) == (described.scale, name)
    for height, width in sizes:
        x = image(height, width)
        with torch.no_grad():
            expected = reference(x)
            assert expected.shape[-2:] == (height * ours.scale, width * ours.scale)
            torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5 * max(1.0, expected.abs().max()))


@pytest.mark.parametrize("scale, norm", [(4, True), (2, False)])
def test_span_matches_spandrel(spandrel, scale, norm):
    """The file's `eval_conv` is stale in training checkpoints: both fold the training branches instead."""
    from spandrel.architectures.SPAN import SPAN

    reference = randomized(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=scale, norm=norm), scale)
    assert_matches(spandrel, reference, reference.state_dict(), "SPAN", sizes=[(13, 17)])


SWINIR = {
    "classical x4": dict(upscale=4, upsampler="pixelshuffle"),
    "classical x3, 3conv": dict(upscale=3, upsampler="pixelshuffle", resi_connection="3conv"),
    "lightweight x2": dict(upscale=2, upsampler="pixelshuffledirect"),
    "real-world x4": dict(upscale=4, upsampler="nearest+conv"),
    "real-world x8": dict(upscale=8, upsampler="nearest+conv"),
    "jpeg x1": dict(upscale=1, upsampler="", window_size=7, img_size=14, img_range=255.0),
}


@pytest.mark.parametrize("variant", list(SWINIR))
def test_swinir_matches_spandrel(spandrel, variant):
    from spandrel.architectures.SwinIR import SwinIR

    options = dict(img_size=16, embed_dim=16, depths=[2, 3], num_heads=[2, 4], window_size=4, mlp_ratio=2.0)
    reference = randomized(SwinIR(**(options | SWINIR[variant])), seed=len(variant))
    sizes = [(14, 21), (9, 19)] if SWINIR[variant].get("window_size") == 7 else WINDOWED
    assert_matches(spandrel, reference, {"params_ema": reference.state_dict()}, "SwinIR", sizes)


def test_swinir_that_unshuffles_its_input_matches_spandrel(spandrel):
    """Its files name the first convolution `conv_first.1` (after the unshuffle); the unshuffled features must
    be a whole number of windows, so sizes are padded to a multiple of window x fold."""
    from spandrel.architectures.SwinIR import SwinIR

    reference = randomized(SwinIR(img_size=16, embed_dim=16, depths=[2], num_heads=[2], window_size=4,
                                  mlp_ratio=2.0, upscale=4, upsampler="pixelshuffle", start_unshuffle=2), seed=1)
    sd = {k.replace("conv_first.", "conv_first.1."): v for k, v in reference.state_dict().items()}
    assert_matches(spandrel, reference, sd, "SwinIR", sizes=[(16, 24)])
    with torch.no_grad():  # padded where the reference cannot go
        assert upscale_model_from_state_dict(sd)(image(13, 19)).shape == (1, 3, 26, 38)


HAT = {
    "x4": dict(upscale=4),
    "x2 without convolutions or qkv bias": dict(upscale=2, resi_connection="identity", qkv_bias=False),
    "x3 without patch norm": dict(upscale=3, patch_norm=False),
}


@pytest.mark.parametrize("variant", list(HAT))
def test_hat_matches_spandrel(spandrel, variant):
    from spandrel.architectures.HAT import HAT as Reference

    options = dict(img_size=16, embed_dim=16, depths=[2, 3], num_heads=[2, 4], window_size=4, mlp_ratio=2.0,
                   compress_ratio=2, squeeze_factor=4, num_feat=8)
    reference = randomized(Reference(**(options | HAT[variant])), seed=len(variant))
    assert_matches(spandrel, reference, {"params": reference.state_dict()}, "HAT")


DAT = {
    "x4 with shifted blocks": dict(upscale=4, depth=[4, 2]),
    "light x2, 3conv, no qkv bias": dict(upscale=2, upsampler="pixelshuffledirect", resi_connection="3conv",
                                         qkv_bias=False),
    "x3 with a one-block group": dict(upscale=3, depth=[1, 3], split_size=[4, 2]),
}


@pytest.mark.parametrize("variant", list(DAT))
def test_dat_matches_spandrel(spandrel, variant):
    """DAT pads inside its attention (with zeros), so sizes that are no multiple of the split size keep theirs."""
    from spandrel.architectures.DAT import DAT as Reference

    # img_size 64: spandrel reads the training size from block 2's mask, else assumes 64.
    options = dict(img_size=64, embed_dim=32, depth=[2, 2], num_heads=[2, 4], split_size=[2, 4],
                   expansion_factor=2.0)
    reference = randomized_with_stats(Reference(**(options | DAT[variant])), seed=len(variant))
    assert_matches(spandrel, reference, reference.state_dict(), "DAT")


def test_the_nodes_upscale_in_tiles_with_a_swinir_file(spandrel, tmp_path, monkeypatch):
    """Through the nodes, from a .pth on disk, in tiles smaller than the image (and not a multiple of the
    window): the same pixels as the reference run over the same tiles, close to one pass away from seams."""
    from spandrel.architectures.SwinIR import SwinIR

    import nodes.sd.upscale as upscale_nodes
    from executor.executor import Executor
    from executor.services import Services
    from graph.document import parse_api
    from nodes.folders import FolderPaths, set_paths
    from nodes.registry import builtin_registry

    folder = tmp_path / "models" / "upscale_models"
    folder.mkdir(parents=True)
    reference = randomized(SwinIR(img_size=16, embed_dim=8, depths=[2], num_heads=[2], window_size=4,
                                  mlp_ratio=2.0, upscale=2, upsampler="pixelshuffledirect"), seed=3)
    with torch.no_grad():  # outputs mostly inside [0, 1], so the comparison is not of clamped values
        reference.upsample[0].weight.mul_(0.1)
    torch.save({"params_ema": reference.state_dict()}, folder / "2x_SwinIR_tiny.pth")
    monkeypatch.setattr(upscale_nodes, "TILE", 30)
    monkeypatch.setattr(upscale_nodes, "OVERLAP", 6)
    paths = FolderPaths(base=tmp_path)
    paths.seed_input_examples()
    set_paths(paths)
    try:
        engine = Executor(builtin_registry(), services=Services.create(paths, force_cpu=True))
        graph = {"1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "2x_SwinIR_tiny.pth"}},
                 "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
                 "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["1", 0],
                                                                         "image": ["2", 0]}},
                 "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
        result = engine.run(parse_api(graph), keep=["1", "2", "3"])
        assert result.ok, result.error
    finally:
        set_paths(FolderPaths())
    handle, [source], [upscaled] = result.values["1"][0], result.values["2"][0], result.values["3"][0]
    assert (handle.model.architecture, handle.model.scale, handle.model.supports_half) == ("SwinIR", 2, False)
    x = source[None].movedim(-1, 1)
    with torch.no_grad():
        tiled = tiled_upscale(reference, x, 2, tile=30, overlap=6).clamp(0, 1).movedim(1, -1)[0]
        whole = reference(x).clamp(0, 1).movedim(1, -1)[0]
    assert upscaled.shape == (128, 128, 3)
    torch.testing.assert_close(upscaled, tiled, rtol=1e-5, atol=1e-5)
    assert 0 < (upscaled - whole).abs().mean() < 0.005


def test_files_that_are_not_quite_right_get_one_clear_line(spandrel):
    from spandrel.architectures.DAT import DAT as Reference
    from spandrel.architectures.SPAN import SPAN

    with pytest.raises(CheckpointError, match=r"odd.pth is not an upscale model .*SPAN, SwinIR, HAT or DAT\); "
                                              r"its weights: encoder.weight, decoder.weight$"):
        upscale_model_from_state_dict({"encoder.weight": torch.zeros(2), "decoder.weight": torch.zeros(2)}, "odd.pth")
    span = randomized(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=4), seed=1).state_dict()
    span["conv_cat.weight"] = torch.zeros(8, 16, 1, 1)
    with pytest.raises(CheckpointError, match=r"^x.pth: the SPAN weights do not fit \(.*conv_cat.weight"):
        upscale_model_from_state_dict(span, "x.pth")
    dat = Reference(img_size=16, embed_dim=32, depth=[2], num_heads=[2], split_size=[2, 4]).state_dict()
    no_splits = {k: v for k, v in dat.items() if not k.endswith("rpe_biases")}
    with pytest.raises(CheckpointError, match=r"^x.pth: an incomplete upscale model \(no .*attns.0.rpe_biases"):
        upscale_model_from_state_dict(no_splits, "x.pth")


def test_span_file_in_params_loads_from_disk(spandrel, tmp_path):
    from spandrel.architectures.SPAN import SPAN

    reference = randomized(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2), seed=5)
    torch.save({"params": reference.state_dict()}, tmp_path / "2x_SPAN.pth")
    loaded = load_upscale_model(tmp_path / "2x_SPAN.pth")
    assert (loaded.architecture, loaded.scale, loaded.supports_half, loaded.source) == ("SPAN", 2, True,
                                                                                        "2x_SPAN.pth")
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)
