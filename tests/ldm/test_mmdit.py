"""The SD3 MMDiT against diffusers' SD3Transformer2DModel with the same weights, and its config detection."""

from __future__ import annotations

import pytest
import torch

from ldm.mmdit import MMDiTConfig, is_mmdit, mmdit_config_from_state_dict
from tests.ldm.mmdit_reference import TINY_SD3, VARIANTS, diffusers_call, diffusers_twin, random_mmdit


def inputs(config: MMDiTConfig, seed: int, batch: int = 2, h: int = 8, w: int = 8, text: int = 5) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=generator)
    sigma = torch.rand(batch, generator=generator)
    context = torch.randn(batch, text, config.context_dim, generator=generator)
    pooled = torch.randn(batch, config.adm_in_channels, generator=generator)
    return x, sigma, context, pooled


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(8, 8), (6, 10), (4, 14)], ids=["square", "wide", "cropped-left-right"])
def test_matches_diffusers(variant: str, size: tuple[int, int]) -> None:
    """Non-square latents take an off-centre window of the position table; diffusers crops it the same way."""
    config = VARIANTS[variant]
    model = random_mmdit(config)
    reference = diffusers_twin(model)
    x, sigma, context, pooled = inputs(config, 1, h=size[0], w=size[1])
    with torch.no_grad():
        ours = model(x, sigma, context, pooled)
    expected = diffusers_call(reference, x, sigma, context, pooled)
    assert ours.shape == x.shape and expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_sizes_off_the_patch_grid_pad_round_and_crop() -> None:
    model = random_mmdit(TINY_SD3)
    reference = diffusers_twin(model)
    x, sigma, context, pooled = inputs(TINY_SD3, 2, batch=1, h=5, w=7)
    with torch.no_grad():
        ours = model(x, sigma, context, pooled)
    wrapped = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="circular")
    expected = diffusers_call(reference, wrapped, sigma, context, pooled)[..., :5, :7]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_from_state_dict(variant: str) -> None:
    config = VARIANTS[variant]
    sd = random_mmdit(config).state_dict()
    assert is_mmdit(sd) and is_mmdit({f"model.diffusion_model.{k}": v for k, v in sd.items()}, "model.diffusion_model.")
    assert mmdit_config_from_state_dict(sd) == config
    # Stability's layout: the last block's context stream is pre-only (no output projection, no MLP).
    last = config.depth - 1
    assert f"joint_blocks.{last}.context_block.attn.qkv.weight" in sd
    assert f"joint_blocks.{last}.context_block.attn.proj.weight" not in sd
    assert f"joint_blocks.{last}.context_block.mlp.fc1.weight" not in sd
    assert sd[f"joint_blocks.{last}.context_block.adaLN_modulation.1.weight"].shape[0] == 2 * config.hidden_size


def test_bad_inputs_are_named() -> None:
    model = random_mmdit(TINY_SD3)
    x, sigma, context, pooled = inputs(TINY_SD3, 3, batch=1)
    with pytest.raises(ValueError, match="y is 23 wide"):
        model(x, sigma, context, pooled[:, :-1])
    with pytest.raises(ValueError, match="larger than this model's position table"):
        model(torch.zeros(1, 16, 18, 8), sigma, context, pooled)
    sd = random_mmdit(TINY_SD3).state_dict()
    del sd["y_embedder.mlp.0.weight"]
    with pytest.raises(ValueError, match="no weight 'y_embedder.mlp.0.weight'"):
        mmdit_config_from_state_dict(sd)
