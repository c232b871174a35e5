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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ldm.clip_vision import ClipVisionOutput
from ldm.wan_files import WAN21_MEAN, WAN22_MEAN
from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION, repeat_to_batch, upscale_latent
from nodes.sd.models import DiffusionModel, Vae
from nodes.sd.vae import encode, is_video_vae
from nodes.spec import Int, Output, Socket

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
    normalised as the model samples; zeros where the entry carries none, as in ComfyUI."""
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
    return torch.cat([known, image], dim=1)


def wan_inputs(model: DiffusionModel, latent: dict, *conditionings: list) -> tuple[Any, list[list]]:
    """`nodes.sd.concat_models.model_inputs` for Wan: the default `concat` (entries with no image) and each entry's
    own."""
    samples = latent["samples"]
    config = model.family.unet_config
    if samples.ndim != 5:
        raise ValueError(f"{model.source} is a Wan video model; the latent {tuple(samples.shape)} is an image's: make "
                         "it with EmptyHunyuanLatentVideo, WanImageToVideo or Wan22ImageToVideoLatent")
    if samples.shape[1] not in (config.in_dim, config.out_dim):
        raise ValueError(f"the latent has {samples.shape[1]} channels and {model.source} samples {config.out_dim}: "
                         "the latent comes from another model's VAE")
    default = wan_concat(model, samples, {})
    if default is None:
        return None, list(conditionings)
    out = [[(embedding, {**options, "concat": wan_concat(model, samples, options)}) for embedding, options in c]
           for c in conditionings]
    return default, out


NODES: list[Any] = [EmptyHunyuanLatentVideo, WanImageToVideo, WanFirstLastFrameToVideo, WanFunInpaintToVideo,
                    WanFunControlToVideo, Wan22ImageToVideoLatent, TrimVideoLatent]
