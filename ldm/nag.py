"""Normalized Attention Guidance (Chen et al. 2025, "Normalized Attention Guidance: Universal Negative Guidance for
Diffusion Models"), as ComfyUI's NAGuidance node applies it: a negative prompt that works in attention space, so
that guidance-distilled models (Flux schnell and dev at cfg 1) can take one.

In a model call that holds both prompts' rows (the guider's `model_patches.call_sides`), every block's attention
output on the positive rows is replaced by itself extrapolated away from the negative rows', `z = s * z+ - (s - 1)
* z-`, its per-token L1 norm capped at `tau` times the positive's, and blended with the positive by `alpha`. In a
Flux transformer (joint attention over text and image) only the image tokens are, on both sides' rows; in an SD
UNet, the self-attention output of every transformer block, on the positive rows. The guider predicts the negative
prompt even at cfg 1 for it (`keep_negative`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.sampling.model_patches import current_sides

EPS = 1e-6  # the floor of both L1 norms, as ComfyUI's


def nag_combine(positive: Tensor, negative: Tensor, scale: float, alpha: float, tau: float) -> Tensor:
    """The guided attention output of the positive rows `positive` [B, L, D] given the negative's `negative`."""
    guided = positive * scale - negative * (scale - 1.0)
    norm_positive = torch.norm(positive, p=1, dim=-1, keepdim=True).clamp_min(EPS)
    norm_guided = torch.norm(guided, p=1, dim=-1, keepdim=True).clamp_min(EPS)
    ratio = norm_guided / norm_positive
    guided = guided * (ratio.clamp(max=tau) / ratio)
    return guided * alpha + positive * (1.0 - alpha)


@dataclass(frozen=True)
class NormalizedAttentionGuidance:
    """The attention output patch (`ldm.flux.Flux.attention_output`, `ldm.attention.BasicTransformerBlock.
    attn1_output`): `out` [B, L, D] is an attention output of a call whose rows are chunks of the sides
    `current_sides()`; with an `image_start` (Flux's joint attention), tokens from it are the image's and alone
    mixed. The first positive and the first negative chunk are mixed; a call without both sides is left as it is."""

    scale: float
    alpha: float
    tau: float

    def __call__(self, out: Tensor, image_start: int | None = None) -> Tensor:
        sides = current_sides()
        if sides is None or 0 not in sides or 1 not in sides:
            return out
        chunk = out.shape[0] // len(sides)
        positive = slice(chunk * sides.index(0), chunk * (sides.index(0) + 1))
        negative = slice(chunk * sides.index(1), chunk * (sides.index(1) + 1))
        tokens = slice(image_start, None)
        mixed = nag_combine(out[positive, tokens], out[negative, tokens], self.scale, self.alpha, self.tau)
        out = out.clone()
        out[positive, tokens] = mixed
        if image_start is not None:  # ComfyUI writes it to the negative rows too where the model slices the image
            out[negative, tokens] = mixed
        return out
