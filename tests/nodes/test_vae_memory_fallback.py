"""VAEDecode and VAEEncode fall back to tiles when the whole image runs out of memory, as ComfyUI's do: the result is
VAEDecodeTiled's / VAEEncodeTiled's at their default tiles. The out-of-memory error is raised by the VAE itself for
inputs larger than a tile (a CPU machine cannot run out of GPU memory on demand)."""

from __future__ import annotations

import logging

import pytest
import torch

from ldm.presets import PRESETS
from ldm.vae import AutoencoderKL
from ldm.wan_vae_files import load_wan_vae, write_tiny_wan_vae
from nodes.sd.models import Vae
from nodes.sd.vae import decode, encode


class _Ctx:
    services = None


class _Node:
    ctx = _Ctx()


def _fails_above(fn, latent_side: int, calls: list[tuple[int, ...]]):
    """`fn`, raising torch's out-of-memory error for inputs whose last side exceeds `latent_side`."""
    def guarded(x: torch.Tensor, *args, **kwargs):
        calls.append(tuple(x.shape))
        if x.shape[-1] > latent_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return fn(x, *args, **kwargs)
    return guarded


@pytest.fixture(scope="module")
def image_vae() -> Vae:
    torch.manual_seed(0)
    return Vae(AutoencoderKL(PRESETS["tiny-sd1"][3]).eval(), "tiny")


def test_decode_runs_out_of_memory_and_finishes_in_tiles(image_vae, caplog) -> None:
    z = torch.randn(1, 4, 8, 80)  # wider than one default tile (512 px = 64 latent pixels)
    tiled = decode(_Node(), image_vae, z, (64, 8))  # VAEDecodeTiled at tile_size 512, overlap 64
    calls: list[tuple[int, ...]] = []
    image_vae.vae.decode = _fails_above(image_vae.vae.decode, 64, calls)
    try:
        with caplog.at_level(logging.WARNING):
            fallen_back = decode(_Node(), image_vae, z)
    finally:
        del image_vae.vae.decode
    torch.testing.assert_close(fallen_back, tiled)
    assert calls[0] == (1, 4, 8, 80) and all(c[-1] <= 64 for c in calls[1:]) and len(calls) > 2
    assert "ran out of memory on the whole image; retrying in tiles" in caplog.text


def test_encode_runs_out_of_memory_and_finishes_in_tiles(image_vae) -> None:
    pixels = torch.rand(1, 64, 640, 3)
    tiled = encode(_Node(), image_vae, pixels, (512, 64))  # VAEEncodeTiled's defaults
    calls: list[tuple[int, ...]] = []
    image_vae.vae.encode = _fails_above(image_vae.vae.encode, 512, calls)
    try:
        fallen_back = encode(_Node(), image_vae, pixels)
    finally:
        del image_vae.vae.encode
    torch.testing.assert_close(fallen_back, tiled)
    assert calls[0] == (1, 3, 64, 640)


def test_a_video_vae_falls_back_to_tiles_of_every_frame(tmp_path) -> None:
    vae = Vae(load_wan_vae(write_tiny_wan_vae(tmp_path / "wan.safetensors", version="2.1", seed=2)), "wan")
    z = torch.randn(1, 16, 2, 1, 72)  # 2 latent frames, 576 px wide
    tiled = decode(_Node(), vae, z, (64, 8))
    calls: list[tuple[int, ...]] = []
    vae.vae.decode = _fails_above(vae.vae.decode, 64, calls)
    try:
        fallen_back = decode(_Node(), vae, z)
    finally:
        del vae.vae.decode
    assert fallen_back.shape == (5, 8, 576, 3)
    torch.testing.assert_close(fallen_back, tiled)


def test_other_errors_are_not_retried(image_vae) -> None:
    def broken(z: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    image_vae.vae.decode = broken
    try:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            decode(_Node(), image_vae, torch.randn(1, 4, 8, 8))
    finally:
        del image_vae.vae.decode
