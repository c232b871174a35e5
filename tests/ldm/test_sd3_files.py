"""SD3 checkpoints (with and without their text encoders) load into the MMDiT, the 16-channel VAE and the text
encoders, every key used; wrong files are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.sd3_files import LATENT_SCALE, LATENT_SHIFT, is_sd3_file, load_sd3_checkpoint
from ldm.sd3_presets import VARIANTS, make_sd3_files, tiny_sd3_parts
from ldm.sd3_text import SD3TextEncoder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_sd3_files(tmp_path_factory.mktemp("models"), "sd3.5-medium", dtype=torch.float32)


def test_checkpoint_with_text_encoders(files: dict[str, Path]) -> None:
    assert is_sd3_file(files["checkpoint"]) and is_sd3_file(files["bare_checkpoint"])
    loaded = load_sd3_checkpoint(files["checkpoint"])
    assert loaded.unused_keys == []
    family = loaded.family
    assert (family.name, family.prediction, family.shift) == ("sd3", "flow", 3.0)
    assert (family.latent_scale_factor, family.latent_shift) == (LATENT_SCALE, LATENT_SHIFT)
    assert family.unet_config == VARIANTS["sd3.5-medium"]
    parts = tiny_sd3_parts("sd3.5-medium")
    for key, value in parts["unet"].items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value, msg=key)
    assert loaded.vae.config.z_channels == 16 and not loaded.vae.config.use_quant_conv
    assert isinstance(loaded.text_encoder, SD3TextEncoder)
    with torch.no_grad():
        encoding = loaded.text_encoder.encode(["a cat"])
        image = loaded.vae.decode(torch.randn(1, 16, 4, 4))
    assert encoding.cond.shape == (1, 154, 96) and encoding.pooled.shape == (1, 80)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_checkpoint_without_text_encoders(files: dict[str, Path]) -> None:
    loaded = load_sd3_checkpoint(files["bare_checkpoint"])
    assert loaded.text_encoder is None and loaded.unused_keys == []
    skipped = load_sd3_checkpoint(files["checkpoint"], text_encoder=False)
    assert skipped.text_encoder is None and skipped.unused_keys == []


def test_wrong_and_incomplete_files_are_named(files: dict[str, Path], tmp_path: Path) -> None:
    from ldm.checkpoint import write_safetensors

    assert not is_sd3_file(files["t5xxl"])
    with pytest.raises(CheckpointError, match="not an SD3 checkpoint"):
        load_sd3_checkpoint(files["clip_l"])
    sd = load_state_dict(files["bare_checkpoint"])
    del sd["model.diffusion_model.context_embedder.weight"]
    write_safetensors(sd, tmp_path / "broken.safetensors", {}, torch.float32)
    with pytest.raises(CheckpointError, match="broken.safetensors: an incomplete SD3 transformer: no weight "
                                              "'context_embedder.weight'"):
        load_sd3_checkpoint(tmp_path / "broken.safetensors")
