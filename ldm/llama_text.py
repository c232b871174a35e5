"""Llama 3.1 8B Instruct as a text encoder (HiDream-I1's fourth): its tokenizer, its weights from ComfyUI's single
files, and every layer's hidden states.

Weights: Comfy-Org's llama_3.1_8b_instruct_fp8_scaled.safetensors (and bf16 / fp16 copies) hold the language model in
transformers' LlamaForCausalLM names (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ``model.norm``,
perhaps ``lm_head``, which no encoding reads): no q/k norms, no biases. Llama 3.1 8B: 32 layers 4096 wide, 32 heads
and 8 key/value heads of 128, MLP 14336, 128,256 embedding rows, RMS epsilon 1e-5, RoPE base 500,000. The shape is
read from the weights (heads 128 wide; a quarter of the width in Loom's tiny test models, under 512 wide). Scaled fp8
files are descaled one weight at a time as they load (``ldm.qwen_text.load_prefixed``). The model runs on
transformers' LlamaModel, with plain RoPE as ComfyUI runs it (its Llama has no "llama3" frequency scaling, which
transformers applies for Llama 3.1's own config.json: the two differ slightly even on short prompts).

Tokenizer: Meta's byte-level BPE (tiktoken's format: a base64 token and its rank per line), the file
``llama_models/llama3/tokenizer.model`` of Meta's `llama-models` package, read into a `tokenizers` BPE with Llama 3's
split pattern; the 256 special tokens follow the 128,000 ranks as Meta's tokenizer.py names them
(`<|begin_of_text|>` 128000, `<|end_of_text|>` 128001, `<|eot_id|>` 128009, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.qwen_text import frozen_language_model
from ldm.t5 import scaling_keys

BEGIN_OF_TEXT = 128000
END_OF_TEXT = 128001
EOT = 128009  # <|eot_id|>: the end of a turn, Llama 3.1 Instruct's EOS, and HiDream's padding
VOCAB_SIZE = 128256  # 128,000 BPE ranks and 256 special tokens
LLAMA3_8B_WIDTH = 4096
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_NAMED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>")
SPECIAL_TOKENS = _NAMED_SPECIALS + tuple(f"<|reserved_special_token_{2 + i}|>"
                                         for i in range(256 - len(_NAMED_SPECIALS)))
TOKENIZER_PACKAGE = "llama-models==0.3.0"  # ships the vocabulary; installed --no-deps
_EMBED = "model.embed_tokens.weight"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Keys that make a Llama-layout file another model: Qwen3's q norm, Qwen2.5's biases, Gemma's extra norms, and the
# tokenizer Comfy-Org's Mistral files carry.
_NOT_LLAMA = ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_proj.bias",
              "model.layers.0.pre_feedforward_layernorm.weight", "tekken_model")


def vocabulary_file() -> Path:
    """Meta's tokenizer.model, from the llama-models package (a CheckpointError naming it when not installed)."""
    try:
        return Path(str(resources.files("llama_models") / "llama3" / "tokenizer.model"))
    except ModuleNotFoundError:
        raise CheckpointError(f"Llama 3's tokenizer comes from Meta's `llama-models` package, not installed: "
                              f"pip install --no-deps {TOKENIZER_PACKAGE}") from None


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken BPE file's token bytes and ranks."""
    from base64 import b64decode

    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):  # reads the ranks itself: tiktoken is not needed
        load_tiktoken_bpe = staticmethod(read_ranks)

    path = vocabulary_file()
    tokenizer = _Converter(vocab_file=path, pattern=PATTERN, extra_special_tokens=SPECIAL_TOKENS).converted()
    base = len(read_ranks(path))
    if tokenizer.token_to_id(SPECIAL_TOKENS[0]) != BEGIN_OF_TEXT or base != BEGIN_OF_TEXT:
        raise CheckpointError(f"{path}: {base} BPE ranks, not Llama 3's {BEGIN_OF_TEXT}")
    return tokenizer


def token_ids(text: str) -> list[int]:
    """`text` tokenized whole by Llama 3's tokenizer (no BOS), special tokens read as such."""
    return _tokenizer().encode(text, add_special_tokens=False).ids


