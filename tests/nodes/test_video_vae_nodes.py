"""Video VAEs through the VAE nodes' encode and decode: an IMAGE's pictures are one video's frames, the tiled forms
cut the picture into overlapping tiles with every frame in each (ComfyUI's temporal inputs accepted), and an image
latent given to a video VAE decodes as one-frame videos."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from ldm.wan_vae_files import load_wan_vae, write_tiny_wan_vae
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

FRAMES, HEIGHT, WIDTH = 9, 96, 128


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-vae")
    write_tiny_wan_vae(root / "models" / "vae" / "wan-tiny.safetensors", version="2.1", seed=2)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), root
    set_paths(FolderPaths())


def _video() -> torch.Tensor:
    """A smooth moving gradient [T, H, W, 3] in 0..1 (tiling errors show most on noise)."""
    t, y, x = torch.meshgrid(torch.arange(FRAMES), torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    return torch.stack([(x + 4 * t) / (WIDTH + 40), y / HEIGHT, 0.5 + 0.3 * torch.sin((x + y) / 17)], -1).clamp(0, 1)


def test_wan_vae_encodes_an_image_batch_as_one_video_and_decodes_its_frames(engine) -> None:
    engine, root = engine
    from nodes.sd.models import Vae
    from nodes.sd.vae import decode, encode

    class Ctx:
        services = None

    class NodeStub:
        ctx = Ctx()

    vae = Vae(load_wan_vae(root / "models" / "vae" / "wan-tiny.safetensors"), "wan-tiny")
    video = _video()
    latent = encode(NodeStub(), vae, video)
    assert latent.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8)
    with torch.no_grad():
        expected = vae.vae.encode(video.movedim(-1, 0).unsqueeze(0) * 2 - 1).mode()
    torch.testing.assert_close(latent, expected)
    frames = decode(NodeStub(), vae, latent)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
    whole = decode(NodeStub(), vae, latent, (16, 4))  # one tile holds the whole 12x16 latent: no blending
    torch.testing.assert_close(whole, frames)
    tiled = decode(NodeStub(), vae, latent, (8, 4))  # tiles at latent x 0, 4, 8 and y 0, 4; blended over 4
    assert tiled.shape == frames.shape
    corner = decode(NodeStub(), vae, latent[..., :8, :8])  # the first tile alone, every frame in it
    torch.testing.assert_close(tiled[:, :32, :32], corner[:, :32, :32])  # where no other tile reaches
    single = decode(NodeStub(), vae, latent[:, :, 0])  # an image latent: a batch of one-frame videos
    torch.testing.assert_close(single, decode(NodeStub(), vae, latent[:, :, :1]))
    assert single.shape == (1, HEIGHT, WIDTH, 3)


def test_tiled_nodes_take_comfyuis_temporal_inputs(engine) -> None:
    engine, _ = engine
    info = engine.registry.get("VAEDecodeTiled").object_info()
    # optional, so that prompts saved before ComfyUI added them still validate; widget order as ComfyUI's
    assert info["input_order"]["required"] == ["samples", "vae", "tile_size", "overlap"]
    assert info["input_order"]["optional"] == ["temporal_size", "temporal_overlap"]
    assert engine.registry.get("VAEEncodeTiled").object_info()["input_order"]["optional"] == [
        "temporal_size", "temporal_overlap"]
