"""LTX-2's guidance nodes (ComfyUI's nodes_lt.py): spatio-temporal guidance, audio-video coupling (modality)
guidance, separate video and audio CFG scales, and ID-LoRA's reference audio with its identity guidance
(`ldm.ltx2_guidance`). Each model node returns a new MODEL whose sampling runs one more prediction per step in its
range; the given one is unchanged."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch

from nodes.node import Node
from nodes.sd.custom_sampling import Guider
from nodes.sd.models import DiffusionModel, Vae, device_and_dtype, on_device
from nodes.spec import Float, Output, Socket, String


def _check_ltx2(model: DiffusionModel, node: str) -> None:
    if model.family.name != "ltx2":
        raise ValueError(f"{node} is for LTX-2 models (LTX-2, LTX-2.3); {model.source} is "
                         f"{model.family.name.upper()}: load an LTX-2 checkpoint")


def _with_post_cfg(model: DiffusionModel, patch: Any) -> DiffusionModel:
    return replace(model, sampling_patches=model.sampling_patches.after(patch))


def _sigmas(model: DiffusionModel, start_percent: float, end_percent: float) -> tuple[float, float]:
    return model.schedule.sigma_at_percent(start_percent), model.schedule.sigma_at_percent(end_percent)


class _LTX2Node(Node):
    """What the nodes share: the MODEL linked must be LTX-2's, and their MODEL output is of its family."""

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        family = linked.get("model", {}).get("family")
        if family is None or family == "ltx2":
            return None
        return f"{cls.name} is for LTX-2 models; the MODEL linked is {family.upper()}"

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}


def _percent(default: float) -> Any:
    return Float(default, min=0.0, max=1.0, step=0.001, extra={"advanced": True})


class LTXVSpatioTemporalGuidance(_LTX2Node):
    """Runs one extra pass per step with the self-attention of the selected blocks degraded to a value-passthrough,
    then guides away from it - improving spatial detail and motion coherence."""

    display_name = "LTXV Spatio-Temporal Guidance (STG)"
    category = "advanced/guidance"
    model = Socket("MODEL")
    scale = Float(1.0, min=0.0, max=100.0, step=0.01, round=0.01)
    blocks = String("29", tooltip="Comma-separated transformer block indices to perturb.")
    start_percent = _percent(0.0)
    end_percent = _percent(1.0)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, scale: float, blocks: str, start_percent: float,
                end_percent: float) -> tuple[DiffusionModel]:
        from ldm.ltx2_guidance import SpatioTemporalGuidance, check_blocks

        _check_ltx2(model, self.name)
        chosen = frozenset(int(n) for n in re.findall(r"\d+", blocks))  # every run of digits, as ComfyUI
        problem = check_blocks(model.unet, chosen)
        if problem:
            raise ValueError(f"{self.name}: {problem}")
        return (_with_post_cfg(model, SpatioTemporalGuidance(chosen, scale, *_sigmas(model, start_percent,
                                                                                       end_percent))),)


class LTXVModalityGuidance(_LTX2Node):
    """Cross-modal (audio-video) guidance for LTX-2: one extra pass per step with the audio-to-video and
    video-to-audio cross-attention severed, the result pushed toward the coupled prediction (audio-visual sync,
    e.g. lip-sync). 3.0 is the reference default; 1.0 disables it (no extra pass)."""

    display_name = "LTXV Modality Guidance (A/V coupling)"
    category = "advanced/guidance"
    model = Socket("MODEL")
    modality_scale = Float(3.0, min=1.0, max=100.0, step=0.1, round=0.01)
    start_percent = _percent(0.0)
    end_percent = _percent(1.0)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, modality_scale: float, start_percent: float,
                end_percent: float) -> tuple[DiffusionModel]:
        from ldm.ltx2_guidance import ModalityGuidance

        _check_ltx2(model, self.name)
        return (_with_post_cfg(model, ModalityGuidance(modality_scale, *_sigmas(model, start_percent,
                                                                                 end_percent))),)


