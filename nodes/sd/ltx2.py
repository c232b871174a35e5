"""LTX-2 (Lightricks' audio-video model) in the SD node set, under ComfyUI's names and inputs.

The all-in-one checkpoint (`ldm.ltx2_files`) feeds three loaders: CheckpointLoaderSimple (the transformer and the
video VAE), LTXVAudioVAELoader (the audio VAE and vocoder) and LTXAVTextEncoderLoader (Gemma 3 12B from its own
file with the checkpoint's text projection). A video latent (EmptyLTXVLatentVideo, 128 channels, 1/32 of the pixels,
one frame for the first picture and one for every 8 after it) and an audio latent (LTXVEmptyLatentAudio, 8 x 16, 25
frames a second) are joined by LTXVConcatAVLatent and sampled together by any sampler (`ldm.sampling.av_latent`);
LTXVSeparateAVLatent parts them for VAEDecode and LTXVAudioVAEDecode. The two-stage templates upscale the video
latent with LTXVLatentUpsampler between the stages.
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.sampling.av_latent import AUDIO_MASK, AUDIO_SAMPLES
from nodes.node import Node
from nodes.sd.latent import upscale_latent
from nodes.sd.loaders import model_file, model_path, shared_model
from nodes.sd.models import Clip, DiffusionModel, Vae, device_and_dtype, file_fingerprint, load_device, on_device
from nodes.sd.vae import encode, is_video_vae
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket

_DEFAULT_FRAME_RATE = 25.0


def _guide_attention(entries: list | None, guides: torch.Tensor | None) -> torch.Tensor | None:
    """[1, K, 2]: each keyframe guide token's guide (0, 1, ... in the order they were appended) and attention weight
    from LTXVAddGuide's `guide_attention_entries` (`nodes.sd.ltxv_guides.guide_token_weights`: the strength, times
    the pixel mask's), for the transformer's bias between the video and its guides (`ldm.ltx2.guide_attention_bias`);
    None where there is nothing to weigh (no guides, or every weight 1), as ComfyUI builds no mask then."""
    from nodes.sd.ltxv_guides import guide_token_weights

    if not entries or guides is None:  # ComfyUI reads the entries only with the guides' coordinates
        return None
    counts = [int(entry["pre_filter_count"]) for entry in entries]
    if sum(counts) != guides.shape[2]:
        raise ValueError(f"the guide attention entries count {sum(counts)} tokens, the prompt's keyframe_idxs "
                         f"{guides.shape[2]}: give the conditioning LTXVAddGuide made")
    weights = torch.cat([guide_token_weights(entry, count) for entry, count in zip(entries, counts, strict=True)])
    if bool((weights == 1).all()):
        return None
    numbers = torch.arange(len(counts), dtype=torch.float32).repeat_interleave(torch.tensor(counts))
    return torch.stack([numbers, weights], dim=-1)[None]


def ltx2_conditioning(conditioning: list, model: DiffusionModel) -> list:
    """Each prompt as the LTX-2 model takes it (ComfyUI's LTXAV.extra_conds, once per prompt before sampling): the
    text encoder's features through the model's connectors, the video context as the entry's embedding and the
    audio context as `ltx2_audio_context`; the frame rate and keyframe guides' spans as its `y`; the guide tokens'
    attention weights as `ltx2_guide_attention` where one is not 1."""
    unet = model.unet
    device = next(unet.parameters()).device
    out = []
    for embedding, options in conditioning:
        if embedding.shape[-1] != unet.config.context_dim:
            raise ValueError(f"a prompt of width {embedding.shape[-1]} for an LTX-2 model, which takes Gemma 3's "
                             f"features of width {unet.config.context_dim}: encode it with the CLIP of "
                             "LTXAVTextEncoderLoader")
        mask = options.get("attention_mask")
        video, audio, mask = unet.model.preprocess_text_embeds(
            embedding.to(device), None if mask is None else mask.to(device))
        rate = float(options.get("frame_rate", _DEFAULT_FRAME_RATE))
        guides = options.get("keyframe_idxs")
        y = torch.tensor([[rate]]) if guides is None else torch.cat(
            [torch.full((guides.shape[0], 1), rate), guides.float().flatten(1)], dim=1)
        entry = {k: v for k, v in options.items() if k != "attention_mask"}
        entry |= {"ltx2_audio_context": audio, "y": y} | ({} if mask is None else {"attention_mask": mask})
        attention = _guide_attention(options.get("guide_attention_entries"), guides)
        if attention is not None:
            entry["ltx2_guide_attention"] = attention
        out.append((video, entry))
    return out


def _audio_codec(vae: Vae, node: str) -> Any:
    from ldm.ltx2_files import LTX2AudioCodec

    if not isinstance(vae.vae, LTX2AudioCodec):
        raise ValueError(f"{node} takes LTX-2's audio VAE (LTXVAudioVAELoader); {vae.source} is another VAE")
    return vae.vae


class LTXVAudioVAELoader(Node):
    """Loads LTX-2's audio VAE and vocoder from an LTX-2 checkpoint (models/checkpoints), the rest left on disk."""

    display_name = "LTXV Audio VAE Loader"
    category = "audio"
    ckpt_name = model_file("checkpoints")
    outputs = (Output("VAE", "Audio VAE"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        from nodes.folders import get_paths

        return file_fingerprint(get_paths().find_model("checkpoints", str(inputs.get("ckpt_name", ""))))

    def execute(self, ckpt_name: str) -> tuple[Vae]:
        from ldm.ltx2_files import load_ltx2_audio_codec

        path = model_path("checkpoints", ckpt_name)
        _, _, dtype = device_and_dtype(self.ctx)
        device = load_device(self.ctx)
        key = ("ltx2_audio", str(path), str(file_fingerprint(path)), str(device), str(dtype))
        return (Vae(shared_model(self, key, lambda: load_ltx2_audio_codec(path, device, dtype)), ckpt_name),)


class LTXAVTextEncoderLoader(Node):
    """Loads LTX-2's text encoder: Gemma 3 12B (models/text_encoders) with the text projection of an LTX-2
    checkpoint (models/checkpoints); device "cpu" keeps it on the CPU in float32."""

    display_name = "LTXV Audio Text Encoder Loader"
    category = "advanced/loaders"
    text_encoder = model_file("text_encoders")
    ckpt_name = model_file("checkpoints")
    device = Combo(["default", "cpu"])
    outputs = (Output("CLIP"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        from nodes.folders import get_paths

        return [file_fingerprint(get_paths().find_model(kind, str(inputs.get(name, ""))))
                for kind, name in (("text_encoders", "text_encoder"), ("checkpoints", "ckpt_name"))]

    def execute(self, text_encoder: str, ckpt_name: str, device: str = "default") -> tuple[Clip]:
        from ldm.ltx2_text import load_ltx2_text_encoder
        from ldm.quant import quantize_
        from nodes.sd.loaders import engine_weight_dtypes

        gemma, checkpoint = model_path("text_encoders", text_encoder), model_path("checkpoints", ckpt_name)
        pinned = device == "cpu"
        target, dtype = (torch.device("cpu"), torch.float32) if pinned else (load_device(self.ctx),
                                                                              device_and_dtype(self.ctx)[1])
        weights = engine_weight_dtypes(self)[1]

        def load() -> Any:
            loaded = load_ltx2_text_encoder(gemma, checkpoint, device=target, dtype=dtype)
            loaded.encoder.pinned_to_cpu = pinned
            quantize_(loaded.encoder, weights)
            return loaded

        key = ("ltx2_text", str(gemma), str(file_fingerprint(gemma)), str(checkpoint),
               str(file_fingerprint(checkpoint)), str(target), str(dtype), weights, pinned)
        return (Clip(shared_model(self, key, load).encoder, "ltx2", f"{text_encoder} + {ckpt_name}"),)


class LTXVEmptyLatentAudio(Node):
    """Silence for LTX-2 to sample: the audio latent that lasts as long as `frames_number` video frames at
    `frame_rate` (25 latent frames a second, rounded up)."""

    display_name = "LTXV Empty Latent Audio"
    category = "latent/audio"
    frames_number = Int(97, min=1, max=1000, tooltip="Number of frames.")
    frame_rate = Int(25, min=1, max=1000, tooltip="Number of frames per second.")
    batch_size = Int(1, min=1, max=4096, tooltip="The number of latent audio samples in the batch.")
    audio_vae = Socket("VAE", tooltip="The Audio VAE model to get configuration from.")
    outputs = (Output("LATENT", "Latent"),)

    def execute(self, frames_number: int, frame_rate: int, batch_size: int, audio_vae: Vae) -> tuple[dict]:
        codec = _audio_codec(audio_vae, "LTXVEmptyLatentAudio")
        return ({"samples": torch.zeros(codec.latent_shape(frames_number, frame_rate, batch_size)),
                 "type": "audio"},)


class LTXVAudioVAEEncode(Node):
    """AUDIO -> an LTX-2 audio latent (resampled to 16 kHz, stereo, log-mel, encoded, normalised)."""

    display_name = "LTXV Audio VAE Encode"
    category = "audio"
    audio = Socket("AUDIO", tooltip="The audio to be encoded.")
    audio_vae = Socket("VAE", tooltip="The Audio VAE model to use for encoding.")
    outputs = (Output("LATENT", "Audio Latent"),)

    def execute(self, audio: dict, audio_vae: Vae) -> tuple[dict]:
        codec = _audio_codec(audio_vae, "LTXVAudioVAEEncode")
        device, _, _ = device_and_dtype(self.ctx)
        codec = on_device(self.ctx, codec)
        with torch.inference_mode():
            latents = codec.encode(audio["waveform"].to(device), int(audio["sample_rate"]))
        return ({"samples": latents.float().cpu(), "type": "audio"},)


class LTXVAudioVAEDecode(Node):
    """An LTX-2 audio latent (or an audio-video latent's audio) -> AUDIO at the vocoder's rate (24 kHz for LTX-2,
    48 kHz for LTX-2.3)."""

    display_name = "LTXV Audio VAE Decode"
    category = "audio"
    samples = Socket("LATENT", tooltip="The latent to be decoded.")
    audio_vae = Socket("VAE", tooltip="The Audio VAE model used for decoding the latent.")
    outputs = (Output("AUDIO", "Audio"),)

    def execute(self, samples: dict, audio_vae: Vae) -> tuple[dict]:
        codec = _audio_codec(audio_vae, "LTXVAudioVAEDecode")
        latents = samples.get(AUDIO_SAMPLES, samples["samples"])  # an audio-video latent: its audio, as ComfyUI
        if latents.ndim != 4:
            raise ValueError(f"LTXVAudioVAEDecode takes an audio latent [B, 8, T, 16]; got {list(latents.shape)}")
        device, _, _ = device_and_dtype(self.ctx)
        codec = on_device(self.ctx, codec)
        with torch.inference_mode():
            waveform = codec.decode(latents.to(device)).float().cpu()
        return ({"waveform": waveform, "sample_rate": codec.sample_rate},)


class LTXVConcatAVLatent(Node):
    """Joins a video latent and an audio latent into one that LTX-2 samples together; their noise masks go with
    them (a part without one is denoised whole)."""

    display_name = "LTXV Concat AV Latent"
    category = "latent/video/ltxv"
    video_latent = Socket("LATENT")
    audio_latent = Socket("LATENT")
    outputs = (Output("LATENT", "latent"),)

    def execute(self, video_latent: dict, audio_latent: dict) -> tuple[dict]:
        video, audio = video_latent["samples"], audio_latent["samples"]
        if video.ndim != 5 or audio.ndim != 4:
            raise ValueError(f"LTXVConcatAVLatent joins a video latent [B, C, F, h, w] and an audio latent "
                             f"[B, 8, T, 16]; got {list(video.shape)} and {list(audio.shape)}")
        out = {k: v for k, v in video_latent.items() if k not in (AUDIO_SAMPLES, AUDIO_MASK)}
        out[AUDIO_SAMPLES] = audio
        if audio_latent.get("noise_mask") is not None:
            out[AUDIO_MASK] = audio_latent["noise_mask"]
        return (out,)


class LTXVSeparateAVLatent(Node):
    """Parts an audio-video latent into its video and audio latents, each with its noise mask."""

    display_name = "LTXV Separate AV Latent"
    category = "latent/video/ltxv"
    av_latent = Socket("LATENT")
    outputs = (Output("LATENT", "video_latent"), Output("LATENT", "audio_latent"))

    def execute(self, av_latent: dict) -> tuple[dict, dict]:
        if av_latent.get(AUDIO_SAMPLES) is None:
            raise ValueError("LTXVSeparateAVLatent takes an audio-video latent (LTXVConcatAVLatent's, or an LTX-2 "
                             "sampler's); this one has no audio")
        video = {k: v for k, v in av_latent.items() if k not in (AUDIO_SAMPLES, AUDIO_MASK)}
        audio = {"samples": av_latent[AUDIO_SAMPLES], "type": "audio"}
        if av_latent.get(AUDIO_MASK) is not None:
            audio["noise_mask"] = av_latent[AUDIO_MASK]
        return video, audio


class LTXVImgToVideoInplace(Node):
    """Puts an image's latent in as a video latent's first frames, kept (at `strength` 1) by the latent's noise
    mask, which LTX models see as those frames' lower noise level; `bypass` returns the latent as it is."""

    display_name = "LTXV Img To Video Inplace"
    category = "conditioning/video_models"
    vae = Socket("VAE")
    image = Socket("IMAGE")
    latent = Socket("LATENT")
    strength = Float(1.0, min=0.0, max=1.0)
    bypass = Boolean(False, tooltip="Bypass the conditioning.")
    outputs = (Output("LATENT", "latent"),)

    def execute(self, vae: Vae, image: torch.Tensor, latent: dict, strength: float, bypass: bool) -> tuple[dict]:
        if bypass:
            return (latent,)
        if not is_video_vae(vae):
            raise ValueError(f"LTXVImgToVideoInplace encodes its image with LTX's video VAE; {vae.source} is not one")
        samples = latent["samples"]
        if samples.ndim != 5 or latent.get(AUDIO_SAMPLES) is not None:
            got = "an audio-video latent" if samples.ndim == 5 else list(samples.shape)
            raise ValueError(f"LTXVImgToVideoInplace takes a video latent [B, C, F, h, w] (apply it before "
                             f"LTXVConcatAVLatent); got {got}")
        factor = vae.vae.spatial_compression
        height, width = samples.shape[3] * factor, samples.shape[4] * factor
        pixels = image[..., :3]
        if pixels.shape[1:3] != (height, width):
            pixels = upscale_latent(pixels.movedim(-1, 1).float(), width, height, "bilinear", "center").movedim(1, -1)
        start = encode(self, vae, pixels)
        frames = min(start.shape[2], samples.shape[2])
        samples = samples.clone()
        samples[:, :, :frames] = start[:, :, :frames].to(samples)
        mask = latent.get("noise_mask")
        mask = torch.ones(samples.shape[0], 1, samples.shape[2], 1, 1) if mask is None else mask.clone()
        mask[:, :, :frames] = 1.0 - strength
        return ({"samples": samples, "noise_mask": mask},)


class LatentUpscaleModelLoader(Node):
    """Loads a latent upscale model from models/latent_upscale_models: Lightricks' LTX-2 spatial upscaler
    (ltx-2-spatial-upscaler-x2-1.0.safetensors) for LTXVLatentUpsampler, or HunyuanVideo 1.5's 1080p latent upsampler
    (hunyuanvideo15_latent_upsampler_1080p.safetensors) for HunyuanVideo15LatentUpscaleWithModel."""

    display_name = "Load Latent Upscale Model"
    category = "loaders"
    model_name = model_file("latent_upscale_models")
    outputs = (Output("LATENT_UPSCALE_MODEL"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        from nodes.folders import get_paths

        return file_fingerprint(get_paths().find_model("latent_upscale_models", str(inputs.get("model_name", ""))))

    def execute(self, model_name: str) -> tuple[Any]:
        from ldm.hunyuan_video15_upsampler import load_hunyuan_video15_upsampler, peek_hunyuan_video15_upsampler
        from ldm.ltx2_upsampler import load_latent_upsampler

        path = model_path("latent_upscale_models", model_name)
        _, _, dtype = device_and_dtype(self.ctx)
        device = load_device(self.ctx)
        load = load_hunyuan_video15_upsampler if peek_hunyuan_video15_upsampler(path) else load_latent_upsampler
        key = ("latent_upscale", str(path), str(file_fingerprint(path)), str(device), str(dtype))
        return (shared_model(self, key, lambda: load(path, device, dtype)),)


class LTXVLatentUpsampler(Node):
    """Upscales an LTX video latent with a latent upscale model (trained on the VAE's raw latents, which Loom's
    LATENT holds); the noise mask goes, as ComfyUI's does. `vae` is the video VAE, as ComfyUI asks for it."""

    display_name = "LTXV Latent Upsampler"
    category = "latent/video"
    samples = Socket("LATENT")
    upscale_model = Socket("LATENT_UPSCALE_MODEL")
    vae = Socket("VAE")
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, upscale_model: Any, vae: Vae) -> tuple[dict]:
        from ldm.ltx2_upsampler import LatentUpsampler, upsample_latent

        if not isinstance(upscale_model, LatentUpsampler):
            raise ValueError("LTXVLatentUpsampler takes LTX-2's latent upscale model; this one is another model's "
                             "(HunyuanVideo 1.5's goes to HunyuanVideo15LatentUpscaleWithModel)")
        latent = samples["samples"]
        if latent.ndim != 5:
            raise ValueError(f"LTXVLatentUpsampler takes a video latent [B, 128, F, h, w]; got {list(latent.shape)}")
        if not hasattr(vae.vae, "per_channel_statistics"):
            raise ValueError(f"LTXVLatentUpsampler needs the LTX video VAE of the latent; {vae.source} is not one")
        model = on_device(self.ctx, upscale_model)
        with torch.inference_mode():  # on the VAE's raw latents, which Loom's LATENT holds
            up = upsample_latent(model, latent)
        out = {k: v for k, v in samples.items() if k != "noise_mask"}
        return ({**out, "samples": up.float().cpu()},)


NODES: list[Any] = [LTXVAudioVAELoader, LTXAVTextEncoderLoader, LTXVEmptyLatentAudio, LTXVAudioVAEEncode,
                    LTXVAudioVAEDecode, LTXVConcatAVLatent, LTXVSeparateAVLatent, LTXVImgToVideoInplace,
                    LatentUpscaleModelLoader, LTXVLatentUpsampler]
