"""FLUX.2's text encoders, as ComfyUI's CLIPLoader type "flux2" runs them: Mistral Small 3's language model for
FLUX.2 [dev], Qwen3-4B for [klein] 4B, Qwen3-8B for [klein] 9B; the file tells which.

Each gives, per token, three of its hidden states concatenated (layer a's, then b's, then c's: ComfyUI stacks them
on a new dim 1, moves it to dim 2 and flattens; diffusers' permute and reshape are the same), before any final norm:
the input of layers 9, 18 and 27 for Qwen3 (transformers' hidden_states[9], [18], [27]; ComfyUI's layer list counts
alike), of layers 10, 20 and 30 for Mistral. So 3 x 2560 = 7680 wide for Qwen3-4B, 3 x 4096 = 12288 for Qwen3-8B,
3 x 5120 = 15360 for Mistral Small 3 (`context_dim`). Only the layers before the last one read run: a file's deeper
layers and final norm are loaded by nothing (they cannot change those states) and count as used.

[klein] (ComfyUI's KleinTokenizer / Qwen3_4BModel / Qwen3_8BModel; diffusers' Flux2KleinPipeline gives the same):
the prompt goes into Qwen3's chat template with thinking off, `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>
assistant\\n<think>\\n\\n</think>\\n\\n`, is tokenized whole by Qwen3's tokenizer (ldm.qwen3_text's), and is padded
on the right with `<|endoftext|>` (151643) to at least 512 tokens, the padding masked as keys. The states of every
position are kept, the padding's too (they are not zeros: FLUX.2 attends to them, ComfyUI and diffusers alike); a
batch pads to its longest prompt. (diffusers cuts prompts at 512 tokens; ComfyUI never cuts.)

[dev] (ComfyUI's Flux2Tokenizer / Mistral3_24BModel): the prompt goes into FLUX.2's system prompt and Mistral's
instruction tags, `[SYSTEM_PROMPT]You are an AI that reasons ...[/SYSTEM_PROMPT][INST]{prompt}[/INST]`, is tokenized
by the file's own tekken tokenizer (ldm.tekken) after BOS `<s>` (1), and is encoded alone, unpadded. A batch
encodes its prompts one by one and puts each prompt's states at the end, zeros before (FLUX.2's loaders pad the
states with zeros at the front to 512 tokens, ComfyUI's model_base.Flux2 as nodes.sd.flux2 does, so the batch gives
each prompt exactly its own conditioning). diffusers' Flux2Pipeline instead pads every prompt on the left with
`<pad>` (11) to 512 tokens under an attention mask and keeps the padding's states: its prompt tokens' states are
these (up to rounding: RoPE sees the same relative positions), the 512 - L states before them differ from
ComfyUI's zeros.

In both, `TextEncoding.extra["attention_mask"]` ([B, L] int64) marks the prompt's tokens; ComfyUI's FLUX.2 attends
to every token, so nodes.sd.flux2 drops it. Prompt weights and `embedding:` words do not apply (ComfyUI disables
weights for both: brackets are text; `\\(` and `\\)` become brackets).

Files: Comfy-Org's qwen_3_4b.safetensors / qwen_3_8b*.safetensors (ldm.qwen3_text's layout) and
mistral_3_small_flux2_bf16 / _fp8 (transformers' Mistral names under `model.`: `model.embed_tokens`,
`model.layers.N.self_attn.q_proj`, ..., no q/k norms, no biases; and the tokenizer, `tekken_model`). Mistral Small 3:
40 layers 5120 wide, 32 heads and 8 key/value heads of 128, MLP 32768, 131,072 embedding rows, RoPE base 1e9, RMS
epsilon 1e-5. Files pruned to the 30 layers FLUX.2 reads (Comfy-Org's copies are reported to be; ComfyUI tells them
by a missing layer 39, MISTRAL3_24B_PRUNED_FLUX2, and drops the final norm) give the same states; fewer are
refused. Widths under 512 are Loom's tiny test models (`write_tiny_flux2_klein`, `write_tiny_flux2_mistral`: the real
layouts; a tiny Mistral is told by its tekken tensor, a tiny Qwen3 runs as Qwen3-4B). Scaled fp8 and ComfyUI's fp8
mixed-precision files are descaled as they load, and their NVFP4 and MXFP8 layers (mistral_3_small_flux2_fp4_mixed)
dequantized one at a time (`ldm.quant_formats`). The models run on transformers' Qwen3Model and MistralModel.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.quant_formats import BLOCK_FORMATS, dequantizing
from ldm.qwen3_text import QWEN3_4B_WIDTH, is_qwen3, qwen3_config_from_state_dict, token_ids, write_tiny_qwen3
from ldm.qwen_text import ATTENTION_MASK, PAD_TOKEN, frozen_language_model
from ldm.t5 import _check_quant_format, scaling_keys
from ldm.tekken import VOCAB_SIZE, tekken_bytes, tekken_tokenizer, tiny_tekken
from ldm.text_encoders import PinnableTextEncoder, TextEncoding

FAMILY = "flux2"
KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEV_SYSTEM_PROMPT = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                     "object relationships, object\nattribution and actions without speculation.")
DEV_TEMPLATE = f"[SYSTEM_PROMPT]{DEV_SYSTEM_PROMPT}[/SYSTEM_PROMPT][INST]{{}}[/INST]"
KLEIN_LAYERS = (9, 18, 27)
DEV_LAYERS = (10, 20, 30)
KLEIN_MIN_TOKENS = 512
MISTRAL_BOS = 1  # <s>
MISTRAL_PAD = 11  # <pad>
MISTRAL_WIDTH = 5120
QWEN3_8B_WIDTH = 4096
_QWEN3_KINDS = {QWEN3_4B_WIDTH: "qwen3_4b", QWEN3_8B_WIDTH: "qwen3_8b"}
TEKKEN_KEY = "tekken_model"
_EMBED = "model.embed_tokens.weight"
_POST_NORM = "model.layers.0.post_attention_layernorm.weight"
# Keys that make a Llama-layout file another model: Qwen3's q norm, Qwen2.5's biases, Gemma's extra norms.
_NOT_MISTRAL = ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_proj.bias",
                "model.layers.0.pre_feedforward_layernorm.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_NEEDS = ("CLIPLoader type flux2 takes one FLUX.2 text encoder: Mistral Small 3 (mistral_3_small_flux2_bf16 or "
          "_fp8) for FLUX.2 [dev], Qwen3-4B (qwen_3_4b) for [klein] 4B or Qwen3-8B (qwen_3_8b) for [klein] 9B")


@dataclass(frozen=True)
class Flux2TextKind:
    """One FLUX.2 text encoder: ComfyUI's name for it (the CLIP loaders' file kind, the `per_encoder` key, the
    encoder's attribute), the layers whose inputs it stacks, and what it is."""

    name: str
    layers: tuple[int, ...]
    described: str