def is_llama3(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a header's shapes) holds a Llama 3 language model in transformers' layout: Llama's
    keys (no Qwen, Gemma or Mistral tell) and Llama 3's 128,256-row embedding."""
    return (_EMBED in sd and "model.layers.0.mlp.gate_proj.weight" in sd and not any(k in sd for k in _NOT_LLAMA)
            and sd[_EMBED].shape[0] == VOCAB_SIZE)


def _layer_count(sd: Mapping[str, Any]) -> int:
    return len({int(m[1]) for k in sd if (m := _LAYER.match(k))})


def llama_config_from_state_dict(sd: Mapping[str, Any]) -> Any:
    """transformers' LlamaConfig of the language model in `sd`, its shape read from the weights; plain RoPE (see the
    module docstring)."""
    from transformers import LlamaConfig

    vocab, hidden = sd[_EMBED].shape
    head_dim = 128 if hidden >= 512 else hidden // 4
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
                       num_hidden_layers=_layer_count(sd),
                       num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                       num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                       head_dim=head_dim, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       max_position_embeddings=131072, tie_word_embeddings=False, use_cache=False,
                       bos_token_id=BEGIN_OF_TEXT, eos_token_id=EOT, pad_token_id=EOT)


def _refusal(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    look = look_of(sd)
    held = look.what if look is not None else "no model layout Loom knows"
    return CheckpointError(f"{name}: not Llama 3.1 8B (HiDream's llama_3.1_8b_instruct file): it holds {held}")


def llama_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[Any, set[str]]:
    """transformers' LlamaModel holding the language model in `sd`, frozen, in `dtype`, and the keys it used or
    knowingly ignored (an LM head, fp8 scales); a CheckpointError naming `name` when it is no Llama 3 of Llama 3.1
    8B's width (or a tiny one) or its weights do not fit."""
    from transformers import LlamaModel

    if not is_llama3(sd) or sd[_EMBED].shape[1] not in (LLAMA3_8B_WIDTH, *range(512)):
        raise _refusal(name, sd)
    config = llama_config_from_state_dict(sd)
    model, used = frozen_language_model(LlamaModel, config, sd, name, dtype, "Llama")
    return model, used | scaling_keys(sd) | {k for k in sd if k.startswith("lm_head.")}


def all_hidden_states(model: Any, ids: Tensor, mask: Tensor | None) -> Tensor:
    """[B, layers, L, hidden]: every decoder layer's output (the last one through the final norm; the embedding
    excluded), transformers' hidden_states[1:], for token ids [B, L] under an attention mask marking the keys."""
    device = model.embed_tokens.weight.device
    out = model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
                output_hidden_states=True, use_cache=False)
    return torch.stack(out.hidden_states[1:], dim=1)


def tiny_llama_state(seed: int = 0, hidden: int = 32, layers: int = 4) -> dict[str, Tensor]:
    """Random Llama weights in ComfyUI's layout: a language model `hidden` wide (4 heads of hidden // 4, 2 key/value
    heads, MLP 2 * hidden) with Llama 3's full 128,256-row embedding so that real prompts' ids fit, and an LM head."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    head = hidden // 4
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (2 * head, hidden),
              "self_attn.v_proj.weight": (2 * head, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "mlp.gate_proj.weight": (2 * hidden, hidden), "mlp.up_proj.weight": (2 * hidden, hidden),
              "mlp.down_proj.weight": (hidden, 2 * hidden)}
    state = {_EMBED: rand(VOCAB_SIZE, hidden)}
    for i in range(layers):
        # norms around 1, as trained ones are
        state |= {f"model.layers.{i}.{name}": rand(*shape) + name.endswith("norm.weight")
                  for name, shape in shapes.items()}
    state["model.norm.weight"] = 1 + rand(hidden)
    state["lm_head.weight"] = rand(VOCAB_SIZE, hidden)
    return state


def scaled_fp8(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` as ComfyUI's scaled fp8 files hold it: each linear weight in float8_e4m3fn divided by its per-tensor
    `.scale_weight`, the rest as it is, and the `scaled_fp8` marker."""
    out: dict[str, Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, tensor in state.items():
        if key.endswith("_proj.weight"):
            scale = tensor.abs().max().float() / 448
            out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            out[key] = tensor
    return out


def write_tiny_llama(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16, hidden: int = 32,
                     layers: int = 4, fp8: bool = False) -> Path:
    """A tiny random Llama file in ComfyUI's layout (see `tiny_llama_state`), a stand-in for
    llama_3.1_8b_instruct_fp8_scaled.safetensors: `fp8` writes it scaled fp8 as that file is (see `scaled_fp8`),
    other tensors in `dtype`."""
    path = Path(path)
    state = tiny_llama_state(seed, hidden, layers)
    if fp8:
        state = {k: v if v.dtype == torch.float8_e4m3fn or k.endswith(".scale_weight") else v.to(dtype)
                 for k, v in scaled_fp8(state).items()}
        write_safetensors(state, path, {"loom.seed": str(seed)})
    else:
        write_safetensors(state, path, {"loom.seed": str(seed)}, dtype)
    return path
