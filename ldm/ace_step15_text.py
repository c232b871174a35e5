"""ACE-Step 1.5's text side, as ComfyUI's DualCLIPLoader type "ace" loads it and TextEncodeAceStepAudio1.5 runs it:
the caption and lyrics encoder, Qwen3-Embedding-0.6B, and the 5 Hz language model that writes the song's audio codes.

Weights: Comfy-Org's ace_step_1.5_ComfyUI_files. qwen_0.6b_ace15.safetensors is the encoder (Qwen3, 1024 wide, 28
layers, 16 heads and 8 key/value heads of 128, MLP 3072, 151,669 embedding rows); qwen_1.7b_ace15.safetensors (2048
wide, 28 layers; ComfyUI's "qwen3_2b") or qwen_4b_ace15.safetensors (2560 wide, 36 layers) is the language model,
whose 217,204-row vocabulary extends Qwen3's with 64,000 audio-code tokens, ids 151,669 to 215,668 for codes 0 to
63,999. All are in transformers' Qwen3 names (``ldm.qwen3_text``), scaled fp8 copies descaled as they load. The files
are told apart as ComfyUI does, by width (1024: the encoder), and by whether the vocabulary holds the codes (so that
Loom's tiny test files, narrower than 512, are told apart too). ComfyUI gives the language model no head of its own:
its logits are its embedding's (tied); a file's ``lm_head.weight`` would be used. Both run on transformers'
Qwen3Model. With the encoder alone (CLIPLoader, where ComfyUI would load Anima's encoder instead) Loom encodes the
song without audio codes: the 0.6B file has no code tokens to write them with.

Prompts (ComfyUI's ACE15Tokenizer, tokenized whole by Qwen3's tokenizer, no emphasis): the caption (tags, stripped)
with "# Metas" lines (bpm, time signature, key and scale, duration rounded up to whole seconds; "N/A" where not
given) for the encoder; "# Languages" and "# Lyric" for the lyrics; and a chat for the language model whose
assistant turn opens with a `<think>` block holding the metadata as YAML (PyYAML's dump, keys sorted), its negative
the same chat with an empty block. A time signature "N/4" is written N, digit strings as numbers.

Encoding (ComfyUI's ACE15TEModel): the conditioning is the encoder's last hidden state (after its final norm:
ComfyUI's layer None) over the caption prompt, the `conditioning_lyrics` the encoder's token embeddings of the lyrics
prompt (ComfyUI's layer [0]: the input of the first layer), and `audio_codes` [1, N] the language model's codes.
ComfyUI's attention mask: a prompt's leading `<|endoftext|>` tokens (padding) and its first other `<|endoftext|>` and
all after it are masked as keys (the caption prompt ends in two), their states kept.

Audio codes (ComfyUI's sample_manual_loop_no_classes): the positive and negative language-model prompts, the shorter
left-padded with `<|endoftext|>` (masked), run as a batch of two with a KV cache, one token a step; positions run
0, 1, ... over the padded rows as ComfyUI's do (RoPE is relative, so a masked left pad does not change the states).
Each step: classifier-free guidance on the last position's logits (uncond + scale * (cond - uncond); with scale 1
the positive prompt alone), every id but the codes removed (and `<|im_end|>`, the end, kept once more codes than
`min_tokens` are written), then top-k (k > 0), min-p (p > 0: below p times the likeliest's probability), top-p
(p < 1; the likeliest always kept), then temperature and a draw from a torch.Generator seeded with `seed` on the
model's device (temperature 0: the argmax). Logits are filtered in float32. ComfyUI asks for 5 codes a second of the
rounded-up duration as both the least and the most, so the end never comes: a song gets exactly that many codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.qwen3_text import is_qwen3, qwen3_config_from_state_dict, tiny_qwen3_state, token_ids
from ldm.qwen_text import PAD_TOKEN, frozen_language_model, load_prefixed
from ldm.t5 import scaling_keys
from ldm.text_encoders import PinnableTextEncoder, TextEncoding

FAMILY = "ace_step15"
ENCODER_NAME = "qwen3_06b"  # ComfyUI's name for the encoder (per_encoder key)
ENCODER_WIDTH = 1024
ENCODER_VOCAB_SIZE = 151669  # ComfyUI's Qwen3_06B_ACE15 config
LM_VOCAB_SIZE = 217204  # ComfyUI's Qwen3_2B_ACE15_lm and Qwen3_4B_ACE15_lm configs
AUDIO_CODE_START = 151669  # the id of audio code 0
AUDIO_CODES = 64000
AUDIO_CODE_END = AUDIO_CODE_START + AUDIO_CODES  # the first id past the codes
END_TOKEN = 151645  # <|im_end|>
CODES_PER_SECOND = 5
DEFAULT_DURATION = 120  # seconds, ComfyUI's when none is given
CONDITIONING_LYRICS = "conditioning_lyrics"
AUDIO_CODES_KEY = "audio_codes"

LM_TEMPLATE = ("<|im_start|>system\n# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n"
               "<|im_end|>\n<|im_start|>user\n# Caption\n{}\n\n# Lyric\n{}\n<|im_end|>\n<|im_start|>assistant\n{}\n\n"
               "<|im_end|>\n")
LYRICS_TEMPLATE = "# Languages\n{}\n\n# Lyric\n{}<|endoftext|><|endoftext|>"
CAPTION_TEMPLATE = ("# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n# Caption\n{}\n\n"
                    "# Metas\n{}\n<|endoftext|>\n<|endoftext|>")
THINK = "<think>\n{}\n</think>"
_META_KEYS = ("bpm", "timesignature", "keyscale", "duration")  # the order of the caption's "# Metas" lines
_EMBED = "model.embed_tokens.weight"
_HEAD = "lm_head."
_NEEDS = ("DualCLIPLoader type ace takes qwen_0.6b_ace15.safetensors (the text encoder) and qwen_1.7b_ace15"
          ".safetensors or qwen_4b_ace15.safetensors (the 5 Hz language model), in either order; the encoder alone "
          "encodes without audio codes")


@dataclass(frozen=True)
class SongPrompts:
    """The four prompts ComfyUI's ACE15Tokenizer writes for a song, and how many audio codes to write."""

    lm: str
    lm_negative: str
    lyrics: str
    caption: str
    codes: int  # 5 a second of the rounded-up duration: ComfyUI's min_tokens and max_tokens

    def token_ids(self) -> dict[str, list[int]]:
        """Each prompt's tokens, by ComfyUI's names ("lm_prompt", "lm_prompt_negative", "lyrics", "qwen3_06b")."""
        texts = {"lm_prompt": self.lm, "lm_prompt_negative": self.lm_negative, "lyrics": self.lyrics,
                 ENCODER_NAME: self.caption}
        return {name: token_ids(_unescaped(text)) for name, text in texts.items()}


