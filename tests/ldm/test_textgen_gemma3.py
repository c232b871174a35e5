"""TextGenerate's Gemma 3 (LTX-2's text encoder, ldm.ltx2_text) on tiny random weights: greedy decoding against
transformers' Gemma3ForCausalLM `generate(do_sample=False)` on the same weights and ids (its config in the form of
gemma-3-12b-it's text_config, the head tied), also past the 1024-token sliding window; ComfyUI's Gemma 3 template and
its templated prompts left as they are; `<end_of_turn>` as a stop; LTX-2's enhancement prompt against Lightricks'
system prompts as diffusers carries them."""

from __future__ import annotations

import io

import pytest
import sentencepiece
import torch
from diffusers.pipelines.ltx2.utils import I2V_DEFAULT_SYSTEM_PROMPT, T2V_DEFAULT_SYSTEM_PROMPT
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from ldm.gemma_text import EOS, TOKENIZER_KEY
from ldm.ltx2_text import ltx2_text_encoder_from_state_dicts, tiny_gemma3_state, tiny_projection_state, token_ids
from ldm.textgen import (
    GEMMA3_TEMPLATE,
    LTX2_I2V_SYSTEM_PROMPT,
    LTX2_T2V_SYSTEM_PROMPT,
    Sampling,
    chat_lm,
    generate_ids,
    generate_text,
    ltx2_enhancement_prompt,
)

HIDDEN, LAYERS = 32, 6  # five sliding-window layers and a global one
PROMPT = "a red fox in the snow"
STEPS = 24


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return tiny_gemma3_state(seed=3, hidden=HIDDEN, layers=LAYERS)


def encoder_of(state: dict[str, torch.Tensor]):
    projection = tiny_projection_state(seed=4, hidden=HIDDEN, layers=LAYERS)
    return ltx2_text_encoder_from_state_dicts(state, projection).encoder


@pytest.fixture(scope="module")
def encoder(state):
    return encoder_of(state)


@pytest.fixture(scope="module")
def reference(state) -> Gemma3ForCausalLM:
    """transformers' Gemma3ForCausalLM of the tiny weights, configured as gemma-3-12b-it's text_config is (its
    defaults: no logit softcapping), the head tied to the embedding."""
    config = Gemma3TextConfig(vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=HIDDEN,
                              intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=HIDDEN // 2, query_pre_attn_scalar=HIDDEN // 2,
                              sliding_window=1024, sliding_window_pattern=6, rope_theta=1_000_000.0,
                              rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                              tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    assert config.final_logit_softcapping is None
    model = Gemma3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k != TOKENIZER_KEY}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def reference_greedy(model, ids: list[int], steps: int, stops) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=steps, eos_token_id=sorted(stops), pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(encoder, reference) -> None:
    lm = chat_lm(encoder)
    written = []
    for ids in (lm.prompt_ids(PROMPT), lm.prompt_ids(PROMPT, use_default_template=False)):
        written.append(generate_ids(lm, ids, STEPS))
        assert len(written[-1]) == STEPS  # random weights write no end token this soon
        assert written[-1] == reference_greedy(reference, ids, STEPS, lm.stop_ids)
    assert generate_text(encoder, PROMPT, STEPS) == encoder.tokenizer.processor.decode(written[0])


def test_greedy_past_the_sliding_window_equals_transformers(encoder, reference) -> None:
    lm = chat_lm(encoder)
    ids = lm.prompt_ids(ltx2_enhancement_prompt(PROMPT))
    assert len(ids) > 1024 + 8  # the tiny tokenizer spends more tokens on the system prompt than Gemma 3's
    assert generate_ids(lm, ids, 8) == reference_greedy(reference, ids, 8, lm.stop_ids)


