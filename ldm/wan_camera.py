"""Wan 2.1 / 2.2 Fun camera control (alibaba-pai's VideoX-Fun camera models): camera trajectories, their Plücker
ray embedding, and the transformer with the camera adapter (`control_adapter.*` in the checkpoint keys).

A trajectory is one camera-to-world pose per picture, a preset move (CameraCtrl's and ComfyUI's WanCameraEmbedding
presets) growing linearly from the identity: frame i of n is moved by i / n * speed of the preset's translation
(times 1.5) and rotation (times pi / 3 radians; R = Rz Ry Rx). Every pixel's ray, through the pixel's centre with the
pinhole intrinsics, is given as its Plücker coordinates (o x d, d): o the camera's centre, d the unit direction, both
in the first frame's camera space. The embedding folds 4 pictures into each latent frame as the VAE does (the first
picture repeated 4 times, as it stands alone in its latent frame): [1, 24, latent frames, H, W], channel
6-coordinate * 4 + picture (ComfyUI's WAN_CAMERA_EMBEDDING).

The models: Wan 2.1 Fun V1.1 Control-Camera (1.3B, 14B) take the start image's latent beside the noisy one (32
channels in) and have the CLIP image branch; Wan 2.2 Fun Camera (the 14B experts) take 4 mask channels too (36) and
have no image branch. The adapter (VideoX-Fun's SimpleAdapter) folds each frame's 8x8 pixels into channels (the
VAE's downscale), embeds them with a conv as wide and strided as the patch embedding, runs residual conv blocks, and
its output is added to the video's patch-embedded tokens before the transformer blocks (`WanCameraModel.run_blocks`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.wan import WanConfig, WanModel, pad_to_patch

# Each preset's rotation (x, y, z, in units of BASE_ANGLE) and translation (in units of BASE_TRANSLATION) at the end.
CAMERA_POSES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "Static": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    "Pan Up": ((0.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "Pan Down": ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "Pan Left": ((0.0, 0.0, 0.0), (-1.0, 0.0, 0.0)),
    "Pan Right": ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0)),
    "Zoom In": ((0.0, 0.0, 0.0), (0.0, 0.0, 2.0)),
    "Zoom Out": ((0.0, 0.0, 0.0), (0.0, 0.0, -2.0)),
    "Anti Clockwise (ACW)": ((0.0, 0.0, -1.0), (0.0, 0.0, 0.0)),
    "ClockWise (CW)": ((0.0, 0.0, 1.0), (0.0, 0.0, 0.0)),
}
BASE_ANGLE = math.pi / 3
BASE_TRANSLATION = 1.5
# The aspect ratio the presets' intrinsics were made for (CameraCtrl's RealEstate10K poses, 1280 x 720).
POSE_ASPECT = 1280 / 720
PICTURES_PER_LATENT = 4  # Wan's VAE: the first picture alone, then 4 per latent frame
CAMERA_DOWNSCALE = 8  # pixels per latent pixel (Wan 2.1's VAE), folded into the adapter's channels


def _rotation(angles: Tensor) -> Tensor:
    """R = Rz @ Ry @ Rx for angles (x, y, z) in radians (float64)."""
    (cx, cy, cz), (sx, sy, sz) = angles.cos().tolist(), angles.sin().tolist()
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


def camera_trajectory(pose: str, length: int, speed: float = 1.0) -> Tensor:
    """The camera-to-world matrices [length, 4, 4] (float64) of a preset move over `length` pictures."""
    if pose not in CAMERA_POSES:
        raise ValueError(f"camera pose {pose!r}: one of {', '.join(CAMERA_POSES)}")
    angle, translation = (torch.tensor(v, dtype=torch.float64) for v in CAMERA_POSES[pose])
    poses = torch.eye(4, dtype=torch.float64).repeat(length, 1, 1)
    for i in range(length):
        progress = i / length * speed
        poses[i, :3, :3] = _rotation(progress * BASE_ANGLE * angle)
        poses[i, :3, 3] = progress * BASE_TRANSLATION * translation
    return poses


def relative_poses(c2w: Tensor) -> Tensor:
    """Camera-to-world poses [V, 4, 4] re-expressed in the first camera's space (the first becomes the identity)."""
    relative = torch.linalg.inv(c2w[0]) @ c2w
    relative[0] = torch.eye(4, dtype=c2w.dtype)
    return relative


def pixel_intrinsics(width: int, height: int, fx: float, fy: float, cx: float, cy: float) -> tuple[float, ...]:
    """(fx, fy, cx, cy) in pixels from ones relative to the picture's size, the focal length along the axis the
    presets' 16:9 frame was cropped on rescaled as CameraCtrl (and ComfyUI) rescale it."""
    if POSE_ASPECT > width / height:
        fx = height * POSE_ASPECT * fx / width
    else:
        fy = width / POSE_ASPECT * fy / height
    return fx * width, fy * height, cx * width, cy * height


def plucker_rays(c2w: Tensor, intrinsics: tuple[float, ...], height: int, width: int) -> Tensor:
    """The Plücker coordinates (o x d, d) [V, H, W, 6] of every pixel centre's ray for camera-to-world poses
    [V, 4, 4] and pinhole intrinsics (fx, fy, cx, cy) in pixels, in the poses' dtype; d is the unit direction in
    world space."""
    fx, fy, cx, cy = intrinsics
    rows, cols = torch.meshgrid(torch.arange(height, dtype=c2w.dtype) + 0.5,
                                torch.arange(width, dtype=c2w.dtype) + 0.5, indexing="ij")
    directions = torch.stack([(cols - cx) / fx, (rows - cy) / fy, torch.ones_like(rows)], dim=-1)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    d = torch.einsum("vij,hwj->vhwi", c2w[:, :3, :3], directions)
    o = c2w[:, None, None, :3, 3].expand_as(d)
    return torch.cat([torch.linalg.cross(o, d, dim=-1), d], dim=-1)


