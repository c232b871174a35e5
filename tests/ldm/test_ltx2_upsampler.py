"""Lightricks' latent upsampler (ldm.ltx2_upsampler) against diffusers' LTX2LatentUpsamplerModel with the same
weights (the two share the files' key names), and ComfyUI's LTXVLatentUpsampler semantics around it."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.ltx2_upsampler import (
    LatentUpsampler,
    LatentUpsamplerConfig,
    config_from_state_dict,
    is_latent_upsampler,
    load_latent_upsampler,
    upsample_latent,
)
from ldm.ltxv_vae import TINY_LTXV_VAES, random_ltxv_vae

# LTX-2's x2 file's layout at a tiny width: 128 latent channels, 3-D convolutions, the rational resampler at 2.0.
_X2 = dict(in_channels=128, mid_channels=32, num_blocks_per_stage=2, dims=3, spatial_upsample=True,
           temporal_upsample=False, rational_spatial_scale=2.0, use_rational_resampler=True)
_VARIANTS = {
    "x2-rational": _X2,
    "x1.5-rational": dict(_X2, rational_spatial_scale=1.5),
    "x2-plain": dict(_X2, use_rational_resampler=False),
    "temporal": dict(_X2, spatial_upsample=False, temporal_upsample=True),
    "spatiotemporal": dict(_X2, temporal_upsample=True),
    "2d": dict(_X2, dims=2, use_rational_resampler=False),
}


def _reference(kwargs: dict, seed: int = 0) -> LTX2LatentUpsamplerModel:
    model = LTX2LatentUpsamplerModel(**kwargs).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith("kernel"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(1.0 + 0.1 * noise if name.endswith("norm1.weight") or name.endswith("norm2.weight")
                         or name.endswith("norm.weight") else
                         0.1 * noise if name.endswith("bias") else noise * tensor[0].numel() ** -0.5)
    return model


def _latent(frames: int = 3, h: int = 4, w: int = 6, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 128, frames, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(_VARIANTS))
@torch.no_grad()
def test_matches_diffusers(tmp_path, variant):
    """diffusers' state dict (the files' keys) written with a metadata config naming the scale, loaded strictly;
    outputs within 1e-6 of diffusers' (equal to the last bit in practice)."""
    kwargs = _VARIANTS[variant]
    reference = _reference(kwargs)
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    assert is_latent_upsampler(sd)
    path = tmp_path / "upsampler.safetensors"
    write_safetensors(sd, path, {"config": json.dumps({"spatial_scale": kwargs["rational_spatial_scale"]})})
    model = load_latent_upsampler(path)
    c = model.config
    assert (c.in_channels, c.mid_channels, c.blocks_per_stage, c.dims) == (128, 32, 2, kwargs["dims"])
    assert (c.spatial, c.temporal) == (kwargs["spatial_upsample"], kwargs["temporal_upsample"])
    x = _latent(batch=2)
    out, expected = model(x), reference(x)
    frames = 5 if c.temporal else 3
    scale = {"x1.5-rational": 1.5, "temporal": 1}.get(variant, 2)
    assert out.shape == (2, 128, frames, int(4 * scale), int(6 * scale))
    assert (out - expected).abs().max() <= 1e-6
    assert out.abs().max() > 0.1


def test_scale_three_needs_the_metadata():
    """A factor-3 rational resampler is 1.5 or 0.75; only the metadata tells."""
    sd = dict(_reference(_VARIANTS["x1.5-rational"]).state_dict())
    with pytest.raises(CheckpointError, match="spatial_scale"):
        load_latent_upsampler(sd)
    assert config_from_state_dict(sd, {"config": json.dumps({"spatial_scale": 0.75})}).spatial_scale == 0.75


def test_x2_file_layout_and_metadata(tmp_path):
    """An x2 file as ComfyUI's LatentUpscaleModelLoader reads it: the metadata config beside the weights."""
    reference = _reference(_X2, seed=2)
    path = tmp_path / "ltx-2-spatial-upscaler-x2-1.0.safetensors"
    config = {"_class_name": "LatentUpsampler", "in_channels": 128, "mid_channels": 32, "num_blocks_per_stage": 2,
              "dims": 3, "spatial_upsample": True, "temporal_upsample": False, "spatial_scale": 2.0,
              "rational_resampler": True}
    write_safetensors(dict(reference.state_dict()), path, {"config": json.dumps(config)})
    model = load_latent_upsampler(path)
    assert model.config == LatentUpsamplerConfig(128, 32, 2, 3, True, False, True, 2.0)
    assert "upsampler.blur_down.kernel" in model.state_dict()
    half = load_latent_upsampler(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


@torch.no_grad()
def test_upsample_latent_is_comfyuis_node():
    """Raw latents in and out (Loom's LATENT): the same as ComfyUI's node on the normalised ones, which takes the
    VAE's statistics off, upsamples and puts them back."""
    reference = _reference(_X2, seed=3)
    model = load_latent_upsampler({k: v.clone() for k, v in reference.state_dict().items()})
    vae = random_ltxv_vae(TINY_LTXV_VAES["2.0"], seed=5)
    mean, std = (v.view(1, -1, 1, 1, 1) for v in (vae.latent_mean, vae.latent_std))
    assert (std - 1).abs().max() > 0.1 and mean.abs().max() > 0.05
    z = _latent(frames=2, h=2, w=3)  # normalised, as ComfyUI's LATENT
    out = upsample_latent(model, z * std + mean)
    comfy = (reference(z * std + mean) - mean) / std
    assert out.shape == (1, 128, 2, 4, 6) and out.dtype == torch.float32
    assert ((out - mean) / std - comfy).abs().max() < 1e-4
    half = upsample_latent(load_latent_upsampler(dict(reference.state_dict()), dtype=torch.bfloat16),
                           (z * std + mean).half())
    assert half.dtype == torch.float16 and half.shape == out.shape
    assert (half.float() - out).abs().max() < 0.2 * std.max()


def test_other_files_are_refused():
    sd = dict(_reference(_X2).state_dict())
    with pytest.raises(CheckpointError, match="no latent upsampler"):
        load_latent_upsampler({"encoder.conv_in.conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no place"):
        load_latent_upsampler({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="missing"):
        load_latent_upsampler({k: v for k, v in sd.items() if k != "final_conv.bias"})
    with pytest.raises(ValueError, match="expected latents"):
        LatentUpsampler(LatentUpsamplerConfig(128, 32, 1))(torch.zeros(1, 16, 1, 2, 2))
