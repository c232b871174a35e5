"""The T5 text encoder of Flux (Google's T5 v1.1 XXL encoder) on transformers' T5EncoderModel, with its tokenizer.

Tokenizer: T5's SentencePiece unigram vocabulary (32,100 tokens) from ldm/data/t5_tokenizer.json.gz, read with the
`tokenizers` library (see ldm/data/LICENSE.t5). Prompts keep ComfyUI's emphasis syntax (``ldm.tokenizer``): each word
is tokenized alone, with its segment's weight; the end token (1) follows the last word, and padding (0) fills the
sequence up to `min_length` tokens. ComfyUI pads Flux's prompts to at least 256 tokens and never cuts a longer one;
diffusers' FluxPipeline pads or cuts to `max_sequence_length` (512 for dev, 256 for schnell). Neither gives the
encoder an attention mask: the padding is attended to, as Flux was trained.

Weights: the single-file encoders ComfyUI users have (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors) hold
transformers' key layout (``encoder.block.N.layer.0.SelfAttention.q.weight``, ``shared.weight``,
``encoder.final_layer_norm.weight``); the configuration is read from their shapes. fp8 weights are cast to the model
dtype as they load; "scaled" fp8 files (a ``scaled_fp8`` marker, each weight with its ``.scale_weight``) are scaled.

Prompt weights as ComfyUI applies them to T5: a token of weight w becomes ``z_empty + w * (z - z_empty)``, where
``z_empty`` is the encoding at the same position of the empty prompt (the end token, then padding).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.tokenizer import DATA_DIR, parse_emphasis

PAD_TOKEN = 0
END_TOKEN = 1
VOCAB_FILE = DATA_DIR / "t5_tokenizer.json.gz"
# ComfyUI's minimum prompt length for Flux's T5 (its T5XXL tokenizer's min_length).
FLUX_MIN_LENGTH = 256
# ComfyUI's T5TokenizerOptions (min_padding, min_length; None: the encoder's own) for the prompts T5 tokenizes within
# `tokenizer_options`: a CLIP that carries them sets them around its encoding.
_OPTIONS: ContextVar[tuple[int | None, int | None]] = ContextVar("t5_tokenizer_options", default=(None, None))
_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")
_TIED = "encoder.embed_tokens.weight"  # transformers ties it to shared.weight; some files store both


@lru_cache(maxsize=1)
def _vocabulary() -> Any:
    from tokenizers import Tokenizer

    with gzip.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        return Tokenizer.from_str(f.read())


@dataclass(frozen=True)
class T5Tokens:
    """One prompt's token ids (its end token included, no padding) and their weights."""

    ids: list[int]
    weights: list[float]


