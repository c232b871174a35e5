"""Qwen-Image's text encoder, the language model of Qwen2.5-VL-7B-Instruct, as ComfyUI's CLIPLoader type
"qwen_image" runs it.

Weights: Comfy-Org's single files (qwen_2.5_vl_7b.safetensors, qwen_2.5_vl_7b_fp8_scaled.safetensors) hold the
language model at ``model.`` in transformers' Qwen2 names (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``
with q/k/v biases, ``model.norm``), the vision tower at ``visual.`` and possibly ``lm_head``; text-only encoding
reads the language model alone, the vision tower is loaded beside it when the file has one (ldm.qwen_vl, for
Qwen-Image-Edit's pictures), the LM head is knowingly left unused. The shape comes from the weights; the head width
is 128 (Qwen2.5-VL's, at every size) or, for models narrower than 512, a quarter of the width (Loom's tiny test
models); RoPE base 1e6 and RMS epsilon 1e-6 are Qwen2.5-VL's. Scaled fp8 files (each weight with its `.scale_weight`
or `.weight_scale`) are descaled as they load, one weight at a time.
The model runs on transformers' Qwen2Model: Qwen2.5-VL's multimodal RoPE gives every text token the same position
in its three sections, which is plain 1-D RoPE, so the states are Qwen2.5-VL's own.

Tokenizer: Qwen2's byte-level BPE (151,643 tokens and 22 special tokens, `<|endoftext|>` 151643, `<|im_start|>`
151644, `<|im_end|>` 151645, ...) from ldm/data/qwen2_tokenizer.json.xz (see ldm/data/LICENSE.qwen2), with NFC and
Qwen2's pre-tokenizer split, read with the `tokenizers` library.

Encoding (ComfyUI's QwenImageTokenizer / QwenImageTEModel; diffusers' QwenImagePipeline likewise): the prompt goes
into Qwen-Image's chat template (a prompt already starting with `<|im_start|>` is taken as it is) and is tokenized
whole, with no emphasis (ComfyUI disables prompt weights for Qwen-Image: brackets are text; `\\(` and `\\)` become
brackets). The last hidden state (after the final norm) is kept from the user turn's text on: the tokens before the
second `<|im_start|>` and that token's `user\\n` are dropped (34 tokens with the standard template). A batch is
padded with `<|endoftext|>` on the right and encoded with the attention mask; each prompt's states are followed by
zeros to the longest prompt, and `TextEncoding.extra["attention_mask"]` ([B, L] int64) marks its tokens. (ComfyUI
encodes prompts one by one and drops an all-ones mask; diffusers cuts prompts at 1024 tokens, ComfyUI never.)
"""

from __future__ import annotations

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
from ldm.t5 import descale, scaling_keys
from ldm.text_encoders import PinnableTextEncoder, TextEncoding
from ldm.tokenizer import DATA_DIR

VOCAB_FILE = DATA_DIR / "qwen2_tokenizer.json.xz"
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
PAD_TOKEN = 151643  # <|endoftext|>
IM_START = 151644
USER, NEWLINE = 872, 198  # "user", "\n"
# Qwen2.5-VL's embedding rows: the tokenizer's 151,665 tokens, rounded up.
QWEN25_VOCAB_SIZE = 152064
ATTENTION_MASK = "attention_mask"
ENCODER_NAME = "qwen25_7b"  # ComfyUI's name for the encoder (per_encoder key)
_PREFIX = "model."
_PROBE = "model.layers.0.self_attn.k_proj.bias"
_EMBED = "model.embed_tokens.weight"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Parts of the file the language model does not read: the vision tower (ldm.qwen_vl loads it) and the LM head.
_IGNORED = ("visual.", "lm_head.")
_VISUAL = "visual.patch_embed.proj.weight"


@lru_cache(maxsize=1)
def _vocabulary() -> Any:
    from tokenizers import Tokenizer

    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        return Tokenizer.from_str(f.read())


def prompt_text(prompt: str, template: str = TEMPLATE) -> str:
    """A Qwen-Image prompt as ComfyUI encodes it: in `template` (unless it starts with `<|im_start|>`), ComfyUI's
    bracket escapes undone."""
    text = prompt.replace("\\(", "(").replace("\\)", ")")
    return text if text.startswith("<|im_start|>") else template.format(text)


def token_ids(text: str) -> list[int]:
    """`text` tokenized whole, special tokens read as such."""
    return _vocabulary().encode(text, add_special_tokens=False).ids


def tokenize(prompt: str, template: str = TEMPLATE) -> list[int]:
    """The token ids ComfyUI encodes for a Qwen-Image prompt (see `prompt_text`)."""
    return token_ids(prompt_text(prompt, template))


def template_end(ids: list[int]) -> int:
    """Where the kept states start (ComfyUI's rule): at the second `<|im_start|>` (the last, if fewer), past its
    `user\\n` when those follow."""
    starts = [i for i, token in enumerate(ids) if token == IM_START][:2]
    end = starts[-1] if starts else 0  # (`tokenize` always gives one)
    if starts and len(ids) > end + 3 and ids[end + 1:end + 3] == [USER, NEWLINE]:
        end += 3
    return end


