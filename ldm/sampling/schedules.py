"""The discrete DDPM noise schedule of Stable Diffusion, seen as noise levels (sigmas)."""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor


class DiscreteSchedule:
    """SD's 1,000-step scaled-linear beta schedule, with sigma <-> timestep conversion.

    A noisy latent is written in the variance-exploding form of Karras et al. (2022),
    `x = x0 + sigma * eps`, where `sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`.
    Timesteps are continuous: between integer steps, log-sigma is interpolated linearly
    (as k-diffusion's DiscreteSchedule and ComfyUI's ModelSamplingDiscrete do).
    """

    def __init__(
        self,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        num_timesteps: int = 1000,
        alphas_cumprod: Tensor | None = None,
        timestep_stride: int = 1,
        timestep_offset: int = 0,
    ) -> None:
        if alphas_cumprod is None:
            # LDM's "linear" schedule is linear in sqrt(beta); computed in float64 as LDM does.
            betas = (
                torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
            )
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # Entry i of the table is the UNet's timestep `i * stride + offset` (a distilled model's schedule keeps
        # every `stride`-th level of the one it was trained on: see `distilled`).
        self.timestep_stride, self.timestep_offset = timestep_stride, timestep_offset
        self.zero_snr = False  # rescaled by `zero_terminal_snr`
        self.sigma_data = 1.0  # the data's spread the model's preconditioning assumes (0.5 for EDM's)
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self._log_sigma_list = self.log_sigmas.tolist()

    def zero_terminal_snr(self) -> DiscreteSchedule:
        """This schedule rescaled so that its last level is (nearly) pure noise: Lin et al. 2024, "Common
        Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1. The last alpha-bar is set to
        4.8973451890853435e-08 rather than 0, so that sigma stays finite (ComfyUI's value: the same sigmas)."""
        root = self.alphas_cumprod.double().sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        alphas_cumprod = root**2
        alphas_cumprod[-1] = 4.8973451890853435e-08
        rescaled = DiscreteSchedule(alphas_cumprod=alphas_cumprod, timestep_stride=self.timestep_stride,
                                    timestep_offset=self.timestep_offset)
        rescaled.zero_snr = True
        return rescaled

    def distilled(self, steps: int = 50) -> DiscreteSchedule:
        """The `steps` levels a consistency-distilled model (LCM, Luo et al. 2023) was trained on: every
        `num_timesteps // steps`-th timestep, ending at the last."""
        stride = self.num_timesteps // steps
        distilled = DiscreteSchedule(alphas_cumprod=self.alphas_cumprod[stride - 1::stride][:steps],
                                     timestep_stride=stride, timestep_offset=stride - 1)
        distilled.zero_snr = self.zero_snr
        return distilled

    def unet_timestep(self, t: Tensor | float) -> Tensor | float:
        """The UNet's timestep input for a continuous position `t` in this table."""
        if self.timestep_stride == 1 and self.timestep_offset == 0:
            return t
        return t * self.timestep_stride + self.timestep_offset

    def sigma_at_percent(self, percent: float) -> float:
        """The level `percent` of the way through sampling (see the function of that name)."""
        return sigma_at_percent(percent, self.sigmas, self.timestep_stride, self.timestep_offset)

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Continuous timestep (0..num_timesteps-1) whose log-sigma interpolation gives `sigma`.

        `quantize=True` rounds to the nearest integer step instead (ComfyUI's behaviour when it
        calls the UNet); sigmas outside the table clamp to its ends.
        """
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float32).log()
        if quantize:
            return (log_sigma[..., None] - log_sigmas).abs().argmin(dim=-1).to(sigma.dtype)
        low = (torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True) - 1).clamp(
            0, len(log_sigmas) - 2
        )
        low_val, high_val = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - low_val) / (high_val - low_val)).clamp(0, 1)
        return (low + w).to(sigma.dtype)

    def sigma_to_t_scalar(self, sigma: float, quantize: bool = False) -> float:
        """`sigma_to_t` for one level given as a Python float (no tensor work)."""
        table = self._log_sigma_list
        log_sigma = math.log(sigma) if sigma > 0 else -math.inf
        high = min(max(bisect.bisect_right(table, log_sigma), 1), len(table) - 1)
        low = high - 1
        w = min(max((log_sigma - table[low]) / (table[high] - table[low]), 0.0), 1.0)
        return float(low + round(w)) if quantize else low + w

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at a continuous timestep, by linear interpolation of log-sigma."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.to(torch.float32).clamp(0, len(log_sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


class ContinuousSchedule(DiscreteSchedule):
    """A model trained on continuous noise levels (EDM, Karras et al. 2022: CosXL, Playground v2.5), between
    `sigma_min` and `sigma_max`: the UNet's timestep is 0.25 log(sigma), and the schedulers that walk a table
    walk 1,000 levels spaced evenly in log(sigma) (ComfyUI's ModelSamplingContinuousEDM), so that position t in
    the table is the level exp(log sigma_min + t / 999 * (log sigma_max - log sigma_min))."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 120.0, sigma_data: float = 1.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min ({sigma_min}) must be above 0 and below sigma_max ({sigma_max})")
        log_sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000, dtype=torch.float64)
        super().__init__(alphas_cumprod=1 / (1 + log_sigmas.exp() ** 2))
        self.sigmas, self.log_sigmas = log_sigmas.exp().float(), log_sigmas.float()
        self._log_sigma_list = log_sigmas.tolist()
        self.sigma_data = sigma_data
        self.range = (sigma_min, sigma_max)

    def _per_t(self) -> float:
        return (self._log_sigma_list[-1] - self._log_sigma_list[0]) / (self.num_timesteps - 1)

    def unet_timestep(self, t: Tensor | float) -> Tensor | float:
        return 0.25 * (self._log_sigma_list[0] + t * self._per_t())

    # Positions in the table are linear in log(sigma), and go on past its ends (the model takes any level).
    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        t = (sigma.to(torch.float32).log() - self._log_sigma_list[0]) / self._per_t()
        return (t.round() if quantize else t).to(sigma.dtype)

    def sigma_to_t_scalar(self, sigma: float, quantize: bool = False) -> float:
        t = (math.log(sigma) - self._log_sigma_list[0]) / self._per_t() if sigma > 0 else -math.inf
        return float(round(t)) if quantize else t

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return (self._log_sigma_list[0] + t.to(torch.float32) * self._per_t()).exp()

    def sigma_at_percent(self, percent: float) -> float:
        """Evenly in log(sigma) from sigma_max (0) to sigma_min (just before 1), as ComfyUI's."""
        if percent <= 0.0:
            return math.inf
        if percent >= 1.0:
            return 0.0
        low, high = self._log_sigma_list[0], self._log_sigma_list[-1]
        return math.exp(high + percent * (low - high))

    def zero_terminal_snr(self) -> DiscreteSchedule:
        raise ValueError("a continuous (EDM) schedule has no discrete last level to rescale to zero SNR")

    def distilled(self, steps: int = 50) -> DiscreteSchedule:
        raise ValueError("a continuous (EDM) schedule has no discrete levels to distil")


