"""Stable Video Diffusion and Stable Zero123: image-only checkpoints, image-to-video conditioning and video guidance.

SVD img2vid as ComfyUI runs it: ImageOnlyCheckpointLoader gives the video UNet (v-prediction on EDM's continuous
levels, 0.002 to 700), its CLIP image encoder and its video VAE; SVD_img2vid_Conditioning puts the init image's CLIP
embedding in the prompts (as their context), its latent (as `concat_latent_image`, the UNet's extra input
channels; zeros for the negative prompt) and the motion settings, and makes an empty latent of `video_frames`
frames, which KSampler samples as one batch. The sampler makes the UNet's `y` from the settings (`svd_sampling_y`).
Stable Zero123 loads with the same loader; StableZero123_Conditioning gives its prompts (`ldm.zero123`),
StableZero123_Conditioning_Batched a camera move per latent of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from ldm.checkpoint import load_state_dict
from ldm.latent_preview import register_vae
from ldm.sampling.model_patches import CfgArgs
from ldm.sampling.schedules import ContinuousSchedule
from ldm.svd import svd_y, with_frame_count
from ldm.svd_files import SIGMA_MAX, SIGMA_MIN
from nodes.node import Node, NodeResult
from nodes.sd.imageio import workflow_metadata
from nodes.sd.latent import upscale_latent
from nodes.sd.loaders import CheckpointLoaderSimple, model_file, model_path, shared_model
from nodes.sd.merge import _save
from nodes.sd.models import (
    DiffusionModel,
    Vae,
    device_and_dtype,
    file_fingerprint,
    load_device,
    new_bytes,
    on_device,
    schedule_of,
)
from nodes.sd.vae import encode
from nodes.sd.vision import ClipVision, _encode
from nodes.spec import Float, Int, Output, Socket, String

log = logging.getLogger(__name__)

SVD_SCHEDULE = ContinuousSchedule(SIGMA_MIN, SIGMA_MAX, 1.0)
# The conditioning settings ComfyUI's SVD model falls back on when a prompt carries none.
DEFAULT_FPS, DEFAULT_MOTION_BUCKET, DEFAULT_AUGMENTATION = 6, 127, 0.0
# ComfyUI draws the init image's augmentation noise unseeded; a fixed seed keeps Loom's outputs cacheable.
AUGMENTATION_SEED = 0


def svd_sampling_y(conditioning: list, latent: torch.Tensor) -> list:
    """Each entry with SVD's `y` from its fps, motion bucket and augmentation level, and the latent's frame count
    (its batch) as a last column, by which the UNet tells the videos in a batch apart (`ldm.svd.with_frame_count`)."""
    out = []
    for embedding, options in conditioning:
        y = svd_y(options.get("fps", DEFAULT_FPS), options.get("motion_bucket_id", DEFAULT_MOTION_BUCKET),
                  options.get("augmentation_level", DEFAULT_AUGMENTATION))
        out.append((embedding, {**options, "y": with_frame_count(y, latent.shape[0])}))
    return out


def _require_svd(model: DiffusionModel, node: str) -> None:
    if model.family.name != "svd":
        raise ValueError(f"{node} needs a Stable Video Diffusion model (ImageOnlyCheckpointLoader); {model.source} "
                         f"is {model.family.name.upper()}")


class ImageOnlyCheckpointLoader(Node):
    """Loads a Stable Video Diffusion img2vid checkpoint (svd.safetensors, svd_xt.safetensors): its video UNet,
    the CLIP image encoder that embeds the init image, and its VAE, whose decoder smooths across frames; or a
    Stable Zero123 checkpoint: its UNet (with the projection of the image and camera), image encoder and VAE."""

    display_name = "Image Only Checkpoint Loader (img2vid model)"
    category = "loaders/video_models"
    ckpt_name = model_file("checkpoints")
    outputs = (Output("MODEL"), Output("CLIP_VISION"), Output("VAE"))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return CheckpointLoaderSimple.fingerprint(inputs)

    def execute(self, ckpt_name: str) -> tuple[DiffusionModel, ClipVision, Vae]:
        from ldm.checkpoint import read_shapes
        from ldm.svd_files import load_svd_checkpoint
        from ldm.zero123 import is_zero123_state_dict, load_zero123_checkpoint

        path = model_path("checkpoints", ckpt_name)
        _, dtype, vae_dtype = device_and_dtype(self.ctx)
        device = load_device(self.ctx)

        def load() -> Any:
            # Stable Zero123's release is a .ckpt, whose keys only reading it tells (once, when first loaded).
            shapes = read_shapes(path)
            zero123 = is_zero123_state_dict(shapes if shapes is not None else load_state_dict(path))
            loaded = (load_zero123_checkpoint if zero123 else load_svd_checkpoint)(path, device=device, dtype=dtype)
            if vae_dtype != dtype:
                loaded.vae.to(dtype=vae_dtype)
            if loaded.unused_keys:
                log.warning("%s: %d unused keys, e.g. %s", path.name, len(loaded.unused_keys), loaded.unused_keys[:3])
            return loaded

        key = ("image_only_checkpoint", str(path), str(file_fingerprint(path)), str(device), str(dtype),
               str(vae_dtype))
        loaded = shared_model(self, key, load)
        register_vae(loaded.vae)  # the step previews' colours for this latent space (fitted once per VAE)
        schedule = SVD_SCHEDULE if loaded.family.name == "svd" else schedule_of(loaded.family)
        return (DiffusionModel(loaded.unet, loaded.family, ckpt_name, schedule=schedule),
                ClipVision(loaded.clip_vision, ckpt_name), Vae(loaded.vae, ckpt_name))


class SVD_img2vid_Conditioning(Node):  # noqa: N801 (ComfyUI's name)
    """Prompts and an empty latent for SVD: the init image's CLIP embedding and latent (at width x height) with the
    frame rate, motion amount and how much noise to add to the init image; the negative prompt has neither image."""

    category = "conditioning/video_models"
    clip_vision = Socket("CLIP_VISION")
    init_image = Socket("IMAGE")
    vae = Socket("VAE")
    width = Int(1024, min=16, max=16384, step=8)
    height = Int(576, min=16, max=16384, step=8)
    video_frames = Int(14, min=1, max=4096)
    motion_bucket_id = Int(127, min=1, max=1023, tooltip="how much motion: higher moves more")
    fps = Int(6, min=1, max=1024)
    augmentation_level = Float(0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="noise added to the init image: more lets the video stray further from it")
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, clip_vision: ClipVision, init_image: torch.Tensor, vae: Vae, width: int, height: int,
                video_frames: int, motion_bucket_id: int, fps: int,
                augmentation_level: float) -> tuple[list, list, dict]:
        pooled = _encode(on_device(self.ctx, clip_vision.model), init_image, True).image_embeds[None]
        pixels = upscale_latent(init_image.movedim(-1, 1).float(), width, height, "bilinear", "center")
        pixels = pixels.movedim(1, -1)[..., :3]
        if augmentation_level > 0:
            noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(AUGMENTATION_SEED))
            pixels = pixels + noise * augmentation_level
        latent = encode(self, vae, pixels)
        options = {"motion_bucket_id": motion_bucket_id, "fps": fps, "augmentation_level": augmentation_level}
        positive = [(pooled, {**options, "concat_latent_image": latent})]
        negative = [(torch.zeros_like(pooled), {**options, "concat_latent_image": torch.zeros_like(latent)})]
        return positive, negative, {"samples": torch.zeros(video_frames, 4, height // 8, width // 8)}


def _zero123_view(node: Node, clip_vision: ClipVision, init_image: torch.Tensor, vae: Vae, width: int,
                  height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input view's CLIP image embedding [B, 1, D] and its latent at width x height (Stable Zero123's nodes)."""
    pooled = _encode(on_device(node.ctx, clip_vision.model), init_image, True).image_embeds[None]
    pixels = upscale_latent(init_image.movedim(-1, 1).float(), width, height, "bilinear", "center")
    return pooled, encode(node, vae, pixels.movedim(1, -1)[..., :3])


