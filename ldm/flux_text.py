"""Flux.1's text conditioning: T5-XXL's hidden states for the transformer's text tokens, and CLIP-L's pooled vector.

As ComfyUI encodes Flux prompts: the CLIP-L prompt goes through SD1's CLIP-L (``ldm.text_encoders``, 77-token
chunks, emphasis) and only its pooled end-token state is used (no projection); the T5 prompt goes through
``ldm.t5`` (padded to at least 256 tokens). Clip skip changes nothing: the pooled state is the last layer's.

Files: a CLIP-L file and a T5 file (DualCLIPLoader's type "flux", either order), or an all-in-one checkpoint's
``text_encoders.clip_l.transformer.`` (transformers' CLIPTextModel names) and ``text_encoders.t5xxl.transformer.``
(transformers' T5 names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.parts import TextEncoderFile, read_text_encoder
from ldm.t5 import FLUX_MIN_LENGTH, T5Encoder, is_t5, t5_from_weights
from ldm.text_encoders import (
    PinnableTextEncoder,
    TextEncoder,
    TextEncoding,
    build_text_encoder,
    text_encoder_config_from_state_dict,
)

CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
# Where SD1's TextEncoder reads CLIP-L from: the part files are mapped there to build it.
_SD1_PREFIX = "cond_stage_model.transformer."


class FluxTextEncoder(PinnableTextEncoder):
    """CLIP-L and T5 with one `encode`, the interface of ``ldm.text_encoders.TextEncoder``. Pinned to the CPU
    (`pinned_to_cpu`, DualCLIPLoader's device "cpu"), `.to()` changes its dtype only, so the engine leaves it there."""

    def __init__(self, clip_l: TextEncoder, t5xxl: T5Encoder, min_length: int = FLUX_MIN_LENGTH) -> None:
        super().__init__()
        self.clip_l = clip_l
        self.t5xxl = t5xxl
        self.min_length = min_length

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: T5's hidden states [B, L, 4096]; `pooled`: CLIP-L's [B, 768]. `per_encoder` gives one of them
        prompts of its own ({"clip_l": [...], "t5xxl": [...]}, CLIPTextEncodeFlux's two texts). Textual-inversion
        embeddings apply to CLIP-L's prompt only; T5 reads `embedding:NAME` as words."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = {name: (per_encoder or {}).get(name, prompts) for name in ("clip_l", "t5xxl")}
        unknown = set(per_encoder or {}) - set(texts)
        if unknown or any(len(t) != len(prompts) for t in texts.values()):
            raise ValueError(f"per_encoder takes {len(prompts)} prompts for clip_l and/or t5xxl, got "
                             f"{({k: len(v) for k, v in (per_encoder or {}).items()})}")
        pooled = self.clip_l.encode(texts["clip_l"], clip_skip, embeddings=embeddings).pooled
        return TextEncoding(self.t5xxl.encode(texts["t5xxl"], self.min_length), pooled)


@dataclass
class LoadedFluxText:
    encoder: FluxTextEncoder
    unused_keys: list[str]  # "file name: key"


def _clip_l(weights: StateDict, name: str, dtype: torch.dtype) -> tuple[TextEncoder, set[str]]:
    """SD1's TextEncoder from CLIP-L weights under SD1's LDM prefix; the keys it used."""
    config = text_encoder_config_from_state_dict(weights)
    if config is None or config.family != "sd1":
        raise CheckpointError(f"{name}: no CLIP-L text encoder weights")
    encoder = build_text_encoder(config, device="meta", dtype=dtype)
    try:
        return encoder, encoder.load_ldm_state_dict(weights)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{name}: {e}") from None


def _assemble(clip: TextEncoderFile, t5_weights: StateDict, t5_name: str,
              dtype: torch.dtype) -> tuple[FluxTextEncoder, set[str], set[str]]:
    """(the encoder, the CLIP-L file keys it used or knowingly ignored, the T5 keys it used)."""
    if clip.kind != "clip_l":
        raise CheckpointError(f"{clip.path.name} holds {clip.kind}; Flux's other text encoder is CLIP-L (clip_l)")
    # CLIP-L's projection goes unused: Flux takes the pooled state as it is.
    clip_weights = {_SD1_PREFIX + k: v for k, v in clip.weights.items() if k.startswith("text_model.")}
    clip_encoder, clip_used = _clip_l(clip_weights, clip.path.name, dtype)
    t5_encoder, t5_used = t5_from_weights(t5_weights, t5_name, dtype)
    clip_keys = ({clip.sources[k[len(_SD1_PREFIX):]] for k in clip_used} | set(clip.ignored)
                 | {clip.sources[k] for k in clip.weights if not k.startswith("text_model.")})
    return FluxTextEncoder(clip_encoder, t5_encoder), clip_keys, t5_used


def load_flux_text_encoders(paths: list[str | Path], device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> LoadedFluxText:
    """A CLIP-L file and a T5 file, in either order, as one FluxTextEncoder on `device` in `dtype`."""
    paths = [Path(p) for p in paths]
    files = {path: ckpt.load_state_dict(path) for path in paths}
    t5_files = [path for path, sd in files.items() if is_t5(sd)]
    if len(paths) != 2 or len(t5_files) != 1:
        names = " and ".join(p.name for p in paths)
        raise CheckpointError(f"{names}: Flux takes one CLIP-L file (clip_l.safetensors) and one T5-XXL file "
                              f"(t5xxl_fp16.safetensors); {len(t5_files)} of these are T5")
    t5_path = t5_files[0]
    clip_path = next(path for path in paths if path != t5_path)
    clip = read_text_encoder(clip_path, files[clip_path])
    encoder, clip_keys, t5_used = _assemble(clip, files[t5_path], t5_path.name, dtype)
    unused = [f"{clip_path.name}: {k}" for k in clip.keys if k not in clip_keys]
    unused += [f"{t5_path.name}: {k}" for k in files[t5_path] if k not in t5_used]
    return LoadedFluxText(encoder.to(device).eval(), sorted(unused))


def has_flux_text_encoders(sd: StateDict) -> bool:
    return any(k.startswith(CLIP_PREFIX) for k in sd) and any(k.startswith(T5_PREFIX) for k in sd)


def flux_text_encoders_from_checkpoint(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                                       dtype: torch.dtype = torch.float32) -> tuple[FluxTextEncoder, set[str]]:
    """The text encoders of an all-in-one Flux checkpoint (ComfyUI's layout) and the keys used."""
    clip = read_text_encoder(path, {k[len(CLIP_PREFIX):]: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)})
    t5_weights = {k[len(T5_PREFIX):]: v for k, v in sd.items() if k.startswith(T5_PREFIX)}
    encoder, clip_keys, t5_used = _assemble(clip, t5_weights, path.name, dtype)
    return encoder.to(device).eval(), {CLIP_PREFIX + k for k in clip_keys} | {T5_PREFIX + k for k in t5_used}
