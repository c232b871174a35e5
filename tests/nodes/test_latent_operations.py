"""Latent operation nodes (LatentOperationTonemapReinhard, LatentOperationSharpen, LatentApplyOperation,
LatentApplyOperationCFG) against hand computations of ComfyUI's definitions, and the CFG patch in a guider."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from executor.executor import Executor
from executor.services import Services
from graph.ui_format import ui_to_api
from ldm.presets import make_checkpoint
from ldm.sampling import DiscreteSchedule
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGGuider
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.latent_operations import (
    LatentApplyOperation,
    LatentApplyOperationCFG,
    LatentOperationSharpen,
    LatentOperationTonemapReinhard,
)
from nodes.sd.models import DiffusionModel
from tests.nodes.test_extra_guidance_nodes import close, ksampler, latent, predictions


def _latent(seed: int = 0, shape=(2, 4, 6, 7)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_the_nodes_declare_comfyuis_names_inputs_and_outputs():
    info = builtin_registry().object_info()
    assert info["LatentApplyOperation"]["input_order"]["required"] == ["samples", "operation"]
    assert info["LatentApplyOperation"]["output"] == ["LATENT"]
    cfg = info["LatentApplyOperationCFG"]
    assert cfg["input_order"] == {"required": ["model", "operation"], "optional": ["start_percent", "end_percent"]}
    assert cfg["output"] == ["MODEL"]
    start, end = (cfg["input"]["optional"][name][1] for name in ("start_percent", "end_percent"))
    assert start.items() >= {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}.items()
    assert end.items() >= {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}.items()
    assert start["tooltip"].startswith("Start applying") and end["tooltip"].startswith("Stop applying")
    assert info["LatentOperationTonemapReinhard"]["output"] == ["LATENT_OPERATION"]
    multiplier = info["LatentOperationTonemapReinhard"]["input"]["required"]["multiplier"][1]
    assert multiplier.items() >= {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}.items()
    sharpen = info["LatentOperationSharpen"]["input"]["required"]
    assert list(sharpen) == ["sharpen_radius", "sigma", "alpha"]
    assert sharpen["sharpen_radius"][1].items() >= {"default": 9, "min": 1, "max": 31}.items()
    assert sharpen["alpha"][1].items() >= {"default": 0.1, "min": 0.0, "max": 5.0}.items()
    assert all(spec[1]["advanced"] for spec in sharpen.values())
    for name in ("LatentApplyOperation", "LatentApplyOperationCFG", "LatentOperationBlend",
                 "LatentOperationTonemapReinhard", "LatentOperationSharpen"):
        assert info[name]["category"] == "model/latent/advanced/operations"


def test_tonemap_reinhard_by_hand():
    latent = _latent()
    (op,) = LatentOperationTonemapReinhard().execute(0.7)
    out = op(latent)
    expected = torch.empty_like(latent)
    for b in range(latent.shape[0]):
        norms = [[math.sqrt(sum(float(latent[b, c, i, j]) ** 2 for c in range(4))) + 1e-10 for j in range(7)]
                 for i in range(6)]
        flat = [n for row in norms for n in row]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((n - mean) ** 2 for n in flat) / (len(flat) - 1))  # torch.std: unbiased
        top = (5 * std + mean) * 0.7
        for i in range(6):
            for j in range(7):
                m = norms[i][j] / top
                expected[b, :, i, j] = latent[b, :, i, j] / norms[i][j] * (m / (m + 1) * top)
    assert torch.allclose(out, expected, atol=1e-12)
    # The curve only shortens vectors, and keeps their directions.
    assert (torch.linalg.vector_norm(out, dim=1) < torch.linalg.vector_norm(latent, dim=1)).all()


def _reflect(i: int, n: int) -> int:
    """numpy/torch 'reflect' padding: the edge sample is not repeated."""
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def test_sharpen_by_hand():
    latent = _latent(1, (1, 3, 5, 6))
    radius, sigma, alpha = 2, 0.8, 0.3
    (op,) = LatentOperationSharpen().execute(radius, sigma, alpha)
    out = op(latent)
    size = 2 * radius + 1
    coords = [-1 + 2 * k / (size - 1) for k in range(size)]
    gauss = [[math.exp(-(u * u + v * v) / (2 * sigma * sigma)) for v in coords] for u in coords]
    total = sum(map(sum, gauss))
    kernel = [[g / total * alpha * -10 for g in row] for row in gauss]
    kernel[radius][radius] += 1.0 - sum(map(sum, kernel))
    _, channels, h, w = latent.shape
    norm = torch.linalg.vector_norm(latent, dim=1)[0] + 1e-6
    unit = latent[0] / norm
    expected = torch.empty_like(latent)
    for c in range(channels):
        for i in range(h):
            for j in range(w):
                value = sum(kernel[di][dj] * float(unit[c, _reflect(i + di - radius, h), _reflect(j + dj - radius, w)])
                            for di in range(size) for dj in range(size))
                expected[0, c, i, j] = value * norm[i, j]
    assert torch.allclose(out, expected, atol=1e-10)
    (identity,) = LatentOperationSharpen().execute(radius, sigma, 0.0)  # alpha 0: the kernel is a unit impulse
    assert torch.allclose(identity(latent), latent, atol=1e-12)


def test_sharpen_refuses_a_radius_past_the_latent():
    (op,) = LatentOperationSharpen().execute(9, 1.0, 0.1)
    with pytest.raises(ValueError, match="sharpen_radius 9 must be smaller"):
        op(_latent(shape=(1, 4, 8, 8)))


def test_apply_operation_keeps_the_latents_other_keys():
    latent = _latent()
    (op,) = LatentOperationTonemapReinhard().execute(1.0)
    (out,) = LatentApplyOperation().execute({"samples": latent, "batch_index": [3, 4]}, op)
    assert out["batch_index"] == [3, 4]
    assert torch.equal(out["samples"], op(latent))


def _unet(x, t, context, y=None):
    """A smooth stand-in eps-predictor whose output depends on each item's prompt in more than an offset."""
    mean, spread = (v.reshape(-1, 1, 1, 1) for v in (context.mean(dim=(1, 2)), context.std(dim=(1, 2))))
    return torch.sin(x * 1.3 * spread + mean) * 0.5 + mean * 0.1


