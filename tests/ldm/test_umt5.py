"""UMT5-XXL (Wan's text encoder): the tokenizer against UMT5's published ids, `tokenizers` and transformers on the
stored json, and the encoder against transformers' UMT5EncoderModel run through diffusers' WanPipeline procedure."""

from __future__ import annotations

import lzma

import pytest
import safetensors.torch
import torch
from diffusers import WanPipeline
from tokenizers import Tokenizer
from transformers import T5TokenizerFast, UMT5EncoderModel

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.parts import look_of
from ldm.t5 import build_t5, is_t5, is_umt5
from ldm.umt5 import (
    TINY_UMT5,
    UMT5_VOCAB_SIZE,
    VOCAB_FILE,
    WAN_MIN_LENGTH,
    UMT5Tokenizer,
    attention_mask,
    load_wan_text_encoder,
    umt5_transformers_config,
    write_tiny_umt5,
)

# UMT5's token ids as transformers' UMT5 integration test (google/umt5-small's SentencePiece tokenizer) lists them,
# its prompts with the <extra_id_N> sentinels left out; the end token (1) closes each.
KNOWN_IDS = {
    "Bonjour monsieur bien": [38530, 210703, 1410, 1],
    "No se como puedo": [826, 321, 671, 25922, 1],
    "This is the reason why we them.": [1460, 339, 312, 19014, 10620, 758, 2355, 274, 1],
    "A walks into a bar and orders a with pinch of": [320, 14869, 281, 2234, 289, 2275, 333, 61391, 289, 543,
                                                       168714, 329, 1],
}
PROMPTS = ["a photo of a cat sitting on the grass, 4k", "一只可爱的小猫在草地上奔跑", "Bonjour monsieur, ça va?"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("umt5") / "tokenizer.json"
    with lzma.open(VOCAB_FILE, "rb") as f:
        path.write_bytes(f.read())
    return path


@pytest.fixture(scope="module")
def fast(tokenizer_json) -> T5TokenizerFast:
    """transformers' T5TokenizerFast (diffusers' WanPipeline's tokenizer class) on the stored json."""
    return T5TokenizerFast(tokenizer_file=str(tokenizer_json))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_umt5(tmp_path_factory.mktemp("umt5") / "umt5-tiny.safetensors", seed=3, dtype=torch.float32)


@pytest.mark.parametrize("text", KNOWN_IDS)
def test_tokenizer_gives_umt5s_published_ids(text: str) -> None:
    assert UMT5Tokenizer().tokenize(text).ids == KNOWN_IDS[text]


def test_tokenizer_agrees_with_tokenizers_and_transformers_on_the_stored_json(tokenizer_json, fast) -> None:
    """Word-by-word tokenization (ComfyUI's) gives what whole-prompt tokenization gives, as `tokenizers` and
    transformers' T5TokenizerFast read the same file; UMT5's special tokens and vocabulary size."""
    plain = Tokenizer.from_file(str(tokenizer_json))
    assert [plain.token_to_id(t) for t in ("<pad>", "</s>", "<unk>", "<extra_id_0>", "<extra_id_299>")] == \
        [0, 1, 3, 256299, 256000]
    assert plain.get_vocab_size() == len(fast) == 256300 < UMT5_VOCAB_SIZE  # the embedding is padded to 256384
    for prompt in [*PROMPTS, *KNOWN_IDS]:
        ids = UMT5Tokenizer().tokenize(prompt).ids
        assert ids == plain.encode(prompt).ids == fast(prompt).input_ids


def test_characters_outside_the_vocabulary_fall_back_to_bytes() -> None:
    """As SentencePiece reads UMT5's model: its UTF-8 bytes' pieces (<0x00> is id 17), not <unk> (3)."""
    ids = UMT5Tokenizer().tokenize("\U0002a6d6").ids
    assert ids == [273, *(17 + b for b in "\U0002a6d6".encode()), 1]  # 273: the word's leading "▁"


def test_padding_to_512_mask_and_long_prompts() -> None:
    ids, weights = UMT5Tokenizer().batch(["No se como puedo", "cat " * 600], WAN_MIN_LENGTH)
    assert ids.shape == weights.shape == (2, 601)  # 600 words and the end token: never cut, as in ComfyUI
    assert ids[0, :5].tolist() == KNOWN_IDS["No se como puedo"] and ids[0, 5:].eq(0).all()
    mask = attention_mask(ids)
    assert mask[0, :5].all() and not mask[0, 5:].any() and mask[1].all()
    short, _ = UMT5Tokenizer().batch([""], WAN_MIN_LENGTH)
    assert short.shape == (1, 512) and attention_mask(short)[0].tolist() == [True] + [False] * 511


def _reference(path) -> UMT5EncoderModel:
    model = UMT5EncoderModel(umt5_transformers_config(TINY_UMT5)).eval()
    state = {k: v.float() for k, v in safetensors.torch.load_file(path).items()}
    model.load_state_dict({**state, "encoder.embed_tokens.weight": state["shared.weight"]})
    return model


def _wan_embeds(path, fast: T5TokenizerFast, prompts: list[str]) -> torch.Tensor:
    """diffusers' WanPipeline._get_t5_prompt_embeds with transformers' UMT5EncoderModel holding the file's weights."""
    pipeline = WanPipeline(tokenizer=fast, text_encoder=_reference(path), transformer=None, vae=None, scheduler=None)
    with torch.no_grad():
        return pipeline._get_t5_prompt_embeds(prompts, max_sequence_length=512, device=torch.device("cpu"))


def test_encoder_matches_wan_pipeline(tiny, fast) -> None:
    """diffusers' WanPipeline._get_t5_prompt_embeds (pad to 512, mask, cut each prompt's states at its length and
    fill with zeros) on transformers' UMT5EncoderModel with the same weights."""
    loaded = load_wan_text_encoder([tiny])
    assert loaded.unused_keys == [] and loaded.family == "wan"
    cond = loaded.encoder.encode(PROMPTS)
    assert cond.pooled is None and cond.cond.shape == (3, 512, 32)
    torch.testing.assert_close(cond.cond, _wan_embeds(tiny, fast, PROMPTS), atol=1e-5, rtol=1e-5)
    length = len(UMT5Tokenizer().tokenize(PROMPTS[0]).ids)
    assert cond.cond[0, :length].ne(0).any(-1).all() and cond.cond[0, length:].eq(0).all()


def test_prompt_weights_as_comfyui_applies_them(tiny, fast) -> None:
    """A weighted token: z_empty + w * (z - z_empty), z_empty the masked empty prompt (zero past its end token)."""
    z, z_empty = _wan_embeds(tiny, fast, ["a red fox", ""]).split(1)
    assert z_empty[0, 1:].eq(0).all() and z_empty[0, 0].ne(0).any()
    red = UMT5Tokenizer().tokenize("a").ids[:-1]
    first, count = len(red), len(UMT5Tokenizer().tokenize("red").ids) - 1
    expected = z.clone()
    expected[0, first:first + count] = z_empty[0, first:first + count] + 1.5 * (z - z_empty)[0, first:first + count]
    cond = load_wan_text_encoder([tiny]).encoder.encode(["a (red:1.5) fox"]).cond
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-5)