class StableZero123_Conditioning(Node):  # noqa: N801 (ComfyUI's name)
    """Prompts and an empty latent for Stable Zero123: the input view's CLIP embedding with the camera move
    (elevation and azimuth in degrees) and the view's latent (at width x height); the negative prompt has neither."""

    category = "conditioning/3d_models"
    clip_vision = Socket("CLIP_VISION")
    init_image = Socket("IMAGE")
    vae = Socket("VAE")
    width = Int(256, min=16, max=16384, step=8)
    height = Int(256, min=16, max=16384, step=8)
    batch_size = Int(1, min=1, max=4096)
    elevation = Float(0.0, min=-180.0, max=180.0, step=0.1, round=False)
    azimuth = Float(0.0, min=-180.0, max=180.0, step=0.1, round=False)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, clip_vision: ClipVision, init_image: torch.Tensor, vae: Vae, width: int, height: int,
                batch_size: int, elevation: float, azimuth: float) -> tuple[list, list, dict]:
        from ldm.zero123 import camera_embedding

        pooled, latent = _zero123_view(self, clip_vision, init_image, vae, width, height)
        camera = camera_embedding(elevation, azimuth).expand(pooled.shape[0], pooled.shape[1], -1)
        positive = [(torch.cat([pooled, camera], dim=-1), {"concat_latent_image": latent})]
        negative = [(torch.zeros_like(pooled), {"concat_latent_image": torch.zeros_like(latent)})]
        return positive, negative, {"samples": torch.zeros(batch_size, 4, height // 8, width // 8)}


class StableZero123_Conditioning_Batched(Node):  # noqa: N801 (ComfyUI's name)
    """StableZero123_Conditioning with a camera move per latent: item k of the batch is seen from elevation +
    k * elevation_batch_increment and azimuth + k * azimuth_batch_increment (an orbit around the object)."""

    category = "conditioning/3d_models"
    clip_vision = Socket("CLIP_VISION")
    init_image = Socket("IMAGE")
    vae = Socket("VAE")
    width = Int(256, min=16, max=16384, step=8)
    height = Int(256, min=16, max=16384, step=8)
    batch_size = Int(1, min=1, max=4096)
    elevation = Float(0.0, min=-180.0, max=180.0, step=0.1, round=False)
    azimuth = Float(0.0, min=-180.0, max=180.0, step=0.1, round=False)
    elevation_batch_increment = Float(0.0, min=-180.0, max=180.0, step=0.1, round=False, extra={"advanced": True})
    azimuth_batch_increment = Float(0.0, min=-180.0, max=180.0, step=0.1, round=False, extra={"advanced": True})
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, clip_vision: ClipVision, init_image: torch.Tensor, vae: Vae, width: int, height: int,
                batch_size: int, elevation: float, azimuth: float, elevation_batch_increment: float,
                azimuth_batch_increment: float) -> tuple[list, list, dict]:
        from ldm.zero123 import camera_embedding

        if init_image.shape[0] != 1:
            raise ValueError(f"StableZero123_Conditioning_Batched: init_image is a batch of {init_image.shape[0]} "
                             "pictures; it takes one view of the object (pick one with ImageFromBatch)")
        pooled, latent = _zero123_view(self, clip_vision, init_image, vae, width, height)
        # The angles add up step by step as ComfyUI's loop does (the same float rounding).
        cameras = []
        for _ in range(batch_size):
            cameras.append(camera_embedding(elevation, azimuth))
            elevation += elevation_batch_increment
            azimuth += azimuth_batch_increment
        cond = torch.cat([pooled.expand(batch_size, -1, -1), torch.cat(cameras).to(pooled)], dim=-1)
        positive = [(cond, {"concat_latent_image": latent})]
        negative = [(torch.zeros_like(pooled), {"concat_latent_image": torch.zeros_like(latent)})]
        return positive, negative, {"samples": torch.zeros(batch_size, 4, height // 8, width // 8),
                                    "batch_index": [0] * batch_size}


@dataclass(frozen=True)
class VideoCfg:
    """Guidance whose scale changes over the frames (the latent batch): from `min_cfg` at the first frame to the
    sampler's cfg at the last, linearly, or (`triangle`) up to cfg at the middle frame and back down."""

    min_cfg: float
    triangle: bool = False

    def __call__(self, args: CfgArgs) -> torch.Tensor:
        if args.uncond is None:
            return args.cond
        frames = args.cond.shape[0]
        if self.triangle:
            position = torch.linspace(0, 1, frames, device=args.cond.device)
            scale = 2 * (position - torch.floor(position + 0.5)).abs() * (args.cfg - self.min_cfg) + self.min_cfg
        else:
            scale = torch.linspace(self.min_cfg, args.cfg, frames, device=args.cond.device)
        scale = scale.to(args.cond.dtype).reshape(-1, *[1] * (args.cond.ndim - 1))
        return args.uncond + scale * (args.cond - args.uncond)


class VideoLinearCFGGuidance(Node):
    """Guidance rising linearly over the frames, from min_cfg at the first (the init image, which needs little)
    to the sampler's cfg at the last."""

    category = "sampling/video_models"
    model = Socket("MODEL")
    min_cfg = Float(1.0, min=0.0, max=100.0, step=0.5, round=0.01)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, min_cfg: float) -> tuple[DiffusionModel]:
        patches = replace(model.sampling_patches, cfg_function=VideoCfg(min_cfg))
        return (replace(model, sampling_patches=patches),)


class VideoTriangleCFGGuidance(Node):
    """Guidance rising from min_cfg at the first frame to the sampler's cfg at the middle one, and back down."""

    category = "sampling/video_models"
    model = Socket("MODEL")
    min_cfg = Float(1.0, min=0.0, max=100.0, step=0.5, round=0.01)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, min_cfg: float) -> tuple[DiffusionModel]:
        patches = replace(model.sampling_patches, cfg_function=VideoCfg(min_cfg, triangle=True))
        return (replace(model, sampling_patches=patches),)


