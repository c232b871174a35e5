"""Wan 2.1 Fun camera control in the SD node set: WanCameraEmbedding's camera moves, WanCameraImageToVideo's
conditioning, and what the sampler gives a camera model for them.

WanCameraEmbedding makes the Plücker ray embedding of a preset camera move (`ldm.wan_camera`), [1, 24, latent
frames, height, width]. WanCameraImageToVideo puts it in both prompts as ComfyUI does (`camera_conditions`), with the
start image's latent beside the noisy one (`concat_latent_image`: the start pictures' latent frames, the latent
space's zero after them; Wan 2.1's 32-channel camera models take it alone; no mask is given, so the 4 mask channels
of Wan 2.2's 36-channel ones are zero, as in ComfyUI). The sampler binds
the embedding to the model for the run (`CameraControls`): both prompts carry the same one.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.clip_vision import ClipVisionOutput
from ldm.wan_camera import CAMERA_POSES, camera_embedding
from ldm.wan_files import WAN21_MEAN
from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION
from nodes.sd.models import DiffusionModel, Vae
from nodes.sd.wan import WanVideoConditioning, _encoded_frames, _with, latent_frames, mean_filled
from nodes.spec import Combo, Float, Int, Output, Socket

CAMERA_EMBEDDING = "WAN_CAMERA_EMBEDDING"


class WanCameraEmbedding(Node):
    """The Plücker ray embedding of a preset camera move over `length` pictures (1 + 4k) at `speed`, with pinhole
    intrinsics relative to the picture (focal lengths fx, fy; principal point cx, cy), for a Fun camera model;
    the size and length pass through to WanCameraImageToVideo."""

    category = "camera"
    camera_pose = Combo(list(CAMERA_POSES), default="Static")
    width = Int(832, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(480, min=16, max=MAX_RESOLUTION, step=16)
    length = Int(81, min=1, max=MAX_RESOLUTION, step=4)
    speed = Float(1.0, min=0.0, max=10.0, step=0.1, optional=True)
    fx = Float(0.5, min=0.0, max=1.0, step=0.000000001, optional=True)
    fy = Float(0.5, min=0.0, max=1.0, step=0.000000001, optional=True)
    cx = Float(0.5, min=0.0, max=1.0, step=0.01, optional=True)
    cy = Float(0.5, min=0.0, max=1.0, step=0.01, optional=True)
    outputs = (Output(CAMERA_EMBEDDING, "camera_embedding"), Output("INT", "width"), Output("INT", "height"),
               Output("INT", "length"))

    def execute(self, camera_pose: str, width: int, height: int, length: int, speed: float = 1.0, fx: float = 0.5,
                fy: float = 0.5, cx: float = 0.5, cy: float = 0.5) -> tuple[torch.Tensor, int, int, int]:
        if fx <= 0 or fy <= 0:
            raise ValueError(f"WanCameraEmbedding's focal lengths must be above 0 (fx {fx}, fy {fy})")
        return camera_embedding(camera_pose, width, height, length, speed, fx, fy, cx, cy), width, height, length


class WanCameraImageToVideo(WanVideoConditioning):
    """Image-to-video for Wan's Fun camera models: the prompts carry the camera embedding, the start image's latent
    (the latent space's zero after its frames) and its CLIP vision encoding; the latent to sample is an empty one."""

    clip_vision_output = Socket("CLIP_VISION_OUTPUT", optional=True)
    start_image = Socket("IMAGE", optional=True)
    camera_conditions = Socket(CAMERA_EMBEDDING, optional=True)

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, clip_vision_output: ClipVisionOutput | None = None,
                start_image: torch.Tensor | None = None, camera_conditions: torch.Tensor | None = None
                ) -> tuple[list, list, dict]:
        shape = (batch_size, 16, latent_frames(length), height // 8, width // 8)
        values: dict[str, Any] = {}
        if start_image is not None:
            # Only the given pictures are encoded (no grey after them, unlike WanImageToVideo), as in ComfyUI.
            start = _encoded_frames(self, vae, start_image[:length], width, height, "WanCameraImageToVideo")
            values["concat_latent_image"] = mean_filled(shape, WAN21_MEAN, start)
        if camera_conditions is not None:
            values["camera_conditions"] = camera_conditions
        if clip_vision_output is not None:
            values["clip_vision_output"] = clip_vision_output
        return _with(positive, **values), _with(negative, **values), {"samples": torch.zeros(shape)}


class CameraControls:
    """A Fun camera model called with one run's camera embedding (repeated to each call's batch)."""

    def __init__(self, unet: Any, camera: torch.Tensor) -> None:
        self.unet, self.camera = unet, camera

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if (self.camera.device, self.camera.dtype) != (x.device, x.dtype):
            self.camera = self.camera.to(x.device, x.dtype)  # once per run, not at every model call
        return self.unet(x, timesteps, context, camera_conditions=self.camera, **kwargs)


def camera_controls(unet: Any, model: DiffusionModel, positive: list, negative: list) -> Any:
    """`unet` with the prompts' camera embedding bound (`unet` itself when they carry none). Refused for a model
    without a camera adapter (ComfyUI ignores the embedding there, which would make a video without the move
    asked for) and when the prompts carry different embeddings, which one model call cannot give its rows."""
    carried = [options["camera_conditions"] for side in (positive, negative) for _, options in side
               if options.get("camera_conditions") is not None]
    if not carried:
        return unet
    from ldm.wan_camera import is_camera

    if not is_camera(model.unet):
        raise ValueError(f"the prompts carry a camera embedding (WanCameraImageToVideo), and {model.source} has no "
                         "camera adapter: load a Wan Fun camera model (wan2.1_fun_camera_*)")
    first = carried[0]
    if any(c is not first and not torch.equal(c, first) for c in carried[1:]):
        raise ValueError("the prompts carry different camera embeddings; give both prompts the same "
                         "WanCameraImageToVideo")
    return CameraControls(unet, first.float())


NODES: list[Any] = [WanCameraEmbedding, WanCameraImageToVideo]
