"""HunyuanVideo 1.5's nodes, as ComfyUI's (comfy_extras/nodes_hunyuan.py), and what the sampler feeds the model.

Latents: the VAE's 32 channels at 1/16 of the pixels, one frame for the first picture and one per 4 after it.
Text-to-video samples EmptyHunyuanVideo15Latent's zeros; HunyuanVideo15ImageToVideo puts the start picture's latent
and a mask of the latent frames it fixes in both prompts (`concat_latent_image`, `concat_mask`), and its SigLIP
encoding (CLIPVisionEncode, `clip_vision_output`). The sampler gives the model, beside the noisy latent, that latent
(scaled as the model samples) and the mask, 1 where a frame is given (`hunyuan_video15_inputs`); zeros where a prompt
carries none. The 1080p super-resolution pass: HunyuanVideo15LatentUpscaleWithModel enlarges a finished latent
(`ldm.hunyuan_video15_upsampler`), HunyuanVideo15SuperResolution puts it (and the start picture) in the prompts, and
the SR model sees them as 66 channels, the enlarged latent noised by `noise_augmentation` from the sampling seed less
10, as ComfyUI draws it.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.clip_vision import ClipVisionOutput
from nodes.node import Node
from nodes.sd.latent import MAX_RESOLUTION, repeat_to_batch, upscale_latent
from nodes.sd.models import DiffusionModel, Vae, on_device
from nodes.sd.vae import encode, is_video_vae
from nodes.sd.wan import latent_frames
from nodes.spec import Combo, Float, Int, Output, Socket

FAMILY = "hunyuan_video15"
CHANNELS = 32
DOWNSCALE = 16
# ComfyUI seeds the SR model's noise augmentation with the sampler's seed less this (as the x4 upscaler's).
SR_SEED_OFFSET = 10
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")


def _with(conditioning: list, **values: Any) -> list:
    return [(embedding, {**options, **values}) for embedding, options in conditioning]


def _encoded(node: Node, vae: Vae, frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE frames fitted to width x height (centre-cropped, bilinear) and encoded as one video: [1, 32, t, h, w]."""
    who = type(node).__name__
    if not is_video_vae(vae):
        raise ValueError(f"{who} encodes its pictures with HunyuanVideo 1.5's video VAE; {vae.source} is an image VAE")
    fitted = upscale_latent(frames[..., :3].movedim(-1, 1).float(), width, height, "bilinear", "center").movedim(1, -1)
    latent = encode(node, vae, fitted)
    if latent.shape[1] != CHANNELS:
        raise ValueError(f"{who} takes HunyuanVideo 1.5's 32-channel VAE; {vae.source} makes {latent.shape[1]}-channel "
                         "latents")
    return latent


