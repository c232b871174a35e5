"""Wan 2.1 Fun camera control (`ldm.wan_camera`): the presets' geometry, the Plücker embedding against hand-computed
rays and against a per-pixel numpy transcription of CameraCtrl's formulas (ComfyUI's WanCameraEmbedding), the
adapter, the camera model, and loading its file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.wan import WanConfig, wan_config_from_state_dict
from ldm.wan_camera import (
    CAMERA_POSES,
    WanCameraModel,
    camera_embedding,
    camera_trajectory,
    fold_pictures,
    pixel_intrinsics,
    plucker_rays,
)
from ldm.wan_files import load_wan_unet, random_wan, tiny_wan_config, write_tiny_wan


def test_presets_move_the_camera_as_comfyuis_do() -> None:
    static = camera_trajectory("Static", 5)
    assert torch.equal(static, torch.eye(4, dtype=torch.float64).repeat(5, 1, 1))
    # Translations: frame i of n at i / n * speed * 1.5 * the preset's direction, no rotation.
    for pose, direction in (("Pan Left", (-1, 0, 0)), ("Pan Right", (1, 0, 0)), ("Pan Up", (0, -1, 0)),
                            ("Pan Down", (0, 1, 0)), ("Zoom In", (0, 0, 2)), ("Zoom Out", (0, 0, -2))):
        poses = camera_trajectory(pose, 9, speed=2.0)
        expected = torch.tensor(direction, dtype=torch.float64) * 1.5 * 2.0 * 8 / 9
        torch.testing.assert_close(poses[8, :3, 3], expected)
        assert torch.equal(poses[:, :3, :3], torch.eye(3, dtype=torch.float64).expand(9, 3, 3)), pose
    # Rotations about the optical axis (z): ClockWise by +pi/3 * i / n, Anti Clockwise by -pi/3 * i / n.
    for pose, sign in (("ClockWise (CW)", 1), ("Anti Clockwise (ACW)", -1)):
        poses = camera_trajectory(pose, 4)
        theta = sign * math.pi / 3 * 3 / 4
        rz = torch.tensor([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]],
                          dtype=torch.float64)
        torch.testing.assert_close(poses[3, :3, :3], rz)
        assert poses[:, :3, 3].eq(0).all()
    assert len(CAMERA_POSES) == 9
    with pytest.raises(ValueError, match="camera pose 'Orbit'"):
        camera_trajectory("Orbit", 5)


def test_plucker_coordinates_of_known_rays() -> None:
    """Two pixels (centres at x 0.5 and 1.5, y 0.5), principal point (1, 0.5), unit focal lengths: directions
    (-0.5, 0, 1) and (0.5, 0, 1) normalised; a camera at (1, 0, 0) gives o x d = (0, -d_z, 0), and a camera turned 90
    degrees about z maps (x, y, z) to (-y, x, z)."""
    moved = torch.eye(4, dtype=torch.float64)
    moved[0, 3] = 1.0
    turned = torch.eye(4, dtype=torch.float64)
    turned[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    rays = plucker_rays(torch.stack([moved, turned]), (1.0, 1.0, 1.0, 0.5), height=1, width=2)
    n = math.sqrt(1.25)
    expected = torch.tensor([[[[0, -1 / n, 0, -0.5 / n, 0, 1 / n], [0, -1 / n, 0, 0.5 / n, 0, 1 / n]]],
                             [[[0, 0, 0, 0, -0.5 / n, 1 / n], [0, 0, 0, 0, 0.5 / n, 1 / n]]]], dtype=torch.float64)
    torch.testing.assert_close(rays, expected)


def test_intrinsics_are_rescaled_from_the_presets_16_9_frame() -> None:
    # 832 x 480 is narrower than 16:9: fx is rescaled (to height * 16/9 * fx), fy stays fy * height.
    torch.testing.assert_close(torch.tensor(pixel_intrinsics(832, 480, 0.5, 0.5, 0.5, 0.5)),
                               torch.tensor((480 * 16 / 9 * 0.5, 240.0, 416.0, 240.0)))
    # 2048 x 512 is wider: fy is rescaled (to width / (16/9) * fy).
    torch.testing.assert_close(torch.tensor(pixel_intrinsics(2048, 512, 0.5, 0.4, 0.5, 0.5)),
                               torch.tensor((1024.0, 2048 * 9 / 16 * 0.4, 1024.0, 256.0)))


def _reference(pose: str, width: int, height: int, length: int, speed: float, fx: float, fy: float, cx: float,
               cy: float) -> np.ndarray:
    """CameraCtrl's formulas as ComfyUI's node strings them, pixel by pixel in numpy (float64): trajectory, relative
    poses, intrinsics, rays, then the 4-picture folding: [1, 24, latent frames, H, W]."""
    angle, translation = (np.array(v) for v in CAMERA_POSES[pose])
    c2ws = []
    for i in range(length):
        a = i / length * speed * np.pi / 3 * angle
        rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
        ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
        rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
        c2w = np.eye(4)
        c2w[:3, :3] = rz @ ry @ rx
        c2w[:3, 3] = i / length * speed * 1.5 * translation
        c2ws.append(c2w)
    rel = [np.eye(4)] + [np.linalg.inv(c2ws[0]) @ c for c in c2ws[1:]]
    if 1280 / 720 > width / height:
        fx = height * 1280 / 720 * fx / width
    else:
        fy = width / (1280 / 720) * fy / height
    fx, fy, cx, cy = fx * width, fy * height, cx * width, cy * height
    pictures = np.zeros((length, 6, height, width))
    for v in range(length):
        for r in range(height):
            for c in range(width):
                d = np.array([(c + 0.5 - cx) / fx, (r + 0.5 - cy) / fy, 1.0])
                d = rel[v][:3, :3] @ (d / np.linalg.norm(d))
                pictures[v, :, r, c] = np.concatenate([np.cross(rel[v][:3, 3], d), d])
    pictures = np.concatenate([np.repeat(pictures[:1], 4, axis=0), pictures[1:]])
    frames = pictures.reshape(-1, 4, 6, height, width)  # [T, picture, coordinate, H, W]
    return frames.transpose(2, 1, 0, 3, 4).reshape(1, 24, -1, height, width)


@pytest.mark.parametrize(("pose", "speed", "fx", "fy", "cx", "cy"),
                         [("Zoom In", 1.0, 0.5, 0.5, 0.5, 0.5), ("ClockWise (CW)", 2.5, 0.3, 0.6, 0.4, 0.55),
                          ("Pan Left", 0.7, 0.5, 0.5, 0.5, 0.5)])
def test_embedding_matches_the_formulas_pixel_by_pixel(pose, speed, fx, fy, cx, cy) -> None:
    width, height, length = 32, 16, 9
    embedding = camera_embedding(pose, width, height, length, speed, fx, fy, cx, cy)
    assert embedding.shape == (1, 24, 3, height, width) and embedding.dtype == torch.float32
    expected = torch.from_numpy(_reference(pose, width, height, length, speed, fx, fy, cx, cy)).float()
    torch.testing.assert_close(embedding, expected, atol=2e-6, rtol=1e-5)  # float32 rays against float64


def test_folding_puts_four_pictures_in_each_latent_frame() -> None:
    rays = torch.arange(5 * 6, dtype=torch.float32).reshape(5, 1, 1, 6)  # picture v, coordinate k: 6v + k
    folded = fold_pictures(rays)
    assert folded.shape == (1, 24, 2, 1, 1)
    assert folded[0, :, 0, 0, 0].tolist() == [k * 1.0 for k in range(6) for _ in range(4)]  # picture 0 four times
    assert folded[0, :, 1, 0, 0].tolist() == [6.0 * v + k for k in range(6) for v in range(1, 5)]
    with pytest.raises(ValueError, match="1 \\+ 4k pictures"):
        fold_pictures(rays[:4])
    # A static camera: no translation, so o x d is 0 and d is the same in every picture.
    static = camera_embedding("Static", 16, 16, 5)
    assert static[:, :12].eq(0).all() and torch.equal(static[:, 12:16], static[:, 12:13].expand(-1, 4, -1, -1, -1))


@pytest.fixture(scope="module")
def model() -> WanCameraModel:
    return random_wan(tiny_wan_config("camera"), seed=2)


def test_the_adapter_shapes_and_its_zero_initialisation(model) -> None:
    camera = camera_embedding("Zoom In", 64, 48, 9)
    features = model.control_adapter(camera)
    assert features.shape == (1, 32, 3, 48 // 16, 64 // 16)
    x, t, context = torch.randn(2, 32, 3, 6, 8), torch.tensor([0.7, 0.3]), torch.randn(2, 5, 32)
    with torch.no_grad():
        base = model(x, t, context)
        moved = model(x, t, context, camera_conditions=camera)
        static = model(x, t, context, camera_conditions=camera_embedding("Static", 64, 48, 9))
    assert moved.shape == base.shape == (2, 16, 3, 6, 8)
    # The rays are never all zero (d is a unit vector), so even a static camera changes the prediction.
    assert (moved - base).abs().max() > 0.1 and (static - base).abs().max() > 0.1
    assert (moved - static).abs().max() > 0.1
    # As VideoX-Fun starts training it (the conv and each residual block's second conv zeroed), the adapter adds
    # nothing: the camera model is then exactly its base image-to-video model.
    zeroed = random_wan(tiny_wan_config("camera"), seed=2)
    with torch.no_grad():
        for conv in (zeroed.control_adapter.conv, zeroed.control_adapter.residual_blocks[0].conv2):
            conv.weight.zero_()
            conv.bias.zero_()
        torch.testing.assert_close(zeroed(x, t, context, camera_conditions=camera), base, atol=0, rtol=0)


def test_an_odd_latent_is_padded_as_its_camera_is(model) -> None:
    """A latent 3 x 5 (not whole 2x2 patches) is padded, wrapping round, and so is its camera embedding (8 pixels a
    latent pixel); the result is cropped back."""
    camera = camera_embedding("Pan Right", 40, 24, 5)
    out = model(torch.randn(1, 32, 2, 3, 5), torch.tensor([0.5]), torch.randn(1, 4, 32), camera_conditions=camera)
    assert out.shape == (1, 16, 2, 3, 5) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="a camera embedding \\[1, 24, 2, 32, 40\\]"):
        model(torch.randn(1, 32, 2, 4, 5), torch.tensor([0.5]), torch.randn(1, 4, 32), camera_conditions=camera)


def test_a_camera_file_loads_as_a_camera_model(tmp_path, model) -> None:
    path = write_tiny_wan(tmp_path / "wan2.1_fun_camera.safetensors", "camera", seed=2, dtype=torch.float32)
    loaded = load_wan_unet(path)
    assert isinstance(loaded.unet, WanCameraModel) and loaded.unused_keys == []
    config = loaded.family.unet_config
    assert (config.camera_in_dim, config.camera_blocks, config.in_dim, config.kind) == (24, 1, 32, "i2v")
    assert loaded.family.name == "wan21"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value, atol=0, rtol=0)
    # The released shapes (on the meta device), configs read back from the keys alone: Wan 2.1 Fun V1.1 1.3B camera
    # (32 channels in, CLIP image branch) and Wan 2.2 Fun A14B camera (36 channels in, no image branch).
    released = [WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=32, image_input="i2v",
                          camera_in_dim=24),
                WanConfig(in_dim=36, camera_in_dim=24)]
    for config in released:
        with torch.device("meta"):
            sd = WanCameraModel(config).state_dict()
        assert sd["control_adapter.conv.weight"].shape == (config.dim, 24 * 64, 2, 2)
        assert wan_config_from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()}) == config