def test_apply_operation_cfg_guides_with_the_operated_difference():
    g = torch.Generator().manual_seed(8)
    positive, negative = ([(torch.randn(1, 3, 8, generator=g), {})] for _ in range(2))
    denoiser = Denoiser(_unet, DiscreteSchedule())
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 4, torch.full((1,), 4.0)
    cond = CFGGuider(denoiser, positive, [], 1.0)(x, sigma)
    uncond = CFGGuider(denoiser, negative, [], 1.0)(x, sigma)
    (op,) = LatentOperationSharpen().execute(2, 1.0, 0.5)
    model = DiffusionModel(unet=nn.Identity(), family=None, source="test")
    (patched,) = LatentApplyOperationCFG().execute(model, op)
    assert model.sampling_patches.pre_cfg == ()  # the given (perhaps cached) model is left as it was
    guided = CFGGuider(denoiser, positive, negative, 6.0, pre_cfg=patched.sampling_patches.pre_cfg)(x, sigma)
    expected = uncond + 6.0 * op(cond - uncond)
    assert torch.allclose(guided, expected, atol=1e-4)
    assert (guided - (uncond + 6.0 * (cond - uncond))).abs().max() > 1e-2


def _patched(model: DiffusionModel, *operations, **window) -> DiffusionModel:
    for op in operations:
        (model,) = LatentApplyOperationCFG().execute(model, op, **window)
    return model


def _guided(patched: DiffusionModel, cfg: float, x, sigma, positive, negative) -> torch.Tensor:
    patches = patched.sampling_patches
    guider = CFGGuider(Denoiser(_unet, DiscreteSchedule()), positive, negative, cfg, pre_cfg=patches.pre_cfg,
                       post_cfg=patches.post_cfg)
    return guider(x, sigma)


def test_apply_operation_cfg_at_cfg_1_operates_on_the_prediction():
    """ComfyUI's pre-CFG function sees the positive prediction and zeros when cfg 1 skips the negative pass, so the
    operation acts on the prediction itself; chained nodes act in their order, before other post-guidance patches."""
    g = torch.Generator().manual_seed(8)
    positive, negative = ([(torch.randn(1, 3, 8, generator=g), {})] for _ in range(2))
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 4, torch.full((1,), 4.0)
    cond = CFGGuider(Denoiser(_unet, DiscreteSchedule()), positive, [], 1.0)(x, sigma)
    (tonemap,) = LatentOperationTonemapReinhard().execute(0.5)
    (sharpen,) = LatentOperationSharpen().execute(2, 1.0, 0.5)
    model = DiffusionModel(unet=nn.Identity(), family=None, source="test")
    out = _guided(_patched(model, tonemap), 1.0, x, sigma, positive, negative)
    assert torch.allclose(out, tonemap(cond), atol=1e-6) and (out - cond).abs().max() > 1e-2
    assert torch.allclose(_guided(_patched(model, tonemap), 1.0, x, sigma, positive, []), tonemap(cond), atol=1e-6)

    def shift(args, denoised, predict):
        return denoised + 1.0

    shifted = replace(model, sampling_patches=replace(model.sampling_patches, post_cfg=(shift,)))
    chained = _patched(shifted, tonemap, sharpen)
    assert chained.sampling_patches.post_cfg[-1] is shift
    out = _guided(chained, 1.0, x, sigma, positive, negative)
    assert torch.allclose(out, sharpen(tonemap(cond)) + 1.0, atol=1e-6)
    # At cfg 6 the one-sided form leaves the guided result alone: the pre-guidance patch acted.
    uncond = CFGGuider(Denoiser(_unet, DiscreteSchedule()), negative, [], 1.0)(x, sigma)
    out = _guided(_patched(model, tonemap), 6.0, x, sigma, positive, negative)
    assert torch.allclose(out, uncond + 6.0 * tonemap(cond - uncond), atol=1e-4)


