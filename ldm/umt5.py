"""Wan's text encoder, UMT5-XXL, on transformers' UMT5EncoderModel, with its tokenizer, as ComfyUI's CLIPLoader
type "wan" runs it.

Tokenizer: UMT5's SentencePiece unigram vocabulary (256,300 tokens: 256,000 pieces and 300 <extra_id_N>) from
ldm/data/umt5_tokenizer.json.xz, read with the `tokenizers` library (see ldm/data/LICENSE.umt5); byte fallback is
switched on as it loads, as SentencePiece itself reads UMT5's model (a character outside the vocabulary becomes
its UTF-8 byte pieces, not <unk>). Prompts keep ComfyUI's emphasis syntax and word-by-word tokenization
(``ldm.t5.T5Tokenizer``); the end token (1) follows the last word and padding (0) fills up to 512 tokens, ComfyUI's
minimum for Wan; a longer prompt is never cut (diffusers' WanPipeline cuts at 512).

Encoding (ComfyUI's UMT5XXlModel: attention masks, `zero_out_masked`; diffusers' WanPipeline likewise): the encoder
attends to each prompt's tokens up to and including its end token, never to the padding, and the states at the
padding positions are zeros. The result is [B, max(512, longest), d_model]: the prompt's states, then zeros.

Weights: ComfyUI's files (umt5_xxl_fp16.safetensors, umt5_xxl_fp8_e4m3fn_scaled.safetensors) hold transformers' key
layout, as T5's do, with a relative position bias in every block (T5 v1.1 has one in its first block only) and a
256,384-row embedding; the shape is read from the weights, fp8 and scaled fp8 handled as ``ldm.t5`` does. Their
`spiece_model` tensor (the SentencePiece model, from which ComfyUI builds its tokenizer) goes unused: the stored
vocabulary is the same one.

Prompt weights as ComfyUI applies them: a token of weight w becomes ``z_empty + w * (z - z_empty)``, ``z_empty`` the
encoding of the empty prompt at the same position, masked the same way (so zero past its end token).
"""

from __future__ import annotations

import lzma
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.t5 import END_TOKEN, PAD_TOKEN, T5Config, T5Encoder, T5Tokenizer, is_t5, is_umt5, t5_config_from_state_dict
from ldm.text_encoders import PinnableTextEncoder, TextEncoding
from ldm.tokenizer import DATA_DIR

VOCAB_FILE = DATA_DIR / "umt5_tokenizer.json.xz"
# ComfyUI's minimum prompt length for Wan (its UMT5XXlTokenizer's min_length); diffusers' max_sequence_length.
WAN_MIN_LENGTH = 512
# The embedding rows of UMT5's checkpoints: the tokenizer's 256,300 tokens, rounded up.
UMT5_VOCAB_SIZE = 256384
SPIECE_KEY = "spiece_model"
_TIED = "encoder.embed_tokens.weight"
TINY_UMT5 = T5Config(vocab_size=UMT5_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)


@lru_cache(maxsize=1)
def _vocabulary() -> Any:
    from tokenizers import Tokenizer

    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        spec = f.read()
    # UMT5's SentencePiece model has the byte pieces <0x00>..<0xFF> and falls back to them; the json says it does not.
    return Tokenizer.from_str(spec.replace('"byte_fallback": false', '"byte_fallback": true'))


