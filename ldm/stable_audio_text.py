"""Stable Audio Open's text encoder, T5-base (Google's original T5, v1.0: ReLU feed-forward), as ComfyUI's CLIPLoader
type "stable_audio" runs it on the t5-base.safetensors file users have (transformers' T5EncoderModel layout).

Tokens (ComfyUI's SAT5 tokenizer): the prompt's T5 tokens (``ldm.t5.T5Tokenizer``: the same SentencePiece vocabulary
as every T5's; emphasis, word by word), the end token, then padding (0) up to 128 tokens; a longer prompt is never cut
(diffusers' StableAudioPipeline pads or cuts to exactly 128).

Encoding (ComfyUI's: attention masks on, `zero_out_masked` on; diffusers' pipeline likewise): the encoder attends to
each prompt's tokens up to and including its end token, and the states at the padding are zeroed. The transformer
takes no mask: the padding acts through its zeros (`ldm.stable_audio.stable_audio_conditioning`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError
from ldm.ltxv_text import encode_masked
from ldm.t5 import T5Encoder, is_t5, t5_from_weights
from ldm.text_encoders import PinnableTextEncoder, TextEncoding

# ComfyUI's minimum prompt length for Stable Audio's T5 (its tokenizer's min_length); diffusers' model_max_length.
MIN_LENGTH = 128


def is_t5_base(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict (or a header's shapes) is an original T5 (v1.0) encoder, whose feed-forward is a ReLU
    (`wi`), as t5-base's; T5 v1.1 (Flux's and SD3's T5-XXL) gates it (`wi_0`, `wi_1`)."""
    return is_t5(sd) and "encoder.block.0.layer.1.DenseReluDense.wi.weight" in sd


class StableAudioTextEncoder(PinnableTextEncoder):
    """T5-base alone, encoding as ComfyUI does for Stable Audio (see the module docstring); the interface of
    ``ldm.text_encoders.TextEncoder``: `encode` gives T5's states with the padding zeroed and no pooled vector.
    Pinned to the CPU (`pinned_to_cpu`, CLIPLoader's device "cpu"), `.to()` changes its dtype only."""

    def __init__(self, t5base: T5Encoder) -> None:
        super().__init__()
        self.t5base = t5base

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: [B, max(128, longest prompt), 768], zero where a prompt is padded. Clip skip and textual-inversion
        embeddings do not apply to T5 (ComfyUI's `embedding:` words are read as text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = (per_encoder or {}).get("t5base", prompts)
        hidden, mask = encode_masked(self.t5base, texts, MIN_LENGTH)
        return TextEncoding(hidden * mask.to(hidden.device, hidden.dtype)[..., None], None, {})


@dataclass
class LoadedStableAudioText:
    encoder: StableAudioTextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = "stable_audio"


def load_stable_audio_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                                   dtype: torch.dtype = torch.float32) -> LoadedStableAudioText:
    """One T5-base file (t5-base.safetensors) as Stable Audio's text encoder, on `device` in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"Stable Audio takes one T5-base text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    if not is_t5_base(sd):
        held = "T5 v1.1 (T5-XXL, Flux's and SD3's text encoder)" if is_t5(sd) else "no T5 encoder"
        raise CheckpointError(f"{path.name}: not T5-base, Stable Audio's text encoder: it holds {held}; CLIPLoader "
                              "type stable_audio takes t5-base.safetensors (google-t5/t5-base's encoder)")
    encoder, used = t5_from_weights(sd, path.name, dtype)
    # google-t5/t5-base's model.safetensors is the whole encoder-decoder; its decoder is not used, as expected
    unused = sorted(f"{path.name}: {k}" for k in sd if k not in used and not k.startswith(("decoder.", "lm_head.")))
    return LoadedStableAudioText(StableAudioTextEncoder(encoder).to(device).eval(), unused)


# A tiny T5-base shape for tests and `main.py make-stable-audio`: as wide as TINY_STABLE_AUDIO's prompt input.
TINY_T5_BASE_WIDTH = 64


def write_tiny_t5_base(path: str | Path, seed: int = 0, width: int = TINY_T5_BASE_WIDTH,
                       dtype: torch.dtype = torch.float32) -> Path:
    """Write a random original-T5 (ReLU) encoder `width` wide in transformers' layout, with T5's whole vocabulary
    (its tokenizer's ids index it); returns the path."""
    from ldm.flux_presets import distinct_random_
    from ldm.t5 import T5Config, build_t5

    config = T5Config(d_model=width, d_kv=width // 4, d_ff=width * 2, num_layers=2, num_heads=4, gated=False)
    model = distinct_random_(build_t5(config).model.eval(), seed, norm_scales=("layer_norm.weight",))
    weights = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied: shared
    ckpt.write_safetensors(weights, path, {"loom.seed": str(seed)}, dtype)
    return Path(path)