class T5Tokenizer:
    """T5's SentencePiece vocabulary with ComfyUI's prompt emphasis and padding."""

    def encode_words(self, text: str) -> list[list[int]]:
        """Token ids of each whitespace-separated word of `text`, without the end token."""
        words = text.split()
        if not words:
            return []
        return [encoding.ids for encoding in _vocabulary().encode_batch(words, add_special_tokens=False)]

    def tokenize(self, prompt: str) -> T5Tokens:
        """Parse emphasis, tokenize word by word, and close with the end token."""
        ids: list[int] = []
        weights: list[float] = []
        for text, weight in parse_emphasis(prompt):
            for word in self.encode_words(text):
                ids += word
                weights += [weight] * len(word)
        return T5Tokens([*ids, END_TOKEN], [*weights, 1.0])

    def batch(self, prompts: list[str], min_length: int = FLUX_MIN_LENGTH,
              max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """(ids [B, L], weights [B, L]) of `prompts`, padded to the longest of them and to at least `min_length`;
        with `max_length`, cut to it (keeping the end token last), as diffusers' pipelines do. Within
        `tokenizer_options`, its pad tokens follow each prompt and its minimum length replaces `min_length`."""
        tokens = [self.tokenize(prompt) for prompt in prompts]
        min_padding, options_length = _OPTIONS.get()
        if min_padding:  # pad tokens after each prompt's end token, which the encoder then attends to
            tokens = [T5Tokens(t.ids + [PAD_TOKEN] * min_padding, t.weights + [1.0] * min_padding) for t in tokens]
        min_length = min_length if options_length is None else options_length
        if max_length is not None:
            tokens = [t if len(t.ids) <= max_length else
                      T5Tokens([*t.ids[:max_length - 1], END_TOKEN], [*t.weights[:max_length - 1], 1.0])
                      for t in tokens]
        length = max(min_length, *(len(t.ids) for t in tokens))
        ids = [t.ids + [PAD_TOKEN] * (length - len(t.ids)) for t in tokens]
        weights = [t.weights + [1.0] * (length - len(t.weights)) for t in tokens]
        return torch.tensor(ids), torch.tensor(weights)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (for debugging and tests)."""
        return _vocabulary().decode(ids, skip_special_tokens=True)


@dataclass(frozen=True)
class T5Config:
    """The shape of a T5 encoder; what the weights cannot tell (the epsilon, the bucket distance) is T5's."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    gated: bool = True  # T5 v1.1's gated-GELU feed-forward; False: the original T5's ReLU

    def transformers_config(self) -> Any:
        from transformers import T5Config as HFConfig

        return HFConfig(vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
                        num_layers=self.num_layers, num_heads=self.num_heads,
                        relative_attention_num_buckets=self.relative_attention_num_buckets,
                        relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                        feed_forward_proj="gated-gelu" if self.gated else "relu", is_encoder_decoder=False,
                        use_cache=False, pad_token_id=PAD_TOKEN, eos_token_id=END_TOKEN)


def is_t5(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict is a T5 encoder in transformers' layout (UMT5, `is_umt5`, is not)."""
    return _PROBE in sd and not is_umt5(sd)


def is_umt5(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict is a UMT5 encoder (Wan's, ``ldm.umt5``): T5's layout with a relative position bias in
    every block, where T5 has one in its first block only."""
    return _PROBE in sd and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in sd


def t5_config_from_state_dict(sd: Mapping[str, Tensor]) -> T5Config:
    """The exact encoder shape from a transformers-layout T5 state dict (tensors or meta tensors)."""
    embedding = sd.get("shared.weight", sd.get(_TIED))
    bias = sd.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if embedding is None or bias is None or _PROBE not in sd:
        raise ValueError("not a T5 encoder: no shared.weight, relative_attention_bias or SelfAttention.q weights")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    feed_forward = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    buckets, heads = bias.shape
    return T5Config(vocab_size=embedding.shape[0], d_model=embedding.shape[1], d_kv=sd[_PROBE].shape[0] // heads,
                    d_ff=feed_forward.shape[0], num_layers=len({int(m[1]) for k in sd if (m := _BLOCK.match(k))}),
                    num_heads=heads, relative_attention_num_buckets=buckets, gated=gated)


class T5Encoder(nn.Module):
    """transformers' T5EncoderModel (as `.model`, whose parameter names are the file keys) with the tokenizer."""

    def __init__(self, config: T5Config) -> None:
        from transformers import T5EncoderModel

        super().__init__()
        self.config = config
        self.model = T5EncoderModel(config.transformers_config())
        self.tokenizer = T5Tokenizer()

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def load_weights(self, sd: Mapping[str, Tensor], name: str = "T5") -> set[str]:
        """Adopt a file's tensors (cast to this model's dtype); returns the keys used. A model built on the meta
        device takes them without a copy. Refuses, naming them, missing weights and wrong shapes."""
        sd = descaled_fp8(sd)
        expected = {k: v for k, v in self.model.state_dict().items() if k != _TIED}
        state: dict[str, Tensor] = {}
        missing, wrong = [], []
        for key, target in expected.items():
            tensor = sd.get(key, sd.get(_TIED) if key == "shared.weight" else None)
            if tensor is None:
                missing.append(key)
            elif tensor.shape != target.shape:
                wrong.append(f"{key}: {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            else:
                state[key] = tensor.to(target.device if not target.is_meta else tensor.device, target.dtype)
        if missing:
            raise ValueError(f"{name}: {len(missing)} weights missing, e.g. {missing[:4]}")
        if wrong:
            raise ValueError(f"{name}: weights of the wrong shape: {wrong[:4]}")
        on_meta = any(p.is_meta for p in self.model.parameters())
        self.model.load_state_dict(state, strict=False, assign=on_meta)
        self.model.encoder.embed_tokens = self.model.shared  # the tie, which assign replaces
        return set(state) | ({_TIED} & set(sd)) | scaling_keys(sd)

    def forward(self, ids: Tensor) -> Tensor:
        """The last hidden state (after T5's final RMS norm) of token ids [B, L]."""
        return self.model(input_ids=ids.to(self.device)).last_hidden_state

    def encode(self, prompts: list[str], min_length: int = FLUX_MIN_LENGTH,
               max_length: int | None = None) -> Tensor:
        """Prompts (emphasis allowed) -> hidden states [B, L, d_model], weighted as the module docstring says."""
        ids, weights = self.tokenizer.batch(prompts, min_length, max_length)
        weights = weights.to(self.device).unsqueeze(-1)
        weighted = bool((weights != 1.0).any())
        if weighted:
            empty = torch.full((1, ids.shape[1]), PAD_TOKEN)
            empty[0, 0] = END_TOKEN
            ids = torch.cat([ids, empty])
        hidden = self(ids)
        if not weighted:
            return hidden
        z_empty, hidden = hidden[-1:].float(), hidden[:-1]
        return (z_empty + weights * (hidden.float() - z_empty)).to(hidden.dtype)


@contextmanager
def tokenizer_options(min_padding: int | None = None, min_length: int | None = None) -> Iterator[None]:
    """T5 tokenizes the prompts encoded within with `min_padding` pad tokens after each prompt's end token and at
    least `min_length` tokens in all, in place of the encoder's own minimum (ComfyUI's T5TokenizerOptions; None
    leaves either as it is)."""
    token = _OPTIONS.set((min_padding, min_length))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def descaled_fp8(sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The weights of a scaled fp8 file multiplied by their scales; other files as they are. Two spellings: ComfyUI's
    "scaled fp8" (a `scaled_fp8` marker, each weight with its `.scale_weight`) and its newer "mixed precision" files
    (each quantized layer's `.weight_scale` beside a `.comfy_quant` JSON tag naming the format; the other layers in
    bf16). A per-tensor scale, or one per output row; NVFP4 and MXFP8 layers of mixed files are dequantized from
    their block scales (``ldm.quant_formats``), in float32. Used for T5 and the diffusion transformers' loaders."""
    from ldm.quant_formats import BLOCK_FORMATS, block_layers

    scales = {}
    for key, scale in sd.items():
        for suffix in (".scale_weight", ".weight_scale"):
            if key.endswith(suffix):
                scales[key[: -len(suffix)] + ".weight"] = scale
    if not scales:
        return sd
    for key in sd:
        if key.endswith(".comfy_quant"):
            _check_quant_format(key, sd[key], BLOCK_FORMATS)
    return _Descaled(sd, scales, block_layers(sd))


class _Descaled(Mapping[str, Tensor]):
    """`descaled_fp8`'s answer: each scaled weight descaled (a block layer dequantized) when it is read, in float32,
    so that a loader casting weight by weight to its dtype never holds a 19B model in float32 whole."""

    def __init__(self, sd: Mapping[str, Tensor], scales: dict[str, Tensor], blocks: dict[str, str]) -> None:
        self._sd, self._scales, self._blocks = sd, scales, blocks

    def __getitem__(self, key: str) -> Tensor:
        from ldm.quant_formats import dequantized

        value = self._sd[key]
        if key in self._blocks:
            return dequantized(self._sd, key, self._blocks[key])
        return descale(value, self._scales[key]) if key in self._scales and not value.is_meta else value

    def __contains__(self, key: object) -> bool:
        return key in self._sd

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)


def descale(weight: Tensor, scale: Tensor) -> Tensor:
    """A scaled fp8 weight in float32: times its per-tensor scale, or its per-output-row one."""
    scale = scale.float()
    if scale.ndim == 1 and scale.numel() == weight.shape[0] > 1:  # one scale per output row
        scale = scale.reshape(-1, *[1] * (weight.ndim - 1))
    return weight.float() * scale


# The `.comfy_quant` formats whose weights are values times their scales (ComfyUI's mixed-precision files).
_PLAIN_QUANT = ("float8_e4m3fn", "float8_e5m2", "int8")


def _check_quant_format(key: str, tag: Tensor, blocks: tuple[str, ...] = ()) -> None:
    """Refuse a layer whose ComfyUI quantization tag names a format Loom cannot read here: any but the plain ones
    and the block formats `blocks` (NVFP4, MXFP8: those `descaled_fp8` dequantizes)."""
    from ldm.checkpoint import CheckpointError
    from ldm.quant_formats import tag_format

    fmt = tag_format(tag)
    if fmt and fmt not in blocks and not fmt.startswith(_PLAIN_QUANT):
        readable = ", ".join(_PLAIN_QUANT + blocks)
        raise CheckpointError(f"{key.removesuffix('.comfy_quant')} is quantized as {fmt}, which Loom cannot read "
                              f"(it reads {readable} weights with their scales); use the model's bf16 or fp8 file")


def scaling_keys(sd: Mapping[str, Tensor]) -> set[str]:
    """A scaled fp8 file's scales, quantization tags and marker, which `descaled_fp8` consumes (input scales serve fp8
    matmuls only, and Loom computes in the model dtype)."""
    suffixes = (".scale_weight", ".scale_input", ".weight_scale", ".weight_scale_2", ".input_scale",
                ".comfy_quant")
    return {k for k in sd if k.endswith(suffixes) or k == "scaled_fp8"}


def build_t5(config: T5Config, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> T5Encoder:
    """A frozen (eval, no grad) T5 encoder; `device="meta"` allocates nothing until `load_weights`."""
    with torch.device(device or "cpu"):
        encoder = T5Encoder(config)
    if dtype is not None:
        encoder.to(dtype)
    return encoder.eval().requires_grad_(False)


def t5_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[T5Encoder, set[str]]:
    """The T5 encoder a state dict holds (its shape read from the weights), in `dtype`, and the keys it used; a
    CheckpointError naming `name` when it is not one."""
    from ldm.checkpoint import CheckpointError

    try:
        encoder = build_t5(t5_config_from_state_dict(sd), device="meta", dtype=dtype)
        return encoder, encoder.load_weights(sd, name)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None


def load_t5(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
            ) -> tuple[T5Encoder, list[str]]:
    """A single-file T5 encoder (transformers' layout, any float dtype) and the keys it did not use."""
    from ldm.checkpoint import load_state_dict

    path = Path(path)
    sd = load_state_dict(path)
    encoder, used = t5_from_weights(sd, path.name, dtype)
    return encoder.to(device), sorted(set(sd) - used)
