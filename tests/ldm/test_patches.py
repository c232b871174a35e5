"""UNet patches (ldm.patches): FreeU against diffusers' implementation, and patched copies leaving the original."""

import dataclasses

import pytest
import torch

from ldm.patches import FreeU, fourier_filter, perturbed_attention_copy, with_output_block_patch
from ldm.presets import PRESETS, randomize_
from ldm.unet import UNetModel
from tests.ldm.diffusers_reference import diffusers_unet, rel_err

# Three levels, so that the decoder's two deepest stages have 4x and 2x model_channels, as SDXL's do.
CONFIG = dataclasses.replace(PRESETS["tiny-sd1"][2], channel_mult=(1, 2, 4), transformer_depth=(1, 1, 1),
                             num_heads=8)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([20.0, 600.0]),
            torch.randn(2, 7, CONFIG.context_dim, generator=g))


def test_freeu_matches_diffusers(monkeypatch):
    """diffusers' FreeU, with its stage chosen as the authors' code (and ComfyUI) choose it: by the decoder
    features' channel count. diffusers picks it by up-block index, which differs on each stage's first block,
    whose input still has the deeper stage's width."""
    from diffusers.models.unets import unet_2d_blocks

    by_index = unet_2d_blocks.apply_freeu
    stages = {4 * CONFIG.model_channels: 0, 2 * CONFIG.model_channels: 1}
    monkeypatch.setattr(unet_2d_blocks, "apply_freeu", lambda _, h, skip, **knobs: by_index(
        stages.get(h.shape[1], -1), h, skip, **knobs))
    unet = randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).eval()
    reference = diffusers_unet(CONFIG, unet.state_dict())
    x, t, context = _inputs()
    knobs = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}
    patched = with_output_block_patch(unet, FreeU(CONFIG.model_channels, **knobs))
    with torch.no_grad():
        plain = unet(x, t, context)
        ours = patched(x, t, context)
        reference.enable_freeu(**knobs)
        expected = reference(x, t, encoder_hidden_states=context).sample
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(ours, plain) > 1e-2  # the patch does change the prediction
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), plain)  # and the original module is left as it was
    assert not unet.output_block_patches and len(patched.output_block_patches) == 1
    assert all(a is b for a, b in zip(unet.parameters(), patched.parameters(), strict=True))


def test_freeu_v2_scales_each_pixel_by_its_normalised_channel_mean():
    g = torch.Generator().manual_seed(1)
    h, skip = torch.randn(2, 128, 6, 5, generator=g), torch.randn(2, 128, 6, 5, generator=g)
    out_h, out_skip = FreeU(32, b1=1.5, b2=1.2, s1=0.7, s2=0.2, version=2)(h, skip)
    for i in range(2):
        mean = h[i].mean(0)
        gain = 1 + 0.5 * (mean - mean.min()) / (mean.max() - mean.min())
        assert torch.allclose(out_h[i, :64], h[i, :64] * gain, atol=1e-6)
    assert torch.equal(out_h[:, 64:], h[:, 64:])
    assert torch.allclose(out_skip, fourier_filter(skip, 1, 0.7))
    untouched = torch.randn(2, 96, 4, 4, generator=g)  # neither stage's width: left alone
    assert FreeU(32, 1.5, 1.2, 0.7, 0.2, 2)(untouched, untouched) == (untouched, untouched)


@pytest.mark.parametrize("size", [(8, 8), (6, 5)])
def test_fourier_filter_scales_only_the_lowest_frequencies(size):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, *size, generator=g)
    assert torch.allclose(fourier_filter(x, 1, 1.0), x, atol=1e-6)
    # The mean (the zero frequency, at the shifted spectrum's centre) is among those scaled.
    assert torch.allclose(fourier_filter(x, 1, 0.0).mean(dim=(-2, -1)), torch.zeros(1, 3), atol=1e-6)


def test_perturbed_attention_copy_matches_diffusers_pag_identity_attention():
    """diffusers' PAG processor runs a batch's first half normally and its second half with identity
    self-attention: on the middle block's layers, the second half is our perturbed copy's output."""
    from diffusers.models.attention_processor import AttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0

    unet = randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).eval()
    reference = diffusers_unet(CONFIG, unet.state_dict())
    reference.set_attn_processor({name: PAGIdentitySelfAttnProcessor2_0() if name.startswith("mid_block")
                                  and ".attn1." in name else AttnProcessor2_0()
                                  for name in reference.attn_processors})
    x, t, context = _inputs()
    perturbed = perturbed_attention_copy(unet)
    with torch.no_grad():
        plain, ours = unet(x[:1], t[:1], context[:1]), perturbed(x[:1], t[:1], context[:1])
        both = reference(x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2), encoder_hidden_states=context[:1].repeat(2, 1, 1))
    assert rel_err(both.sample[:1], plain) < 1e-4
    assert rel_err(both.sample[1:], ours) < 1e-4
    assert rel_err(ours, plain) > 1e-3
    with torch.no_grad():
        assert torch.equal(unet(x[:1], t[:1], context[:1]), plain)  # the original module is left as it was


def _resize(x, height, width):
    return torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("after_skip", [True, False])