def is_qwen25(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a header's shapes) holds a Qwen2.5(-VL) language model in ComfyUI's layout."""
    return _PROBE in sd and _EMBED in sd and "model.layers.0.mlp.gate_proj.weight" in sd


def qwen_config_from_state_dict(sd: Mapping[str, Any]) -> Any:
    """transformers' Qwen2Config of the language model in `sd`, its shape read from the weights."""
    from transformers import Qwen2Config

    vocab, hidden = sd[_EMBED].shape
    head_dim = 128 if hidden >= 512 else hidden // 4
    layers = len({int(m[1]) for k in sd if (m := _LAYER.match(k))})
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
                       num_hidden_layers=layers, num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"]
                       .shape[0] // head_dim, num_key_value_heads=sd[_PROBE].shape[0] // head_dim, head_dim=head_dim,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       max_position_embeddings=128000, tie_word_embeddings=False, use_cache=False,
                       pad_token_id=PAD_TOKEN)


def _weight(sd: Mapping[str, Tensor], key: str, dtype: torch.dtype) -> Tensor:
    """One weight in `dtype`, its fp8 scale applied (ComfyUI's `.scale_weight` or `.weight_scale`): one tensor at a
    time, so that a 7B fp8 file never stands in float32 whole."""
    tensor = sd[key]
    base = key.removesuffix(".weight")
    scale = sd.get(base + ".scale_weight", sd.get(base + ".weight_scale")) if base != key else None
    return tensor.to(dtype) if scale is None else descale(tensor, scale).to(dtype)


def qwen_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[Any, set[str]]:
    """transformers' Qwen2Model holding the language model in `sd`, frozen, in `dtype`, and the keys it used or
    knowingly ignored; a CheckpointError naming `name` when the file is not one or its weights do not fit."""
    from transformers import Qwen2Model

    if not is_qwen25(sd):
        raise _not_qwen(name, sd)
    config = qwen_config_from_state_dict(sd)
    model, used = frozen_language_model(Qwen2Model, config, sd, name, dtype)
    return model, used | scaling_keys(sd) | {k for k in sd if k.startswith(_IGNORED)}


def frozen_language_model(build: Callable[[Any], Any], config: Any, sd: Mapping[str, Tensor], name: str,
                          dtype: torch.dtype, what: str = "Qwen2.5-VL",
                          prepare: Callable[[Any], None] | None = None) -> tuple[Any, set[str]]:
    """A transformers decoder `build(config)` made on the meta device in `dtype` (`prepare(model)` may change it
    first), loaded from `sd`'s weights under `model.` (`load_prefixed`), its RoPE frequencies computed (buffers
    outside the state dict, left on the meta device), frozen; and the keys it read."""
    with torch.device("meta"):
        model = build(config).to(dtype)
    if prepare is not None:
        prepare(model)
    used = load_prefixed(model, sd, _PREFIX, name, dtype, what)
    inv_freq = model.rotary_emb.compute_default_rope_parameters(config)[0]
    model.rotary_emb.inv_freq, model.rotary_emb.original_inv_freq = inv_freq, inv_freq.clone()
    return model.eval().requires_grad_(False), used


def load_prefixed(model: torch.nn.Module, sd: Mapping[str, Tensor], prefix: str, name: str,
                  dtype: torch.dtype, what: str = "Qwen2.5-VL") -> set[str]:
    """Loads `model` (built on the meta device) from the weights of `sd` under `prefix`, in `dtype`, and returns the
    keys it read; a CheckpointError naming `name` (and the model, `what`) when some are missing or of the wrong
    shape."""
    from ldm.quant_formats import dequantizing

    sd = dequantizing(sd)  # NVFP4 / MXFP8 layers (ComfyUI's fp4_mixed files) dequantized one at a time as they load
    shape_of = getattr(sd, "shape_of", lambda key: sd[key].shape)
    expected = model.state_dict()
    missing = [k for k in expected if prefix + k not in sd]
    wrong = [f"{prefix}{k}: {tuple(shape_of(prefix + k))}, expected {tuple(v.shape)}"
             for k, v in expected.items() if prefix + k in sd and shape_of(prefix + k) != v.shape]
    if missing:
        raise CheckpointError(f"{name}: {len(missing)} {what} weights missing, e.g. "
                              f"{[prefix + k for k in missing[:4]]}")
    if wrong:
        raise CheckpointError(f"{name}: {what} weights of the wrong shape: {wrong[:4]}")
    model.load_state_dict({k: _weight(sd, prefix + k, dtype) for k in expected}, assign=True)
    return {prefix + k for k in expected}


