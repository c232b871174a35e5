"""Lumina Image 2.0's text encoder, Gemma-2-2B, as ComfyUI's CLIPLoader type "lumina2" runs it (the type's other
encoder, Qwen3-4B, is Z-Image's: ldm.qwen3_text); Neta Lumina uses the same.

Weights: Comfy-Org's gemma_2_2b_fp16.safetensors holds the language model in transformers' Gemma 2 names
(``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, the four norms of a Gemma 2 block
``input_layernorm`` / ``post_attention_layernorm`` / ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``,
``model.norm``; no LM head, Gemma ties it to the embedding) and its tokenizer as ``spiece_model``: the bytes of
Gemma's sentencepiece model in a uint8 tensor. The all-in-one lumina_2.safetensors holds the same under
``text_encoders.gemma2_2b.transformer.`` and ``text_encoders.spiece_model`` (ldm.lumina2_files splits it).
Gemma-2-2B: 26 layers 2304 wide, 8 heads and 4 key/value heads of 256, MLP 9216 (tanh GELU), 256,000 embedding rows
(scaled by sqrt(2304)), RMS norms that scale by 1 + weight, RoPE base 10,000, epsilon 1e-6. The shape is read from
the weights; the head width (not in them) is 256, or Loom's metadata ``loom.gemma_head_dim`` for tiny test files. The
model runs on transformers' Gemma2Model, as ComfyUI's Gemma 2 computes it: global attention in every layer (no
sliding window; the same for prompts under 4,096 tokens) and no softcapping of the attention logits (transformers'
Gemma 2 default caps them at 50, which ComfyUI's omits).

Tokenizer: the file's own sentencepiece model (the `sentencepiece` package), a start token `<bos>` (2) first and
no end token, as ComfyUI's Gemma2BTokenizer (add_bos, no add_eos) and transformers' GemmaTokenizer tokenize. A file
without ``spiece_model`` is refused: Loom ships no Gemma tokenizer.

Encoding (ComfyUI's Gemma2_2BModel: layer "hidden", index -2): the states are the second-to-last layer's output,
before the final norm (diffusers' Lumina2Pipeline takes hidden_states[-2] too), for every token. A prompt is the
text as given: ComfyUI's CLIPTextEncodeLumina2 node puts a system prompt before it (`lumina2_prompt`,
`SYSTEM_PROMPTS`), plain CLIPTextEncode does not. Prompt weights are ComfyUI's: `(text)` and `(text:1.2)` weigh the
tokens of their text (each weighted run tokenized on its own), escaped `\\(` `\\)` are brackets; where a weight is
not 1 each token's state becomes z_empty + w * (z - z_empty), z_empty the states of `<bos>` followed by `<pad>` (0)
tokens, all attended, as ComfyUI's empty prompt is. A batch is padded with `<pad>` on the right and encoded with the
attention mask; each prompt's states are followed by zeros to the longest prompt, and
`TextEncoding.extra["attention_mask"]` ([B, L] int64) marks its tokens. (ComfyUI never cuts a prompt; diffusers
cuts at 256 tokens.)
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.qwen_text import ATTENTION_MASK, frozen_language_model
from ldm.t5 import scaling_keys
from ldm.text_encoders import PinnableTextEncoder, TextEncoding
from ldm.tokenizer import parse_emphasis

ENCODER_NAME = "gemma2_2b"  # ComfyUI's name for the encoder (per_encoder key)
FAMILY = "lumina2"
HIDDEN_LAYER = -2  # the second-to-last layer's output (hidden_states[-2]: before the last layer, not normed)
PAD, EOS, BOS = 0, 1, 2  # Gemma's <pad>, <eos>, <bos>
GEMMA2_2B_WIDTH = 2304
GEMMA2_HEAD_DIM = 256
HEAD_DIM_KEY = "loom.gemma_head_dim"  # the head width of Loom's tiny files (the weights do not tell it)
TOKENIZER_KEY = "spiece_model"
# ComfyUI's CLIPTextEncodeLumina2 system prompts (its `system_prompt` combo; "superior" is listed first).
SYSTEM_PROMPTS = {
    "superior": "You are an assistant designed to generate superior images with the superior degree of image-text "
                "alignment based on textual prompts or user prompts.",
    "alignment": "You are an assistant designed to generate high-quality images with the highest degree of image-text "
                 "alignment based on textual prompts.",
}
_EMBED = "model.embed_tokens.weight"
_PRE_FFN = "model.layers.0.pre_feedforward_layernorm.weight"  # Gemma 2 and 3
_Q_NORM = "model.layers.0.self_attn.q_norm.weight"  # Gemma 3 (and Qwen3) only
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_NEEDS = ("CLIPLoader type lumina2 takes Gemma-2-2B, Lumina Image 2.0's text encoder (gemma_2_2b_fp16.safetensors), "
          "or Qwen3-4B, Z-Image's")


def lumina2_prompt(user_prompt: str, system_prompt: str = "superior") -> str:
    """The text ComfyUI's CLIPTextEncodeLumina2 encodes: `system_prompt` (a `SYSTEM_PROMPTS` name) and the user's
    prompt, as "{system} <Prompt Start> {user}"."""
    if system_prompt not in SYSTEM_PROMPTS:
        raise ValueError(f"system_prompt must be one of {', '.join(SYSTEM_PROMPTS)}, not {system_prompt!r}")
    return f"{SYSTEM_PROMPTS[system_prompt]} <Prompt Start> {user_prompt}"


def is_gemma2(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a header's shapes) holds a Gemma 2 language model in ComfyUI's layout, any size."""
    return _EMBED in sd and _PRE_FFN in sd and _Q_NORM not in sd