class EmptyHunyuanVideo15Latent(Node):
    """An empty (zero) HunyuanVideo 1.5 latent of `length` pictures: 32 channels, 1/16 of the pixels."""

    display_name = "Empty HunyuanVideo 1.5 Latent"
    category = "latent/video"
    width = Int(848, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(480, min=16, max=MAX_RESOLUTION, step=16)
    length = Int(25, min=1, max=MAX_RESOLUTION, step=4)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, length: int, batch_size: int) -> tuple[dict]:
        shape = (batch_size, CHANNELS, latent_frames(length), height // DOWNSCALE, width // DOWNSCALE)
        return ({"samples": torch.zeros(shape)},)


class HunyuanVideo15ImageToVideo(Node):
    """Image-to-video: both prompts carry the start pictures' latent and the latent frames they fix, and the
    picture's SigLIP encoding; the latent to sample is an empty one. Without either, the prompts are unchanged."""

    category = "conditioning/video_models"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE")
    width = Int(848, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(480, min=16, max=MAX_RESOLUTION, step=16)
    length = Int(33, min=1, max=MAX_RESOLUTION, step=4)
    batch_size = Int(1, min=1, max=4096)
    start_image = Socket("IMAGE", optional=True)
    clip_vision_output = Socket("CLIP_VISION_OUTPUT", optional=True)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, start_image: torch.Tensor | None = None,
                clip_vision_output: ClipVisionOutput | None = None) -> tuple[list, list, dict]:
        frames = latent_frames(length)
        shape = (batch_size, CHANNELS, frames, height // DOWNSCALE, width // DOWNSCALE)
        values: dict[str, Any] = {}
        if start_image is not None:
            start = start_image[:length]
            encoded = _encoded(self, vae, start, width, height)
            image = torch.zeros(1, *shape[1:])
            known = min(encoded.shape[2], frames)
            image[:, :, :known] = encoded[:, :, :known]
            mask = torch.ones(1, 1, *shape[2:])
            mask[:, :, :latent_frames(start.shape[0])] = 0.0
            values = {"concat_latent_image": image, "concat_mask": mask}
        if clip_vision_output is not None:
            values["clip_vision_output"] = clip_vision_output
        return _with(positive, **values), _with(negative, **values), {"samples": torch.zeros(shape)}


class HunyuanVideo15SuperResolution(Node):
    """For the 1080p super-resolution model: both prompts carry the enlarged latent (HunyuanVideo15LatentUpscaleWith
    Model's), the start picture's latent at the new size (optional) and how much noise to mix into the enlarged
    latent; the latent passes through."""

    category = "conditioning/video_models"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    vae = Socket("VAE", optional=True)
    start_image = Socket("IMAGE", optional=True)
    clip_vision_output = Socket("CLIP_VISION_OUTPUT", optional=True)
    latent = Socket("LATENT")
    noise_augmentation = Float(0.70, min=0.0, max=1.0, step=0.01, extra={"advanced": True})
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def execute(self, positive: list, negative: list, latent: dict, noise_augmentation: float, vae: Vae | None = None,
                start_image: torch.Tensor | None = None, clip_vision_output: ClipVisionOutput | None = None
                ) -> tuple[list, list, dict]:
        samples = latent["samples"]
        if samples.ndim != 5 or samples.shape[1] != CHANNELS:
            raise ValueError(f"HunyuanVideo15SuperResolution takes a HunyuanVideo 1.5 latent [B, 32, T, h, w]; got "
                             f"{tuple(samples.shape)}")
        b, c, t, h, w = samples.shape
        cond = torch.zeros(b, 2 * c + 2, t, h, w)
        cond[:, c + 1:2 * c + 1] = samples.float()
        cond[:, 2 * c + 1] = 1.0
        if start_image is not None:
            if vae is None:
                raise ValueError("HunyuanVideo15SuperResolution encodes start_image with the VAE: connect the vae")
            encoded = _encoded(self, vae, start_image, w * DOWNSCALE, h * DOWNSCALE)
            known = min(encoded.shape[2], t)
            cond[:, :c, :known] = encoded[:, :, :known]
            cond[:, c, 0] = 1.0
        values: dict[str, Any] = {"concat_latent_image": cond, "noise_augmentation": noise_augmentation}
        if clip_vision_output is not None:
            values["clip_vision_output"] = clip_vision_output
        return _with(positive, **values), _with(negative, **values), latent


class HunyuanVideo15LatentUpscaleWithModel(Node):
    """Enlarges a HunyuanVideo 1.5 latent to width x height pixels (1/16 in latent pixels; 0 keeps the aspect ratio
    from the other side, both 0 hands the latent back), then refines it with the latent upsampler
    (LatentUpscaleModelLoader's hunyuanvideo15_latent_upsampler_1080p)."""

    display_name = "Hunyuan Video 15 Latent Upscale With Model"
    category = "latent"
    model = Socket("LATENT_UPSCALE_MODEL")
    samples = Socket("LATENT")
    upscale_method = Combo(UPSCALE_METHODS, default="bilinear")
    width = Int(1280, min=0, max=16384, step=8)
    height = Int(720, min=0, max=16384, step=8)
    crop = Combo(("disabled", "center"))
    outputs = (Output("LATENT"),)

    def execute(self, model: Any, samples: dict, upscale_method: str, width: int, height: int,
                crop: str) -> tuple[dict]:
        from ldm.hunyuan_video15_upsampler import HunyuanVideo15Upsampler

        if width == 0 and height == 0:
            return (samples,)
        if not isinstance(model, HunyuanVideo15Upsampler):
            raise ValueError("HunyuanVideo15LatentUpscaleWithModel takes HunyuanVideo 1.5's latent upsampler "
                             "(hunyuanvideo15_latent_upsampler_1080p.safetensors); this is another model's")
        latent = samples["samples"]
        if latent.ndim != 5 or latent.shape[1] != CHANNELS:
            raise ValueError(f"HunyuanVideo15LatentUpscaleWithModel takes a HunyuanVideo 1.5 latent [B, 32, T, h, w]; "
                             f"got {tuple(latent.shape)}")
        rows, cols = latent.shape[-2:]
        if width == 0:
            height = max(64, height)
            width = max(64, round(cols * height / rows))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(rows * width / cols))
        else:
            width, height = max(64, width), max(64, height)
        b, c, t = latent.shape[:3]
        flat = latent.float().movedim(2, 1).reshape(b * t, c, rows, cols)
        flat = upscale_latent(flat, width // DOWNSCALE, height // DOWNSCALE, upscale_method, crop)
        resized = flat.reshape(b, t, c, *flat.shape[-2:]).movedim(1, 2)
        with torch.inference_mode():
            upsampled = on_device(self.ctx, model).resample_latent(resized)
        return ({"samples": upsampled.float().cpu()},)


# --- what the sampler feeds the model ----------------------------------------------------------------------------


def _frames_at(x: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """[B, C, T, h, w] at `samples`' height and width (frame by frame, bilinear, centre-cropped), its frames cut or
    zero-padded at the end to `samples`' and its batch cycled to `samples`'."""
    b, c, t = x.shape[:3]
    if x.shape[-2:] != samples.shape[-2:]:
        flat = x.movedim(2, 1).reshape(b * t, c, *x.shape[-2:])
        flat = upscale_latent(flat, samples.shape[-1], samples.shape[-2], "bilinear", "center")
        x = flat.reshape(b, t, c, *samples.shape[-2:]).movedim(1, 2)
    frames = samples.shape[2]
    if t < frames:
        x = torch.cat([x, x.new_zeros(b, c, frames - t, *x.shape[-2:])], dim=2)
    return repeat_to_batch(x[:, :, :frames], samples.shape[0])


def _concat(model: DiffusionModel, samples: torch.Tensor, options: dict, noise_mask: torch.Tensor | None,
            seed: int) -> torch.Tensor:
    """The channels one entry gives the model beside the latent (see the module docstring)."""
    family = model.family
    shape = (samples.shape[0], family.concat_channels, *samples.shape[2:])
    image = options.get("concat_latent_image")
    if family.super_resolution:
        if image is None:
            return torch.zeros(shape)
        if image.shape[1] != shape[1]:
            raise ValueError(f"{model.source} is HunyuanVideo 1.5's super-resolution model: prepare its prompts with "
                             "HunyuanVideo15SuperResolution")
        cond = _frames_at(image.float(), samples).clone()
        low = slice(CHANNELS + 1, 2 * CHANNELS + 1)
        strength = float(options.get("noise_augmentation", 0.0))
        if strength > 0:
            generator = torch.Generator().manual_seed(seed - SR_SEED_OFFSET)
            noise = torch.randn(cond[:, low].shape, generator=generator)
            cond[:, low] = strength * noise + min(1 - strength, 0.75) * cond[:, low]
        else:
            cond[:, low] = 0.75 * cond[:, low]
        return cond
    if image is None:
        image = torch.zeros(samples.shape[0], CHANNELS, *samples.shape[2:])
    elif image.shape[1] == 2 * CHANNELS + 2:
        raise ValueError(f"the prompts were prepared by HunyuanVideo15SuperResolution for the 1080p super-resolution "
                         f"model; {model.source} is a 480p / 720p model: sample them with "
                         "hunyuanvideo1.5_1080p_sr_distilled")
    elif image.shape[1] != CHANNELS:
        raise ValueError(f"the prompts' image latent has {image.shape[1]} channels; {model.source} takes HunyuanVideo "
                         "1.5's 32 (HunyuanVideo15ImageToVideo makes it)")
    else:
        image = model.latent_in(_frames_at(image.float(), samples))
    mask = options.get("concat_mask", noise_mask)
    if mask is None:
        mask = torch.zeros(samples.shape[0], 1, *samples.shape[2:])
    else:  # a video's mask [B, 1, T, h, w], or one picture's [B?, h, w] for every frame
        mask = mask.float()
        if mask.ndim != 5:
            mask = mask.reshape(-1, 1, 1, *mask.shape[-2:]).expand(-1, -1, samples.shape[2], -1, -1)
        mask = _frames_at(1 - mask, samples)
    return torch.cat([image, mask], dim=1)


def hunyuan_video15_inputs(model: DiffusionModel, latent: dict, seed: int, *conditionings: list
                           ) -> tuple[torch.Tensor, list[list]]:
    """`nodes.sd.concat_models.model_inputs` for HunyuanVideo 1.5: the default `concat` and each entry's own."""
    samples = latent["samples"]
    if samples.ndim != 5:
        raise ValueError(f"{model.source} is a HunyuanVideo 1.5 video model; the latent {tuple(samples.shape)} is an "
                         "image's: make it with EmptyHunyuanVideo15Latent or HunyuanVideo15ImageToVideo")
    if samples.shape[1] != CHANNELS:
        raise ValueError(f"the latent has {samples.shape[1]} channels and {model.source} samples HunyuanVideo 1.5's "
                         "32: the latent comes from another model's VAE")
    noise_mask = latent.get("noise_mask")
    default = _concat(model, samples, {}, noise_mask, seed)
    out = [[(embedding, {**options, "concat": _concat(model, samples, options, noise_mask, seed)})
            for embedding, options in c] for c in conditionings]
    return default, out


def hunyuan_video15_conditioning(conditioning: list) -> list:
    """Each entry with the model's `y`: its picture's SigLIP states (ComfyUI's clip_fea, the last hidden state), if
    the entry carries an image's encoding."""
    out = []
    for embedding, options in conditioning:
        vision = options.get("clip_vision_output")
        out.append((embedding, {**options, "y": None if vision is None else vision.last_hidden_state}))
    return out


NODES: list[Any] = [EmptyHunyuanVideo15Latent, HunyuanVideo15ImageToVideo, HunyuanVideo15SuperResolution,
                    HunyuanVideo15LatentUpscaleWithModel]