KINDS = {"qwen3_4b": Flux2TextKind("qwen3_4b", KLEIN_LAYERS, "Qwen3-4B, FLUX.2 [klein] 4B's text encoder"),
         "qwen3_8b": Flux2TextKind("qwen3_8b", KLEIN_LAYERS, "Qwen3-8B, FLUX.2 [klein] 9B's text encoder"),
         "mistral3_24b": Flux2TextKind("mistral3_24b", DEV_LAYERS, "Mistral Small 3, FLUX.2 [dev]'s text encoder")}


def is_mistral(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a header's shapes) holds a Llama-layout language model that is no Qwen or Gemma."""
    return _EMBED in sd and _POST_NORM in sd and not any(k in sd for k in _NOT_MISTRAL)


def text_kind(sd: Mapping[str, Any]) -> str | None:
    """"mistral3_24b", "qwen3_4b" or "qwen3_8b" for a FLUX.2 text encoder's weights (or header), None otherwise."""
    if _EMBED not in sd:
        return None
    width = sd[_EMBED].shape[1]
    tiny = width < 512
    if is_qwen3(sd):
        return "qwen3_4b" if tiny else _QWEN3_KINDS.get(width)
    if is_mistral(sd) and (width == MISTRAL_WIDTH or (tiny and TEKKEN_KEY in sd)):
        return "mistral3_24b"
    return None


def _refusal(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    if is_qwen3(sd):
        held = f"a Qwen3 language model {sd[_EMBED].shape[1]} wide, neither Qwen3-4B (2560) nor Qwen3-8B (4096)"
    elif is_mistral(sd):
        held = f"a Llama-layout language model {sd[_EMBED].shape[1]} wide, not Mistral Small 3 ({MISTRAL_WIDTH})"
    else:
        look = look_of(sd)
        held = look.what if look is not None else "no model layout Loom knows"
    return CheckpointError(f"{name}: not a FLUX.2 text encoder: it holds {held}; {_NEEDS}")


def _layer(key: str) -> int | None:
    match = _LAYER.match(key)
    return None if match is None else int(match[1])


def _layer_count(sd: Mapping[str, Any]) -> int:
    return len({n for k in sd if (n := _layer(k)) is not None})


def _knowingly_unused(sd: Mapping[str, Tensor], depth: int) -> set[str]:
    """The keys no computation reads: layers from `depth` on, the final norm, an LM head, fp8 scales and tags."""
    deeper = {k for k in sd if (n := _layer(k)) is not None and n >= depth}
    return deeper | scaling_keys(sd) | {k for k in sd if k == "model.norm.weight" or k.startswith("lm_head.")}


def mistral_config_from_state_dict(sd: Mapping[str, Any], depth: int | None = None) -> Any:
    """transformers' MistralConfig of the language model in `sd` (its first `depth` layers: all by default), its shape
    read from the weights; heads 128 wide (Mistral Small 3's), a quarter of the width for tiny models."""
    from transformers import MistralConfig

    vocab, hidden = sd[_EMBED].shape
    head_dim = 128 if hidden >= 512 else hidden // 4
    return MistralConfig(vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
                         num_hidden_layers=depth or _layer_count(sd),
                         num_attention_heads=sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                         num_key_value_heads=sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                         head_dim=head_dim, rms_norm_eps=1e-5, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e9}, max_position_embeddings=131072,
                         tie_word_embeddings=False, use_cache=False, bos_token_id=MISTRAL_BOS,
                         pad_token_id=MISTRAL_PAD)


def _check_depth(sd: Mapping[str, Tensor], name: str, kind: Flux2TextKind) -> int:
    """The layers to run (the deepest one read); a CheckpointError when the file has fewer."""
    depth, layers = kind.layers[-1], _layer_count(sd)
    if layers < depth:
        read = ", ".join(map(str, kind.layers[:-1])) + f" and {kind.layers[-1]}"
        raise CheckpointError(f"{name}: {kind.described} with {layers} layers; FLUX.2 reads the inputs of its layers "
                              f"{read}, so it needs at least {depth}")
    return depth


def flux2_text_model(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[Any, Flux2TextKind, set[str]]:
    """transformers' Qwen3Model or MistralModel holding the first layers of the language model in `sd` (as deep as
    FLUX.2 reads; no final norm), frozen, in `dtype`, its kind, and the keys it used or knowingly ignored; a
    CheckpointError naming `name` when the file is no FLUX.2 text encoder or its weights do not fit."""
    from transformers import MistralModel, Qwen3Model

    kind_name = text_kind(sd)
    if kind_name is None:
        raise _refusal(name, sd)
    kind = KINDS[kind_name]
    for key in sd:
        if key.endswith(".comfy_quant"):
            _check_quant_format(f"{name}: {key}", sd[key], BLOCK_FORMATS)
    scales, sd = scaling_keys(sd), dequantizing(sd)  # NVFP4 / MXFP8 layers read one at a time, unpacked
    if kind_name == "mistral3_24b" and TEKKEN_KEY not in sd:
        raise CheckpointError(f"{name}: Mistral Small 3 without its tokenizer (no `{TEKKEN_KEY}` tensor, which "
                              "Comfy-Org's mistral_3_small_flux2 files hold); use one of those files")
    depth = _check_depth(sd, name, kind)
    if kind_name == "mistral3_24b":
        config, build, what = mistral_config_from_state_dict(sd, depth), MistralModel, "Mistral Small 3"
    else:
        config = qwen3_config_from_state_dict({k: v for k, v in sd.items() if (_layer(k) or 0) < depth})
        build, what = Qwen3Model, "Qwen3"
    # the deepest state read is the last layer's output, taken before the norm
    model, used = frozen_language_model(build, config, sd, name, dtype, what,
                                        prepare=lambda model: setattr(model, "norm", nn.Identity()))
    return model, kind, used | scales | _knowingly_unused(sd, depth) | ({TEKKEN_KEY} & sd.keys())


def _unescaped(prompt: str) -> str:
    return prompt.replace("\\(", "(").replace("\\)", ")")


def klein_tokens(prompt: str) -> list[int]:
    """The token ids ComfyUI encodes for a FLUX.2 [klein] prompt, before its padding."""
    return token_ids(KLEIN_TEMPLATE.format(_unescaped(prompt)))


def stacked_states(hidden_states: tuple[Tensor, ...], layers: tuple[int, ...]) -> Tensor:
    """[B, L, len(layers) * hidden]: per token, the states of `layers` (transformers' hidden_states indices: the
    layers' inputs) one after another."""
    states = torch.stack([hidden_states[i] for i in layers], dim=2)  # [B, L, layers, hidden]
    return states.reshape(*states.shape[:2], -1)


class Flux2TextEncoder(PinnableTextEncoder):
    """One FLUX.2 text encoder (Qwen3-4B, Qwen3-8B or Mistral Small 3: `kind`), encoding as ComfyUI does (see the
    module docstring), held in the attribute of its kind's name (`qwen3_4b`, `qwen3_8b`, `mistral3_24b`); the
    interface of ``ldm.text_encoders.TextEncoder``: `encode` gives each prompt's states, no pooled vector, and the
    prompt's tokens in `extra["attention_mask"]`. Mistral's tokenizer is the file's (`tokenizer`). Pinned to the CPU
    (`pinned_to_cpu`, CLIPLoader's device "cpu"), `.to()` changes its dtype only."""

    def __init__(self, model: Any, kind: Flux2TextKind, tokenizer: Any = None) -> None:
        super().__init__()
        self.kind = kind
        self.main_encoder = kind.name
        setattr(self, kind.name, model)
        self.tokenizer = tokenizer

    @property
    def model(self) -> Any:
        return getattr(self, self.main_encoder)

    @property
    def context_dim(self) -> int:
        """The width of the states: the FLUX.2 transformer's context_in_dim (7680, 12288 or 15360)."""
        return len(self.kind.layers) * self.model.config.hidden_size

    def tokenize(self, prompt: str) -> list[int]:
        """The token ids ComfyUI encodes for `prompt` (without [klein]'s padding)."""
        if self.tokenizer is None:
            return klein_tokens(prompt)
        text = DEV_TEMPLATE.format(_unescaped(prompt))
        return [MISTRAL_BOS, *self.tokenizer.encode(text, add_special_tokens=False).ids]

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: [B, L, context_dim]; `extra["attention_mask"]`: [B, L] int64, 1 for the prompts' tokens. Clip
        skip, prompt weights and textual-inversion embeddings do not apply."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = (per_encoder or {}).get(self.kind.name, prompts)
        rows = [self.tokenize(p) for p in prompts]
        if self.tokenizer is None:
            return self._encode_klein(rows)
        return self._encode_dev(rows)

    def _states(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        device = self.model.device
        out = self.model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
                         output_hidden_states=True, use_cache=False)
        return stacked_states(out.hidden_states, self.kind.layers)

    def _encode_klein(self, rows: list[list[int]]) -> TextEncoding:
        length = max(KLEIN_MIN_TOKENS, *map(len, rows))
        ids = torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return TextEncoding(self._states(ids, mask), None, {ATTENTION_MASK: mask})

    def _encode_dev(self, rows: list[list[int]]) -> TextEncoding:
        length = max(map(len, rows))
        cond = None
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            states = self._states(torch.tensor([row]), None)[0]
            if cond is None:
                cond = states.new_zeros(len(rows), length, states.shape[-1])
            cond[i, length - len(row):] = states
            mask[i, length - len(row):] = 1
        return TextEncoding(cond, None, {ATTENTION_MASK: mask})


@dataclass
class LoadedFlux2Text:
    encoder: Flux2TextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = FAMILY

    @property
    def kind(self) -> str:
        return self.encoder.kind.name

    @property
    def context_dim(self) -> int:
        return self.encoder.context_dim


def load_flux2_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> LoadedFlux2Text:
    """One FLUX.2 text-encoder file (Mistral Small 3, Qwen3-4B or Qwen3-8B, told by its weights; bf16, fp16, fp8 or
    scaled fp8) on `device` in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"FLUX.2 takes one text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    model, kind, used = flux2_text_model(sd, path.name, dtype)
    tokenizer = None
    if kind.name == "mistral3_24b":
        try:
            tokenizer = tekken_tokenizer(tekken_bytes(sd[TEKKEN_KEY]))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path.name}: its `{TEKKEN_KEY}` is no tekken tokenizer JSON ({e!r})") from None
    unused = sorted(f"{path.name}: {k}" for k in sd if k not in used)
    return LoadedFlux2Text(Flux2TextEncoder(model, kind, tokenizer).to(device).eval(), unused)


# Words of FLUX.2 prompts and of its system prompt, from which the tiny tekken's merges are learnt.
TINY_CORPUS = DEV_SYSTEM_PROMPT + (" a photo of a red fox running through the snow at sunset, a cat on a sofa, "
                                    "the city at night, a portrait of a woman with a hat, 1024 x 1024 px, 2048")


def tiny_mistral_state(seed: int = 0, hidden: int = 8, layers: int = 31) -> dict[str, Tensor]:
    """Random Mistral weights in Comfy-Org's layout: a language model `hidden` wide (8 heads of hidden // 4, so the
    attention is twice as wide as the model, as Mistral Small 3's 4096 of 5120; 2 key/value heads; MLP 3 x hidden)
    with Mistral's full 131,072-row embedding, its final norm, and a tiny tekken tokenizer (`tekken_model`)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    head = hidden // 4
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (8 * head, hidden), "self_attn.k_proj.weight": (2 * head, hidden),
              "self_attn.v_proj.weight": (2 * head, hidden), "self_attn.o_proj.weight": (hidden, 8 * head),
              "mlp.gate_proj.weight": (3 * hidden, hidden), "mlp.up_proj.weight": (3 * hidden, hidden),
              "mlp.down_proj.weight": (hidden, 3 * hidden)}
    state = {_EMBED: rand(VOCAB_SIZE, hidden)}
    for i in range(layers):
        # norms around 1, as trained ones are
        state |= {f"model.layers.{i}.{name}": rand(*shape) + name.endswith("norm.weight")
                  for name, shape in shapes.items()}
    state["model.norm.weight"] = 1 + rand(hidden)
    tekken = tiny_tekken(TINY_CORPUS)
    state[TEKKEN_KEY] = torch.frombuffer(bytearray(tekken), dtype=torch.uint8)
    return state


def write_tiny_flux2_mistral(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16, hidden: int = 8,
                             layers: int = 31) -> Path:
    """A tiny random FLUX.2 [dev] text encoder in Comfy-Org's layout (see `tiny_mistral_state`), a stand-in for
    mistral_3_small_flux2_bf16.safetensors: its states are 3 x `hidden` wide (24: ldm.flux2_files' TINY_FLUX2).
    31 layers, one past the deepest read, as a full file has more; 30 make Comfy-Org's pruned layout."""
    path = Path(path)
    write_safetensors(tiny_mistral_state(seed, hidden, layers), path, {"loom.seed": str(seed)}, dtype)
    return path


def write_tiny_flux2_klein(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16, hidden: int = 8,
                           layers: int = 28) -> Path:
    """A tiny random FLUX.2 [klein] text encoder: ldm.qwen3_text's tiny Qwen3 in qwen_3_4b.safetensors' layout,
    28 layers deep so that layers 9, 18 and 27 exist (one past the deepest read, as Qwen3-4B's 36 are); its states
    are 3 x `hidden` wide (24: ldm.flux2_files' TINY_FLUX2_KLEIN)."""
    return write_tiny_qwen3(path, seed, dtype, hidden, layers)