class UMT5Tokenizer(T5Tokenizer):
    """UMT5's vocabulary with T5's prompt handling (ComfyUI's emphasis, word by word, the end token, padding)."""

    def encode_words(self, text: str) -> list[list[int]]:
        words = text.split()
        if not words:
            return []
        return [encoding.ids for encoding in _vocabulary().encode_batch(words, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return _vocabulary().decode(ids, skip_special_tokens=True)


def attention_mask(ids: Tensor) -> Tensor:
    """ComfyUI's mask of token ids [B, L]: True up to and including each row's first end token."""
    ends = ids == END_TOKEN
    return (ends.cumsum(1) - ends.int()) == 0


def umt5_transformers_config(config: T5Config) -> Any:
    """transformers' UMT5Config of an encoder shape; the epsilon and bucket distance are UMT5's."""
    from transformers import UMT5Config

    return UMT5Config(vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
                      num_layers=config.num_layers, num_heads=config.num_heads,
                      relative_attention_num_buckets=config.relative_attention_num_buckets,
                      relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                      feed_forward_proj="gated-gelu" if config.gated else "relu", is_encoder_decoder=False,
                      use_cache=False, pad_token_id=PAD_TOKEN, eos_token_id=END_TOKEN)


class UMT5Encoder(T5Encoder):
    """transformers' UMT5EncoderModel (as `.model`, whose parameter names are the file keys) with the tokenizer;
    T5Encoder's loading (the same key layout, the same tied embedding) and properties."""

    def __init__(self, config: T5Config) -> None:
        from transformers import UMT5EncoderModel

        nn.Module.__init__(self)  # T5Encoder's attributes, on UMT5's model and vocabulary instead of T5's
        self.config = config
        self.model = UMT5EncoderModel(umt5_transformers_config(config))
        self.tokenizer = UMT5Tokenizer()

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """The last hidden state (after the final RMS norm) of token ids [B, L], attending where `mask` is True."""
        mask = None if mask is None else mask.to(self.device, torch.long)
        return self.model(input_ids=ids.to(self.device), attention_mask=mask).last_hidden_state

    def encode(self, prompts: list[str], min_length: int = WAN_MIN_LENGTH,
               max_length: int | None = None) -> Tensor:
        """Prompts (emphasis allowed) -> [B, L, d_model]: each prompt's states to its end token, zeros after."""
        ids, weights = self.tokenizer.batch(prompts, min_length, max_length)
        weighted = bool((weights != 1.0).any())
        if weighted:
            empty = torch.full((1, ids.shape[1]), PAD_TOKEN)
            empty[0, 0] = END_TOKEN
            ids = torch.cat([ids, empty])
        mask = attention_mask(ids).to(self.device)
        hidden = self(ids, mask).masked_fill(~mask.unsqueeze(-1), 0.0)
        if not weighted:
            return hidden
        z_empty, hidden = hidden[-1:].float(), hidden[:-1]
        weights = weights.to(self.device).unsqueeze(-1)
        mixed = (z_empty + weights * (hidden.float() - z_empty)).to(hidden.dtype)
        return torch.where(weights != 1.0, mixed, hidden)  # unweighted tokens exactly as encoded, as in ComfyUI


def build_umt5(config: T5Config, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> UMT5Encoder:
    """A frozen (eval, no grad) UMT5 encoder; `device="meta"` allocates nothing until `load_weights`."""
    with torch.device(device or "cpu"):
        encoder = UMT5Encoder(config)
    if dtype is not None:
        encoder.to(dtype)
    return encoder.eval().requires_grad_(False)


def _not_umt5(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    look = None if is_t5(sd) else look_of(sd)
    held = ("T5-XXL (Flux's and SD3's, with a position bias in its first block only)" if is_t5(sd) else
            look.what if look is not None else "no model layout Loom knows")
    return CheckpointError(f"{name}: not UMT5-XXL, Wan's text encoder: it holds {held}; CLIPLoader type wan takes "
                           "umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors")


def umt5_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[UMT5Encoder, set[str]]:
    """The UMT5 encoder a state dict holds (its shape read from the weights), in `dtype`, and the keys it used or
    knowingly ignored; a CheckpointError naming `name` when it is not one."""
    if not is_umt5(sd):
        raise _not_umt5(name, sd)
    try:
        encoder = build_umt5(t5_config_from_state_dict(sd), device="meta", dtype=dtype)
        return encoder, encoder.load_weights(sd, name) | ({SPIECE_KEY} & set(sd))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None


class WanTextEncoder(PinnableTextEncoder):
    """UMT5-XXL alone, encoding as ComfyUI does for Wan (see the module docstring); the interface of
    ``ldm.text_encoders.TextEncoder``: `encode` gives UMT5's states and no pooled vector. Pinned to the CPU
    (`pinned_to_cpu`, CLIPLoader's device "cpu"), `.to()` changes its dtype only."""

    main_encoder = "umt5xxl"

    def __init__(self, umt5xxl: UMT5Encoder) -> None:
        super().__init__()
        self.umt5xxl = umt5xxl

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: [B, max(512, longest prompt), d_model], each prompt's states then zeros. Clip skip and
        textual-inversion embeddings do not apply to UMT5 (ComfyUI's `embedding:` words are read as text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = (per_encoder or {}).get("umt5xxl", prompts)
        return TextEncoding(self.umt5xxl.encode(texts, WAN_MIN_LENGTH), None)


@dataclass
class LoadedWanText:
    encoder: WanTextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = "wan"


def load_wan_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> LoadedWanText:
    """One UMT5-XXL file (umt5_xxl_fp16.safetensors, fp8 and scaled fp8 copies) as Wan's text encoder, on `device`
    in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"Wan takes one UMT5-XXL text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    encoder, used = umt5_from_weights(sd, path.name, dtype)
    unused = sorted(f"{path.name}: {k}" for k in sd if k not in used)
    return LoadedWanText(WanTextEncoder(encoder).to(device).eval(), unused)


def random_umt5(config: T5Config = TINY_UMT5, seed: int = 0) -> UMT5Encoder:
    """A UMT5 encoder with every weight seeded and random, its norms too (not transformers' ones)."""
    with torch.random.fork_rng():  # transformers initialises from the global generator
        torch.manual_seed(seed)
        encoder = build_umt5(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in encoder.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return encoder


def write_tiny_umt5(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16,
                    config: T5Config = TINY_UMT5) -> Path:
    """A tiny random UMT5 file in ComfyUI's layout (transformers' keys, without the tied embed_tokens copy), with
    UMT5's full 256,384-row embedding so that real prompts' ids fit."""
    path = Path(path)
    state = {k: v for k, v in random_umt5(config, seed).model.state_dict().items() if k != _TIED}
    write_safetensors(state, path, {"loom.seed": str(seed)}, dtype)
    return path
