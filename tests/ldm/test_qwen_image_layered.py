"""Qwen-Image-Layered against diffusers: the transformer (QwenImageTransformer2DModel with use_additional_t_cond and
use_layer3d_rope, called as QwenImageLayeredPipeline calls it), the RGBA VAE (AutoencoderKLQwenImage with
input_channels=4; its keys are AutoencoderKLWan's, renamed by diffusers' own Wan converter), and a short denoising
loop (the pipeline's transformer calls, true CFG and scheduler steps on the same noise and sigmas)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ldm.qwen_image import QwenImageModel, qwen_image_config_from_state_dict
from ldm.qwen_image_files import (
    TINY_QWEN_IMAGE_LAYERED,
    load_qwen_image_unet,
    random_qwen_image,
)
from ldm.qwen_image_presets import make_qwen_image_layered_files
from ldm.wan_vae import WanVAE
from ldm.wan_vae_files import TINY_QWEN_LAYERED_VAE, load_wan_vae, peek_wan_vae, random_wan_vae

LAYERS = 2  # frames = layers + 1 (the composite first)


@pytest.fixture(scope="module")
def model() -> QwenImageModel:
    return random_qwen_image(TINY_QWEN_IMAGE_LAYERED, seed=5)


@pytest.fixture(scope="module")
def reference(model) -> QwenImageTransformer2DModel:
    """diffusers' transformer configured as the Layered model, loaded strictly with `model`'s state dict."""
    c = model.config
    twin = QwenImageTransformer2DModel(
        patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.joint_attention_dim,
        axes_dims_rope=c.axes_dim, use_additional_t_cond=True, use_layer3d_rope=True)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


def _pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, h, w] -> [B, F*h/2*w/2, 4C], frame by frame (the pipeline's `_pack_latents`)."""
    b, c, f, h, w = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(b, f, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, f * (h // 2) * (w // 2), c * 4)


def _unpack(tokens: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    x = tokens.view(b, frames, h // 2, w // 2, d // 4, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, d // 4, frames, h, w)


def pipeline_call(twin: QwenImageTransformer2DModel, x: torch.Tensor, cond: torch.Tensor, sigma: torch.Tensor,
                  context: torch.Tensor, mask: torch.Tensor | None = None,
                  t_cond: torch.Tensor | None = None) -> torch.Tensor:
    """The pipeline's call: noisy frames then the condition image's tokens, img_shapes per frame plus the
    condition's, timestep t (its timestep / 1000), additional_t_cond = is_rgb (zeros); the frames' part unpacked."""
    b, _, f, h, w = x.shape
    ch, cw = cond.shape[-2:]
    shapes = [[*[(1, h // 2, w // 2)] * f, (1, ch // 2, cw // 2)]] * b
    t_cond = torch.zeros(b, dtype=torch.long) if t_cond is None else t_cond
    packed = _pack(x)
    with torch.no_grad():
        out = twin(torch.cat([packed, _pack(cond[:, :, None])], dim=1), encoder_hidden_states=context,
                   encoder_hidden_states_mask=mask, timestep=sigma, img_shapes=shapes, additional_t_cond=t_cond,
                   return_dict=False)[0]
    return _unpack(out[:, :packed.shape[1]], f, h, w)


def inputs(h: int, w: int, batch: int = 2, tokens: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, LAYERS + 1, h, w, generator=g)
    cond = torch.randn(batch, 16, h, w, generator=g)
    context = torch.randn(batch, tokens, TINY_QWEN_IMAGE_LAYERED.context_dim, generator=g)
    return x, cond, torch.tensor([0.8, 0.3])[:batch], context


@pytest.mark.parametrize(("h", "w"), [(4, 4), (8, 12), (6, 10)])  # 2 x 2 patches: the text starts after the layers
def test_transformer_matches_diffusers(model, reference, h, w):
    x, cond, sigma, context = inputs(h, w)
    expected = pipeline_call(reference, x, cond, sigma, context)
    with torch.no_grad():
        got = model(x, sigma, context, ref_latents=[cond], text_after_all_images=True)
    assert got.shape == x.shape
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)


def test_mask_and_timestep_class_match_diffusers(model, reference):
    x, cond, sigma, context = inputs(8, 8, seed=1)
    mask = torch.ones(2, context.shape[1])
    mask[1, 4:] = 0
    t_cond = torch.tensor([1, 0])
    expected = pipeline_call(reference, x, cond, sigma, context, mask, t_cond)
    with torch.no_grad():
        got = model(x, sigma, context, attn_mask=mask, ref_latents=[cond], text_after_all_images=True,
                    additional_t_cond=t_cond)
        plain = model(x, sigma, context, attn_mask=mask, ref_latents=[cond], text_after_all_images=True)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)
    assert (got[0] - plain[0]).abs().max() > 1e-3 and torch.equal(got[1], plain[1])  # class 1 changes sample 0


def test_comfyui_text_start_agrees_once_the_latent_is_large_enough(model):
    # ComfyUI starts the text after the latent's half-size only; with 3 frames and 6 x 6 patches both give 3.
    x, cond, sigma, context = inputs(12, 12, seed=2)
    with torch.no_grad():
        comfy = model(x, sigma, context, ref_latents=[cond])
        diffusers_start = model(x, sigma, context, ref_latents=[cond], text_after_all_images=True)
        small = [model(x[..., :4, :4], sigma, context, ref_latents=[cond[..., :4, :4]], text_after_all_images=a)
                 for a in (False, True)]
    torch.testing.assert_close(comfy, diffusers_start, atol=0, rtol=0)
    assert (small[0] - small[1]).abs().max() > 1e-4  # 2 x 2 patches: 1 vs 3


def test_text_to_layers_and_one_frame(model):
    x, _, sigma, context = inputs(8, 8, seed=3)
    with torch.no_grad():
        layers = model(x, sigma, context)  # ComfyUI's Text to Layers: no reference
        one = model(x[:, :, :1], sigma, context)
        image = model(x[:, :, 0], sigma, context)
    assert layers.shape == x.shape and one.shape == x[:, :, :1].shape
    torch.testing.assert_close(one[:, :, 0], image, atol=0, rtol=0)


def test_plain_qwen_image_refuses_layers_and_the_extra_input():
    plain = random_qwen_image(seed=1)
    x, _, sigma, context = inputs(4, 4)
    with pytest.raises(ValueError, match="only Qwen-Image-Layered"):
        plain(x, sigma, context)
    with pytest.raises(ValueError, match="additional_t_cond"):
        plain(x[:, :, 0], sigma, context, additional_t_cond=torch.zeros(2, dtype=torch.long))


def test_config_and_files(tmp_path, model):
    sd = model.state_dict()
    with pytest.raises(ValueError, match="Qwen-Image-Layered"):
        qwen_image_config_from_state_dict(sd, TINY_QWEN_IMAGE_LAYERED.axes_dim)
    assert qwen_image_config_from_state_dict(sd, TINY_QWEN_IMAGE_LAYERED.axes_dim,
                                             layered=True) == TINY_QWEN_IMAGE_LAYERED
    paths = make_qwen_image_layered_files(tmp_path, seed=5, dtype=torch.float32)
    loaded = load_qwen_image_unet(paths["unet"], dtype=torch.float32)
    assert loaded.family.unet_config == TINY_QWEN_IMAGE_LAYERED and loaded.unused_keys == []
    assert loaded.family.name == "qwen_image" and loaded.family.latent_channels == 16
    x, cond, sigma, context = inputs(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, sigma, context, ref_latents=[cond]),
                                   model(x, sigma, context, ref_latents=[cond]))
    assert peek_wan_vae(paths["vae"]) == "wan21"
    assert load_wan_vae(paths["vae"]).config == TINY_QWEN_LAYERED_VAE


@pytest.fixture(scope="module")
def vae_pair() -> tuple[WanVAE, AutoencoderKLQwenImage]:
    vae = random_wan_vae(TINY_QWEN_LAYERED_VAE, seed=4)
    c = vae.config
    twin = AutoencoderKLQwenImage(base_dim=c.base_dim, z_dim=c.z_dim, input_channels=c.image_channels)
    twin.load_state_dict(convert_wan_vae_to_diffusers(dict(vae.state_dict())), strict=True)
    return vae, twin.eval()


def test_rgba_vae_matches_diffusers(vae_pair):
    vae, twin = vae_pair
    pixels = torch.rand(2, 4, 1, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 16, 1, 3, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        latent, expected_latent = vae.encode(pixels).mode(), twin.encode(pixels).latent_dist.mode()
        decoded, expected_pixels = vae.decode(z), twin.decode(z).sample
    assert latent.shape == (2, 16, 1, 3, 5) and decoded.shape == (2, 4, 1, 24, 40)
    assert expected_latent.abs().mean() > 0.05 and expected_pixels.abs().mean() > 0.05
    torch.testing.assert_close(latent, expected_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, expected_pixels, atol=1e-5, rtol=1e-5)


def test_rgb_pixels_get_an_opaque_alpha(vae_pair):
    vae, _ = vae_pair
    rgb = torch.rand(1, 3, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        got = vae.encode(rgb).mode()
        expected = vae.encode(torch.cat([rgb, torch.ones_like(rgb[:, :1])], dim=1)).mode()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"\[B, 4, T>=1"):
        vae.encode(rgb[:, :2])


def _qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's scheduler config (Qwen/Qwen-Image-Layered's scheduler_config.json has the same keys)."""
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def test_denoising_loop_matches_the_pipeline(model, reference):
    """Four steps of QwenImageLayeredPipeline's loop (true CFG 4, no normalisation) against Loom's model with the
    same noise, condition, prompt embeddings and sigmas, stepped by Euler: x += (next sigma - sigma) * velocity."""
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(1, 16, LAYERS + 1, 8, 8, generator=g)
    cond = torch.randn(1, 16, 8, 8, generator=g)
    pos = torch.randn(1, 5, TINY_QWEN_IMAGE_LAYERED.context_dim, generator=g)
    neg = torch.randn(1, 3, TINY_QWEN_IMAGE_LAYERED.context_dim, generator=g)
    steps, scale = 4, 4.0
    scheduler = _qwen_scheduler()
    scheduler.set_timesteps(sigmas=list(torch.linspace(1.0, 0, steps + 1)[:-1].tolist()),
                            mu=(cond.shape[-2] * cond.shape[-1] / 4 / 256) ** 0.5)
    sigmas = scheduler.sigmas.clone()

    latents = _pack(noise)
    for t in scheduler.timesteps:
        sigma = (t / 1000).expand(1)
        v_pos, v_neg = (_pack(pipeline_call(reference, _unpack(latents, LAYERS + 1, 8, 8), cond, sigma, c))
                        for c in (pos, neg))
        latents = scheduler.step(v_neg + scale * (v_pos - v_neg), t, latents, return_dict=False)[0]
    expected = _unpack(latents, LAYERS + 1, 8, 8)

    x = noise
    with torch.no_grad():
        for i in range(steps):
            sigma = sigmas[i].expand(1)
            v_pos, v_neg = (model(x, sigma, c, ref_latents=[cond], text_after_all_images=True) for c in (pos, neg))
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_neg + scale * (v_pos - v_neg))
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(x, expected, atol=1e-4, rtol=1e-4)
