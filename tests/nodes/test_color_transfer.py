"""ColorTransfer (nodes/sd/color_transfer.py): Reinhard and MKL in Lab against a numpy transcription of ComfyUI's
arithmetic over an independent sRGB -> Lab conversion, and against the property each method promises (the reference's
Lab means and spreads, its covariance); the histogram LUT against numpy; an API workflow, an editor file's widget
layout, the declaration and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.color_transfer import ColorTransfer, mkl_matrix


def run(**inputs):
    inputs.setdefault("strength", 1.0)
    node = ColorTransfer()
    node.ctx = None  # no engine: the CPU
    return node.execute(**inputs)[0]


def pictures(seed, batch, h=12, w=10, low=0.25, high=0.75):
    """Colours well inside the gamut, so that no result is clipped and Lab round trips are exact."""
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(batch, h, w, 3, generator=g)


def lab(rgb):
    """sRGB [..., 3] in 0..1 -> CIE Lab (D65), the textbook formulas in numpy."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                             [0.019334, 0.119193, 0.950227]]).T
    xyz = xyz / np.array([0.950456, 1.0, 1.088754])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def flat(frame):
    return lab(frame).reshape(-1, 3).T  # [3, H * W]


def assert_lab_close(out, expected_lab, atol=2e-3):
    out = out.numpy()
    assert 0 < out.min() and out.max() < 1  # nothing clipped
    np.testing.assert_allclose(lab(out), expected_lab, atol=atol, rtol=0)


# --- Reinhard and MKL ------------------------------------------------------------------------------------------


def test_reinhard_per_frame_gives_each_frame_the_references_lab_means_and_spreads():
    target, ref = pictures(1, 2, low=0.35, high=0.6), pictures(2, 1, low=0.3, high=0.7)
    out = run(image_target=target, image_ref=ref, method="reinhard_lab", source_stats="per_frame")
    r = flat(ref[0])
    for frame in out:
        o = flat(frame)
        np.testing.assert_allclose(o.mean(1), r.mean(1), atol=2e-3)
        np.testing.assert_allclose(o.std(1), r.std(1), atol=2e-3)
    # and, value by value, ComfyUI's (x - mean) * ref_std / std + ref_mean
    s = flat(target[1])
    expected = (s - s.mean(1, keepdims=True)) * (r.std(1) / s.std(1))[:, None] + r.mean(1, keepdims=True)
    assert_lab_close(out[1], expected.T.reshape(12, 10, 3))


def test_uniform_reinhard_pools_the_frames_and_applies_one_affine_map():
    target, ref = pictures(3, 3, low=0.35, high=0.6), pictures(4, 2, low=0.3, high=0.7)
    out = run(image_target=target, image_ref=ref, method="reinhard_lab", source_stats="uniform", strength=0.6)
    frames = [flat(f) for f in target]
    s_mean = np.mean([f.mean(1) for f in frames], axis=0)
    s_std = np.sqrt(np.mean([((f - s_mean[:, None]) ** 2).mean(1) for f in frames], axis=0))
    refs = [flat(f) for f in ref]
    r_mean = np.mean([f.mean(1) for f in refs], axis=0)
    r_std = np.sqrt(np.mean([((f - r_mean[:, None]) ** 2).mean(1) for f in refs], axis=0))
    for frame, o in zip(frames, out, strict=True):
        matched = frame * (r_std / s_std)[:, None] + (r_mean - r_std / s_std * s_mean)[:, None]
        blended = frame + 0.6 * (matched - frame)
        assert_lab_close(o, blended.T.reshape(12, 10, 3))


def test_target_frame_maps_every_frame_by_the_chosen_frames_stats():
    target, ref = pictures(5, 3, low=0.35, high=0.6), pictures(6, 1, low=0.3, high=0.7)
    out = run(image_target=target, image_ref=ref, method="reinhard_lab", source_stats="target_frame",
              **{"source_stats.target_index": 7})  # past the end: the last frame, as ComfyUI clamps it
    s, r = flat(target[2]), flat(ref[0])
    scale = r.std(1) / s.std(1)
    for frame, o in zip(target, out, strict=True):
        expected = flat(frame) * scale[:, None] + (r.mean(1) - scale * s.mean(1))[:, None]
        assert_lab_close(o, expected.T.reshape(12, 10, 3))
    np.testing.assert_allclose(flat(out[2]).std(1), r.std(1), atol=2e-3)


def test_mkl_gives_the_references_lab_covariance():
    target, ref = pictures(7, 2, low=0.4, high=0.6), pictures(8, 1, low=0.3, high=0.7)
    out = run(image_target=target, image_ref=ref, method="mkl_lab", source_stats="per_frame")
    r = flat(ref[0])
    for frame in out:
        o = flat(frame)
        np.testing.assert_allclose(o.mean(1), r.mean(1), atol=2e-3)
        np.testing.assert_allclose(np.cov(o, bias=True), np.cov(r, bias=True), atol=5e-3)


