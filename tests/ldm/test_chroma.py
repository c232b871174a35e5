"""Chroma's transformer against diffusers' ChromaTransformer2DModel (weights renamed by diffusers' own single-file
converter), its config read from the weights, its files, and its text encoding against transformers' T5."""

from __future__ import annotations

import pytest
import torch
from transformers import T5EncoderModel

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.chroma import ChromaConfig, chroma_config_from_state_dict, is_chroma
from ldm.chroma_files import (
    is_chroma_file,
    load_chroma_text_encoder,
    load_chroma_unet,
    make_chroma_files,
    peek_chroma,
)
from ldm.flux import is_flux
from ldm.t5 import END_TOKEN, T5Tokenizer
from tests.ldm.chroma_reference import TINY_CHROMA, diffusers_call, diffusers_twin, random_chroma


@pytest.fixture(scope="module")
def model():
    return random_chroma(TINY_CHROMA, seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_chroma_files(tmp_path_factory.mktemp("chroma"), dtype=torch.float32)


def _inputs(batch: int = 2, h: int = 8, w: int = 6, tokens: int = 5):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 16, h, w, generator=g), torch.tensor([0.9, 0.3][:batch]),
            torch.randn(batch, tokens, TINY_CHROMA.context_dim, generator=g))


def test_matches_diffusers_transformer(model) -> None:
    x, sigma, context = _inputs()
    reference = diffusers_twin(model)
    with torch.no_grad():
        ours = model(x, sigma, context)
    theirs = diffusers_call(reference, x, sigma, context)
    assert ours.shape == x.shape
    assert ours.abs().mean() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_text_mask_matches_diffusers_and_drops_the_masked_tokens(model) -> None:
    x, sigma, context = _inputs()
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    reference = diffusers_twin(model)
    with torch.no_grad():
        ours = model(x, sigma, context, attention_mask=mask)
        changed = context.clone()
        changed[0, 3:] += 5.0
        changed[1, 4] -= 3.0
        again = model(x, sigma, changed, attention_mask=mask)
        unmasked = model(x, sigma, context)
    torch.testing.assert_close(ours, diffusers_call(reference, x, sigma, context, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=1e-6)  # masked tokens count for nothing
    assert (unmasked - ours).abs().max() > 1e-3


def test_odd_sizes_are_padded_and_cropped(model) -> None:
    x, sigma, context = _inputs(1, 7, 5)
    with torch.no_grad():
        out = model(x, sigma, context)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_config_is_read_from_the_weights(model) -> None:
    sd = model.state_dict()
    # BFL's layout: Flux's own probe keys are there too, so loaders must ask is_chroma first.
    assert is_chroma(sd) and is_flux(sd)
    assert not any(".mod" in k or "modulation" in k or k.startswith(("vector_in", "time_in")) for k in sd)
    assert chroma_config_from_state_dict(sd) == TINY_CHROMA
    assert ChromaConfig().modulations == 344  # Chroma1-HD: 3 * 38 + 12 * 19 + 2, ComfyUI's mod_index_length
    with pytest.raises(ValueError, match="no weight 'txt_in.weight'"):
        chroma_config_from_state_dict({k: v for k, v in sd.items() if k != "txt_in.weight"})


def test_files_load_bare_or_prefixed(files, tmp_path) -> None:
    loaded = load_chroma_unet(files["unet"])
    assert loaded.family.name == "chroma" and loaded.family.unet_config == TINY_CHROMA
    assert loaded.family.shift == 1.15 and not loaded.unused_keys
    assert peek_chroma(files["unet"]) == loaded.family and is_chroma_file(files["unet"])
    assert not is_chroma_file(files["t5xxl"]) and peek_chroma(files["vae"]) is None
    prefixed = tmp_path / "chroma-prefixed.safetensors"
    write_safetensors({"model.diffusion_model." + k: v for k, v in loaded.unet.state_dict().items()}, prefixed, {})
    again = load_chroma_unet(prefixed)
    x, sigma, context = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(again.unet(x, sigma, context), loaded.unet(x, sigma, context))


def test_wrong_files_are_refused(files) -> None:
    with pytest.raises(CheckpointError, match="not a Chroma diffusion model"):
        load_chroma_unet(files["t5xxl"])
    with pytest.raises(CheckpointError, match="not a T5-XXL text encoder"):
        load_chroma_text_encoder([files["unet"]])


def test_text_encoding_is_t5_on_the_unpadded_tokens(files) -> None:
    """ComfyUI's Chroma/PixArt tokenization: the prompt's tokens and the end token, no padding; the hidden states
    are transformers' T5EncoderModel's on those ids, and the real tokens' rows equal a padded, masked run's (as
    diffusers' ChromaPipeline encodes)."""
    encoder = load_chroma_text_encoder([files["t5xxl"]]).encoder
    prompt = "a red fox in the snow"
    cond = encoder.encode([prompt]).cond
    ids = T5Tokenizer().tokenize(prompt).ids
    assert ids[-1] == END_TOKEN and cond.shape[1] == len(ids)
    hf = T5EncoderModel(encoder.t5xxl.model.config)
    hf.load_state_dict(encoder.t5xxl.model.state_dict())
    hf.eval()
    padded = torch.tensor([ids + [0] * 7])
    mask = torch.tensor([[1] * len(ids) + [0] * 7])
    with torch.no_grad():
        plain = hf(input_ids=torch.tensor([ids])).last_hidden_state
        masked = hf(input_ids=padded, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(cond, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond, masked[:, :len(ids)], atol=1e-5, rtol=1e-5)
    assert encoder.encode([prompt]).pooled is None


def test_bfloat16_follows_float32(model) -> None:
    """The approximator's inputs are made in float32 and cast: a bf16 copy stays near the fp32 prediction."""
    x, sigma, context = _inputs()
    half = random_chroma(TINY_CHROMA, seed=3).to(torch.bfloat16)
    with torch.no_grad():
        full, low = model(x, sigma, context), half(x, sigma, context)
    assert low.dtype == x.dtype
    assert (low - full).abs().mean() < 0.03 * full.abs().mean()
