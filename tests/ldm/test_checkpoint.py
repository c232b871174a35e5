"""Checkpoint reading, family detection, loading, saving and refusing bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ldm.checkpoint import (
    CheckpointError,
    detect_family,
    load_checkpoint,
    load_state_dict,
    load_vae,
    read_metadata,
    save_checkpoint,
)
from ldm.presets import PRESETS, build_preset, make_checkpoint

FAMILIES = {"tiny-sd1": ("sd1", "eps"), "tiny-sd2": ("sd2", "v"), "tiny-sdxl": ("sdxl", "eps"),
            "tiny-sdxl-refiner": ("sdxl_refiner", "eps")}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {p: make_checkpoint(p, root / f"{p}.safetensors", text_encoder=False) for p in FAMILIES}


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(1, c.in_channels, 8, 8, generator=g)
    context = torch.randn(1, 5, c.context_dim, generator=g)
    y = torch.randn(1, c.adm_in_channels, generator=g) if c.adm_in_channels else None
    with torch.no_grad():
        return unet(x.to(unet.dtype), torch.tensor([500.0]), context, y)


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_detects_family_and_exact_config(files: dict[str, Path], preset: str) -> None:
    loaded = load_checkpoint(files[preset], text_encoder=False)
    name, prediction = FAMILIES[preset]
    assert (loaded.family.name, loaded.family.prediction) == (name, prediction)
    assert loaded.family.unet_config == PRESETS[preset][2]
    assert loaded.family.vae_config == PRESETS[preset][3]
    assert loaded.vae.scaling_factor == loaded.family.latent_scale_factor
    assert loaded.unused_keys == []
    # Without our metadata the family (and everything but the head layout) still comes from the weights.
    bare = detect_family(load_state_dict(files[preset]))
    assert bare.name == name and bare.unet_config.channel_mult == PRESETS[preset][2].channel_mult


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    _, _, unet, vae, _ = build_preset("tiny-sdxl", seed=3, text_encoder=False)
    path = save_checkpoint(tmp_path / "m.safetensors", unet, vae, None, {"note": "hi"})
    loaded = load_checkpoint(path, text_encoder=False)
    for before, after in [(unet, loaded.unet), (vae, loaded.vae)]:
        saved, read = before.state_dict(), after.state_dict()
        assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved)
    # Identical weights, but the outputs only to rounding: tensors read from the file need not be 64-byte
    # aligned, and some CPUs' BLAS then takes another kernel with another summation order.
    torch.testing.assert_close(_unet_out(loaded.unet), _unet_out(unet.eval()), rtol=1e-5, atol=1e-5)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(z), vae.eval().decode(z), rtol=1e-5, atol=1e-5)
    assert loaded.metadata["note"] == "hi" and read_metadata(path)["note"] == "hi"
    # The permissions of any new file (safetensors alone makes it 0600, which other accounts cannot read).
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_in_the_compute_dtype(tmp_path: Path, stored: torch.dtype) -> None:
    path = make_checkpoint("tiny-sd1", tmp_path / "half.safetensors", text_encoder=False, dtype=stored)
    assert load_state_dict(path)["model.diffusion_model.out.2.weight"].dtype == stored
    for compute in (torch.float32, torch.bfloat16):
        loaded = load_checkpoint(path, dtype=compute, text_encoder=False)
        assert {p.dtype for p in loaded.unet.parameters()} == {compute}
        assert {p.dtype for p in loaded.vae.parameters()} == {compute}
        assert torch.isfinite(_unet_out(loaded.unet)).all()


def test_ckpt_with_top_level_state_dict(files: dict[str, Path], tmp_path: Path) -> None:
    sd = load_state_dict(files["tiny-sd1"])
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 1000}, path)
    assert load_state_dict(path).keys() == sd.keys()
    loaded = load_checkpoint(path, text_encoder=False)
    assert loaded.family.name == "sd1" and loaded.unused_keys == []
    # (no metadata in a .ckpt, so the tiny model's unusual head count is not known: compare weights)
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, sd[f"model.diffusion_model.{key}"])


class NotATensor:
    pass


@pytest.mark.parametrize("kind", ["text", "truncated-safetensors", "truncated-ckpt", "full-pickle", "empty"])
def test_bad_files_get_a_clear_error(files: dict[str, Path], tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"bad-{kind}.ckpt"
    if kind == "text":
        path.write_text("this is not a model\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-safetensors":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(files["tiny-sd1"].read_bytes()[:100_000])
    elif kind == "truncated-ckpt":
        torch.save({"w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:700])
    else:
        torch.save({"state_dict": {"w": torch.ones(2)}, "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match=path.name) as info:
        load_checkpoint(path, text_encoder=False)
    if kind == "full-pickle":
        assert "full unpickling" in str(info.value)


def test_missing_weights_are_listed_and_refused(files: dict[str, Path], tmp_path: Path) -> None:
    sd = load_state_dict(files["tiny-sd1"])
    dropped = ["model.diffusion_model.out.2.bias", "first_stage_model.decoder.conv_out.weight"]
    for key in dropped:
        del sd[key]
    path = tmp_path / "holes.safetensors"
    safetensors.torch.save_file(sd, path, metadata=read_metadata(files["tiny-sd1"]))
    with pytest.raises(CheckpointError, match=r"UNet is missing 1 weights: out\.2\.bias"):
        load_checkpoint(path, text_encoder=False)
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    safetensors.torch.save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"VAE is missing 1 weights: decoder\.conv_out\.weight"):
        load_checkpoint(path, text_encoder=False)


def test_unused_keys_are_reported(files: dict[str, Path], tmp_path: Path) -> None:
    sd = load_state_dict(files["tiny-sd2"])
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    path = tmp_path / "extra.safetensors"
    safetensors.torch.save_file(sd, path, metadata=read_metadata(files["tiny-sd2"]))
    assert load_checkpoint(path, text_encoder=False).unused_keys == ["alphas_cumprod", "model_ema.decay"]


def test_a_file_without_a_unet_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "lonely.safetensors"
    safetensors.torch.save_file({"something.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="lonely.safetensors: not a Stable Diffusion checkpoint"):
        load_checkpoint(path, text_encoder=False)


def test_sd2_prediction_rules(files: dict[str, Path]) -> None:
    sd = load_state_dict(files["tiny-sd2"])
    assert detect_family(sd).prediction == "v"
    assert detect_family(sd, {"modelspec.prediction_type": "epsilon"}).prediction == "eps"
    assert detect_family(sd, {"loom.prediction": "v"}, v_prediction=False).prediction == "eps"
    loaded = load_checkpoint(files["tiny-sd2"], text_encoder=False, v_prediction=False)
    assert loaded.family.prediction == "eps"


@pytest.mark.parametrize("layout", ["prefixed", "bare", "diffusers"])
def test_standalone_vae_files(files: dict[str, Path], tmp_path: Path, layout: str) -> None:
    sd = load_state_dict(files["tiny-sdxl"])
    vae_sd = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    if layout == "bare":
        vae_sd = {k.removeprefix("first_stage_model."): v for k, v in vae_sd.items()}
    elif layout == "diffusers":
        from tests.ldm.diffusers_reference import diffusers_vae

        reference = load_checkpoint(files["tiny-sdxl"], text_encoder=False).vae
        vae_sd = diffusers_vae(reference.config, reference.state_dict()).state_dict()
    vae_sd["loss.logvar"] = torch.zeros(())
    path = tmp_path / "vae.safetensors"
    safetensors.torch.save_file(vae_sd, path)
    loaded = load_vae(path, scaling_factor=0.13025)
    assert loaded.unused_keys == ["loss.logvar"]
    expected = load_checkpoint(files["tiny-sdxl"], text_encoder=False).vae
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(z), expected.decode(z))
    assert loaded.vae.scaling_factor == 0.13025


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_presets_with_text_encoders_load_completely_and_run(tmp_path: Path, preset: str) -> None:
    pytest.importorskip("ldm.text_encoders")
    from ldm.unet import sdxl_adm, sdxl_refiner_adm

    path = make_checkpoint(preset, tmp_path / "m.safetensors", seed=1)
    assert path.stat().st_size < 20_000_000
    loaded = load_checkpoint(path)
    assert loaded.unused_keys == [] and loaded.family.name == FAMILIES[preset][0]
    with torch.no_grad():
        encoding = loaded.text_encoder.encode(["a photo of a cat", "a dog"])
        y = {"sdxl": sdxl_adm, "sdxl_refiner": sdxl_refiner_adm}.get(loaded.family.name)
        y = None if y is None else y(encoding.pooled, 1024, 1024)
        eps = loaded.unet(torch.randn(2, 4, 8, 8), torch.tensor([999.0, 10.0]), encoding.cond, y)
        pixels = loaded.vae.decode(eps / loaded.vae.scaling_factor)
    assert torch.isfinite(eps).all() and eps.std() > 1e-3
    assert torch.isfinite(pixels).all() and pixels.shape == (2, 3, 64, 64)
    again = make_checkpoint(preset, tmp_path / "again.safetensors", seed=1)
    first, second = load_state_dict(path), load_state_dict(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
