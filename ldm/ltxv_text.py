"""LTX-Video's text encoder, T5-XXL (the same t5xxl files as Flux's), as ComfyUI's CLIPLoader type "ltxv" runs it.

Tokens (ComfyUI's LTXV T5 tokenizer): the prompt's T5 tokens (``ldm.t5.T5Tokenizer``: emphasis, word by word), the
end token, then padding (0) up to 128 tokens; a longer prompt is never cut (diffusers' LTXPipeline cuts at 128).

Encoding (ComfyUI's LTXV/Mochi T5: attention masks on, `zero_out_masked` off; diffusers' MochiPipeline likewise):
the encoder attends to each prompt's tokens up to and including its end token, never to the padding, and the states
at the padding positions are kept as the encoder computes them (not zeroed). The mask goes with the conditioning:
`TextEncoding.extra["attention_mask"]`, [B, L] int64, 1 where the transformer's cross-attention may look (ComfyUI
puts the same [1, L] tensor in each CONDITIONING entry's options). diffusers' LTXPipeline returns the same mask but
encodes without it, so its states differ from these (and from ComfyUI's).

Prompt weights as ComfyUI applies them: a token of weight w becomes ``z_empty + w * (z - z_empty)``, ``z_empty`` the
masked encoding of the empty prompt at the same position; tokens of weight 1 keep their states exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError
from ldm.t5 import END_TOKEN, PAD_TOKEN, T5Encoder, is_t5, is_umt5, t5_from_weights
from ldm.text_encoders import PinnableTextEncoder, TextEncoding
from ldm.umt5 import attention_mask

# ComfyUI's minimum prompt length for LTX-Video (its T5 tokenizer's min_length); diffusers' max_sequence_length.
LTXV_MIN_LENGTH = 128
# The CONDITIONING option (ComfyUI's name) holding the prompt's attention mask.
ATTENTION_MASK = "attention_mask"


def encode_masked(t5: T5Encoder, prompts: list[str], min_length: int = LTXV_MIN_LENGTH) -> tuple[Tensor, Tensor]:
    """(states [B, L, d_model], mask [B, L] int64) of prompts, L = max(min_length, longest prompt), encoded with
    attention masked to each prompt's tokens and end token; prompt weights as the module docstring says."""
    ids, weights = t5.tokenizer.batch(prompts, min_length)
    weighted = bool((weights != 1.0).any())
    if weighted:
        empty = torch.full((1, ids.shape[1]), PAD_TOKEN)
        empty[0, 0] = END_TOKEN
        ids = torch.cat([ids, empty])
    mask = attention_mask(ids).long()
    hidden = t5.model(input_ids=ids.to(t5.device), attention_mask=mask.to(t5.device)).last_hidden_state
    if not weighted:
        return hidden, mask
    z_empty, hidden = hidden[-1:].float(), hidden[:-1]
    weights = weights.to(hidden.device).unsqueeze(-1)
    mixed = (z_empty + weights * (hidden.float() - z_empty)).to(hidden.dtype)
    return torch.where(weights != 1.0, mixed, hidden), mask[:-1]  # unweighted tokens exactly as encoded


class LTXVTextEncoder(PinnableTextEncoder):
    """T5-XXL alone, encoding as ComfyUI does for LTX-Video (see the module docstring); the interface of
    ``ldm.text_encoders.TextEncoder``: `encode` gives T5's states, no pooled vector, and the attention mask in
    `extra["attention_mask"]`. Pinned to the CPU (`pinned_to_cpu`, CLIPLoader's device "cpu"), `.to()` changes its
    dtype only."""

    def __init__(self, t5xxl: T5Encoder) -> None:
        super().__init__()
        self.t5xxl = t5xxl

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: [B, max(128, longest prompt), d_model]; `extra["attention_mask"]`: [B, same] int64. Clip skip and
        textual-inversion embeddings do not apply to T5 (ComfyUI's `embedding:` words are read as text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = (per_encoder or {}).get("t5xxl", prompts)
        hidden, mask = encode_masked(self.t5xxl, texts)
        return TextEncoding(hidden, None, {ATTENTION_MASK: mask})


@dataclass
class LoadedLTXVText:
    encoder: LTXVTextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = "ltxv"


def _not_t5(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    look = None if is_umt5(sd) else look_of(sd)
    held = ("UMT5-XXL, Wan's text encoder (CLIPLoader type wan)" if is_umt5(sd) else
            look.what if look is not None else "no model layout Loom knows")
    return CheckpointError(f"{name}: not T5-XXL, LTX-Video's text encoder: it holds {held}; CLIPLoader type ltxv "
                           "takes t5xxl_fp16.safetensors or an fp8 copy (the same files as Flux's)")


def load_ltxv_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> LoadedLTXVText:
    """One T5-XXL file (t5xxl_fp16.safetensors, fp8 and scaled fp8 copies) as LTX-Video's text encoder, on `device`
    in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"LTX-Video takes one T5-XXL text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    if not is_t5(sd):
        raise _not_t5(path.name, sd)
    encoder, used = t5_from_weights(sd, path.name, dtype)
    unused = sorted(f"{path.name}: {k}" for k in sd if k not in used)
    return LoadedLTXVText(LTXVTextEncoder(encoder).to(device).eval(), unused)
