"""Audio latents and Stable Audio Open's conditioning, under ComfyUI's names and inputs: EmptyLatentAudio,
VAEEncodeAudio, VAEDecodeAudio and VAEDecodeAudioTiled (an audio VAE: `ldm.oobleck`'s) and ConditioningStableAudio.

An audio LATENT is {"samples": [B, 64, L], "type": "audio"}, L latent frames of 2048 samples at 44.1 kHz. The model
comes from CheckpointLoaderSimple (`ldm.stable_audio_files`), the prompt's T5-base from CLIPLoader type stable_audio.
"""

from __future__ import annotations

from typing import Any

import torch

from nodes.node import Node
from nodes.sd.models import Vae, device_and_dtype, on_device
from nodes.spec import Float, Int, Output, Socket

AUDIO_LATENT_CHANNELS = 64  # Stable Audio's Oobleck latents


def audio_vae(vae: Vae, node: str) -> Any:
    """The audio VAE a VAE value holds; a clear error for an image VAE."""
    if not hasattr(vae.vae, "hop_length"):
        raise ValueError(f"{node} takes an audio VAE (Stable Audio's, from its checkpoint); {vae.source} is an image "
                         "VAE")
    return vae.vae


class EmptyLatentAudio(Node):
    """Silence to sample Stable Audio from: `seconds` of audio as latent frames, ComfyUI's rounding (an even
    count of 2048-sample frames at 44.1 kHz)."""

    category = "latent/audio"
    seconds = Float(47.6, min=1.0, max=1000.0, step=0.1)
    batch_size = Int(1, min=1, max=4096, tooltip="how many clips in the batch")
    outputs = (Output("LATENT"),)

    def execute(self, seconds: float, batch_size: int) -> tuple[dict]:
        from ldm.stable_audio import latent_length

        return ({"samples": torch.zeros(batch_size, AUDIO_LATENT_CHANNELS, latent_length(seconds)),
                 "type": "audio"},)


class VAEEncodeAudio(Node):
    """AUDIO -> an audio LATENT: resampled to the VAE's rate (44.1 kHz for Stable Audio's), then encoded (the
    posterior's mean)."""

    category = "latent/audio"
    audio = Socket("AUDIO")
    vae = Socket("VAE")
    outputs = (Output("LATENT"),)

    def execute(self, audio: dict, vae: Vae) -> tuple[dict]:
        from nodes.sd.audio import resample

        model = audio_vae(vae, "VAEEncodeAudio")
        waveform = resample(audio["waveform"], int(audio["sample_rate"]), model.sample_rate)
        if waveform.shape[1] != model.audio_channels:  # mono to stereo, or stereo to mono, as the VAE takes it
            waveform = (waveform.mean(1, keepdim=True) if model.audio_channels == 1
                        else waveform.expand(-1, model.audio_channels, -1) if waveform.shape[1] == 1 else None)
            if waveform is None:
                raise ValueError(f"VAEEncodeAudio: {audio['waveform'].shape[1]} channels of audio for a VAE of "
                                 f"{model.audio_channels}")
        device, _, _ = device_and_dtype(self.ctx)
        model = on_device(self.ctx, model)
        with torch.inference_mode():
            latents = model.encode(waveform.to(device, next(model.parameters()).dtype))
        return ({"samples": latents.float().cpu(), "type": "audio"},)


class VAEDecodeAudio(Node):
    """An audio LATENT -> AUDIO at the VAE's rate; as ComfyUI's node, loud output is scaled down to at most a fifth
    of full scale in standard deviation (each clip by its own)."""

    category = "latent/audio"
    samples = Socket("LATENT")
    vae = Socket("VAE")
    outputs = (Output("AUDIO"),)

    def execute(self, samples: dict, vae: Vae) -> tuple[dict]:
        return (decode_audio(self, samples, vae, type(self).__name__),)


def decode_audio(node: Node, samples: dict, vae: Vae, name: str, chunk: int | None = None) -> dict:
    """An audio LATENT decoded to AUDIO (`chunk` latent frames at a time: the same sound, less memory), loud
    output scaled down as ComfyUI's VAEDecodeAudio scales it."""
    model = audio_vae(vae, name)
    latents = samples["samples"]
    if latents.ndim != 3:
        raise ValueError(f"{name} takes an audio latent [B, {AUDIO_LATENT_CHANNELS}, L] (EmptyLatentAudio, "
                         f"VAEEncodeAudio); got {list(latents.shape)}")
    device, _, _ = device_and_dtype(node.ctx)
    model = on_device(node.ctx, model)
    with torch.inference_mode():
        audio = model.decode(latents.to(device, next(model.parameters()).dtype), chunk=chunk).float().cpu()
    std = audio.std(dim=(1, 2), keepdim=True) * 5.0
    audio = audio / std.clamp(min=1.0)
    return {"waveform": audio, "sample_rate": model.sample_rate}


class VAEDecodeAudioTiled(Node):
    """VAEDecodeAudio `tile_size` latent frames at a time, for long clips on little memory. Loom's Oobleck decoder
    gives each piece the context it needs, so the sound is the same as decoded whole; `overlap` is accepted for
    ComfyUI's workflows (ComfyUI blends overlapping tiles)."""

    display_name = "VAE Decode Audio (Tiled)"
    category = "latent/audio"
    samples = Socket("LATENT")
    vae = Socket("VAE")
    tile_size = Int(512, min=32, max=8192, step=8, tooltip="latent frames a piece (2048 samples each)")
    overlap = Int(64, min=0, max=1024, step=8, tooltip="accepted for ComfyUI's workflows; the pieces join exactly")
    outputs = (Output("AUDIO"),)

    def execute(self, samples: dict, vae: Vae, tile_size: int, overlap: int) -> tuple[dict]:
        return (decode_audio(self, samples, vae, type(self).__name__, chunk=tile_size),)


class ConditioningStableAudio(Node):
    """The part of the clip Stable Audio is asked for: it starts `seconds_start` into a piece `seconds_total` long
    (the model was trained on clips cut from longer pieces); both prompts get the same."""

    category = "conditioning"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    seconds_start = Float(0.0, min=0.0, max=1000.0, step=0.1)
    seconds_total = Float(47.0, min=0.0, max=1000.0, step=0.1)
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {i: linked[name] for i, name in enumerate(("positive", "negative")) if linked.get(name)}

    def execute(self, positive: list, negative: list, seconds_start: float,
                seconds_total: float) -> tuple[list, list]:
        values = {"seconds_start": torch.tensor([float(seconds_start)]),
                  "seconds_total": torch.tensor([float(seconds_total)])}
        return ([(emb, {**opts, **values}) for emb, opts in positive],
                [(emb, {**opts, **values}) for emb, opts in negative])


NODES = [EmptyLatentAudio, VAEEncodeAudio, VAEDecodeAudio, VAEDecodeAudioTiled, ConditioningStableAudio]
