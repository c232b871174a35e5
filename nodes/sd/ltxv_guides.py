"""LTX-Video and LTX-2 keyframe guides in the SD node set (LTXVAddGuide, LTXVAddLatentGuide, LTXVCropGuides,
GetICLoRAParameters).

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
  its tokens, strength, pixel_mask, latent_shape: [F, h, w]}), by which ComfyUI's transformer weighs the
  attention between the video's tokens and a guide's whose weight is not 1 (log(weight) added to those attention
  logits; see the options below), as Loom's does (`ldm.ltx2.guide_attention_bias`).

Negative frame indices count back from the video's last picture (-1: the last), over the video's own latent frames
(earlier guides' left out). LTXVCropGuides takes off as many latent frames as the guide tokens fill (ComfyUI's count
given the latent's shape).

LTX-2's guides also follow ComfyUI's newer options:

- strength up to 10: the noise mask keeps max(0, 1 - strength); above 1 a guide only draws more attention (its
  attention entry's weight).
- `attention_mask` (a MASK over the guide's pictures, one per picture or one for all): kept on the attention entry
  as `pixel_mask` [1, 1, P, H, W]; the transformer weighs each guide token by the mask's mean over the token's pixels,
  times the strength (`pixel_mask_weights`, `guide_token_weights`).
- IC-LoRA guides (`iclora_parameters` from GetICLoRAParameters, the `reference_downscale_factor` of the LoRA file's
  metadata): with a factor n above 1 the guide is encoded at 1/n of the latent's size and spread over the full grid
  ("dilated": its latent pixel (r, c) at (n r, n c), zeros between), its noise mask 1 - min(strength, 1) there and
  -1 - min(strength, 1) at the holes, which the transformer leaves out (ComfyUI's grid mask: the tokens where the
  noise mask is negative); its spans' row and column ends reach 32 (n - 1) further, each token standing for n x n
  latent pixels' worth of the picture. The attention entry counts every token of the full grid, its latent_shape is
  the guide's own.

LTXVAddLatentGuide appends an already encoded latent the same way at a latent frame index; a latent smaller than the
video by a whole factor is an IC-LoRA guide of that factor.

Generated keyframes (ComfyUI's nodes_lt_keyframes.py, for LTX-2.5's detailing keyframes): LTXVAddGeneratedKeyframes
appends latent frames that are denoised with the video (noise mask 1), each one token frame whose spans cover one
pixel frame ([t, t + 1), the causal first frame's, shifted to its place), placed every `interval_frames` pictures
where no picture, guide or earlier keyframe is, with one attention entry of strength 1 for the block, and records
the block in both prompts' `generated_keyframes`; LTXVSeparateGeneratedKeyframes takes the block back off the latent
and the prompts, as a keyframes latent carrying its pixel frames; LTXVGeneratedKeyframesToGuides pins those as guides
(strength 1: frozen) on a later canvas, the positions scaled to its length. ComfyUI's model reads
`generated_keyframes` only to add LTX-2.5's learned `keyframes_abs_pos_embedding` to those tokens; the LTX-2.0 and
2.3 transformers Loom runs have none, so for them the tokens are what the spans and attention entry make them, as in
ComfyUI.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from ldm.ltxv import latent_positions
from ldm.sampling.av_latent import is_av
from nodes.node import Node
from nodes.sd.latent import upscale_latent
from nodes.sd.ltxv import FRAMES_PER_LATENT, PIXELS_PER_LATENT
from nodes.sd.models import DiffusionModel, Vae
from nodes.sd.vae import decode, encode, is_video_vae
from nodes.spec import Boolean, Float, Int, Output, Socket, String

KEY = "keyframe_idxs"  # ComfyUI's conditioning options, kept for workflows' and plugins' sake
ATTENTION_KEY = "guide_attention_entries"
FACTOR_KEY = "reference_downscale_factor"  # IC-LoRA files' metadata and IC_LORA_PARAMETERS


def keyframe_idxs(conditioning: list) -> torch.Tensor | None:
    """The guide coordinates a prompt carries (the first entry's that has them, as ComfyUI reads them)."""
    return next((options[KEY] for _, options in conditioning if options.get(KEY) is not None), None)


def is_ltx2_vae(vae: Vae) -> bool:
    """Whether `vae` is LTX-2's video VAE (whose guides follow current ComfyUI's LTX-2 semantics)."""
    return getattr(getattr(vae.vae, "config", None), "version", None) == "2.0"


def guide_frames(conditioning: list, samples: torch.Tensor) -> int:
    """How many latent frames at the end of `samples` [B, C, T, h, w] are guides: the frames the prompt's guide
    tokens fill (LTX-Video's [B, 3, K], LTX-2's [B, 3, K, 2]; ComfyUI's count given the latent's shape)."""
    guides = keyframe_idxs(conditioning)
    if guides is None:
        return 0
    per_frame = samples.shape[3] * samples.shape[4]
    if guides.shape[2] % per_frame or guides.shape[2] // per_frame >= samples.shape[2]:
        raise ValueError(f"the prompt carries {guides.shape[2]} guide tokens, which are no whole number of frames "
                         f"of the latent {tuple(samples.shape)} before its own: give the latent LTXVAddGuide made "
                         "with these prompts")
    return guides.shape[2] // per_frame


def guide_coordinates(frames: int, rows: int, cols: int, frame_idx: int) -> torch.Tensor:
    """[1, 3, frames * rows * cols]: each LTX-Video guide token's (pixel frame, pixel row, pixel column)."""
    positions = latent_positions(frames, rows, cols, frame_rate=1.0)  # causal frames, seconds at 1 fps = frames
    positions[:, 0] += frame_idx
    return positions.T.unsqueeze(0)


def guide_spans(frames: int, rows: int, cols: int, frame_idx: int, causal: bool, factor: int = 1) -> torch.Tensor:
    """[1, 3, frames * rows * cols, 2]: each LTX-2 guide token's [start, end) in pixel frames, rows and columns (see
    the module docstring), in token order (frame, row, column); an IC-LoRA guide dilated by `factor` ends its rows
    and columns 32 (factor - 1) further."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (frames, rows, cols)),
                                      indexing="ij")).flatten(1)
    scale = torch.tensor([FRAMES_PER_LATENT, PIXELS_PER_LATENT, PIXELS_PER_LATENT], dtype=torch.float32)
    spans = torch.stack([grid, grid + 1], dim=-1) * scale[:, None, None]
    if causal:
        spans[0] = (spans[0] + 1 - FRAMES_PER_LATENT).clamp(min=0)
    spans[0] += frame_idx
    if factor > 1:
        spans[1:, :, 1] += (factor - 1) * PIXELS_PER_LATENT
    return spans.unsqueeze(0)


def dilate(guide: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An IC-LoRA guide latent [B, C, F, h, w] spread over the grid `factor` times its size (its pixel (r, c) at
    (factor r, factor c), zeros between), and the lattice [1, 1, F, factor h, factor w]: 1 at its pixels, -1 at the
    holes (ComfyUI's LTXVAddGuide.dilate_latent)."""
    batch, channels, frames, rows, cols = guide.shape
    spread = guide.new_zeros(batch, channels, frames, rows * factor, cols * factor)
    spread[..., ::factor, ::factor] = guide
    lattice = torch.full((1, 1, frames, rows * factor, cols * factor), -1.0)
    lattice[..., ::factor, ::factor] = 1.0
    return spread, lattice


def pixel_mask_weights(mask: torch.Tensor, frames: int, rows: int, cols: int) -> torch.Tensor:
    """[B, frames * rows * cols]: a guide's pixel-space attention mask [B, 1, P, H, W] per latent token, as ComfyUI's
    LTXVModel._downsample_mask_to_latent reads it: each picture area-averaged to rows x cols; the first picture for
    the first latent frame and the rest in consecutive groups of (P - 1) // (frames - 1) averaged (trailing pictures
    left out), or repeated (nearest) where there are fewer pictures than frames; one picture for every frame."""
    batch, pictures = mask.shape[0], mask.shape[2]
    small = F.interpolate(mask.float().reshape(batch * pictures, 1, *mask.shape[3:]), size=(rows, cols),
                          mode="area").reshape(batch, pictures, rows, cols)
    out = small[:, :1]
    if pictures > 1 and frames > 1:
        group = (pictures - 1) // (frames - 1)
        if group < 1:
            rest = F.interpolate(small[:, 1:].permute(0, 2, 3, 1).reshape(-1, 1, pictures - 1), size=frames - 1,
                                 mode="nearest").reshape(batch, rows, cols, frames - 1).permute(0, 3, 1, 2)
        else:
            rest = small[:, 1:1 + (frames - 1) * group].reshape(batch, frames - 1, group, rows, cols).mean(2)
        out = torch.cat([out, rest], dim=1)
    elif frames > 1:
        out = out.expand(-1, frames, -1, -1)
    return out.reshape(batch, -1)


def guide_token_weights(entry: dict, count: int) -> torch.Tensor:
    """[count]: the attention weights of a guide attention entry's `count` tokens, for its tokens the model keeps in
    order: its strength, times its pixel mask's per token (the first item's; `pixel_mask_weights` over its
    latent_shape) where it has one and a latent_shape, 1 (no bias) past the mask's tokens, as ComfyUI's
    _build_guide_self_attention_mask gives them."""
    strength = float(entry["strength"])
    mask, shape = entry.get("pixel_mask"), entry.get("latent_shape")
    if mask is None or shape is None:
        return torch.full((count,), strength)
    if mask.ndim != 5:
        raise ValueError(f"a guide's pixel mask {list(mask.shape)} is not [B, 1, pictures, H, W]: give the "
                         "conditioning LTXVAddGuide made")
    per_token = pixel_mask_weights(mask, *(int(n) for n in shape))[0] * strength
    weights = torch.ones(count)
    weights[:min(count, per_token.numel())] = per_token[:count]
    return weights


def reference_downscale_factor(metadata: dict | None) -> int:
    """ComfyUI's GetICLoRAParameters: the value of the first key of a LoRA file's metadata ending in
    reference_downscale_factor, rounded, at least 1; 1 where there is none or it is no number."""
    value = next((v for k, v in (metadata or {}).items() if k.endswith(FACTOR_KEY)), None)
    try:
        return 1 if value is None else max(1, round(float(value)))
    except (TypeError, ValueError, OverflowError):
        return 1


def _downscale_factor(iclora_parameters: dict | None) -> int:
    """ComfyUI's reading of IC-LoRA parameters: the reference downscale factor, a whole number of at least 1."""
    try:
        return max(1, round(float((iclora_parameters or {}).get(FACTOR_KEY, 1))))
    except (TypeError, ValueError, OverflowError):
        return 1


def _pixel_mask(mask: torch.Tensor | None, node: str) -> torch.Tensor | None:
    """A MASK [P, H, W] (or [H, W]) as a guide attention entry's pixel mask [1, 1, P, H, W] (ComfyUI's layout)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] == 0:
        raise ValueError(f"{node}: the attention_mask {list(mask.shape)} is no MASK [pictures, height, width]: "
                         "give it one mask, or one per guide picture")
    return mask.detach().float().cpu()[None, None].clone()


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


def attach_ltx2_guide(positive: list, negative: list, latent: dict, guide: torch.Tensor, frame_idx: int,
                      strength: float, causal: bool, factor: int = 1, pixel_mask: torch.Tensor | None = None
                      ) -> tuple[list, list, dict]:
    """An LTX-2 guide latent [1 or B, C, F, h, w] appended after the latent's frames (dilated by an IC-LoRA
    `factor` above 1 first), its noise mask, spans and attention entry added (ComfyUI's attach_guide_latent)."""
    samples = latent["samples"]
    batch, _, _, rows, cols = samples.shape
    shape = [int(n) for n in guide.shape[2:]]  # the guide's own grid, which its pixel mask is read over
    frames = shape[0]
    mask = _noise_mask(latent)
    if factor > 1:
        guide, lattice = dilate(guide, factor)
        if tuple(mask.shape[3:]) == (1, 1):
            mask = mask.expand(-1, -1, -1, rows, cols)
        elif tuple(mask.shape[3:]) != (rows, cols):
            raise ValueError(f"the latent's noise mask {tuple(mask.shape)} is neither per frame nor per latent "
                             f"pixel of its {rows} x {cols} grid: an IC-LoRA guide extends only such masks")
        added = (lattice - min(strength, 1.0)).expand(mask.shape[0], -1, -1, -1, -1)
    else:
        added = torch.full((*mask.shape[:2], frames, *mask.shape[3:]), max(0.0, 1.0 - strength))
    spans = guide_spans(frames, rows, cols, frame_idx, causal, factor)
    entry = {"pre_filter_count": frames * rows * cols, "strength": strength, "pixel_mask": pixel_mask,
             "latent_shape": shape}
    mask = torch.cat([mask, added.to(mask.dtype)], dim=2)
    samples = torch.cat([samples, guide.expand(batch, -1, -1, -1, -1).to(samples.dtype)], dim=2)
    return (_with_guides(positive, spans, entry), _with_guides(negative, spans, entry),
            {**latent, "samples": samples, "noise_mask": mask})


class GetICLoRAParameters(Node):
    """Extracts IC-LoRA parameters from the safetensors metadata of a LoRA-loaded model and outputs them for
    LTXVAddGuide (eg. reference_downscale_factor)."""

    display_name = "Get IC-LoRA Parameters"
    category = "model/conditioning/ltxv"
    iclora_model = Socket("MODEL", tooltip="Direct output from a LoRA Loader for the specific IC-LoRA from which to "
                          "extract the metadata.")
    outputs = (Output("IC_LORA_PARAMETERS", "iclora_parameters", tooltip="IC-LoRA parameters extracted from the "
                      "LoRA metadata (eg. reference_downscale_factor). Connect to LTXVAddGuide if the LoRA requires "
                      "special handling of the guides."),)

    def execute(self, iclora_model: DiffusionModel) -> tuple[dict]:
        return ({FACTOR_KEY: reference_downscale_factor(getattr(iclora_model, "lora_metadata", None))},)


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
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    attention_mask = Socket("MASK", optional=True, tooltip="Optional pixel-space spatial mask. Controls per-region "
                            "conditioning influence via self-attention, multiplied by strength.")
    iclora_parameters = Socket("IC_LORA_PARAMETERS", optional=True, tooltip="Optional IC-LoRA parameters from a Get "
                               "IC-LoRA Parameters node. Used for adjusting guide processing as required by certain "
                               "IC-LoRAs (eg. those with a reference_downscale_factor > 1). When chained, each "
                               "LTXVAddGuide uses only the parameters connected to it.")
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, vae: Vae, latent: dict, image: torch.Tensor, frame_idx: int,
                strength: float, attention_mask: torch.Tensor | None = None,
                iclora_parameters: dict | None = None) -> tuple[list, list, dict]:
        samples = latent["samples"]
        if is_av(latent):
            raise ValueError("LTXVAddGuide takes a video latent, not an audio-video one: add the guides to the video "
                             "latent before LTXVConcatAVLatent")
        if samples.ndim != 5:
            raise ValueError(f"the latent {tuple(samples.shape)} is not a video latent [B, C, frames, h, w]: make it "
                             "with EmptyLTXVLatentVideo")
        if not is_video_vae(vae):
            raise ValueError(f"LTXVAddGuide encodes its image with LTX-Video's VAE; {vae.source} is an image VAE")
        factor = _downscale_factor(iclora_parameters)
        pixel_mask = _pixel_mask(attention_mask, "LTXVAddGuide")
        if is_ltx2_vae(vae):
            return self._add_ltx2(positive, negative, vae, latent, image, frame_idx, strength, factor, pixel_mask)
        if factor > 1 or pixel_mask is not None:
            what = f"IC-LoRA guides (reference downscale factor {factor})" if factor > 1 else "an attention_mask"
            raise ValueError(f"LTXVAddGuide: {what} are for LTX-2; with LTX-Video 0.9's VAE ({vae.source}) leave "
                             f"{'iclora_parameters' if factor > 1 else 'attention_mask'} unconnected")
        return self._add_ltxv(positive, negative, vae, latent, image, frame_idx, strength)

    def _encode(self, vae: Vae, image: torch.Tensor, samples: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """The pictures' latent [1, C, T', h / factor, w / factor], resized (bilinear, centre crop) to the latent's
        pixel size over `factor`."""
        rows, cols = samples.shape[3:]
        pixels = upscale_latent(image.movedim(-1, 1).float(), cols * PIXELS_PER_LATENT // factor,
                                rows * PIXELS_PER_LATENT // factor, "bilinear", "center").movedim(1, -1)
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
        kept = max(0.0, 1.0 - strength)
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
                  strength: float, factor: int, pixel_mask: torch.Tensor | None) -> tuple[list, list, dict]:
        samples = latent["samples"]
        length, rows, cols = samples.shape[2:]
        if rows % factor or cols % factor:
            raise ValueError(f"LTXVAddGuide: the latent's {cols} x {rows} latent pixels do not divide by the IC-LoRA's "
                             f"reference downscale factor {factor}: make the video's width and height multiples of "
                             f"{PIXELS_PER_LATENT * factor}")
        step = FRAMES_PER_LATENT
        video_frames = length - guide_frames(positive, samples)
        if frame_idx < 0:
            frame_idx = max((video_frames - 1) * step + 1 + frame_idx, 0)
        causal = frame_idx == 0 or image.shape[0] < step + 1  # the guide's first latent frame is one picture
        if causal:
            guide = self._encode(vae, image[:(image.shape[0] - 1) // step * step + 1], samples, factor)
        else:  # the first picture twice; the first latent frame (one picture) dropped: 8 pictures a latent frame
            clip = torch.cat([image[:1], image])[:image.shape[0] // step * step + 1]
            guide = self._encode(vae, clip, samples, factor)[:, :, 1:]
            frame_idx = (frame_idx - 1) // step * step + 1  # on the first picture of a latent frame
        start = (frame_idx + step - 1) // step
        self._check_fits(start, guide.shape[2], video_frames, frame_idx)
        return attach_ltx2_guide(positive, negative, latent, guide, frame_idx, strength, causal, factor, pixel_mask)


class LTXVAddLatentGuide(Node):
    """Pins an already-encoded latent as a guide, for when the guide comes out of an earlier stage rather than an
    image. Same effect as LTXV Add Guide without the VAE decode/encode round trip. A guide that is spatially smaller
    than the target (an IC-LoRA or detailing reference) is dilated onto a sparse grid, and its RoPE end positions are
    expanded by the same ratio so it covers the target canvas instead of addressing only the top-left corner of it."""

    display_name = "LTXV Add Latent Guide"
    category = "model/conditioning/ltxv"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    latent = Socket("LATENT", tooltip="Target video latent the guide is pinned onto.")
    guiding_latent = Socket("LATENT", tooltip="Guide latent. Its spatial size must divide the target's by the same "
                            "whole number on both axes; equal size pins it as-is, half size is treated as an x2 "
                            "IC-LoRA reference.")
    latent_idx = Int(0, min=-9999, max=9999, tooltip="Latent frame index to start the guide at, counted in latent "
                     "frames rather than pixel frames. Negative values place the guide on frames before the start of "
                     "the latent, not counted back from its end.")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01, tooltip="Guide strength. 1.0 is a hard pin; lower values "
                     "relax it.")
    attention_mask = Socket("MASK", optional=True, tooltip="Optional pixel-space spatial mask. Controls per-region "
                            "conditioning influence via self-attention, multiplied by strength.")
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, vae: Vae, latent: dict, guiding_latent: dict, latent_idx: int,
                strength: float, attention_mask: torch.Tensor | None = None) -> tuple[list, list, dict]:
        samples, guide = latent["samples"], guiding_latent["samples"]
        for name, value in (("latent", latent), ("guiding_latent", guiding_latent)):
            if is_av(value) or value["samples"].ndim != 5:
                raise ValueError(f"LTXVAddLatentGuide: {name} {tuple(value['samples'].shape)} is not a video latent "
                                 "[B, C, frames, h, w]: give it the video latent (before LTXVConcatAVLatent)")
        if not is_ltx2_vae(vae):
            raise ValueError(f"LTXVAddLatentGuide places guides as LTX-2 reads them; {vae.source} is not LTX-2's "
                             "video VAE")
        if guide.shape[1] != samples.shape[1] or guide.shape[0] not in (1, samples.shape[0]):
            raise ValueError(f"LTXVAddLatentGuide: the guiding latent {tuple(guide.shape)} does not fit the latent "
                             f"{tuple(samples.shape)} (the same channels, and one item or as many)")
        frames, length = guide.shape[2], samples.shape[2]
        if latent_idx + frames > length:
            raise ValueError(f"LTXVAddLatentGuide: a guide of {frames} latent frame(s) at latent_idx {latent_idx} runs "
                             f"past the end of the {length}-frame latent (negative values place it before the start)")
        (rows, cols), (guide_rows, guide_cols) = samples.shape[3:], guide.shape[3:]
        if rows % guide_rows or cols % guide_cols:
            raise ValueError(f"LTXVAddLatentGuide: the guiding latent's {guide_cols} x {guide_rows} latent pixels do "
                             f"not divide the latent's {cols} x {rows} by a whole number")
        if rows // guide_rows != cols // guide_cols:
            raise ValueError(f"LTXVAddLatentGuide: the guiding latent is {rows // guide_rows} times smaller in "
                             f"height and {cols // guide_cols} times in width; it must be smaller by one factor on "
                             "both axes")
        frame_idx = latent_idx * FRAMES_PER_LATENT if latent_idx <= 0 else 1 + (latent_idx - 1) * FRAMES_PER_LATENT
        causal = frame_idx == 0 or frames == 1
        return attach_ltx2_guide(positive, negative, latent, guide, frame_idx, strength, causal,
                                 cols // guide_cols, _pixel_mask(attention_mask, "LTXVAddLatentGuide"))


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


# --- Generated keyframes (ComfyUI's nodes_lt_keyframes.py) ---------------------------------------------------------

GENERATED_KEY = "generated_keyframes"
_OCCUPIED_MASK_MAX = 1.0 - 1e-4  # a frame whose noise mask dips below this holds a picture (ComfyUI's threshold)


def _any_value(conditioning: list, key: str) -> Any:
    """The first entry's value of `key` (ComfyUI's conditioning_get_any_value); None where no entry has it."""
    return next((options[key] for _, options in conditioning if key in options), None)


def _set_values(conditioning: list, values: dict[str, Any]) -> list:
    """Each entry with `values` set; a None value takes the key off (ComfyUI sets it to None, read the same)."""
    out = []
    for embedding, options in conditioning:
        options = {**options, **values}
        out.append((embedding, {k: v for k, v in options.items() if v is not None}))
    return out


def parse_frame_indices(value: str, node: str, field: str, count: int | None, first: int, last: int,
                        empty_hint: str) -> list[int]:
    """The pixel frames of a comma- (or space-) separated list, in its order: `count` of them where given, none twice,
    each in [first, last] (ComfyUI's _parse_frame_index_list)."""
    parts = [part for part in re.split(r"[,\s]+", value.strip()) if part]
    if not parts:
        raise ValueError(f"{node}: {field} is empty. Provide at least one index, or leave {field} empty {empty_hint}")
    bad = [part for part in parts if not re.fullmatch(r"-?\d+", part)]
    if bad:
        raise ValueError(f"{node}: {field} must be a comma-separated list of integers, but could not parse "
                         f"{', '.join(map(repr, bad))}")
    indices = [int(part) for part in parts]
    if count is not None and len(indices) != count:
        raise ValueError(f"{node}: {field} lists {len(indices)} index/indices but the keyframes latent carries "
                         f"{count}. Provide exactly {count}, or leave {field} empty {empty_hint}")
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise ValueError(f"{node}: {field} must not place two keyframes on the same pixel frame, but "
                         f"{', '.join(map(str, twice))} appear(s) more than once")
    outside = [i for i in indices if not first <= i <= last]
    if outside:
        raise ValueError(f"{node}: {field} must lie between {first} and {last}, but got {', '.join(map(str, outside))}")
    return indices


def detailing_positions(num_frames: int, interval_frames: float) -> list[int]:
    """About one keyframe every `interval_frames` pictures of `num_frames`: round((num_frames - 1) / interval) (at
    least 1) evenly spaced, rounded, the last picture kept and picture 0 left out (ComfyUI's detailing_positions)."""
    if num_frames <= 1:
        raise ValueError(f"LTXVAddGeneratedKeyframes: a {num_frames}-frame video has no pixel frames to place "
                         "keyframes on")
    count = max(1, round((num_frames - 1) / interval_frames))
    spaced = torch.linspace(0, num_frames - 1, count + 1).round().to(torch.int64).tolist()[1:]
    return [index for index in spaced if index != 0]


def scale_frame_indices(indices: list[int], old_frames: int, new_frames: int) -> list[int]:
    """Pixel frames of a canvas of `old_frames` at the same moments of one of `new_frames` (after a temporal upscale;
    ComfyUI's scale_frame_indices)."""
    if old_frames <= 1 or new_frames <= 1:
        raise ValueError(f"LTXVGeneratedKeyframesToGuides: cannot scale keyframe positions from a {old_frames}-frame "
                         f"canvas onto a {new_frames}-frame one")
    scale = (new_frames - 1) / (old_frames - 1)
    mapped = [int(round(index * scale)) for index in indices]
    twice = sorted({i for i in mapped if mapped.count(i) > 1})
    if twice:
        raise ValueError("LTXVGeneratedKeyframesToGuides: scaling the keyframe positions onto the new canvas put "
                         f"{', '.join(map(str, twice))} on the same pixel frame; set override_frame_indices")
    return mapped


def occupied_pixel_frames(latent: dict, num_frames: int, video_frames: int) -> set[int]:
    """The pictures the video's first `video_frames` latent frames already hold (ComfyUI's occupied_pixel_frames):
    frames whose noise mask dips below 1 (without a mask, frames not all zero), each at its representative picture:
    0 for the first, the last picture for the last, 8 t between."""
    samples, mask = latent["samples"], latent.get("noise_mask")
    scan = min(max(video_frames, 0), samples.shape[2])

    def picture(t: int) -> int:
        pixel = 0 if t <= 0 else num_frames - 1 if t >= scan - 1 else t * FRAMES_PER_LATENT
        return min(max(pixel, 0), num_frames - 1)

    if mask is not None and mask.ndim >= 3:
        return {picture(t) for t in range(min(mask.shape[2], scan)) if bool((mask[:, :, t] < _OCCUPIED_MASK_MAX).any())}
    return {picture(t) for t in range(scan) if bool((samples[:, :, t] != 0).any())}


def span_start_frames(spans: torch.Tensor | None) -> set[int]:
    """The pictures the guide tokens of LTX-2 spans [B, 3, K, 2] start on (ComfyUI's
    pixel_frames_from_keyframe_idxs)."""
    if spans is None:
        return set()
    starts = spans[:, 0, :, 0] if spans.ndim >= 4 else spans[:, 0]
    return {int(round(float(v))) for v in starts.flatten().tolist()}


def keyframes_from_video(samples: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """[B, C, len(indices), h, w]: the video latent's frame nearest each picture (ComfyUI's keyframes_from_video)."""
    last = samples.shape[2] - 1
    return torch.cat([samples[:, :, min(max(round(i / FRAMES_PER_LATENT), 0), last)][:, :, None] for i in indices],
                     dim=2)


def _fit_keyframes(keyframes: torch.Tensor, samples: torch.Tensor, slots: int) -> torch.Tensor:
    """Stacked keyframe latents [B, C, n, h, w] padded with zero frames to `slots` (ComfyUI's _fit_keyframe_samples)."""
    batch, channels, _, rows, cols = samples.shape
    if keyframes.shape[:2] != (batch, channels) or keyframes.shape[3:] != (rows, cols):
        raise ValueError(f"LTXVAddGeneratedKeyframes: the keyframes latent must hold whole latent frames at this "
                         f"latent's shape, expected {[batch, channels, slots, rows, cols]} but got "
                         f"{list(keyframes.shape)}. Resize it to this stage's resolution first")
    if keyframes.shape[2] > slots:
        raise ValueError(f"LTXVAddGeneratedKeyframes: the keyframes latent holds {keyframes.shape[2]} frame(s) but "
                         f"only {slots} free slot(s) are available on this canvas. Pass fewer keyframes, or set "
                         "frame_indices")
    pad = keyframes.new_zeros(batch, channels, slots - keyframes.shape[2], rows, cols)
    return torch.cat([keyframes, pad], dim=2)


def _grown_entry(conditioning: list, index: int, tokens: int, frames: int) -> list:
    """The prompt with its attention entry `index` (a generated-keyframes block's) counting `tokens` and `frames`
    more (ComfyUI's _grow_guide_attention_entry)."""
    entries = list(_any_value(conditioning, ATTENTION_KEY) or [])
    if index >= len(entries):
        raise ValueError(f"the generated keyframes recorded guide entry {index} but the conditioning only has "
                         f"{len(entries)}. The conditioning was rebuilt after they were added")
    grown = dict(entries[index])
    grown["pre_filter_count"] = grown["pre_filter_count"] + tokens
    grown["latent_shape"] = [grown["latent_shape"][0] + frames, *grown["latent_shape"][1:]]
    entries[index] = grown
    return _set_values(conditioning, {ATTENTION_KEY: entries})


class LTXVAddGeneratedKeyframes(Node):
    """Append detailing keyframes to a video latent. Each keyframe is one latent frame of tokens whose RoPE position
    spans a single pixel frame; they are denoised with the video and are not part of the decoded output. Placement is
    one slot every interval_frames pixels, skipping I2V frames, existing guides, and detailing keyframes already on
    the cond. Connected keyframes are content only and are re-placed on this canvas unless frame_indices is set. Pull
    them back out with LTXV Separate Generated Keyframes. Requires a checkpoint trained for generated keyframes (one
    carrying keyframes_abs_pos_embedding)."""

    display_name = "LTXV Add Generated Keyframes"
    category = "model/conditioning/ltxv"
    positive = Socket("CONDITIONING", tooltip="Positive conditioning the keyframes are attached to.")
    negative = Socket("CONDITIONING", tooltip="Negative conditioning the keyframes are attached to.")
    vae = Socket("VAE", tooltip="Only used to read the latent scale factors.")
    latent = Socket("LATENT", tooltip="Plain 5D video latent to generate keyframes alongside. Add them before Concat "
                    "AV Latent.")
    interval_frames = Int(24, min=1, max=1024, optional=True, tooltip="Pixel-frame stride for auto placement. Default "
                          "24 is about one keyframe per second at 24 fps. Occupied pixels are skipped. Ignored when "
                          "frame_indices is set.")
    keyframes = Socket("LATENT", optional=True, tooltip="Optional content to initialize the new keyframes with. "
                       "Connect keyframes from an earlier Separate (same spatial size), or a plain video latent to "
                       "copy the nearest frame at each new slot (e.g. after temporal upscale). These are still "
                       "denoised, not pinned as guides. Recorded indices on a keyframes latent are ignored unless "
                       "frame_indices is set. Only has an effect when sampling starts below sigma 1.")
    frame_indices = String("", optional=True, tooltip="Optional pixel-frame indices. Leave empty to place from "
                           "interval_frames on the current canvas. When set, this list is the placement (connected "
                           "keyframes are matched in order). The last frame is allowed; frame 0 is not (it is already "
                           "a standalone token).")
    outputs = (Output("CONDITIONING", "positive", tooltip="Positive conditioning with generated-keyframe attention "
                      "attached."),
               Output("CONDITIONING", "negative", tooltip="Negative conditioning with generated-keyframe attention "
                      "attached."),
               Output("LATENT", "latent", tooltip="Video latent with generated keyframes appended on T."))

    def execute(self, positive: list, negative: list, vae: Vae, latent: dict, interval_frames: int = 24,
                keyframes: dict | None = None, frame_indices: str = "") -> tuple[list, list, dict]:
        node = "LTXVAddGeneratedKeyframes"
        samples = latent["samples"]
        if is_av(latent) or samples.ndim != 5:
            raise ValueError(f"{node}: generated keyframes must be added to a plain video latent. Add them before "
                             "merging the video and audio latents with Concat AV Latent")
        if not is_ltx2_vae(vae):
            raise ValueError(f"{node} places keyframes as LTX-2 reads them; {vae.source} is not LTX-2's video VAE")
        batch, channels, length, rows, cols = samples.shape
        per_frame = rows * cols
        record = _any_value(positive, GENERATED_KEY)
        if record is not None:
            if record["tokens_per_frame"] != per_frame:
                raise ValueError(f"{node}: the existing generated keyframes were added at {record['tokens_per_frame']} "
                                 f"tokens per latent frame but this latent has {per_frame}. The latent was rescaled "
                                 "after they were added, so more keyframes cannot be appended to them")
            if record["first_latent_frame"] + record["num_keyframes"] != length:
                raise ValueError(f"{node}: the existing generated keyframes end at latent frame "
                                 f"{record['first_latent_frame'] + record['num_keyframes']} but the latent has "
                                 f"{length}. Something was appended after them, so more keyframes would not be "
                                 "contiguous with the existing block. Add all the keyframes before any guides")
        spans = keyframe_idxs(positive)
        video_frames = length - guide_frames(positive, samples)
        num_frames = (video_frames - 1) * FRAMES_PER_LATENT + 1
        earlier = list(record["frame_indices"]) if record is not None else []
        occupied = occupied_pixel_frames(latent, num_frames, video_frames) | span_start_frames(spans) | set(earlier)
        if frame_indices and frame_indices.strip():
            if num_frames - 1 < 1:
                raise ValueError(f"{node}: a {num_frames}-frame target has no pixel frames to place keyframes on")
            indices = parse_frame_indices(frame_indices, node, "frame_indices", None, 1, num_frames - 1,
                                          "to place them from interval_frames")
        else:
            indices = [i for i in detailing_positions(num_frames, float(interval_frames)) if i not in occupied]
            if not indices:
                raise ValueError(f"{node}: every candidate detailing-keyframe pixel already has an image keyframe or "
                                 "a guide. Leave at least one unoccupied frame, or pass frame_indices")
        clashes = sorted(set(indices) & occupied)
        if clashes:
            raise ValueError(f"{node}: frame_indices reuses pixel frame(s) {', '.join(map(str, clashes))}, which "
                             "already hold an image keyframe, a guide, or a generated keyframe. Each keyframe needs "
                             "its own pixel frame")
        count = len(indices)
        content = self._content(keyframes, samples, indices)

        new_spans = torch.cat([guide_spans(1, rows, cols, index, causal=True) for index in indices], dim=2)
        entries = _any_value(positive, ATTENTION_KEY) or []
        generated = {
            "first_latent_frame": record["first_latent_frame"] if record else length,
            "num_keyframes": record["num_keyframes"] + count if record else count,
            "frame_indices": earlier + indices,
            "num_pixel_frames": num_frames,
            "guide_entry_index": record["guide_entry_index"] if record else len(entries),
            "tokens_per_frame": per_frame,
        }
        combined = new_spans if spans is None else torch.cat([spans, new_spans.to(spans)], dim=2)
        values = {KEY: combined, GENERATED_KEY: generated}
        positive, negative = _set_values(positive, values), _set_values(negative, values)
        if record is not None:
            index = record["guide_entry_index"]
            positive = _grown_entry(positive, index, count * per_frame, count)
            negative = _grown_entry(negative, index, count * per_frame, count)
        else:
            entry = {"pre_filter_count": count * per_frame, "strength": 1.0, "pixel_mask": None,
                     "latent_shape": [count, rows, cols]}
            positive, negative = (_set_values(c, {ATTENTION_KEY: [*(_any_value(c, ATTENTION_KEY) or []), entry]})
                                  for c in (positive, negative))
        mask = _noise_mask(latent)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1, count, *mask.shape[3:])], dim=2)
        return positive, negative, {**latent, "samples": torch.cat([samples, content], dim=2), "noise_mask": mask}

    @staticmethod
    def _content(keyframes: dict | None, samples: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """The new keyframes' latents [B, C, len(indices), h, w]: zeros; or the connected keyframes (single frames
        batched as a Separate with keyframes_to_batch makes them stacked back per video), padded with zeros; or, for a
        longer video latent carrying no recorded positions, its frames nearest the new keyframes."""
        batch, channels, _, rows, cols = samples.shape
        if keyframes is None:
            return samples.new_zeros(batch, channels, len(indices), rows, cols)
        content = keyframes["samples"]
        if content.ndim != 5:
            raise ValueError(f"LTXVAddGeneratedKeyframes: the keyframes latent must be 5 dimensional, got "
                             f"{list(content.shape)}")
        if content.shape[2] == 1 and content.shape[0] != batch:
            if content.shape[0] % batch:
                raise ValueError(f"LTXVAddGeneratedKeyframes: the keyframes latent batch ({content.shape[0]}) is not "
                                 f"a multiple of the video latent batch ({batch}), so it cannot be reshaped into "
                                 "per-video keyframes")
            content = content.reshape(batch, content.shape[0] // batch, content.shape[1],
                                      *content.shape[3:]).movedim(1, 2)
        if keyframes.get("generated_keyframe_indices") is None and content.shape[2] > len(indices):
            return keyframes_from_video(content, indices).to(samples)
        return _fit_keyframes(content.to(samples), samples, len(indices))


class LTXVSeparateGeneratedKeyframes(Node):
    """Split the generated keyframes added by LTXV Add Generated Keyframes back out of a sampled latent, and remove
    them from the conditioning. Separate them before spatially upscaling the video latent. Do not run LTXV Crop Guides
    first — it treats generated keyframes as disposable guides and drops them."""

    display_name = "LTXV Separate Generated Keyframes"
    category = "model/conditioning/ltxv"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    latent = Socket("LATENT")
    keyframes_to_batch = Boolean(False, tooltip="Return the keyframes as a batch of single-frame latents. Leave off "
                                 "to get them as one multi-frame latent, which is what the latent upsampler and a "
                                 "later Add Generated Keyframes expect.")
    outputs = (Output("CONDITIONING", "positive", tooltip="Positive conditioning with generated-keyframe metadata "
                      "removed."),
               Output("CONDITIONING", "negative", tooltip="Negative conditioning with generated-keyframe metadata "
                      "removed."),
               Output("LATENT", "latent", tooltip="Video latent with the generated keyframes stripped."),
               Output("LATENT", "keyframes", tooltip="The peeled keyframes, labeled with generated_keyframe_indices "
                      "and generated_keyframe_num_frames. Feed these to a later Add Generated Keyframes to initialize "
                      "new slots, or to Generated Keyframes To Guides to pin them as frozen image guides (indices are "
                      "remapped if the canvas length changed)."))

    def execute(self, positive: list, negative: list, latent: dict,
                keyframes_to_batch: bool = False) -> tuple[list, list, dict, dict]:
        node = "LTXVSeparateGeneratedKeyframes"
        record = _any_value(positive, GENERATED_KEY)
        if record is None:
            raise ValueError(f"{node}: this latent has no generated keyframes. Add them with LTXV Add Generated "
                             "Keyframes first")
        samples = latent["samples"]
        if is_av(latent) or samples.ndim != 5:
            raise ValueError(f"{node}: generated keyframes must be separated from a plain video latent. Split the "
                             "video and audio latents with Separate AV Latent first")
        batch, channels, length, rows, cols = samples.shape
        per_frame = rows * cols
        if record["tokens_per_frame"] != per_frame:
            raise ValueError(f"{node}: the generated keyframes were added at {record['tokens_per_frame']} tokens per "
                             f"latent frame but this latent has {per_frame}. The latent was rescaled after they were "
                             "added, so the keyframes no longer line up. Separate them before upscaling the latent")
        first, count = record["first_latent_frame"], record["num_keyframes"]
        end = first + count
        if end > length:
            raise ValueError(f"{node}: the generated keyframes span latent frames [{first}, {end}) but the latent only "
                             f"has {length}. It was recorded against a different latent")
        content = samples[:, :, first:end].clone()
        if keyframes_to_batch:
            content = content.movedim(2, 1).reshape(batch * count, channels, 1, rows, cols)
        mask = _noise_mask(latent)
        out = {**latent, "samples": torch.cat([samples[:, :, :first], samples[:, :, end:]], dim=2),
               "noise_mask": torch.cat([mask[:, :, :first], mask[:, :, end:]], dim=2)}
        first_token = (first - (length - guide_frames(positive, samples))) * per_frame
        conds = [_set_values(c, {KEY: self._without_tokens(c, first_token, count * per_frame),
                                 ATTENTION_KEY: self._without_entry(c, record["guide_entry_index"]),
                                 GENERATED_KEY: None}) for c in (positive, negative)]
        num_frames = record.get("num_pixel_frames")
        if num_frames is None:
            num_frames = (first - 1) * FRAMES_PER_LATENT + 1
        peeled = {"samples": content, "generated_keyframe_indices": list(record["frame_indices"]),
                  "generated_keyframe_num_frames": int(num_frames)}
        return conds[0], conds[1], out, peeled

    @staticmethod
    def _without_tokens(conditioning: list, first: int, count: int) -> torch.Tensor | None:
        spans = keyframe_idxs(conditioning)
        if spans is None:
            return None
        rest = torch.cat([spans[:, :, :first], spans[:, :, first + count:]], dim=2)
        return rest if rest.shape[2] else None

    @staticmethod
    def _without_entry(conditioning: list, index: int) -> list | None:
        entries = _any_value(conditioning, ATTENTION_KEY)
        if not entries:
            return None
        if index >= len(entries):
            raise ValueError(f"the generated keyframes recorded guide entry {index} but the conditioning only has "
                             f"{len(entries)}. The conditioning was rebuilt after they were added")
        return [*entries[:index], *entries[index + 1:]] or None


class LTXVGeneratedKeyframesToGuides(Node):
    """Pin generated keyframes from an earlier stage as frozen image guides on a later canvas. They are decoded as
    standalone frames, resized if needed, and written with noise_mask=0 so they are not denoised again. After a
    temporal upscale, recorded indices are scaled from the canvas they were generated on onto this one (same
    moments). Use override_frame_indices to set positions explicitly. To keep generating (and denoising) keyframes at
    new positions, use Add Generated Keyframes instead."""

    display_name = "LTXV Generated Keyframes to Guides"
    category = "model/conditioning/ltxv"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    latent = Socket("LATENT", tooltip="The target video latent to add the guides to, e.g. the temporally upscaled one.")
    keyframes = Socket("LATENT", tooltip="The keyframes output of LTXV Separate Generated Keyframes, which carries the "
                       "pixel frame index each keyframe was generated at.")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01, tooltip="Guide strength. 1.0 is a hard pin; lower values "
                     "relax it.")
    override_frame_indices = String("", optional=True, tooltip="Optional — pin at these pixel frames instead of the "
                                    "recorded (or auto-scaled) positions. Provide one index per keyframe. Leave empty "
                                    "to reuse recorded positions, or to scale them when the target canvas is a "
                                    "different length (e.g. after temporal x2).")
    outputs = (Output("CONDITIONING", "positive", tooltip="Positive conditioning with the keyframes pinned as image "
                      "guides."),
               Output("CONDITIONING", "negative", tooltip="Negative conditioning with the keyframes pinned as image "
                      "guides."),
               Output("LATENT", "latent", tooltip="Target video latent with the keyframes added as frozen guides."))

    def execute(self, positive: list, negative: list, vae: Vae, latent: dict, keyframes: dict, strength: float,
                override_frame_indices: str = "") -> tuple[list, list, dict]:
        node = "LTXVGeneratedKeyframesToGuides"
        indices = keyframes.get("generated_keyframe_indices")
        if indices is None:
            raise ValueError(f"{node}: this latent does not carry generated keyframe positions. Connect the keyframes "
                             "output of LTXV Separate Generated Keyframes")
        if _any_value(positive, GENERATED_KEY) is not None:
            raise ValueError(f"{node}: this conditioning still carries generated keyframes. Connect the positive and "
                             "negative outputs of LTXV Separate Generated Keyframes")
        samples = latent["samples"]
        if is_av(latent) or samples.ndim != 5:
            raise ValueError(f"{node}: generated keyframe guides must be added to a plain video latent. Add them "
                             "before merging the video and audio latents with Concat AV Latent")
        if samples.shape[0] != 1:
            raise ValueError(f"{node}: only a batch size of 1 is supported, got {samples.shape[0]}. Each guide is "
                             "encoded from one image, so it cannot differ across batch elements")
        if not is_ltx2_vae(vae):
            raise ValueError(f"{node} places guides as LTX-2 reads them; {vae.source} is not LTX-2's video VAE")
        content = keyframes["samples"]
        if content.ndim != 5:
            raise ValueError(f"{node}: the keyframes latent {list(content.shape)} is not [B, C, frames, h, w]")
        if content.shape[2] != 1:  # one single-frame latent per keyframe
            content = content.movedim(2, 1).reshape(-1, content.shape[1], 1, *content.shape[3:])
        resize = tuple(content.shape[3:]) != tuple(samples.shape[3:])
        # Smaller or larger keyframes are decoded one picture each (never as one clip) and encoded again at this size.
        guides = decode(self, vae, content) if resize else content
        if guides.shape[0] != len(indices):
            raise ValueError(f"{node}: got {guides.shape[0]} keyframes for {len(indices)} recorded positions")
        num_frames = (samples.shape[2] - guide_frames(positive, samples) - 1) * FRAMES_PER_LATENT + 1
        if override_frame_indices and override_frame_indices.strip():
            indices = parse_frame_indices(override_frame_indices, node, "override_frame_indices", len(indices), 1,
                                          num_frames - 1, "to reuse the recorded positions")
        else:
            old = keyframes.get("generated_keyframe_num_frames")
            if old is not None and int(old) != num_frames:
                indices = scale_frame_indices(list(indices), int(old), num_frames)
        if indices and max(indices) >= num_frames:
            raise ValueError(f"{node}: keyframe position {max(indices)} is outside this latent's {num_frames} frames. "
                             "The target was resized temporally after the keyframes were generated")
        adder = LTXVAddGuide()
        adder.ctx = self.ctx
        for n, frame_idx in enumerate(indices):
            if resize:
                positive, negative, latent = adder.execute(positive, negative, vae, latent, guides[n:n + 1],
                                                           int(frame_idx), strength)
            else:
                positive, negative, latent = attach_ltx2_guide(positive, negative, latent, guides[n:n + 1],
                                                               int(frame_idx), strength, causal=True)
        return positive, negative, latent


NODES: list[Any] = [GetICLoRAParameters, LTXVAddGuide, LTXVAddLatentGuide, LTXVCropGuides, LTXVAddGeneratedKeyframes,
                    LTXVSeparateGeneratedKeyframes, LTXVGeneratedKeyframesToGuides]