def gemma_kind(sd: Mapping[str, Any]) -> str | None:
    """The kind the CLIP loaders name for a file's header: "gemma2_2b" (Lumina 2's: 2304 wide, or under 512 wide,
    Loom's tiny test models), "gemma2" (another size), "gemma3" (Gemma 3: q/k norms), or None for other files."""
    if is_gemma2(sd):
        width = sd[_EMBED].shape[1]
        return "gemma2_2b" if width == GEMMA2_2B_WIDTH or width < 512 else "gemma2"
    return "gemma3" if _EMBED in sd and _PRE_FFN in sd else None


class GemmaTokenizer:
    """Gemma's sentencepiece tokenizer from a model's serialized bytes (a file's `spiece_model`)."""

    def __init__(self, model_bytes: bytes):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)

    @classmethod
    def from_tensor(cls, tensor: Tensor) -> GemmaTokenizer:
        return cls(tensor.cpu().contiguous().numpy().tobytes())

    def encode(self, text: str) -> list[int]:
        """`text`'s token ids, without start or end tokens."""
        return self.processor.encode(text) if text else []

    def tokenize(self, prompt: str) -> tuple[list[int], list[float]]:
        """The ids ComfyUI encodes for `prompt` and each one's weight: `<bos>`, then each weighted run of text
        tokenized on its own (see the module docstring)."""
        ids, weights = [BOS], [1.0]
        for text, weight in parse_emphasis(prompt):
            tokens = self.encode(text)
            ids += tokens
            weights += [weight] * len(tokens)
        return ids, weights


def gemma2_config_from_state_dict(sd: Mapping[str, Any], head_dim: int = GEMMA2_HEAD_DIM) -> Any:
    """transformers' Gemma2Config of the language model in `sd`, its shape read from the weights (the head width
    `head_dim`), computing as ComfyUI's Gemma 2 does (see the module docstring)."""
    from transformers import Gemma2Config

    vocab, hidden = sd[_EMBED].shape
    layers = len({int(m[1]) for k in sd if (m := _LAYER.match(k))})
    q_rows = sd["model.layers.0.self_attn.q_proj.weight"].shape[0]
    k_rows = sd["model.layers.0.self_attn.k_proj.weight"].shape[0]
    if q_rows % head_dim or k_rows % head_dim:
        raise ValueError(f"its attention ({q_rows} query rows, {k_rows} key rows) does not fit heads {head_dim} wide")
    mlp = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    return Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                        num_attention_heads=q_rows // head_dim,
                        num_key_value_heads=k_rows // head_dim, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, max_position_embeddings=8192,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        layer_types=["full_attention"] * layers, attn_logit_softcapping=None,
                        final_logit_softcapping=None, tie_word_embeddings=True, use_cache=False, pad_token_id=PAD,
                        bos_token_id=BOS, eos_token_id=EOS)


def _refusal(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of
    from ldm.qwen3_text import is_qwen3

    kind = gemma_kind(sd)
    if kind == "gemma2":
        held = f"a Gemma 2 language model {sd[_EMBED].shape[1]} wide, not Gemma-2-2B ({GEMMA2_2B_WIDTH} wide)"
    elif kind == "gemma3":
        held = "Gemma 3 (another model's text encoder)"
    elif is_qwen3(sd):
        held = "Qwen3 (Z-Image's text encoder, which Z-Image's loader takes)"
    else:
        look = look_of(sd)
        held = look.what if look is not None else "no model layout Loom knows"
    return CheckpointError(f"{name}: not Gemma-2-2B, Lumina 2's text encoder: it holds {held}; {_NEEDS}")


def gemma2_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype,
                        head_dim: int = GEMMA2_HEAD_DIM) -> tuple[Any, set[str]]:
    """transformers' Gemma2Model holding the language model in `sd`, frozen, in `dtype`, and the keys it used or
    knowingly ignored; a CheckpointError naming `name` when the file is not Gemma-2-2B or its weights do not fit."""
    from transformers import Gemma2Model

    if gemma_kind(sd) != "gemma2_2b":
        raise _refusal(name, sd)
    try:
        config = gemma2_config_from_state_dict(sd, head_dim)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    model, used = frozen_language_model(Gemma2Model, config, sd, name, dtype, "Gemma 2")
    # a buffer outside the state dict, left on the meta device: set here
    model.embed_tokens.embed_scale = torch.tensor(config.hidden_size**0.5)
    ignored = {k for k in sd if k.startswith("lm_head.") or k in (TOKENIZER_KEY, "logit_scale")}
    return model, used | scaling_keys(sd) | ignored