def test_fp8_and_scaled_fp8_files(tiny, tmp_path, fast) -> None:
    """umt5_xxl_fp8_e4m3fn_scaled.safetensors' form (fp8 weights, `.scale_weight`s, the `scaled_fp8` marker and
    ComfyUI's `spiece_model` bytes): every key used or knowingly skipped; the states those weights give."""
    state = safetensors.torch.load_file(tiny)
    scaled = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
              "spiece_model": torch.frombuffer(bytearray(b"a SentencePiece model"), dtype=torch.uint8)}
    descaled = {}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2 and "relative_attention_bias" not in key:
            scale = tensor.abs().amax() / 448
            scaled[key], scaled[key[:-len("weight")] + "scale_weight"] = (tensor / scale).to(torch.float8_e4m3fn), scale
            descaled[key] = scaled[key].float() * scale
        else:
            scaled[key] = descaled[key] = tensor
    write_safetensors(scaled, tmp_path / "umt5_fp8_scaled.safetensors", {})
    write_safetensors(descaled, tmp_path / "umt5_descaled.safetensors", {})
    loaded = load_wan_text_encoder([tmp_path / "umt5_fp8_scaled.safetensors"])
    assert loaded.unused_keys == []
    expected = _wan_embeds(tmp_path / "umt5_descaled.safetensors", fast, PROMPTS[:1])
    torch.testing.assert_close(loaded.encoder.encode(PROMPTS[:1]).cond, expected, atol=1e-5, rtol=1e-5)


def test_umt5_and_t5_are_told_apart(tiny, tmp_path) -> None:
    t5 = {k: v for k, v in build_t5(TINY_UMT5).model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    write_safetensors(t5, tmp_path / "t5xxl.safetensors", {})
    umt5 = safetensors.torch.load_file(tiny)
    assert is_umt5(umt5) and not is_t5(umt5) and is_t5(t5) and not is_umt5(t5)
    assert look_of(umt5).kind == "umt5" and look_of(t5).kind == "t5"
    with pytest.raises(CheckpointError, match=r"t5xxl.safetensors: not UMT5-XXL, Wan's text encoder: it holds "
                                              r"T5-XXL \(Flux's and SD3's"):
        load_wan_text_encoder([tmp_path / "t5xxl.safetensors"])
    with pytest.raises(CheckpointError, match="Wan takes one UMT5-XXL text encoder file; got 2"):
        load_wan_text_encoder([tiny, tiny])