class UNetTemporalAttentionMultiply(Node):
    """Scales the outputs of the video UNet's attention layers: self- and cross-attention, in the spatial
    ("structural") transformer blocks and in the temporal ones, each by its own factor."""

    category = "_for_testing/attention_experiments"
    model = Socket("MODEL")
    self_structural = Float(1.0, min=0.0, max=10.0, step=0.01)
    self_temporal = Float(1.0, min=0.0, max=10.0, step=0.01)
    cross_structural = Float(1.0, min=0.0, max=10.0, step=0.01)
    cross_temporal = Float(1.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, self_structural: float, self_temporal: float, cross_structural: float,
                cross_temporal: float) -> tuple[DiffusionModel]:
        from ldm.merge import merge_modules

        def factor(key: str) -> tuple[float, float]:
            attention = next((name for name in ("attn1", "attn2") if f"{name}.to_out.0." in key), None)
            if attention is None:
                return 1.0, 0.0
            temporal = ".time_stack." in key
            return ({"attn1": self_temporal, "attn2": cross_temporal} if temporal
                    else {"attn1": self_structural, "attn2": cross_structural})[attention], 0.0

        # The weight times its factor (ComfyUI's patch of strength 0 and model strength the factor): a copy
        # sharing every weight whose factor is 1.
        unet = merge_modules(model.unet, model.unet, factor)
        return (replace(model, unet=unet, own_bytes=new_bytes(unet, model.unet)),)


