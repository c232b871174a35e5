"""LTXVDurationPredictor: how long the video of a prompt should be, from LTX 2.4's duration head (a MODEL_PATCH that
ModelPatchLoader loads; `ldm.ltx2_duration`), as ComfyUI's node predicts it.

The first prompt of the positive conditioning (its first batch item) goes through the LTX-2 model's prompt
connectors as sampling puts it through them (`nodes.sd.ltx2.ltx2_conditioning`); the head reads the video and audio
connectors' tokens, in float32, and says seconds. The node returns those seconds as they are and, for
EmptyLTXVLatentVideo's length, the frame count they make at the frame rate, clamped to [min_seconds, max_seconds]
and snapped to the VAE's 8 k + 1 frames (`ldm.ltx2_duration.seconds_to_num_frames`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from nodes.node import Node
from nodes.sd.model_patch import KINDS, ModelPatch
from nodes.sd.models import DiffusionModel, on_device
from nodes.spec import Float, Output, Socket

log = logging.getLogger(__name__)

KIND = "ltx_duration_head"
_NODE = "LTXVDurationPredictor"


def _refusal(model_family: str | None, patch_kind: str | None, source: str) -> str | None:
    """Why a MODEL of `model_family` or a MODEL_PATCH of `patch_kind` (from `source`) does not fit the node; None
    when they fit, or cannot be told."""
    if model_family is not None and model_family != KINDS[KIND][0]:
        return (f"{_NODE} predicts with an LTX-2 model's prompt connectors; the MODEL linked is "
                f"{model_family.upper()}: link the LTX-2 checkpoint's MODEL")
    if patch_kind is not None and patch_kind != KIND:
        return (f"{_NODE} takes {KINDS[KIND][1]} as its duration_head; {source} is {KINDS[patch_kind][1]}: pick "
                "the duration head's file in ModelPatchLoader")
    return None


def _check_widths(model: DiffusionModel, patch: ModelPatch) -> None:
    """ValueError when the head does not take the widths of the model's connectors' tokens."""
    head, config = patch.model.config, model.unet.config
    if (head.video_dim, head.audio_dim) != (config.connector_dim, config.audio_connector_dim):
        raise ValueError(f"{_NODE}: {patch.source}: this duration head is for an LTX-2 model whose prompt "
                         f"connectors give {head.video_dim}-wide video and {head.audio_dim}-wide audio tokens "
                         f"(LTX 2.4's own: 4096 and 2048); the MODEL linked ({model.source}) has "
                         f"{config.connector_dim} and {config.audio_connector_dim}: link the model the head was "
                         "made for")


class LTXVDurationPredictor(Node):
    """Predicts the natural duration of a prompt's shot with LTX 2.4's duration head (loaded with
    ModelPatchLoader), and snaps it to the VAE's 8k+1 frame grid."""

    display_name = "LTXV Duration Predictor"
    category = "model/conditioning/ltxv"
    description = ("Predicts the natural shot duration for a prompt using the LTX 2.4 duration head (loaded with "
                   "ModelPatchLoader), and snaps it to the VAE's 8k+1 frame grid.")
    model = Socket("MODEL")
    positive = Socket("CONDITIONING")
    duration_head = Socket("MODEL_PATCH", tooltip="LTX 2.4 duration head loaded with ModelPatchLoader.")
    frame_rate = Float(24.0, min=1.0, max=120.0, step=0.01)
    min_seconds = Float(1.0, min=0.5, max=120.0, step=0.1)
    max_seconds = Float(20.0, min=0.5, max=120.0, step=0.1)
    outputs = (Output("INT", "num_frames"),
               Output("FLOAT", "seconds", tooltip="Raw (unclamped) predicted duration."))

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        patch = linked.get("duration_head", {})
        return _refusal(linked.get("model", {}).get("family"), patch.get("patch"),
                        patch.get("source", "the model patch linked"))

    def execute(self, model: DiffusionModel, positive: list, duration_head: ModelPatch, frame_rate: float = 24.0,
                min_seconds: float = 1.0, max_seconds: float = 20.0) -> tuple[int, float]:
        from ldm.ltx2_duration import seconds_to_num_frames
        from nodes.sd.ltx2 import ltx2_conditioning

        if not isinstance(duration_head, ModelPatch):
            raise ValueError(f"{_NODE}: the duration_head input takes a MODEL_PATCH from ModelPatchLoader")
        refusal = _refusal(model.family.name, duration_head.kind, duration_head.source)
        if refusal is not None:
            raise ValueError(refusal)
        if not positive:
            raise ValueError(f"{_NODE}: the positive conditioning holds no prompt")
        _check_widths(model, duration_head)
        embedding, options = positive[0]
        mask = options.get("attention_mask")
        prompt = (embedding[:1], {} if mask is None else {"attention_mask": mask[:1]})
        unet = on_device(self.ctx, model.unet)
        head = on_device(self.ctx, duration_head.model, keep=(unet,))
        with torch.no_grad():
            try:
                [(video, entry)] = ltx2_conditioning([prompt], replace(model, unet=unet))
            except ValueError as e:
                raise ValueError(f"{_NODE}: {e}") from None
            device = next(head.parameters()).device
            seconds = float(head(video.to(device, torch.float32),
                                 entry["ltx2_audio_context"].to(device, torch.float32))[0])
        num_frames = seconds_to_num_frames(seconds, frame_rate, min_seconds, max_seconds)
        log.info("LTXV duration head predicted %.2fs -> %d frames @ %.2f fps", seconds, num_frames, frame_rate)
        return num_frames, seconds


NODES = [LTXVDurationPredictor]
