"""ACE-Step 1.5 as a Loom model family, from the files ComfyUI users load: the diffusion model through UNETLoader
(Comfy-Org's acestep_v1.5_turbo.safetensors and the other 1.5 models, XL included: ACE-Step's own names, bare or
under `model.diffusion_model.`), its text encoders through DualCLIPLoader type "ace" (`ldm.ace_step15_text`) and its
VAE, 48 kHz Oobleck, through VAELoader (`ldm.oobleck`); or all three from the all-in-one checkpoint through
CheckpointLoaderSimple (ace_step_1.5_turbo_aio.safetensors: the model under `model.diffusion_model.`, the VAE under
`vae.` in stable-audio-tools' names, Qwen3-0.6B under `text_encoders.qwen3_06b.transformer.` and the language model
under `text_encoders.qwen3_2b.transformer.` (1.7B) or `text_encoders.qwen3_4b.transformer.`, as ComfyUI's ACEStep15
reads it).

Sampling is ComfyUI's for this model: rectified flow on SD3's shifted levels (shift 3, ModelSamplingAuraFlow's 3 in
the template), latents [B, 64, L] at 48 kHz / 1920 (25 a second), unscaled. The prompt's encodings ride in its
conditioning (`ldm.sampling.cond_jobs.MODEL_INPUTS`): the caption's states as the context, the lyrics' token
embeddings (`conditioning_lyrics`), the 5 Hz audio codes the language model wrote (`audio_codes`) and a timbre
reference (`reference_audio_timbre_latents`, ReferenceTimbreAudio's). `AceStep15Denoiser` turns them into the
model's inputs as ComfyUI's ACEStep15.extra_conds does:

- no reference: ACE-Step's silence latent is the timbre reference; with audio codes the model is led by them (the
  detokenized codes are its context latents), without them by the silence itself (`is_covers` False);
- a reference latent: it is the timbre reference (cut to the latent's length, silence after it) and the model covers
  it (its own tokenized and detokenized reference leads), the codes unused;
- a prompt whose states are all zero (ConditioningZeroOut's negative) is the unconditional branch: every encoder
  state becomes the model's learned null embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.ace_step15 import WINDOW_KEY, AceStep15Config, AceStep15Model, config_from_state_dict, silence_latent
from ldm.checkpoint import UNET_PREFIX, CheckpointError, StateDict
from ldm.flow_family import FlowFamily
from ldm.single_file_family import SingleFileFamily
from ldm.vae import VAEConfig

ACE_STEP15_SHIFT = 3.0  # ComfyUI's sampling shift for ACE-Step 1.5 (and the template's ModelSamplingAuraFlow)
# The latent space as the families' vae_config names it (for the sampler's empty-latent fitting): unscaled.
ACE_LATENT = VAEConfig(z_channels=64, scaling_factor=1.0)
SAMPLE_RATE = 48000
LATENT_HOP = 1920  # audio samples a latent frame: 25 frames a second
# Probe keys, under a prefix: the decoder's patch embedding and the audio-code detokenizer, ACE-Step 1.5's own.
_PROBES = ("decoder.proj_in.1.weight", "detokenizer.embed_tokens.weight", "null_condition_emb")


@dataclass(frozen=True)
class AceStep15Family(FlowFamily):
    """ACE-Step 1.5's family: its model's config, flow on SD3's levels shifted by 3."""

    unet_config: AceStep15Config
    vae_config: VAEConfig = ACE_LATENT
    name: str = "ace_step15"
    latent_shift: float = 0.0
    prompt_hint: str = ("encode it with TextEncodeAceStepAudio1.5 on the CLIP of DualCLIPLoader type ace "
                        "(qwen_0.6b_ace15.safetensors and qwen_1.7b_ace15.safetensors or qwen_4b_ace15.safetensors)")

    @property
    def latent_channels(self) -> int:
        return self.unet_config.audio_channels

    @property
    def shift(self) -> float:
        return ACE_STEP15_SHIFT


def latent_length(seconds: float) -> int:
    """EmptyAceStep1.5LatentAudio's latent frames for `seconds` of audio (ComfyUI's rounding)."""
    return round(seconds * SAMPLE_RATE / LATENT_HOP)