def _unescaped(text: str) -> str:
    # ComfyUI's tokenizer reads `\(` and `\)` as brackets even with weights off
    return text.replace("\\(", "(").replace("\\)", ")")


def _plain(value: Any) -> Any:
    """A metadata value as ComfyUI writes it: "N/4" time signatures as N, digit strings as numbers."""
    if isinstance(value, str) and value.endswith("/4"):
        value = value[:-2]
    return int(value) if isinstance(value, str) and value.isdigit() else value


def _seconds(duration: float | str) -> int:
    """The duration rounded up to whole seconds (a string's first word read as a number, as ComfyUI does)."""
    if isinstance(duration, str):
        duration = float(duration.split(None, 1)[0])
    return math.ceil(duration)


def think_block(metas: Mapping[str, Any]) -> str:
    """The language model's `<think>` block: the given metadata (None and "unspecified" left out) as YAML."""
    given = {k: _plain(v) for k, v in metas.items() if v is not None and v != "unspecified"}
    return THINK.format(yaml.dump(given, allow_unicode=True, sort_keys=True).strip() if given else "")


def song_prompts(tags: str, lyrics: str = "", *, bpm: int | str | None = None,
                 duration: float | str = DEFAULT_DURATION, timesignature: int | str | None = None,
                 language: str | None = None, keyscale: str | None = None) -> SongPrompts:
    """ComfyUI's prompts for a song (None: not given, as a CLIPTextEncode prompt gives none of them)."""
    tags = tags.strip()
    seconds = _seconds(duration)
    metas = {"bpm": bpm, "duration": seconds, "keyscale": keyscale, "timesignature": timesignature}
    lines = {k: "N/A" if metas[k] is None else _plain(metas[k]) for k in _META_KEYS}
    lines["duration"] = f"{seconds} seconds"
    return SongPrompts(lm=LM_TEMPLATE.format(tags, lyrics.strip(), think_block(metas)),
                       lm_negative=LM_TEMPLATE.format(tags, lyrics.strip(), THINK.format("")),
                       lyrics=LYRICS_TEMPLATE.format(language or "", lyrics),
                       caption=CAPTION_TEMPLATE.format(tags, "\n".join(f"- {k}: {lines[k]}" for k in _META_KEYS)),
                       codes=CODES_PER_SECOND * seconds)