class ImageOnlyCheckpointSave(Node):
    """Saves an SVD MODEL, its CLIP_VISION and VAE as one checkpoint in SGM's layout in output/
    (ImageOnlyCheckpointLoader reads it back)."""

    category = "advanced/model_merging"
    output_node = True
    model = Socket("MODEL")
    clip_vision = Socket("CLIP_VISION")
    vae = Socket("VAE")
    filename_prefix = String("checkpoints/ComfyUI", tooltip="file name prefix, inside the output folder")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        from nodes.folders import output_prefix_problem

        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, model: DiffusionModel, clip_vision: ClipVision, vae: Vae, filename_prefix: str) -> NodeResult:
        from ldm.merge import dequantized
        from ldm.svd_files import save_svd_checkpoint
        from ldm.svd_vae import VideoAutoencoder

        _require_svd(model, "ImageOnlyCheckpointSave")
        if not isinstance(vae.vae, VideoAutoencoder):
            raise ValueError(f"the VAE {vae.source} is not a video VAE: save SVD's own (ImageOnlyCheckpointLoader's)")
        unet, workflow = dequantized(model.unet), workflow_metadata(self.ctx)
        entry = _save(filename_prefix, lambda path, title: save_svd_checkpoint(
            path, unet, vae.vae, clip_vision.model, {**workflow, "modelspec.title": title}))
        return NodeResult(ui={"files": [entry]})


NODES: list[Any] = [ImageOnlyCheckpointLoader, SVD_img2vid_Conditioning, StableZero123_Conditioning,
                    StableZero123_Conditioning_Batched,
                    VideoLinearCFGGuidance, VideoTriangleCFGGuidance, UNetTemporalAttentionMultiply,
                    ImageOnlyCheckpointSave]
