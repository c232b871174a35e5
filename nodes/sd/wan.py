"""Wan 2.1 / 2.2 video models in the SD node set: empty video latents, image-to-video and first/last-frame
conditioning, and what the sampler feeds a Wan model.

Wan (`ldm.wan`) loads through UNETLoader, CLIPLoader type "wan" (UMT5-XXL) and VAELoader (Wan's causal video VAE),
and samples through KSampler on rectified-flow levels with ModelSamplingSD3's shift. Its latents are 5-D,
[B, C, frames, h, w]: 16 channels at 1/8 of the pixels for Wan 2.1 and the 14B Wan 2.2 models, 48 at 1/16 for the
5B Wan 2.2; one latent frame for the first picture and one for every 4 after it.

Image-to-video, as ComfyUI runs it: WanImageToVideo puts the start image's latent (the video's first frames, the rest
mid-grey) and a mask of the known latent frames in both prompts (`concat_latent_image`, `concat_mask`), and the CLIP
vision encoding of the image (`clip_vision_output`). The sampler gives the model, beside the noisy latent, the mask
(1 where a frame is known, as 4 channels) and that latent, normalised (`wan_concat`), and the image's penultimate
CLIP states as the model's `y` (Wan's `clip_fea`, `wan_conditioning`).

Beside the video's tokens: Phantom's subject images (WanPhantomSubjectToVideo's `time_dim_concat`, latent frames after
the video's) and a Wan Fun model's reference image (Wan22FunControlToVideo's `reference_latents`, one frame of tokens
before the video's) reach the model per entry as the sampler's `ref_latents` (`wan_references`). ATI's point tracks
(WanTrackToVideo) are image-to-video conditioning: the start image's latent with the tracks' motion patched in.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.nn.functional as F

from ldm.clip_vision import ClipVisionOutput
from ldm.flux_variants import References
from ldm.wan_files import WAN21_MEAN, WAN21_STD, WAN22_MEAN
from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION, repeat_to_batch, upscale_latent
from nodes.sd.models import DiffusionModel, Vae
from nodes.sd.vae import encode, is_video_vae
from nodes.spec import Float, Int, Output, Socket, String

WAN_FAMILIES = ("wan21", "wan22")
# Every latent frame after the first stands for this many pictures (Wan's VAE).
FRAMES_PER_LATENT = 4


def latent_frames(length: int) -> int:
    """How many latent frames hold `length` pictures: the first alone, then one per 4."""
    return (length - 1) // FRAMES_PER_LATENT + 1


def _fit_frames(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE frames [T, H, W, C] at width x height: centre-cropped to the aspect ratio, then bilinear (ComfyUI's
    common_upscale with "center")."""
    return upscale_latent(image.movedim(-1, 1).float(), width, height, "bilinear", "center").movedim(1, -1)


def _video_vae(vae: Vae, node: str) -> None:
    if not is_video_vae(vae):
        raise ValueError(f"{node} encodes its images with a video VAE (Wan's); {vae.source} is an image VAE")


def _encoded_frames(node: Node, vae: Vae, frames: torch.Tensor, width: int, height: int, who: str) -> torch.Tensor:
    """IMAGE frames fitted to width x height and encoded as one video by the (video) VAE: [1, C, T, h, w]."""
    _video_vae(vae, who)
    return encode(node, vae, _fit_frames(frames, width, height)[..., :3])


def mean_filled(shape: tuple[int, ...], mean: tuple[float, ...], known: torch.Tensor) -> torch.Tensor:
    """A latent of `shape` holding the latent space's mean (its zero, unnormalised) with `known`'s frames first."""
    latent = torch.tensor(mean).reshape(1, -1, 1, 1, 1).expand(shape).clone()
    frames = min(known.shape[2], shape[2])
    latent[:, :, :frames] = known[:, :, :frames]
    return latent


def _with(conditioning: list, **values: Any) -> list:
    return [(embedding, {**options, **values}) for embedding, options in conditioning]


def _clip_fea(output: ClipVisionOutput | None) -> torch.Tensor | None:
    return None if output is None else output.penultimate_hidden_states