def comfy_mask(row: list[int]) -> list[int]:
    """ComfyUI's attention mask for a prompt's tokens: its leading `<|endoftext|>` tokens (left padding) are masked,
    then every token up to the first other `<|endoftext|>`, which is masked with all after it."""
    mask, started, ended = [], False, False
    for token in row:
        pad = token == PAD_TOKEN
        ended = ended or (started and pad)
        started = started or not pad
        mask.append(int(started and not ended))
    return mask


def left_padded(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Token rows as a batch: ids [B, L] padded with `<|endoftext|>` on the left, and ComfyUI's attention mask."""
    length = max(map(len, rows))
    padded = [[PAD_TOKEN] * (length - len(row)) + row for row in rows]
    return torch.tensor(padded, dtype=torch.long), torch.tensor([comfy_mask(row) for row in padded])


class AudioCodeLM(nn.Module):
    """The 5 Hz language model: transformers' Qwen3Model and its head (None: tied to the embedding, as ComfyUI's)."""

    def __init__(self, model: Any, lm_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.model = model
        self.lm_head = lm_head

    def last_logits(self, ids: Tensor, mask: Tensor, cache: Any = None) -> tuple[Tensor, Any]:
        """Float32 logits [B, vocab] at the last of `ids` ([B, L], after `cache`'s tokens; `mask` covers both), and
        the cache grown by `ids`."""
        device = self.model.embed_tokens.weight.device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), cache=cache, use_cache=True)
        weight = (self.model.embed_tokens if self.lm_head is None else self.lm_head).weight
        return nn.functional.linear(out.last_hidden_state[:, -1], weight).float(), out.cache


@dataclass(frozen=True)
class CodeSampling:
    """TextEncodeAceStepAudio1.5's sampling settings, with its defaults."""

    cfg_scale: float = 2.0
    temperature: float = 0.85
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0