def test_mkl_matrix_is_the_symmetric_map_between_covariances():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    source, ref = a @ a.T + 0.1 * torch.eye(3, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(3, dtype=torch.float64)
    t = mkl_matrix(source, ref)
    torch.testing.assert_close(t, t.T)
    torch.testing.assert_close(t @ source @ t.T, ref)
    assert torch.linalg.eigvalsh(t).min() > 0


# --- Histogram -------------------------------------------------------------------------------------------------


def cdf(values):
    """ComfyUI's 256-bin CDF per channel of [N, C] values in 0..1, in numpy."""
    bins = np.clip((values * 255).astype(np.int64), 0, 255)
    counts = np.stack([np.bincount(bins[:, c], minlength=256) for c in range(values.shape[1])]).astype(np.float64)
    total = counts.cumsum(1)
    return total / total[:, -1:]


def lut(source, ref):
    s, r = cdf(source), cdf(ref)
    return np.stack([np.minimum(np.searchsorted(r[c], s[c], side="left"), 255) for c in range(len(s))]) / 255


def apply_lut(frame, table):
    bins = np.clip((frame * 255).astype(np.int64), 0, 255)
    return np.stack([table[c][bins[..., c]] for c in range(frame.shape[-1])], -1)


def test_histogram_per_frame_and_uniform_against_numpy():
    g = torch.Generator().manual_seed(9)
    target = torch.rand(2, 16, 16, 3, generator=g) ** 2
    ref = torch.rand(2, 8, 8, 3, generator=g).sqrt()
    per_frame = run(image_target=target, image_ref=ref, method="histogram", source_stats="per_frame")
    for i in range(2):
        table = lut(target[i].reshape(-1, 3).numpy(), ref[i].reshape(-1, 3).numpy())
        np.testing.assert_allclose(per_frame[i].numpy(), apply_lut(target[i].numpy(), table), atol=1e-6)
    uniform = run(image_target=target, image_ref=ref, method="histogram", source_stats="uniform", strength=0.5)
    table = lut(target.reshape(-1, 3).numpy(), ref.reshape(-1, 3).numpy())
    for i in range(2):
        matched = apply_lut(target[i].numpy(), table)
        np.testing.assert_allclose(uniform[i].numpy(), target[i].numpy() * 0.5 + matched * 0.5, atol=1e-6)


def test_no_reference_or_strength_0_passes_the_image_through():
    image = pictures(1, 1)
    assert run(image_target=image, image_ref=None, method="mkl_lab", source_stats="uniform") is image
    assert run(image_target=image, image_ref=pictures(2, 1), method="histogram", source_stats="uniform",
               strength=0.0) is image


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="ColorTransfer: reinhard_lab works in Lab and needs RGB"):
        run(image_target=torch.rand(1, 4, 4, 4), image_ref=torch.rand(1, 4, 4, 4), method="reinhard_lab",
            source_stats="uniform")
    with pytest.raises(ValueError, match="ColorTransfer: image_target has 3 channels and image_ref 1"):
        run(image_target=torch.rand(1, 4, 4, 3), image_ref=torch.rand(1, 4, 4, 1), method="histogram",
            source_stats="uniform")
    with pytest.raises(ValueError, match="target_frame' needs the input source_stats.target_index"):
        run(image_target=torch.rand(1, 4, 4, 3), image_ref=torch.rand(1, 4, 4, 3), method="histogram",
            source_stats="target_frame")


# --- Declaration, editor files, workflow -----------------------------------------------------------------------


def test_declaration_matches_comfyuis():
    info = ColorTransfer.object_info()
    assert info["category"] == "image/postprocessing"
    assert list(ColorTransfer.inputs) == ["image_target", "image_ref", "method", "source_stats",
                                          "source_stats.target_index", "strength"]
    required, optional = info["input"]["required"], info["input"]["optional"]
    assert required["method"][0] == ["reinhard_lab", "mkl_lab", "histogram"]
    assert required["source_stats"][0] == ["per_frame", "uniform", "target_frame"]
    assert required["source_stats"][1]["dynamic_inputs"]["target_frame"] == ["source_stats.target_index"]
    assert required["strength"] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}]
    assert optional["source_stats.target_index"][1] | {"tooltip": None} == {
        "default": 0, "min": 0, "max": 10000, "step": 1, "tooltip": None}
    assert optional["image_ref"][0] == "IMAGE"
    assert info["output"] == ["IMAGE"] and info["output_name"] == ["image"]


def test_an_editor_files_widgets_follow_the_chosen_source_stats(registry):
    def ui(values):
        doc = {"nodes": [{"id": 1, "type": "ColorTransfer", "mode": 0, "widgets_values": values,
                          "inputs": [], "outputs": [{"name": "image", "type": "IMAGE", "links": []}]}], "links": []}
        return ui_to_api(doc, registry)["1"]["inputs"]

    assert ui(["mkl_lab", "target_frame", 3, 0.8]) == {
        "method": "mkl_lab", "source_stats": "target_frame", "source_stats.target_index": 3, "strength": 0.8}
    assert ui(["histogram", "uniform", 0.5]) | {"source_stats.target_index": None} == {
        "method": "histogram", "source_stats": "uniform", "source_stats.target_index": None, "strength": 0.5}


def test_a_workflow_matches_a_video_to_a_reference(tmp_path):
    g = np.random.default_rng(0)
    (tmp_path / "input").mkdir()
    frames = [g.integers(40, 140, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    Image.fromarray(frames[0]).save(tmp_path / "input" / "target.png")
    reference = g.integers(90, 250, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(reference).save(tmp_path / "input" / "ref.png")
    set_paths(FolderPaths(base=tmp_path))
    try:
        engine = Executor(builtin_registry(), services=Services.create(FolderPaths(base=tmp_path), force_cpu=True))
        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "target.png"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
            "3": {"class_type": "ColorTransfer", "inputs": {
                "image_target": ["1", 0], "image_ref": ["2", 0], "method": "histogram", "source_stats": "uniform",
                "strength": 1.0}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
        }
        result = engine.run(parse_api(graph), keep=["3"])
        assert result.ok, result.error
        out = result.values["3"][0]
        target = frames[0].astype(np.float32) / 255
        table = lut(target.reshape(-1, 3), reference.reshape(-1, 3).astype(np.float32) / 255)
        np.testing.assert_allclose(out[0].numpy(), apply_lut(target, table), atol=1e-6)
        assert out.shape == (1, 16, 16, 3) and out.mean() > target.mean() + 0.1  # brighter, as the reference
    finally:
        set_paths(FolderPaths())
