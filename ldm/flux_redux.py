"""Flux Redux (Black Forest Labs' flux1-redux-dev): an image prompt for Flux.1 as extra T5-width prompt tokens.

The style model is two linear layers over a SigLIP tower's last hidden state (`ldm.siglip`; so400m at 384 px,
729 tokens of width 1152): down(silu(up(hidden))), up to 3x the text width, down to the text width (4096, T5's).
Apply Style Model appends the tokens to the prompt's T5 embedding, as ComfyUI does; diffusers' ReduxImageEncoder
is the same computation. Its strength_type "attn_bias" weighs the tokens in Flux's joint attention instead of
scaling them: every text and image query's score for them gets log(strength) added (`style_attention_mask`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize

KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")


def is_redux(sd: StateDict) -> bool:
    return "redux_up.weight" in sd


class ReduxImageEncoder(nn.Module):
    """Module names follow the file's keys."""

    def __init__(self, vision_width: int = 1152, hidden: int = 12288, context_dim: int = 4096) -> None:
        super().__init__()
        self.redux_up = nn.Linear(vision_width, hidden)
        self.redux_down = nn.Linear(hidden, context_dim)

    @property
    def vision_width(self) -> int:
        return self.redux_up.in_features

    def forward(self, hidden: Tensor) -> Tensor:
        """A SigLIP tower's last hidden state [B, tokens, vision_width] -> prompt tokens [B, tokens, context_dim]."""
        if hidden.shape[-1] != self.vision_width:
            raise ValueError(f"Flux Redux takes a {self.vision_width}-wide image encoding (SigLIP so400m's, "
                             f"sigclip_vision_patch14_384) and was given a {hidden.shape[-1]}-wide one: encode the "
                             "image with the SigLIP vision model it was trained with")
        dtype = self.redux_up.weight.dtype
        return self.redux_down(nn.functional.silu(self.redux_up(hidden.to(dtype))))


def load_redux(sd: StateDict, path: Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[ReduxImageEncoder, list[str]]:
    """A Flux Redux model from its state dict, and the keys of the file it does not use."""
    missing = [k for k in KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"{path.name}: incomplete Flux Redux model: no {', '.join(missing)}")
    hidden, width = sd["redux_up.weight"].shape
    context_dim = sd["redux_down.weight"].shape[0]
    if sd["redux_down.weight"].shape[1] != hidden:
        raise CheckpointError(f"{path.name}: a Flux Redux model whose layers do not fit: redux_up gives {hidden} "
                              f"features, redux_down takes {sd['redux_down.weight'].shape[1]}")
    model = _materialize(lambda: ReduxImageEncoder(width, hidden, context_dim), sd, "Flux Redux model", path,
                         device, dtype)
    return model, sorted(k for k in sd if k not in KEYS)


def style_attention_mask(mask: Tensor | None, text_tokens: int, style_tokens: int, strength: float,
                         batch: int) -> Tensor:
    """ComfyUI's attention mask after Apply Style Model appends `style_tokens` tokens to a prompt of `text_tokens`
    (those of earlier style models included) with attn_bias `strength`: [B, T + n + 1, T + n + 1] float32, the last
    entry standing for every image token (`ldm.flux.joint_bias`). The prompt's `mask` (None: no bias yet; a bool
    mask: log of it) keeps its entries; the queries of the text and the image get log(strength) (-inf at 0) for
    the new tokens, whose own queries get no bias."""
    t, n = text_tokens, style_tokens
    if mask is None:
        mask = torch.zeros(batch, t + 1, t + 1)
    mask = mask[None] if mask.ndim == 2 else mask
    mask = mask.float().log() if mask.dtype == torch.bool else mask.float()  # a bool mask: 0 kept, -inf left out
    if mask.shape[-2:] != (t + 1, t + 1):
        raise ValueError(f"the prompt's attention mask is {list(mask.shape)}; a prompt of {t} tokens takes "
                         f"[B, {t + 1}, {t + 1}] (was it changed after an earlier Apply Style Model?)")
    out = torch.zeros(mask.shape[0], t + n + 1, t + n + 1)
    keep = torch.cat([torch.arange(t), torch.tensor([t + n])])  # the old entries' places around the new tokens
    out[:, keep[:, None], keep[None, :]] = mask
    bias = math.log(strength) if strength > 0 else -math.inf
    out[:, :t, t:t + n] = bias
    out[:, t + n:, t:t + n] = bias
    return out
