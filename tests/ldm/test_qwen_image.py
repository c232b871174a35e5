"""Qwen-Image's transformer against diffusers' QwenImageTransformer2DModel (the same weights under diffusers' own key
names, which are the released files'), called as QwenImagePipeline calls it; its config and family read from the
weights, and its files (bare, prefixed, fp8, scaled fp8, refused ones)."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import QwenImageTransformer2DModel

from ldm.checkpoint import UNET_PREFIX, CheckpointError
from ldm.quant import quantize_fp8_
from ldm.qwen_image import QwenImageModel, is_qwen_image, msrope_ids, qwen_image_config_from_state_dict
from ldm.qwen_image_files import (
    QWEN_IMAGE_SHIFT,
    TINY_QWEN_IMAGE,
    QwenImageFamily,
    is_qwen_image_file,
    load_qwen_image_unet,
    peek_qwen_image,
    random_qwen_image,
    write_tiny_qwen_image,
)
from ldm.wan_files import WAN21_MEAN, WAN21_STD, write_tiny_wan
from tests.ldm.flux_reference import random_flux


@pytest.fixture(scope="module")
def model() -> QwenImageModel:
    return random_qwen_image(TINY_QWEN_IMAGE, seed=3)


def diffusers_twin(model: QwenImageModel) -> QwenImageTransformer2DModel:
    """diffusers' transformer loaded with `model`'s state dict by its own key names, strictly (diffusers' single-file
    loader maps Qwen-Image files to the model unchanged)."""
    c = model.config
    reference = QwenImageTransformer2DModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.joint_attention_dim,
        axes_dims_rope=c.axes_dim)
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference.eval()


def pipeline_call(reference: QwenImageTransformer2DModel, x: torch.Tensor, sigma: torch.Tensor,
                  context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """diffusers' transformer as QwenImagePipeline calls it: latents packed 2x2 (`_pack_latents`), img_shapes
    [(1, h/2, w/2)] per image, timestep = t (its timestep / 1000), the prompt's mask; the output unpacked."""
    b, ch, h, w = x.shape
    packed = x.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, ch * 4)
    with torch.no_grad():
        out = reference(packed, encoder_hidden_states=context, encoder_hidden_states_mask=mask, timestep=sigma,
                        img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


def inputs(h: int, w: int, tokens: int = 7, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, h, w, generator=g)
    context = torch.randn(batch, tokens, TINY_QWEN_IMAGE.context_dim, generator=g)
    return x, torch.tensor([0.9, 0.35])[:batch], context


@pytest.mark.parametrize(("h", "w"), [(8, 12), (6, 10), (10, 6)])  # odd patch grids (3 x 5) centre differently
def test_matches_diffusers(model, h, w):
    x, sigma, context = inputs(h, w)
    expected = pipeline_call(diffusers_twin(model), x, sigma, context, None)
    with torch.no_grad():
        got = model(x, sigma, context)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)
    assert expected.abs().mean() > 0.1


def test_prompt_mask_matches_diffusers(model):
    """A padded prompt: the second prompt's last 3 tokens are padding (mask 0), as the text encoder pads a batch."""
    x, sigma, context = inputs(8, 8)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    expected = pipeline_call(diffusers_twin(model), x, sigma, context, mask)
    with torch.no_grad():
        got = model(x, sigma, context, attn_mask=mask)
        unmasked = model(x, sigma, context)
        garbage = context.clone()
        garbage[1, 4:] = 100.0
        padded_changed = model(x, sigma, garbage, attn_mask=mask)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(got[0], unmasked[0], atol=1e-6, rtol=1e-6)  # an all-ones row masks nothing
    assert (got[1] - unmasked[1]).abs().max() > 1e-3
    torch.testing.assert_close(padded_changed, got, atol=1e-5, rtol=1e-5)  # the padding is not read


