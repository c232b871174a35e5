"""Z-Image's text encoder (ldm.qwen3_text) against diffusers' ZImagePipeline._encode_prompt / encode_prompt on
transformers' Qwen3Model with the same tiny weights, its tokens against transformers' Qwen2Tokenizer built from the
bundled vocabulary with Qwen3's added tokens and Qwen3's published chat template (qwen3_chat_template.jinja, from
Qwen3-4B's tokenizer_config), fp8 files, and the refusal of files that are not Qwen3-4B."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import ZImagePipeline
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from ldm.checkpoint import CheckpointError
from ldm.qwen3_text import (
    ATTENTION_MASK,
    QWEN3_ADDED,
    TEMPLATE,
    load_z_image_text_encoder,
    text_kind,
    tokenize,
    write_tiny_qwen3,
)
from ldm.qwen_text import VOCAB_FILE, write_tiny_qwen25vl
from ldm.umt5 import write_tiny_umt5

PROMPTS = ["a red fox running through the snow, (slow motion:1.3)", "waves on a beach at sunset, 夕阳"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
           "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
CHAT_TEMPLATE = (Path(__file__).parent / "qwen3_chat_template.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hf_tokenizer() -> Qwen2Tokenizer:
    """transformers' Qwen2Tokenizer (Qwen3's tokenizer class, which diffusers' ZImagePipeline loads) on the bundled
    vocabulary and merges, with Qwen3's 26 added tokens and chat template."""
    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        model = json.load(f)["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED.values()])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_qwen3(tmp_path_factory.mktemp("te") / "qwen_3_4b.safetensors", seed=7, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny) -> Qwen3Model:
    """transformers' Qwen3Model, configured by hand as Qwen3-4B's config.json is but tiny, with the file's weights."""
    config = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=40960,
                         tie_word_embeddings=True)
    model = Qwen3Model(config).eval()
    state = safetensors.torch.load_file(tiny)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    return model


@pytest.fixture(scope="module")
def pipeline(reference, hf_tokenizer) -> ZImagePipeline:
    return ZImagePipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=hf_tokenizer, transformer=None)


def test_qwen3_tokens_follow_the_published_ids(hf_tokenizer) -> None:
    assert [hf_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL] == list(range(151643, 151665))
    assert tokenize("<tool_response></tool_response><think></think>")[3:7] == [151665, 151666, 151667, 151668]
    assert len(hf_tokenizer) == 151669


def test_the_template_is_qwen3s_chat_template_with_thinking_on(hf_tokenizer) -> None:
    """diffusers' call (enable_thinking=True) adds no think block; only enable_thinking=False does."""
    messages = [{"role": "user", "content": "a cat"}]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                enable_thinking=True)
    assert rendered == TEMPLATE.format("a cat") == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=False) == rendered + "<think>\n\n</think>\n\n"


def test_matches_transformers_tokenizer_on_the_template(hf_tokenizer) -> None:
    for prompt in [*PROMPTS, "", "  spaces\n\nand 12345 numbers's <|im_end|> ok", "<think>plan</think> a \\(cat\\)",
                   "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。"]:
        text = TEMPLATE.format(prompt.replace("\\(", "(").replace("\\)", ")"))
        assert tokenize(prompt) == hf_tokenizer(text).input_ids
    words = hf_tokenizer("a (red:1.5) fox").input_ids
    assert tokenize("a (red:1.5) fox")[3:3 + len(words)] == words  # no emphasis: brackets are text
    assert tokenize("\\(a\\)") == tokenize("(a)")  # ComfyUI's escapes undone


def test_states_and_mask_match_diffusers(tiny, pipeline) -> None:
    loaded = load_z_image_text_encoder([tiny])
    assert loaded.unused_keys == [] and loaded.family == "z_image"
    encoding = loaded.encoder.encode(PROMPTS)
    with torch.no_grad():
        expected = pipeline._encode_prompt(list(PROMPTS), device=torch.device("cpu"))
    lengths = [len(tokenize(p)) for p in PROMPTS]
    mask = encoding.extra[ATTENTION_MASK]
    assert encoding.pooled is None and encoding.cond.shape == (2, max(lengths), 32)
    assert mask.dtype == torch.int64 and mask.sum(1).tolist() == lengths == [len(e) for e in expected]
    for i, length in enumerate(lengths):
        torch.testing.assert_close(encoding.cond[i, :length], expected[i], atol=1e-5, rtol=1e-5)
        assert encoding.cond[i, length:].eq(0).all() and mask[i, :length].eq(1).all()
    alone = loaded.encoder.encode(PROMPTS[1])  # one prompt: the same states, as ComfyUI encodes each alone
    torch.testing.assert_close(alone.cond[0], encoding.cond[1, :lengths[1]], atol=1e-5, rtol=1e-5)
    assert alone.extra[ATTENTION_MASK].eq(1).all()