def test_comfyuis_template_and_templated_prompts(encoder) -> None:
    lm = chat_lm(encoder)
    tokenizer = encoder.tokenizer
    assert GEMMA3_TEMPLATE.format(PROMPT) == ("<start_of_turn>system\nYou are a helpful assistant.<end_of_turn>\n"
                                              f"<start_of_turn>user\n{PROMPT}<end_of_turn>\n<start_of_turn>model\n")
    assert lm.prompt_ids(PROMPT) == token_ids(tokenizer, GEMMA3_TEMPLATE.format(PROMPT))
    assert lm.prompt_ids(PROMPT)[0] == 2  # <bos>
    chat = ltx2_enhancement_prompt(PROMPT)
    assert lm.prompt_ids(chat) == token_ids(tokenizer, chat)  # already templated: not wrapped again
    assert lm.prompt_ids(PROMPT, use_default_template=False) == token_ids(tokenizer, PROMPT)
    assert lm.stop_ids == {EOS}  # the tiny tokenizer has no <end_of_turn>


def test_end_of_turn_stops_where_the_tokenizer_has_it(state) -> None:
    model = io.BytesIO()
    corpus = [line for text in (LTX2_T2V_SYSTEM_PROMPT, LTX2_I2V_SYSTEM_PROMPT) for line in text.split("\n") if line]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=state["model.embed_tokens.weight"].shape[0],
        model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=0.99, num_threads=1, minloglevel=2)
    encoder = encoder_of({**state, TOKENIZER_KEY: torch.frombuffer(bytearray(model.getvalue()), dtype=torch.uint8)})
    lm = chat_lm(encoder)
    processor = encoder.tokenizer.processor
    start, end = processor.piece_to_id("<start_of_turn>"), processor.piece_to_id("<end_of_turn>")
    assert lm.stop_ids == {EOS, end}
    ids = lm.prompt_ids(PROMPT)
    assert ids.count(start) == 3 and ids.count(end) == 2  # the turn markers are single tokens
    assert processor.decode(ids[1:]) == GEMMA3_TEMPLATE.format(PROMPT)


def test_sampling_is_seeded(encoder) -> None:
    sampling = Sampling(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=11)
    assert generate_text(encoder, PROMPT, 12, sampling) == generate_text(encoder, PROMPT, 12, sampling)


def _words(text: str) -> list[str]:
    return text.split()


def test_enhancement_prompt_is_ltx2s() -> None:
    # Lightricks' words as diffusers carries them; ComfyUI's layout (one line per paragraph or bullet) and its I2V
    # prompt opening with the T2V prompt's first sentence
    assert _words(LTX2_T2V_SYSTEM_PROMPT) == _words(T2V_DEFAULT_SYSTEM_PROMPT)
    first = LTX2_T2V_SYSTEM_PROMPT.split("\n")[0]
    assert first == _words_joined(T2V_DEFAULT_SYSTEM_PROMPT, 35)
    assert LTX2_I2V_SYSTEM_PROMPT.startswith(first + "\nYou are a Creative Assistant writing concise")
    assert _words(LTX2_I2V_SYSTEM_PROMPT) == _words(first) + _words(I2V_DEFAULT_SYSTEM_PROMPT)
    assert "\n#### Example\nInput: \"A woman at a coffee shop talking on the phone\"\nOutput:\nStyle:" in \
        LTX2_T2V_SYSTEM_PROMPT
    assert "\n    - If the input is vague" in LTX2_T2V_SYSTEM_PROMPT  # nested bullets keep their indent
    assert max(map(len, LTX2_T2V_SYSTEM_PROMPT.split("\n"))) > 120  # not wrapped
    chat = ltx2_enhancement_prompt("a cat")
    assert chat == (f"<start_of_turn>system\n{LTX2_T2V_SYSTEM_PROMPT}<end_of_turn>\n<start_of_turn>user\n\n"
                    "User Raw Input Prompt: a cat.<end_of_turn>\n<start_of_turn>model\n")
    assert ltx2_enhancement_prompt("a cat", image=True) == (
        f"<start_of_turn>system\n{LTX2_I2V_SYSTEM_PROMPT}<end_of_turn>\n<start_of_turn>user\n\n<image_soft_token>\n\n"
        "User Raw Input Prompt: a cat.<end_of_turn>\n<start_of_turn>model\n")
    assert ltx2_enhancement_prompt("a cat", system_prompt="  Be brief. ").startswith(
        "<start_of_turn>system\nBe brief.<end_of_turn>\n")


def _words_joined(text: str, count: int) -> str:
    return " ".join(text.split()[:count])
