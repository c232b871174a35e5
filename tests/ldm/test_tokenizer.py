"""The CLIP tokenizer against open_clip's SimpleTokenizer, plus emphasis parsing and chunking."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.tokenizer import (
    CHUNK_LENGTH,
    DATA_DIR,
    END_TOKEN,
    START_TOKEN,
    VOCAB_SIZE,
    ClipTokenizer,
    parse_emphasis,
)
from tests.ldm.open_clip_ref import open_clip_module

CORPUS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile!!!",
    "(masterpiece:1.2), ((best quality)), [worse], \\(literal\\) {braces} <lora:foo:0.8>",
    "emoji 🙂🐱‍👤 and flags 🇯🇵🇫🇷, hearts ❤️❤",
    "unicode: Ünïcödé naïve café façade Ærøskøbing ß ﬁ",
    "日本語のプロンプト、猫と犬。中文提示词 한국어 프롬프트",
    "Привет мир, Ελληνικά, עברית, العربية",
    "numbers 1234567890 3.14159 -42 1e10 2x 4k 8K uhd 16:9 100% $5 #1",
    "don't won't it's THEY'RE we've I'm you'll he'd O'Brien's",
    "punctuation: ... !? ;; -- __ ** // \\\\ || ~~ `` ^^ @@ && << >> == ++",
    "html &amp; entities &lt;b&gt; &#39;quoted&#39; &quot;x&quot; &amp;amp;",
    "mojibake cafÃ© and â€œsmart quotesâ€\x9d and ‘curly’ “quotes”",
    "tabs\tand\nnew\r\nlines   and    spaces\u00a0nbsp\u3000ideographic",
    "hyphen-ated under_scored dot.ted slash/ed camelCaseWords ALLCAPS",
    "a " * 120,
    ", ".join(f"tag{i} very detailed intricate" for i in range(40)),
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis " * 10,
]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip_module("tokenizer").SimpleTokenizer()


def test_vocabulary_files_have_clip_sizes_and_special_tokens() -> None:
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE
    assert vocab["<|startoftext|>"] == START_TOKEN
    assert vocab["<|endoftext|>"] == END_TOKEN
    assert (DATA_DIR / "LICENSE").is_file()


@pytest.mark.parametrize("prompt", CORPUS)
def test_token_ids_match_open_clip_simple_tokenizer(tokenizer, reference, prompt: str) -> None:
    assert tokenizer.encode_text(prompt) == reference.encode(prompt)


def test_short_prompt_is_one_chunk_with_start_end_and_padding(tokenizer, reference) -> None:
    tokens = tokenizer.tokenize("a photo of a cat")
    ids = reference.encode("a photo of a cat")
    assert tokens.ids == [[START_TOKEN, *ids, END_TOKEN]]
    padded_end, weights = tokens.padded(END_TOKEN)
    padded_zero, _ = tokens.padded(0)
    assert padded_end[0] == [START_TOKEN, *ids] + [END_TOKEN] * (CHUNK_LENGTH - len(ids) - 1)
    assert padded_zero[0] == [START_TOKEN, *ids, END_TOKEN] + [0] * (CHUNK_LENGTH - len(ids) - 2)
    assert weights == [[1.0] * CHUNK_LENGTH]


def test_open_clip_pads_with_zero_after_end(reference, tokenizer) -> None:
    # The fact behind SD2/bigG padding with 0: open_clip's own tokenizer does.
    ours, _ = tokenizer.tokenize("a photo of a cat").padded(0)
    assert reference("a photo of a cat")[0].tolist() == ours[0]


def test_empty_prompt_is_start_end(tokenizer) -> None:
    assert tokenizer.tokenize("").ids == [[START_TOKEN, END_TOKEN]]
    assert tokenizer.tokenize("  ( ) ").ids == [[START_TOKEN, END_TOKEN]]


def test_long_prompt_splits_into_77_token_chunks(tokenizer) -> None:
    tokens = tokenizer.tokenize("cat " * 100)
    padded, weights = tokens.padded(END_TOKEN)
    assert [len(chunk) for chunk in padded] == [CHUNK_LENGTH, CHUNK_LENGTH]
    assert sum(len(chunk) for chunk in padded) == 154
    assert [len(chunk) for chunk in tokens.ids] == [77, 27]
    assert all(chunk[0] == START_TOKEN and chunk[-1] == END_TOKEN for chunk in tokens.ids)


def test_short_words_move_whole_to_the_next_chunk(tokenizer) -> None:
    word = tokenizer.encode_text("supercalifragilistic")
    assert 1 < len(word) < 8
    tokens = tokenizer.tokenize("cat " * 74 + "supercalifragilistic")
    assert len(tokens.ids[0]) == 76 and tokens.ids[0][-1] == END_TOKEN
    assert tokens.ids[1] == [START_TOKEN, *word, END_TOKEN]


def test_long_words_are_split_across_chunks(tokenizer) -> None:
    long_word = "pneumonoultramicroscopicsilicovolcanoconiosis"
    word = tokenizer.encode_text(long_word)
    assert len(word) >= 8
    tokens = tokenizer.tokenize("cat " * 74 + long_word)
    assert len(tokens.ids[0]) == CHUNK_LENGTH
    assert tokens.ids[0][-2:] == [word[0], END_TOKEN]
    assert tokens.ids[1] == [START_TOKEN, *word[1:], END_TOKEN]


@pytest.mark.parametrize(
    ("prompt", "segments"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
        ("((cat))", [("cat", pytest.approx(1.21))]),
        ("(cat:1.5) dog", [("cat", 1.5), (" dog", 1.0)]),
        ("((cat:1.5) dog)", [("cat", 1.5), (" dog", 1.1)]),
        ("(a (b:0.5) c:2)", [("a ", 2.0), ("b", 0.5), (" c", 2.0)]),
        ("(cat:big)", [("cat:big", 1.1)]),
        ("(:1.5)", [(":1.5", 1.1)]),
        ("(cat:nan)", [("cat:nan", 1.1)]),
        ("\\(cat\\)", [("(cat)", 1.0)]),
        ("\\((cat)\\)", [("(", 1.0), ("cat", 1.1), (")", 1.0)]),
        ("open (paren", [("open (paren", 1.0)]),
        ("close) paren (x)", [("close) paren ", 1.0), ("x", 1.1)]),
        ("[cat] {dog}", [("[cat] {dog}", 1.0)]),
        ("a\\b", [("a\\b", 1.0)]),
    ],
)
def test_parse_emphasis(prompt: str, segments: list[tuple[str, float]]) -> None:
    assert parse_emphasis(prompt) == segments


def test_weights_follow_their_words(tokenizer) -> None:
    tokens = tokenizer.tokenize("a (red cat:1.5) sits")
    a, red, cat, sits = (tokenizer.encode_text(word) for word in ("a", "red", "cat", "sits"))
    assert tokens.ids == [[START_TOKEN, *a, *red, *cat, *sits, END_TOKEN]]
    assert tokens.weights == [[1.0, 1.0, 1.5, 1.5, 1.0, 1.0]]


def test_escaped_parentheses_are_literal_tokens(tokenizer) -> None:
    tokens = tokenizer.tokenize("\\(cat\\)")
    assert tokens.ids[0][1:-1] == tokenizer.encode_text("(cat)")
    assert set(tokens.weights[0]) == {1.0}


def test_weight_one_tokenizes_like_plain_text(tokenizer) -> None:
    assert tokenizer.tokenize("a (cat:1.0) sits") == tokenizer.tokenize("a cat sits")


PLAIN_TEXT = st.characters(blacklist_characters="()\\", blacklist_categories=("Cs",))


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=PLAIN_TEXT, max_size=300))
def test_chunks_hold_every_token_of_plain_text(text: str) -> None:
    tokenizer = ClipTokenizer()
    tokens = tokenizer.tokenize(text)
    assert all(len(chunk) <= CHUNK_LENGTH for chunk in tokens.ids)
    assert [t for chunk in tokens.ids for t in chunk[1:-1]] == tokenizer.encode_text(text)
    assert all(w == 1.0 for chunk in tokens.weights for w in chunk)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab :.1\\()[]"), max_size=40))
def test_any_syntax_parses_and_tokenizes(prompt: str) -> None:
    segments = parse_emphasis(prompt)
    assert all(text and math.isfinite(weight) for text, weight in segments)
    tokens = ClipTokenizer().tokenize(prompt)
    assert all(len(chunk) <= CHUNK_LENGTH for chunk in tokens.ids)
