"""TextGenerate's generation (ldm.textgen) on tiny random Qwen3 and Gemma 2 files: greedy decoding against
transformers' Qwen3ForCausalLM / Gemma2ForCausalLM `generate(do_sample=False)` on the same weights and ids, Qwen3's
chat template against its published one (transformers' apply_chat_template), the sampling filters against hand
figures, seeded sampling, and the refusal of CLIPs without a language model."""

from __future__ import annotations

import json
import lzma
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tokenizers import AddedToken
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

from ldm.flux2_text import load_flux2_text_encoder, write_tiny_flux2_klein
from ldm.gemma_text import TOKENIZER_KEY, load_lumina2_text_encoder, tiny_head_dim, write_tiny_gemma
from ldm.qwen3_text import QWEN3_ADDED, load_z_image_text_encoder, write_tiny_qwen3
from ldm.qwen_text import VOCAB_FILE, load_qwen_image_text_encoder, write_tiny_qwen25vl
from ldm.textgen import (
    NEEDS,
    QWEN_STOPS,
    Sampling,
    TextGenerationError,
    chat_lm,
    filtered_logits,
    generate_ids,
    generate_text,
)

PROMPT = "a red fox in the snow"
STEPS = 24
CHAT_TEMPLATE = (Path(__file__).parent / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
# Qwen2's 22 special tokens, ids 151643 on, in order (Qwen3's four added tokens follow them)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("textgen")
    return {"qwen3": write_tiny_qwen3(root / "qwen_3_4b.safetensors", seed=5, dtype=torch.float32),
            "gemma": write_tiny_gemma(root / "gemma_2_2b.safetensors", seed=5, dtype=torch.float32)}


@pytest.fixture(scope="module")
def qwen3(files):
    return load_z_image_text_encoder([files["qwen3"]]).encoder


@pytest.fixture(scope="module")
def gemma(files):
    return load_lumina2_text_encoder([files["gemma"]]).encoder


def qwen3_reference(path: Path) -> Qwen3ForCausalLM:
    """transformers' Qwen3ForCausalLM configured by hand as Qwen3-4B is, but tiny, its head tied."""
    config = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=40960,
                         tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(safetensors.torch.load_file(path), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def gemma_reference(path: Path) -> Gemma2ForCausalLM:
    """transformers' Gemma2ForCausalLM as ComfyUI computes Gemma 2 (no softcapping, global attention), tiny."""
    state = safetensors.torch.load_file(path)
    state.pop(TOKENIZER_KEY)
    vocab, hidden = state["model.embed_tokens.weight"].shape
    head = tiny_head_dim(hidden)
    config = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=head, query_pre_attn_scalar=head,
                          hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          layer_types=["full_attention"] * 3, attn_logit_softcapping=None,
                          final_logit_softcapping=None, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
                          eos_token_id=1)
    model = Gemma2ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def reference_greedy(model, ids: list[int], steps: int, stops) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=steps, eos_token_id=sorted(stops), pad_token_id=min(stops))
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def hf_qwen3_tokenizer() -> Qwen2Tokenizer:
    """transformers' Qwen2Tokenizer on the bundled vocabulary with Qwen3's added tokens and published template."""
    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        model = json.load(f)["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED.values()])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("thinking", [False, True])
def test_qwen3_prompt_is_the_published_chat_template(qwen3, hf_qwen3_tokenizer, thinking) -> None:
    tokenizer = hf_qwen3_tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    assert text.endswith("assistant\n" if thinking else "<think>\n\n</think>\n\n")
    assert chat_lm(qwen3).prompt_ids(PROMPT, thinking) == tokenizer.encode(text)


def test_qwen3_greedy_equals_transformers_generate(qwen3, files) -> None:
    lm = chat_lm(qwen3)
    for ids in (lm.prompt_ids(PROMPT), lm.prompt_ids(PROMPT, use_default_template=False)):
        ours = generate_ids(lm, ids, STEPS)
        assert len(ours) == STEPS  # random weights never write an end token this soon
        assert ours == reference_greedy(qwen3_reference(files["qwen3"]), ids, STEPS, QWEN_STOPS)


def test_gemma_greedy_equals_transformers_generate(gemma, files) -> None:
    lm = chat_lm(gemma)
    ids = lm.prompt_ids(PROMPT)
    assert ids[0] == 2  # <bos>
    ours = generate_ids(lm, ids, STEPS)
    assert ours == reference_greedy(gemma_reference(files["gemma"]), ids, STEPS, lm.stop_ids)
    assert generate_text(gemma, PROMPT, STEPS) == gemma.tokenizer.processor.decode(ours)


def test_generation_stops_at_an_end_token_or_max_length(qwen3) -> None:
    lm = chat_lm(qwen3)
    ids = lm.prompt_ids(PROMPT)
    greedy = generate_ids(lm, ids, 6)
    assert len(greedy) == 6
    stopping = replace(lm, stop_ids=frozenset({greedy[2]}))
    assert generate_ids(stopping, ids, 6) == greedy[:greedy.index(greedy[2]) + 1]


def test_filters_follow_comfyuis_order_and_figures() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5, -3.0]])
    penalised = filtered_logits(logits, [0, 2, 0], Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                            repetition_penalty=2.0, presence_penalty=0.5))
    torch.testing.assert_close(penalised, torch.tensor([[0.5, 1.0, -2.5, 0.5, -3.0]]))
    hot = filtered_logits(logits, [], Sampling(temperature=0.5, top_k=3, top_p=1.0, min_p=0.0, repetition_penalty=1))
    torch.testing.assert_close(hot, torch.tensor([[4.0, 2.0, -torch.inf, 1.0, -torch.inf]]))
    # min-p 0.3: probabilities under 0.3 x the likeliest's go (e^-1 = 0.37 stays, e^-1.5 = 0.22 goes)
    min_p = filtered_logits(logits, [], Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3, repetition_penalty=1))
    assert torch.isfinite(min_p).tolist() == [[True, True, False, False, False]]
    # top-p, ComfyUI's rule: a token goes when the probabilities up to and including its own pass p. Sorted, the
    # probabilities are (0.607, 0.223, 0.135, 0.030, 0.004), their running sums (0.607, 0.830, 0.965, ...)
    for p, kept in ((0.85, [True, True, False, False, False]), (0.8, [True, False, False, False, False])):
        top_p = filtered_logits(logits, [], Sampling(temperature=1.0, top_k=0, top_p=p, min_p=0.0,
                                                     repetition_penalty=1))
        assert torch.isfinite(top_p).tolist() == [kept]
    tiny_p = filtered_logits(logits, [], Sampling(temperature=1.0, top_k=0, top_p=0.01, min_p=0.0,
                                                  repetition_penalty=1))
    assert torch.isfinite(tiny_p).tolist() == [[True, False, False, False, False]]  # the likeliest always kept


