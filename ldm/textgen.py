"""Text generation with the language model inside a CLIP: ComfyUI's TextGenerate node (prompt enhancement), which
runs a text encoder that is a causal LM on a chat prompt and decodes the tokens it writes.

Which encoders: those whose loaded weights hold a whole language model and its output head: Z-Image's Qwen3-4B
(``ldm.qwen3_text``) and Lumina 2's Gemma-2-2B (``ldm.gemma_text``), their heads tied to the embedding, and Qwen-Image
2.1's Qwen3-VL-8B (``ldm.qwen3vl_text``: its language model, its final norm put back, its head; text prompts).
Refused, each with its reason: FLUX.2's encoders (``ldm.flux2_text`` loads only the layers FLUX.2 reads, no final
norm), Qwen-Image's Qwen2.5-VL-7B (``ldm.qwen_text`` leaves the file's untied ``lm_head`` unloaded), ACE-Step 1.5's
(``ldm.ace_step15_text``: an embedding model and a language model of audio codes, not a chat model), and every CLIP,
T5 or UMT5.

Prompts (the models' chat templates for one user turn with a generation prompt, as their tokenizers apply them):
Qwen3 `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`, followed with thinking off by the empty
think block `<think>\\n\\n</think>\\n\\n` (Qwen3's enable_thinking=False); Gemma 2 `<bos><start_of_turn>user\\n{prompt}
<end_of_turn>\\n<start_of_turn>model\\n`. Without the template the prompt is tokenized as it is (Gemma's `<bos>`
first, as its tokenizer always adds it).

Decoding (ComfyUI's BaseGenerate.generate / sample_token): the prompt runs once, then one token a step with
transformers' KV cache; the logits are the last state times the head, in float32. Greedy takes the argmax; sampling
applies, in ComfyUI's order, the repetition penalty (to the prompt's tokens and those written so far, the history
ComfyUI's Qwen3-VL and Gemma 4 generate pass: a negative logit times the penalty, a positive one divided by it), the
presence penalty (subtracted from those tokens' logits), the temperature, top-k (k > 0), min-p (p > 0: below p times
the likeliest's probability), top-p (p < 1: a token goes once the probabilities up to and including its own pass p;
the likeliest always stays), then draws from a torch.Generator seeded with `seed` on the model's device. Generation
stops after an end token (Qwen's `<|im_end|>` / `<|endoftext|>`, Gemma's `<end_of_turn>` / `<eos>`) or `max_length`
tokens; the tokens are decoded with special tokens skipped (Qwen3's `<think>` and `</think>` are not special: a think
block stays in the text, as ComfyUI's decode leaves it).

Checked against transformers' Qwen3ForCausalLM / Gemma2ForCausalLM `generate(do_sample=False)` on the same weights
and ids (tests/ldm/test_textgen.py): the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

QWEN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QWEN3_NO_THINKING = "<think>\n\n</think>\n\n"
QWEN_STOPS = frozenset({151643, 151645})  # <|endoftext|>, <|im_end|>
GEMMA_TEMPLATE = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
NEEDS = ("TextGenerate needs a CLIP holding a whole causal language model with its output head: Z-Image's Qwen3-4B "
         "or Lumina 2's Gemma-2-2B (CLIPLoader type lumina2), or Qwen-Image 2.1's Qwen3-VL-8B (type qwen_image)")


class TextGenerationError(ValueError):
    """A CLIP that cannot generate text, or inputs it cannot take."""


@dataclass(frozen=True)
class Sampling:
    """TextGenerate's sampling_mode "on" (ComfyUI's defaults)."""

    temperature: float = 0.7
    top_k: int = 64
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.05
    presence_penalty: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class ChatLM:
    """A language model ready to generate: transformers' base model (`model(input_ids, cache, use_cache)`
    giving `last_hidden_state` and `cache`), its head [vocab, hidden], its tokenizer and chat template."""

    model: Any
    head: Tensor
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    template: str
    stop_ids: frozenset[int]
    no_thinking: str = ""  # what the template adds with thinking off ("" for models that do not think)

    def prompt_ids(self, prompt: str, thinking: bool = False, use_default_template: bool = True) -> list[int]:
        """The ids generation starts from: `prompt` in the chat template, or as it is."""
        if not use_default_template:
            return self.encode(prompt)
        return self.encode(self.template.format(prompt) + ("" if thinking else self.no_thinking))


def _qwen3_lm(encoder: Any) -> ChatLM:
    from ldm.qwen3_text import decode, token_ids

    model = encoder.qwen3_4b
    return ChatLM(model, model.embed_tokens.weight, token_ids, decode, QWEN_TEMPLATE, QWEN_STOPS, QWEN3_NO_THINKING)


class _NormedStates(torch.nn.Module):
    """A language model whose states are taken before its final norm (Qwen-Image 2.1's encoder), with the norm put
    back for generation."""

    def __init__(self, model: Any, norm: torch.nn.Module):
        super().__init__()
        self.model, self.norm = model, norm

    def forward(self, **kwargs: Any) -> Any:
        out = self.model(**kwargs)
        out.last_hidden_state = self.norm(out.last_hidden_state)
        return out


def _qwen3vl_lm(encoder: Any) -> ChatLM:
    from ldm.qwen3_text import decode, token_ids

    if encoder.lm_head is None:
        raise TextGenerationError(f"this Qwen3-VL was loaded without its LM head. {NEEDS}")
    from ldm.quant import dequantized_weight  # the head in full precision, stored in fp8 or not

    model = _NormedStates(encoder.qwen3vl_8b.language_model, encoder.final_norm)
    head = dequantized_weight(encoder.lm_head)
    return ChatLM(model, head, token_ids, decode, QWEN_TEMPLATE, QWEN_STOPS, QWEN3_NO_THINKING)


def _gemma_lm(encoder: Any) -> ChatLM:
    from ldm.gemma_text import BOS, EOS

    processor = encoder.tokenizer.processor
    end_of_turn = processor.piece_to_id("<end_of_turn>")
    stops = {EOS} | ({end_of_turn} if end_of_turn != processor.unk_id() else set())
    model = encoder.gemma2_2b
    return ChatLM(model, model.embed_tokens.weight, lambda text: [BOS, *encoder.tokenizer.encode(text)],
                  lambda ids: processor.decode([i for i in ids if i not in stops]), GEMMA_TEMPLATE, frozenset(stops))


# Loom's text encoders that hold a language model but cannot generate with it, and why.
_REFUSALS = {
    "Flux2TextEncoder": "FLUX.2's text encoder is loaded only as deep as FLUX.2 reads it (not its last layers nor "
                        "its final norm); [klein] 4B's Qwen3-4B file loads whole with CLIPLoader type lumina2",
    "QwenImageTextEncoder": "Qwen-Image's Qwen2.5-VL-7B is loaded without its LM head (untied in Qwen2.5-VL-7B, "
                            "left unused by ldm.qwen_text)",
    "AceStep15TextEncoder": "ACE-Step 1.5's text side is an embedding model and a language model of audio codes, "
                            "not a chat model",
}
_ADAPTERS: dict[str, Callable[[Any], ChatLM]] = {"ZImageTextEncoder": _qwen3_lm, "Lumina2TextEncoder": _gemma_lm,
                                                 "Qwen21TextEncoder": _qwen3vl_lm}


def chat_lm(encoder: Any) -> ChatLM:
    """The generating language model of a CLIP's encoder; a TextGenerationError naming what is needed otherwise."""
    kind = type(encoder).__name__
    if kind in _ADAPTERS:
        return _ADAPTERS[kind](encoder)
    reason = _REFUSALS.get(kind, f"this CLIP ({kind}) holds no causal language model")
    raise TextGenerationError(f"{reason}. {NEEDS}")


def filtered_logits(logits: Tensor, history: list[int], sampling: Sampling) -> Tensor:
    """Float logits [B, V] after ComfyUI's penalties and filters (see the module docstring), removed ids at -inf."""
    logits = logits.float().clone()
    seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    if len(seen) and sampling.repetition_penalty != 1.0:
        old = logits[:, seen]
        logits[:, seen] = torch.where(old < 0, old * sampling.repetition_penalty, old / sampling.repetition_penalty)
    if len(seen) and sampling.presence_penalty != 0.0:
        logits[:, seen] -= sampling.presence_penalty
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if sampling.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < sampling.min_p * probs.max(-1, keepdim=True).values, -torch.inf)
    if sampling.top_p < 1.0:
        ordered, order = logits.sort(-1, descending=True)
        beyond = ordered.softmax(-1).cumsum(-1) > sampling.top_p
        beyond[:, 0] = False
        logits = logits.masked_fill(beyond.scatter(1, order, beyond), -torch.inf)
    return logits