class ContinuousVSchedule(ContinuousSchedule):
    """ComfyUI's ModelSamplingContinuousV: continuous levels whose UNet timestep is atan(sigma) * 2 / pi. Positions
    are even in that timestep (so the normal scheduler spaces steps as ComfyUI's does), while the table the other
    schedulers walk stays even in log(sigma)."""

    def _atan_range(self) -> tuple[float, float]:
        return math.atan(self.range[0]), math.atan(self.range[1])

    def _per_t(self) -> float:
        low, high = self._atan_range()
        return (high - low) / (self.num_timesteps - 1)

    def unet_timestep(self, t: Tensor | float) -> Tensor | float:
        return (self._atan_range()[0] + t * self._per_t()) * 2 / math.pi

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        t = (sigma.to(torch.float32).atan() - self._atan_range()[0]) / self._per_t()
        return (t.round() if quantize else t).to(sigma.dtype)

    def sigma_to_t_scalar(self, sigma: float, quantize: bool = False) -> float:
        t = (math.atan(sigma) - self._atan_range()[0]) / self._per_t()
        return float(round(t)) if quantize else t

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return (self._atan_range()[0] + t.to(torch.float32) * self._per_t()).tan()


def sigma_at_percent(percent: float, sigmas_by_t: Tensor, stride: int = 1, offset: int = 0) -> float:
    """The noise level `percent` of the way through sampling (0: the start, pure noise, given as inf; 1: the
    end, 0), from the model's discrete sigmas (ComfyUI's percent_to_sigma): the UNet timestep
    (1 - percent) * 999 for SD's 1,000 timesteps, located in a table whose entry i is timestep
    `i * stride + offset` (a distilled model's keeps every stride-th level), log-linearly interpolated."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return 0.0
    timestep = (1.0 - percent) * (len(sigmas_by_t) * stride - 1)
    t = min(max((timestep - offset) / stride, 0.0), len(sigmas_by_t) - 1)
    low = int(math.floor(t))
    high = min(low + 1, len(sigmas_by_t) - 1)
    frac = t - low
    log_sigma = (1 - frac) * sigmas_by_t[low].log() + frac * sigmas_by_t[high].log()
    return float(log_sigma.exp())