def test_sampling_is_seeded_and_keeps_to_the_filters(qwen3, files) -> None:
    lm = chat_lm(qwen3)
    ids = lm.prompt_ids(PROMPT)
    sampling = Sampling(temperature=1.5, top_k=3, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=11)
    first = generate_ids(lm, ids, STEPS, sampling)
    assert first == generate_ids(lm, ids, STEPS, sampling)
    assert first != generate_ids(lm, ids, STEPS, replace(sampling, seed=12))
    assert first != generate_ids(lm, ids, STEPS)
    reference = qwen3_reference(files["qwen3"])
    with torch.no_grad():  # every sampled token is among the top 3 of the reference's logits at its step
        logits = reference(torch.tensor([ids + first[:-1]])).logits[0, len(ids) - 1:]
    allowed = logits.topk(3).indices
    assert all(token in row.tolist() for token, row in zip(first, allowed, strict=True))
    assert generate_ids(lm, ids, STEPS, replace(sampling, top_k=1)) == generate_ids(lm, ids, STEPS)


def test_penalties_reach_the_prompt_and_the_written_tokens(qwen3) -> None:
    lm = chat_lm(qwen3)
    ids = lm.prompt_ids(PROMPT)
    assert len(set(generate_ids(lm, ids, 8))) < 8  # greedy repeats itself
    penalised = generate_ids(lm, ids, 8, Sampling(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0,
                                                  repetition_penalty=1e6))
    assert len(set(penalised)) == 8 and not set(penalised) & set(ids)


def test_defaults_sample_reproducibly(gemma) -> None:
    assert generate_text(gemma, PROMPT, 12, Sampling(seed=3)) == generate_text(gemma, PROMPT, 12, Sampling(seed=3))


def test_clips_without_a_language_model_are_refused(tmp_path) -> None:
    with pytest.raises(TextGenerationError, match="holds no causal language model"):
        chat_lm(torch.nn.Linear(2, 2))
    qwen25 = load_qwen_image_text_encoder([write_tiny_qwen25vl(tmp_path / "qwen25.safetensors")]).encoder
    with pytest.raises(TextGenerationError, match="without its LM head") as error:
        generate_text(qwen25, PROMPT)
    assert NEEDS in str(error.value)
    klein = load_flux2_text_encoder([write_tiny_flux2_klein(tmp_path / "klein.safetensors")]).encoder
    with pytest.raises(TextGenerationError, match="only as deep as FLUX.2 reads it"):
        chat_lm(klein)
