"""Our UNet against diffusers' on identical weights, plus the chunked attention and odd-size paths."""

from __future__ import annotations

import pytest
import torch

from ldm.attention import set_attention_chunking
from ldm.presets import PRESETS, randomize_
from ldm.unet import UNetConfig, UNetModel, sdxl_adm
from tests.ldm.diffusers_reference import diffusers_unet, rel_err


def _unet(preset: str, seed: int = 0) -> UNetModel:
    config = PRESETS[preset][2]
    return randomize_(UNetModel(config), torch.Generator().manual_seed(seed)).eval()


def _inputs(config: UNetConfig, size: int = 16, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.tensor([10.0, 700.0][:batch])
    context = torch.randn(batch, 7, config.context_dim, generator=g)
    return x, t, context, g


def _compare_with_diffusers(model: UNetModel, size: int, tol: float = 1e-4) -> float:
    config = model.config
    x, t, context, g = _inputs(config, size)
    reference = diffusers_unet(config, model.state_dict())
    kwargs = {}
    y = None
    if config.adm_in_channels:
        pooled = torch.randn(x.shape[0], config.adm_in_channels - 6 * 256, generator=g)
        y = sdxl_adm(pooled, width=1024, height=768, crop_w=16, crop_h=32)
        time_ids = torch.tensor([[768, 1024, 32, 16, 768, 1024]] * x.shape[0], dtype=torch.float32)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        ours = model(x, t, context, y)
        theirs = reference(x, t, encoder_hidden_states=context, **kwargs).sample
    err = rel_err(ours, theirs)
    assert err < tol, err
    return err


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_matches_diffusers(preset: str) -> None:
    _compare_with_diffusers(_unet(preset), size=16)


@pytest.mark.slow
def test_full_sd15_matches_diffusers() -> None:
    torch.manual_seed(0)
    err = _compare_with_diffusers(UNetModel(PRESETS["sd15"][2]).eval(), size=32)
    print(f"full SD1.5 UNet relative error: {err:.2e}")


def test_random_weights_give_finite_input_dependent_output() -> None:
    model = _unet("tiny-sd1")
    x, t, context, _ = _inputs(model.config)
    with torch.no_grad():
        out = model(x, t, context)
        other = model(x, t, context.flip(0))
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3
    assert (out - other).abs().max() > 1e-5


def test_chunked_attention_equals_sdpa() -> None:
    model = _unet("tiny-sd2")
    x, t, context, _ = _inputs(model.config)
    with torch.no_grad():
        full = model(x, t, context)
        set_attention_chunking(model, 7)
        chunked = model(x, t, context)
    assert rel_err(chunked, full) < 1e-5


def test_sizes_not_divisible_by_the_downsampling() -> None:
    model = _unet("tiny-sd1")
    x, t, context, _ = _inputs(model.config, batch=1)
    with torch.no_grad():
        out = model(x[:, :, :9, :7], t, context)
    assert out.shape == (1, 4, 9, 7)


def test_y_must_match_the_model() -> None:
    sd1, sdxl = _unet("tiny-sd1"), _unet("tiny-sdxl")
    x, t, _, _ = _inputs(sd1.config)
    with pytest.raises(ValueError, match="adm"):
        sdxl(x, t, torch.zeros(2, 7, sdxl.config.context_dim))
    with pytest.raises(ValueError, match="adm"):
        sd1(x, t, torch.zeros(2, 7, sd1.config.context_dim), y=torch.zeros(2, 2816))


def test_sdxl_adm_layout() -> None:
    pooled = torch.randn(3, 1280)
    y = sdxl_adm(pooled, width=1024, height=512)
    assert y.shape == (3, 2816)
    assert torch.equal(y[:, :1280], pooled)
    # target size defaults to the original size
    assert torch.equal(y[:, 1280:1792], y[:, 1280 + 1024:])


def test_sdxl_refiner_matches_diffusers_with_its_five_numbers() -> None:
    from ldm.unet import sdxl_refiner_adm

    model = _unet("tiny-sdxl-refiner")
    config = model.config
    x, t, context, g = _inputs(config, 16)
    pooled = torch.randn(x.shape[0], config.adm_in_channels - 5 * 256, generator=g)
    y = sdxl_refiner_adm(pooled, width=1024, height=768, crop_w=16, crop_h=32, aesthetic_score=2.5)
    time_ids = torch.tensor([[768, 1024, 32, 16, 2.5]] * x.shape[0], dtype=torch.float32)
    reference = diffusers_unet(config, model.state_dict())
    with torch.no_grad():
        ours = model(x, t, context, y)
        theirs = reference(x, t, encoder_hidden_states=context,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert rel_err(ours, theirs) < 1e-4
