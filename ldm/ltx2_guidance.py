"""ComfyUI's guidance for LTX-2 (its nodes_lt.py: LTXVSpatioTemporalGuidance, LTXVModalityGuidance,
LTXVReferenceAudio's identity guidance, LTXVDualCFGGuider).

The first three are post-guidance functions: while the step's noise level is in their range, one more prediction of
the positive prompt by the same model with one of `LTX2Model.forward`'s switches set (`LTX2Perturbation`, a shallow
copy of the denoiser sharing every weight) or without the prompts' reference audio, and a push away from it:
`denoised + scale * (positive - other)`. The last is a guidance function with one scale for the video and another
for the audio of a packed audio-video latent (`ldm.sampling.av_latent`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ldm.sampling.denoiser import first_level
from ldm.sampling.model_patches import CfgArgs, CfgFunction, Predict

REF_AUDIO = "ltx2_ref_audio"  # the conditioning option of LTXVReferenceAudio's tokens (cond_jobs.MODEL_INPUTS)


def reference_audio_tokens(latent: Tensor) -> Tensor:
    """[B, T, C * F]: an audio latent [B, C, T, F]'s frames as the model's audio tokens, features (channel, bin)."""
    return latent.transpose(1, 2).flatten(2)


def check_blocks(unet: nn.Module, blocks: frozenset[int]) -> str | None:
    """Why `blocks` cannot be perturbed in `unet` (not an LTX-2 model, an index past the last block); None if they
    can."""
    from ldm.ltx2_files import LTX2Denoiser

    if not isinstance(unet, LTX2Denoiser):
        return f"this guidance needs an LTX-2 model; this one is {type(unet).__name__}"
    depth = len(unet.model.transformer_blocks)
    wrong = sorted(i for i in blocks if i >= depth)
    if wrong:
        return (f"block{'s' if len(wrong) > 1 else ''} {', '.join(map(str, wrong))} out of range; this model has "
                f"{depth} transformer blocks (0 to {depth - 1})")
    return None


@dataclass(frozen=True)
class LTX2Perturbation:
    """A transform for `Predict`: the LTX-2 denoiser whose model runs with the self-attentions (video and audio) of
    `stg_blocks` passing their values through, and without the audio-to-video (`a2v` False) or video-to-audio
    (`v2a` False) cross-attention; the default changes nothing."""

    stg_blocks: frozenset[int] = frozenset()
    a2v: bool = True
    v2a: bool = True

    def __call__(self, unet: nn.Module) -> nn.Module:
        problem = check_blocks(unet, self.stg_blocks)
        if problem:
            raise ValueError(problem)
        clone = copy.copy(unet)  # shares its parameters and children; the switches are plain attributes
        clone.stg_blocks, clone.a2v_cross_attention, clone.v2a_cross_attention = self.stg_blocks, self.a2v, self.v2a
        return clone


def _in_range(args: CfgArgs, sigma_start: float, sigma_end: float) -> bool:
    """Whether the call's level (its first item's) is within [sigma_end, sigma_start], as ComfyUI's nodes test it."""
    return sigma_end <= first_level(args.sigma) <= sigma_start


@dataclass(frozen=True)
class SpatioTemporalGuidance:
    """Spatio-temporal guidance (STG, LTXVSpatioTemporalGuidance): `denoised + scale * (positive - perturbed)`, the
    perturbed prediction's `blocks` passing their self-attentions' values through; none with scale 0 or no block."""

    blocks: frozenset[int]
    scale: float
    sigma_start: float
    sigma_end: float

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        if self.scale == 0 or not self.blocks or not _in_range(args, self.sigma_start, self.sigma_end):
            return denoised
        return denoised + (args.cond - predict(LTX2Perturbation(stg_blocks=self.blocks))) * self.scale


@dataclass(frozen=True)
class ModalityGuidance:
    """Audio-video coupling guidance (LTXVModalityGuidance): `denoised + (scale - 1) * (positive - apart)`, where
    `apart` is predicted with both audio<->video cross-attentions severed; none at a scale of 1."""

    scale: float
    sigma_start: float
    sigma_end: float

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        if math.isclose(self.scale, 1.0) or not _in_range(args, self.sigma_start, self.sigma_end):
            return denoised
        apart = predict(LTX2Perturbation(a2v=False, v2a=False))
        return denoised + (args.cond - apart) * (self.scale - 1.0)


@dataclass(frozen=True)
class ReferenceAudioGuidance:
    """LTXVReferenceAudio's identity guidance: `denoised + scale * (positive - without)`, `without` the positive
    prompt's prediction without its reference audio; none at scale 0."""

    scale: float
    sigma_start: float
    sigma_end: float

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        if self.scale == 0 or not _in_range(args, self.sigma_start, self.sigma_end):
            return denoised
        return denoised + (args.cond - predict(LTX2Perturbation(), without=(REF_AUDIO,))) * self.scale


@dataclass(frozen=True)
class DualModalityCfg:
    """LTXVDualCFGGuider's guidance function: classifier-free guidance at `video_cfg` over the video part of a packed
    audio-video latent and at `audio_cfg` over its audio part. With equal scales or another latent, guidance at
    `video_cfg` by `inner` (the model's own guidance function, or plain CFG where it has none), as ComfyUI falls
    back to its CFGGuider."""

    video_cfg: float
    audio_cfg: float
    inner: CfgFunction | None = None

    def __call__(self, args: CfgArgs) -> Tensor:
        if args.uncond is None:
            return args.cond
        if args.parts is None or len(args.parts) < 2 or math.isclose(self.video_cfg, self.audio_cfg):
            args = replace(args, cfg=self.video_cfg)
            return torch.lerp(args.uncond, args.cond, args.cfg) if self.inner is None else self.inner(args)
        video = math.prod(args.parts[0])
        guided = torch.lerp(args.uncond, args.cond, self.video_cfg)
        guided[..., video:] = torch.lerp(args.uncond[..., video:], args.cond[..., video:], self.audio_cfg)
        return guided
