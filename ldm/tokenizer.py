"""The CLIP BPE tokenizer, offline from the vocabulary in ldm/data, with prompt emphasis and 77-token chunks.

Prompt syntax (ComfyUI's, so that prompts written for ComfyUI weigh the same here):

- ``(text)`` multiplies the weight of ``text`` by 1.1; nesting multiplies, ``((text))`` is 1.21.
- ``(text:1.3)`` sets the weight of ``text`` to 1.3 (it replaces the enclosing weight rather than
  multiplying it, as ComfyUI does: ``((text:1.3))`` is 1.3). A suffix that is not a finite number
  keeps the 1.1 meaning and stays part of the text.
- ``\\(`` and ``\\)`` are literal parentheses; unmatched parentheses are literal too.
  Square brackets have no meaning (A1111's ``[text]`` de-emphasis is not supported).

- ``embedding:NAME`` is a textual-inversion embedding (a file in models/embeddings): its vectors stand in
  the prompt where the word is, weighted like the text around them. A name with no file is left out, with
  a warning.

Text is cleaned as OpenAI's CLIP tokenizer does before BPE (ftfy, HTML unescape, whitespace
collapse, lowercase). Each word is tokenized on its own and a chunk holds 75 tokens between its
start and end tokens; a word shorter than 8 tokens that would straddle two chunks moves whole to
the next one (ComfyUI's rule), so long prompts split at word boundaries.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import ftfy

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
VOCAB_SIZE = 49408
START_TOKEN = 49406
END_TOKEN = 49407
CHUNK_LENGTH = 77
CHUNK_CAPACITY = CHUNK_LENGTH - 2
# Words at least this many tokens long may be split across two chunks instead of moving whole.
LONG_WORD_TOKENS = 8
EMPHASIS = 1.1
_ESCAPES = {"\\(": "(", "\\)": ")"}


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as chunks of token ids (each with start and end, not yet padded) and their weights."""

    ids: list[list[int]]
    weights: list[list[float]]

    def padded(
        self, pad_token: int, num_chunks: int | None = None
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Pad every chunk to 77 tokens and append empty-prompt chunks up to ``num_chunks``."""
        ids, weights = list(self.ids), list(self.weights)
        while num_chunks is not None and len(ids) < num_chunks:
            ids.append([START_TOKEN, END_TOKEN])
            weights.append([1.0, 1.0])
        return (
            [chunk + [pad_token] * (CHUNK_LENGTH - len(chunk)) for chunk in ids],
            [w + [1.0] * (CHUNK_LENGTH - len(w)) for w in weights],
        )


_EMBEDDING = re.compile(r"embedding:([^\s,()]+)")


@dataclass
class Embeddings:
    """The textual-inversion embeddings a prompt names. `load(name)` gives an embedding's vectors by width
    ({768: [n, 768], ...}), or None when there is no such embedding. Tokenizing gives each vector a
    placeholder id past the vocabulary (VOCAB_SIZE + k); `table(width)` holds the vectors in that order."""

    load: Callable[[str], dict[int, Any] | None]
    vectors: dict[str, dict[int, Any]] = field(default_factory=dict)
    slots: list[tuple[str, int]] = field(default_factory=list)

    def ids(self, name: str) -> list[int]:
        """The placeholder ids of an embedding's vectors; none for one that is not there, which is left out of
        the prompt with a warning, as ComfyUI does (shared workflows name embeddings their users may lack)."""
        if name not in self.vectors:
            found = self.load(name.rstrip("."))
            if not found:
                log.warning("embedding:%s not found (put the file, e.g. %s.safetensors, in models/embeddings); "
                            "left out of the prompt", name, name)
                return []
            self.vectors[name] = found
        count = next(iter(self.vectors[name].values())).shape[0]
        ids = []
        for j in range(count):
            if (name, j) not in self.slots:
                self.slots.append((name, j))
            ids.append(VOCAB_SIZE + self.slots.index((name, j)))
        return ids

    def table(self, width: int, encoder: str) -> Any:
        """The vectors of every placeholder, in order, for an encoder `width` wide."""
        import torch

        rows = []
        for name, j in self.slots:
            by_width = self.vectors[name]
            if width not in by_width:
                raise ValueError(f"embedding:{name} holds vectors {', '.join(map(str, by_width))} wide; this "
                                 f"model's {encoder} text encoder takes {width}: it is for another model family")
            rows.append(by_width[width][j])
        return torch.stack(rows)


def parse_emphasis(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) segments following the syntax in the module docstring."""
    # Atoms are (character, is_syntax); escaped parentheses become plain characters up front.
    atoms: list[tuple[str, bool]] = []
    i = 0
    while i < len(prompt):
        pair = prompt[i : i + 2]
        if pair in _ESCAPES:
            atoms.append((_ESCAPES[pair], False))
            i += 2
        else:
            atoms.append((prompt[i], prompt[i] in "()"))
            i += 1
    closing: dict[int, int] = {}
    open_stack: list[int] = []
    for index, (char, syntax) in enumerate(atoms):
        if syntax and char == "(":
            open_stack.append(index)
        elif syntax and open_stack:
            closing[open_stack.pop()] = index
    segments: list[tuple[str, float]] = []
    _parse_span(atoms, 0, len(atoms), 1.0, closing, segments)
    return [(text, weight) for text, weight in segments if text]


def _parse_span(
    atoms: list[tuple[str, bool]],
    start: int,
    end: int,
    weight: float,
    closing: dict[int, int],
    out: list[tuple[str, float]],
) -> None:
    text: list[str] = []
    i = start
    while i < end:
        if i in closing:
            out.append(("".join(text), weight))
            text = []
            close = closing[i]
            inner_end, inner_weight = _explicit_weight(atoms, i + 1, close)
            if inner_weight is None:
                inner_weight = weight * EMPHASIS
            _parse_span(atoms, i + 1, inner_end, inner_weight, closing, out)
            i = close + 1
        else:
            text.append(atoms[i][0])
            i += 1
    out.append(("".join(text), weight))


def _explicit_weight(atoms: list[tuple[str, bool]], start: int, end: int) -> tuple[int, float | None]:
    """Find a trailing ``:number`` inside a parenthesis: (end of its text, weight or None)."""
    inner = "".join(char for char, _ in atoms[start:end])
    colon = inner.rfind(":")
    if colon <= 0:
        return end, None
    try:
        value = float(inner[colon + 1 :])
    except ValueError:
        return end, None
    if not math.isfinite(value):
        return end, None
    return start + colon, value


def clean_text(text: str) -> str:
    """Normalise text as OpenAI's CLIP tokenizer does: ftfy, HTML unescape, whitespace collapse, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


@lru_cache(maxsize=1)
def _bpe() -> Any:
    # Loaded on first use and shared: building the BPE tables takes about a second.
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(DATA_DIR), local_files_only=True)


class ClipTokenizer:
    """CLIP's byte-level BPE (49,408 tokens) turning prompts into weighted 77-token chunks."""

    def encode_words(self, text: str) -> list[list[int]]:
        """Token ids of each word of ``text`` after CLIP's cleanup, without start/end tokens."""
        words = clean_text(text).split(" ")
        words = [word for word in words if word]
        if not words:
            return []
        return _bpe()(words, add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` (no emphasis parsing, no start/end tokens, no length limit)."""
        return [token for word in self.encode_words(text) for token in word]

    def _words(self, text: str, embeddings: Embeddings | None) -> list[list[int]]:
        """Token ids per word; each `embedding:NAME` is one word of its placeholder ids."""
        if embeddings is None or "embedding:" not in text:
            return self.encode_words(text)
        words, start = [], 0
        for match in _EMBEDDING.finditer(text):
            words += self.encode_words(text[start:match.start()])
            words.append(embeddings.ids(match.group(1)))
            start = match.end()
        return words + self.encode_words(text[start:])

    def tokenize(self, prompt: str, embeddings: Embeddings | None = None) -> TokenizedPrompt:
        """Parse emphasis, tokenize and split into chunks of at most 75 tokens plus start and end; with
        `embeddings`, `embedding:NAME` words become their placeholder ids."""
        chunks: list[list[int]] = [[START_TOKEN]]
        weights: list[list[float]] = [[1.0]]
        for text, weight in parse_emphasis(prompt):
            for word in self._words(text, embeddings):
                fits_one_chunk = len(word) < LONG_WORD_TOKENS
                while word:
                    room = CHUNK_CAPACITY + 1 - len(chunks[-1])
                    if len(word) > room and fits_one_chunk:
                        room = 0
                    chunks[-1].extend(word[:room])
                    weights[-1].extend([weight] * len(word[:room]))
                    word = word[room:]
                    if word:
                        chunks[-1].append(END_TOKEN)
                        weights[-1].append(1.0)
                        chunks.append([START_TOKEN])
                        weights.append([1.0])
        chunks[-1].append(END_TOKEN)
        weights[-1].append(1.0)
        return TokenizedPrompt(chunks, weights)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (for debugging and tests)."""
        return _bpe().decode(ids, skip_special_tokens=True)
