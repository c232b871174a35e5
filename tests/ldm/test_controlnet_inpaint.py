"""Alimama's inpainting ControlNets (ldm/controlnet_inpaint.py): the masked picture and keep mask, and a Flux
inpainting ControlNet in diffusers' layout (a 68-wide `controlnet_x_embedder`) against diffusers' FluxControlNetModel
given the same widened embedder and the packed hint."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import FluxPipeline

from ldm.checkpoint import CheckpointError
from ldm.controlnet import load_controlnet
from ldm.controlnet_flux import FluxControlNet
from ldm.controlnet_inpaint import append_keep_mask, masked_picture
from tests.ldm.flux_reference import TINY
from tests.ldm.test_controlnet_flux import diffusers_controlnet, inputs, pack


def diffusers_inpainting_controlnet(seed: int = 0, **kwargs):
    """diffusers' FluxControlNetModel with Alimama's hint embedding: 68 values a token (16 latent channels and the
    mask, 2x2 patches), random as the rest."""
    model = diffusers_controlnet(seed, **kwargs)
    embedder = torch.nn.Linear(68, model.inner_dim)
    with torch.no_grad():
        embedder.weight.copy_(torch.randn(embedder.weight.shape, generator=torch.Generator().manual_seed(seed)) / 8)
        embedder.bias.zero_()
    model.controlnet_x_embedder = embedder
    return model


def write(model, path) -> None:
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def test_inpainting_flux_controlnet_loads_and_matches_diffusers(tmp_path) -> None:
    reference = diffusers_inpainting_controlnet(seed=2)
    write(reference, tmp_path / "inpaint.safetensors")
    loaded = load_controlnet(tmp_path / "inpaint.safetensors")
    assert isinstance(loaded.model, FluxControlNet) and loaded.unused_keys == [] and loaded.model.mask_channels == 1
    # The RoPE split of 16-wide heads is the model's (FluxControl.fit takes it when sampling).
    loaded.model.config = dataclasses.replace(loaded.model.config, axes_dim=TINY.axes_dim)
    x, latents, context, pooled, sigma, guidance = inputs(3)
    keep = (torch.rand(2, 1, 6, 8, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    hint = torch.cat([latents, keep], dim=1)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    with torch.no_grad():
        # Alimama's pipeline packs the latents (64 values a token) and the mask (4) apart, then joins them.
        packed = torch.cat([pack(latents), pack(keep)], dim=-1)
        doubles, singles = reference(hidden_states=pack(x), controlnet_cond=packed, encoder_hidden_states=context,
                                     pooled_projections=pooled, timestep=sigma, guidance=guidance, img_ids=ids,
                                     txt_ids=torch.zeros(5, 3), return_dict=False)
        ours = loaded.model(x, hint, sigma, context, torch.cat([pooled, guidance[:, None]], dim=1), blocks=(2, 1))
        other_mask = loaded.model(x, torch.cat([latents, 1 - keep], dim=1), sigma, context,
                                  torch.cat([pooled, guidance[:, None]], dim=1), blocks=(2, 1))
    for mine, theirs in zip(ours, [*doubles, *singles], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (ours[0] - other_mask[0]).abs().mean() > 1e-3  # the mask channel is read
    write(diffusers_controlnet(seed=2), tmp_path / "canny.safetensors")
    assert load_controlnet(tmp_path / "canny.safetensors").model.mask_channels == 0


def test_a_hint_embedding_of_a_width_no_channel_count_gives_is_refused(tmp_path) -> None:
    model = diffusers_controlnet(seed=1)
    model.controlnet_x_embedder = torch.nn.Linear(66, model.inner_dim)
    write(model, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="odd.safetensors: a Flux ControlNet whose hint embedding takes 66 "
                                              "values a token"):
        load_controlnet(tmp_path / "odd.safetensors")


def test_masked_picture_blacks_out_what_rounds_to_masked():
    image = torch.rand(1, 3, 4, 6, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.1
    mask = torch.tensor([[0.0, 0.2, 0.49, 0.5, 0.8, 1.0]]).expand(4, 6)[None]
    pixels, keep = masked_picture(image, mask)
    assert torch.equal(keep, 1 - mask[:, None])
    assert torch.equal(pixels[..., :3], image[..., :3]) and bool((pixels[..., 3:] == 0).all())
    two, _ = masked_picture(image.expand(2, -1, -1, -1), mask)  # one mask for every picture
    assert torch.equal(two, pixels.expand(2, -1, -1, -1))
    half, _ = masked_picture(image, torch.zeros(1, 2, 3))  # a mask of another size is resized to the picture
    assert torch.equal(half, image)
    with pytest.raises(ValueError, match="a batch of 2 and its mask of 3"):
        masked_picture(image.expand(2, -1, -1, -1), torch.zeros(3, 4, 6))


def test_the_keep_mask_follows_the_latents_at_their_size():
    latents = torch.randn(2, 16, 3, 4)
    keep = torch.zeros(1, 1, 24, 32)
    keep[..., 8:16, :16] = 1  # latent rows 1, columns 0..1
    hint = append_keep_mask(latents, keep)
    assert hint.shape == (2, 17, 3, 4) and torch.equal(hint[:, :16], latents)
    expected = torch.zeros(3, 4)
    expected[1, :2] = 1
    assert torch.equal(hint[0, 16], expected) and torch.equal(hint[1, 16], expected)
