"""Flux and SD3 transformers in diffusers' layout: the renaming against diffusers' own converters (round trip bit for
bit), the converted weights against diffusers' transformers, files and shards through the loaders, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from ldm.checkpoint import CheckpointError
from ldm.diffusers_dit import (
    diffusers_file_kind,
    flux_from_diffusers,
    sd3_from_diffusers,
    shard_paths,
    to_original_layout,
)
from ldm.flux import Flux, config_metadata
from ldm.flux_files import load_flux_unet, peek_flux
from ldm.mmdit import MMDiT
from ldm.sd3_unet import load_sd3_unet, peek_sd3
from tests.ldm import flux_reference, mmdit_reference
from tests.ldm.flux_reference import TINY, _diffusers_conversion, random_flux
from tests.ldm.mmdit_reference import VARIANTS, random_mmdit

FLUX_VARIANTS = {"dev": TINY, "schnell": dataclasses.replace(TINY, guidance_embed=False),
                 "fill": dataclasses.replace(TINY, in_channels=384),
                 "depth": dataclasses.replace(TINY, in_channels=128)}


def flux_to_diffusers(model: Flux) -> dict[str, torch.Tensor]:
    """diffusers' own BFL -> diffusers conversion (the tiny width set where it hard-codes Flux.1's)."""
    return _diffusers_conversion(model.config.hidden_size)({k: v.clone() for k, v in model.state_dict().items()})


def sd3_to_diffusers(model: MMDiT) -> dict[str, torch.Tensor]:
    return convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in model.state_dict().items()})


def assert_identical(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("variant", FLUX_VARIANTS)
def test_flux_round_trip_through_diffusers_converter_is_exact(variant: str) -> None:
    model = random_flux(FLUX_VARIANTS[variant])
    converted = flux_to_diffusers(model)
    assert "x_embedder.weight" in converted and "double_blocks.0.img_attn.qkv.weight" not in converted
    assert_identical(flux_from_diffusers(converted), model.state_dict())
    assert not converted  # consumed: no tensor is held twice


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd3_round_trip_through_diffusers_converter_is_exact(variant: str) -> None:
    model = random_mmdit(VARIANTS[variant])
    converted = sd3_to_diffusers(model)
    assert "pos_embed.proj.weight" in converted
    assert_identical(sd3_from_diffusers(converted), model.state_dict())


@pytest.mark.parametrize("variant", ["dev", "schnell", "fill"])
def test_flux_from_diffusers_weights_matches_diffusers_transformer(variant: str) -> None:
    """The diffusers-layout weights in diffusers' FluxTransformer2DModel, and in Loom's Flux via the conversion."""
    config = FLUX_VARIANTS[variant]
    reference = flux_reference.diffusers_twin(random_flux(config, seed=3))
    model = Flux(config).eval()
    model.load_state_dict(flux_from_diffusers({k: v.clone() for k, v in reference.state_dict().items()}))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.input_channels, 6, 8, generator=generator)
    sigma, context = torch.rand(2, generator=generator), torch.randn(2, 5, config.context_dim, generator=generator)
    pooled = torch.randn(2, config.vec_in_dim, generator=generator)
    guidance = torch.tensor([3.5, 1.0]) if config.guidance_embed else None
    with torch.no_grad():
        ours = model(x, sigma, context, pooled if guidance is None else torch.cat([pooled, guidance[:, None]], 1))
    expected = flux_reference.diffusers_call(reference, x, sigma, context, pooled, guidance)
    assert ours.shape == (2, 16, 6, 8) and expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd3_from_diffusers_weights_matches_diffusers_transformer(variant: str) -> None:
    config = VARIANTS[variant]
    reference = mmdit_reference.diffusers_twin(random_mmdit(config, seed=3))
    model = MMDiT(config).eval()
    model.load_state_dict(sd3_from_diffusers({k: v.clone() for k, v in reference.state_dict().items()}))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 6, generator=generator)
    sigma, context = torch.rand(2, generator=generator), torch.randn(2, 5, config.context_dim, generator=generator)
    pooled = torch.randn(2, config.adm_in_channels, generator=generator)
    with torch.no_grad():
        ours = model(x, sigma, context, pooled)
    expected = mmdit_reference.diffusers_call(reference, x, sigma, context, pooled)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def save(tensors: dict[str, torch.Tensor], path, dtype: torch.dtype | None = None, metadata=None) -> None:
    safetensors.torch.save_file({k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in tensors.items()},
                                path, metadata=metadata)


def shard(tensors: dict[str, torch.Tensor], folder, count: int, metadata=None) -> list:
    """diffusers' sharded save: NAME-0000k-of-0000n.safetensors and the index mapping each key to its shard."""
    names = sorted(tensors)
    files = [f"diffusion_pytorch_model-{k:05}-of-{count:05}.safetensors" for k in range(1, count + 1)]
    weight_map = {name: files[i * count // len(names)] for i, name in enumerate(names)}
    for file in files:
        save({k: tensors[k] for k in names if weight_map[k] == file}, folder / file, metadata=metadata)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return [folder / file for file in files]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_diffusers_flux_file_loads_as_the_bfl_file(tmp_path, dtype: torch.dtype) -> None:
    model = random_flux()
    metadata = config_metadata(model.config)  # the tiny model's RoPE split (Flux.1's 128-wide heads need none)
    save(model.state_dict(), tmp_path / "bfl.safetensors", dtype, metadata)
    save({**flux_to_diffusers(model), "stray.weight": torch.zeros(1)}, tmp_path / "diffusers.safetensors", dtype,
         metadata)
    assert diffusers_file_kind(tmp_path / "diffusers.safetensors") == "flux"
    assert diffusers_file_kind(tmp_path / "bfl.safetensors") is None
    bfl = load_flux_unet(tmp_path / "bfl.safetensors", dtype=torch.bfloat16)
    ours = load_flux_unet(tmp_path / "diffusers.safetensors", dtype=torch.bfloat16)
    assert ours.family == bfl.family == peek_flux(tmp_path / "diffusers.safetensors")
    assert ours.unused_keys == ["stray.weight"]
    assert_identical(ours.unet.state_dict(), bfl.unet.state_dict())


def test_sharded_diffusers_flux_loads_from_any_shard_or_the_index(tmp_path) -> None:
    model = random_flux(FLUX_VARIANTS["schnell"])
    metadata = config_metadata(model.config)
    files = shard(flux_to_diffusers(model), tmp_path, 3, metadata)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    assert shard_paths(files[1]) == shard_paths(index) == files
    for path in (files[0], files[2], index):
        loaded = load_flux_unet(path)
        assert loaded.family.variant == "schnell" and loaded.unused_keys == []
        assert_identical(loaded.unet.state_dict(), model.state_dict())
    assert peek_flux(files[0]) == loaded.family
    index.unlink()  # no index: the shards are found by their numbering
    assert shard_paths(files[0]) == files
    files[1].unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model-00001-of-00003.safetensors: a model in 3 "
                                              r"shards, of which diffusion_pytorch_model-00002-of-00003.safetensors "
                                              r"is not in"):
        load_flux_unet(files[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_sd3_file_loads_as_the_stability_file(tmp_path, variant: str) -> None:
    model = random_mmdit(VARIANTS[variant])
    save(sd3_to_diffusers(model), tmp_path / "sd3.safetensors", torch.float16)
    loaded = load_sd3_unet(tmp_path / "sd3.safetensors", dtype=torch.float16)
    assert loaded.family.unet_config == VARIANTS[variant] == peek_sd3(tmp_path / "sd3.safetensors").unet_config
    assert loaded.unused_keys == []
    assert_identical(loaded.unet.state_dict(), {k: v.half() for k, v in model.state_dict().items()})
    files = shard(sd3_to_diffusers(model), tmp_path, 2)
    assert_identical(load_sd3_unet(files[0]).unet.state_dict(), model.state_dict())


def test_scaled_fp8_weights_are_descaled_before_fusing() -> None:
    """q, k and v each have their own scale in a scaled fp8 file; the fused weight is their descaled rows."""
    model = random_flux()
    converted = flux_to_diffusers(model)
    scales = {}
    for name in [k for k in converted if k.endswith(".weight") and converted[k].ndim == 2]:
        scales[name] = torch.tensor(0.5 + len(name) % 7 / 10)
        converted[name] = (converted[name] / scales[name]).to(torch.float8_e4m3fn)
        converted[name[:-len("weight")] + "scale_weight"] = scales[name]
    converted["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    expected = {"double_blocks.0.img_attn.qkv.weight": [f"transformer_blocks.0.attn.to_{p}.weight" for p in "qkv"]}
    wanted = {name: torch.cat([converted[p].float() * scales[p] for p in parts]) for name, parts in expected.items()}
    ours = flux_from_diffusers(converted)
    assert not any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in ours)
    for name, tensor in wanted.items():
        assert torch.equal(ours[name], tensor)


def test_other_diffusers_models_are_refused_by_name(tmp_path) -> None:
    others = {"Chroma": {"distilled_guidance_layer.in_proj.weight": torch.zeros(2, 2),
                         "x_embedder.weight": torch.zeros(2, 2)},
              "Wan video": {"condition_embedder.time_proj.weight": torch.zeros(2, 2),
                            "blocks.0.attn1.to_q.weight": torch.zeros(2, 2)},
              "AuraFlow": {"joint_transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)},
              "Flux.2": {"double_stream_modulation_img.linear.weight": torch.zeros(2, 2),
                         "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight": torch.zeros(2, 2)}}
    for name, tensors in others.items():
        save(tensors, tmp_path / "other.safetensors")
        with pytest.raises(CheckpointError, match=f"other.safetensors: it holds an? {name} transformer"):
            diffusers_file_kind(tmp_path / "other.safetensors")
        with pytest.raises(CheckpointError, match=f"other.safetensors: it holds an? {name} transformer"):
            peek_flux(tmp_path / "other.safetensors")
        with pytest.raises(CheckpointError, match=f"it holds an? {name} transformer"):
            to_original_layout(dict(tensors))
    unet = {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2), "conv_in.weight": torch.zeros(2, 2)}
    assert to_original_layout(dict(unet)).keys() == unet.keys()  # a diffusers UNet: ldm.parts reads it
    with pytest.raises(CheckpointError, match=r"not a Flux.1 transformer in diffusers' layout: it holds an SD UNet "
                                              r"\(UNet2DConditionModel\)"):
        flux_from_diffusers(dict(unet))
    with pytest.raises(CheckpointError, match="not an SD3 transformer in diffusers' layout: its keys are not"):
        sd3_from_diffusers(flux_to_diffusers(random_flux()))


def test_a_cut_fused_weight_is_refused() -> None:
    converted = flux_to_diffusers(random_flux())
    del converted["transformer_blocks.1.attn.to_k.weight"]
    with pytest.raises(CheckpointError, match="with transformer_blocks.1.attn.to_q.weight but no "
                                              "transformer_blocks.1.attn.to_k.weight"):
        flux_from_diffusers(converted)


def test_a_diffusers_config_beside_the_shards_gives_the_rope_split(tmp_path) -> None:
    """save_pretrained's folder has no Loom metadata; its config.json's axes_dims_rope says how RoPE splits the tiny
    model's 16-wide heads (Flux.1's 128-wide ones need neither)."""
    model = random_flux()
    files = shard(flux_to_diffusers(model), tmp_path, 2)
    with pytest.raises(CheckpointError, match="its heads are 16 wide, not Flux.1's 128"):
        load_flux_unet(files[0])
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel",
                                                      "axes_dims_rope": list(TINY.axes_dim)}))
    loaded = load_flux_unet(files[1])
    assert loaded.family.unet_config == TINY
    assert_identical(loaded.unet.state_dict(), model.state_dict())
