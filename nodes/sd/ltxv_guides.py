"""LTX-Video keyframe guides in the SD node set (LTXVAddGuide, LTXVCropGuides).

A guide is a picture (or a short clip) the video should pass through at a given frame. LTXVAddGuide encodes it with
the VAE and appends its latent frames after the video's, kept by the noise mask at 1 - strength (at strength 1 never
re-noised: the sampler hands the model those frames clean, `ldm.sampling.masked_timesteps`), and records where they
stand in the video in both prompts' `keyframe_idxs` [B, 3, K], one (pixel frame, pixel row, pixel column) per guide
token. The transformer takes those as the appended tokens' positions instead of their place in the latent
(`ldm.ltxv`), so that attention sees the guide at the frame it guides. A guide at frame 0 replaces the video's first
latent frames in place instead, as LTXVImgToVideo does, and records nothing (ComfyUI's nodes as LTX-Video 0.9.x
shipped with; later ComfyUI appends that one too, and keeps a start and an end per coordinate). After sampling,
LTXVCropGuides takes the appended frames off the latent and its noise mask, and the coordinates off the prompts.

The coordinates are Lightricks' (and diffusers' LTXConditionPipeline's) for conditioning frames: the guide's latent
frame k stands at pixel frame frame_idx + max(8 k - 7, 0) (the VAE's causal first frame), its latent pixel (r, c)
at (32 r, 32 c); for a single picture that is frame_idx itself.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.ltxv import latent_positions
from nodes.node import Node
from nodes.sd.latent import upscale_latent
from nodes.sd.ltxv import FRAMES_PER_LATENT, PIXELS_PER_LATENT
from nodes.sd.models import Vae
from nodes.sd.vae import encode, is_video_vae
from nodes.spec import Float, Int, Output, Socket

KEY = "keyframe_idxs"  # ComfyUI's conditioning option, kept for workflows' and plugins' sake


def keyframe_idxs(conditioning: list) -> torch.Tensor | None:
    """The guide coordinates a prompt carries (the first entry's that has them, as ComfyUI reads them)."""
    return next((options[KEY] for _, options in conditioning if options.get(KEY) is not None), None)


def guide_frames(conditioning: list, samples: torch.Tensor) -> int:
    """How many latent frames at the end of `samples` [B, C, T, h, w] are guides, by the prompt's guide tokens."""
    guides = keyframe_idxs(conditioning)
    if guides is None:
        return 0
    per_frame = samples.shape[3] * samples.shape[4]
    if guides.shape[-1] % per_frame or guides.shape[-1] // per_frame >= samples.shape[2]:
        raise ValueError(f"the prompt carries {guides.shape[-1]} guide tokens, which are no whole number of frames "
                         f"of the latent {tuple(samples.shape)} before its own: give the latent LTXVAddGuide made "
                         "with these prompts")
    return guides.shape[-1] // per_frame


def guide_coordinates(frames: int, rows: int, cols: int, frame_idx: int) -> torch.Tensor:
    """[1, 3, frames * rows * cols]: each guide token's (pixel frame, pixel row, pixel column), in token order."""
    positions = latent_positions(frames, rows, cols, frame_rate=1.0)  # causal frames, seconds at 1 fps = frames
    positions[:, 0] += frame_idx
    return positions.T.unsqueeze(0)


def _noise_mask(latent: dict) -> torch.Tensor:
    """The latent's noise mask as [B, 1, T, h', w'] (a copy), all ones where it has none, as ComfyUI's LTXV nodes
    read it."""
    samples, mask = latent["samples"], latent.get("noise_mask")
    if mask is None:
        return torch.ones(samples.shape[0], 1, samples.shape[2], 1, 1)
    if mask.ndim != 5 or mask.shape[2] != samples.shape[2]:
        raise ValueError(f"the latent's noise mask {tuple(mask.shape)} is no per-frame mask [B, 1, frames, h, w] of "
                         f"its {samples.shape[2]} frames: LTX-Video's guides extend only such masks")
    return mask.clone()


def _with_guides(conditioning: list, guides: torch.Tensor) -> list:
    """Each entry with `guides` appended to the prompt's own coordinates (appending to earlier guides)."""
    earlier = keyframe_idxs(conditioning)
    combined = guides if earlier is None else torch.cat([earlier, guides.to(earlier)], dim=2)
    return [(embedding, {**options, KEY: combined}) for embedding, options in conditioning]


def _without_guides(conditioning: list) -> list:
    return [(embedding, {k: v for k, v in options.items() if k != KEY}) for embedding, options in conditioning]


class LTXVAddGuide(Node):
    """Guides the video through a picture (or clip) at a frame: its latent frames appended after the video's, kept
    by the noise mask at 1 - strength, the model told which frame they stand for (a guide at frame 0 replaces the
    first frames in place instead)."""

    category = "conditioning/video_models"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    latent = Socket("LATENT")
    image = Socket("IMAGE", tooltip="Image or video to condition the latent video on. Must be 8*n + 1 frames. If the "
                   "video is not 8*n + 1 frames, it will be cropped to the nearest 8*n + 1 frames.")
    frame_idx = Int(0, min=-9999, max=9999, tooltip="Frame index to start the conditioning at. For single-frame "
                    "images or videos with 1-8 frames, any frame_idx value is acceptable. For videos with 9+ frames, "
                    "frame_idx must be divisible by 8, otherwise it will be rounded down to the nearest multiple of "
                    "8. Negative values are counted from the end of the video.")
    strength = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, vae: Vae, latent: dict, image: torch.Tensor, frame_idx: int,
                strength: float) -> tuple[list, list, dict]:
        samples = latent["samples"]
        if samples.ndim != 5:
            raise ValueError(f"the latent {tuple(samples.shape)} is not a video latent [B, C, frames, h, w]: make it "
                             "with EmptyLTXVLatentVideo")
        if not is_video_vae(vae):
            raise ValueError(f"LTXVAddGuide encodes its image with LTX-Video's VAE; {vae.source} is an image VAE")
        batch, channels, length, rows, cols = samples.shape
        video_frames = length - guide_frames(positive, samples)  # the video's own latent frames, earlier guides off
        pictures = (image.shape[0] - 1) // FRAMES_PER_LATENT * FRAMES_PER_LATENT + 1  # 8 n + 1, as the VAE takes
        if frame_idx < 0:  # -1: the video's last picture
            frame_idx = max((video_frames - 1) * FRAMES_PER_LATENT + 1 + frame_idx, 0)
        if pictures > 1:  # a clip's latent frames fall on the video's: its start on a multiple of 8
            frame_idx = frame_idx // FRAMES_PER_LATENT * FRAMES_PER_LATENT
        start = (frame_idx + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT  # the latent frame holding picture frame_idx

        pixels = upscale_latent(image[:pictures].movedim(-1, 1).float(), cols * PIXELS_PER_LATENT,
                                rows * PIXELS_PER_LATENT, "bilinear", "center").movedim(1, -1)
        guide = encode(self, vae, pixels[..., :3])
        if guide.shape[1] != channels:
            raise ValueError(f"{vae.source} encodes {guide.shape[1]} channels and the latent has {channels}: encode "
                             "the guide with the LTX-Video checkpoint's VAE")
        frames = guide.shape[2]
        if start + frames > video_frames:
            pictures = (video_frames - 1) * FRAMES_PER_LATENT + 1
            raise ValueError(f"a guide of {frames} latent frame(s) at frame {frame_idx} (latent frame {start}) runs "
                             f"past the video's {video_frames} latent frames ({pictures} pictures)")
        guide = guide.expand(batch, -1, -1, -1, -1)
        mask = _noise_mask(latent)
        kept = 1.0 - strength
        if frame_idx == 0:
            samples = samples.clone()
            samples[:, :, :frames] = guide
            mask[:, :, :frames] = kept
            return positive, negative, {**latent, "samples": samples, "noise_mask": mask}
        coordinates = guide_coordinates(frames, rows, cols, frame_idx)
        samples = torch.cat([samples, guide.to(samples.dtype)], dim=2)
        mask = torch.cat([mask, torch.full((*mask.shape[:2], frames, *mask.shape[3:]), kept)], dim=2)
        return (_with_guides(positive, coordinates), _with_guides(negative, coordinates),
                {**latent, "samples": samples, "noise_mask": mask})


class LTXVCropGuides(Node):
    """Takes LTXVAddGuide's appended guide frames off the latent (and its noise mask) and their coordinates off the
    prompts, leaving the video's own frames to decode."""

    category = "conditioning/video_models"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    latent = Socket("LATENT")
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, latent: dict) -> tuple[list, list, dict]:
        samples = latent["samples"]
        if samples.ndim != 5:
            raise ValueError(f"the latent {tuple(samples.shape)} is not a video latent [B, C, frames, h, w]")
        frames = guide_frames(positive, samples)
        if frames == 0:
            return positive, negative, latent
        out = {**latent, "samples": samples[:, :, :-frames]}
        if latent.get("noise_mask") is not None:
            out["noise_mask"] = _noise_mask(latent)[:, :, :-frames]
        return _without_guides(positive), _without_guides(negative), out


NODES: list[Any] = [LTXVAddGuide, LTXVCropGuides]
