"""Mistral's "tekken" tokenizer (a tekken.json: tiktoken-style byte-level BPE ranks plus control tokens), as FLUX.2
[dev]'s Mistral Small 3 file stores it (a uint8 tensor `tekken_model` holding the JSON), read into a `tokenizers`
Tokenizer by transformers' MistralConverter, and tiny tekken JSONs for tests.

Ids, as mistral_common and ComfyUI give them: the control tokens first, at their ranks (`<unk>` 0, `<s>` 1, `</s>` 2,
`[INST]` 3, `[/INST]` 4, `<pad>` 11, `[SYSTEM_PROMPT]` 17, `[/SYSTEM_PROMPT]` 18, ... up to the file's
`default_num_special_tokens`, 1000), then the BPE tokens in rank order (byte b, rank b, is id 1000 + b), cut at
`default_vocab_size` (131,072: the model's embedding rows). Control tokens written in the text are read as such.

Pre-tokenization: ComfyUI splits the text with Llama 3's regex (`LLAMA3_SPLIT`), which transformers' converter used
by default when ComfyUI adopted it and ComfyUI's own tokenizer keeps; it is also what the Hugging Face copies of
Mistral Small 3.1's tokenizer.json hold (the "fix_mistral_regex" issue). The tekken file's own pattern
(`config.pattern`, mistral_common's) splits upper-case runs and digits one by one; the two differ only on such text.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from torch import Tensor

# Llama 3's pre-tokenizer regex: ComfyUI's split for tekken (see the module docstring).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# The pattern tekken files carry (mistral_common's split), for the tiny files' config.
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Tekken v7's first control tokens, by rank (mistral_common's SpecialTokens); the rest are <SPECIAL_rank>.
CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                  "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")
NUM_CONTROL_TOKENS = 1000  # tekken v7's default_num_special_tokens
VOCAB_SIZE = 131072  # Mistral Small 3's default_vocab_size: its embedding rows


def tekken_bytes(data: Tensor | bytes) -> bytes:
    """The tekken JSON of a file's `tekken_model` tensor (uint8), or bytes as they are."""
    return data if isinstance(data, bytes) else data.cpu().numpy().tobytes()


def tekken_tokenizer(data: bytes | str, split: str | None = LLAMA3_SPLIT) -> Any:
    """A `tokenizers` Tokenizer of a tekken JSON (transformers' MistralConverter, offline: it reads only the JSON),
    splitting with `split` (None: the file's own pattern). It adds no BOS; `encode(text, add_special_tokens=False)`
    reads control tokens written in the text."""
    from transformers.integrations.mistral import MistralConverter

    spec = json.loads(data)
    if split is not None:
        spec["config"]["pattern"] = split
    # The converter takes a file's path, by the name transformers knows tekken files by.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tekken.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        return MistralConverter(str(path)).converted()


def tiny_tekken(corpus: str, merges: int = 160) -> bytes:
    """A tiny valid tekken JSON: tekken v7's layout (1000 control tokens at their real ranks, BPE ids from 1000,
    131,072 rows) with the 256 bytes and `merges` BPE merges learnt from `corpus` (pairs of adjacent tokens in its
    words, most frequent first), so that the corpus' words tokenize into few tokens."""
    words = Counter(re.findall(r" ?\w+| ?[^\w\s]+|\s+", corpus))
    pieces = {word: [bytes([b]) for b in word.encode("utf-8")] for word in words}
    vocab = [bytes([b]) for b in range(256)]
    for _ in range(merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, parts in pieces.items():
            for pair in pairwise(parts):
                pairs[pair] += words[word]
        if not pairs:
            break
        (left, right), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        vocab.append(left + right)
        for word, parts in pieces.items():
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (left, right):
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            pieces[word] = merged
    controls = [*CONTROL_TOKENS, *(f"<SPECIAL_{i}>" for i in range(len(CONTROL_TOKENS), NUM_CONTROL_TOKENS))]
    spec = {"config": {"pattern": TEKKEN_SPLIT, "num_vocab_tokens": len(vocab), "default_vocab_size": VOCAB_SIZE,
                       "default_num_special_tokens": NUM_CONTROL_TOKENS, "version": "v7"},
            "vocab": [{"rank": rank, "token_bytes": base64.b64encode(token).decode("ascii"),
                       "token_str": token.decode("utf-8", errors="replace")} for rank, token in enumerate(vocab)],
            "special_tokens": [{"rank": rank, "token_str": token, "is_control": True}
                               for rank, token in enumerate(controls)]}
    return json.dumps(spec).encode("utf-8")
