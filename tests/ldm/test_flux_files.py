"""Loading Flux diffusion-model files in Black Forest Labs' layout: bare, prefixed, fp8, with Loom's metadata."""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import CheckpointError
from ldm.flux import config_metadata
from ldm.flux_files import load_flux_unet, peek_flux
from tests.ldm.flux_reference import TINY, random_flux


def write(path, model, dtype=torch.float32, prefix="", metadata=True, extra=None) -> None:
    tensors = {prefix + k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    safetensors.torch.save_file(tensors, path, metadata=config_metadata(model.config) if metadata else None)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_loads_bfl_layout_with_or_without_prefix(tmp_path, prefix: str) -> None:
    model = random_flux()
    write(tmp_path / "flux.safetensors", model, prefix=prefix,
          extra={"first_stage_model.decoder.conv_in.weight": torch.zeros(1), "stray": torch.zeros(1)})
    loaded = load_flux_unet(tmp_path / "flux.safetensors")
    assert loaded.family.unet_config == TINY and loaded.family.variant == "dev" and loaded.family.shift == 1.15
    assert loaded.unused_keys == ["stray"]
    for (name, ours), theirs in zip(loaded.unet.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert peek_flux(tmp_path / "flux.safetensors") == loaded.family


def test_schnell_and_fp8_weights(tmp_path) -> None:
    model = random_flux(dataclasses.replace(TINY, guidance_embed=False))
    write(tmp_path / "schnell_fp8.safetensors", model, dtype=torch.float8_e4m3fn)
    loaded = load_flux_unet(tmp_path / "schnell_fp8.safetensors", dtype=torch.bfloat16)
    assert loaded.family.variant == "schnell" and loaded.family.shift == 1.0
    weight = loaded.unet.single_blocks[1].linear1.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, model.single_blocks[1].linear1.weight.to(torch.float8_e4m3fn).to(torch.bfloat16))


def test_bad_files_are_refused_by_name(tmp_path) -> None:
    model = random_flux()
    write(tmp_path / "no_metadata.safetensors", model, metadata=False)
    with pytest.raises(CheckpointError, match="no_metadata.safetensors: its heads are 16 wide"):
        load_flux_unet(tmp_path / "no_metadata.safetensors")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("single_blocks.1.")}
    safetensors.torch.save_file(tensors, tmp_path / "cut.safetensors", metadata=config_metadata(model.config))
    loaded = load_flux_unet(tmp_path / "cut.safetensors")  # one single block fewer: a smaller model, as the file is
    assert loaded.family.unet_config.depth_single_blocks == 1
    del tensors["double_blocks.1.img_mlp.2.weight"]
    safetensors.torch.save_file(tensors, tmp_path / "broken.safetensors", metadata=config_metadata(model.config))
    with pytest.raises(CheckpointError, match=r"broken.safetensors: the Flux transformer is missing 1 weights: "
                                              r"double_blocks.1.img_mlp.2.weight"):
        load_flux_unet(tmp_path / "broken.safetensors")
    safetensors.torch.save_file({"input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "sd.safetensors")
    with pytest.raises(CheckpointError, match="sd.safetensors: not a Flux diffusion model"):
        load_flux_unet(tmp_path / "sd.safetensors")
    assert peek_flux(tmp_path / "sd.safetensors") is None


def test_scaled_fp8_weights_are_multiplied_by_their_scales(tmp_path) -> None:
    model = random_flux()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    for key in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear2.weight"):
        scale = tensors[key].abs().max() / 448
        tensors[key] = (tensors[key] / scale).to(torch.float8_e4m3fn)
        tensors[key.replace(".weight", ".scale_weight")] = scale.reshape(1)
        tensors[key.replace(".weight", ".scale_input")] = torch.ones(1)
    tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    safetensors.torch.save_file(tensors, tmp_path / "scaled.safetensors", metadata=config_metadata(model.config))
    loaded = load_flux_unet(tmp_path / "scaled.safetensors")
    assert loaded.unused_keys == []
    torch.testing.assert_close(loaded.unet.single_blocks[1].linear2.weight, model.single_blocks[1].linear2.weight,
                               rtol=0.07, atol=2e-3)
