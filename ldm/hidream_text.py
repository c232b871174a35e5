"""HiDream-I1's text conditioning: CLIP-L's and CLIP-G's pooled vectors, T5-XXL's states and every Llama 3.1 layer's
states, as ComfyUI's HiDream text encoder gives them (QuadrupleCLIPLoader, CLIPTextEncode / CLIPTextEncodeHiDream).

- pooled [B, 2048]: CLIP-L's and CLIP-G's end-token states (after the final norm), each through its text projection
  (ComfyUI's projected pooled output for both, diffusers' CLIPTextModelWithProjection text_embeds), side by side. The
  CLIP prompts are tokenized as for SD (``ldm.text_encoders``: emphasis, 77-token chunks, the first chunk pooled).
- cond [B, 128, 4096]: T5's last hidden states of the prompt, its end token and padding to exactly 128 tokens (a
  longer prompt is cut to 127 tokens and the end token), the padding masked as keys (ComfyUI's attention_mask=True
  and diffusers' max_sequence_length 128 alike); the padding's states are kept.
- extra["conditioning_llama3"] [B, layers, L, 4096]: Llama's hidden states after each decoder layer (the last through
  the final norm; the embedding excluded: diffusers' hidden_states[1:], ComfyUI's all-layer output without its first
  entry) of `<|begin_of_text|>` and the prompt, padded with `<|eot_id|>` (128009) to at least 128 tokens, the padding
  masked as keys and its states kept. No chat template. Emphasis brackets are read as ComfyUI's tokenizer reads them
  (each weighted part tokenized alone, the brackets dropped) but weights are not applied to Llama's states.

Where ComfyUI and diffusers differ, this follows ComfyUI: Llama is never cut (diffusers cuts it at 128 tokens), runs
with plain RoPE (``ldm.llama_text``), and CLIP prompts over 75 tokens pool their first chunk (diffusers cuts them at
its CLIP length). HiDream's retrained CLIPs may hold more than 77 positions (ComfyUI then reads longer chunks): Loom
keeps their first 77, which give the same pooled vector for prompts of up to 75 tokens.

Any of the four may be absent (CLIPLoader's type hidream takes fewer files): its part is then zeros, as in ComfyUI
(pooled 768 / 1280 wide, T5 [B, 128, 4096], Llama [B, 32, 1, 4096]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError
from ldm.llama_text import BEGIN_OF_TEXT, EOT, all_hidden_states, is_llama3, llama_from_weights, token_ids
from ldm.parts import TextEncoderFile, read_text_encoder
from ldm.sd3_text import _clip
from ldm.t5 import END_TOKEN as T5_END
from ldm.t5 import PAD_TOKEN as T5_PAD
from ldm.t5 import T5Encoder, is_t5, t5_from_weights
from ldm.text_encoders import PinnableTextEncoder, TextEncoder, TextEncoding
from ldm.tokenizer import CHUNK_LENGTH, parse_emphasis

FAMILY = "hidream"
ENCODERS = ("clip_l", "clip_g", "t5xxl", "llama")
T5_LENGTH = 128  # ComfyUI's min_length and max_length for HiDream's T5 (diffusers' max_sequence_length)
LLAMA_MIN_LENGTH = 128  # ComfyUI's min_length for HiDream's Llama
POOLED_WIDTHS = {"clip_l": 768, "clip_g": 1280}
CONTEXT_WIDTH = 4096
LLAMA_LAYERS = 32  # of Llama 3.1 8B: the zeros standing in for an absent Llama
# The conditioning option holding Llama's states (ComfyUI's name), which the sampler hands to the transformer
# (ldm.sampling.cond_jobs.MODEL_INPUTS).
LLAMA_KEY = "conditioning_llama3"
_POSITIONS = "text_model.embeddings.position_embedding.weight"


def llama_tokens(prompt: str) -> list[int]:
    """The token ids ComfyUI encodes for a HiDream Llama prompt, before padding: `<|begin_of_text|>`, then each
    emphasis segment tokenized alone."""
    return [BEGIN_OF_TEXT, *(i for text, _ in parse_emphasis(prompt) for i in token_ids(text))]


def padded_rows(rows: list[list[int]], min_length: int, pad: int) -> tuple[Tensor, Tensor]:
    """(ids [B, L], attention mask [B, L]) of token rows padded on the right with `pad` to the longest and to at
    least `min_length`."""
    ids = torch.full((len(rows), max(min_length, *map(len, rows))), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


class HiDreamTextEncoder(PinnableTextEncoder):
    """CLIP-L, CLIP-G, T5-XXL and Llama 3.1 8B (each optional) with one `encode`, the interface of
    ``ldm.text_encoders.TextEncoder``; `projections` are the CLIPs' text projections by encoder name. Its device and
    dtype are its largest present encoder's (Llama's, else T5's, else a CLIP's)."""

    def __init__(self, clip_l: TextEncoder | None, clip_g: TextEncoder | None, t5xxl: T5Encoder | None,
                 llama: Any, projections: dict[str, nn.Linear]) -> None:
        super().__init__()
        present = [n for n, e in zip(ENCODERS, (clip_l, clip_g, t5xxl, llama), strict=True) if e is not None]
        if not present:
            raise ValueError("HiDream's text encoder needs at least one of CLIP-L, CLIP-G, T5-XXL and Llama")
        self.clip_l, self.clip_g, self.t5xxl, self.llama = clip_l, clip_g, t5xxl, llama
        self.projections = nn.ModuleDict(projections)
        self.main_encoder = present[-1]

    @property
    def device(self) -> torch.device:
        return next(getattr(self, self.main_encoder).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(getattr(self, self.main_encoder).parameters()).dtype

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond` [B, 128, 4096] (T5), `pooled` [B, 2048] (CLIP-L ++ CLIP-G), `extra["conditioning_llama3"]` [B, layers,
        L, 4096]; `per_encoder` gives encoders prompts of their own ({"clip_l", "clip_g", "t5xxl", "llama"}:
        CLIPTextEncodeHiDream's four texts). Clip skip changes nothing (pooled states are the last layer's);
        textual-inversion embeddings apply to the CLIP prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = {name: (per_encoder or {}).get(name, prompts) for name in ENCODERS}
        unknown = set(per_encoder or {}) - set(texts)
        if unknown or any(len(t) != len(prompts) for t in texts.values()):
            raise ValueError(f"per_encoder takes {len(prompts)} prompts for {', '.join(ENCODERS)}, got "
                             f"{({k: len(v) for k, v in (per_encoder or {}).items()})}")
        batch, device, dtype = len(prompts), self.device, self.dtype
        pooled = torch.cat([self._pooled(name, texts[name], clip_skip, embeddings).to(device, dtype)
                            for name in POOLED_WIDTHS], dim=-1)
        if self.t5xxl is None:
            cond = torch.zeros(batch, T5_LENGTH, CONTEXT_WIDTH, device=device, dtype=dtype)
        else:
            cond = self._t5(texts["t5xxl"]).to(device, dtype)
        if self.llama is None:
            llama = torch.zeros(batch, LLAMA_LAYERS, 1, CONTEXT_WIDTH, device=device, dtype=dtype)
        else:
            ids, mask = padded_rows([llama_tokens(p) for p in texts["llama"]], LLAMA_MIN_LENGTH, EOT)
            llama = all_hidden_states(self.llama, ids, mask).to(device, dtype)
        return TextEncoding(cond, pooled, {LLAMA_KEY: llama})

    def _pooled(self, name: str, prompts: list[str], clip_skip: int | None,
                embeddings: Callable[[str], dict[int, Tensor] | None] | None) -> Tensor:
        encoder = getattr(self, name)
        if encoder is None:
            return torch.zeros(len(prompts), POOLED_WIDTHS[name])
        pooled = encoder.encode(prompts, clip_skip, embeddings=embeddings).pooled
        return self.projections[name](pooled.to(self.projections[name].weight.dtype))

    def _t5(self, prompts: list[str]) -> Tensor:
        """T5's states of 128 tokens each, the padding masked as keys; prompt weights as ``ldm.t5`` applies them."""
        ids, weights = self.t5xxl.tokenizer.batch(prompts, T5_LENGTH, T5_LENGTH)
        weighted = bool((weights != 1.0).any())
        if weighted:
            empty = torch.full((1, T5_LENGTH), T5_PAD)
            empty[0, 0] = T5_END
            ids = torch.cat([ids, empty])
        # the prompt and its end token are attended to, the padding after it is not
        mask = (torch.cumsum((ids == T5_END).long(), dim=1) - (ids == T5_END).long() == 0).long()
        device = self.t5xxl.device
        hidden = self.t5xxl.model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        if not weighted:
            return hidden
        z_empty, hidden = hidden[-1:].float(), hidden[:-1]
        return (z_empty + weights.to(device)[..., None] * (hidden.float() - z_empty)).to(hidden.dtype)


