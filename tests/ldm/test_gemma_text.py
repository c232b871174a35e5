"""Lumina 2's Gemma-2 text encoder (ldm.gemma_text): its sentencepiece tokenizer against transformers' GemmaTokenizer
built from the same model file; its states against transformers' Gemma2Model (built here from its own config, as
ComfyUI computes Gemma 2: global attention, no logit softcapping) and against diffusers' Lumina2Pipeline's prompt
encoding with that model and tokenizer; ComfyUI's prompt weights; its files and refusals."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from diffusers import Lumina2Pipeline
from transformers import Gemma2Config, Gemma2Model
from transformers import GemmaTokenizer as HFGemmaTokenizer

from ldm.checkpoint import CheckpointError
from ldm.gemma_text import (
    SYSTEM_PROMPTS,
    GemmaTokenizer,
    gemma_kind,
    is_gemma2,
    load_lumina2_text_encoder,
    lumina2_prompt,
    lumina2_text_encoder_from_state_dict,
    tiny_gemma_state,
    tiny_head_dim,
    tiny_spiece_model,
    write_tiny_gemma,
)
from ldm.qwen3_text import text_kind, write_tiny_qwen3

PROMPTS = ["a photo of a cat sitting on a red sofa", "an astronaut riding a horse on the moon, 日本の絵, 1920s style"]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return tiny_gemma_state(seed=1, hidden=32)


@pytest.fixture(scope="module")
def encoder(state):
    return lumina2_text_encoder_from_state_dict(state, "gemma_2_2b_fp16.safetensors",
                                                head_dim=tiny_head_dim(32)).encoder


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, state):
    folder = tmp_path_factory.mktemp("gemma_tokenizer")
    (folder / "tokenizer.model").write_bytes(state["spiece_model"].numpy().tobytes())
    return HFGemmaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False)


@pytest.fixture(scope="module")
def reference(state) -> Gemma2Model:
    """transformers' Gemma2Model of the tiny weights, its config written out here."""
    config = Gemma2Config(vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=32, intermediate_size=64,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          query_pre_attn_scalar=16, attn_logit_softcapping=None, final_logit_softcapping=None,
                          layer_types=["full_attention"] * 3, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000.0})
    model = Gemma2Model(config).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


def test_tokenizer_matches_transformers(state, hf_tokenizer):
    tokenizer = GemmaTokenizer.from_tensor(state["spiece_model"])
    for text in [*PROMPTS, lumina2_prompt("a cat"), "  two  spaces\nand a newline 12345", "ünïcödé ✓"]:
        ids, weights = tokenizer.tokenize(text)
        assert ids == hf_tokenizer(text).input_ids and ids[0] == 2 and set(weights) == {1.0}
    assert tiny_spiece_model() == tiny_spiece_model()  # trained deterministically


def test_states_match_transformers_gemma2(encoder, reference, hf_tokenizer):
    encoding = encoder.encode(PROMPTS)
    mask = encoding.extra["attention_mask"]
    assert encoding.pooled is None and mask.dtype == torch.int64
    for i, prompt in enumerate(PROMPTS):
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            theirs = reference(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
        n = ids.shape[1]
        assert mask[i].sum() == n and theirs.abs().max() > 0.5
        torch.testing.assert_close(encoding.cond[i, :n], theirs, rtol=1e-5, atol=1e-5)
        assert not encoding.cond[i, n:].any()  # zeros after the prompt


def test_matches_diffusers_lumina2_pipeline(encoder, reference, hf_tokenizer):
    """Lumina2Pipeline.encode_prompt (system prompt, 256 tokens padded right, hidden_states[-2]) on the real tokens."""
    pipe = Lumina2Pipeline(transformer=None, scheduler=None, vae=None, text_encoder=reference, tokenizer=hf_tokenizer)
    for name, system in SYSTEM_PROMPTS.items():
        with torch.no_grad():
            theirs, their_mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                                          system_prompt=system)
        ours = encoder.encode([lumina2_prompt(p, name) for p in PROMPTS])
        n = ours.cond.shape[1]
        assert theirs.shape[1] == 256 and not their_mask[:, n:].any()
        assert torch.equal(ours.extra["attention_mask"], their_mask[:, :n])
        real = their_mask[:, :n, None].bool()
        torch.testing.assert_close(ours.cond, theirs[:, :n] * real, rtol=1e-5, atol=1e-5)


def test_prompt_weights_as_comfyui(encoder, reference, state):
    """`(cat:1.5)`: its run tokenized on its own, its states pushed from the empty prompt's (<bos> then <pad>s)."""
    tokenizer = GemmaTokenizer.from_tensor(state["spiece_model"])
    head, cat = tokenizer.encode("a photo of a "), tokenizer.encode("cat")
    ids = torch.tensor([[2, *head, *cat]])
    empty = torch.zeros_like(ids)
    empty[0, 0] = 2
    with torch.no_grad():
        z = reference(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        z_empty = reference(input_ids=empty, output_hidden_states=True).hidden_states[-2]
        weighted, plain = encoder.encode(["a photo of a (cat:1.5)", PROMPTS[0]]).cond
        alone = encoder.encode(PROMPTS[:1]).cond[0]
    torch.testing.assert_close(plain[:alone.shape[0]], alone)  # a batch's unweighted prompt is left as it is
    weighted = weighted[None, :ids.shape[1]]
    expected = z.clone()
    expected[0, -len(cat):] = z_empty[0, -len(cat):] + 1.5 * (z[0, -len(cat):] - z_empty[0, -len(cat):])
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-5)
    assert encoder.tokenizer.tokenize("a \\(cat\\)")[0] == [2, *tokenizer.encode("a (cat)")]


