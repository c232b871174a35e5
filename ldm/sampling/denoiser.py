"""Wraps an eps- or v-predicting UNet as a denoiser `D(x, sigma, cond) -> x0` (Karras et al. 2022)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.sampling.schedules import DiscreteSchedule

UNet = Callable[..., Tensor]
PREDICTIONS = ("eps", "v", "x0", "lcm", "edm", "flow")


@dataclass
class Conditioning:
    """What one UNet call is conditioned on: cross-attention `context` [B, L, D]; for models with a
    class/size embedding (SDXL), `y` [B, adm]; a ControlNet chain (`ldm.controlnet.Control`) for
    a call whose rows are `control_repeats` copies of the latent batch (one per prompt in the call);
    for inpainting models, `concat` [B, C, H, W], channels appended to the UNet's input (the mask and
    the masked image's latent); `unet`, a UNet that runs this call instead of the denoiser's (GLIGEN's grounded
    copy, `ldm.gligen.grounded_unet`); `ref_latents`, Flux Kontext's reference latents for this call's rows
    (`ldm.flux_variants.References`), `attn_mask`, Flux's attention bias (`ldm.flux.joint_bias`), `inputs`, more
    inputs by keyword (`ldm.sampling.cond_jobs.MODEL_INPUTS`), passed to the model as they are, and
    `control_context`, a prompt for the ControlNets in place of `context` (CLIPTextEncodeControlnet's)."""

    context: Tensor
    y: Tensor | None = None
    control: Any = None
    control_repeats: int = 1
    concat: Tensor | None = None
    unet: Any = None
    ref_latents: Any = None
    attn_mask: Tensor | None = None
    inputs: dict[str, Tensor] | None = None
    control_context: Tensor | None = None


@functools.lru_cache(maxsize=256)
def level_tensor(sigma: float, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`sigma` as the [batch] tensor of k-diffusion's `model(x, sigma)` signature, made once per level,
    so that a sampler step spends no tensor op on it, and tagged with the float (`uniform_level`
    reads it back with no host read). Shared between runs: never modify it in place."""
    tensor = torch.full((batch,), sigma, device=device, dtype=dtype)
    tensor.loom_level = sigma
    return tensor


@functools.lru_cache(maxsize=256)
def _timesteps(t: float, batch: int, device: torch.device) -> Tensor:
    """The UNet's timestep input for one level, made once (read-only, like `level_tensor`)."""
    return torch.full((batch,), t, dtype=torch.float32, device=device)


def uniform_level(sigma: Tensor) -> float | None:
    """The one noise level of a `sigma` batch whose items all share it, else None: from the tag of
    a `level_tensor`, or read from a CPU tensor (a GPU one is not read: that would stall the queue)."""
    level = getattr(sigma, "loom_level", None)
    if level is not None:
        return level
    if sigma.device.type != "cpu":
        return None
    levels = sigma.tolist()
    return levels[0] if all(level == levels[0] for level in levels) else None


def first_level(sigma: Tensor) -> float:
    """A call's noise level as ComfyUI's patches read it (`sigma[0]`): the shared level where the sampler's tensor
    carries it (no device read), else the first item's."""
    level = uniform_level(sigma)
    return float(sigma.reshape(-1)[0]) if level is None else level


class Denoiser:
    """k-diffusion's preconditioning for an LDM UNet, with the schedule's sigma_data (1 but for EDM models).

    The UNet sees `c_in * x`, `c_in = 1 / sqrt(sigma^2 + sigma_data^2)` (with sigma_data 1, the DDPM-scaled
    latent) and the schedule's timestep of `sigma`; for eps-prediction `x0 = x - sigma * eps`, for
    v-prediction (Salimans & Ho 2022) `x0 = c_skip * x + c_out * v` with `c_skip = 1 / (sigma^2 + 1)`,
    `c_out = -sigma / sqrt(sigma^2 + 1)`; x0-prediction gives x0 itself. "edm" is EDM's (Karras et al. 2022,
    Table 1) `x0 = c_skip * x + c_out * F` with `c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)` and
    `c_out = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)`. "lcm" is eps-prediction with a latent
    consistency model's boundary condition (Luo et al. 2023, Eq. 9; sigma_data 0.5, timesteps scaled by 10
    as LCM's released models are): `c_skip(t) * x + c_out(t) * x0`, so that the prediction at t = 0 is the
    input itself. "flow" is a rectified-flow model's velocity (Flux; ComfyUI's CONST, see `ldm.sampling.flow`):
    the model sees `x` itself (`c_in = 1`) and `x0 = x - sigma * v`, with `x = sigma * noise + (1 - sigma) * x0`
    (`noise_latent`).
    """

    def __init__(
        self, unet: UNet, schedule: DiscreteSchedule, prediction: str = "eps", quantize: bool = False
    ) -> None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, not {prediction!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction = prediction
        # A distilled model knows only its table's timesteps: levels between them go to the nearest (ComfyUI).
        self.quantize = quantize or schedule.timestep_stride > 1

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        level = uniform_level(sigma)
        if level is not None:
            return self.at_level(x, level, cond)
        sigma_ = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        data = self.schedule.sigma_data
        c_in = self._c_in(sigma_)
        t = self.schedule.unet_timestep(self.schedule.sigma_to_t(sigma.to(torch.float32), quantize=self.quantize))
        out = self._unet(x * c_in, t, cond, sigma)
        if self.prediction == "v":
            return x * c_in**2 - out * sigma_ * c_in
        if self.prediction == "edm":
            return x * (data * c_in) ** 2 + out * sigma_ * data * c_in
        if self.prediction == "x0":
            return out
        x0 = x - sigma_ * out
        if self.prediction == "lcm":
            c_skip, c_out = _lcm_boundary(t.to(x.dtype).reshape(sigma_.shape))
            return c_skip * x + c_out * x0
        return x0

    def at_level(self, x: Tensor, sigma: float, cond: Conditioning) -> Tensor:
        """The same for one noise level known on the host: scalar arithmetic, fewer tensor ops."""
        c_in = self._c_in(sigma)
        return self._to_x0(x, self._unet_at_level(x * c_in, sigma, cond), sigma)

    def guided_at_level(self, x: Tensor, sigma: float, cond: Conditioning, cfg: float) -> Tensor:
        """Classifier-free guidance for one latent `x` [B, ...] whose `cond` holds the positive
        then the negative conditioning ([2B, ...]): `uncond + cfg * (cond - uncond)`.

        x0 is affine in the UNet's output with the same `x` on both sides, so guidance combines the
        raw outputs first and converts once: the same result in half the passes over the latent.
        """
        c_in = self._c_in(sigma)
        x_in = x.expand(2, *x.shape).mul(c_in).flatten(0, 1)  # [x, x] * c_in in one op
        out = self._unet_at_level(x_in, sigma, cond)
        positive, negative = out.chunk(2)
        return self._to_x0(x, torch.lerp(negative, positive, cfg), sigma)

    def _c_in(self, sigma: Tensor | float) -> Tensor | float:
        return 1.0 if self.prediction == "flow" else (sigma**2 + self.schedule.sigma_data**2) ** -0.5

    def noise_latent(self, latent: Tensor, noise: Tensor, sigma: Tensor | float, full: bool = False) -> Tensor:
        """`latent` noised to level `sigma` (ComfyUI's noise_scaling): `latent + sigma * noise`, from the top of
        the schedule (`full`) `latent + sqrt(1 + sigma^2) * noise`; for "flow", `sigma * noise + (1 - sigma) *
        latent`, whatever the level."""
        if self.prediction == "flow":
            return sigma * noise + (1 - sigma) * latent
        return latent + noise * ((1 + sigma**2) ** 0.5 if full else sigma)

    def unscaled(self, x: Tensor, sigma: float) -> Tensor:
        """A sample left at level `sigma` as the next sampling run takes it back (ComfyUI's inverse_noise_scaling):
        `x` itself, but for "flow", `x / (1 - sigma)`, which `noise_latent` without noise scales back to `x`."""
        return x / (1 - sigma) if self.prediction == "flow" and 0 < sigma < 1 else x

    def _unet_at_level(self, x_in: Tensor, sigma: float, cond: Conditioning) -> Tensor:
        t = self.schedule.unet_timestep(self.schedule.sigma_to_t_scalar(sigma, quantize=self.quantize))
        return self._unet(x_in, _timesteps(t, x_in.shape[0], x_in.device), cond, sigma)

    def _unet(self, x_in: Tensor, t: Tensor, cond: Conditioning, sigma: float | Tensor) -> Tensor:
        control = None
        if cond.control is not None:
            # A ControlNet acts on part of the schedule, judged by the first item's level (as ComfyUI does),
            # and sees the latent alone, without an inpainting model's extra channels.
            level = sigma if isinstance(sigma, float) else float(sigma.reshape(-1)[0])
            context = cond.context if cond.control_context is None else cond.control_context
            control = cond.control.residuals(x_in, level, t, context, cond.y, cond.control_repeats,
                                             attn_mask=cond.attn_mask)
        if cond.concat is not None:
            x_in = torch.cat([x_in, cond.concat.to(x_in.dtype)], dim=1)
        unet = self.unet if cond.unet is None else cond.unet
        extra = {} if control is None else {"control": control}
        passed = {k: v for k, v in (("ref_latents", cond.ref_latents), ("attn_mask", cond.attn_mask),
                                    *(cond.inputs or {}).items()) if v is not None}
        if passed:
            # A CUDA-graph replay (ldm.cuda_graphs) takes fixed inputs: these run the forward it wraps.
            unet = unet if isinstance(unet, torch.nn.Module) else getattr(unet, "forward", unet)
            extra.update(passed)
        return unet(x_in, t, cond.context, y=cond.y, **extra)

    def _to_x0(self, x: Tensor, out: Tensor, sigma: float) -> Tensor:
        if self.prediction in ("eps", "flow"):
            return torch.add(x, out, alpha=-sigma)
        if self.prediction == "x0":
            return out
        if self.prediction == "lcm":
            c_skip, c_out = _lcm_boundary(self.schedule.unet_timestep(self.schedule.sigma_to_t_scalar(
                sigma, quantize=self.quantize)))
            return torch.add(x * (c_skip + c_out), out, alpha=-sigma * c_out)
        c_in = (sigma**2 + self.schedule.sigma_data**2) ** -0.5
        if self.prediction == "edm":
            data = self.schedule.sigma_data
            return torch.add(x * (data * c_in) ** 2, out, alpha=sigma * data * c_in)
        return torch.add(x * c_in**2, out, alpha=-sigma * c_in)


def _lcm_boundary(t: Tensor | float, sigma_data: float = 0.5, scale: float = 10.0) -> tuple:
    """LCM's (c_skip, c_out) at UNet timestep `t`."""
    scaled = t * scale
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5
