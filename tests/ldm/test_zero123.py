"""Stable Zero123: the camera embedding against its formula, the context projection (cc_projection) against the
plain SD UNet fed the projected context and against diffusers' UNet2DConditionModel with 8 input channels, and its
single files: round trip, clear refusals."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.checkpoint import CheckpointError
from ldm.presets import make_checkpoint
from ldm.unet import UNetModel
from ldm.zero123 import Zero123UNet, camera_embedding, load_zero123_checkpoint, make_zero123_checkpoint


def test_the_camera_embedding_is_comfyuis_formula():
    # Zero-1-to-3's pose (polar angle change, sin and cos of the azimuth change, radius); Stable Zero123 takes the
    # polar change as minus the elevation and a fixed pi/2 in the radius slot.
    embedding = camera_embedding(10.0, 30.0)
    assert embedding.shape == (1, 1, 4)
    expected = [math.radians(-10.0), 0.5, math.cos(math.radians(30.0)), math.pi / 2]
    torch.testing.assert_close(embedding[0, 0], torch.tensor(expected))
    torch.testing.assert_close(camera_embedding(-45.0, -90.0)[0, 0],
                               torch.tensor([math.pi / 4, -1.0, 0.0, math.pi / 2]), atol=1e-7, rtol=0)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_zero123_checkpoint(make_zero123_checkpoint(tmp_path_factory.mktemp("zero123") / "z.safetensors",
                                                           seed=3))


def test_a_wide_context_is_projected_and_the_unet_matches_diffusers(loaded):
    pytest.importorskip("diffusers")
    from tests.ldm.diffusers_reference import diffusers_unet

    unet = loaded.unet
    assert unet.config.in_channels == 8 and unet.extra_context_widths == (36,)
    plain = UNetModel(unet.config).eval()
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if not k.startswith("cc_projection.")})
    reference = diffusers_unet(plain.config, plain.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 8, generator=g)
    t = torch.tensor([500.0, 20.0])
    wide = torch.cat([torch.randn(2, 1, 32, generator=g), camera_embedding(10.0, 30.0).expand(2, -1, -1)], dim=-1)
    narrow = torch.zeros(2, 1, 32)
    projected = wide @ unet.cc_projection.weight.T + unet.cc_projection.bias
    with torch.no_grad():
        ours = unet(x, t, wide)
        theirs = reference(x, t, encoder_hidden_states=projected).sample
        torch.testing.assert_close(ours, plain(x, t, projected))
        torch.testing.assert_close(unet(x, t, narrow), plain(x, t, narrow))  # the negative's zeros: as they are
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_a_checkpoint_round_trips_and_other_files_are_refused(loaded, tmp_path):
    assert loaded.unused_keys == [] and loaded.family.name == "sd1" and loaded.family.prediction == "eps"
    assert isinstance(loaded.unet, Zero123UNet) and loaded.clip_vision.config.projection_dim == 32
    sd1 = make_checkpoint("tiny-sd1", tmp_path / "sd1.safetensors", seed=1)
    with pytest.raises(CheckpointError, match="sd1.safetensors: not a Stable Zero123 checkpoint"):
        load_zero123_checkpoint(sd1)
    import safetensors.torch

    path = make_zero123_checkpoint(tmp_path / "z.safetensors")
    tensors = {k: v for k, v in safetensors.torch.load_file(path).items()
               if not k.startswith("cond_stage_model.")}
    safetensors.torch.save_file(tensors, tmp_path / "noclip.safetensors",
                                metadata=safetensors.safe_open(path, "pt").metadata())
    with pytest.raises(CheckpointError, match="noclip.safetensors: no CLIP image encoder"):
        load_zero123_checkpoint(tmp_path / "noclip.safetensors")