class EmptyHunyuanLatentVideo(Node):
    """An empty (zero) video latent of `length` pictures for Wan 2.1 and the 14B Wan 2.2 models (and HunyuanVideo's
    latent space, which has the same shape): 16 channels, 1/8 of the pixels, one frame for the first picture and
    one for every 4 after it."""

    category = "latent/video"
    width = Int(848, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(480, min=16, max=MAX_RESOLUTION, step=16)
    length = Int(25, min=1, max=MAX_RESOLUTION, step=4)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, length: int, batch_size: int) -> tuple[dict]:
        return ({"samples": torch.zeros(batch_size, 16, latent_frames(length), height // 8, width // 8)},)


class WanVideoConditioning(Node):
    """What Wan's video conditioning nodes share, as ComfyUI declares them: both prompts, the VAE, the video's size and
    length, and the prompts and an empty latent back. Each node adds its own inputs."""

    category = "conditioning/video_models"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    width = Int(832, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(480, min=16, max=MAX_RESOLUTION, step=16)
    length = Int(81, min=1, max=MAX_RESOLUTION, step=4)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))


class WanImageToVideo(WanVideoConditioning):
    """Image-to-video for Wan's i2v models: the prompts carry the start image's latent and which latent frames it
    fixes (and its CLIP vision encoding, for Wan 2.1's i2v models); the latent to sample is an empty one."""

    clip_vision_output = Socket("CLIP_VISION_OUTPUT", optional=True)
    start_image = Socket("IMAGE", optional=True)

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, clip_vision_output: ClipVisionOutput | None = None,
                start_image: torch.Tensor | None = None) -> tuple[list, list, dict]:
        frames = latent_frames(length)
        latent = torch.zeros(batch_size, 16, frames, height // 8, width // 8)
        values: dict[str, Any] = {}
        if start_image is not None:
            _video_vae(vae, "WanImageToVideo")
            start = _fit_frames(start_image[:length], width, height)
            video = torch.full((length, height, width, 3), 0.5)
            video[:start.shape[0]] = start[..., :3]
            image = encode(self, vae, video)
            mask = torch.ones(1, 1, frames, *image.shape[-2:])
            mask[:, :, :latent_frames(start.shape[0])] = 0.0  # the start image's latent frames are known
            values = {"concat_latent_image": image, "concat_mask": mask}
        if clip_vision_output is not None:
            values["clip_vision_output"] = clip_vision_output
        return _with(positive, **values), _with(negative, **values), {"samples": latent}


class WanFirstLastFrameToVideo(WanVideoConditioning):
    """Image-to-video between a first and a last frame (Wan's FLF2V model, or an i2v one): the prompts carry the
    video's latent with both ends given, which pictures they fix (as 4 mask channels per latent frame), and the
    two images' CLIP vision encodings side by side."""

    clip_vision_start_image = Socket("CLIP_VISION_OUTPUT", optional=True)
    clip_vision_end_image = Socket("CLIP_VISION_OUTPUT", optional=True)
    start_image = Socket("IMAGE", optional=True)
    end_image = Socket("IMAGE", optional=True)

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, clip_vision_start_image: ClipVisionOutput | None = None,
                clip_vision_end_image: ClipVisionOutput | None = None, start_image: torch.Tensor | None = None,
                end_image: torch.Tensor | None = None) -> tuple[list, list, dict]:
        return _first_last(self, positive, negative, vae, width, height, length, batch_size, clip_vision_start_image,
                           clip_vision_end_image, start_image, end_image)


def _first_last(node: Node, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, clip_vision_start_image: ClipVisionOutput | None,
                clip_vision_end_image: ClipVisionOutput | None, start_image: torch.Tensor | None,
                end_image: torch.Tensor | None) -> tuple[list, list, dict]:
    """WanFirstLastFrameToVideo's conditioning: the video with its given ends, their mask and image states."""
    _video_vae(vae, type(node).__name__)
    frames = latent_frames(length)
    latent = torch.zeros(batch_size, 16, frames, height // 8, width // 8)
    video = torch.full((length, height, width, 3), 0.5)
    # One mask value per picture of the latent's frames (4 each), 0 where a picture is given.
    mask = torch.ones(1, 1, frames * FRAMES_PER_LATENT, height // 8, width // 8)
    if start_image is not None:
        start = _fit_frames(start_image[:length], width, height)
        video[:start.shape[0]] = start[..., :3]
        mask[:, :, :start.shape[0] + 3] = 0.0  # the first latent frame stands for one picture, not 4
    if end_image is not None:
        end = _fit_frames(end_image[-length:], width, height)
        video[-end.shape[0]:] = end[..., :3]
        mask[:, :, -end.shape[0]:] = 0.0
    image = encode(node, vae, video)
    mask = mask.reshape(1, frames, FRAMES_PER_LATENT, *mask.shape[-2:]).transpose(1, 2)  # [1, 4, frames, h, w]
    values: dict[str, Any] = {"concat_latent_image": image, "concat_mask": mask}
    states = [s for s in (_clip_fea(clip_vision_start_image), _clip_fea(clip_vision_end_image)) if s is not None]
    if states:
        last = clip_vision_end_image or clip_vision_start_image
        values["clip_vision_output"] = ClipVisionOutput(last.last_hidden_state, last.image_embeds,
                                                        torch.cat(states, dim=-2))
    return _with(positive, **values), _with(negative, **values), {"samples": latent}


class WanFunInpaintToVideo(WanVideoConditioning):
    """Wan Fun InP models' image-to-video between an optional start and end picture: WanFirstLastFrameToVideo's
    conditioning, with one CLIP vision encoding."""

    clip_vision_output = Socket("CLIP_VISION_OUTPUT", optional=True)
    start_image = Socket("IMAGE", optional=True)
    end_image = Socket("IMAGE", optional=True)

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, clip_vision_output: ClipVisionOutput | None = None,
                start_image: torch.Tensor | None = None, end_image: torch.Tensor | None = None
                ) -> tuple[list, list, dict]:
        return _first_last(self, positive, negative, vae, width, height, length, batch_size, clip_vision_output,
                           None, start_image, end_image)


class WanFunControlToVideo(WanVideoConditioning):
    """Wan Fun Control models: the prompts carry 32 channels beside the latent, the control video's latent (its
    first 16) and the start image's (the last 16), each the latent space's zero where not given."""

    clip_vision_output = Socket("CLIP_VISION_OUTPUT", optional=True)
    start_image = Socket("IMAGE", optional=True)
    control_video = Socket("IMAGE", optional=True)

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, clip_vision_output: ClipVisionOutput | None = None,
                start_image: torch.Tensor | None = None, control_video: torch.Tensor | None = None
                ) -> tuple[list, list, dict]:
        frames = latent_frames(length)
        shape = (batch_size, 16, frames, height // 8, width // 8)
        # The latent space's zero (its mean, unnormalised), for the control part and then for the image part.
        concat = torch.tensor(WAN21_MEAN).reshape(1, -1, 1, 1, 1).expand(shape).repeat(1, 2, 1, 1, 1)
        for video, channels in ((control_video, slice(0, 16)), (start_image, slice(16, 32))):
            if video is not None:
                encoded = _encoded_frames(self, vae, video[:length], width, height, "WanFunControlToVideo")
                known = min(encoded.shape[2], frames)
                concat[:, channels, :known] = encoded[:, :, :known]
        values: dict[str, Any] = {"concat_latent_image": concat}
        if clip_vision_output is not None:
            values["clip_vision_output"] = clip_vision_output
        return _with(positive, **values), _with(negative, **values), {"samples": torch.zeros(shape)}


class Wan22ImageToVideoLatent(Node):
    """The video latent of Wan 2.2's 5B model (48 channels, 1/16 of the pixels): empty for text-to-video; for
    image-to-video its first frames hold the start image's latent, which the noise mask keeps (the model sees them
    at noise level 0: `ldm.sampling.masked_timesteps`). The rest is zero in the model's normalised space."""

    category = "conditioning/inpaint"
    vae = Socket("VAE")
    width = Int(1280, min=32, max=MAX_RESOLUTION, step=32)
    height = Int(704, min=32, max=MAX_RESOLUTION, step=32)
    length = Int(49, min=1, max=MAX_RESOLUTION, step=4)
    batch_size = Int(1, min=1, max=4096)
    start_image = Socket("IMAGE", optional=True)
    outputs = (Output("LATENT"),)

    def execute(self, vae: Vae, width: int, height: int, length: int, batch_size: int,
                start_image: torch.Tensor | None = None) -> tuple[dict]:
        shape = (1, len(WAN22_MEAN), latent_frames(length), height // 16, width // 16)
        if start_image is None:
            return ({"samples": torch.zeros(batch_size, *shape[1:])},)
        start = _encoded_frames(self, vae, start_image[:length], width, height, "Wan22ImageToVideoLatent")
        if start.shape[1] != shape[1]:
            raise ValueError(f"Wan22ImageToVideoLatent takes Wan 2.2's 48-channel VAE; {vae.source} makes "
                             f"{start.shape[1]}-channel latents")
        known = min(start.shape[2], shape[2])
        mask = torch.ones(1, 1, *shape[2:])
        mask[:, :, :known] = 0.0
        # Unknown frames hold the latent space's mean (zero once normalised, as ComfyUI's are), known ones the image.
        latent = mean_filled(shape, WAN22_MEAN, start)
        return ({"samples": latent.repeat(batch_size, 1, 1, 1, 1), "noise_mask": mask.repeat(batch_size, 1, 1, 1, 1)},)


class TrimVideoLatent(Node):
    """Drops the first `trim_amount` frames of a video latent (after WanVaceToVideo's reference frames)."""

    category = "latent/video"
    samples = Socket("LATENT")
    trim_amount = Int(0, min=0, max=99999)
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, trim_amount: int) -> tuple[dict]:
        x = samples["samples"]
        if x.ndim != 5:
            raise ValueError(f"TrimVideoLatent takes a video latent [B, C, frames, h, w], not {tuple(x.shape)}")
        return (dict(samples, samples=x[:, :, trim_amount:]),)


class Wan22FunControlToVideo(WanVideoConditioning):
    """Wan 2.2 Fun Control models: the prompts carry, beside the latent, the control video's latent, 4 mask channels
    and a start picture's latent (`concat_mask_index`: the mask after the control part), each the latent space's
    zero where not given, and a reference image's latent for the model's reference input (`reference_latents`).
    As ComfyUI declares it, the node takes no start picture: the mask is all 1 (nothing known) and the start part
    the latent space's zero. The latent's channels and size follow the VAE (Wan 2.1's, or Wan 2.2's for the 5B)."""

    ref_image = Socket("IMAGE", optional=True)
    control_video = Socket("IMAGE", optional=True)

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, ref_image: torch.Tensor | None = None, control_video: torch.Tensor | None = None
                ) -> tuple[list, list, dict]:
        _video_vae(vae, "Wan22FunControlToVideo")
        channels, scale = vae.vae.latent_channels, vae.vae.spatial_compression
        frames = latent_frames(length)
        shape = (batch_size, channels, frames, height // scale, width // scale)
        mean = WAN22_MEAN if channels == len(WAN22_MEAN) else WAN21_MEAN
        # The latent space's zero (its mean, unnormalised), for the control part and then for the image part.
        concat = torch.tensor(mean).reshape(1, -1, 1, 1, 1).expand(shape).repeat(1, 2, 1, 1, 1)
        if control_video is not None:
            encoded = _encoded_frames(self, vae, control_video[:length], width, height, "Wan22FunControlToVideo")
            known = min(encoded.shape[2], frames)
            concat[:, :channels, :known] = encoded[:, :, :known]
        mask = torch.ones(1, FRAMES_PER_LATENT, frames, *shape[-2:])
        values = {"concat_latent_image": concat, "concat_mask": mask, "concat_mask_index": channels}
        positive, negative = _with(positive, **values), _with(negative, **values)
        if ref_image is not None:
            reference = _encoded_frames(self, vae, ref_image[:1], width, height, "Wan22FunControlToVideo")
            positive, negative = _with_reference(positive, reference), _with_reference(negative, reference)
        return positive, negative, {"samples": torch.zeros(shape)}


def _with_reference(conditioning: list, latent: torch.Tensor) -> list:
    """Each entry with `latent` appended to its reference latents."""
    return [(embedding, {**options, "reference_latents": [*options.get("reference_latents", []), latent]})
            for embedding, options in conditioning]


class WanPhantomSubjectToVideo(WanVideoConditioning):
    """Phantom-Wan's subject-to-video: each subject image's latent (one latent frame each, encoded alone) goes with
    the prompts as frames the model sees after the video's (`time_dim_concat`). Three prompts for Phantom's two
    guidances: the positive and `negative_text` with the subjects, `negative_img_text` with the latent space's zero
    in their place."""

    images = Socket("IMAGE", optional=True)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative_text"),
               Output("CONDITIONING", "negative_img_text"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, images: torch.Tensor | None = None) -> tuple[list, list, list, dict]:
        latent = {"samples": torch.zeros(batch_size, 16, latent_frames(length), height // 8, width // 8)}
        if images is None:
            return positive, negative, negative, latent
        _video_vae(vae, "WanPhantomSubjectToVideo")
        if vae.vae.latent_channels != len(WAN21_MEAN):
            raise ValueError(f"WanPhantomSubjectToVideo encodes the subjects with Wan 2.1's VAE (16 channels), as "
                             f"Phantom-Wan takes them; {vae.source} makes {vae.vae.latent_channels}-channel latents")
        pictures = _fit_frames(images[:length], width, height)[..., :3]
        subjects = torch.cat([encode(self, vae, picture[None]) for picture in pictures], dim=2)
        zero = torch.tensor(WAN21_MEAN).reshape(1, -1, 1, 1, 1).expand_as(subjects).clone()
        return (_with(positive, time_dim_concat=subjects), _with(negative, time_dim_concat=subjects),
                _with(negative, time_dim_concat=zero), latent)


# ATI's tracks: 121 positions each (5 s at 24 fps), resampled to the video's pictures (Wan's 16 fps).
TRACK_STEPS = 121


def parse_tracks(text: str) -> list[list[list[dict]]]:
    """WanTrackToVideo's `tracks` JSON (single quotes allowed, as ComfyUI reads it): one track (a list of {"x", "y"}
    points in pixels), a list of tracks, or a list of such lists (one per video of the batch); as batches of
    tracks. "[]" is none."""
    try:
        data = json.loads(text.replace("'", '"'))
    except json.JSONDecodeError as e:
        raise ValueError(f"WanTrackToVideo: the tracks are not JSON ({e}); {_TRACKS_FORMAT}") from None
    if not isinstance(data, list):
        raise ValueError(f"WanTrackToVideo: the tracks are a JSON list; {_TRACKS_FORMAT}")
    if not data:
        return []
    if _is_point(data[0]):
        batches = [[data]]
    elif isinstance(data[0], list) and data[0] and _is_point(data[0][0]):
        batches = [data]
    else:
        batches = data
    for tracks in batches:
        if not (isinstance(tracks, list) and tracks and all(
                isinstance(track, list) and track and all(_is_point(p) for p in track) for track in tracks)):
            raise ValueError(f"WanTrackToVideo: a track that is not a list of points; {_TRACKS_FORMAT}")
    return batches


_TRACKS_FORMAT = ('give a list of tracks, each a list of {"x": .., "y": ..} points in pixels (or a list of such '
                  "lists, one per video)")


def _is_point(value: Any) -> bool:
    return (isinstance(value, dict) and {"x", "y"} <= value.keys()
            and all(isinstance(value[k], int | float) for k in ("x", "y")))


def track_steps(tracks: list[list[dict]], width: int, height: int, length: int) -> torch.Tensor:
    """Tracks as ATI's model reads them [length, N, 4]: (time in -1..1, x and y about the picture's centre in
    units of half its short side, visibility +-1), the 121 steps (zero-padded, invisible, where a track is shorter)
    resampled to `length` pictures: the first as is, the other 120 repeated and strided to length - 1."""
    points = torch.zeros(TRACK_STEPS, len(tracks), 3)
    for i, track in enumerate(tracks):
        xy = torch.tensor([[float(p["x"]), float(p["y"])] for p in track[:TRACK_STEPS]]).reshape(-1, 2)
        points[:len(xy), i, :2], points[:len(xy), i, 2] = xy, 1.0
    size = torch.tensor([float(width), float(height)])
    xy = (points[..., :2] - size / 2) / min(width, height) * 2
    visible = points[..., 2:] * 2 - 1
    time = torch.linspace(-1, 1, TRACK_STEPS).reshape(-1, 1, 1).expand_as(visible)
    steps = torch.cat([time, xy, visible], dim=-1)
    pictures = length - 1
    common = math.gcd(TRACK_STEPS - 1, pictures)
    stride, repeat = (TRACK_STEPS - 1) // common, pictures // common
    return torch.cat([steps[:1], steps[1:].repeat_interleave(repeat, dim=0)[1::stride]])


def motion_patched(tracks: torch.Tensor, latent: torch.Tensor, temperature: float, topk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """ATI's motion patch of one video: `latent` [C, T, h, w] (normalised; only its first frame matters) with each
    track's feature, sampled from the first frame where the track starts, spread over the later frames around where
    the track is (a Gaussian of its distance, `temperature`, the `topk` nearest tracks per pixel), blended over the
    rest by the weight left. Returns the weights [T, h, w] (1 on the first frame) and the patched latent."""
    _, frames, rows, cols = latent.shape
    if tracks.shape[0] != FRAMES_PER_LATENT * (frames - 1) + 1:
        raise ValueError(f"WanTrackToVideo: {tracks.shape[0]} pictures of tracks do not fill {frames} latent frames; "
                         "give a length of 4n + 1 pictures")
    count = tracks.shape[1]
    xy, visible = tracks[..., 1:3], tracks[..., 3:]
    short = min(rows, cols)
    starts = (xy[:1] / torch.tensor([cols / short, rows / short])).clamp(-1, 1)
    visible = visible.clamp(0, 1)
    grid_x = torch.linspace(-cols / short, cols / short, cols)
    grid_y = torch.linspace(-rows / short, rows / short, rows)
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)  # [h, w, (x, y)]
    # Each latent frame after the first stands for 4 pictures: the track's visible positions there averaged.
    seen = visible[1:].reshape(frames - 1, FRAMES_PER_LATENT, count, 1).sum(1)
    at = (xy[1:] * visible[1:]).reshape(frames - 1, FRAMES_PER_LATENT, count, 2).sum(1) / (seen + 1e-5)
    distance = (at[:, None, None] - grid[None, :, :, None]).pow(2).sum(-1)  # [T - 1, h, w, N]
    weight = torch.exp(-distance * temperature) * seen.clamp(0, 1).reshape(frames - 1, 1, 1, count)
    top_weight, top_index = weight.topk(min(topk, count), dim=-1)
    features = F.grid_sample(latent[:, :1].movedim(1, 0), starts[None].to(latent.dtype), mode="bilinear",
                             padding_mode="zeros", align_corners=False)[0, :, 0].T  # [N, C]
    spread = (features[top_index] * top_weight[..., None]).sum(-2).permute(3, 0, 1, 2)  # [C, T - 1, h, w]
    spread_weight = top_weight.sum(-1)
    later = spread + latent[:, 1:] * (1 - spread_weight.clamp(0, 1))
    return (torch.cat([torch.ones_like(spread_weight[:1]), spread_weight]),
            torch.cat([latent[:, :1], later], dim=1))


def batch_indices(count: int, batch: int) -> list[int]:
    """Which of `count` items each of `batch` rows takes (ComfyUI's resize_to_batch_size): spread evenly over them,
    by nearest when there are more, by the middle of each row's share when fewer."""
    if count == batch:
        return list(range(batch))
    if batch <= 1:
        return list(range(batch))
    if batch < count:
        return [min(round(i * (count - 1) / (batch - 1)), count - 1) for i in range(batch)]
    return [min(math.floor((i + 0.5) * count / batch), count - 1) for i in range(batch)]


class WanTrackToVideo(Node):
    """ATI (Any Trajectory Instruction), Wan 2.1's image-to-video model fine-tuned to follow point tracks: the
    start image's latent with each track's feature carried along its path (`motion_patched`), and the weights of
    that motion as the mask of known latent, in both prompts. Without tracks it is WanImageToVideo."""

    category = "conditioning/video_models"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    tracks = String("[]", multiline=True)
    width = Int(832, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(480, min=16, max=MAX_RESOLUTION, step=16)
    length = Int(81, min=1, max=MAX_RESOLUTION, step=4)
    batch_size = Int(1, min=1, max=4096)
    temperature = Float(220.0, min=1.0, max=1000.0, step=0.1, extra={"advanced": True})
    topk = Int(2, min=1, max=10, extra={"advanced": True})
    start_image = Socket("IMAGE")
    clip_vision_output = Socket("CLIP_VISION_OUTPUT", optional=True)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, vae: Vae, tracks: str, width: int, height: int, length: int,
                batch_size: int, temperature: float, topk: int, start_image: torch.Tensor,
                clip_vision_output: ClipVisionOutput | None = None) -> tuple[list, list, dict]:
        batches = parse_tracks(tracks)
        if not batches:
            return WanImageToVideo.execute(self, positive, negative, vae, width, height, length, batch_size,
                                           clip_vision_output=clip_vision_output, start_image=start_image)
        _video_vae(vae, "WanTrackToVideo")
        steps = [track_steps(batch, width, height, length) for batch in batches]
        # Each video: its start image (one per row of the batch, spread over them) then mid-grey.
        starts = _fit_frames(start_image[:batch_size], width, height)[..., :3]
        encoded = []
        for start in starts:
            video = torch.full((length, height, width, 3), 0.5)
            video[0] = start
            encoded.append(encode(self, vae, video))
        mean, std = (torch.tensor(v).reshape(-1, 1, 1, 1) for v in (WAN21_MEAN, WAN21_STD))
        masks, latents = [], []
        for image, track in zip(batch_indices(len(encoded), batch_size), batch_indices(len(steps), batch_size),
                                strict=True):
            # Patched in the normalised space (the patch is not linear), then back to the VAE's.
            weight, patched = motion_patched(steps[track], (encoded[image][0] - mean) / std, temperature, topk)
            masks.append(weight[None].expand(FRAMES_PER_LATENT, -1, -1, -1))
            latents.append(patched * std + mean)
        values: dict[str, Any] = {"concat_latent_image": torch.stack(latents), "concat_mask": 1 - torch.stack(masks)}
        if clip_vision_output is not None:
            values["clip_vision_output"] = clip_vision_output
        latent = torch.zeros(batch_size, 16, latent_frames(length), height // 8, width // 8)
        return _with(positive, **values), _with(negative, **values), {"samples": latent}


def is_wan(model: DiffusionModel) -> bool:
    return model.family.name in WAN_FAMILIES


def wan_conditioning(conditioning: list) -> list:
    """Each entry with the model's `y`: the penultimate CLIP vision states of its image (Wan's `clip_fea`), if the
    entry carries an image's encoding."""
    return [(embedding, {**options, "y": _clip_fea(options.get("clip_vision_output"))})
            for embedding, options in conditioning]


def _frames_at(x: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """A [B, C, T, h, w] tensor at `samples`' height and width (frame by frame) and batch."""
    if x.shape[-2:] != samples.shape[-2:]:
        b, c, t = x.shape[:3]
        flat = x.movedim(2, 1).reshape(b * t, c, *x.shape[-2:])
        flat = upscale_latent(flat, samples.shape[-1], samples.shape[-2], "bilinear", "center")
        x = flat.reshape(b, t, c, *samples.shape[-2:]).movedim(1, 2)
    return repeat_to_batch(x, samples.shape[0])


def wan_concat(model: DiffusionModel, samples: torch.Tensor, options: dict) -> torch.Tensor | None:
    """The channels a Wan model takes beside the latent, for one entry (None for a text-to-video model): for an
    image-to-video model, 4 mask channels (1 where the entry's image fixes a frame) then the image's latent,
    normalised as the model samples (the mask after the first `concat_mask_index` image channels where the entry
    says so); zeros where the entry carries none, as in ComfyUI."""
    extra = model.family.unet_config.in_dim - samples.shape[1]
    if extra <= 0:
        return None
    image, mask = options.get("concat_latent_image"), options.get("concat_mask")
    if image is None:
        return torch.zeros(samples.shape[0], extra, *samples.shape[2:])
    if image.ndim != 5:
        raise ValueError(f"the prompts' image latent {tuple(image.shape)} is not a video latent: encode the start "
                         "image with Wan's VAE (WanImageToVideo does)")
    image = _frames_at(image.float(), samples)
    channels = samples.shape[1]
    image = torch.cat([model.latent_in(image[:, i:i + channels]) for i in range(0, image.shape[1], channels)], 1)
    if image.shape[1] == extra:
        return image
    image = image[:, :extra - 4]
    if mask is None:
        known = torch.zeros(samples.shape[0], 4, *samples.shape[2:])
    else:
        mask = mask.float()
        if mask.shape[1] != 4:
            mask = mask.mean(dim=1, keepdim=True)
        known = _frames_at(1.0 - mask, samples)
        if known.shape[2] < samples.shape[2]:
            known = F.pad(known, (0, 0, 0, 0, 0, samples.shape[2] - known.shape[2]))
        known = known.expand(-1, 4, -1, -1, -1) if known.shape[1] == 1 else known
    # Wan Fun Control's mask sits between its control and image latents (Wan22FunControlToVideo's index), else first.
    index = int(options.get("concat_mask_index", 0))
    return torch.cat([image[:, :index], known, image[:, index:]], dim=1)


def wan_references(model: DiffusionModel, samples: torch.Tensor, options: dict) -> References | None:
    """One entry's latents the model takes beside the video's tokens, as the sampler's `ref_latents`, normalised as
    the model samples and fitted to the latent's size (None without any): Phantom's subject frames
    (`time_dim_concat`, [B, C, n, h, w], appended along time), or, for a Wan Fun model with a reference input, the
    first frame of the last reference latent ([B, C, h, w], ComfyUI's `reference_latent`). ComfyUI ignores a
    reference image a model has no input for; Loom refuses it, as the video would be made without it."""
    subjects, references = options.get("time_dim_concat"), options.get("reference_latents")
    if subjects is None and not references:
        return None
    config = model.family.unet_config
    plain = not (config.vace_layers or config.camera_in_dim)
    if subjects is not None:
        if not plain or config.in_dim != config.out_dim or references:
            raise ValueError(f"the prompts carry subject images (WanPhantomSubjectToVideo), and {model.source} is not "
                             "a text-to-video Wan model (or the prompts also carry a reference image): load a "
                             "Phantom-Wan model and give it WanPhantomSubjectToVideo's prompts alone")
        return References((model.latent_in(_frames_at(subjects.float(), samples)),))
    if not (plain and config.ref_conv_in_dim):
        raise ValueError(f"the prompts carry a reference image (Wan22FunControlToVideo's ref_image), and "
                         f"{model.source} has no reference image input (ref_conv): load a Wan 2.2 Fun model, or "
                         "leave ref_image unconnected")
    reference = references[-1]
    if reference.ndim != 5:
        raise ValueError(f"the prompts' reference latent {tuple(reference.shape)} is not a video latent: encode the "
                         "reference image with Wan's VAE (Wan22FunControlToVideo does)")
    return References((model.latent_in(_frames_at(reference[:, :, :1].float(), samples))[:, :, 0],))


def _entry_inputs(model: DiffusionModel, samples: torch.Tensor, options: dict, concat: bool) -> dict:
    """One entry's options with what the model takes from it: `concat` (for a model with extra channels) and
    `ref_latents` (`wan_references`)."""
    values: dict[str, Any] = {"concat": wan_concat(model, samples, options)} if concat else {}
    references = wan_references(model, samples, options)
    if references is not None:
        values["ref_latents"] = references
    return {**options, **values} if values else options


def wan_inputs(model: DiffusionModel, latent: dict, *conditionings: list) -> tuple[Any, list[list]]:
    """`nodes.sd.concat_models.model_inputs` for Wan: the default `concat` (entries with no image) and each entry's
    own, and each entry's reference latents (`wan_references`)."""
    samples = latent["samples"]
    config = model.family.unet_config
    if samples.ndim != 5:
        raise ValueError(f"{model.source} is a Wan video model; the latent {tuple(samples.shape)} is an image's: make "
                         "it with EmptyHunyuanLatentVideo, WanImageToVideo or Wan22ImageToVideoLatent")
    if samples.shape[1] not in (config.in_dim, config.out_dim):
        raise ValueError(f"the latent has {samples.shape[1]} channels and {model.source} samples {config.out_dim}: "
                         "the latent comes from another model's VAE")
    default = wan_concat(model, samples, {})
    out = [[(embedding, _entry_inputs(model, samples, options, default is not None)) for embedding, options in c]
           for c in conditionings]
    return default, out


NODES: list[Any] = [EmptyHunyuanLatentVideo, WanImageToVideo, WanFirstLastFrameToVideo, WanFunInpaintToVideo,
                    WanFunControlToVideo, Wan22ImageToVideoLatent, TrimVideoLatent, Wan22FunControlToVideo,
                    WanPhantomSubjectToVideo, WanTrackToVideo]