def _next_token(logits: Tensor, history: list[int], sampling: Sampling | None,
                generator: torch.Generator | None) -> int:
    if sampling is None or sampling.temperature == 0.0:
        return int(logits.argmax(-1)[0])
    probs = filtered_logits(logits, history, sampling).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0, 0])


@torch.inference_mode()
def generate_ids(lm: ChatLM, prompt_ids: list[int], max_length: int, sampling: Sampling | None = None) -> list[int]:
    """The ids `lm` writes after `prompt_ids`: greedy (`sampling` None) or sampled, at most `max_length`, the end
    token included when it comes."""
    device = lm.head.device
    generator = None if sampling is None else torch.Generator(device=device).manual_seed(sampling.seed)
    step, cache, written = torch.tensor([prompt_ids], device=device), None, []
    for _ in range(max_length):
        out = lm.model(input_ids=step, cache=cache, use_cache=True)
        cache = out.cache
        logits = F.linear(out.last_hidden_state[:, -1], lm.head).float()
        token = _next_token(logits, prompt_ids + written, sampling, generator)
        written.append(token)
        if token in lm.stop_ids:
            break
        step = torch.tensor([[token]], device=device)
    return written


def generate_text(encoder: Any, prompt: str, max_length: int = 512, sampling: Sampling | None = None,
                  thinking: bool = False, use_default_template: bool = True) -> str:
    """TextGenerate: the text a CLIP's language model writes for `prompt` (see the module docstring)."""
    lm = chat_lm(encoder)
    ids = lm.prompt_ids(prompt, thinking, use_default_template)
    return lm.decode(generate_ids(lm, ids, max_length, sampling))