def test_deep_shrink_shrinks_one_blocks_features_within_its_timesteps_and_restores_the_size(after_skip):
    from ldm.patches import DeepShrink, with_input_block_patch

    unet = randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).eval()
    shrink = DeepShrink(block=2, factor=2.0, t_high=700.0, t_low=300.0, after_skip=after_skip, shrink=_resize,
                        grow=_resize)
    patched = with_input_block_patch(with_output_block_patch(unet, shrink.restore), shrink)
    assert not patched.cuda_graphs_safe and getattr(unet, "cuda_graphs_safe", True)
    seen = []
    block = patched.input_blocks[3]  # (a shallow copy shares its hooks with the original's block: filter)
    block.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])) if m is block else None)
    x, _, context = _inputs()
    with torch.no_grad():
        inside, outside = torch.tensor([500.0, 500.0]), torch.tensor([900.0, 900.0])
        assert torch.equal(patched(x, outside, context), unet(x, outside, context))  # not its timesteps
        shrunk, plain = patched(x, inside, context), unet(x, inside, context)
    assert seen == [(8, 8), (4, 4)]  # block 2's output (16 px / 2 = 8) shrunk once more, inside the range only
    assert shrunk.shape == plain.shape and rel_err(shrunk, plain) > 1e-3


def test_hypertile_attends_within_each_tile():
    """A transformer block with its self-attention tiled is the same block run on each tile alone: everything
    else in it acts on tokens one by one."""
    from ldm.attention import BasicTransformerBlock

    block = randomize_(BasicTransformerBlock(32, 4, 8, 16), torch.Generator().manual_seed(1)).eval()
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 6, 8, 32, generator=g), torch.randn(2, 5, 16, generator=g)  # a 6 x 8 grid
    with torch.no_grad():
        tiled = block(x.reshape(2, 48, 32), context, (3, 2, 6, 8)).reshape(2, 6, 8, 32)
        for row in range(3):
            for col in range(2):
                tile = x[:, 2 * row:2 * row + 2, 4 * col:4 * col + 4]
                alone = block(tile.reshape(2, 8, 32), context).reshape(2, 2, 4, 32)
                torch.testing.assert_close(tiled[:, 2 * row:2 * row + 2, 4 * col:4 * col + 4], alone)
        assert not torch.allclose(tiled.reshape(2, 48, 32), block(x.reshape(2, 48, 32), context))


def test_hypertile_picks_its_tiles_per_step_the_same_every_run_and_only_on_shallow_transformers():
    from ldm.patches import HyperTile

    tiling = HyperTile(model_channels=320, tile_size=256, swap_size=2, max_depth=0, scale_depth=False)

    def choices(timestep: float) -> list[tuple[int, int]]:
        tiling(torch.zeros(1), 0, torch.tensor([timestep]))  # the UNet pass starts
        return [tiling.tiles(64, 96, 320) for _ in range(4)]

    # 64 and 96 latent tokens a side, tiles of at least 32: 2 or 1 tiles down, 3 or 2 across
    picked = {pair for t in (999.0, 500.0, 10.0) for pair in choices(t)}
    assert picked <= {(2, 3), (2, 2), (1, 3), (1, 2)} and len(picked) > 1
    assert choices(500.0) == choices(500.0)
    assert tiling.tiles(32, 48, 640) == (1, 1)  # deeper than max_depth: untouched
    deep = HyperTile(320, 256, 1, max_depth=1, scale_depth=True)
    deep(torch.zeros(1), 0, torch.tensor([1.0]))
    assert deep.tiles(32, 48, 640) == (1, 1)  # with scale_depth its tiles there are twice as big: one tile
    assert deep.tiles(64, 96, 320) == (2, 3)  # swap_size 1: always the most tiles


def test_hypertile_copy_with_one_tile_is_the_unet_and_with_more_differs():
    from ldm.patches import HyperTile

    unet = randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).eval()
    x, t, context = _inputs()
    with torch.no_grad():
        plain = unet(x, t, context)
        whole = HyperTile(CONFIG.model_channels, 2048, 2, 0, False).patch(unet)
        torch.testing.assert_close(whole(x, t, context), plain)
        tiled = HyperTile(CONFIG.model_channels, 32, 1, 0, False).patch(unet)  # 4 x 4 token tiles of 16 x 16
        assert rel_err(tiled(x, t, context), plain) > 1e-3
        assert unet(x, t, context).equal(plain)  # the original is untouched
    assert not getattr(tiled, "cuda_graphs_safe", True)


def test_scaled_layers_copy_multiplies_only_the_named_projections():
    from ldm.patches import scaled_layers_copy

    unet = randomize_(UNetModel(CONFIG), torch.Generator().manual_seed(0)).eval()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    scaled = scaled_layers_copy(unet, {"attn1.to_q": 2.0, "attn1.to_out.0": 0.5, "attn1.to_k": 1.0})
    after = scaled.state_dict()

    def factor(key: str) -> float:
        if key.endswith("attn1.to_q.weight"):
            return 2.0
        return 0.5 if key.endswith(("attn1.to_out.0.weight", "attn1.to_out.0.bias")) else 1.0

    layers = sum(k.endswith("attn1.to_q.weight") for k in before)
    assert layers and sum(factor(k) != 1.0 for k in before) == 3 * layers  # each attn1's q, out and out bias
    for key, value in after.items():
        torch.testing.assert_close(value, before[key] * factor(key))
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # the original is untouched
    assert scaled_layers_copy(unet, {"attn1.to_q": 1.0}) is unet
    x, t, context = _inputs()
    with torch.no_grad():
        assert rel_err(scaled(x, t, context), unet(x, t, context)) > 1e-3
