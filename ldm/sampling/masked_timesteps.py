"""Per-token noise levels from a noise mask, for video models that denoise some frames less than others.

LTX-Video's image-to-video and Wan 2.2 5B's do not re-noise the frames a start image fixes: the sampler gives the
model those frames clean (`ksampler.sample(clean_kept=True)`) and the model the noise mask, from which it takes
each token's timestep as the mask times the step's (ComfyUI's `process_timestep` of its LTXV and WAN22 models).
`MaskedTimesteps` wraps such a model for one sampling run so that every call passes the mask, at the call's batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import Tensor


class MaskedTimesteps:
    """`unet` called with `denoise_mask` [B, 1, T, h, w], a latent's noise mask at its size (1 = denoise; repeated
    to each call's batch: the positive and negative prompts' rows share it)."""

    def __init__(self, unet: Callable[..., Tensor], noise_mask: Tensor, latent: Tensor) -> None:
        from ldm.sampling.ksampler import latent_mask

        self.unet = unet
        self.mask = latent_mask(noise_mask, latent)[:, :1]  # at the latent's frames, height and width

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, **kwargs: Any) -> Tensor:
        if x.shape[-3:] != self.mask.shape[-3:]:
            raise ValueError(f"the noise mask {tuple(self.mask.shape[-3:])} does not cover the model's input "
                             f"{tuple(x.shape[-3:])}: area prompts do not combine with a video model's image-to-video")
        if (self.mask.device, self.mask.dtype) != (x.device, x.dtype):
            self.mask = self.mask.to(x.device, x.dtype)  # once per run, not at every model call
        mask = self.mask
        if x.shape[0] != mask.shape[0]:
            mask = mask.repeat(x.shape[0] // mask.shape[0], 1, 1, 1, 1)
        return self.unet(x, timesteps, context, denoise_mask=mask, **kwargs)

    def over(self, unet: Callable[..., Tensor]) -> MaskedTimesteps:
        """The same mask around another model (a guidance pass's patched copy, the negative's second model)."""
        clone = copy.copy(self)
        clone.unet = unet
        return clone