def _not_qwen(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    look = look_of(sd)
    held = look.what if look is not None else "no model layout Loom knows"
    return CheckpointError(f"{name}: not Qwen2.5-VL-7B, Qwen-Image's text encoder: it holds {held}; CLIPLoader type "
                           "qwen_image takes qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors")


class QwenImageTextEncoder(PinnableTextEncoder):
    """Qwen2.5-VL's language model, encoding as ComfyUI does for Qwen-Image (see the module docstring), with the
    file's vision tower (`visual`, None when the file has none) for Qwen-Image-Edit's image prompts (ldm.qwen_vl);
    the interface of ``ldm.text_encoders.TextEncoder``: `encode` gives the states of each prompt's user turn on, no
    pooled vector, and the attention mask in `extra["attention_mask"]`. Pinned to the CPU (`pinned_to_cpu`,
    CLIPLoader's device "cpu"), `.to()` changes its dtype only."""

    main_encoder = ENCODER_NAME

    def __init__(self, model: Any, visual: Any = None) -> None:
        super().__init__()
        self.qwen25_7b = model
        self.visual = visual

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None,
               images: list[Tensor] | None = None, template: str | None = None) -> TextEncoding:
        """`cond`: [B, L, hidden], L the longest prompt's kept tokens, zeros after each prompt's; `extra
        ["attention_mask"]`: [B, L] int64. Clip skip, prompt weights and textual-inversion embeddings do not apply
        (ComfyUI reads `embedding:` words and brackets as text). `images` ([H, W, 3] in 0..1), seen by every prompt
        through the vision tower, and `template` (default: Qwen-Image's, or Qwen-Image-Edit's with images) are
        ComfyUI's TextEncodeQwenImageEdit(Plus)'s (ldm.qwen_vl)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = (per_encoder or {}).get(ENCODER_NAME, prompts)
        if images:
            from ldm.qwen_vl import image_prompt_states

            hidden, rows = image_prompt_states(self, prompts, images, template)
        else:
            rows = [tokenize(p, template or TEMPLATE) for p in prompts]
            ids, mask = padded(rows)
            device = self.qwen25_7b.device
            hidden = self.qwen25_7b(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        starts = [template_end(row) for row in rows]
        kept = max(len(row) - start for row, start in zip(rows, starts, strict=True))
        cond = hidden.new_zeros(len(rows), kept, hidden.shape[-1])
        out_mask = torch.zeros(len(rows), kept, dtype=torch.long)
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            cond[i, :len(row) - start] = hidden[i, start:len(row)]
            out_mask[i, :len(row) - start] = 1
        return TextEncoding(cond, None, {ATTENTION_MASK: out_mask})


def padded(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Token rows as a batch: ids [B, L] padded with `<|endoftext|>` on the right, and the attention mask."""
    ids = torch.full((len(rows), max(map(len, rows))), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


@dataclass
class LoadedQwenImageText:
    encoder: QwenImageTextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = "qwen_image"


def load_qwen_image_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                                 dtype: torch.dtype = torch.float32) -> LoadedQwenImageText:
    """One Qwen2.5-VL-7B file (qwen_2.5_vl_7b.safetensors, its fp8 and scaled fp8 copies) as Qwen-Image's text
    encoder, on `device` in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"Qwen-Image takes one Qwen2.5-VL-7B text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    model, used = qwen_from_weights(sd, path.name, dtype)
    visual = None
    if _VISUAL in sd:  # Comfy-Org's files keep the vision tower; text-only copies may not
        from ldm.qwen_vl import vision_from_weights

        visual, vision_keys = vision_from_weights(sd, path.name, dtype)
        used |= vision_keys
    unused = sorted(f"{path.name}: {k}" for k in sd if k not in used)
    return LoadedQwenImageText(QwenImageTextEncoder(model, visual).to(device).eval(), unused)


def tiny_qwen25_state(seed: int = 0, hidden: int = 32, layers: int = 2) -> dict[str, Tensor]:
    """Random Qwen2.5-VL weights in ComfyUI's layout: a language model `hidden` wide (4 heads, 2 key/value heads)
    with the full 152,064-row embedding so that real prompts' ids fit, and a vision tower (`visual.`, see
    ldm.qwen_vl.tiny_visual_state)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    width, kv = hidden, hidden // 2  # 4 heads of hidden // 4, 2 key/value heads
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (width, hidden), "self_attn.q_proj.bias": (width,),
              "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv,),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv,),
              "self_attn.o_proj.weight": (hidden, width), "mlp.gate_proj.weight": (2 * hidden, hidden),
              "mlp.up_proj.weight": (2 * hidden, hidden), "mlp.down_proj.weight": (hidden, 2 * hidden)}
    state = {_EMBED: rand(QWEN25_VOCAB_SIZE, hidden), "model.norm.weight": 1 + rand(hidden)}
    for i in range(layers):
        # norms around 1, as trained ones are (transformers initialises them to exactly 1)
        state |= {f"model.layers.{i}.{name}": rand(*shape) + ("layernorm" in name)
                  for name, shape in shapes.items()}
    from ldm.qwen_vl import tiny_visual_state

    return state | tiny_visual_state(rand, hidden)


def write_tiny_qwen25vl(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A tiny random Qwen2.5-VL file in ComfyUI's layout (see `tiny_qwen25_state`), hidden size 32."""
    path = Path(path)
    write_safetensors(tiny_qwen25_state(seed), path, {"loom.seed": str(seed)}, dtype)
    return path
