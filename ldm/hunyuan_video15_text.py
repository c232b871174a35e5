"""HunyuanVideo 1.5's prompt encoding, as ComfyUI's DualCLIPLoader type "hunyuan_video_15" loads it: the language
model of Qwen2.5-VL-7B-Instruct for the prompt, and Glyph-SDXL-v2's byT5-small for the text the prompt quotes.

Weights: Comfy-Org's split files. qwen_2.5_vl_7b.safetensors (or its fp8_scaled copy) is Qwen-Image's text encoder
file, read by ``ldm.qwen_text`` (``model.`` in transformers' Qwen2 names; the vision tower ``visual.`` and
``lm_head`` are knowingly left unused: HunyuanVideo 1.5 reads pictures with SigLIP, not with Qwen's tower).
byt5_small_glyphxl_fp16.safetensors is a T5 v1.1 encoder in transformers' names (``shared.weight``,
``encoder.block.N.layer.0.SelfAttention.q.weight``, the relative position bias in block 0,
``encoder.final_layer_norm.weight``), run by ``ldm.t5`` with the shape read from the weights: byT5-small's 1472
wide, 12 blocks, 6 heads of 64, gated-GELU feed-forward 3584 wide, 32 buckets up to distance 128, and Glyph-SDXL-v2's
1510 embedding rows (byT5's 384 and its colour and font tokens). The two files come in either order; a T5 encoder
with fewer than 4096 embedding rows is byT5 (`is_byt5`: T5-XXL has 32,128). The Qwen file alone is taken too (the
quoted text then goes unencoded, as ComfyUI does without its byT5 model).

Qwen2.5-VL (ComfyUI's HunyuanImageTEModel / diffusers' HunyuanVideo15Pipeline._get_mllm_prompt_embeds): the prompt
(an empty one as " "; brackets are text, ComfyUI's `\\(` `\\)` undone; one already starting with `<|im_start|>` is
taken as it is) goes into HunyuanVideo 1.5's chat template (`TEMPLATE`: Tencent's "li-dit-encode-video-json" system
message one aspect a line, as ComfyUI's HunyuanVideo15Tokenizer holds it; diffusers' copy has nine spaces where the
line breaks are, `DIFFUSERS_TEMPLATE`; the generation prompt `<|im_start|>assistant\\n` last) and is tokenized
whole. The states are
the hidden state after all but the last two layers (transformers' `hidden_states[-3]`, no final norm: Tencent's
hidden_state_skip_layer 2, ComfyUI's layer "hidden" -3). They are kept from the user turn's text on (ComfyUI's rule,
``ldm.qwen_text.template_end``: the template's first 98 tokens dropped; diffusers' template's 108, its
prompt_template_encode_start_idx),
the closing `<|im_end|>\\n<|im_start|>assistant\\n` included.
A batch is padded with `<|endoftext|>` on the right and encoded with the attention mask; each prompt's states are
followed by zeros to the longest prompt, and `TextEncoding.extra["attention_mask"]` ([B, L] int64) marks its tokens.
Differences: diffusers pads every prompt to 1000 kept tokens (pad states, masked) and cuts longer ones there;
ComfyUI encodes each prompt alone, unpadded and uncut, dropping an all-ones mask. Loom cuts none.

byT5 (ComfyUI's HunyuanImageTokenizer and ByT5SmallModel): the texts in the prompt's quotes (`glyph_texts`:
ASCII "...", then Chinese ‘...’, then Chinese “...”, each kind in order, repeats kept) become one glyph prompt
'Text "A". Text "B". ' (`glyph_prompt`), tokenized as UTF-8 bytes (byte + 3) and the end token 1, and encoded with
the attention mask; the output is the last hidden state after the final norm, zeros at masked places.
`extra["conditioning_byt5small"]` [B, L2, 1472] holds it and `extra["byt5_attention_mask"]` [B, L2] int64 marks its
tokens; a prompt without quotes in a batch with some has an all-zero row and mask. A batch with no quoted text at all
has neither key (ComfyUI's conditioning has no `conditioning_byt5small` then). Differences: diffusers'
extract_glyph_texts takes "..." and “...” in the order they appear, drops repeats when there are several, and ignores
‘...’; it pads to 256 tokens and cuts longer ones there (`byt5_ids(max_length=256)`), and gives a prompt without
quotes 256 zero states with an all-zero mask. ComfyUI parses prompt weights in the glyph prompt (Loom reads its
brackets as text) and reads the tokenizer's added tokens (`<color-N>`, `<en-font-N>`, `</s>`...) as single ids (Loom
reads them as bytes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.qwen_text import ATTENTION_MASK, ENCODER_NAME, is_qwen25, padded, qwen_from_weights, template_end, tokenize
from ldm.t5 import T5Config, T5Encoder, build_t5, is_t5, t5_config_from_state_dict, t5_from_weights
from ldm.text_encoders import PinnableTextEncoder, TextEncoding

FAMILY = "hunyuan_video15"  # the model family's name (DualCLIPLoader's type is hunyuan_video_15)
IMAGE_FAMILY = "hunyuan_image21"  # HunyuanImage 2.1's (type hunyuan_image)
# Tencent's "li-dit-encode-video-json" system message, one aspect a line: ComfyUI's HunyuanVideo15Tokenizer's
# template, which Loom encodes with (98 tokens before the prompt's).
_ASPECTS = ("You are a helpful assistant. Describe the video by detailing the following aspects:",
            "1. The main content and theme of the video.",
            "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
            "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
            "4. background environment, light, style and atmosphere.",
            "5. camera angles, movements, and transitions used in the video.")
SYSTEM_MESSAGE = "\n".join(_ASPECTS)
# diffusers' HunyuanVideo15Pipeline.system_message: its line continuations leave nine spaces between the aspects
# (108 tokens before the prompt's, its prompt_template_encode_start_idx). The states of the prompt's tokens differ
# (they attend to the system message); Loom's tests match diffusers with this one.
DIFFUSERS_SYSTEM_MESSAGE = (" " * 9).join(_ASPECTS)


def chat_template(system: str) -> str:
    return "<|im_start|>system\n" + system + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


TEMPLATE, DIFFUSERS_TEMPLATE = chat_template(SYSTEM_MESSAGE), chat_template(DIFFUSERS_SYSTEM_MESSAGE)
# HunyuanImage 2.1's (ComfyUI's HunyuanImageTokenizer, diffusers' HunyuanImagePipeline.prompt_template_encode): one
# line of system message, and no assistant turn after the prompt (34 tokens before the prompt's).
IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                  "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                  "<|im_end|>")
DIFFUSERS_CROP_START = 108  # the diffusers template's tokens before the prompt's (what `template_end` finds)
HIDDEN_LAYER = -3  # transformers' hidden_states index: the output of all but the last two layers
CONDITIONING_BYT5 = "conditioning_byt5small"  # ComfyUI's name
BYT5_MASK = "byt5_attention_mask"
BYT5_END, BYT5_PAD, BYT5_OFFSET = 1, 0, 3  # byT5's ids: pad 0, end 1, unk 2, then the 256 bytes
BYT5_VOCAB_SIZE = 1510  # Glyph-SDXL-v2's rows
_BYT5_MAX_ROWS = 4096  # fewer embedding rows than any SentencePiece T5 (32,128)
_QUOTES = (re.compile(r'"(.*?)"'), re.compile("\u2018(.*?)\u2019"), re.compile("\u201c(.*?)\u201d"))
_NEEDS = ("DualCLIPLoader type hunyuan_video_15 takes qwen_2.5_vl_7b(_fp8_scaled).safetensors and "
          "byt5_small_glyphxl_fp16.safetensors")


def is_byt5(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a header's shapes) holds a byT5 encoder (T5's layout, a byte-sized vocabulary)."""
    embedding = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    return is_t5(sd) and embedding is not None and embedding.shape[0] < _BYT5_MAX_ROWS


