"""Qwen-Image's text encoder (ldm.qwen_text) against diffusers' QwenImagePipeline._get_qwen_prompt_embeds on
transformers' Qwen2_5_VLForConditionalGeneration with the same tiny weights, and the bundled Qwen2 tokenizer against
published ids and transformers' Qwen2Tokenizer built from the same vocabulary and merges."""

from __future__ import annotations

import json
import lzma

import pytest
import safetensors.torch
import torch
from diffusers import QwenImagePipeline
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from ldm.checkpoint import CheckpointError
from ldm.qwen_text import (
    ATTENTION_MASK,
    VOCAB_FILE,
    load_qwen_image_text_encoder,
    template_end,
    tokenize,
    write_tiny_qwen25vl,
)
from ldm.umt5 import write_tiny_umt5

PROMPTS = ["a red fox running through the snow, (slow motion:1.3)", "waves on a beach at sunset, 夕阳"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
           "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
# transformers' tests/models/qwen2/test_tokenization_qwen2.py (test_tokenizer_integration, Qwen/Qwen-tokenizer).
PUBLISHED = {
    "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。":
        [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034,
         104949, 9370, 5333, 58143, 102011, 1773],
    '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```':
        [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135,
         1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594],
    "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides":
        [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8,
         5707],
}


@pytest.fixture(scope="module")
def spec() -> dict:
    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hf_tokenizer(spec) -> Qwen2Tokenizer:
    """transformers' Qwen2Tokenizer (diffusers' QwenImagePipeline tokenizer class) on the bundled vocabulary and
    merges, with Qwen2.5-VL's special tokens."""
    model = spec["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_qwen25vl(tmp_path_factory.mktemp("te") / "qwen_2.5_vl_7b.safetensors", seed=7,
                               dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tiny) -> Qwen2_5_VLForConditionalGeneration:
    """transformers' Qwen2.5-VL (multimodal RoPE, a one-block vision tower) with the tiny file's language model."""
    text = dict(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    state = safetensors.torch.load_file(tiny)
    lm = {"model.language_model." + k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    assert not model.load_state_dict(lm, strict=False).unexpected_keys
    return model


def test_special_tokens_and_published_ids(spec) -> None:
    from tokenizers import Tokenizer

    vocabulary = Tokenizer.from_str(json.dumps(spec))
    assert [vocabulary.token_to_id(t) for t in SPECIAL] == list(range(151643, 151665))
    assert vocabulary.get_vocab_size() == 151665
    for text, ids in PUBLISHED.items():
        assert vocabulary.encode(text, add_special_tokens=False).ids == ids
    # NFC: U+03D2 U+0301 is U+03D3, as Qwen2's tokenizer test has it
    assert vocabulary.encode("\u03d2\u0301").ids == vocabulary.encode("\u03d3").ids


def test_matches_transformers_qwen2_tokenizer(hf_tokenizer) -> None:
    for prompt in [*PROMPTS, *PUBLISHED, "  spaces\n\nand 12345 numbers's <|im_end|> ok"]:
        ids = tokenize(prompt)
        assert ids == hf_tokenizer("<|im_start|>system\nDescribe the image by detailing the color, shape, size, "
                                   "texture, quantity, text, spatial relationships of the objects and background:"
                                   f"<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
                                   ).input_ids
        assert template_end(ids) == 34  # diffusers' prompt_template_encode_start_idx
        assert ids[34:] == hf_tokenizer(prompt).input_ids + [151645, 198, 151644, 77091, 198]


def test_template_end_follows_comfyui() -> None:
    raw = "<|im_start|>user\nhello<|im_end|>"  # a prompt already in chat form goes in as it is
    ids = tokenize(raw)
    assert ids[:3] == [151644, 872, 198] and template_end(ids) == 3
    assert tokenize("\\(a\\)") == tokenize("(a)")  # ComfyUI's escapes undone, no weights


def test_states_and_mask_match_diffusers(tiny, reference, hf_tokenizer) -> None:
    loaded = load_qwen_image_text_encoder([tiny])
    assert loaded.unused_keys == [] and loaded.family == "qwen_image"
    encoding = loaded.encoder.encode(PROMPTS)
    pipeline = QwenImagePipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=hf_tokenizer,
                                 transformer=None)
    with torch.no_grad():
        states, mask = pipeline._get_qwen_prompt_embeds(PROMPTS, device=torch.device("cpu"))
    ours = encoding.extra[ATTENTION_MASK]
    lengths = [len(tokenize(p)) - 34 for p in PROMPTS]
    assert encoding.pooled is None and encoding.cond.shape == (2, max(lengths), 32)
    assert ours.dtype == torch.int64 and torch.equal(ours, mask) and ours.sum(1).tolist() == lengths
    torch.testing.assert_close(encoding.cond, states, atol=1e-5, rtol=1e-5)
    assert encoding.cond[0, lengths[0]:].eq(0).all() and encoding.cond[0, :lengths[0]].ne(0).any(-1).all()
    alone = loaded.encoder.encode(PROMPTS[1])  # one prompt: the same states, as ComfyUI encodes each alone
    torch.testing.assert_close(alone.cond[0], encoding.cond[1, :lengths[1]], atol=1e-5, rtol=1e-5)
    assert alone.extra[ATTENTION_MASK].eq(1).all()
    with torch.no_grad():
        first = pipeline._get_qwen_prompt_embeds(PROMPTS[0], device=torch.device("cpu"))[0]
    torch.testing.assert_close(loaded.encoder.encode(PROMPTS[0]).cond, first, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".scale_weight", ".weight_scale"])  # ComfyUI's older and newer fp8 files
def test_scaled_fp8_file_is_descaled(tiny, tmp_path, suffix) -> None:
    state = safetensors.torch.load_file(tiny)
    key = "model.layers.0.mlp.down_proj.weight"
    scale = state[key].abs().max() / 400
    scaled = {**state, key: (state[key] / scale).to(torch.float8_e4m3fn), key.removesuffix(".weight") + suffix:
              scale.reshape(1), "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn), "lm_head.weight":
              torch.zeros(4, 32)}
    path = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    safetensors.torch.save_file(scaled, path)
    loaded = load_qwen_image_text_encoder([path])
    assert loaded.unused_keys == []
    weight = loaded.encoder.qwen25_7b.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(weight, state[key], atol=float(scale) * 16, rtol=0.07)
    assert not torch.allclose(weight, state[key] / scale, atol=1)  # the scale applied
    assert loaded.encoder.encode("a cat").cond.isfinite().all()


def test_wrong_files_are_refused(tmp_path, tiny) -> None:
    umt5 = write_tiny_umt5(tmp_path / "umt5.safetensors")
    with pytest.raises(CheckpointError, match="umt5.safetensors: not Qwen2.5-VL-7B"):
        load_qwen_image_text_encoder([umt5])
    with pytest.raises(CheckpointError, match="one Qwen2.5-VL-7B text encoder file; got 2"):
        load_qwen_image_text_encoder([tiny, tiny])
    state = safetensors.torch.load_file(tiny)
    del state["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="broken.safetensors: 1 Qwen2.5-VL weights missing.*up_proj"):
        load_qwen_image_text_encoder([tmp_path / "broken.safetensors"])
