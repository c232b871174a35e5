"""LTX-Video's T5-XXL encoding (ldm.ltxv_text) against diffusers' masked T5 procedure (MochiPipeline's, which
ComfyUI's LTXV text encoder shares) and LTXPipeline's mask, on transformers' T5EncoderModel with the same weights."""

from __future__ import annotations

import gzip

import pytest
import safetensors.torch
import torch
from diffusers import LTXPipeline, MochiPipeline
from transformers import T5EncoderModel, T5TokenizerFast

from ldm.checkpoint import CheckpointError
from ldm.flux_presets import TINY_T5
from ldm.ltxv_files import TINY_LTXV
from ldm.ltxv_presets import make_ltxv_files
from ldm.ltxv_text import ATTENTION_MASK, LTXV_MIN_LENGTH, load_ltxv_text_encoder
from ldm.t5 import T5Tokenizer
from ldm.tokenizer import DATA_DIR
from ldm.umt5 import write_tiny_umt5

PROMPTS = ["a red fox running through the snow, slow motion", "waves on a beach at sunset"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_ltxv_files(tmp_path_factory.mktemp("models"), seed=5, dtype=torch.float32)


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> T5TokenizerFast:
    """transformers' T5TokenizerFast (the diffusers pipelines' tokenizer class) on the vocabulary Loom bundles."""
    path = tmp_path_factory.mktemp("t5") / "tokenizer.json"
    path.write_bytes(gzip.decompress((DATA_DIR / "t5_tokenizer.json.gz").read_bytes()))
    return T5TokenizerFast(tokenizer_file=str(path))


@pytest.fixture(scope="module")
def reference(files) -> T5EncoderModel:
    model = T5EncoderModel(TINY_T5.transformers_config()).eval()
    state = safetensors.torch.load_file(files["t5xxl"])
    model.load_state_dict({**state, "encoder.embed_tokens.weight": state["shared.weight"]})
    return model


def _mochi(reference, fast, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' MochiPipeline._get_t5_prompt_embeds: pad to 128, encode with the attention mask, keep the padded
    positions' states."""
    pipeline = MochiPipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=fast, transformer=None)
    with torch.no_grad():
        return pipeline._get_t5_prompt_embeds(prompts, max_sequence_length=LTXV_MIN_LENGTH, device=torch.device("cpu"))


def test_states_and_mask_match_the_masked_t5_procedure(files, fast, reference) -> None:
    loaded = load_ltxv_text_encoder([files["t5xxl"]])
    assert loaded.unused_keys == [] and loaded.family == "ltxv"
    encoding = loaded.encoder.encode(PROMPTS)
    states, mask = _mochi(reference, fast, PROMPTS)
    ours = encoding.extra[ATTENTION_MASK]
    assert encoding.pooled is None and encoding.cond.shape == (2, 128, TINY_LTXV.caption_channels)
    assert ours.dtype == torch.int64 and ours.shape == (2, 128)
    assert torch.equal(ours.bool(), mask)
    lengths = [len(T5Tokenizer().tokenize(p).ids) for p in PROMPTS]  # the words' tokens and the end token
    assert ours.sum(1).tolist() == lengths
    torch.testing.assert_close(encoding.cond, states, atol=1e-5, rtol=1e-5)
    assert encoding.cond[0, lengths[0]:].ne(0).any(-1).all()  # the padded positions' states are kept, not zeroed


def test_ltx_pipeline_gives_the_same_mask_but_encodes_unmasked(files, fast, reference) -> None:
    """diffusers' LTXPipeline pads to 128 and returns the same mask, but runs T5 without it (ComfyUI masks)."""
    pipeline = LTXPipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=fast, transformer=None)
    with torch.no_grad():
        states, mask = pipeline._get_t5_prompt_embeds(PROMPTS, max_sequence_length=128, device=torch.device("cpu"))
    encoding = load_ltxv_text_encoder([files["t5xxl"]]).encoder.encode(PROMPTS)
    assert torch.equal(encoding.extra[ATTENTION_MASK].bool(), mask)
    with torch.no_grad():
        unmasked = reference(input_ids=fast(PROMPTS, padding="max_length", max_length=128,
                                            return_tensors="pt").input_ids).last_hidden_state
    torch.testing.assert_close(states, unmasked, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(encoding.cond, states, atol=1e-3)


def test_long_prompts_are_never_cut(files) -> None:
    long = "fox " * 150
    encoding = load_ltxv_text_encoder([files["t5xxl"]]).encoder.encode(["a cat", long])
    mask = encoding.extra[ATTENTION_MASK]
    length = len(T5Tokenizer().tokenize(long).ids)
    assert length > 150 and encoding.cond.shape[1] == mask.shape[1] == length
    assert mask[1].all() and mask[0].sum() == len(T5Tokenizer().tokenize("a cat").ids)


def test_prompt_weights_as_comfyui_applies_them(files, fast, reference) -> None:
    """A weighted token: z_empty + w * (z - z_empty), z_empty the masked empty prompt's states; the others exact."""
    z, z_empty = _mochi(reference, fast, ["a red fox", ""])[0].split(1)
    first = len(T5Tokenizer().tokenize("a").ids) - 1
    count = len(T5Tokenizer().tokenize("red").ids) - 1
    expected = z.clone()
    span = slice(first, first + count)
    expected[0, span] = z_empty[0, span] + 1.5 * (z - z_empty)[0, span]
    encoding = load_ltxv_text_encoder([files["t5xxl"]]).encoder.encode(["a (red:1.5) fox"])
    torch.testing.assert_close(encoding.cond, expected, atol=1e-5, rtol=1e-5)
    assert encoding.extra[ATTENTION_MASK].shape == (1, 128)


def test_refuses_other_text_encoders(tmp_path, files) -> None:
    umt5 = write_tiny_umt5(tmp_path / "umt5_xxl-tiny.safetensors", dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"umt5_xxl-tiny.safetensors: not T5-XXL.*UMT5-XXL, Wan's.*type wan"):
        load_ltxv_text_encoder([umt5])
    with pytest.raises(CheckpointError, match="no LTX-Video transformer|not T5-XXL"):
        load_ltxv_text_encoder([files["checkpoint"]])
    with pytest.raises(CheckpointError, match="takes one T5-XXL text encoder file; got 2"):
        load_ltxv_text_encoder([files["t5xxl"], files["t5xxl"]])