class AceStep15Denoiser(nn.Module):
    """The ACE-Step 1.5 model called as Loom's denoiser calls a model: the caption's states in `context`, the rest
    of the prompt's encodings by keyword (see the module docstring for how they become the model's inputs)."""

    def __init__(self, model: AceStep15Model):
        super().__init__()
        self.model = model

    @property
    def config(self) -> AceStep15Config:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.null_condition_emb.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                lyric_embed: Tensor | None = None, audio_codes: Tensor | None = None,
                refer_audio: Tensor | None = None) -> Tensor:
        """The flow velocity for latents `x` [B, 64, L] at levels `timesteps` (sigma, 0..1), in x's dtype (the model
        computes in its own); `y` is unused."""
        batch, length, dtype = x.shape[0], x.shape[-1], self.dtype
        null = context.flatten(1).abs().amax(1) == 0  # per item: ConditioningZeroOut's prompts
        context = context.to(dtype)
        if lyric_embed is None:  # a prompt encoded by another node: no lyrics, as an empty lyric sheet's zeros
            lyric_embed = context.new_zeros(batch, 1, context.shape[-1])
        silence = silence_latent(length, device=x.device, dtype=dtype).expand(batch, -1, -1)
        if refer_audio is not None:  # ReferenceTimbreAudio: cover the reference, its timbre too
            reference = refer_audio[..., :length].to(dtype).expand(batch, -1, -1)
            reference = torch.cat([reference, silence[..., reference.shape[-1]:]], dim=-1)
            is_covers, audio_codes = True, None
        else:
            reference, is_covers = silence, (None if audio_codes is not None else False)
        timesteps = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(-1)
        out = self.model(x.to(dtype), timesteps, context, lyric_embed.to(dtype), reference, audio_codes=audio_codes,
                         is_covers=is_covers, null_condition=null)
        return out.to(x.dtype)


def _probe(sd: StateDict, prefix: str) -> bool:
    return all(prefix + key in sd for key in _PROBES)


def _family(weights: StateDict, window: tuple[int, ...] | None, prefix: str) -> AceStep15Family:
    bare = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    return AceStep15Family(config_from_state_dict(bare, *(window or ())))


# The family of ACE-Step 1.5 weights (the sliding window from Loom's metadata if saved: the weights cannot tell it);
# whether a file holds them; a file's family from its header alone.
FILES = SingleFileFamily("an ACE-Step 1.5 diffusion model", _probe, _family, WINDOW_KEY)
ace_step15_family, is_ace_step15_file, peek_ace_step15 = FILES.family, FILES.is_file, FILES.peek


@dataclass
class LoadedAceStep15:
    family: AceStep15Family
    unet: AceStep15Denoiser
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def load_ace_step15_unet(path: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.bfloat16) -> LoadedAceStep15:
    """Load an ACE-Step 1.5 diffusion-model file on `device` in `dtype` (fp8 and scaled fp8 weights cast as they
    load); the keys the model does not use are listed."""
    path = Path(path)
    family, model, unused, metadata = FILES.load(
        path, lambda family: AceStep15Model(family.unet_config), "ACE-Step 1.5 model", device, dtype,
        lambda sd: "not an ACE-Step 1.5 diffusion model (no decoder.proj_in / detokenizer / null_condition_emb "
                   "weights in ACE-Step's layout)")
    return LoadedAceStep15(family, AceStep15Denoiser(model).eval(), unused, path, metadata)


# The all-in-one checkpoint's parts (ComfyUI's ACEStep15: vae_key_prefix, text_encoder_key_prefix and clip_target).
VAE_PREFIX = "vae."
TEXT_PREFIXES = ("text_encoders.qwen3_06b.transformer.", "text_encoders.qwen3_2b.transformer.",
                 "text_encoders.qwen3_4b.transformer.")


def is_ace_step15_checkpoint_file(path: str | Path) -> bool:
    """Whether a .safetensors file is an all-in-one ACE-Step 1.5 checkpoint (the model under ComfyUI's prefix and
    the text encoder beside it), from its header."""
    shapes = ckpt.shapes_or_none(path)
    return shapes is not None and _probe(shapes, UNET_PREFIX) and TEXT_PREFIXES[0] + "model.norm.weight" in shapes


def load_ace_step15_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.bfloat16) -> ckpt.LoadedCheckpoint:
    """The all-in-one checkpoint as a LoadedCheckpoint: the model (as UNETLoader loads it), the Oobleck VAE (float32:
    half precision moves its sound) and the text encoders with the language model (as DualCLIPLoader type ace)."""
    from ldm.ace_step15_text import ace_step15_text_encoder
    from ldm.oobleck import is_oobleck, load_oobleck

    path = Path(path)
    loaded = load_ace_step15_unet(path, device, dtype)
    sd = ckpt.load_state_dict(path)
    if not is_oobleck(sd, VAE_PREFIX):
        raise CheckpointError(f"{path.name}: an ACE-Step 1.5 checkpoint without its VAE (vae.): load the VAE with "
                              "VAELoader (ace_1.5_vae.safetensors)")
    vae = load_oobleck(sd, prefix=VAE_PREFIX, device=device, dtype=torch.float32)
    parts = [(f"{path.name} ({prefix.split('.')[1]})", {k[len(prefix):]: v for k, v in sd.items()
                                                         if k.startswith(prefix)}) for prefix in TEXT_PREFIXES]
    text = ace_step15_text_encoder([(name, part) for name, part in parts if part], device, dtype)
    unused = [k for k in loaded.unused_keys if not k.startswith((VAE_PREFIX, *TEXT_PREFIXES))]  # the model's
    return ckpt.LoadedCheckpoint(loaded.family, loaded.unet, vae, text.encoder, [*unused, *text.unused_keys], path,
                                 loaded.metadata)
