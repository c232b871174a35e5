"""The Flux transformer against diffusers' FluxTransformer2DModel with the same weights, and its config detection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.flux import FluxConfig, flux_config_from_state_dict, is_flux, patchify, position_ids, unpatchify
from tests.ldm.flux_reference import TINY, diffusers_call, diffusers_twin, random_flux


def inputs(seed: int, batch: int = 2, h: int = 6, w: int = 8, text: int = 5) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=generator)
    sigma = torch.rand(batch, generator=generator)
    context = torch.randn(batch, text, TINY.context_dim, generator=generator)
    pooled = torch.randn(batch, TINY.vec_in_dim, generator=generator)
    return x, sigma, context, pooled


@pytest.mark.parametrize("guidance_embed", [True, False], ids=["dev", "schnell"])
def test_matches_diffusers(guidance_embed: bool) -> None:
    model = random_flux(dataclasses.replace(TINY, guidance_embed=guidance_embed))
    reference = diffusers_twin(model)
    x, sigma, context, pooled = inputs(1)
    guidance = torch.tensor([3.5, 1.0]) if guidance_embed else None
    y = pooled if guidance is None else torch.cat([pooled, guidance[:, None]], dim=1)
    with torch.no_grad():
        ours = model(x, sigma, context, y)
    expected = diffusers_call(reference, x, sigma, context, pooled, guidance)
    assert ours.shape == x.shape and expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_sizes_off_the_patch_grid_pad_round_and_crop() -> None:
    model = random_flux()
    reference = diffusers_twin(model)
    x, sigma, context, pooled = inputs(2, batch=1, h=5, w=7)
    y = torch.cat([pooled, torch.tensor([[2.0]])], dim=1)
    with torch.no_grad():
        ours = model(x, sigma, context, y)
    wrapped = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="circular")
    expected = diffusers_call(reference, wrapped, sigma, context, pooled, torch.tensor([2.0]))[..., :5, :7]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_dev_model_runs_unguided_without_the_guidance_column() -> None:
    model = random_flux()
    x, sigma, context, pooled = inputs(3, batch=1)
    with torch.no_grad():
        unguided = model(x, sigma, context, pooled)
        guided = model(x, sigma, context, torch.cat([pooled, torch.tensor([[3.5]])], dim=1))
    assert not torch.allclose(unguided, guided)
    with pytest.raises(ValueError, match="y is 26 wide"):
        model(x, sigma, context, torch.zeros(1, 25 + 1))


def test_patchify_round_trip_and_positions() -> None:
    x = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    tokens = patchify(x)
    assert tokens.shape == (2, 6, 64)
    # The first token is the top-left 2x2 patch, channel by channel.
    assert tokens[0, 0, :4].tolist() == [x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]
    assert torch.equal(unpatchify(tokens, 4, 6), x)
    ids = position_ids(2, 3, text_tokens=4)
    assert ids[:4].eq(0).all() and ids[4:].tolist() == [[0, r, c] for r in range(2) for c in range(3)]


def test_config_from_state_dict() -> None:
    for config in (TINY, dataclasses.replace(TINY, guidance_embed=False, depth=1, depth_single_blocks=3)):
        sd = random_flux(config).state_dict()
        assert is_flux(sd)
        assert flux_config_from_state_dict(sd, axes_dim=config.axes_dim) == config
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in random_flux().state_dict().items()}
    with pytest.raises(ValueError, match="heads are 16 wide, not Flux.1's 128"):
        flux_config_from_state_dict(shapes)
    del shapes["txt_in.weight"]
    with pytest.raises(ValueError, match="incomplete Flux transformer: no weight 'txt_in.weight'"):
        flux_config_from_state_dict(shapes, axes_dim=(4, 6, 6))


def test_full_size_defaults_are_flux_dev() -> None:
    with torch.device("meta"):
        from ldm.flux import Flux

        model = Flux(FluxConfig())
    shapes = dict(model.state_dict())
    assert flux_config_from_state_dict(shapes) == FluxConfig()
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320  # Flux.1-dev's 11.9B parameters