class Lumina2TextEncoder(PinnableTextEncoder):
    """Gemma-2-2B, encoding as ComfyUI does for Lumina 2 (see the module docstring); the interface of
    ``ldm.text_encoders.TextEncoder``: `encode` gives each prompt's states, no pooled vector, and the attention mask
    in `extra["attention_mask"]`. Pinned to the CPU (`pinned_to_cpu`, CLIPLoader's device "cpu"), `.to()` changes
    its dtype only."""

    main_encoder = ENCODER_NAME

    def __init__(self, model: Any, tokenizer: GemmaTokenizer) -> None:
        super().__init__()
        self.gemma2_2b = model
        self.tokenizer = tokenizer

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: [B, L, hidden], L the longest prompt's tokens (with `<bos>`), zeros after each prompt's;
        `extra["attention_mask"]`: [B, L] int64. Clip skip and textual-inversion embeddings do not apply."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = (per_encoder or {}).get(ENCODER_NAME, prompts)
        rows = [self.tokenizer.tokenize(p) for p in prompts]
        length = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), length), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        weights = torch.ones(len(rows), length)
        for i, (row, row_weights) in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            weights[i, :len(row)] = torch.tensor(row_weights)
        hidden = self._states(ids, mask)
        if (weights != 1).any():
            empty = torch.full((1, length), PAD, dtype=torch.long)
            empty[0, 0] = BOS
            z_empty = self._states(empty, torch.ones_like(empty))
            w = weights.to(hidden)[..., None]
            hidden = torch.where(w != 1, z_empty + w * (hidden - z_empty), hidden)
        # zeros past each prompt's end, as the conditioning's other families have them
        return TextEncoding(hidden * mask.to(hidden)[..., None], None, {ATTENTION_MASK: mask})

    def _states(self, ids: Tensor, mask: Tensor) -> Tensor:
        device = self.gemma2_2b.device
        return self.gemma2_2b(input_ids=ids.to(device), attention_mask=mask.to(device),
                              output_hidden_states=True).hidden_states[HIDDEN_LAYER]


@dataclass
class LoadedLumina2Text:
    encoder: Lumina2TextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = FAMILY


def lumina2_text_encoder_from_state_dict(sd: Mapping[str, Tensor], name: str, device: torch.device | str = "cpu",
                                         dtype: torch.dtype = torch.float32,
                                         head_dim: int = GEMMA2_HEAD_DIM) -> LoadedLumina2Text:
    """Lumina 2's text encoder from Gemma-2-2B weights in gemma_2_2b_fp16.safetensors' layout (a file's, or the
    all-in-one checkpoint's from `ldm.lumina2_files.split_lumina2_checkpoint`); `name` names them in errors."""
    if gemma_kind(sd) == "gemma2_2b" and TOKENIZER_KEY not in sd:
        raise CheckpointError(f"{name}: a Gemma-2 file without its tokenizer (no `spiece_model` tensor, which "
                              "ComfyUI's gemma_2_2b_fp16.safetensors carries); Loom ships no Gemma tokenizer")
    model, used = gemma2_from_weights(sd, name, dtype, head_dim)
    tokenizer = GemmaTokenizer.from_tensor(sd[TOKENIZER_KEY])
    unused = sorted(f"{name}: {k}" for k in sd if k not in used)
    return LoadedLumina2Text(Lumina2TextEncoder(model, tokenizer).to(device).eval(), unused)


