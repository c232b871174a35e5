"""ACE-Step 1.5's nodes under ComfyUI's names and inputs: TextEncodeAceStepAudio1.5 (the song's description, lyrics
and metadata; the 5 Hz language model writes the audio codes that lead the music), EmptyAceStep1.5LatentAudio and
ReferenceTimbreAudio.

The model comes from UNETLoader (`ldm.ace_step15_files`), the text encoders from DualCLIPLoader type ace
(`ldm.ace_step15_text`), the VAE (48 kHz Oobleck) from VAELoader; VAEDecodeAudio turns the latents into sound. An
ACE-Step 1.5 LATENT is {"samples": [B, 64, L], "type": "audio"}, 25 latent frames a second.
"""

from __future__ import annotations

from typing import Any

import torch

from nodes.node import Node
from nodes.sd.conditioning import _encoded
from nodes.sd.models import Clip, clip_family_facts, family_refusal
from nodes.spec import Boolean, Combo, Float, Int, Output, Socket, String

FAMILY = "ace_step15"
_CLIP_NEEDS = ("TextEncodeAceStepAudio1.5 needs ACE-Step 1.5's text encoders (DualCLIPLoader type ace: "
               "qwen_0.6b_ace15.safetensors with qwen_1.7b_ace15.safetensors or qwen_4b_ace15.safetensors); {source} "
               "is {family}")
TIME_SIGNATURES = ("2", "3", "4", "6")
LANGUAGES = ("en", "ja", "zh", "es", "de", "fr", "pt", "ru", "it", "nl", "pl", "tr", "vi", "cs", "fa", "id", "ko", "uk",
             "hu", "ar", "sv", "ro", "el")
_ROOTS = ("C", "C#", "Db", "D", "D#", "Eb", "E", "F", "F#", "Gb", "G", "G#", "Ab", "A", "A#", "Bb", "B")
KEY_SCALES = tuple(f"{root} {quality}" for quality in ("major", "minor") for root in _ROOTS)
_ADVANCED = {"advanced": True}


class TextEncodeAceStepAudio15(Node):
    """A song for ACE-Step 1.5: its tags (style, instruments, mood), lyrics and metadata. With generate_audio_codes
    the 5 Hz language model first writes the song's audio codes (5 a second of `duration`, sampled with `seed`,
    its own classifier-free guidance and filters), which lead the diffusion model; slow, but the music follows them.
    Turn it off when a reference audio leads instead (ReferenceTimbreAudio)."""

    name = "TextEncodeAceStepAudio1.5"
    category = "conditioning"
    clip = Socket("CLIP")
    tags = String("", multiline=True, tooltip="the music: genre, instruments, mood")
    lyrics = String("", multiline=True,
                    tooltip="the words sung, with [verse] / [chorus] section marks; empty for instrumental music")
    seed = Int(0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
               tooltip="the seed of the language model's sampling")
    bpm = Int(120, min=10, max=300, tooltip="beats per minute")
    duration = Float(120.0, min=0.0, max=2000.0, step=0.1, tooltip="seconds; the codes written cover it")
    timesignature = Combo(TIME_SIGNATURES, tooltip="beats per bar")
    language = Combo(LANGUAGES, tooltip="the lyrics' language")
    keyscale = Combo(KEY_SCALES)
    generate_audio_codes = Boolean(True, extra=_ADVANCED, tooltip="run the language model that writes the audio "
                                   "codes: slow, better music; off when a reference audio leads")
    cfg_scale = Float(2.0, min=0.0, max=100.0, step=0.1, extra=_ADVANCED,
                      tooltip="the language model's classifier-free guidance")
    temperature = Float(0.85, min=0.0, max=2.0, step=0.01, extra=_ADVANCED, tooltip="0: always the likeliest code")
    top_p = Float(0.9, min=0.0, max=2000.0, step=0.01, extra=_ADVANCED)
    top_k = Int(0, min=0, max=100, extra=_ADVANCED, tooltip="0: no top-k cut")
    min_p = Float(0.0, min=0.0, max=1.0, step=0.001, extra=_ADVANCED)
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("clip", {}).get("family"), FAMILY, "the CLIP linked", _CLIP_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return clip_family_facts(linked)

    def execute(self, clip: Clip, tags: str, lyrics: str, seed: int, bpm: int, duration: float, timesignature: str,
                language: str, keyscale: str, generate_audio_codes: bool, cfg_scale: float, temperature: float,
                top_p: float, top_k: int, min_p: float) -> tuple[list]:
        refusal = family_refusal(clip.family_name, FAMILY, clip.source, _CLIP_NEEDS)
        if refusal:
            raise ValueError(refusal)
        song = {"lyrics": lyrics, "seed": seed, "bpm": bpm, "duration": duration, "timesignature": int(timesignature),
                "language": language, "keyscale": keyscale, "generate_audio_codes": generate_audio_codes,
                "cfg_scale": cfg_scale, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p}
        return (_encoded(self, clip, tags, lambda encoding: {}, song=song),)


class EmptyAceStep15LatentAudio(Node):
    """Silence to sample ACE-Step 1.5 from: `seconds` of 48 kHz audio as latent frames (25 a second)."""

    name = "EmptyAceStep1.5LatentAudio"
    display_name = "Empty Ace Step 1.5 Latent Audio"
    category = "latent/audio"
    seconds = Float(120.0, min=1.0, max=1000.0, step=0.01)
    batch_size = Int(1, min=1, max=4096, tooltip="how many songs in the batch")
    outputs = (Output("LATENT"),)

    def execute(self, seconds: float, batch_size: int) -> tuple[dict]:
        from ldm.ace_step15_files import ACE_LATENT, latent_length

        return ({"samples": torch.zeros(batch_size, ACE_LATENT.z_channels, latent_length(seconds)),
                 "type": "audio"},)


class ReferenceTimbreAudio(Node):
    """ACE-Step 1.5 covers a reference: its latents (VAEEncodeAudio with ACE-Step's VAE) become the timbre
    reference and lead the music in place of the language model's audio codes (the last reference given wins, as
    in ComfyUI). Without a latent the conditioning passes unchanged."""

    display_name = "Reference Audio"
    category = "advanced/conditioning/audio"
    conditioning = Socket("CONDITIONING")
    latent = Socket("LATENT", optional=True)
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked["conditioning"]} if linked.get("conditioning") else {}

    def execute(self, conditioning: list, latent: dict | None = None) -> tuple[list]:
        if latent is None:
            return (conditioning,)
        samples = latent["samples"]
        if samples.ndim != 3:
            raise ValueError(f"ReferenceTimbreAudio takes an audio latent [B, 64, L] (VAEEncodeAudio); got "
                             f"{list(samples.shape)}")
        return ([(emb, {**opts, "reference_audio_timbre_latents": samples}) for emb, opts in conditioning],)


NODES = [TextEncodeAceStepAudio15, EmptyAceStep15LatentAudio, ReferenceTimbreAudio]
