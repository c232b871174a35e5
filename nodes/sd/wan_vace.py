"""Wan VACE (video editing and control) in the SD node set: WanVaceToVideo's controls, and what the sampler gives a
VACE model for them.

WanVaceToVideo puts in both prompts, as ComfyUI does, the control video's latent split by the control mask into the
part to keep and the part to repaint, the mask folded 8x8 into 64 channels, and the strength (`vace_frames`,
`vace_mask`, `vace_strength`: lists, one item per WanVaceToVideo node chained). The sampler turns them into the
model's `vace_context` [1, n, 96, frames, h, w] (the latents normalised as the model samples them) and binds them to
the model for the run (`VaceControls`): every prompt of a run shares one set of controls, as WanVaceToVideo gives
both prompts the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ldm.wan_files import WAN21_MEAN
from nodes.sd.latent import upscale_latent
from nodes.sd.models import DiffusionModel, Vae
from nodes.sd.vae import encode
from nodes.sd.wan import WanVideoConditioning, _fit_frames, _video_vae, latent_frames
from nodes.spec import Float, Output, Socket


class WanVaceToVideo(WanVideoConditioning):
    """Wan VACE's video editing and control: the prompts carry the control video's latent, split by the control mask
    into the part to keep and the part to repaint (16 channels each), the mask folded 8x8 into 64 channels at the
    latent's size, and the strength of the VACE hints; a reference image goes in front as extra latent frames, which
    `trim_latent` says to cut from the result (TrimVideoLatent)."""

    strength = Float(1.0, min=0.0, max=1000.0, step=0.01)
    control_video = Socket("IMAGE", optional=True)
    control_masks = Socket("MASK", optional=True)
    reference_image = Socket("IMAGE", optional=True)
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"),
               Output("INT", "trim_latent"))

    def execute(self, positive: list, negative: list, vae: Vae, width: int, height: int, length: int,
                batch_size: int, strength: float, control_video: torch.Tensor | None = None,
                control_masks: torch.Tensor | None = None, reference_image: torch.Tensor | None = None
                ) -> tuple[list, list, dict, int]:
        _video_vae(vae, "WanVaceToVideo")
        frames = latent_frames(length)
        video = torch.full((length, height, width, 3), 0.5)
        if control_video is not None:
            given = _fit_frames(control_video[:length], width, height)[..., :3]
            video[:given.shape[0]] = given  # a short control video is padded with grey, as ComfyUI pads it
        mask = torch.ones(length, height, width, 1)
        if control_masks is not None:
            masks = control_masks.reshape(-1, 1, *control_masks.shape[-2:])[:length].float()
            masks = upscale_latent(masks, width, height, "bilinear", "center").movedim(1, -1)
            mask[:masks.shape[0]] = masks  # a short mask is padded with ones (repaint)
        offset = video - 0.5
        inactive, reactive = encode(self, vae, offset * (1 - mask) + 0.5), encode(self, vae, offset * mask + 0.5)
        frames_latent = torch.cat([inactive, reactive], dim=1)
        h, w = height // 8, width // 8
        # The mask folded 8x8 into channels, at the latent's frames (nearest-exact), as VACE was trained.
        folded = mask.reshape(length, h, 8, w, 8).permute(2, 4, 0, 1, 3).reshape(64, length, h, w)
        folded = F.interpolate(folded[None], size=(frames, h, w), mode="nearest-exact")[0]
        trim = 0
        if reference_image is not None:
            reference = encode(self, vae, _fit_frames(reference_image[:1], width, height)[..., :3])
            zero = torch.tensor(WAN21_MEAN).reshape(1, -1, 1, 1, 1).expand_as(reference)  # the latent space's 0
            frames_latent = torch.cat([torch.cat([reference, zero], dim=1), frames_latent], dim=2)
            trim = reference.shape[2]
            folded = torch.cat([torch.zeros_like(folded[:, :trim]), folded], dim=1)
        values = {"vace_frames": [frames_latent], "vace_mask": [folded[None]], "vace_strength": [strength]}
        latent = torch.zeros(batch_size, 16, frames + trim, h, w)
        return _append(positive, values), _append(negative, values), {"samples": latent}, trim


def _append(conditioning: list, values: dict[str, list]) -> list:
    """Each entry with `values`' lists appended to its own (several WanVaceToVideo nodes stack their controls)."""
    return [(embedding, {**options, **{k: [*options.get(k, []), *v] for k, v in values.items()}})
            for embedding, options in conditioning]


class VaceControls:
    """A VACE model called with one run's controls (`vace_context` repeated to each call's batch)."""

    def __init__(self, unet: Any, context: torch.Tensor, strengths: list[float]) -> None:
        self.unet, self.context, self.strengths = unet, context, strengths

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if (self.context.device, self.context.dtype) != (x.device, x.dtype):
            self.context = self.context.to(x.device, x.dtype)  # once per run, not at every model call
        controls = self.context
        if controls.shape[-3:] != x.shape[-3:]:
            raise ValueError(f"the VACE controls {tuple(controls.shape[-3:])} do not cover the model's input "
                             f"{tuple(x.shape[-3:])}: area prompts do not combine with VACE")
        controls = controls.expand(x.shape[0], *controls.shape[1:])
        return self.unet(x, timesteps, context, vace_context=controls, vace_strength=self.strengths, **kwargs)


def vace_controls(unet: Any, model: DiffusionModel, positive: list, negative: list) -> Any:
    """`unet` with the prompts' VACE controls bound (`unet` itself when they carry none); refused when the prompts
    carry different controls, which one model call cannot give its rows."""
    carried = [options for side in (positive, negative) for _, options in side if options.get("vace_frames")]
    if not carried:
        return unet
    from ldm.wan_vace import is_vace

    if not is_vace(model.unet):
        raise ValueError(f"the prompts carry VACE controls (WanVaceToVideo), and {model.source} is not a Wan VACE "
                         "model: load a wan2.1_vace file")
    first = carried[0]
    if any(o["vace_frames"] is not first["vace_frames"] and not _same(o, first) for o in carried[1:]):
        raise ValueError("the prompts carry different VACE controls; give both prompts the same WanVaceToVideo")
    channels = model.family.latent_channels
    rows = []
    for frames, mask in zip(first["vace_frames"], first["vace_mask"], strict=True):
        frames = frames.float()
        normalised = [model.latent_in(frames[:, i:i + channels]) for i in range(0, frames.shape[1], channels)]
        rows.append(torch.cat([*normalised, mask.float()], dim=1))
    return VaceControls(unet, torch.stack(rows, dim=1), [float(s) for s in first["vace_strength"]])


def _same(a: dict, b: dict) -> bool:
    return (len(a["vace_frames"]) == len(b["vace_frames"])
            and all(torch.equal(x, y) for x, y in zip(a["vace_frames"], b["vace_frames"], strict=True))
            and list(a["vace_strength"]) == list(b["vace_strength"]))


NODES: list[Any] = [WanVaceToVideo]