def test_file_round_trip(tmp_path, encoder):
    path = write_tiny_gemma(tmp_path / "gemma_2_2b_fp16.safetensors", seed=1, dtype=torch.float32)
    assert safetensors.torch.load_file(path)["spiece_model"].dtype == torch.uint8
    loaded = load_lumina2_text_encoder([path])
    assert loaded.family == "lumina2" and loaded.unused_keys == []
    torch.testing.assert_close(loaded.encoder.encode(PROMPTS).cond, encoder.encode(PROMPTS).cond)
    half = load_lumina2_text_encoder([write_tiny_gemma(tmp_path / "gemma_fp16.safetensors", seed=1)],
                                     dtype=torch.bfloat16)
    assert half.encoder.dtype == torch.bfloat16 and torch.isfinite(half.encoder.encode(PROMPTS).cond).all()


def test_checkpoint_text_encoder(tmp_path):
    from ldm.lumina2_files import split_lumina2_checkpoint, write_tiny_lumina2_checkpoint

    path = write_tiny_lumina2_checkpoint(tmp_path / "lumina_2.safetensors", seed=2, dtype=torch.float32)
    _, _, gemma = split_lumina2_checkpoint(safetensors.torch.load_file(path))
    loaded = lumina2_text_encoder_from_state_dict(gemma, path.name, head_dim=tiny_head_dim(32))
    assert loaded.unused_keys == []
    assert loaded.encoder.encode([lumina2_prompt("a cat")]).cond.shape[-1] == 32


def test_kinds_and_refusals(tmp_path, state):
    assert is_gemma2(state) and gemma_kind(state) == "gemma2_2b" and text_kind(state) == "gemma"
    qwen = write_tiny_qwen3(tmp_path / "qwen_3_4b.safetensors")
    qwen_sd = safetensors.torch.load_file(qwen)
    assert gemma_kind(qwen_sd) is None and not is_gemma2(qwen_sd)
    gemma3 = {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    assert gemma_kind(gemma3) == "gemma3"
    wide = {**state, "model.embed_tokens.weight": torch.empty(10, 2048, device="meta")}
    assert gemma_kind(wide) == "gemma2"
    with pytest.raises(CheckpointError, match="qwen_3_4b.safetensors: not Gemma-2-2B.*Qwen3"):
        load_lumina2_text_encoder([qwen])
    bare = tmp_path / "gemma_no_tokenizer.safetensors"
    safetensors.torch.save_file({k: v for k, v in state.items() if k != "spiece_model"}, bare)
    with pytest.raises(CheckpointError, match="gemma_no_tokenizer.safetensors: a Gemma-2 file without its tokenizer"):
        load_lumina2_text_encoder([bare])
    with pytest.raises(CheckpointError, match="one Gemma-2-2B"):
        load_lumina2_text_encoder([bare, qwen])
    broken = tmp_path / "gemma_broken.safetensors"
    safetensors.torch.save_file({k: v for k, v in state.items() if k != "model.layers.2.mlp.up_proj.weight"}, broken,
                                metadata={"loom.gemma_head_dim": "16"})
    with pytest.raises(CheckpointError, match="1 Gemma 2 weights missing"):
        load_lumina2_text_encoder([broken])
    with pytest.raises(ValueError, match="system_prompt must be one of superior, alignment"):
        lumina2_prompt("a cat", "best")


def test_released_shape_from_weights():
    """Gemma-2-2B's shape (2.6B parameters) from its weights' names and shapes alone."""
    from ldm.gemma_text import gemma2_config_from_state_dict

    with torch.device("meta"):
        released = {f"model.{k}": v for k, v in Gemma2Model(Gemma2Config()).state_dict().items()}
    config = gemma2_config_from_state_dict(released)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (256000, 2304, 9216, 26, 8, 4,
                                                                                          256)
    assert gemma_kind(released) == "gemma2_2b"
    assert sum(v.numel() for v in released.values()) == pytest.approx(2.614e9, rel=0.01)


def test_clip_loader_type_lumina2_dispatch(tmp_path):
    """A Gemma-2 file loads as Lumina 2's encoder, a Qwen3-4B file as Z-Image's; others are refused."""
    from ldm.gemma_text import load_lumina2_type_text_encoder

    gemma = load_lumina2_type_text_encoder([write_tiny_gemma(tmp_path / "gemma_2_2b_fp16.safetensors")])
    qwen = load_lumina2_type_text_encoder([write_tiny_qwen3(tmp_path / "qwen_3_4b.safetensors")])
    assert (gemma.family, qwen.family) == ("lumina2", "z_image")
    assert type(gemma.encoder).__name__ == "Lumina2TextEncoder" and type(qwen.encoder).__name__ == "ZImageTextEncoder"
    other = tmp_path / "t5.safetensors"
    safetensors.torch.save_file({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError, match="t5.safetensors: not Gemma-2-2B"):
        load_lumina2_type_text_encoder([other])
