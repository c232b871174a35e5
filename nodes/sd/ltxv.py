"""LTX-Video in the SD node set: its empty video latent, frame rate, time shift, schedule and image-to-video.

LTX-Video (`ldm.ltxv`) loads through CheckpointLoaderSimple (the all-in-one file: transformer and VAE), CLIPLoader
type "ltxv" (T5-XXL, with the prompt's attention mask) and samples with KSampler, or with SamplerCustom on
LTXVScheduler's levels as ComfyUI's examples do. Its latents are 5-D, [B, 128, frames, h, w]: 1/32 of the pixels, one
latent frame for the first picture and one for every 8 after it, normalised per channel by the VAE's statistics.

The sampler hands the model the frame rate as its `y` (`ltxv_conditioning`) and, for image-to-video, the latent's
noise mask as per-pixel noise levels, with the start image's frames kept clean (`ldm.sampling.masked_timesteps`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ldm.ltxv_files import BASE_SHIFT, MAX_SHIFT, ltxv_scheduler_sigmas, ltxv_shift
from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION, upscale_latent
from nodes.sd.models import DiffusionModel, Vae, family_refusal
from nodes.sd.vae import encode, is_video_vae
from nodes.spec import Boolean, Float, Int, Output, Socket

# Every latent frame after the first stands for this many pictures, and a latent pixel for 32x32 (LTX's VAE).
FRAMES_PER_LATENT, PIXELS_PER_LATENT = 8, 32
DEFAULT_FRAME_RATE = 25.0
# ModelSamplingLTXV and LTXVScheduler without a latent: ComfyUI's token count.
DEFAULT_TOKENS = 4096
_MODEL_NEEDS = "{node} is for LTX-Video and LTX-2 models; {{source}} is {{family}}"


def latent_frames(length: int) -> int:
    return (length - 1) // FRAMES_PER_LATENT + 1


def _tokens(latent: dict | None) -> int:
    """The latent pixels (frames x height x width) of a video latent, ComfyUI's token count for the time shift."""
    if latent is None:
        return DEFAULT_TOKENS
    samples = latent["samples"]
    if samples.ndim != 5:
        raise ValueError(f"the latent {tuple(samples.shape)} is not a video latent [B, C, frames, h, w]: make it "
                         "with EmptyLTXVLatentVideo")
    return int(samples.shape[2] * samples.shape[3] * samples.shape[4])


def _refusal(node: str, family: str | None, source: str) -> str | None:
    """Why a MODEL does not fit an LTX node; LTX-2's (ComfyUI's LTXAV, an LTXV model) fits as LTX-Video's does."""
    return None if family == "ltx2" else family_refusal(family, "ltxv", source, _MODEL_NEEDS.format(node=node))


class EmptyLTXVLatentVideo(Node):
    """An empty (zero) LTX-Video latent of `length` pictures: 128 channels, 1/32 of the pixels, one frame for the
    first picture and one for every 8 after it."""

    category = "latent/video/ltxv"
    width = Int(768, min=64, max=MAX_RESOLUTION, step=32)
    height = Int(512, min=64, max=MAX_RESOLUTION, step=32)
    length = Int(97, min=1, max=MAX_RESOLUTION, step=8)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, length: int, batch_size: int) -> tuple[dict]:
        shape = (batch_size, 128, latent_frames(length), height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT)
        return ({"samples": torch.zeros(shape)},)


class LTXVConditioning(Node):
    """Sets the frame rate the model is told (its positions in time follow it) on both prompts."""

    category = "conditioning/video_models"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    frame_rate = Float(DEFAULT_FRAME_RATE, min=0.0, max=1000.0, step=0.01)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))

    def execute(self, positive: list, negative: list, frame_rate: float) -> tuple[list, list]:
        return ([(e, {**o, "frame_rate": frame_rate}) for e, o in positive],
                [(e, {**o, "frame_rate": frame_rate}) for e, o in negative])