class LTXVDualCFGGuider(_LTX2Node):
    """Separate CFG scales for the video and the audio of an LTX-2 audio-video latent (the negative prompt is
    always predicted); equal scales, or a latent without audio, guide both at video_cfg."""

    display_name = "LTXV Dual CFG Guider"
    category = "sampling/guiders"
    model = Socket("MODEL")
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    video_cfg = Float(3.0, min=0.0, max=100.0, step=0.1, round=0.01)
    audio_cfg = Float(7.0, min=0.0, max=100.0, step=0.1, round=0.01)
    outputs = (Output("GUIDER"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {}

    def execute(self, model: DiffusionModel, positive: list, negative: list, video_cfg: float,
                audio_cfg: float) -> tuple[Guider]:
        from ldm.ltx2_guidance import DualModalityCfg

        _check_ltx2(model, self.name)
        current = model.sampling_patches
        dual = DualModalityCfg(video_cfg, audio_cfg, current.cfg_function)
        guided = replace(model, sampling_patches=replace(current, cfg_function=dual, keep_negative=True))
        return (Guider(guided, positive, negative, video_cfg),)


class LTXVReferenceAudio(_LTX2Node):
    """Set reference audio for ID-LoRA speaker identity transfer: the clip's audio latent goes before the generated
    audio in both prompts, and the model is patched with identity guidance (an extra pass without the reference,
    amplifying the speaker identity effect)."""

    display_name = "LTXV Reference Audio (ID-LoRA)"
    category = "conditioning/video_models"
    model = Socket("MODEL")
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    reference_audio = Socket("AUDIO", tooltip="Reference audio clip whose speaker identity to transfer. ~5 seconds "
                             "recommended (training duration).")
    audio_vae = Socket("VAE", tooltip="LTXV Audio VAE for encoding.", extra={"display_name": "Audio VAE"})
    identity_guidance_scale = Float(3.0, min=0.0, max=100.0, step=0.01, round=0.01,
                                    tooltip="Strength of identity guidance: an extra pass without the reference each "
                                            "step. 0 disables it (no extra pass).")
    start_percent = _percent(0.0)
    end_percent = _percent(1.0)
    outputs = (Output("MODEL"), Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))

    def execute(self, model: DiffusionModel, positive: list, negative: list, reference_audio: dict, audio_vae: Vae,
                identity_guidance_scale: float, start_percent: float,
                end_percent: float) -> tuple[DiffusionModel, list, list]:
        from ldm.ltx2_guidance import REF_AUDIO, ReferenceAudioGuidance, reference_audio_tokens
        from nodes.sd.ltx2 import _audio_codec

        _check_ltx2(model, self.name)
        codec = on_device(self.ctx, _audio_codec(audio_vae, self.name))
        device, _, _ = device_and_dtype(self.ctx)
        with torch.inference_mode():  # resampled to the codec's rate, as ComfyUI's node does
            latent = codec.encode(reference_audio["waveform"].to(device), int(reference_audio["sample_rate"]))
        tokens = reference_audio_tokens(latent.float().cpu())
        if tokens.shape[-1] != model.unet.config.audio_in_channels:
            raise ValueError(f"{self.name}: the audio VAE's latents have {tokens.shape[-1]} features a frame, the "
                             f"model takes {model.unet.config.audio_in_channels}: use the same checkpoint's audio VAE")
        positive, negative = ([(emb, {**opts, REF_AUDIO: tokens}) for emb, opts in side]
                              for side in (positive, negative))
        guidance = ReferenceAudioGuidance(identity_guidance_scale, *_sigmas(model, start_percent, end_percent))
        return _with_post_cfg(model, guidance), positive, negative


NODES: list[Any] = [LTXVSpatioTemporalGuidance, LTXVModalityGuidance, LTXVDualCFGGuider, LTXVReferenceAudio]