def test_odd_latent_sizes_are_padded_and_cropped(model):
    """Latents of odd size are padded to the patch (wrapping round, as ComfyUI pads) and the output cropped back."""
    x, sigma, context = inputs(7, 9)
    with torch.no_grad():
        got = model(x, sigma, context)
        padded = model(torch.nn.functional.pad(x, (0, 1, 0, 1), mode="circular"), sigma, context)
    assert got.shape == x.shape
    torch.testing.assert_close(got, padded[..., :7, :9])


def test_five_d_latents_and_scalar_timestep(model):
    x, sigma, context = inputs(8, 8, batch=1)
    with torch.no_grad():
        flat = model(x, sigma, context)
        video = model(x[:, :, None], torch.tensor(0.9), context)
    assert video.shape == (1, 16, 1, 8, 8)
    torch.testing.assert_close(video[:, :, 0], flat)
    with pytest.raises(ValueError, match="2 frames"):
        model(torch.randn(1, 16, 2, 8, 8), sigma, context)


def test_wrong_inputs_are_refused(model):
    x, sigma, context = inputs(8, 8)
    with pytest.raises(ValueError, match=r"Qwen2.5-VL prompt states \[B, L, 32\]"):
        model(x, sigma, torch.randn(2, 7, 4096))
    with pytest.raises(ValueError, match=r"latents \[B, 16, H, W\]"):
        model(torch.randn(2, 4, 8, 8), sigma, context)
    with pytest.raises(ValueError, match=r"takes \[B, 7\]"):
        model(x, sigma, context, attn_mask=torch.ones(2, 5))


def test_msrope_positions():
    """A 3 x 4 patch grid: rows -2..0, columns -2..1 (diffusers' scale_rope), text from max(3 // 2, 4 // 2) = 2."""
    ids = msrope_ids(3, 4, 2)
    assert ids[:2].tolist() == [[2, 2, 2], [3, 3, 3]]
    grid = ids[2:].view(3, 4, 3)
    assert grid[..., 0].eq(0).all()
    assert grid[:, 0, 1].tolist() == [-2, -1, 0]
    assert grid[0, :, 2].tolist() == [-2, -1, 0, 1]


def test_config_from_weights(model):
    sd = model.state_dict()
    assert is_qwen_image(sd) and not is_qwen_image(sd, UNET_PREFIX)
    assert qwen_image_config_from_state_dict(sd, TINY_QWEN_IMAGE.axes_dim) == TINY_QWEN_IMAGE
    with pytest.raises(ValueError, match="heads are 16 wide"):
        qwen_image_config_from_state_dict(sd)  # non-standard heads need their RoPE split
    released = {k: torch.empty(s, device="meta") for k, s in (
        ("img_in.weight", (3072, 64)), ("txt_in.weight", (3072, 3584)), ("proj_out.weight", (64, 3072)),
        ("transformer_blocks.0.attn.norm_q.weight", (128,)),
        ("transformer_blocks.0.img_mlp.net.0.proj.weight", (12288, 3072)),
        *((f"transformer_blocks.{i}.img_mod.1.weight", (18432, 3072)) for i in range(60)))}
    assert qwen_image_config_from_state_dict(released) == type(TINY_QWEN_IMAGE)()
    assert type(TINY_QWEN_IMAGE)().context_dim == 3584
    with pytest.raises(ValueError, match="Qwen-Image-Layered"):
        qwen_image_config_from_state_dict({**sd, "time_text_embed.addition_t_embedding.weight": torch.zeros(2, 32)})


def test_family():
    family = QwenImageFamily(TINY_QWEN_IMAGE)
    assert (family.name, family.prediction, family.latent_channels) == ("qwen_image", "flow", 16)
    assert family.latent_mean == WAN21_MEAN and family.latent_std == WAN21_STD
    assert family.latent_scale_factor == 1.0 and family.latent_shift == 0.0
    assert family.shift == QWEN_IMAGE_SHIFT == 3.1