def fold_pictures(rays: Tensor) -> Tensor:
    """Per-picture rays [V, H, W, 6] (V = 1 + 4k) to the camera embedding [1, 24, 1 + k, H, W]: the first picture
    repeated 4 times, then 4 pictures per latent frame, channel = coordinate * 4 + picture."""
    count = rays.shape[0]
    if (count - 1) % PICTURES_PER_LATENT:
        raise ValueError(f"a camera embedding of {count} pictures: Wan's latent frames hold 1 + 4k pictures "
                         "(1, 5, 9, ..., 81)")
    order = torch.cat([torch.zeros(PICTURES_PER_LATENT - 1, dtype=torch.long), torch.arange(count)])
    frames = rays[order].unflatten(0, (-1, PICTURES_PER_LATENT))  # [T, 4, H, W, 6]
    return frames.permute(4, 1, 0, 2, 3).flatten(0, 1)[None]  # [1, 6 * 4, T, H, W]


def camera_embedding(pose: str, width: int, height: int, length: int, speed: float = 1.0, fx: float = 0.5,
                     fy: float = 0.5, cx: float = 0.5, cy: float = 0.5) -> Tensor:
    """The Fun camera models' input [1, 24, latent frames, height, width] (float32) for a preset move of `length`
    pictures (1 + 4k) at `speed`, intrinsics relative to the picture (ComfyUI's WanCameraEmbedding). The poses are
    made in float64, the rays in float32, as CameraCtrl makes them (81 pictures at 832 x 480 are 0.8 GB of rays)."""
    c2w = relative_poses(camera_trajectory(pose, length, speed)).float()
    return fold_pictures(plucker_rays(c2w, pixel_intrinsics(width, height, fx, fy, cx, cy), height, width))


class CameraResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class CameraAdapter(nn.Module):
    """Camera embeddings [B, C, T, H, W] (pixels) to patch-embedding features [B, dim, T, H / 16, W / 16]: each
    frame's 8x8 pixels folded into channels, a conv the patch's size and stride, residual conv blocks."""

    def __init__(self, in_dim: int, dim: int, patch: tuple[int, int], blocks: int = 1):
        super().__init__()
        self.pixel_unshuffle = nn.PixelUnshuffle(CAMERA_DOWNSCALE)
        self.conv = nn.Conv2d(in_dim * CAMERA_DOWNSCALE ** 2, dim, kernel_size=patch, stride=patch)
        self.residual_blocks = nn.Sequential(*(CameraResidualBlock(dim) for _ in range(blocks)))

    def forward(self, camera: Tensor) -> Tensor:
        batch = camera.shape[0]
        frames = camera.movedim(2, 1).flatten(0, 1)  # [B * T, C, H, W]
        out = self.residual_blocks(self.conv(self.pixel_unshuffle(frames)))
        return out.unflatten(0, (batch, -1)).movedim(1, 2)


class WanCameraModel(WanModel):
    """A Wan transformer with a Fun camera adapter: `camera_conditions` add their adapted features to the video's
    patch-embedded tokens; without them it is its base model."""

    def __init__(self, config: WanConfig):
        if not config.camera_in_dim:
            raise ValueError("a Wan camera model's config gives its camera input's channels (camera_in_dim)")
        super().__init__(config)
        self.control_adapter = CameraAdapter(config.camera_in_dim, config.dim, config.patch_size[1:],
                                             config.camera_blocks)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                clip_fea: Tensor | None = None, denoise_mask: Tensor | None = None,
                camera_conditions: Tensor | None = None) -> Tensor:
        """`WanModel.forward` with the camera: `camera_conditions` [B or 1, camera_in_dim, T, 8h, 8w] at the
        latent's frames and 8 times its size (WanCameraEmbedding's, padded to whole patches as the latent is)."""
        if camera_conditions is None:
            return super().forward(x, timesteps, context, y, clip_fea, denoise_mask)
        c, batch = self.config, x.shape[0]
        t, h, w = x.shape[-3:]
        expected = (c.camera_in_dim, t, h * CAMERA_DOWNSCALE, w * CAMERA_DOWNSCALE)
        if (camera_conditions.ndim != 5 or camera_conditions.shape[0] not in (1, batch)
                or tuple(camera_conditions.shape[1:]) != expected):
            rows = f"{batch} or 1" if batch > 1 else "1"
            raise ValueError(f"a camera embedding [{rows}, {', '.join(map(str, expected))}] for this latent "
                             f"(its frames, 8 times its size), not {tuple(camera_conditions.shape)}: give "
                             "WanCameraEmbedding the video's width, height and length")
        patch = (c.patch_size[0], c.patch_size[1] * CAMERA_DOWNSCALE, c.patch_size[2] * CAMERA_DOWNSCALE)
        features = self.control_adapter(pad_to_patch(camera_conditions, patch).to(self.dtype))
        camera = features.flatten(2).transpose(1, 2).expand(batch, -1, -1)
        return super().forward(x, timesteps, context, y, clip_fea, denoise_mask, camera=camera)

    def run_blocks(self, tokens: Tensor, e0: Tensor, rope: tuple[Tensor, Tensor], context: Tensor,
                   image: Tensor | None, camera: Tensor | None = None) -> Tensor:
        """The blocks over the patch-embedded tokens, the camera's features added to them first."""
        if camera is not None:
            tokens = tokens + camera.to(tokens.dtype)
        return super().run_blocks(tokens, e0, rope, context, image)


def is_camera(model: nn.Module) -> bool:
    """Whether a model takes a camera embedding (`camera_conditions`)."""
    return isinstance(model, WanCameraModel)
