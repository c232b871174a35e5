"""LTX-2's text encoder (ldm.ltx2_text): its features against diffusers' LTX2Pipeline prompt encoding
(`_get_gemma_prompt_embeds`: left padding to 1024 tokens, transformers' Gemma3TextModel built here from a config in
the Hub's form, all hidden states stacked) followed by diffusers' feature extractor (`per_layer_masked_mean_norm`)
and the projection; ComfyUI's tokenization (left padding, `<bos>`, no cut), its disabled prompt weights, the files and
the refusals."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import LTX2Pipeline
from diffusers.pipelines.ltx2.connectors import per_layer_masked_mean_norm, per_token_rms_norm
from transformers import Gemma3TextConfig, Gemma3TextModel
from transformers import GemmaTokenizer as HFGemmaTokenizer

from ldm.checkpoint import CheckpointError
from ldm.gemma_text import GemmaTokenizer, tiny_gemma_state
from ldm.ltx2_text import (
    MIN_LENGTH,
    PROJECTION_KEYS,
    is_gemma3,
    left_padded,
    load_ltx2_text_encoder,
    ltx2_text_encoder_from_state_dicts,
    projection_state,
    tiny_gemma3_state,
    tiny_projection_state,
    token_ids,
    write_tiny_gemma3,
)

HIDDEN, LAYERS = 32, 6  # six layers: five sliding-window ones and a global one (linear-scaled RoPE)
PROMPTS = ["a photo of a cat sitting on a red sofa", "an astronaut riding a horse on the moon, 日本の絵, 1920s style",
           "a watercolor landscape with mountains"]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return tiny_gemma3_state(seed=1, hidden=HIDDEN, layers=LAYERS)


@pytest.fixture(scope="module")
def projection() -> dict[str, torch.Tensor]:
    return tiny_projection_state(seed=2, hidden=HIDDEN, layers=LAYERS)


@pytest.fixture(scope="module")
def encoder(state, projection):
    return ltx2_text_encoder_from_state_dicts(state, projection, "gemma_3_12B_it.safetensors",
                                              "ltx-2-19b-dev.safetensors").encoder


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, state):
    folder = tmp_path_factory.mktemp("gemma3_tokenizer")
    (folder / "tokenizer.model").write_bytes(state["spiece_model"].numpy().tobytes())
    return HFGemmaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False)


@pytest.fixture(scope="module")
def reference(state) -> Gemma3TextModel:
    """transformers' Gemma3TextModel of the tiny weights, its config in the form of gemma-3-12b-it's text_config."""
    config = Gemma3TextConfig(vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=HIDDEN,
                              intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=HIDDEN // 2, query_pre_attn_scalar=HIDDEN // 2,
                              sliding_window=1024, sliding_window_pattern=6, rope_theta=1_000_000.0,
                              rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    model = Gemma3TextModel(config).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


def diffusers_features(reference, hf_tokenizer, projection, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """LTX2Pipeline._get_gemma_prompt_embeds (1024 tokens, padded left) then the LTX-2 feature extractor as diffusers'
    LTX2TextConnectors runs it before its connectors: per_layer_masked_mean_norm and the projection."""
    pipe = LTX2Pipeline(scheduler=None, vae=None, audio_vae=None, text_encoder=reference, tokenizer=hf_tokenizer,
                        connectors=None, transformer=None, vocoder=None)
    with torch.no_grad():
        embeds, mask = pipe._get_gemma_prompt_embeds(prompts, max_sequence_length=MIN_LENGTH, device="cpu",
                                                     dtype=torch.float32)
        normed = per_layer_masked_mean_norm(embeds.unflatten(2, (HIDDEN, -1)), mask.sum(dim=-1), "cpu", "left", 8)
    return F.linear(normed, projection[PROJECTION_KEYS[0] + "weight"]), mask


def test_features_match_diffusers_pipeline(encoder, reference, hf_tokenizer, projection):
    """Each prompt's features equal diffusers' on its tokens (max abs difference < 1e-5; measured 4.8e-7)."""
    theirs, their_mask = diffusers_features(reference, hf_tokenizer, projection, PROMPTS)
    ours = encoder.encode(PROMPTS)
    mask = ours.extra["attention_mask"]
    assert ours.pooled is None and mask.dtype == torch.int64 and ours.cond.dtype == torch.float32
    assert ours.cond.shape == (len(PROMPTS), int(mask.sum(dim=1).max()), HIDDEN)
    assert torch.equal(mask.sum(dim=1), their_mask.sum(dim=1))  # the same tokens
    for i in range(len(PROMPTS)):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and theirs[i, -n:].abs().max() > 0.1
        assert (ours.cond[i, :n] - theirs[i, -n:]).abs().max() < 1e-5
        assert not ours.cond[i, n:].any()  # zeros after the prompt


def test_ltx23_projection_matches_diffusers(state, reference, hf_tokenizer):
    """LTX-2.3's per-modality projection (video_aggregate_embed / audio_aggregate_embed, with biases) as diffusers'
    LTX2TextConnectors(per_modality_projections=True) runs it: per-token RMS norm, each stream's scaled input, the two
    side by side (< 1e-5)."""
    g = torch.Generator().manual_seed(5)
    features, widths = HIDDEN * (LAYERS + 1), {"video": 48, "audio": 24}
    keys = {part: f"text_embedding_projection.{part}_aggregate_embed." for part in widths}
    dual = {}
    for part, width in widths.items():
        dual[keys[part] + "weight"] = torch.randn(width, features, generator=g) / features**0.5
        dual[keys[part] + "bias"] = torch.randn(width, generator=g) / 10
    encoder = ltx2_text_encoder_from_state_dicts(state, dual, "gemma_3_12B_it.safetensors",
                                                 "ltx-2.3-22b-dev.safetensors").encoder
    pipe = LTX2Pipeline(scheduler=None, vae=None, audio_vae=None, text_encoder=reference, tokenizer=hf_tokenizer,
                        connectors=None, transformer=None, vocoder=None)
    with torch.no_grad():
        embeds, mask = pipe._get_gemma_prompt_embeds(PROMPTS, max_sequence_length=MIN_LENGTH, device="cpu",
                                                     dtype=torch.float32)
        normed = per_token_rms_norm(embeds.unflatten(2, (HIDDEN, -1))).flatten(2, 3)
        normed = torch.where(mask.bool().unsqueeze(-1), normed, torch.zeros_like(normed))
        theirs = torch.cat([F.linear(normed * (width / HIDDEN) ** 0.5, dual[keys[part] + "weight"],
                                     dual[keys[part] + "bias"]) for part, width in widths.items()], dim=-1)
        ours = encoder.encode(PROMPTS)
    assert ours.cond.shape[-1] == 72
    for i in range(len(PROMPTS)):
        n = int(ours.extra["attention_mask"][i].sum())
        assert (ours.cond[i, :n] - theirs[i, -n:]).abs().max() < 1e-5


def test_prompts_are_encoded_one_by_one(encoder):
    """A batch gives each prompt what it gives alone (ComfyUI encodes one prompt at a time); the empty prompt is
    `<bos>` alone."""
    batch = encoder.encode(PROMPTS + [""])
    for i, prompt in enumerate(PROMPTS + [""]):
        alone = encoder.encode([prompt])
        n = alone.cond.shape[1]
        assert torch.equal(alone.extra["attention_mask"], torch.ones(1, n, dtype=torch.long))
        torch.testing.assert_close(batch.cond[i, :n], alone.cond[0], rtol=0, atol=1e-6)
    assert encoder.encode("").cond.shape == (1, 1, HIDDEN)


def test_tokenization_as_comfyui(state, hf_tokenizer):
    """`<bos>` then the text tokenized whole, no end token; left-padded with `<pad>` to 1024 tokens, never cut."""
    tokenizer = GemmaTokenizer.from_tensor(state["spiece_model"])
    for text in [*PROMPTS, "  two  spaces\nand a newline 12345", "ünïcödé ✓", ""]:
        ids = token_ids(tokenizer, text)
        assert ids == hf_tokenizer(text).input_ids and ids[0] == 2 and 1 not in ids
        padded, mask = left_padded(ids)
        assert padded.shape == mask.shape == (1, MIN_LENGTH)
        assert padded[0, -len(ids):].tolist() == ids and not padded[0, :-len(ids)].any()
        assert mask[0].tolist() == [0] * (MIN_LENGTH - len(ids)) + [1] * len(ids)
    long = token_ids(tokenizer, "a photo of a cat, " * 150)
    assert len(long) > MIN_LENGTH
    padded, mask = left_padded(long)
    assert padded[0].tolist() == long and mask.all()


def test_long_prompt_is_not_cut(encoder, state):
    text = "a photo of a cat, " * 150
    n = len(token_ids(GemmaTokenizer.from_tensor(state["spiece_model"]), text))
    encoding = encoder.encode([text])
    assert n > MIN_LENGTH and encoding.cond.shape == (1, n, HIDDEN) and torch.isfinite(encoding.cond).all()


def test_prompt_weights_are_text(encoder, state):
    """ComfyUI disables prompt weights for LTX-2: `(cat:1.5)` is tokenized as written, `\\(` `\\)` are brackets."""
    tokenizer = GemmaTokenizer.from_tensor(state["spiece_model"])
    weighted = "a photo of a (cat:1.5)"
    assert token_ids(tokenizer, weighted) == [2, *tokenizer.encode(weighted)]
    assert token_ids(tokenizer, "a \\(cat\\)") == token_ids(tokenizer, "a (cat)")
    assert torch.equal(encoder.encode(["a \\(cat\\)"]).cond, encoder.encode(["a (cat)"]).cond)
    plain, bracketed = encoder.encode(["a photo of a cat"]).cond, encoder.encode([weighted]).cond
    assert bracketed.shape[1] > plain.shape[1]  # the brackets and the weight are tokens


def test_files_round_trip(tmp_path, encoder, state):
    """A tiny Gemma 3 file and an LTX-2 checkpoint (its projection beside other weights, which stay unread)."""
    gemma = write_tiny_gemma3(tmp_path / "gemma_3_12B_it.safetensors", seed=1, dtype=torch.float32, hidden=HIDDEN,
                              layers=LAYERS)
    ltx = tmp_path / "ltx-2-19b-dev.safetensors"
    safetensors.torch.save_file(tiny_projection_state(seed=2, hidden=HIDDEN, layers=LAYERS)
                                | {"model.diffusion_model.patchify_proj.weight": torch.zeros(4, 4)}, ltx)
    assert set(projection_state(ltx)) == {PROJECTION_KEYS[0] + "weight"}
    loaded = load_ltx2_text_encoder(gemma, ltx)
    assert loaded.unused_keys == [] and loaded.family == "ltx2"
    assert torch.equal(loaded.encoder.encode(PROMPTS).cond, encoder.encode(PROMPTS).cond)
    half = load_ltx2_text_encoder(write_tiny_gemma3(tmp_path / "gemma_fp16.safetensors", seed=1, hidden=HIDDEN,
                                                    layers=LAYERS), ltx, dtype=torch.float16)
    assert half.encoder.dtype == torch.float16 and half.encoder.encode(PROMPTS).cond.dtype == torch.float32


def test_layouts_taken(state, projection, encoder):
    """The LM head is knowingly unused (the vision tower, which only text generation reads, is
    tests/ldm/test_gemma3_vision.py's); ComfyUI's renamed projection key and a bias are read."""
    extra = {"lm_head.weight": torch.zeros(2)}
    renamed = {PROJECTION_KEYS[1] + "weight": projection[PROJECTION_KEYS[0] + "weight"]}
    loaded = ltx2_text_encoder_from_state_dicts(state | extra, renamed)
    assert loaded.unused_keys == []
    assert torch.equal(loaded.encoder.encode(PROMPTS).cond, encoder.encode(PROMPTS).cond)
    biased = renamed | {PROJECTION_KEYS[1] + "bias": torch.ones(HIDDEN)}
    shifted = ltx2_text_encoder_from_state_dicts(state, biased).encoder.encode(PROMPTS[:1]).cond
    torch.testing.assert_close(shifted, encoder.encode(PROMPTS[:1]).cond + 1)
    assert is_gemma3(state) and not is_gemma3(tiny_gemma_state())
    seeing = tiny_gemma3_state(seed=1, hidden=HIDDEN, layers=LAYERS, vision=True)
    loaded = ltx2_text_encoder_from_state_dicts(seeing, projection)
    assert loaded.unused_keys == [] and loaded.encoder.vision is not None
    assert torch.equal(loaded.encoder.encode(PROMPTS).cond, encoder.encode(PROMPTS).cond)  # text encoding unchanged
    assert encoder.vision is None


def test_refusals(state, projection):
    with pytest.raises(CheckpointError, match="without its tokenizer.*spiece_model"):
        ltx2_text_encoder_from_state_dicts({k: v for k, v in state.items() if k != "spiece_model"}, projection,
                                           "gemma_bare.safetensors")
    with pytest.raises(CheckpointError, match="gemma_2.safetensors: not Gemma 3: it holds Gemma 2"):
        ltx2_text_encoder_from_state_dicts(tiny_gemma_state(), projection, "gemma_2.safetensors")
    with pytest.raises(CheckpointError, match="ltx.safetensors: no LTX-2 text projection"):
        ltx2_text_encoder_from_state_dicts(state, {"model.diffusion_model.x": torch.zeros(1)}, "g", "ltx.safetensors")
    dual = {"text_embedding_projection.video_aggregate_embed.weight": torch.zeros(4, HIDDEN * (LAYERS + 1))}
    with pytest.raises(CheckpointError, match="LTX-2.3's video text projection without its audio one"):
        ltx2_text_encoder_from_state_dicts(state, dual)
    narrow = tiny_projection_state(hidden=HIDDEN, layers=LAYERS - 1)
    with pytest.raises(CheckpointError, match=r"does not take the Gemma's 224 features"):
        ltx2_text_encoder_from_state_dicts(state, narrow)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_norm.weight"}
    with pytest.raises(CheckpointError, match="Gemma 3 weights missing"):
        ltx2_text_encoder_from_state_dicts(missing, projection)


def test_fp8_weights_leave_the_projection_and_the_vision_tower_in_full_precision(state, projection):
    """--te-weights-dtype fp8 stores Gemma's layers in fp8, not the feature projection nor the vision tower, whose
    inputs are cast to their weights' dtype (in fp8 the prompt's features came out all zero)."""
    from ldm.ltx2_text import tiny_gemma3_state
    from ldm.quant import quantize_

    full = ltx2_text_encoder_from_state_dicts(tiny_gemma3_state(seed=1, hidden=HIDDEN, layers=LAYERS, vision=True),
                                              projection).encoder
    small = ltx2_text_encoder_from_state_dicts(tiny_gemma3_state(seed=1, hidden=HIDDEN, layers=LAYERS, vision=True),
                                               projection).encoder
    quantize_(small, "fp8")
    assert small.text_embedding_projection.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in small.vision.parameters())
    assert any(p.dtype == torch.float8_e4m3fn for p in small.gemma3_12b.parameters())
    with torch.no_grad():
        want, got = full.encode(PROMPTS[:1]).cond, small.encode(PROMPTS[:1]).cond
    assert got.abs().max() > 0.5 and (got - want).abs().max() < 0.5 * want.abs().max()
