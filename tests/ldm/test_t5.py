"""The T5 tokenizer against T5's published token ids, and the encoder against transformers' own T5EncoderModel."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from transformers import T5Config as HFConfig
from transformers import T5EncoderModel

from ldm.checkpoint import CheckpointError
from ldm.t5 import FLUX_MIN_LENGTH, T5Config, T5Tokenizer, load_t5, t5_config_from_state_dict

# Token ids of Google's T5 vocabulary as transformers' T5 documentation shows them (its training example), and the
# task's known ids for a short prompt; the tokenizer here reads another copy of the vocabulary (stable-diffusion.cpp's).
KNOWN_IDS = {
    "translate English to German: The house is wonderful.": [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1],
    "Das Haus ist wunderbar.": [644, 4598, 229, 19250, 5, 1],
    "a photo of a cat": [3, 9, 1202, 13, 3, 9, 1712, 1],
}


@pytest.mark.parametrize("text", KNOWN_IDS)
def test_tokenizer_gives_t5s_ids(text: str) -> None:
    assert T5Tokenizer().tokenize(text).ids == KNOWN_IDS[text]


def test_tokenizer_pads_to_comfyuis_minimum_and_keeps_long_prompts() -> None:
    ids, weights = T5Tokenizer().batch(["a photo of a cat", "cat " * 300])
    assert ids.shape == (2, 301) and weights.shape == (2, 301)  # 300 words + the end token, never cut
    assert ids[0, :8].tolist() == KNOWN_IDS["a photo of a cat"] and ids[0, 8:].eq(0).all()
    short, _ = T5Tokenizer().batch([""])
    assert short.shape == (1, FLUX_MIN_LENGTH) and short[0, 0] == 1 and short[0, 1:].eq(0).all()


def test_tokenizer_cuts_to_max_length_keeping_the_end_token() -> None:
    ids, _ = T5Tokenizer().batch(["cat " * 300], min_length=16, max_length=16)
    assert ids.shape == (1, 16) and ids[0, -1] == 1 and ids[0, 0] == 1712


def test_emphasis_weights_the_words_tokens() -> None:
    tokens = T5Tokenizer().tokenize("a (photo:1.5) of ((cat))")
    assert tokens.ids == KNOWN_IDS["a photo of a cat"][:3] + [13, 1712, 1]
    assert tokens.weights == pytest.approx([1.0, 1.0, 1.5, 1.0, 1.21, 1.0])


def reference_t5(gated: bool = True, seed: int = 0) -> T5EncoderModel:
    """A tiny transformers T5 encoder with every weight random (its norms too), so no mapping slip hides."""
    torch.manual_seed(seed)
    config = HFConfig(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape) * 0.1)
    return model


def save_like_comfyui(model: T5EncoderModel, path, dtype: torch.dtype = torch.float16) -> None:
    """transformers' keys, without the tied embed_tokens copy, in `dtype` (t5xxl_fp16.safetensors' form)."""
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    safetensors.torch.save_file(sd, path)


def test_config_from_state_dict(tmp_path) -> None:
    for gated in (True, False):
        config = t5_config_from_state_dict(reference_t5(gated).state_dict())
        assert config == T5Config(32128, 32, 8, 48, 2, 4, 32, gated)


def test_encoder_matches_transformers(tmp_path) -> None:
    reference = reference_t5()
    save_like_comfyui(reference, tmp_path / "t5.safetensors", torch.float32)
    encoder, unused = load_t5(tmp_path / "t5.safetensors")
    assert unused == []
    prompts = ["a photo of a cat", "translate English to German: The house is wonderful."]
    ids, _ = encoder.tokenizer.batch(prompts)
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        ours = encoder.encode(prompts)
    assert ours.shape == (2, FLUX_MIN_LENGTH, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_weighted_prompt_moves_from_the_empty_prompts_encoding(tmp_path) -> None:
    reference = reference_t5()
    save_like_comfyui(reference, tmp_path / "t5.safetensors", torch.float32)
    encoder, _ = load_t5(tmp_path / "t5.safetensors")
    ids, _ = encoder.tokenizer.batch(["a photo of a cat"])
    empty = torch.zeros_like(ids)
    empty[0, 0] = 1
    with torch.no_grad():
        plain, z_empty = reference(input_ids=torch.cat([ids, empty])).last_hidden_state.chunk(2)
        ours = encoder.encode(["a photo of a (cat:1.3)"])
    expected = plain.clone()
    expected[0, 6] = z_empty[0, 6] + 1.3 * (plain[0, 6] - z_empty[0, 6])  # "cat" is the 7th token
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_fp16_and_fp8_files_load_their_values(tmp_path) -> None:
    reference = reference_t5()
    for dtype in (torch.float16, torch.float8_e4m3fn):
        save_like_comfyui(reference, tmp_path / "t5.safetensors", dtype)
        encoder, _ = load_t5(tmp_path / "t5.safetensors")
        assert encoder.dtype == torch.float32
        stored = reference.state_dict()["encoder.block.1.layer.1.DenseReluDense.wo.weight"].to(dtype).float()
        assert torch.equal(encoder.model.encoder.block[1].layer[1].DenseReluDense.wo.weight, stored)


def test_scaled_fp8_weights_are_multiplied_by_their_scales(tmp_path) -> None:
    reference = reference_t5()
    sd = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    scale = sd[key].abs().max() / 448
    sd[key] = (sd[key] / scale).to(torch.float8_e4m3fn)
    sd[key.replace(".weight", ".scale_weight")], sd["scaled_fp8"] = scale.reshape(1), torch.zeros(0)
    safetensors.torch.save_file(sd, tmp_path / "t5.safetensors")
    encoder, unused = load_t5(tmp_path / "t5.safetensors")
    assert unused == []
    weight = encoder.model.encoder.block[0].layer[0].SelfAttention.q.weight
    torch.testing.assert_close(weight, reference.state_dict()[key], rtol=0.07, atol=1e-3)


def test_bad_files_are_refused_by_name(tmp_path) -> None:
    sd = {k: v.clone() for k, v in reference_t5().state_dict().items() if k != "encoder.final_layer_norm.weight"}
    safetensors.torch.save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken.safetensors: .*missing.*final_layer_norm"):
        load_t5(tmp_path / "broken.safetensors")
    safetensors.torch.save_file({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="vae.safetensors: not a T5 encoder"):
        load_t5(tmp_path / "vae.safetensors")
