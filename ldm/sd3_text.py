"""Stable Diffusion 3's text conditioning: CLIP-L, OpenCLIP bigG (CLIP-G) and T5-XXL as one encoder.

As ComfyUI and diffusers' StableDiffusion3Pipeline encode SD3 prompts: CLIP-L and CLIP-G give their penultimate
hidden states (without the final norm; 77-token chunks, emphasis, the shorter prompt padded with empty chunks),
concatenated along the width (768 + 1280) and zero-padded to T5's width (4096); T5's last hidden states (at least
77 tokens) follow them along the sequence. The pooled vector is CLIP-L's and CLIP-G's end-token states side by side
(768 + 1280 = 2048), CLIP-G's through its projection, CLIP-L's without (as Stability's sd3_infer and ComfyUI take it;
diffusers projects it: the two agree where that projection is the identity, as in Loom's tiny files). Any of the
three may be absent (SD3 files ship without T5, or without any): its part is then zeros, as in ComfyUI.

Files: ComfyUI's TripleCLIPLoader files (clip_l, clip_g, t5xxl, in transformers' names; the CLIP files with their
text_projection), or a checkpoint's ``text_encoders.clip_l.transformer.``, ``text_encoders.clip_g.transformer.``
and ``text_encoders.t5xxl.transformer.``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.parts import TextEncoderFile, read_text_encoder
from ldm.t5 import T5Encoder, is_t5, t5_from_weights
from ldm.text_encoders import (
    ClipConfig,
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    _num_heads,
    build_text_encoder,
)
from ldm.tokenizer import END_TOKEN

PREFIXES = {name: f"text_encoders.{name}.transformer." for name in ("clip_l", "clip_g", "t5xxl")}
SD3_MIN_LENGTH = 77  # ComfyUI's T5 prompt length for SD3 (diffusers' max_sequence_length, set to 77)
CONTEXT_WIDTH = 4096  # T5-XXL's; the CLIP part is padded to it
# Widths of the released encoders, for the zeros standing in for an absent one.
STANDARD_WIDTHS = {"clip_l": 768, "clip_g": 1280}
# Our TextEncoder reads transformers-named CLIP weights under this LDM prefix ("hf" layout).
_HF = "text_model."
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")


def clip_config(kind: str, weights: StateDict) -> TextEncoderConfig:
    """A one-encoder TextEncoder config for SD3's CLIP-L or CLIP-G from transformers-named weights: penultimate
    layer without the final norm, the end token (CLIP-L) or 0 (CLIP-G) as padding. (Its projection is
    SD3TextEncoder's: TextEncoder reads one in OpenCLIP's layout only.)"""
    hidden = weights["text_model.embeddings.token_embedding.weight"].shape[1]
    clip = ClipConfig(
        name=kind, ldm_prefix=_HF, layout="hf", hidden_size=hidden,
        num_layers=len({int(m[1]) for k in weights if (m := _LAYER.match(k))}), num_heads=_num_heads(hidden),
        intermediate_size=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        activation="quick_gelu" if kind == "clip_l" else "gelu",
        projection_dim=None,
        pad_token=END_TOKEN if kind == "clip_l" else 0, layer_norm_hidden_state=False)
    return TextEncoderConfig(f"sd3_{kind}", (clip,), default_clip_skip=-2)


class SD3TextEncoder(nn.Module):
    """CLIP-L, CLIP-G and T5 (each optional) with one `encode`, the interface of ``ldm.text_encoders.TextEncoder``;
    `projections` are text projections of the pooled states by encoder name (CLIP-G's; others pool unprojected)."""

    def __init__(self, clip_l: TextEncoder | None, clip_g: TextEncoder | None, t5xxl: T5Encoder | None,
                 projections: dict[str, nn.Linear] | None = None) -> None:
        super().__init__()
        if clip_l is None and clip_g is None and t5xxl is None:
            raise ValueError("SD3's text encoder needs at least one of CLIP-L, CLIP-G and T5-XXL")
        self.clip_l, self.clip_g, self.t5xxl = clip_l, clip_g, t5xxl
        self.projections = nn.ModuleDict(projections or {})
        self.context_width = CONTEXT_WIDTH if t5xxl is None else t5xxl.config.d_model
        clip_width = sum(STANDARD_WIDTHS[n] if e is None else e.config.context_dim
                         for n, e in (("clip_l", clip_l), ("clip_g", clip_g)))
        if (clip_l is not None or clip_g is not None) and clip_width > self.context_width:
            raise ValueError(f"CLIP-L and CLIP-G are {clip_width} wide together, wider than T5's "
                             f"{self.context_width}: these text encoders are not one SD3 model's")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None,
               drop_empty: bool = False) -> TextEncoding:
        """`cond` [B, L, context width]: the CLIP part then T5's; `pooled` [B, 2048]. `per_encoder` gives encoders
        prompts of their own ({"clip_l": [...], "clip_g": [...], "t5xxl": [...]}, CLIPTextEncodeSD3's three texts).
        `drop_empty` (CLIPTextEncodeSD3's empty_padding "none") leaves out T5's part where its prompts are empty,
        and the CLIP part where both CLIP prompts are. Textual-inversion embeddings apply to the CLIP prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = {name: (per_encoder or {}).get(name, prompts) for name in PREFIXES}
        unknown = set(per_encoder or {}) - set(texts)
        if unknown or any(len(t) != len(prompts) for t in texts.values()):
            raise ValueError(f"per_encoder takes {len(prompts)} prompts for clip_l, clip_g and/or t5xxl, got "
                             f"{({k: len(v) for k, v in (per_encoder or {}).items()})}")
        batch, device = len(prompts), self.device

        def empty(name: str) -> bool:
            return drop_empty and all(text == "" for text in texts[name])

        parts, pooled = [], []
        has_clip = self.clip_l is not None or self.clip_g is not None
        if has_clip and not (empty("clip_l") and empty("clip_g")):
            clip = self._clip(texts, clip_skip, embeddings)
            parts.append(F.pad(torch.cat([cond for cond, _ in clip], dim=-1), (0, self.context_width - sum(
                cond.shape[-1] for cond, _ in clip))))
            pooled = [p for _, p in clip]
        if self.t5xxl is not None and not empty("t5xxl"):
            parts.append(self.t5xxl.encode(texts["t5xxl"], SD3_MIN_LENGTH).to(device))
        if not parts:
            parts.append(torch.zeros(batch, SD3_MIN_LENGTH, self.context_width, device=device, dtype=self.dtype))
        if not pooled:
            pooled = [torch.zeros(batch, self._pooled_width(name), device=device, dtype=self.dtype)
                      for name in ("clip_l", "clip_g")]
        return TextEncoding(torch.cat([p.to(self.dtype) for p in parts], dim=1), torch.cat(pooled, dim=-1))

    def _clip(self, texts: dict[str, list[str]], clip_skip: int | None,
              embeddings: Callable[[str], dict[int, Tensor] | None] | None) -> list[tuple[Tensor, Tensor]]:
        """(hidden states, pooled) of CLIP-L and CLIP-G (zeros for an absent one), padded to the same chunks."""
        out = {}
        for name in ("clip_l", "clip_g"):
            encoder = getattr(self, name)
            if encoder is not None:
                encoding = encoder.encode(texts[name], clip_skip, embeddings=embeddings)
                pooled = encoding.pooled
                out[name] = (encoding.cond, self.projections[name](pooled) if name in self.projections else pooled)
        length = max(cond.shape[1] for cond, _ in out.values())
        for name, (cond, pool) in out.items():
            if cond.shape[1] < length:  # the shorter prompt's extra 77-token chunks: the empty prompt's encoding
                blank = getattr(self, name).encode([""] * cond.shape[0], clip_skip).cond
                cond = torch.cat([cond, blank.repeat(1, (length - cond.shape[1]) // blank.shape[1], 1)], dim=1)
            out[name] = (cond, pool)
        like, _ = next(iter(out.values()))
        return [out.get(name) or (like.new_zeros(*like.shape[:2], STANDARD_WIDTHS[name]),
                                  like.new_zeros(like.shape[0], self._pooled_width(name)))
                for name in ("clip_l", "clip_g")]

    def _pooled_width(self, name: str) -> int:
        encoder = getattr(self, name)
        if encoder is None:
            return STANDARD_WIDTHS[name]
        return self.projections[name].out_features if name in self.projections else encoder.config.context_dim


def _clip(file: TextEncoderFile, kind: str, dtype: torch.dtype) -> tuple[TextEncoder, nn.Linear | None, set[str]]:
    """A TextEncoder and its projection (CLIP-G's; see the module docstring) from a CLIP file read by ``ldm.parts``;
    the file keys it used or knowingly ignored."""
    weights = file.weights
    encoder = build_text_encoder(clip_config(kind, weights), device="meta", dtype=dtype)
    try:
        encoder.load_ldm_state_dict({k: v for k, v in weights.items() if k.startswith(_HF)})
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file.path.name} ({kind}): {e}") from None
    projection = None
    if kind == "clip_g" and "text_projection.weight" in weights:
        out_features, in_features = weights["text_projection.weight"].shape
        projection = nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        projection.weight.data.copy_(weights["text_projection.weight"])
    return encoder, projection, {file.sources[k] for k in weights} | set(file.ignored)


@dataclass
class LoadedSD3Text:
    encoder: SD3TextEncoder
    unused_keys: list[str]  # "file name: key"


def load_sd3_text_encoders(paths: list[str | Path], device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, complete: bool = True) -> LoadedSD3Text:
    """A CLIP-L, a CLIP-G and a T5-XXL file, in any order (TripleCLIPLoader's), as one SD3TextEncoder;
    `complete=False` takes any of them, one file of each kind at most (the absent ones encode as zeros)."""
    paths = [Path(p) for p in paths]
    files = {path: ckpt.load_state_dict(path) for path in paths}
    found: dict[str, tuple[Path, TextEncoderFile | None]] = {}
    for path, sd in files.items():
        kind, clip = ("t5xxl", None) if is_t5(sd) else (None, read_text_encoder(path, sd))
        kind = kind or clip.kind
        if kind in found or kind not in PREFIXES:
            held = " + ".join([*(found[k][0].name + f" ({k})" for k in found), f"{path.name} ({kind})"])
            raise CheckpointError(f"SD3 takes one CLIP-L (clip_l), one CLIP-G (clip_g) and one T5-XXL file; {held}")
        found[kind] = (path, clip)
    if complete and set(found) != set(PREFIXES):
        raise CheckpointError(f"{' and '.join(p.name for p in paths)}: SD3 takes CLIP-L, CLIP-G and T5-XXL files; "
                              f"{', '.join(sorted(set(PREFIXES) - set(found)))} missing")
    encoders, projections, unused = {}, {}, []
    for kind, (path, clip) in found.items():
        if clip is None:
            encoders[kind], used = t5_from_weights(files[path], path.name, dtype)
        else:
            encoders[kind], projection, used = _clip(clip, kind, dtype)
            projections.update({kind: projection} if projection is not None else {})
        unused += [f"{path.name}: {k}" for k in files[path] if k not in used]
    encoder = SD3TextEncoder(encoders.get("clip_l"), encoders.get("clip_g"), encoders.get("t5xxl"), projections)
    return LoadedSD3Text(encoder.to(device).eval(), sorted(unused))


def load_some_sd3_text_encoders(paths: list[str | Path], device: torch.device | str = "cpu",
                                dtype: torch.dtype = torch.float32) -> LoadedSD3Text:
    """One or two of SD3's text-encoder files (DualCLIPLoader's and CLIPLoader's type sd3), the others absent."""
    return load_sd3_text_encoders(paths, device, dtype, complete=False)


def has_sd3_text_encoders(sd: StateDict) -> bool:
    return any(k.startswith(tuple(PREFIXES.values())) for k in sd)


def sd3_text_encoders_from_checkpoint(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                                      dtype: torch.dtype = torch.float32) -> tuple[SD3TextEncoder, set[str]]:
    """The text encoders an SD3 checkpoint holds (any of the three; ComfyUI's layout) and the keys used."""
    encoders: dict[str, nn.Module | None] = dict.fromkeys(PREFIXES)
    projections: dict[str, nn.Linear] = {}
    used: set[str] = set()
    for kind, prefix in PREFIXES.items():
        weights = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not weights:
            continue
        if kind == "t5xxl":
            encoders[kind], keys = t5_from_weights(weights, path.name, dtype)
        else:
            encoders[kind], projection, keys = _clip(read_text_encoder(path, weights), kind, dtype)
            projections.update({kind: projection} if projection is not None else {})
        used |= {prefix + k for k in keys}
    return SD3TextEncoder(**encoders, projections=projections).to(device).eval(), used
