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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ldm.ltxv import latent_positions
from ldm.sampling.av_latent import is_av
from nodes.node import Node
from nodes.sd.latent import upscale_latent
from nodes.sd.ltxv import FRAMES_PER_LATENT, PIXELS_PER_LATENT
from nodes.sd.models import DiffusionModel, Vae
from nodes.sd.vae import encode, is_video_vae
from nodes.spec import Float, Int, Output, Socket

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


NODES: list[Any] = [GetICLoRAParameters, LTXVAddGuide, LTXVAddLatentGuide, LTXVCropGuides]