def test_apply_operation_cfg_acts_within_its_window_both_ends_included():
    """ComfyUI leaves the predictions alone where `sigma > sigma_start or sigma < sigma_end`."""
    g = torch.Generator().manual_seed(3)
    positive, negative = ([(torch.randn(1, 3, 8, generator=g), {})] for _ in range(2))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 4
    (op,) = LatentOperationTonemapReinhard().execute(0.5)
    schedule = DiscreteSchedule()
    model = DiffusionModel(unet=nn.Identity(), family=None, source="test")
    patched = _patched(model, op, start_percent=0.3, end_percent=0.6)
    [on_guidance] = patched.sampling_patches.pre_cfg
    high, low = schedule.sigma_at_percent(0.3), schedule.sigma_at_percent(0.6)
    assert (on_guidance.sigma_start, on_guidance.sigma_end) == (high, low) and high > low
    for level, acts in ((high * 1.001, False), (high, True), (low, True), (low * 0.999, False)):
        assert on_guidance.acts_at(torch.tensor([level], dtype=torch.float64)) is acts
    for level, acts in ((high * 1.01, False), ((high + low) / 2, True), (low * 0.99, False)):
        sigma = torch.full((1,), level)
        for cfg, sides in ((1.0, []), (6.0, negative)):
            plain = CFGGuider(Denoiser(_unet, schedule), positive, sides, cfg)(x, sigma)
            out = _guided(patched, cfg, x, sigma, positive, negative)
            assert torch.allclose(out, plain, atol=1e-6) is not acts, (level, cfg)


# --- In workflows (a tiny random SD1 file; one-step runs, whose result is the guided prediction itself) ---------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_operations")
    for name, seed in (("sd1", 1), ("sd1b", 2)):  # the second: what the shared prompts' other loader names
        make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / f"{name}.safetensors", seed=seed)
    set_paths(FolderPaths(base=root))
    yield Executor(builtin_registry(), services=Services.create(FolderPaths(base=root), force_cpu=True))
    set_paths(FolderPaths())


def with_operation(cfg: float, **window) -> dict:
    """A one-step KSampler "6" on the model through LatentApplyOperationCFG with Reinhard tonemapping (multiplier
    0.5), `window` its start and end percents (none: a prompt saved before the node had them)."""
    nodes = ksampler({"class_type": "LatentApplyOperationCFG", "inputs": {"operation": ["40", 0], **window}},
                     cfg=cfg)
    nodes["40"] = {"class_type": "LatentOperationTonemapReinhard", "inputs": {"multiplier": 0.5}}
    return nodes


def test_apply_operation_cfg_in_workflows(engine) -> None:
    (tonemap,) = LatentOperationTonemapReinhard().execute(0.5)  # of degree 1: the same on a LATENT's scale
    cond, uncond = predictions(engine)
    # cfg 1 (no negative pass): the operation on the positive prediction, as ComfyUI's pre-CFG function gives it
    out = latent(engine, with_operation(1.0))
    close(out, tonemap(cond))
    assert (out - cond).abs().max() > 1e-2 * cond.abs().max()
    # cfg 4: on the guidance direction
    close(latent(engine, with_operation(4.0, start_percent=0.0, end_percent=1.0)),
          uncond + 4.0 * tonemap(cond - uncond))
    # a window the first level is not in: the model as it was
    close(latent(engine, with_operation(1.0, start_percent=0.5, end_percent=1.0)), cond)


def test_an_editor_file_saved_before_the_window_inputs_runs(engine) -> None:
    """The node had no widgets before ComfyUI added start_percent and end_percent (optional, at the end): an older
    file's empty widgets_values gives their defaults."""
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [], "widgets_values": ["sd1.safetensors"]},
        {"id": 2, "type": "LatentOperationTonemapReinhard", "mode": 0, "inputs": [], "widgets_values": [0.5]},
        {"id": 3, "type": "LatentApplyOperationCFG", "mode": 0, "widgets_values": [],
         "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                    {"name": "operation", "type": "LATENT_OPERATION", "link": 2}]},
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 2, 0, 3, 1, "LATENT_OPERATION"]]
    api = ui_to_api({"nodes": nodes, "links": links}, engine.registry)
    assert api["3"]["inputs"] == {"model": ["1", 0], "operation": ["2", 0], "start_percent": 0.0,
                                  "end_percent": 1.0}
    doc = with_operation(1.0)
    doc["50"]["inputs"] = {**api["3"]["inputs"], "model": ["1", 0], "operation": ["40", 0]}
    assert torch.equal(latent(engine, doc), latent(engine, with_operation(1.0)))
