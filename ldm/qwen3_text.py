"""Z-Image's text encoder, Qwen3-4B, as ComfyUI's CLIPLoader type "lumina2" runs it (ComfyUI picks Z-Image's
encoder from a Qwen3-4B file under that type; Lumina Image 2.0's Gemma-2-2B, the type's other encoder, is
ldm.gemma_text's).

Weights: Comfy-Org's qwen_3_4b.safetensors (and its fp8 copies) holds the language model in transformers' Qwen3
names, as Qwen2's are laid out (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ``model.norm``) but with
no q/k/v biases and an RMS norm over each head's queries and keys (``self_attn.q_norm`` / ``k_norm``), and no LM head
(Qwen3-4B ties it to the embedding; a file's ``lm_head`` would go unused). Qwen3-4B: 36 layers 2560 wide, 32 heads
and 8 key/value heads of 128, MLP 9728, 151,936 embedding rows, RoPE base 1e6, RMS epsilon 1e-6. The shape is read
from the weights (the head width from the q norm); a Qwen3 of another real width (0.6B, 1.7B, 8B: other models'
encoders) is refused, widths under 512 are Loom's tiny test models. Scaled fp8 files are descaled as they load, one
weight at a time (``ldm.qwen_text``). The model runs on transformers' Qwen3Model.

Tokenizer: Qwen2's byte-level BPE (``ldm.qwen_text``'s, ldm/data/qwen2_tokenizer.json.xz) with Qwen3's four further
added tokens, `<tool_response>` 151665, `</tool_response>` 151666, `<think>` 151667 and `</think>` 151668 (Qwen3's
tokenizer_config; ComfyUI's qwen25_tokenizer, which its Z-Image encoder reads, has them too).

Encoding (ComfyUI's ZImageTokenizer / Qwen3_4BModel; diffusers' ZImagePipeline._encode_prompt gives the same): the
prompt goes into Qwen3's chat template for one user turn with a generation prompt, `<|im_start|>user\\n{prompt}
<|im_end|>\\n<|im_start|>assistant\\n` (what Qwen3's template yields with enable_thinking=True, diffusers' call: no
empty think block, which only enable_thinking=False adds), and is tokenized whole, with no emphasis (brackets are
text; `\\(` and `\\)` become brackets). The states are the second-to-last layer's output, before the final norm
(ComfyUI's layer_idx -2, diffusers' hidden_states[-2]), for every token, template included. A batch is padded with
`<|endoftext|>` on the right and encoded with the attention mask; each prompt's states are followed by zeros to the
longest prompt, and `TextEncoding.extra["attention_mask"]` ([B, L] int64) marks its tokens. (ComfyUI never cuts a
prompt; diffusers cuts at 512 tokens.)
"""

from __future__ import annotations

import json
import lzma
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.qwen_text import ATTENTION_MASK, PAD_TOKEN, VOCAB_FILE, frozen_language_model, padded
from ldm.t5 import scaling_keys
from ldm.text_encoders import PinnableTextEncoder, TextEncoding

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# Qwen3's added tokens past Qwen2.5's 151,665 (not special: they stay in decoded text, but tokenize whole).
QWEN3_ADDED = {151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>", 151668: "</think>"}
QWEN3_VOCAB_SIZE = 151936  # Qwen3's embedding rows: the tokenizer's 151,669 tokens, rounded up
QWEN3_4B_WIDTH = 2560
ENCODER_NAME = "qwen3_4b"  # ComfyUI's name for the encoder (per_encoder key)
FAMILY = "z_image"
HIDDEN_LAYER = -2  # the second-to-last layer's output (hidden_states[-2]: before the last layer, not normed)
_EMBED = "model.embed_tokens.weight"
_Q_NORM = "model.layers.0.self_attn.q_norm.weight"
_GATE = "model.layers.0.mlp.gate_proj.weight"
_GEMMA = "model.layers.0.pre_feedforward_layernorm.weight"  # Gemma 2 and 3 (Gemma 3 has q/k norms too)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_NEEDS = ("CLIPLoader type lumina2 takes Qwen3-4B, Z-Image's text encoder (qwen_3_4b.safetensors or an fp8 copy); "
          "Lumina Image 2.0's Gemma-2-2B loads through the same type (ldm.gemma_text)")