class ModelSamplingLTXV(Node):
    """Samples an LTX-Video model with Flux's exponential time shift, set from the latent's size: base_shift at 1024
    latent pixels, max_shift at 4096, linear between and beyond (4096 without a latent)."""

    category = "model/patch/ltxv"
    model = Socket("MODEL")
    max_shift = Float(MAX_SHIFT, min=0.0, max=100.0, step=0.01)
    base_shift = Float(BASE_SHIFT, min=0.0, max=100.0, step=0.01)
    latent = Socket("LATENT", optional=True)
    outputs = (Output("MODEL"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return _refusal("ModelSamplingLTXV", linked.get("model", {}).get("family"), "the MODEL linked")

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, max_shift: float, base_shift: float,
                latent: dict | None = None) -> tuple[DiffusionModel]:
        from ldm.sampling.flow import FlowSchedule

        refusal = _refusal("ModelSamplingLTXV", model.family.name, model.source)
        if refusal:
            raise ValueError(refusal)
        shift = ltxv_shift(_tokens(latent), max_shift, base_shift)
        return (replace(model, schedule=FlowSchedule(shift), prediction_type="flow"),)


class LTXVScheduler(Node):
    """LTX-Video's noise levels: `steps` even steps from 1 to 0 under the latent's exponential time shift, stretched
    so that the last level above 0 is `terminal`."""

    category = "sampling/custom_sampling/schedulers"
    steps = Int(20, min=1, max=10000)
    max_shift = Float(MAX_SHIFT, min=0.0, max=100.0, step=0.01)
    base_shift = Float(BASE_SHIFT, min=0.0, max=100.0, step=0.01)
    stretch = Boolean(True, tooltip="Stretch the sigmas to be in the range [terminal, 1].")
    terminal = Float(0.1, min=0.0, max=0.99, step=0.01, tooltip="The terminal value of the sigmas after stretching.")
    latent = Socket("LATENT", optional=True)
    outputs = (Output("SIGMAS"),)

    def execute(self, steps: int, max_shift: float, base_shift: float, stretch: bool, terminal: float,
                latent: dict | None = None) -> tuple[torch.Tensor]:
        return (ltxv_scheduler_sigmas(steps, max_shift, base_shift, stretch, terminal, _tokens(latent)),)


class LTXVImgToVideo(Node):
    """Image-to-video: the image's latent becomes the video's first latent frame, kept (at `strength` 1) by the
    latent's noise mask, which the model sees as that frame's lower noise level."""

    category = "conditioning/video_models"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    image = Socket("IMAGE")
    width = Int(768, min=64, max=MAX_RESOLUTION, step=32)
    height = Int(512, min=64, max=MAX_RESOLUTION, step=32)
    length = Int(97, min=9, max=MAX_RESOLUTION, step=8)
    batch_size = Int(1, min=1, max=4096)
    strength = Float(1.0, min=0.0, max=1.0)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, vae: Vae, image: torch.Tensor, width: int, height: int,
                length: int, batch_size: int, strength: float) -> tuple[list, list, dict]:
        if not is_video_vae(vae):
            raise ValueError(f"LTXVImgToVideo encodes its image with LTX-Video's VAE; {vae.source} is an image VAE")
        pixels = upscale_latent(image.movedim(-1, 1).float(), width, height, "bilinear", "center").movedim(1, -1)
        start = encode(self, vae, pixels[..., :3])
        shape = (batch_size, start.shape[1], latent_frames(length), height // PIXELS_PER_LATENT,
                 width // PIXELS_PER_LATENT)
        latent = torch.zeros(shape)
        latent[:, :, :start.shape[2]] = start[:, :, :shape[2]]
        mask = torch.ones(batch_size, 1, shape[2], 1, 1)
        mask[:, :, :start.shape[2]] = 1.0 - strength
        return positive, negative, {"samples": latent, "noise_mask": mask}


class LTXVPreprocess(Node):
    """Gives each picture the look of a video frame, as LTX-Video's start frames were in training: one H.264 encode
    and decode (libx264 at constant rate factor `img_compression`, through PyAV; 0 leaves the picture as it is),
    the picture cut to even sides first, as the codec's 4:2:0 colour needs."""

    display_name = "LTXV Preprocess"
    category = "video/preprocessors"
    image = Socket("IMAGE")
    img_compression = Int(35, min=0, max=100, tooltip="Amount of compression to apply on image.")
    outputs = (Output("IMAGE", "output_image"),)

    def execute(self, image: torch.Tensor, img_compression: int) -> tuple[torch.Tensor]:
        if img_compression == 0:
            return (image,)
        return (torch.stack([_h264_round_trip(picture, img_compression) for picture in image]),)


def _h264_round_trip(picture: torch.Tensor, crf: int) -> torch.Tensor:
    """One picture [H, W, 3] in 0..1 through a one-frame H.264 video and back (its sides cut to even numbers)."""
    import io

    import av

    height, width = picture.shape[0] // 2 * 2, picture.shape[1] // 2 * 2
    pixels = (picture[:height, :width, :3] * 255.0).byte().cpu().numpy()  # truncated, as ComfyUI's cast does
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1, options={"crf": str(crf), "preset": "veryfast"})
        stream.height, stream.width = height, width
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    buffer.seek(0)
    with av.open(buffer) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    return torch.from_numpy(decoded).to(picture.dtype) / 255.0


def ltxv_conditioning(conditioning: list) -> list:
    """Each entry with the model's `y` [1 or B, 1 + 3 K]: its frame rate (LTXVConditioning's, 25 without one), then
    its keyframe guides' coordinates flattened (LTXVAddGuide's `keyframe_idxs` [1 or B, 3, K]; none without guides),
    which reach the model as the frame rate does, per prompt (`ldm.ltxv.LTXVModel.forward`)."""
    out = []
    for embedding, options in conditioning:
        rate, guides = float(options.get("frame_rate", DEFAULT_FRAME_RATE)), options.get("keyframe_idxs")
        if guides is None:
            y = torch.tensor([[rate]])
        else:
            y = torch.cat([torch.full((guides.shape[0], 1), rate), guides.float().flatten(1)], dim=1)
        out.append((embedding, {**options, "y": y}))
    return out


NODES: list[Any] = [EmptyLTXVLatentVideo, LTXVConditioning, ModelSamplingLTXV, LTXVScheduler, LTXVImgToVideo,
                    LTXVPreprocess]
