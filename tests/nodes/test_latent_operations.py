"""Latent operation nodes (LatentOperationTonemapReinhard, LatentOperationSharpen, LatentApplyOperation,
LatentApplyOperationCFG) against hand computations of ComfyUI's definitions, and the CFG patch in a guider."""

import math

import pytest
import torch
from torch import nn

from ldm.sampling import DiscreteSchedule
from ldm.sampling.denoiser import Denoiser
from ldm.sampling.guidance import CFGGuider
from nodes.registry import builtin_registry
from nodes.sd.latent_operations import (
    LatentApplyOperation,
    LatentApplyOperationCFG,
    LatentOperationSharpen,
    LatentOperationTonemapReinhard,
)
from nodes.sd.models import DiffusionModel


def _latent(seed: int = 0, shape=(2, 4, 6, 7)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_the_nodes_declare_comfyuis_names_inputs_and_outputs():
    info = builtin_registry().object_info()
    assert info["LatentApplyOperation"]["input_order"]["required"] == ["samples", "operation"]
    assert info["LatentApplyOperation"]["output"] == ["LATENT"]
    assert info["LatentApplyOperationCFG"]["input_order"]["required"] == ["model", "operation"]
    assert info["LatentApplyOperationCFG"]["output"] == ["MODEL"]
    assert info["LatentOperationTonemapReinhard"]["output"] == ["LATENT_OPERATION"]
    multiplier = info["LatentOperationTonemapReinhard"]["input"]["required"]["multiplier"][1]
    assert multiplier.items() >= {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}.items()
    sharpen = info["LatentOperationSharpen"]["input"]["required"]
    assert list(sharpen) == ["sharpen_radius", "sigma", "alpha"]
    assert sharpen["sharpen_radius"][1].items() >= {"default": 9, "min": 1, "max": 31}.items()
    assert sharpen["alpha"][1].items() >= {"default": 0.1, "min": 0.0, "max": 5.0}.items()
    for name in ("LatentApplyOperation", "LatentOperationSharpen"):
        assert info[name]["category"] == "latent/advanced/operations"


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