def glyph_texts(prompt: str) -> list[str]:
    """The quoted texts of a prompt, as ComfyUI finds them: every "...", then every ‘...’, then every “...”."""
    return [text for pattern in _QUOTES for text in pattern.findall(prompt)]


def glyph_prompt(prompt: str) -> str | None:
    """What byT5 encodes for a prompt: 'Text "A". Text "B". ' for its quoted texts (ComfyUI's escaped brackets
    undone), None when it quotes nothing."""
    texts = glyph_texts(prompt.replace("\\(", "(").replace("\\)", ")"))
    return "".join(f'Text "{text}". ' for text in texts) if texts else None


def byt5_ids(text: str, max_length: int | None = None) -> list[int]:
    """byT5's token ids of `text`: each UTF-8 byte plus 3, then the end token; with `max_length`, cut to it keeping
    the end token (transformers' ByT5Tokenizer with truncation, as diffusers calls it)."""
    ids = [byte + BYT5_OFFSET for byte in text.encode("utf-8")]
    if max_length is not None:
        ids = ids[:max_length - 1]
    return [*ids, BYT5_END]


def _kept_states(hidden: Tensor, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Each row's states from its template's end on, zeros after (the longest row sets the length), and the mask."""
    starts = [template_end(row) for row in rows]
    kept = max(len(row) - start for row, start in zip(rows, starts, strict=True))
    cond = hidden.new_zeros(len(rows), kept, hidden.shape[-1])
    mask = torch.zeros(len(rows), kept, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        cond[i, :len(row) - start] = hidden[i, start:len(row)]
        mask[i, :len(row) - start] = 1
    return cond, mask


def glyph_states(byt5: T5Encoder, glyphs: list[str | None]) -> tuple[Tensor, Tensor]:
    """byT5's states [B, L2, width] of glyph prompts (None: no quoted text, an all-zero row) and their mask [B, L2]
    int64, L2 the longest prompt's tokens; zeros at masked places (ComfyUI's zero_out_masked)."""
    quoted = [i for i, glyph in enumerate(glyphs) if glyph]
    rows = [byt5_ids(glyphs[i]) for i in quoted]
    ids = torch.full((len(rows), max(map(len, rows))), BYT5_PAD, dtype=torch.long)
    mask = torch.zeros(len(glyphs), ids.shape[1], dtype=torch.long)
    for n, (i, row) in enumerate(zip(quoted, rows, strict=True)):
        ids[n, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    kept = mask[quoted].to(byt5.device)
    states = byt5.model(input_ids=ids.to(byt5.device), attention_mask=kept).last_hidden_state
    out = states.new_zeros(len(glyphs), *states.shape[1:])
    out[quoted] = states * kept.unsqueeze(-1).to(states.dtype)
    return out, mask


class HunyuanVideo15TextEncoder(PinnableTextEncoder):
    """Qwen2.5-VL's language model and byT5 (None when not loaded), encoding as the module docstring says; the
    interface of ``ldm.text_encoders.TextEncoder``. Pinned to the CPU (`pinned_to_cpu`, the loaders' device "cpu"),
    `.to()` changes its dtype only."""

    main_encoder = ENCODER_NAME
    template = TEMPLATE
    empty_prompt = " "  # what an empty prompt is encoded as (ComfyUI's prevent_empty_text)

    def __init__(self, qwen: Any, byt5: T5Encoder | None = None) -> None:
        super().__init__()
        self.qwen25_7b = qwen
        self.byt5_small = byt5

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None,
               template: str | None = None) -> TextEncoding:
        """`cond`: [B, L, 3584] Qwen's states, `extra["attention_mask"]` [B, L] int64; with quoted text and byT5,
        `extra["conditioning_byt5small"]` [B, L2, 1472] and `extra["byt5_attention_mask"]` [B, L2] int64. No pooled
        vector; clip skip, prompt weights and textual-inversion embeddings do not apply (ComfyUI reads
        `embedding:` words and brackets as text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = (per_encoder or {}).get(ENCODER_NAME, prompts)
        rows = [tokenize(p or self.empty_prompt, template or self.template) for p in prompts]
        ids, mask = padded(rows)
        device = self.qwen25_7b.device
        hidden = self.qwen25_7b(input_ids=ids.to(device), attention_mask=mask.to(device),
                                output_hidden_states=True).hidden_states[HIDDEN_LAYER]
        cond, cond_mask = _kept_states(hidden, rows)
        extra = {ATTENTION_MASK: cond_mask}
        glyphs = [glyph_prompt(p) for p in prompts]
        if self.byt5_small is not None and any(glyphs):
            extra[CONDITIONING_BYT5], extra[BYT5_MASK] = glyph_states(self.byt5_small, glyphs)
        return TextEncoding(cond, None, extra)


class HunyuanImage21TextEncoder(HunyuanVideo15TextEncoder):
    """HunyuanImage 2.1's prompt encoding (ComfyUI's CLIP type hunyuan_image): HunyuanVideo 1.5's encoders and
    glyph rule, in HunyuanImage 2.1's template (`IMAGE_TEMPLATE`, its prompt's states and `<|im_end|>` kept); an
    empty prompt stays empty."""

    template = IMAGE_TEMPLATE
    empty_prompt = ""


@dataclass
class LoadedHunyuanVideo15Text:
    encoder: HunyuanVideo15TextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = FAMILY


def _refusal(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    look = look_of(sd)
    held = look.what if look is not None else "no model layout Loom knows"
    return CheckpointError(f"{name}: neither Qwen2.5-VL-7B nor byT5, HunyuanVideo 1.5's text encoders: it holds "
                           f"{held}; {_NEEDS}")


def hunyuan_video15_text_encoder(parts: list[tuple[str, Mapping[str, Tensor]]], device: torch.device | str = "cpu",
                                 dtype: torch.dtype = torch.float32, image: bool = False) -> LoadedHunyuanVideo15Text:
    """The Qwen2.5-VL language model and, optionally, byT5 from (name, weights) pairs in either order, on `device` in
    `dtype`; with `image`, as HunyuanImage 2.1's text encoder."""
    loaded: dict[str, tuple[Any, set[str], str, Mapping[str, Tensor]]] = {}
    for name, sd in parts:
        role = "qwen" if is_qwen25(sd) else "byt5" if is_byt5(sd) else None
        if role is None:
            raise _refusal(name, sd)
        if role in loaded:
            raise CheckpointError(f"{loaded[role][2]} and {name} are both {'Qwen2.5-VL' if role == 'qwen' else 'byT5'}"
                                  f" files; {_NEEDS}")
        model, used = (qwen_from_weights if role == "qwen" else t5_from_weights)(sd, name, dtype)
        loaded[role] = (model, used, name, sd)
    if "qwen" not in loaded:
        raise CheckpointError(f"{loaded['byt5'][2]} is byT5, HunyuanVideo 1.5's glyph encoder; it needs the "
                              f"Qwen2.5-VL-7B file beside it. {_NEEDS}")
    unused = sorted(f"{name}: {k}" for _, used, name, sd in loaded.values() for k in sd if k not in used)
    byt5 = loaded["byt5"][0] if "byt5" in loaded else None
    encoder = (HunyuanImage21TextEncoder if image else HunyuanVideo15TextEncoder)(loaded["qwen"][0], byt5)
    return LoadedHunyuanVideo15Text(encoder.to(device).eval(), unused, IMAGE_FAMILY if image else FAMILY)


def load_hunyuan_video15_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                                      dtype: torch.dtype = torch.float32, image: bool = False
                                      ) -> LoadedHunyuanVideo15Text:
    """The Qwen2.5-VL-7B file and, optionally, the byT5 file (in either order), on `device` in `dtype`; with `image`,
    as HunyuanImage 2.1's text encoder."""
    if len(paths) not in (1, 2):
        raise CheckpointError(f"HunyuanVideo 1.5 takes one or two text encoder files; got {len(paths)}. {_NEEDS}")
    return hunyuan_video15_text_encoder([(Path(p).name, ckpt.load_state_dict(p)) for p in paths], device, dtype,
                                        image)


def load_hunyuan_image21_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                                      dtype: torch.dtype = torch.float32) -> LoadedHunyuanVideo15Text:
    """HunyuanImage 2.1's text encoder: the Qwen2.5-VL-7B file and, optionally, byT5 (ComfyUI's type hunyuan_image)."""
    return load_hunyuan_video15_text_encoder(paths, device, dtype, image=True)


# A tiny byT5 for tests: Glyph-SDXL-v2's vocabulary so that every byte's id fits, byT5-small's other proportions.
TINY_BYT5 = T5Config(vocab_size=BYT5_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)


def tiny_byt5_state(seed: int = 0, config: T5Config = TINY_BYT5) -> dict[str, Tensor]:
    """Random byT5 weights in the file's layout (no tied ``encoder.embed_tokens`` copy), norms around 1."""
    from ldm.flux_presets import distinct_random_

    model = distinct_random_(build_t5(config).model, seed, norm_scales=("layer_norm.weight",))
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert t5_config_from_state_dict(state) == config
    return state


def write_tiny_byt5(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """A tiny random stand-in for byt5_small_glyphxl_fp16.safetensors (see `tiny_byt5_state`)."""
    path = Path(path)
    write_safetensors(tiny_byt5_state(seed), path, {"loom.seed": str(seed)}, dtype)
    return path
