"""ComfyUI's latent operations: functions of a latent (Reinhard tonemapping, sharpening, blending toward a reference)
that a node applies to a LATENT, or a model patch applies to the guidance direction (cond - uncond) at the sampling
steps of its window (at cfg 1, to the single prediction)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ldm.sampling.denoiser import first_level
from ldm.sampling.model_patches import CfgArgs, Predict
from nodes.node import Node
from nodes.sd.image import gaussian_kernel
from nodes.sd.latent import repeat_to_batch
from nodes.sd.models import DiffusionModel
from nodes.spec import Float, Int, Output, Socket


def _magnitude(latent: torch.Tensor, eps: float) -> torch.Tensor:
    """Each pixel's vector norm over the channels, plus `eps` (so a zero pixel divides to zero), as [B, 1, ...]."""
    return (torch.linalg.vector_norm(latent, dim=1) + eps)[:, None]


@dataclass(frozen=True)
class TonemapReinhard:
    """Reinhard's curve m / (m + 1) on each pixel's channel-vector magnitude m, measured in units of
    `multiplier * (mean + 5 std)` of the item's magnitudes; the vectors' directions are kept."""

    multiplier: float

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        magnitude = _magnitude(latent, 1e-10)
        dims = tuple(range(1, latent.ndim))
        top = (magnitude.std(dim=dims, keepdim=True) * 5 + magnitude.mean(dim=dims, keepdim=True)) * self.multiplier
        scaled = magnitude / top
        return latent / magnitude * (scaled / (scaled + 1.0) * top)


@dataclass(frozen=True)
class Sharpen:
    """Unsharp masking of the unit channel vectors (the image minus `alpha * 10` times its Gaussian blur, the
    kernel's centre adjusted so it sums to 1), their magnitudes then restored."""

    radius: int
    sigma: float
    alpha: float

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 4:
            raise ValueError(f"LatentOperationSharpen works on image latents [B, C, H, W], got shape "
                             f"{tuple(latent.shape)}")
        height, width = latent.shape[-2:]
        if self.radius >= height or self.radius >= width:
            raise ValueError(f"LatentOperationSharpen: sharpen_radius {self.radius} must be smaller than the "
                             f"latent's width and height ({width}x{height})")
        magnitude = _magnitude(latent, 1e-6)
        kernel = gaussian_kernel(self.radius * 2 + 1, self.sigma).to(latent) * (self.alpha * -10)
        kernel[self.radius, self.radius] += 1.0 - kernel.sum()
        channels = latent.shape[1]
        padded = F.pad(latent / magnitude, (self.radius,) * 4, mode="reflect")
        return magnitude * F.conv2d(padded, kernel.expand(channels, 1, *kernel.shape), groups=channels)


@dataclass(frozen=True, eq=False)
class BlendToward:
    """`lerp(latent, reference, strength)`, the reference resized (nearest) to the latent's size when it differs,
    its batch cycled or cut to the latent's; strength 0 returns the latent itself."""

    reference: torch.Tensor
    strength: float

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return latent
        target = self.reference
        if target.ndim != latent.ndim or target.shape[1] != latent.shape[1]:
            raise ValueError(f"LatentOperationBlend: the reference latent has shape {tuple(target.shape)} and the "
                             f"latent it blends {tuple(latent.shape)}; give a reference of the same model family "
                             "(the same channels, and frames if one is a video)")
        target = target.to(latent)
        if target.shape[2:] != latent.shape[2:]:
            target = F.interpolate(target, size=latent.shape[2:], mode="nearest")
        return torch.lerp(latent, repeat_to_batch(target, latent.shape[0]), self.strength)


@dataclass(frozen=True)
class OperationOnGuidance:
    """A pre-guidance patch: while `sigma_end <= sigma <= sigma_start`, the positive prediction moved to
    `uncond + operation(cond - uncond)`, so the guided x0 is `uncond + cfg * operation(cond - uncond)`."""

    operation: object  # a LATENT_OPERATION: Tensor -> Tensor
    sigma_start: float = math.inf
    sigma_end: float = 0.0

    def acts_at(self, sigma: torch.Tensor) -> bool:
        return self.sigma_end <= first_level(sigma) <= self.sigma_start

    def __call__(self, args: CfgArgs, state: dict) -> CfgArgs:
        if not self.acts_at(args.sigma):
            return args
        return replace(args, cond=self.operation(args.cond - args.uncond) + args.uncond)