@pytest.mark.parametrize("prefix", ["", UNET_PREFIX])
def test_file_round_trip(tmp_path, prefix):
    path = write_tiny_qwen_image(tmp_path / "qwen_image.safetensors", seed=5, dtype=torch.float32, prefix=prefix)
    assert is_qwen_image_file(path)
    assert peek_qwen_image(path) == QwenImageFamily(TINY_QWEN_IMAGE)
    loaded = load_qwen_image_unet(path, dtype=torch.float32)
    assert loaded.unused_keys == [] and loaded.family.unet_config == TINY_QWEN_IMAGE
    original = random_qwen_image(TINY_QWEN_IMAGE, seed=5)
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context), original(x, sigma, context))


def test_fp8_and_scaled_fp8_files_load(tmp_path):
    path = write_tiny_qwen_image(tmp_path / "qwen_image_fp8_e4m3fn.safetensors", seed=1, dtype=torch.float8_e4m3fn)
    loaded = load_qwen_image_unet(path, dtype=torch.float32)
    fp8 = safetensors.torch.load_file(path)
    weight = "transformer_blocks.0.attn.to_q.weight"
    assert fp8[weight].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(loaded.unet.state_dict()[weight], fp8[weight].float())
    # ComfyUI's scaled fp8: each weight stored divided by its `.scale_weight`, a `scaled_fp8` marker.
    scaled = {k: v for k, v in fp8.items()}
    scaled[weight] = (fp8[weight].float() / 4).to(torch.float8_e4m3fn)
    scaled[weight.replace(".weight", ".scale_weight")] = torch.tensor(4.0)
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    scaled_path = tmp_path / "qwen_image_scaled.safetensors"
    safetensors.torch.save_file(scaled, scaled_path, metadata=safetensors.safe_open(path, "pt").metadata())
    descaled = load_qwen_image_unet(scaled_path, dtype=torch.float32)
    assert descaled.unused_keys == []
    torch.testing.assert_close(descaled.unet.state_dict()[weight], scaled[weight].float() * 4)
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        assert torch.isfinite(descaled.unet(x, sigma, context)).all()


def test_other_files_are_refused_by_name(tmp_path):
    flux = tmp_path / "flux1-dev.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in random_flux().state_dict().items()}, flux)
    wan = write_tiny_wan(tmp_path / "wan2.1_t2v.safetensors")
    for path, kind in ((flux, "Flux"), (wan, "Wan")):
        assert not is_qwen_image_file(path) and peek_qwen_image(path) is None
        with pytest.raises(CheckpointError, match=f"{path.name}: not a Qwen-Image diffusion model.*{kind}"):
            load_qwen_image_unet(path)


def test_broken_files_are_refused(tmp_path):
    path = write_tiny_qwen_image(tmp_path / "qwen_image.safetensors", dtype=torch.float32)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-200])
    assert not is_qwen_image_file(truncated) and peek_qwen_image(truncated) is None
    with pytest.raises(CheckpointError):
        load_qwen_image_unet(truncated)
    missing = tmp_path / "missing.safetensors"
    sd = safetensors.torch.load_file(path)
    del sd["transformer_blocks.1.attn.to_k.weight"]
    safetensors.torch.save_file(sd, missing, metadata=safetensors.safe_open(path, "pt").metadata())
    with pytest.raises(CheckpointError, match="to_k"):
        load_qwen_image_unet(missing)


def test_dtype_follows_the_load(tmp_path):
    path = write_tiny_qwen_image(tmp_path / "qwen_image.safetensors")
    loaded = load_qwen_image_unet(path, dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        out = loaded.unet(x, sigma, context)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert dataclasses.replace(TINY_QWEN_IMAGE) == loaded.family.unet_config


def test_runs_with_fp8_weight_storage(model):
    """Weights kept in fp8 (`ldm.quant`, as a 20B model is held on a GPU) change the output only by their rounding;
    the compute dtype is still read from the prompt norm."""
    quantized = quantize_fp8_(random_qwen_image(TINY_QWEN_IMAGE, seed=3))
    assert quantized.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert quantized.dtype == torch.float32
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        expected, got = model(x, sigma, context), quantized(x, sigma, context)
    assert (got - expected).abs().mean() < 0.05 * expected.abs().mean()
