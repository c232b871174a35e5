"""Text generation with the language model inside a CLIP: ComfyUI's TextGenerate node (prompt enhancement), which
runs a text encoder that is a causal LM on a chat prompt and decodes the tokens it writes.

Which encoders: those whose loaded weights hold a whole language model and its output head: Z-Image's Qwen3-4B
(``ldm.qwen3_text``), Lumina 2's Gemma-2-2B (``ldm.gemma_text``) and LTX-2's Gemma 3 12B (``ldm.ltx2_text``), their
heads tied to the embedding (Gemma 3's published config has no final logit softcap, nor has ldm.ltx2_text's), and
Qwen-Image 2.1's Qwen3-VL-8B (``ldm.qwen3vl_text``: its language model, its final norm put back, its head; text
prompts). LTX-2's Gemma 3 also reads a picture when its file holds Gemma 3's vision tower (``ldm.ltx2_text``, whose
encoder then has `vision`; see Pictures); the others, and a Gemma 3 file without the tower, generate from text only
and refuse a picture.
Refused, each with its reason: FLUX.2's encoders (``ldm.flux2_text`` loads only the layers FLUX.2 reads, no final
norm), Qwen-Image's Qwen2.5-VL-7B (``ldm.qwen_text`` leaves the file's untied ``lm_head`` unloaded), ACE-Step 1.5's
(``ldm.ace_step15_text``: an embedding model and a language model of audio codes, not a chat model), and every CLIP,
T5 or UMT5.

Prompts (the models' chat templates for one user turn with a generation prompt, as their tokenizers apply them):
Qwen3 `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`, followed with thinking off by the empty
think block `<think>\\n\\n</think>\\n\\n` (Qwen3's enable_thinking=False); Gemma 2 `<bos><start_of_turn>user\\n{prompt}
<end_of_turn>\\n<start_of_turn>model\\n`; Gemma 3 (ComfyUI's Gemma3_12BTokenizer template)
`<bos><start_of_turn>system\\nYou are a helpful assistant.<end_of_turn>\\n<start_of_turn>user\\n{prompt}<end_of_turn>\\n
<start_of_turn>model\\n`, a prompt that already starts with `<start_of_turn>` being taken as templated (as ComfyUI's
tokenizer does; TextGenerateLTX2Prompt's are), and tokenized as ``ldm.ltx2_text`` tokenizes prompts. Without the
template the prompt is tokenized as it is (Gemma's `<bos>` first, as its tokenizer always adds it).

Pictures (Gemma 3 only, ComfyUI's Gemma3_Tokenizer with an image): the picture goes where the prompt's first
`<image_soft_token>` is: the default template with a picture is ComfyUI's
`<bos><start_of_turn>system\nYou are a helpful assistant.<end_of_turn>\n<start_of_turn>user\n\n<image_soft_token>
{prompt}<end_of_turn>\n\n<start_of_turn>model\n`; a templated prompt (TextGenerateLTX2Prompt's image-to-video one)
or one without the template keeps its own marker, and a prompt without any leaves the picture unread, as in
ComfyUI. The marker becomes the picture's 256 soft tokens (ldm.ltx2_text), which enter the model in place of token
embeddings at the first step; the repetition penalty's history holds the prompt's text tokens.

Decoding (ComfyUI's BaseGenerate.generate / sample_token): the prompt runs once, then one token a step with
transformers' KV cache; the logits are the last state times the head, in float32. Greedy takes the argmax; sampling
applies, in ComfyUI's order, the repetition penalty (to the prompt's tokens and those written so far, the history
ComfyUI's Qwen3-VL and Gemma 4 generate pass: a negative logit times the penalty, a positive one divided by it), the
presence penalty (subtracted from those tokens' logits), the temperature, top-k (k > 0), min-p (p > 0: below p times
the likeliest's probability), top-p (p < 1: a token goes once the probabilities up to and including its own pass p;
the likeliest always stays), then draws from a torch.Generator seeded with `seed` on the model's device. Generation
stops after an end token (Qwen's `<|im_end|>` / `<|endoftext|>`, Gemma's `<end_of_turn>` / `<eos>`; ComfyUI's
Gemma 3 stops at `<end_of_turn>` alone, transformers' generation config at either) or `max_length` tokens; the tokens
are decoded with special tokens skipped (Qwen3's `<think>` and `</think>` are not special: a think block stays in the
text, as ComfyUI's decode leaves it).

Checked against transformers' Qwen3ForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM `generate(do_sample=False)`
on the same weights and ids (tests/ldm/test_textgen.py, tests/ldm/test_textgen_gemma3.py), and with a picture
against Gemma3ForConditionalGeneration's (tests/ldm/test_gemma3_vision.py): the same tokens.
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
TURN_START = "<start_of_turn>"
GEMMA3_TEMPLATE = (f"{TURN_START}system\nYou are a helpful assistant.<end_of_turn>\n"
                   f"{TURN_START}user\n{{}}<end_of_turn>\n{TURN_START}model\n")
GEMMA3_IMAGE_TEMPLATE = (f"{TURN_START}system\nYou are a helpful assistant.<end_of_turn>\n"
                         f"{TURN_START}user\n\n<image_soft_token>{{}}<end_of_turn>\n\n{TURN_START}model\n")
NEEDS = ("TextGenerate needs a CLIP holding a whole causal language model with its output head: Z-Image's Qwen3-4B "
         "or Lumina 2's Gemma-2-2B (CLIPLoader type lumina2), Qwen-Image 2.1's Qwen3-VL-8B (type qwen_image), or "
         "LTX-2's Gemma 3 12B (LTXAVTextEncoderLoader)")
TEXT_ONLY = ("Loom's generating CLIPs read text only, but for LTX-2's Gemma 3 12B loaded with its vision tower; "
             "disconnect the image input")
NO_VISION = ("this Gemma 3 file holds no vision tower (no vision_model.* / multi_modal_projector.* weights, which "
             "Comfy-Org's gemma_3_12B_it.safetensors carries), so it reads text only; disconnect the image input")


# LTX-2's prompt enhancement (TextGenerateLTX2Prompt): Lightricks' system prompts for text-to-video and
# image-to-video, Apache-2.0, as diffusers carries them (pipelines/ltx2/utils.py, T2V_DEFAULT_SYSTEM_PROMPT /
# I2V_DEFAULT_SYSTEM_PROMPT), laid out as ComfyUI sends them: one line per paragraph or bullet, the T2V prompt's
# first sentence also opening the I2V one, the examples' "Input:", "Output:" and text on lines of their own.
_CREATIVE_ASSISTANT = (
    "You are a Creative Assistant. Given a user's raw input prompt describing a scene or concept, expand it into a "
    'detailed video generation prompt with specific visuals and integrated audio to guide a text-to-video model.')
LTX2_T2V_SYSTEM_PROMPT = _CREATIVE_ASSISTANT + (
    '\n'
    '#### Guidelines\n'
    "- Strictly follow all aspects of the user's raw input: include every element requested (style, visuals, "
    'motions, actions, camera movement, audio).\n'
    '    - If the input is vague, invent concrete details: lighting, textures, materials, scene settings, etc.\n'
    '        - For characters: describe gender, clothing, hair, expressions. DO NOT invent unrequested '
    'characters.\n'
    '- Use active language: present-progressive verbs ("is walking," "speaking"). If no action specified, describe '
    'natural movements.\n'
    '- Maintain chronological flow: use temporal connectors ("as," "then," "while").\n'
    '- Audio layer: Describe complete soundscape (background audio, ambient sounds, SFX, speech/music when '
    'requested). Integrate sounds chronologically alongside actions. Be specific (e.g., "soft footsteps on tile"), '
    'not vague (e.g., "ambient sound is present").\n'
    '- Speech (only when requested):\n'
    '    - For ANY speech-related input (talking, conversation, singing, etc.), ALWAYS include exact words in '
    'quotes with voice characteristics (e.g., "The man says in an excited voice: \'You won\'t believe what I just '
    'saw!\'").\n'
    '    - Specify language if not English and accent if relevant.\n'
    '- Style: Include visual style at the beginning: "Style: <style>, <rest of prompt>." Default to '
    'cinematic-realistic if unspecified. Omit if unclear.\n'
    '- Visual and audio only: NO non-visual/auditory senses (smell, taste, touch).\n'
    '- Restrained language: Avoid dramatic/exaggerated terms. Use mild, natural phrasing.\n'
    '    - Colors: Use plain terms ("red dress"), not intensified ("vibrant blue," "bright red").\n'
    '    - Lighting: Use neutral descriptions ("soft overhead light"), not harsh ("blinding light").\n'
    '    - Facial features: Use delicate modifiers for subtle features (i.e., "subtle freckles").\n'
    '\n'
    '#### Important notes:\n'
    "- Analyze the user's raw input carefully. In cases of FPV or POV, exclude the description of the subject whose "
    'POV is requested.\n'
    '- Camera motion: DO NOT invent camera motion unless requested by the user.\n'
    "- Speech: DO NOT modify user-provided character dialogue unless it's a typo.\n"
    '- No timestamps or cuts: DO NOT use timestamps or describe scene cuts unless explicitly requested.\n'
    '- Format: DO NOT use phrases like "The scene opens with...". Start directly with Style (optional) and '
    'chronological scene description.\n'
    '- Format: DO NOT start your response with special characters.\n'
    '- DO NOT invent dialogue unless the user mentions speech/talking/singing/conversation.\n'
    "- If the user's raw input prompt is highly detailed, chronological and in the requested format: DO NOT make "
    'major edits or introduce new elements. Add/enhance audio descriptions if missing.\n'
    '\n'
    '#### Output Format (Strict):\n'
    '- Single continuous paragraph in natural language (English).\n'
    '- NO titles, headings, prefaces, code fences, or Markdown.\n'
    '- If unsafe/invalid, return original user prompt. Never ask questions or clarifications.\n'
    '\n'
    'Your output quality is CRITICAL. Generate visually rich, dynamic prompts with integrated audio for '
    'high-quality video generation.\n'
    '\n'
    '#### Example\n'
    'Input: "A woman at a coffee shop talking on the phone"\n'
    'Output:\n'
    'Style: realistic with cinematic lighting. In a medium close-up, a woman in her early 30s with shoulder-length '
    'brown hair sits at a small wooden table by the window. She wears a cream-colored turtleneck sweater, holding a '
    'white ceramic coffee cup in one hand and a smartphone to her ear with the other. Ambient cafe sounds fill the '
    'space—espresso machine hiss, quiet conversations, gentle clinking of cups. The woman listens intently, nodding '
    'slightly, then takes a sip of her coffee and sets it down with a soft clink. Her face brightens into a warm '
    "smile as she speaks in a clear, friendly voice, 'That sounds perfect! I'd love to meet up this weekend. How "
    "about Saturday afternoon?' She laughs softly—a genuine chuckle—and shifts in her chair. Behind her, other "
    "patrons move subtly in and out of focus. 'Great, I'll see you then,' she concludes cheerfully, lowering the "
    'phone.')
LTX2_I2V_SYSTEM_PROMPT = _CREATIVE_ASSISTANT + (
    '\n'
    'You are a Creative Assistant writing concise, action-focused image-to-video prompts. Given an image (first '
    'frame) and user Raw Input Prompt, generate a prompt to guide video generation from that image.\n'
    '\n'
    '#### Guidelines:\n'
    '- Analyze the Image: Identify Subject, Setting, Elements, Style and Mood.\n'
    '- Follow user Raw Input Prompt: Include all requested motion, actions, camera movements, audio, and details. '
    'If in conflict with the image, prioritize user request while maintaining visual consistency (describe '
    "transition from image to user's scene).\n"
    "- Describe only changes from the image: Don't reiterate established visual details. Inaccurate descriptions "
    'may cause scene cuts.\n'
    '- Active language: Use present-progressive verbs ("is walking," "speaking"). If no action specified, describe '
    'natural movements.\n'
    '- Chronological flow: Use temporal connectors ("as," "then," "while").\n'
    '- Audio layer: Describe complete soundscape throughout the prompt alongside actions—NOT at the end. Align '
    'audio intensity with action tempo. Include natural background audio, ambient sounds, effects, speech or music '
    '(when requested). Be specific (e.g., "soft footsteps on tile") not vague (e.g., "ambient sound").\n'
    "- Speech (only when requested): Provide exact words in quotes with character's visual/voice characteristics "
    '(e.g., "The tall man speaks in a low, gravelly voice"), language if not English and accent if relevant. If '
    'general conversation mentioned without text, generate contextual quoted dialogue. (i.e., "The man is talking" '
    'input -> the output should include exact spoken words, like: "The man is talking in an excited voice saying: '
    "'You won't believe what I just saw!' His hands gesture expressively as he speaks, eyebrows raised with "
    'enthusiasm. The ambient sound of a quiet room underscores his animated speech.")\n'
    '- Style: Include visual style at beginning: "Style: <style>, <rest of prompt>." If unclear, omit to avoid '
    'conflicts.\n'
    '- Visual and audio only: Describe only what is seen and heard. NO smell, taste, or tactile sensations.\n'
    '- Restrained language: Avoid dramatic terms. Use mild, natural, understated phrasing.\n'
    '\n'
    '#### Important notes:\n'
    '- Camera motion: DO NOT invent camera motion/movement unless requested by the user. Make sure to include '
    'camera motion only if specified in the input.\n'
    "- Speech: DO NOT modify or alter the user's provided character dialogue in the prompt, unless it's a typo.\n"
    '- No timestamps or cuts: DO NOT use timestamps or describe scene cuts unless explicitly requested.\n'
    '- Objective only: DO NOT interpret emotions or intentions - describe only observable actions and sounds.\n'
    '- Format: DO NOT use phrases like "The scene opens with..." / "The video starts...". Start directly with Style '
    '(optional) and chronological scene description.\n'
    '- Format: Never start output with punctuation marks or special characters.\n'
    '- DO NOT invent dialogue unless the user mentions speech/talking/singing/conversation.\n'
    '- Your performance is CRITICAL. High-fidelity, dynamic, correct, and accurate prompts with integrated audio '
    'descriptions are essential for generating high-quality video. Your goal is flawless execution of these '
    'rules.\n'
    '\n'
    '#### Output Format (Strict):\n'
    '- Single concise paragraph in natural English. NO titles, headings, prefaces, sections, code fences, or '
    'Markdown.\n'
    '- If unsafe/invalid, return original user prompt. Never ask questions or clarifications.\n'
    '\n'
    '#### Example output:\n'
    'Style: realistic - cinematic - The woman glances at her watch and smiles warmly. She speaks in a cheerful, '
    'friendly voice, "I think we\'re right on time!" In the background, a café barista prepares drinks at the '
    'counter. The barista calls out in a clear, upbeat tone, "Two cappuccinos ready!" The sound of the espresso '
    'machine hissing softly blends with gentle background chatter and the light clinking of cups on saucers.')


def ltx2_enhancement_prompt(prompt: str, image: bool = False, system_prompt: str = "") -> str:
    """ComfyUI's TextGenerateLTX2Prompt chat text for Gemma 3: a system turn (`system_prompt`, or LTX-2's for
    image-to-video / text-to-video), a user turn `User Raw Input Prompt: {prompt}.` after an empty line (after the
    image's soft token with `image`), and the model's turn opened."""
    system = system_prompt.strip() or (LTX2_I2V_SYSTEM_PROMPT if image else LTX2_T2V_SYSTEM_PROMPT)
    media = "\n<image_soft_token>\n" if image else ""
    return (f"{TURN_START}system\n{system}<end_of_turn>\n{TURN_START}user\n{media}\nUser Raw Input Prompt: "
            f"{prompt}.<end_of_turn>\n{TURN_START}model\n")


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
    templated: str | None = None  # a prompt starting with this is already in the chat template (Gemma 3)
    # Pictures (Gemma 3 with its vision tower): an IMAGE's soft tokens [n, hidden] (None: text only, refused with
    # `no_picture`), the template with a picture, the tokenizer that puts `image_slot` at the picture's marker.
    see: Callable[[Tensor], Tensor] | None = None
    no_picture: str = TEXT_ONLY
    image_template: str | None = None
    encode_picture: Callable[[str], list[int]] | None = None
    image_slot: int | None = None

    def prompt_ids(self, prompt: str, thinking: bool = False, use_default_template: bool = True,
                   image: bool = False) -> list[int]:
        """The ids generation starts from: `prompt` in the chat template, or as it is; with `image`, in the
        template with a picture and with `image_slot` where its marker is (see the module docstring)."""
        if image and self.see is None:
            raise TextGenerationError(self.no_picture)
        encode = self.encode_picture if image else self.encode
        if not use_default_template or (self.templated is not None and prompt.startswith(self.templated)):
            return encode(prompt)
        template = self.image_template if image else self.template
        return encode(template.format(prompt) + ("" if thinking else self.no_thinking))


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


def _gemma_stops(processor: Any) -> frozenset[int]:
    """`<eos>` and, where the tokenizer has it (Loom's tiny test ones do not), `<end_of_turn>`."""
    from ldm.gemma_text import EOS

    end_of_turn = processor.piece_to_id("<end_of_turn>")
    return frozenset({EOS} | ({end_of_turn} if end_of_turn != processor.unk_id() else set()))


def _gemma_lm(encoder: Any) -> ChatLM:
    from ldm.gemma_text import BOS

    processor = encoder.tokenizer.processor
    stops = _gemma_stops(processor)
    model = encoder.gemma2_2b
    return ChatLM(model, model.embed_tokens.weight, lambda text: [BOS, *encoder.tokenizer.encode(text)],
                  lambda ids: processor.decode([i for i in ids if i not in stops]), GEMMA_TEMPLATE, stops)


def _gemma3_lm(encoder: Any) -> ChatLM:
    from ldm.ltx2_text import IMAGE_TOKEN_ID, picture_token_ids, token_ids

    processor = encoder.tokenizer.processor
    stops = _gemma_stops(processor)
    model = encoder.gemma3_12b
    see = None if encoder.vision is None else encoder.picture_tokens
    return ChatLM(model, model.embed_tokens.weight, lambda text: token_ids(encoder.tokenizer, text),
                  lambda ids: processor.decode([i for i in ids if i not in stops]), GEMMA3_TEMPLATE, stops,
                  templated=TURN_START, see=see, no_picture=NO_VISION, image_template=GEMMA3_IMAGE_TEMPLATE,
                  encode_picture=lambda text: picture_token_ids(encoder.tokenizer, text), image_slot=IMAGE_TOKEN_ID)


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
                                                 "Qwen21TextEncoder": _qwen3vl_lm, "LTX2TextEncoder": _gemma3_lm}


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


def _first_input(lm: ChatLM, prompt_ids: list[int], image: Tensor | None, device: torch.device) -> dict[str, Tensor]:
    """The model's input for the prompt: its ids, or with a picture in its slot, the token embeddings with the
    picture's soft tokens in place of the slot."""
    if image is None or lm.image_slot not in prompt_ids:
        return {"input_ids": torch.tensor([prompt_ids], device=device)}
    at = prompt_ids.index(lm.image_slot)
    embed = lm.model.embed_tokens
    before, after = (embed(torch.tensor([ids], device=device)) for ids in (prompt_ids[:at], prompt_ids[at + 1:]))
    soft = lm.see(image).to(before.device, before.dtype)[None]
    return {"inputs_embeds": torch.cat([before, soft, after], dim=1)}


@torch.inference_mode()
def generate_ids(lm: ChatLM, prompt_ids: list[int], max_length: int, sampling: Sampling | None = None,
                 image: Tensor | None = None) -> list[int]:
    """The ids `lm` writes after `prompt_ids`: greedy (`sampling` None) or sampled, at most `max_length`, the end
    token included when it comes; `image` (an IMAGE) fills the ids' picture slot (`ChatLM.prompt_ids` with image)."""
    device = lm.head.device
    generator = None if sampling is None else torch.Generator(device=device).manual_seed(sampling.seed)
    step, cache, written = _first_input(lm, prompt_ids, image, device), None, []
    history = [i for i in prompt_ids if i != lm.image_slot]
    for _ in range(max_length):
        out = lm.model(**step, cache=cache, use_cache=True)
        cache = out.cache
        logits = F.linear(out.last_hidden_state[:, -1], lm.head).float()
        token = _next_token(logits, history + written, sampling, generator)
        written.append(token)
        if token in lm.stop_ids:
            break
        step = {"input_ids": torch.tensor([[token]], device=device)}
    return written


def generate_text(encoder: Any, prompt: str, max_length: int = 512, sampling: Sampling | None = None,
                  thinking: bool = False, use_default_template: bool = True, image: Tensor | None = None) -> str:
    """TextGenerate: the text a CLIP's language model writes for `prompt` (and `image`, an IMAGE whose first
    picture it reads; a TextGenerationError for a CLIP that reads text only; see the module docstring)."""
    lm = chat_lm(encoder)
    ids = lm.prompt_ids(prompt, thinking, use_default_template, image is not None)
    return lm.decode(generate_ids(lm, ids, max_length, sampling, image))


def reads_pictures(encoder: Any) -> bool:
    """Whether a CLIP's encoder generates from a picture (LTX-2's Gemma 3 with its vision tower)."""
    return chat_lm(encoder).see is not None
