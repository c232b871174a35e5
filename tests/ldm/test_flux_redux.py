"""Flux Redux and its SigLIP image encoder on tiny random weights in the real file layouts: the SigLIP tower read
from ComfyUI users' layout (`vision_model.*` with its pooling head) against transformers' SiglipVisionModel, the
Redux projection against diffusers' ReduxImageEncoder, and the errors of wrong or incomplete files."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder as DiffusersRedux

from ldm.checkpoint import CheckpointError
from ldm.clip_vision import load_clip_vision, preprocess
from ldm.flux_redux import ReduxImageEncoder
from ldm.siglip import SIGLIP_MEAN, SIGLIP_STD, SiglipVision
from ldm.style_model import load_style_model
from tests.ldm.test_clip_vision import _randomize, _smooth_image

SIZE = 56  # 4 x 4 patches of 14 pixels, as so400m's 27 x 27 at 384


def siglip_reference(seed: int = 0):
    """A tiny SigLIP tower with its pooling head, as transformers builds it (27 layers, 1152 wide in so400m)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                                image_size=SIZE, patch_size=14)
    return _randomize(SiglipVisionModel(config), seed)


def siglip_file_state(reference) -> dict[str, torch.Tensor]:
    """The tower's weights as sigclip_vision_patch14_384.safetensors holds them: under `vision_model.`."""
    return {f"vision_model.{k.removeprefix('vision_model.')}": v.contiguous()
            for k, v in reference.state_dict().items()}


def redux_reference(seed: int = 0, width: int = 32, context_dim: int = 32) -> DiffusersRedux:
    return _randomize(DiffusersRedux(redux_dim=width, txt_in_features=context_dim), seed)


def _siglip_processed(image: torch.Tensor) -> torch.Tensor:
    """transformers' PIL image processor on the same 8-bit picture, with SigLIP's mean and std: the shortest side
    resized to the tower's size and the centre cropped (ComfyUI's crop "center")."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                      image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    pixels = (image[0].numpy() * 255).round().astype(np.uint8)
    return processor(images=pixels, return_tensors="pt")["pixel_values"]


def test_siglip_file_encodes_as_transformers_siglip(tmp_path):
    reference = siglip_reference(seed=1)
    path = tmp_path / "sigclip_vision_tiny.safetensors"
    safetensors.torch.save_file(siglip_file_state(reference), path)
    loaded = load_clip_vision(path)
    assert isinstance(loaded.model, SiglipVision) and loaded.unused_keys == []  # the pooling head is known
    assert (loaded.model.config.width, loaded.model.config.layers, loaded.model.config.image_size) == (32, 3, SIZE)
    image = _smooth_image(2, SIZE, SIZE)  # at the tower's size: no resizing, only the 8-bit normalisation
    ours = loaded.model.encode(image)
    with torch.no_grad():
        theirs = reference(pixel_values=(image.permute(0, 3, 1, 2) - 0.5) / 0.5, output_hidden_states=True)
    assert ours.last_hidden_state.shape == (1, 16, 32)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.image_embeds, theirs.last_hidden_state, rtol=1e-5, atol=1e-5)  # as ComfyUI's
    torch.testing.assert_close(ours.penultimate_hidden_states, theirs.hidden_states[-2], rtol=1e-5, atol=1e-5)
    # The final LayerNorm is applied (Redux reads normalised tokens): the raw last layer differs.
    assert (ours.last_hidden_state - theirs.hidden_states[-1]).abs().max() > 0.1


def test_siglip_preprocessing_is_the_processors_with_mean_and_std_half():
    image = _smooth_image(5, 70, 100)
    ours = preprocess(image, SIZE, True, SIGLIP_MEAN, SIGLIP_STD)
    # torch's antialiased bicubic against PIL's, each rounded to 8 bits: a level apart at most.
    assert (ours - _siglip_processed(image)).abs().max() <= 1.01 / 255 / 0.5
    assert ours.min() < -0.5 and ours.max() > 0.0  # 0.5-centred, not CLIP's mean


def test_redux_matches_diffusers_redux_image_encoder(tmp_path):
    reference = redux_reference(seed=3)
    path = tmp_path / "flux1-redux-tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    loaded = load_style_model(path)
    assert isinstance(loaded.model, ReduxImageEncoder) and loaded.unused_keys == []
    assert tuple(loaded.model.redux_up.weight.shape) == (96, 32)  # 3x the text width, as flux1-redux-dev's 12288
    hidden = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = loaded.model(hidden), reference(hidden).image_embeds
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert theirs.abs().max() > 1e-2


def test_siglip_then_redux_is_the_prior_redux_chain(tmp_path):
    """What FluxPriorReduxPipeline computes from pixel values (its image encoder, then its embedder)."""
    siglip, redux = siglip_reference(seed=6), redux_reference(seed=7)
    safetensors.torch.save_file(siglip_file_state(siglip), tmp_path / "sigclip.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in redux.state_dict().items()},
                                tmp_path / "redux.safetensors")
    image = _smooth_image(8, SIZE, SIZE)
    ours = load_style_model(tmp_path / "redux.safetensors").model(
        load_clip_vision(tmp_path / "sigclip.safetensors").model.encode(image).last_hidden_state)
    with torch.no_grad():
        theirs = redux(siglip(pixel_values=(image.permute(0, 3, 1, 2) - 0.5) / 0.5).last_hidden_state).image_embeds
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_wrong_and_incomplete_files_are_named(tmp_path):
    redux = redux_reference().state_dict()
    del redux["redux_down.bias"]
    safetensors.torch.save_file(redux, tmp_path / "half-redux.safetensors")
    with pytest.raises(CheckpointError, match="incomplete Flux Redux model: no redux_down.bias"):
        load_style_model(tmp_path / "half-redux.safetensors")
    with pytest.raises(ValueError, match="takes a 32-wide image encoding"):
        ReduxImageEncoder(32, 96, 32)(torch.zeros(1, 4, 1024))  # a CLIP ViT-L output
    siglip = siglip_file_state(siglip_reference())
    del siglip["vision_model.encoder.layers.1.mlp.fc2.weight"]
    safetensors.torch.save_file(siglip, tmp_path / "half-siglip.safetensors")
    with pytest.raises(CheckpointError, match="SigLIP vision model is missing 1 weights"):
        load_clip_vision(tmp_path / "half-siglip.safetensors")