@dataclass(frozen=True)
class OperationOnPrediction:
    """The same operation where only the positive prompt is predicted (cfg 1, or a guider without a negative), where
    pre-guidance patches do not run: the prediction becomes `operation(prediction)`, as ComfyUI's pre-CFG function
    makes it (its negative side then being zeros). A post-guidance patch, placed before the other ones."""

    on_guidance: OperationOnGuidance

    def __call__(self, args: CfgArgs, denoised: torch.Tensor, predict: Predict) -> torch.Tensor:
        if args.uncond is not None or not self.on_guidance.acts_at(args.sigma):
            return denoised
        return self.on_guidance.operation(denoised)


class LatentApplyOperation(Node):
    """Applies a latent operation to the samples."""

    category = "model/latent/advanced/operations"
    samples = Socket("LATENT")
    operation = Socket("LATENT_OPERATION")
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, operation: object) -> tuple[dict]:
        return (dict(samples, samples=operation(samples["samples"])),)


class LatentApplyOperationCFG(Node):
    """Applies a latent operation to the guidance direction (positive minus negative prediction) at each step between
    `start_percent` and `end_percent` of the schedule; where only the positive prompt is predicted (cfg 1), to that
    prediction itself."""

    category = "model/latent/advanced/operations"
    model = Socket("MODEL")
    operation = Socket("LATENT_OPERATION")
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001, optional=True, tooltip="Start applying the operation at "
                          "this fraction of the model's denoising schedule. 0 is the beginning.")
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001, optional=True, tooltip="Stop applying the operation at "
                        "this fraction of the model's denoising schedule. 1 is the end.")
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, operation: object, start_percent: float = 0.0,
                end_percent: float = 1.0) -> tuple[DiffusionModel]:
        schedule = model.schedule
        on_guidance = OperationOnGuidance(operation, schedule.sigma_at_percent(start_percent),
                                          schedule.sigma_at_percent(end_percent))
        current = model.sampling_patches
        # The one-sided form goes after earlier nodes' one-sided forms and before any other post-guidance patch, as
        # ComfyUI's pre-CFG functions all run, in order, before its post-CFG ones.
        post = current.post_cfg
        at = next((i for i, patch in enumerate(post) if not isinstance(patch, OperationOnPrediction)), len(post))
        patches = replace(current, pre_cfg=(*current.pre_cfg, on_guidance),
                          post_cfg=(*post[:at], OperationOnPrediction(on_guidance), *post[at:]))
        return (replace(model, sampling_patches=patches),)


class LatentOperationBlend(Node):
    """Blends the whole latent toward a reference latent by `strength` (0: unchanged, 1: the reference), the
    reference resized (nearest) to the latent's size when it differs."""

    display_name = "Latent Operation Blend"
    category = "model/latent/advanced/operations"
    reference = Socket("LATENT")
    strength = Float(1.0, min=0.0, max=1.0, step=0.0001, tooltip="0 leaves the latent as it is; 1 makes it the "
                     "(resized) reference")
    outputs = (Output("LATENT_OPERATION"),)

    def execute(self, reference: dict, strength: float) -> tuple[BlendToward]:
        return (BlendToward(reference["samples"], strength),)


class LatentOperationTonemapReinhard(Node):
    """Reinhard tonemapping of the latent's per-pixel magnitudes (against the over-saturation of high cfg)."""

    category = "model/latent/advanced/operations"
    multiplier = Float(1.0, min=0.0, max=100.0, step=0.01)
    outputs = (Output("LATENT_OPERATION"),)

    def execute(self, multiplier: float) -> tuple[TonemapReinhard]:
        return (TonemapReinhard(multiplier),)


class LatentOperationSharpen(Node):
    """Unsharp masking of the latent's per-pixel directions."""

    category = "model/latent/advanced/operations"
    sharpen_radius = Int(9, min=1, max=31, step=1, extra={"advanced": True})
    sigma = Float(1.0, min=0.1, max=10.0, step=0.1, extra={"advanced": True})
    alpha = Float(0.1, min=0.0, max=5.0, step=0.01, extra={"advanced": True})
    outputs = (Output("LATENT_OPERATION"),)

    def execute(self, sharpen_radius: int, sigma: float, alpha: float) -> tuple[Sharpen]:
        return (Sharpen(sharpen_radius, sigma, alpha),)


NODES = [LatentApplyOperation, LatentApplyOperationCFG, LatentOperationBlend, LatentOperationTonemapReinhard,
         LatentOperationSharpen]