@dataclass
class LoadedHiDreamText:
    encoder: HiDreamTextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = FAMILY


def _hidream_clip(file: TextEncoderFile, dtype: torch.dtype) -> tuple[TextEncoder, nn.Linear, set[str]]:
    """A CLIP-L or CLIP-G TextEncoder (``ldm.sd3_text``'s), its text projection (the identity where the file has
    none), and the file keys used; positions past 77 are left out (see the module docstring)."""
    positions = file.weights.get(_POSITIONS)
    if positions is not None and positions.shape[0] > CHUNK_LENGTH:
        file = replace(file, weights={**file.weights, _POSITIONS: positions[:CHUNK_LENGTH]})
    encoder, projection, used = _clip(file, file.kind, dtype)
    if projection is None:
        width = encoder.config.context_dim
        projection = nn.Linear(width, width, bias=False, dtype=dtype)
        weight = file.weights.get("text_projection.weight")
        projection.weight.data.copy_(torch.eye(width) if weight is None else weight)
    return encoder, projection.requires_grad_(False), used


def load_hidream_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.float32) -> LoadedHiDreamText:
    """HiDream's text-encoder files in any order (QuadrupleCLIPLoader's four: CLIP-L, CLIP-G, T5-XXL, Llama 3.1 8B;
    or fewer, one of each kind at most, told by their weights) as one HiDreamTextEncoder on `device` in `dtype`."""
    paths = [Path(p) for p in paths]
    found: dict[str, tuple[Path, dict[str, Tensor], TextEncoderFile | None]] = {}
    for path in paths:
        sd = ckpt.load_state_dict(path)
        clip = None
        if is_t5(sd):
            kind = "t5xxl"
        elif is_llama3(sd):
            kind = "llama"
        else:
            clip = read_text_encoder(path, sd)
            kind = clip.kind
        if kind in found or kind not in ENCODERS:
            held = " + ".join([*(f"{found[k][0].name} ({k})" for k in found), f"{path.name} ({kind})"])
            raise CheckpointError(f"HiDream takes one CLIP-L (clip_l), one CLIP-G (clip_g), one T5-XXL and one "
                                  f"Llama 3.1 8B file; {held}")
        found[kind] = (path, sd, clip)
    if not found:
        raise CheckpointError("HiDream's text encoder needs at least one file")
    encoders: dict[str, Any] = dict.fromkeys(ENCODERS)
    projections, unused = {}, []
    for kind, (path, sd, clip) in found.items():
        if kind == "t5xxl":
            encoders[kind], used = t5_from_weights(sd, path.name, dtype)
        elif kind == "llama":
            encoders[kind], used = llama_from_weights(sd, path.name, dtype)
        else:
            encoders[kind], projections[kind], used = _hidream_clip(clip, dtype)
        unused += [f"{path.name}: {k}" for k in sd if k not in used]
    encoder = HiDreamTextEncoder(**encoders, projections=projections)
    return LoadedHiDreamText(encoder.to(device).eval(), sorted(unused))