def guided(logits: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance on [positive, negative] logits ([1, V]); the positive alone with scale 1."""
    if cfg_scale == 1.0:
        return logits[:1]
    return logits[1:2] + cfg_scale * (logits[:1] - logits[1:2])


def filtered(logits: Tensor, written: int, min_tokens: int, sampling: CodeSampling) -> Tensor:
    """`logits` [1, V] with every id but the audio codes (and the end, once `written` > `min_tokens`) and those
    top-k, min-p and top-p cut set to the dtype's least value, as ComfyUI's loop does."""
    least = torch.finfo(logits.dtype).min
    end = written > min_tokens
    # The cuts run on the ids left (the codes, maybe the end): the others, at the least value, weigh nothing in a
    # softmax and sort last, so the result is the same as over the whole vocabulary, without sorting 217k ids a step.
    kept = logits[:, AUDIO_CODE_START:AUDIO_CODE_END]
    kept = torch.cat([kept, logits[:, END_TOKEN:END_TOKEN + 1]], -1) if end else kept
    if 0 < sampling.top_k < kept.shape[-1]:
        kth = torch.topk(kept, sampling.top_k).values[..., -1:]
        kept = kept.masked_fill(kept < kth, least)
    if sampling.min_p > 0:
        probs = kept.softmax(-1)
        kept = kept.masked_fill(probs < sampling.min_p * probs.max(-1, keepdim=True).values, least)
    if sampling.top_p < 1.0:
        ordered, order = kept.sort(-1, descending=True)
        beyond = ordered.softmax(-1).cumsum(-1) > sampling.top_p
        beyond = torch.cat([torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], -1)  # keep the one crossing p
        kept = kept.masked_fill(beyond.scatter(-1, order, beyond), least)
    out = torch.full_like(logits, least)
    out[:, AUDIO_CODE_START:AUDIO_CODE_END] = kept[:, :AUDIO_CODES]
    if end:
        out[:, END_TOKEN] = kept[:, -1]
    return out


def picked(logits: Tensor, temperature: float, generator: torch.Generator) -> int:
    """A token drawn from filtered logits [1, V] at `temperature` (0: the argmax)."""
    if temperature <= 0:
        return int(logits.argmax(-1))
    probs = (logits / temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def sample_audio_codes(lm: AudioCodeLM, positive: list[int], negative: list[int], *, seed: int, min_tokens: int,
                       max_tokens: int, sampling: CodeSampling = CodeSampling(),
                       on_logits: Callable[[Tensor], None] | None = None) -> list[int]:
    """The audio codes (0..63,999) the language model writes after `positive` (guided away from `negative`), one
    token a step with a KV cache, until the end token or `max_tokens`. `on_logits` sees each step's guided logits."""
    device = lm.model.embed_tokens.weight.device
    ids, mask = left_padded([positive] if sampling.cfg_scale == 1.0 else [positive, negative])
    generator = torch.Generator(device=device).manual_seed(seed)
    codes: list[int] = []
    new, cache = ids, None
    for _ in range(max_tokens):
        logits, cache = lm.last_logits(new, mask, cache)
        logits = guided(logits, sampling.cfg_scale)
        if on_logits is not None:
            on_logits(logits)
        token = picked(filtered(logits, len(codes), min_tokens, sampling), sampling.temperature, generator)
        if token == END_TOKEN:
            break
        codes.append(token - AUDIO_CODE_START)
        new = torch.full((ids.shape[0], 1), token, dtype=torch.long)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return codes


def _zero_padded(rows: list[Tensor]) -> Tensor:
    """Rows [1, L_i, D] as [B, L, D], zeros after the shorter ones."""
    length = max(row.shape[1] for row in rows)
    return torch.cat([nn.functional.pad(row, (0, 0, 0, length - row.shape[1])) for row in rows])


class AceStep15TextEncoder(PinnableTextEncoder):
    """Qwen3-Embedding-0.6B and, when loaded, the 5 Hz language model, encoding songs as ComfyUI does for ACE-Step
    1.5 (see the module docstring); the interface of ``ldm.text_encoders.TextEncoder``. Pinned to the CPU
    (`pinned_to_cpu`, the loaders' device "cpu"), `.to()` changes its dtype only."""

    main_encoder = ENCODER_NAME

    def __init__(self, encoder: Any, lm: AudioCodeLM | None = None) -> None:
        super().__init__()
        self.qwen3_06b = encoder
        self.lm = lm

    @torch.inference_mode()
    def encode_song(self, tags: str, lyrics: str = "", *, seed: int = 0, bpm: int | str | None = None,
                    duration: float | str = DEFAULT_DURATION, timesignature: int | str | None = None,
                    language: str | None = None, keyscale: str | None = None, generate_audio_codes: bool = True,
                    cfg_scale: float = 2.0, temperature: float = 0.85, top_p: float = 0.9, top_k: int = 0,
                    min_p: float = 0.0) -> TextEncoding:
        """One song, as TextEncodeAceStepAudio1.5 encodes it: `cond` [1, Lt, D] the caption prompt's states,
        `extra["conditioning_lyrics"]` [1, Ll, D] the lyrics prompt's token embeddings, `extra["audio_codes"]`
        [1, 5 * ceil(duration)] int64 the language model's codes (left out without codes or language model)."""
        prompts = song_prompts(tags, lyrics, bpm=bpm, duration=duration, timesignature=timesignature,
                               language=language, keyscale=keyscale)
        ids = prompts.token_ids()
        device = self.qwen3_06b.embed_tokens.weight.device
        caption = torch.tensor([ids[ENCODER_NAME]], device=device)
        mask = torch.tensor([comfy_mask(ids[ENCODER_NAME])], device=device)
        cond = self.qwen3_06b(input_ids=caption, attention_mask=mask).last_hidden_state
        extra = {CONDITIONING_LYRICS: self.qwen3_06b.embed_tokens(torch.tensor([ids["lyrics"]], device=device))}
        if generate_audio_codes and self.lm is not None:
            sampling = CodeSampling(cfg_scale, temperature, top_p, top_k, min_p)
            codes = sample_audio_codes(self.lm, ids["lm_prompt"], ids["lm_prompt_negative"], seed=seed,
                                       min_tokens=prompts.codes, max_tokens=prompts.codes, sampling=sampling)
            extra[AUDIO_CODES_KEY] = torch.tensor([codes], dtype=torch.long)
        return TextEncoding(cond, None, extra)

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None,
               song: dict[str, Any] | None = None) -> TextEncoding:
        """Each prompt as a song's tags (`encode_song`), with `song`'s other settings (TextEncodeAceStepAudio1.5's)
        or, for CLIPTextEncode, ComfyUI's defaults (no lyrics, 120 seconds, no other metadata, seed 0, codes on).
        Prompts of different lengths: `cond` and `conditioning_lyrics` zero-padded to the longest (no mask: the
        model takes none, as in ComfyUI). Every prompt gets as many codes (5 a second of the one duration), so
        `audio_codes` stack. Clip skip, prompt weights and
        textual-inversion embeddings do not apply (ComfyUI reads `embedding:` words and brackets as text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = (per_encoder or {}).get(ENCODER_NAME, prompts)
        songs = [self.encode_song(p, **(song or {})) for p in prompts]
        extra = {CONDITIONING_LYRICS: _zero_padded([s.extra[CONDITIONING_LYRICS] for s in songs])}
        if AUDIO_CODES_KEY in songs[0].extra:
            extra[AUDIO_CODES_KEY] = torch.cat([s.extra[AUDIO_CODES_KEY] for s in songs])
        return TextEncoding(_zero_padded([s.cond for s in songs]), None, extra)


@dataclass
class LoadedAceStep15Text:
    encoder: AceStep15TextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = FAMILY


def file_role(sd: Mapping[str, Any]) -> str | None:
    """What a file's weights (or header's shapes) are to ACE-Step 1.5: "lm" (a Qwen3 whose vocabulary holds the audio
    codes), "encoder" (a Qwen3 1024 wide, or narrower than 512: Loom's tiny ones) or None."""
    if not is_qwen3(sd):
        return None
    rows, width = sd[_EMBED].shape
    if rows >= AUDIO_CODE_END:
        return "lm"
    return "encoder" if width == ENCODER_WIDTH or width < 512 else None


def text_kind(sd: Mapping[str, Any]) -> str | None:
    """The kind the CLIP loaders name an ACE-Step 1.5 text file by, from its weights or header: "ace15_lm" (the
    language model with the audio codes), "qwen3_06b_ace15" (the encoder, with its own 151,669 embedding rows: a
    Qwen3 of other rows is another model's) or None."""
    role = file_role(sd)
    if role == "lm":
        return "ace15_lm"
    return "qwen3_06b_ace15" if role == "encoder" and sd[_EMBED].shape[0] == ENCODER_VOCAB_SIZE else None


def _refusal(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    if is_qwen3(sd):
        rows, width = sd[_EMBED].shape
        held = (f"a Qwen3 language model {width} wide with {rows:,} embedding rows: neither the 1024-wide encoder "
                f"nor a language model with the audio codes ({LM_VOCAB_SIZE:,} rows)")
    else:
        look = look_of(sd)
        held = look.what if look is not None else "no model layout Loom knows"
    return CheckpointError(f"{name}: not an ACE-Step 1.5 text encoder file: it holds {held}; {_NEEDS}")


def _qwen3(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[Any, set[str]]:
    from transformers import Qwen3Model

    model, used = frozen_language_model(Qwen3Model, qwen3_config_from_state_dict(sd), sd, name, dtype, "Qwen3")
    return model, used | scaling_keys(sd)


def _lm(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[AudioCodeLM, set[str]]:
    model, used = _qwen3(sd, name, dtype)
    if _HEAD + "weight" not in sd:
        return AudioCodeLM(model), used
    with torch.device("meta"):
        head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False, dtype=dtype)
    used |= load_prefixed(head, sd, _HEAD, name, dtype, "Qwen3")
    return AudioCodeLM(model, head.requires_grad_(False)), used


def load_ace_step15_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                                 dtype: torch.dtype = torch.float32) -> LoadedAceStep15Text:
    """ACE-Step 1.5's encoder file and, optionally, its language model file (in either order), on `device` in
    `dtype`."""
    if len(paths) not in (1, 2):
        raise CheckpointError(f"ACE-Step 1.5 takes one or two text encoder files; got {len(paths)}. {_NEEDS}")
    return ace_step15_text_encoder([(Path(p).name, ckpt.load_state_dict(p)) for p in paths], device, dtype)


def ace_step15_text_encoder(parts: list[tuple[str, Mapping[str, Tensor]]], device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> LoadedAceStep15Text:
    """The encoder and, optionally, the language model from (name, weights) pairs in either order (two files, or
    the parts of an all-in-one checkpoint), on `device` in `dtype`."""
    loaded: dict[str, tuple[Any, set[str], str, Mapping[str, Tensor]]] = {}
    for name, sd in parts:
        role = file_role(sd)
        if role is None:
            raise _refusal(name, sd)
        if role in loaded:
            raise CheckpointError(f"{loaded[role][2]} and {name} are both ACE-Step 1.5 "
                                  f"{'language models' if role == 'lm' else 'text encoders'}; {_NEEDS}")
        model, used = (_lm if role == "lm" else _qwen3)(sd, name, dtype)
        loaded[role] = (model, used, name, sd)
    if "encoder" not in loaded:
        raise CheckpointError(f"{loaded['lm'][2]} is ACE-Step 1.5's language model; it needs the text encoder "
                              f"beside it. {_NEEDS}")
    unused = sorted(f"{name}: {k}" for _, used, name, sd in loaded.values() for k in sd if k not in used)
    lm = loaded["lm"][0] if "lm" in loaded else None
    return LoadedAceStep15Text(AceStep15TextEncoder(loaded["encoder"][0], lm).to(device).eval(), unused)


def write_tiny_ace_step15_encoder(path: str | Path, seed: int = 0, hidden: int = 32,
                                  dtype: torch.dtype = torch.float16) -> Path:
    """A tiny random stand-in for qwen_0.6b_ace15.safetensors: a Qwen3 `hidden` wide (the tiny DiT's text width)
    with the encoder's 151,669 embedding rows, in ComfyUI's layout."""
    path = Path(path)
    write_safetensors(tiny_qwen3_state(seed, hidden, 2, ENCODER_VOCAB_SIZE), path, {"loom.seed": str(seed)}, dtype)
    return path


def write_tiny_ace_step15_lm(path: str | Path, seed: int = 0, hidden: int = 48,
                             dtype: torch.dtype = torch.float16) -> Path:
    """A tiny random stand-in for qwen_1.7b_ace15.safetensors: a Qwen3 `hidden` wide with the language model's
    217,204 embedding rows (the audio codes included), tied head, in ComfyUI's layout."""
    path = Path(path)
    write_safetensors(tiny_qwen3_state(seed, hidden, 2, LM_VOCAB_SIZE), path, {"loom.seed": str(seed)}, dtype)
    return path