def test_the_second_to_last_layer_before_the_norm(tiny, reference) -> None:
    """ComfyUI's layer_idx -2 (the output of layer 34 of 36, not normed) is transformers' hidden_states[-2]: here
    the output of the second of three layers, neither the last state nor its norm."""
    encoder = load_z_image_text_encoder([tiny]).encoder
    ids = torch.tensor([tokenize("a cat")])
    with torch.no_grad():
        last = reference(input_ids=ids).last_hidden_state
        x = reference.embed_tokens(ids)  # ComfyUI's loop: the states after layer 3 - 2 = 1 (0-based), by hand
        position = torch.arange(ids.shape[1])[None]
        rope = reference.rotary_emb(x, position)
        for layer in reference.layers[:2]:
            x = layer(x, attention_mask=None, position_ids=position, position_embeddings=rope)  # causal
        cond = encoder.encode(["a cat"]).cond[0]
        torch.testing.assert_close(cond, x[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(cond, last[0], atol=1e-3) and not torch.allclose(cond, reference.norm(x)[0],
                                                                                    atol=1e-3)


def test_encode_prompt_with_its_empty_negative(tiny, pipeline) -> None:
    encoder = load_z_image_text_encoder([tiny]).encoder
    with torch.no_grad():
        positive, negative = pipeline.encode_prompt(PROMPTS[0], device=torch.device("cpu"))
    torch.testing.assert_close(encoder.encode([PROMPTS[0]]).cond[0], positive[0], atol=1e-5, rtol=1e-5)
    empty = encoder.encode([""])
    assert empty.cond.shape == (1, 8, 32)  # the template alone: 8 tokens
    torch.testing.assert_close(empty.cond[0], negative[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".scale_weight", ".weight_scale"])  # ComfyUI's older and newer fp8 files
def test_scaled_fp8_file_is_descaled(tiny, tmp_path, suffix) -> None:
    state = safetensors.torch.load_file(tiny)
    key = "model.layers.1.mlp.down_proj.weight"
    scale = state[key].abs().max() / 400
    scaled = {**state, key: (state[key] / scale).to(torch.float8_e4m3fn), key.removesuffix(".weight") + suffix:
              scale.reshape(1), "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn), "lm_head.weight":
              torch.zeros(4, 32)}
    path = tmp_path / "qwen_3_4b_fp8_scaled.safetensors"
    safetensors.torch.save_file(scaled, path)
    loaded = load_z_image_text_encoder([path])
    assert loaded.unused_keys == []
    weight = loaded.encoder.qwen3_4b.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(weight, state[key], atol=float(scale) * 16, rtol=0.07)
    assert not torch.allclose(weight, state[key] / scale, atol=1)  # the scale applied
    assert loaded.encoder.encode("a cat").cond.isfinite().all()


def test_an_fp8_file_loads_close_to_the_full_one(tiny, tmp_path) -> None:
    path = write_tiny_qwen3(tmp_path / "qwen_3_4b_fp8_e4m3fn.safetensors", seed=7, dtype=torch.float8_e4m3fn)
    loaded = load_z_image_text_encoder([path])
    assert loaded.unused_keys == [] and loaded.encoder.dtype == torch.float32
    cond = loaded.encoder.encode([PROMPTS[0]]).cond
    full = load_z_image_text_encoder([tiny]).encoder.encode([PROMPTS[0]]).cond
    assert (cond - full).abs().mean() < 0.1 * full.abs().mean()


def fake(width: int, *keys: str) -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.zeros(4, width)} | {key: torch.zeros(2) for key in keys}


GEMMA = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
         "model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight")
QWEN3_8B = ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.gate_proj.weight")


def test_wrong_files_are_refused(tmp_path, tiny) -> None:
    needs = "CLIPLoader type lumina2 takes Qwen3-4B, Z-Image's text encoder"
    umt5 = write_tiny_umt5(tmp_path / "umt5.safetensors")
    with pytest.raises(CheckpointError, match=f"umt5.safetensors: not Qwen3-4B.*holds UMT5-XXL.*{needs}"):
        load_z_image_text_encoder([umt5])
    qwen25 = write_tiny_qwen25vl(tmp_path / "qwen_2.5_vl_7b.safetensors")
    with pytest.raises(CheckpointError, match=f"qwen_2.5_vl_7b.safetensors: not Qwen3-4B.*holds Qwen2.5-VL.*{needs}"):
        load_z_image_text_encoder([qwen25])
    safetensors.torch.save_file(fake(2304, *GEMMA), tmp_path / "gemma_2_2b.safetensors")
    with pytest.raises(CheckpointError, match="gemma_2_2b.safetensors: .*holds Gemma .*Lumina Image 2.0.*"
                                              "ldm.gemma_text loads"):
        load_z_image_text_encoder([tmp_path / "gemma_2_2b.safetensors"])
    safetensors.torch.save_file(fake(4096, *QWEN3_8B), tmp_path / "qwen_3_8b.safetensors")
    with pytest.raises(CheckpointError, match="a Qwen3 language model 4096 wide, not Qwen3-4B \\(2560 wide\\)"):
        load_z_image_text_encoder([tmp_path / "qwen_3_8b.safetensors"])
    with pytest.raises(CheckpointError, match="one Qwen3-4B text encoder file; got 2"):
        load_z_image_text_encoder([tiny, tiny])
    state = safetensors.torch.load_file(tiny)
    del state["model.layers.2.self_attn.k_norm.weight"]
    safetensors.torch.save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="broken.safetensors: 1 Qwen3 weights missing.*k_norm"):
        load_z_image_text_encoder([tmp_path / "broken.safetensors"])


def test_header_kinds(tiny) -> None:
    assert text_kind(safetensors.torch.load_file(tiny)) == "qwen3_4b"
    assert text_kind(fake(2560, *QWEN3_8B)) == "qwen3_4b" and text_kind(fake(4096, *QWEN3_8B)) == "qwen3"
    assert text_kind(fake(2304, *GEMMA)) == "gemma"
    assert text_kind(fake(3584, "model.layers.0.self_attn.k_proj.bias", "model.layers.0.mlp.gate_proj.weight")) is None
