"""Qwen-Image ControlNets (diffusers' QwenImageControlNetModel layout, InstantX's): Loom's residuals, and the
transformer's output with them, against diffusers' with the same weights; the hint's latents as diffusers' pipeline
forms them; the model's block patches; the file, its family and the refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKLWan, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.controlnets.controlnet_qwenimage import QwenImageControlNetModel

from ldm.checkpoint import CheckpointError, load_state_dict, write_safetensors
from ldm.controlnet import load_controlnet, peek_controlnet_family
from ldm.controlnet_qwen_image import (
    QwenImageControl,
    QwenImageControlNet,
    encode_hint,
    is_qwen_image_controlnet,
    random_qwen_image_controlnet,
    write_tiny_qwen_image_controlnet,
)
from ldm.qwen_image import QwenImageModel, with_block_patch
from ldm.qwen_image_files import TINY_QWEN_IMAGE, random_qwen_image
from ldm.sampling.flow import FlowSchedule
from ldm.wan_vae_files import TINY_WAN21, random_wan_vae
from tests.ldm.flux_reference import random_flux

THREE_BLOCKS = dataclasses.replace(TINY_QWEN_IMAGE, num_layers=3)  # a 2-block ControlNet: residual 0 serves blocks 0, 1


@pytest.fixture(scope="module")
def model() -> QwenImageModel:
    return random_qwen_image(THREE_BLOCKS, seed=3)


def diffusers_controlnet(controlnet: QwenImageControlNet) -> QwenImageControlNetModel:
    """diffusers' ControlNet loaded strictly with `controlnet`'s weights by their (shared) key names."""
    c = controlnet.config
    reference = QwenImageControlNetModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.joint_attention_dim,
        axes_dims_rope=c.axes_dim, extra_condition_channels=controlnet.mask_channels * c.patch_size**2)
    reference.load_state_dict(controlnet.state_dict(), strict=True)
    return reference.eval()


def diffusers_transformer(model: QwenImageModel) -> QwenImageTransformer2DModel:
    c = model.config
    reference = QwenImageTransformer2DModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.joint_attention_dim,
        axes_dims_rope=c.axes_dim)
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference.eval()


def pack(x: torch.Tensor) -> torch.Tensor:
    return QwenImagePipeline._pack_latents(x, *x.shape)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return QwenImagePipeline._unpack_latents(tokens, h * 8, w * 8, 8)[:, :, 0]


def inputs(h: int, w: int, hint_channels: int = 16, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x, hint = torch.randn(2, 16, h, w, generator=g), torch.randn(2, hint_channels, h, w, generator=g)
    context = torch.randn(2, 6, TINY_QWEN_IMAGE.context_dim, generator=g)
    return x, hint, context, torch.tensor([0.9, 0.35])


def reference_kwargs(x: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor) -> dict:
    """How diffusers' QwenImageControlNetPipeline calls its ControlNet and transformer (timestep t in 0..1)."""
    b, _, h, w = x.shape
    return {"hidden_states": pack(x), "encoder_hidden_states": context, "timestep": sigma,
            "img_shapes": [[(1, h // 2, w // 2)]] * b, "return_dict": False}


@pytest.mark.parametrize(("h", "w", "inpaint"), [(8, 8, False), (6, 10, False), (8, 12, True)])
def test_residuals_and_guided_model_match_diffusers(model, h, w, inpaint) -> None:
    controlnet = random_qwen_image_controlnet(TINY_QWEN_IMAGE, blocks=2, seed=5, inpaint=inpaint)
    reference = diffusers_controlnet(controlnet)
    x, hint, context, sigma = inputs(h, w, 17 if inpaint else 16, seed=h + w)
    with torch.no_grad():
        samples = reference(controlnet_cond=pack(hint), conditioning_scale=1.0, **reference_kwargs(x, context, sigma))
        ours = controlnet(x, hint, sigma, context)
    assert len(ours) == 2
    for mine, theirs in zip(ours, samples, strict=True):
        assert theirs.abs().mean() > 0.05
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)

    transformer = diffusers_transformer(model)
    with torch.no_grad():
        guided = model(x, sigma, context, control=ours)
        spread = model(x, sigma, context, control=controlnet(x, hint, sigma, context, blocks=3))
        plain = model(x, sigma, context)
        expected = transformer(controlnet_block_samples=list(samples), **reference_kwargs(x, context, sigma))[0]
    assert (guided - plain).abs().mean() > 1e-2
    torch.testing.assert_close(guided, unpack(expected, h, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spread, guided, rtol=0, atol=0)


def test_hint_latents_as_diffusers_pipeline_forms_them() -> None:
    """VAE-encoded (Wan 2.1's), normalised by the VAE config's latents_mean and latents_std, as
    QwenImageControlNetPipeline does; the hint cropped and resized to the latent's size first."""
    vae = random_wan_vae(TINY_WAN21, seed=2)
    twin = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=16)
    twin.load_state_dict(convert_wan_vae_to_diffusers(dict(vae.state_dict())), strict=True)
    image = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    ours = encode_hint(vae, image, 6, 10)
    mean = torch.tensor(twin.config.latents_mean).view(1, 16, 1, 1, 1)
    std = 1.0 / torch.tensor(twin.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        expected = (twin.eval().encode(image[:, :, None] * 2 - 1).latent_dist.mode() - mean) * std
    assert ours.shape == (2, 16, 6, 10)
    torch.testing.assert_close(ours, expected[:, :, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Qwen-Image's \\(Wan 2.1's\\) VAE, of 16"):
        encode_hint(random_wan_vae(dataclasses.replace(TINY_WAN21, z_dim=8)), image, 6, 10)


def test_control_fits_the_model_and_acts_in_the_sampler_call(model, tmp_path) -> None:
    """What the KSampler does: `fit` takes the model's RoPE split, block count and levels; `residuals` encodes the
    hint at the latent's size and scales the spread residuals by the strength."""
    config = dataclasses.replace(TINY_QWEN_IMAGE, head_dim=12, axes_dim=(4, 4, 4))  # heads not 128 wide
    small = random_qwen_image(dataclasses.replace(config, num_layers=3), seed=1)
    path = write_tiny_qwen_image_controlnet(tmp_path / "cn.safetensors", config, blocks=2, seed=4)
    controlnet = load_controlnet(path).model
    assert controlnet.config.axes_dim == (12, 0, 0)  # provisional until fitted
    vae = random_wan_vae(TINY_WAN21, seed=2)
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3))
    control = QwenImageControl(controlnet, image, strength=0.7, vae=vae, percent_range=(0.0, 0.6))
    assert control.fit(small, FlowSchedule(1.0)) is None
    assert controlnet.config.axes_dim == (4, 4, 4) and controlnet.model_blocks == 3
    assert control.sigma_range == (FlowSchedule(1.0).sigma_at_percent(0.0), FlowSchedule(1.0).sigma_at_percent(0.6))
    x, _, context, sigma = inputs(6, 8, seed=9)
    with torch.no_grad():
        residuals = control.residuals(x, 0.8, sigma, context, None, repeats=2)
        hint = encode_hint(vae, image, 6, 8).expand(2, -1, -1, -1)
        expected = [0.7 * r for r in controlnet(x, hint, sigma, context, blocks=2)]  # its own two
        assert control.residuals(x, 0.5, sigma, context, None) is None  # past its end (level 0.64)
    assert len(residuals) == 3
    for got, want in zip(residuals, [expected[0], expected[0], expected[1]], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (small(x, sigma, context, control=residuals) - small(x, sigma, context)).abs().mean() > 1e-3
    unencoded = QwenImageControl(controlnet, image)
    assert unencoded.fit(small, FlowSchedule(1.0)) is None
    with pytest.raises(ValueError, match="needs Qwen-Image's VAE to encode its hint image"):
        unencoded.residuals(x, 0.8, sigma, context, None)


def test_the_prompts_padding_mask_reaches_the_controlnet(model) -> None:
    """A batch of prompts padded to one length: the sampler's residuals call hands the ControlNet the mask the model
    gets, so its padding is ignored as diffusers' pipeline ignores it (encoder_hidden_states_mask)."""
    controlnet = random_qwen_image_controlnet(TINY_QWEN_IMAGE, blocks=2, seed=5)
    reference = diffusers_controlnet(controlnet)
    x, hint, context, sigma = inputs(6, 8, seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    control = QwenImageControl(controlnet, torch.rand(2, 3, 48, 64), vae=None)
    control._latents[6, 8] = hint  # encoded already: the hint's latents as the ControlNet takes them
    with torch.no_grad():
        masked = control.residuals(x, 0.8, sigma, context, None, attn_mask=mask)
        unmasked = control.residuals(x, 0.8, sigma, context, None)
        expected = reference(controlnet_cond=pack(hint), conditioning_scale=1.0, encoder_hidden_states_mask=mask,
                             **reference_kwargs(x, context, sigma))
    for got, want in zip(masked, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (masked[0][1] - unmasked[0][1]).abs().max() > 1e-3  # the padded prompt's row
    torch.testing.assert_close(masked[0][0], unmasked[0][0], rtol=0, atol=0)  # the unpadded one's


def test_file_round_trip_and_family(tmp_path) -> None:
    path = write_tiny_qwen_image_controlnet(tmp_path / "Qwen-Image-InstantX-ControlNet-Union.safetensors", seed=2)
    loaded = load_controlnet(path)
    assert isinstance(loaded.model, QwenImageControlNet) and loaded.family == "qwen_image"
    assert loaded.unused_keys == [] and loaded.model.mask_channels == 0 and loaded.model.config.num_layers == 1
    written = load_state_dict(path)
    assert is_qwen_image_controlnet(written)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, written[key])
    assert peek_controlnet_family(path) == "qwen_image"
    inpaint = load_controlnet(write_tiny_qwen_image_controlnet(tmp_path / "inpaint.safetensors", inpaint=True))
    assert inpaint.model.mask_channels == 1 and inpaint.model.controlnet_x_embedder.in_features == 68
    # A file saved from diffusers' own model loads the same.
    reference = diffusers_controlnet(random_qwen_image_controlnet(seed=2))
    write_safetensors(reference.state_dict(), tmp_path / "diffusers.safetensors", {})
    again = load_controlnet(tmp_path / "diffusers.safetensors")
    assert again.unused_keys == [] and isinstance(again.model, QwenImageControlNet)
    with_extra = {**written, "controlnet_mode_embedder.weight": torch.zeros(3, 64)}
    write_safetensors(with_extra, tmp_path / "extra.safetensors", {})
    assert load_controlnet(tmp_path / "extra.safetensors").unused_keys == ["controlnet_mode_embedder.weight"]


def test_refusals(model, tmp_path) -> None:
    path = write_tiny_qwen_image_controlnet(tmp_path / "cn.safetensors", blocks=2)
    controlnet = load_controlnet(path).model
    hint = torch.zeros(1, 3, 32, 32)
    assert QwenImageControl(controlnet, hint).fit(random_flux(), FlowSchedule(1.0)) == (
        "a Qwen-Image ControlNet runs with Qwen-Image models only")
    wider = random_qwen_image(dataclasses.replace(TINY_QWEN_IMAGE, num_heads=3), seed=0)
    assert "made for a Qwen-Image model with dim 32, and this one has 48" in QwenImageControl(controlnet, hint).fit(
        wider, FlowSchedule(1.0))
    one_block = random_qwen_image(dataclasses.replace(TINY_QWEN_IMAGE, num_layers=1), seed=0)
    assert "2 blocks, more than the model's 1" in QwenImageControl(controlnet, hint).fit(one_block, FlowSchedule(1.0))

    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_controlnet(tmp_path / "truncated.safetensors")
    sd = load_state_dict(path)
    del sd["controlnet_blocks.1.weight"]
    write_safetensors(sd, tmp_path / "incomplete.safetensors", {})
    with pytest.raises(CheckpointError, match="incomplete.safetensors: the Qwen-Image ControlNet is missing 1 "
                                              "weights: controlnet_blocks.1.weight"):
        load_controlnet(tmp_path / "incomplete.safetensors")
    sd = load_state_dict(path)
    sd["controlnet_x_embedder.weight"] = torch.zeros(32, 66)
    write_safetensors(sd, tmp_path / "odd.safetensors", {})
    with pytest.raises(CheckpointError, match="odd.safetensors: a Qwen-Image ControlNet whose hint embedding takes 66"):
        load_controlnet(tmp_path / "odd.safetensors")

    x, hint, context, sigma = inputs(8, 8)
    residual = torch.zeros(2, 16, 32)
    with pytest.raises(ValueError, match="4 ControlNet residuals for a Qwen-Image model of 3 blocks"):
        model(x, sigma, context, control=[residual] * 4)
    with pytest.raises(ValueError, match=r"a ControlNet residual of shape \[2, 20, 32\] .* takes \[2, 16, 32\]"):
        model(x, sigma, context, control=[torch.zeros(2, 20, 32)])
    with pytest.raises(ValueError, match="a Qwen-Image ControlNet hint of shape"):
        controlnet(x, hint[:, :, :6], sigma, context)


def test_block_patch_adds_after_its_block_as_a_hook_on_diffusers_would(model) -> None:
    """A patch returning a known residual after block 1 changes the output exactly as adding it to diffusers'
    hidden states after that block does; it sees the noisy latent's tokens and the unpadded latent size."""
    x, _, context, sigma = inputs(6, 10, seed=4)
    residual = torch.randn(2, 15, 32, generator=torch.Generator().manual_seed(8))
    seen = []

    def patch(i: int, img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
        seen.append((i, tuple(img.shape), size))
        return residual if i == 1 else None

    patched = with_block_patch(model, patch)
    assert model.block_patches == () and patched.block_patches == (patch,)
    transformer = diffusers_transformer(model)
    hook = transformer.transformer_blocks[1].register_forward_hook(lambda m, args, out: (out[0], out[1] + residual))
    with torch.no_grad():
        got, plain = patched(x, sigma, context), model(x, sigma, context)
        expected = transformer(**reference_kwargs(x, context, sigma))[0]
    hook.remove()
    assert seen == [(i, (2, 15, 32), (6, 10)) for i in range(3)]
    assert (got - plain).abs().mean() > 1e-2
    torch.testing.assert_close(got, unpack(expected, 6, 10), rtol=1e-5, atol=1e-5)
    # Control residuals come first, then the patches; the two add up.
    control = [torch.randn(2, 15, 32, generator=torch.Generator().manual_seed(9))]
    hooks = [block.register_forward_hook(lambda m, args, out: (out[0], out[1] + control[0]))
             for block in transformer.transformer_blocks]
    hooks.append(transformer.transformer_blocks[1].register_forward_hook(
        lambda m, args, out: (out[0], out[1] + residual)))
    with torch.no_grad():
        both = patched(x, sigma, context, control=control)
        expected = transformer(**reference_kwargs(x, context, sigma))[0]
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(both, unpack(expected, 6, 10), rtol=1e-5, atol=1e-5)


def test_references_get_no_residuals(model) -> None:
    """An edit model's reference tokens: the control and the patches see and change the noisy latent's tokens only."""
    x, hint, context, sigma = inputs(6, 8, seed=2)
    ref = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    seen = []
    patched = with_block_patch(model, lambda i, img, size: seen.append(img.shape) or torch.zeros_like(img))
    zeros = [torch.zeros(2, 12, 32)]
    with torch.no_grad():
        plain = model(x, sigma, context, ref_latents=[ref])
        same = patched(x, sigma, context, ref_latents=[ref], control=zeros)
        residual = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(4))
        guided = model(x, sigma, context, ref_latents=[ref], control=[residual])
    assert seen == [torch.Size([2, 12, 32])] * 3
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    assert (guided - plain).abs().mean() > 1e-3