@lru_cache(maxsize=1)
def _vocabulary() -> Any:
    from tokenizers import Tokenizer

    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        spec = json.load(f)
    spec["added_tokens"] += [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": False} for i, token in QWEN3_ADDED.items()]
    return Tokenizer.from_str(json.dumps(spec))


def prompt_text(prompt: str) -> str:
    """A Z-Image prompt as ComfyUI encodes it: in Qwen3's chat template, ComfyUI's bracket escapes undone."""
    return TEMPLATE.format(prompt.replace("\\(", "(").replace("\\)", ")"))


def token_ids(text: str) -> list[int]:
    """`text` tokenized whole by Qwen3's tokenizer, special and added tokens read as such."""
    return _vocabulary().encode(text, add_special_tokens=False).ids


def decode(ids: list[int]) -> str:
    """The text of token ids, special tokens skipped (Qwen3's added tokens, `<think>` among them, kept)."""
    return _vocabulary().decode(ids, skip_special_tokens=True)


def tokenize(prompt: str) -> list[int]:
    """The token ids ComfyUI encodes for a Z-Image prompt (see `prompt_text`)."""
    return token_ids(prompt_text(prompt))


def is_qwen3(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a header's shapes) holds a Qwen3 language model in ComfyUI's layout, of any size."""
    return _EMBED in sd and _Q_NORM in sd and _GATE in sd and _GEMMA not in sd


def is_gemma(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict holds a Gemma language model (Lumina Image 2.0's Gemma-2-2B, for one)."""
    return _EMBED in sd and _GEMMA in sd


def _fits_4b(sd: Mapping[str, Any]) -> bool:
    width = sd[_EMBED].shape[1]
    return width == QWEN3_4B_WIDTH or width < 512


def text_kind(sd: Mapping[str, Any]) -> str | None:
    """The kind the CLIP loaders name for a file's header: "qwen3_4b" (Z-Image's), "qwen3" (another size), "gemma",
    or None for other files."""
    if is_qwen3(sd):
        return "qwen3_4b" if _fits_4b(sd) else "qwen3"
    return "gemma" if is_gemma(sd) else None


def qwen3_config_from_state_dict(sd: Mapping[str, Any]) -> Any:
    """transformers' Qwen3Config of the language model in `sd`, its shape read from the weights."""
    from transformers import Qwen3Config

    vocab, hidden = sd[_EMBED].shape
    head_dim = sd[_Q_NORM].shape[0]
    layers = len({int(m[1]) for k in sd if (m := _LAYER.match(k))})
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=sd[_GATE].shape[0],
                       num_hidden_layers=layers, num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"]
                       .shape[0] // head_dim, num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"]
                       .shape[0] // head_dim, head_dim=head_dim, rms_norm_eps=1e-6, attention_bias=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       max_position_embeddings=40960, tie_word_embeddings=True, use_cache=False,
                       pad_token_id=PAD_TOKEN)


def _refusal(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    if is_qwen3(sd):
        held = f"a Qwen3 language model {sd[_EMBED].shape[1]} wide, not Qwen3-4B ({QWEN3_4B_WIDTH} wide)"
    elif is_gemma(sd):
        held = "Gemma (Lumina Image 2.0's text encoder is Gemma-2-2B, which ldm.gemma_text loads)"
    else:
        look = look_of(sd)
        held = look.what if look is not None else "no model layout Loom knows"
    return CheckpointError(f"{name}: not Qwen3-4B, Z-Image's text encoder: it holds {held}; {_NEEDS}")


def qwen3_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[Any, set[str]]:
    """transformers' Qwen3Model holding the language model in `sd`, frozen, in `dtype`, and the keys it used or
    knowingly ignored; a CheckpointError naming `name` when the file is not Qwen3-4B or its weights do not fit."""
    from transformers import Qwen3Model

    if not is_qwen3(sd) or not _fits_4b(sd):
        raise _refusal(name, sd)
    config = qwen3_config_from_state_dict(sd)
    model, used = frozen_language_model(Qwen3Model, config, sd, name, dtype, "Qwen3")
    return model, used | scaling_keys(sd) | {k for k in sd if k.startswith("lm_head.")}


class ZImageTextEncoder(PinnableTextEncoder):
    """Qwen3-4B, encoding as ComfyUI does for Z-Image (see the module docstring); the interface of
    ``ldm.text_encoders.TextEncoder``: `encode` gives each prompt's states, no pooled vector, and the attention mask
    in `extra["attention_mask"]`. Pinned to the CPU (`pinned_to_cpu`, CLIPLoader's device "cpu"), `.to()` changes
    its dtype only."""

    main_encoder = ENCODER_NAME

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.qwen3_4b = model

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: [B, L, hidden], L the longest prompt's tokens (template included), zeros after each prompt's;
        `extra["attention_mask"]`: [B, L] int64. Clip skip, prompt weights and textual-inversion embeddings do not
        apply (ComfyUI reads `embedding:` words and brackets as text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = (per_encoder or {}).get(ENCODER_NAME, prompts)
        ids, mask = padded([tokenize(p) for p in prompts])
        device = self.qwen3_4b.device
        hidden = self.qwen3_4b(input_ids=ids.to(device), attention_mask=mask.to(device),
                               output_hidden_states=True).hidden_states[HIDDEN_LAYER]
        # zeros past each prompt's end, as the conditioning's other families have them
        return TextEncoding(hidden * mask.to(hidden)[..., None], None, {ATTENTION_MASK: mask})


@dataclass
class LoadedZImageText:
    encoder: ZImageTextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = FAMILY


def load_z_image_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.float32) -> LoadedZImageText:
    """One Qwen3-4B file (qwen_3_4b.safetensors, its fp8 and scaled fp8 copies) as Z-Image's text encoder, on
    `device` in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"Z-Image takes one Qwen3-4B text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    model, used = qwen3_from_weights(sd, path.name, dtype)
    unused = sorted(f"{path.name}: {k}" for k in sd if k not in used)
    return LoadedZImageText(ZImageTextEncoder(model).to(device).eval(), unused)


def tiny_qwen3_state(seed: int = 0, hidden: int = 32, layers: int = 3,
                     vocab: int = QWEN3_VOCAB_SIZE) -> dict[str, Tensor]:
    """Random Qwen3 weights in ComfyUI's layout: a language model `hidden` wide (4 heads of hidden // 4, 2 key/value
    heads, MLP 2 * hidden) with `vocab` embedding rows (by default Qwen3's full 151,936, so that real prompts' ids
    fit)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    head = hidden // 4
    kv = 2 * head
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
              "self_attn.q_norm.weight": (head,), "self_attn.k_norm.weight": (head,),
              "mlp.gate_proj.weight": (2 * hidden, hidden), "mlp.up_proj.weight": (2 * hidden, hidden),
              "mlp.down_proj.weight": (hidden, 2 * hidden)}
    state = {_EMBED: rand(vocab, hidden), "model.norm.weight": 1 + rand(hidden)}
    for i in range(layers):
        # norms around 1, as trained ones are (transformers initialises them to exactly 1)
        state |= {f"model.layers.{i}.{name}": rand(*shape) + name.endswith("norm.weight")
                  for name, shape in shapes.items()}
    return state


def write_tiny_qwen3(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16, hidden: int = 32,
                     layers: int = 3) -> Path:
    """A tiny random Qwen3 file in ComfyUI's layout (see `tiny_qwen3_state`), a stand-in for qwen_3_4b.safetensors:
    Z-Image's text states are `hidden` wide (its transformer's caption width)."""
    path = Path(path)
    write_safetensors(tiny_qwen3_state(seed, hidden, layers), path, {"loom.seed": str(seed)}, dtype)
    return path