def load_lumina2_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.float32) -> LoadedLumina2Text:
    """One Gemma-2-2B file (gemma_2_2b_fp16.safetensors, its fp8 and scaled fp8 copies) as Lumina 2's text encoder,
    on `device` in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"Lumina 2 takes one Gemma-2-2B text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    head_dim = int(ckpt.read_metadata(path).get(HEAD_DIM_KEY, GEMMA2_HEAD_DIM))
    return lumina2_text_encoder_from_state_dict(sd, path.name, device, dtype, head_dim)


# A few sentences the tiny tokenizer is trained on (any prompt still tokenizes: unknown characters fall back to
# bytes, as Gemma's do).
_TINY_CORPUS = [
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts.",
    "You are an assistant designed to generate high-quality images with the highest degree of image-text alignment "
    "based on textual prompts.",
    "a photo of a cat sitting on a red sofa, soft light, high detail",
    "an astronaut riding a horse on the moon, digital painting",
    "a watercolor landscape with mountains, a lake and pine trees at sunset",
    "portrait of an old man with a grey beard, studio lighting, 85mm",
]


def tiny_spiece_model(vocab_size: int = 320) -> bytes:
    """A tiny sentencepiece model in Gemma's form (BPE with byte fallback, `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>`
    3, text kept as written), trained offline and deterministically on a few prompts; its serialized bytes."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TINY_CORPUS * 4), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, num_threads=1, minloglevel=2)
    return model.getvalue()


def tiny_gemma_state(seed: int = 0, hidden: int = 32, layers: int = 3) -> dict[str, Tensor]:
    """Random Gemma 2 weights in ComfyUI's layout with a tiny tokenizer (`tiny_spiece_model`) as `spiece_model`: a
    language model `hidden` wide (4 heads of hidden // 2, 2 key/value heads, MLP 2 * hidden; `tiny_head_dim`)."""
    return tiny_gemma_language_model(torch.Generator().manual_seed(seed), hidden, tiny_head_dim(hidden), layers)


def tiny_gemma_language_model(generator: torch.Generator, hidden: int, head: int, layers: int,
                              qk_norms: bool = False) -> dict[str, Tensor]:
    """Random Gemma weights drawn from `generator` (Gemma 2's layers, Gemma 3's with `qk_norms`), the tiny tokenizer
    as `spiece_model`: `hidden` wide, 4 heads of `head` and 2 key/value heads, MLP 2 * hidden."""
    import sentencepiece

    tokenizer = tiny_spiece_model()
    vocab = sentencepiece.SentencePieceProcessor(model_proto=tokenizer).get_piece_size()

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    norms = {"self_attn.q_norm.weight": (head,), "self_attn.k_norm.weight": (head,)} if qk_norms else {}
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "pre_feedforward_layernorm.weight": (hidden,), "post_feedforward_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (4 * head, hidden), "self_attn.k_proj.weight": (2 * head, hidden),
              "self_attn.v_proj.weight": (2 * head, hidden), "self_attn.o_proj.weight": (hidden, 4 * head), **norms,
              "mlp.gate_proj.weight": (2 * hidden, hidden), "mlp.up_proj.weight": (2 * hidden, hidden),
              "mlp.down_proj.weight": (hidden, 2 * hidden)}
    # Gemma's norms scale by 1 + weight: weights near 0, as trained ones are small
    state = {_EMBED: rand(vocab, hidden), "model.norm.weight": rand(hidden)}
    for i in range(layers):
        state |= {f"model.layers.{i}.{name}": rand(*shape) for name, shape in shapes.items()}
    state[TOKENIZER_KEY] = torch.frombuffer(bytearray(tokenizer), dtype=torch.uint8)
    return state


def tiny_head_dim(hidden: int) -> int:
    """The head width of Loom's tiny Gemma 2 `hidden` wide (the weights do not tell it; files carry it too)."""
    return hidden // 2


def write_tiny_gemma(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16, hidden: int = 32,
                     layers: int = 3) -> Path:
    """A tiny random Gemma 2 file in ComfyUI's layout, its tokenizer embedded (see `tiny_gemma_state`), a stand-in
    for gemma_2_2b_fp16.safetensors: Lumina 2's text states are `hidden` wide (its transformer's caption width)."""
    path = Path(path)
    write_safetensors(tiny_gemma_state(seed, hidden, layers), path,
                      {HEAD_DIM_KEY: str(tiny_head_dim(hidden)), "loom.seed": str(seed)}, dtype)
    return path


def load_lumina2_type_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                                   dtype: torch.dtype = torch.float32) -> Any:
    """CLIPLoader's type "lumina2" as ComfyUI reads it, by the file's kind: Gemma-2-2B is Lumina 2's text encoder
    (`load_lumina2_text_encoder`, family "lumina2"), Qwen3-4B Z-Image's (`ldm.qwen3_text.load_z_image_text_encoder`,
    family "z_image"); anything else is refused naming both. The result's `family` says which."""
    from ldm.qwen3_text import is_qwen3, load_z_image_text_encoder

    if len(paths) == 1 and (shapes := ckpt.shapes_or_none(paths[0])) is not None and is_qwen3(shapes):
        return load_z_image_text_encoder(paths, device, dtype)
    return load_lumina2_text_encoder(paths, device, dtype)
