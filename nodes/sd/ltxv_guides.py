"""LTX-Video and LTX-2 keyframe guides in the SD node set (LTXVAddGuide, LTXVCropGuides).

A guide is a picture (or a short clip) the video should pass through at a given frame. LTXVAddGuide encodes it with
the VAE and appends its latent frames after the video's, kept by the noise mask at 1 - strength (at strength 1 never
re-noised: the sampler hands the model those frames clean, `ldm.sampling.masked_timesteps`), and records where they
stand in the video in both prompts' `keyframe_idxs`. The transformer takes those as the appended tokens' positions
instead of their place in the latent, so that attention sees the guide at the frame it guides. After sampling,
LTXVCropGuides takes the appended frames off the latent and its noise mask, and the coordinates off the prompts.
Guides go on the video latent, before LTXVConcatAVLatent joins it with LTX-2's audio.

The node follows the VAE it is given:

- LTX-Video 0.9.x (ComfyUI's nodes as that model shipped with; `ldm.ltxv`): a guide at frame 0 replaces the video's
  first latent frames in place, as LTXVImgToVideo does, and records nothing; other guides are appended, with
  `keyframe_idxs` [B, 3, K]: one (pixel frame, pixel row, pixel column) per guide token, Lightricks' (and diffusers'
  LTXConditionPipeline's) coordinates for conditioning frames: latent frame k at pixel frame frame_idx + max(8 k - 7,
  0) (the VAE's causal first frame), latent pixel (r, c) at (32 r, 32 c).
- LTX-2 (current ComfyUI's nodes; `ldm.ltx2`): every guide is appended, frame 0's too, with `keyframe_idxs`
  [B, 3, K, 2]: each token's [start, end) in pixel frames, rows and columns: latent frame k spans [8 k, 8 k + 8),
  pixel (r, c) [32 r, 32 r + 32) x [32 c, 32 c + 32); for a guide at frame 0 or of one picture the frames are
  causal (t -> max(t - 7, 0) at both ends: [0, 1) for the first latent frame); then shifted by frame_idx. A clip of
  9 or more pictures placed after frame 0 starts on a frame 8 k + 1 (rounded down) and is encoded after a copy of
  its first picture whose latent frame (the VAE's one-picture causal frame) is dropped, so each of its latent frames
  stands for 8 pictures. Each guide also adds an entry to the prompts' `guide_attention_entries` ({pre_filter_count:
  its tokens, strength, pixel_mask: None, latent_shape: [F, h, w]}), by which ComfyUI's transformer weakens the
  attention between the video's tokens and a guide's of strength below 1 (log(strength) added to those attention
  logits), as Loom's does (`ldm.ltx2.guide_attention_bias`). LTXVCropGuides takes off as many latent frames as the
  guides' distinct start frames.

Negative frame indices count back from the video's last picture (-1: the last), over the video's own latent frames
(earlier guides' left out). ComfyUI's IC-LoRA guides (`iclora_parameters` with a reference_downscale_factor above 1,
encoded small and spread over the full grid) are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.ltxv import latent_positions
from ldm.sampling.av_latent import is_av
from nodes.node import Node
from nodes.sd.latent import upscale_latent
from nodes.sd.ltxv import FRAMES_PER_LATENT, PIXELS_PER_LATENT
from nodes.sd.models import Vae
from nodes.sd.vae import encode, is_video_vae
from nodes.spec import Float, Int, Output, Socket

KEY = "keyframe_idxs"  # ComfyUI's conditioning options, kept for workflows' and plugins' sake
ATTENTION_KEY = "guide_attention_entries"


def keyframe_idxs(conditioning: list) -> torch.Tensor | None:
    """The guide coordinates a prompt carries (the first entry's that has them, as ComfyUI reads them)."""
    return next((options[KEY] for _, options in conditioning if options.get(KEY) is not None), None)


def is_ltx2_vae(vae: Vae) -> bool:
    """Whether `vae` is LTX-2's video VAE (whose guides follow current ComfyUI's LTX-2 semantics)."""
    return getattr(getattr(vae.vae, "config", None), "version", None) == "2.0"


def guide_frames(conditioning: list, samples: torch.Tensor) -> int:
    """How many latent frames at the end of `samples` [B, C, T, h, w] are guides: by the prompt's guide tokens
    (LTX-Video's [B, 3, K]), or its guides' distinct start frames (LTX-2's [B, 3, K, 2], as ComfyUI counts them)."""
    guides = keyframe_idxs(conditioning)
    if guides is None:
        return 0
    if guides.ndim == 4:
        frames = int(torch.unique(guides[:, 0, :, 0]).numel())
        if frames >= samples.shape[2]:
            raise ValueError(f"the prompt carries guides starting at {frames} frames, which leave no frame of the "
                             f"latent {tuple(samples.shape)} before them: give the latent LTXVAddGuide made with "
                             "these prompts")
        return frames
    per_frame = samples.shape[3] * samples.shape[4]
    if guides.shape[-1] % per_frame or guides.shape[-1] // per_frame >= samples.shape[2]:
        raise ValueError(f"the prompt carries {guides.shape[-1]} guide tokens, which are no whole number of frames "
                         f"of the latent {tuple(samples.shape)} before its own: give the latent LTXVAddGuide made "
                         "with these prompts")
    return guides.shape[-1] // per_frame


def guide_coordinates(frames: int, rows: int, cols: int, frame_idx: int) -> torch.Tensor:
    """[1, 3, frames * rows * cols]: each LTX-Video guide token's (pixel frame, pixel row, pixel column)."""
    positions = latent_positions(frames, rows, cols, frame_rate=1.0)  # causal frames, seconds at 1 fps = frames
    positions[:, 0] += frame_idx
    return positions.T.unsqueeze(0)


def guide_spans(frames: int, rows: int, cols: int, frame_idx: int, causal: bool) -> torch.Tensor:
    """[1, 3, frames * rows * cols, 2]: each LTX-2 guide token's [start, end) in pixel frames, rows and columns (see
    the module docstring), in token order (frame, row, column)."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (frames, rows, cols)),
                                      indexing="ij")).flatten(1)
    scale = torch.tensor([FRAMES_PER_LATENT, PIXELS_PER_LATENT, PIXELS_PER_LATENT], dtype=torch.float32)
    spans = torch.stack([grid, grid + 1], dim=-1) * scale[:, None, None]
    if causal:
        spans[0] = (spans[0] + 1 - FRAMES_PER_LATENT).clamp(min=0)
    spans[0] += frame_idx
    return spans.unsqueeze(0)


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


def _with_guides(conditioning: list, guides: torch.Tensor, entry: dict | None = None) -> list:
    """Each entry with `guides` appended to the prompt's own coordinates (appending to earlier guides), and `entry`
    to its guide attention entries."""
    earlier = keyframe_idxs(conditioning)
    if earlier is not None and earlier.ndim != guides.ndim:
        raise ValueError("the prompts carry guides for another LTX model (LTX-Video 0.9's coordinates and LTX-2's "
                         "differ): give every LTXVAddGuide of a video the same VAE")
    combined = guides if earlier is None else torch.cat([earlier, guides.to(earlier)], dim=2)
    extra: dict[str, Any] = {KEY: combined}
    if entry is not None:
        entries = next((options[ATTENTION_KEY] for _, options in conditioning if options.get(ATTENTION_KEY)), [])
        extra[ATTENTION_KEY] = [*entries, entry]
    return [(embedding, {**options, **extra}) for embedding, options in conditioning]


def _without_guides(conditioning: list) -> list:
    return [(embedding, {k: v for k, v in options.items() if k not in (KEY, ATTENTION_KEY)})
            for embedding, options in conditioning]


def _downscale_factor(iclora_parameters: dict | None) -> int:
    """ComfyUI's reading of IC-LoRA parameters: the reference downscale factor, a whole number of at least 1."""
    try:
        return max(1, round(float((iclora_parameters or {}).get("reference_downscale_factor", 1))))
    except (TypeError, ValueError):
        return 1


class LTXVAddGuide(Node):
    """Guides the video through a picture (or clip) at a frame: its latent frames appended after the video's, kept
    by the noise mask at 1 - strength, the model told which frames they stand for (with LTX-Video 0.9's VAE a guide
    at frame 0 replaces the first frames in place instead)."""

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
    iclora_parameters = Socket("IC_LORA_PARAMETERS", optional=True, tooltip="Optional IC-LoRA parameters from a Get "
                               "IC-LoRA Parameters node (a reference_downscale_factor above 1 is not supported).")
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, vae: Vae, latent: dict, image: torch.Tensor, frame_idx: int,
                strength: float, iclora_parameters: dict | None = None) -> tuple[list, list, dict]:
        samples = latent["samples"]
        if is_av(latent):
            raise ValueError("LTXVAddGuide takes a video latent, not an audio-video one: add the guides to the video "
                             "latent before LTXVConcatAVLatent")
        if samples.ndim != 5:
            raise ValueError(f"the latent {tuple(samples.shape)} is not a video latent [B, C, frames, h, w]: make it "
                             "with EmptyLTXVLatentVideo")
        if not is_video_vae(vae):
            raise ValueError(f"LTXVAddGuide encodes its image with LTX-Video's VAE; {vae.source} is an image VAE")
        if (factor := _downscale_factor(iclora_parameters)) > 1:
            raise ValueError(f"IC-LoRA guides at a reference downscale factor of {factor} are not supported yet")
        add = self._add_ltx2 if is_ltx2_vae(vae) else self._add_ltxv
        return add(positive, negative, vae, latent, image, frame_idx, strength)

    def _encode(self, vae: Vae, image: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """The pictures' latent [1, C, T', h, w], resized (bilinear, centre crop) to the latent's pixel size."""
        rows, cols = samples.shape[3:]
        pixels = upscale_latent(image.movedim(-1, 1).float(), cols * PIXELS_PER_LATENT, rows * PIXELS_PER_LATENT,
                                "bilinear", "center").movedim(1, -1)
        guide = encode(self, vae, pixels[..., :3])
        if guide.shape[1] != samples.shape[1]:
            raise ValueError(f"{vae.source} encodes {guide.shape[1]} channels and the latent has {samples.shape[1]}: "
                             "encode the guide with the LTX checkpoint's VAE")
        return guide

    @staticmethod
    def _check_fits(start: int, frames: int, video_frames: int, frame_idx: int) -> None:
        if start + frames > video_frames:
            pictures = (video_frames - 1) * FRAMES_PER_LATENT + 1
            raise ValueError(f"a guide of {frames} latent frame(s) at frame {frame_idx} (latent frame {start}) runs "
                             f"past the video's {video_frames} latent frames ({pictures} pictures)")

    def _add_ltxv(self, positive: list, negative: list, vae: Vae, latent: dict, image: torch.Tensor, frame_idx: int,
                  strength: float) -> tuple[list, list, dict]:
        samples = latent["samples"]
        batch, _, length, rows, cols = samples.shape
        video_frames = length - guide_frames(positive, samples)  # the video's own latent frames, earlier guides off
        pictures = (image.shape[0] - 1) // FRAMES_PER_LATENT * FRAMES_PER_LATENT + 1  # 8 n + 1, as the VAE takes
        if frame_idx < 0:  # -1: the video's last picture
            frame_idx = max((video_frames - 1) * FRAMES_PER_LATENT + 1 + frame_idx, 0)
        if pictures > 1:  # a clip's latent frames fall on the video's: its start on a multiple of 8
            frame_idx = frame_idx // FRAMES_PER_LATENT * FRAMES_PER_LATENT
        start = (frame_idx + FRAMES_PER_LATENT - 1) // FRAMES_PER_LATENT  # the latent frame holding picture frame_idx
        guide = self._encode(vae, image[:pictures], samples)
        frames = guide.shape[2]
        self._check_fits(start, frames, video_frames, frame_idx)
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

    def _add_ltx2(self, positive: list, negative: list, vae: Vae, latent: dict, image: torch.Tensor, frame_idx: int,
                  strength: float) -> tuple[list, list, dict]:
        samples = latent["samples"]
        batch, _, length, rows, cols = samples.shape
        step = FRAMES_PER_LATENT
        video_frames = length - guide_frames(positive, samples)
        if frame_idx < 0:
            frame_idx = max((video_frames - 1) * step + 1 + frame_idx, 0)
        causal = frame_idx == 0 or image.shape[0] < step + 1  # the guide's first latent frame is one picture
        if causal:
            guide = self._encode(vae, image[:(image.shape[0] - 1) // step * step + 1], samples)
        else:  # the first picture twice; the first latent frame (one picture) dropped: 8 pictures a latent frame
            clip = torch.cat([image[:1], image])[:image.shape[0] // step * step + 1]
            guide = self._encode(vae, clip, samples)[:, :, 1:]
            frame_idx = (frame_idx - 1) // step * step + 1  # on the first picture of a latent frame
        start = (frame_idx + step - 1) // step
        frames = guide.shape[2]
        self._check_fits(start, frames, video_frames, frame_idx)
        spans = guide_spans(frames, rows, cols, frame_idx, causal)
        entry = {"pre_filter_count": frames * rows * cols, "strength": strength, "pixel_mask": None,
                 "latent_shape": [frames, rows, cols]}
        mask = _noise_mask(latent)
        mask = torch.cat([mask, torch.full((*mask.shape[:2], frames, *mask.shape[3:]), 1.0 - strength)], dim=2)
        samples = torch.cat([samples, guide.expand(batch, -1, -1, -1, -1).to(samples.dtype)], dim=2)
        return (_with_guides(positive, spans, entry), _with_guides(negative, spans, entry),
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
