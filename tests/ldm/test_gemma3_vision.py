"""Gemma 3's vision tower in LTX-2's text encoder (ldm.ltx2_text) and generation from a picture (ldm.textgen) on tiny
random weights: the soft tokens and greedy decoding against transformers' Gemma3ForConditionalGeneration (its config in
the form of gemma-3-12b-it's, the head tied; the picture's 256 `<image_soft_token>` ids in the prompt, no
token_type_ids: causal attention, as ComfyUI runs it) on the same weights, pixels and ids; ComfyUI's picture
preprocessing and prompt layout; the file layout; a file without the tower refusing a picture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.gemma_text import TOKENIZER_KEY
from ldm.ltx2_text import (
    IMAGE_TOKEN_ID,
    IMAGE_TOKENS,
    PROJECTOR_PREFIX,
    VISION_PREFIX,
    load_ltx2_text_encoder,
    ltx2_text_encoder_from_state_dicts,
    picture_token_ids,
    tiny_gemma3_state,
    tiny_projection_state,
    token_ids,
    write_tiny_gemma3,
)
from ldm.textgen import (
    GEMMA3_IMAGE_TEMPLATE,
    NO_VISION,
    Sampling,
    TextGenerationError,
    chat_lm,
    generate_ids,
    generate_text,
    ltx2_enhancement_prompt,
    reads_pictures,
)

HIDDEN, LAYERS = 32, 6  # five sliding-window layers and a global one
WIDTH, DEPTH, PATCH = 32, 2, 28  # tiny_gemma3_vision_state's tower: 32 x 32 patches of 896 pixels
PROMPT = "a red fox in the snow"
STEPS = 16


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return tiny_gemma3_state(seed=7, hidden=HIDDEN, layers=LAYERS, vision=True)


@pytest.fixture(scope="module")
def encoder(state):
    projection = tiny_projection_state(seed=8, hidden=HIDDEN, layers=LAYERS)
    return ltx2_text_encoder_from_state_dicts(state, projection).encoder


@pytest.fixture(scope="module")
def picture() -> torch.Tensor:
    torch.manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 12, 16), size=(360, 480), mode="bilinear")  # a picture, not noise
    return smooth.movedim(1, -1).clamp(0, 1)


@pytest.fixture(scope="module")
def reference(state) -> Gemma3ForConditionalGeneration:
    """transformers' Gemma3ForConditionalGeneration of the tiny weights, configured as gemma-3-12b-it is (its text
    config as tests/ldm/test_textgen_gemma3.py builds it, SigLIP's defaults, 256 soft tokens), the head tied."""
    text = Gemma3TextConfig(vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=HIDDEN,
                            intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=HIDDEN // 2, query_pre_attn_scalar=HIDDEN // 2,
                            sliding_window=1024, sliding_window_pattern=6, rope_theta=1_000_000.0,
                            rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                            pad_token_id=0, bos_token_id=2, eos_token_id=1)
    vision = SiglipVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH,
                                num_attention_heads=2, image_size=896, patch_size=PATCH, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, tie_word_embeddings=True,
                          pad_token_id=0, bos_token_id=2, eos_token_id=1)
    assert config.image_token_id == IMAGE_TOKEN_ID and config.text_config.final_logit_softcapping is None
    model = Gemma3ForConditionalGeneration(config).eval()
    renamed = {}
    for key, value in state.items():
        if key.startswith("model."):
            renamed["model.language_model." + key.removeprefix("model.")] = value
        elif key.startswith(VISION_PREFIX):
            renamed["model.vision_tower." + key.removeprefix(VISION_PREFIX)] = value
        elif key.startswith(PROJECTOR_PREFIX):
            renamed["model.multi_modal_projector." + key.removeprefix(PROJECTOR_PREFIX)] = value
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model


def expanded(ids: list[int]) -> list[int]:
    """The ids transformers' processor would give: the picture's slot as its 256 `<image_soft_token>` ids."""
    at = ids.index(IMAGE_TOKEN_ID)
    return ids[:at] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS + ids[at + 1:]


def reference_greedy(model, ids: list[int], pixels: torch.Tensor, steps: int, stops) -> list[int]:
    ids = expanded(ids)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         pixel_values=pixels, do_sample=False, max_new_tokens=steps, eos_token_id=sorted(stops),
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_soft_tokens_match_transformers(encoder, reference, picture) -> None:
    pixels = encoder.vision.pixels(picture)
    ours = encoder.picture_tokens(picture)
    theirs = reference.model.get_image_features(pixels).pooler_output[0]
    assert ours.shape == (IMAGE_TOKENS, HIDDEN)
    assert (ours - theirs).abs().max() < 1e-5  # measured 0 (the same modules on the same pixels)
    assert ours.std() > 0.1  # not collapsed by the tiny weights


def test_first_step_logits_match_transformers(encoder, reference, picture) -> None:
    lm = chat_lm(encoder)
    ids = lm.prompt_ids(PROMPT, image=True)
    with torch.inference_mode():
        theirs = reference(input_ids=torch.tensor([expanded(ids)]),
                           pixel_values=encoder.vision.pixels(picture)).logits[0, -1]
        states = lm.model(inputs_embeds=_embeds(lm, ids, picture)).last_hidden_state[0, -1]
    ours = F.linear(states, lm.head)
    assert (ours - theirs).abs().max() < 1e-5  # measured 0 (the same computation in the same order)


def _embeds(lm, ids: list[int], picture: torch.Tensor) -> torch.Tensor:
    at = ids.index(IMAGE_TOKEN_ID)
    embed = lm.model.embed_tokens
    return torch.cat([embed(torch.tensor([ids[:at]])), lm.see(picture)[None], embed(torch.tensor([ids[at + 1:]]))], 1)


def test_greedy_with_a_picture_equals_transformers_generate(encoder, reference, picture) -> None:
    lm = chat_lm(encoder)
    pixels = encoder.vision.pixels(picture)
    ids = lm.prompt_ids(PROMPT, image=True)
    written = generate_ids(lm, ids, STEPS, image=picture)
    assert len(written) == STEPS  # random weights write no end token this soon
    assert written == reference_greedy(reference, ids, pixels, STEPS, lm.stop_ids)
    assert written != generate_ids(lm, lm.prompt_ids(PROMPT), STEPS)  # the picture is read
    assert generate_text(encoder, PROMPT, STEPS, image=picture) == encoder.tokenizer.processor.decode(written)
    dark = generate_ids(lm, ids, STEPS, image=torch.zeros_like(picture))
    assert dark == reference_greedy(reference, ids, encoder.vision.pixels(torch.zeros_like(picture)), STEPS,
                                    lm.stop_ids)


def test_ltx2_image_to_video_prompt_past_the_sliding_window(encoder, reference, picture) -> None:
    lm = chat_lm(encoder)
    ids = lm.prompt_ids(ltx2_enhancement_prompt(PROMPT, image=True), image=True)
    assert ids.count(IMAGE_TOKEN_ID) == 1 and len(ids) > 1024  # the tiny tokenizer spends more on it than Gemma 3's
    written = generate_ids(lm, ids, 4, image=picture)
    assert written == reference_greedy(reference, ids, encoder.vision.pixels(picture), 4, lm.stop_ids)


def test_comfyuis_prompt_layout(encoder) -> None:
    lm = chat_lm(encoder)
    tokenizer = encoder.tokenizer
    assert GEMMA3_IMAGE_TEMPLATE.format(PROMPT) == (
        "<start_of_turn>system\nYou are a helpful assistant.<end_of_turn>\n<start_of_turn>user\n\n<image_soft_token>"
        f"{PROMPT}<end_of_turn>\n\n<start_of_turn>model\n")
    ids = lm.prompt_ids(PROMPT, image=True)
    at = ids.index(IMAGE_TOKEN_ID)
    before = "<start_of_turn>system\nYou are a helpful assistant.<end_of_turn>\n<start_of_turn>user\n\n"
    assert ids[:at] == token_ids(tokenizer, before)
    assert ids[at + 1:] == tokenizer.encode(f"{PROMPT}<end_of_turn>\n\n<start_of_turn>model\n")
    chat = ltx2_enhancement_prompt(PROMPT, image=True)
    assert lm.prompt_ids(chat, image=True) == picture_token_ids(tokenizer, chat)  # templated: kept as it is
    # a prompt without the marker leaves the picture unread, as ComfyUI does
    assert lm.prompt_ids(PROMPT, image=True, use_default_template=False) == token_ids(tokenizer, PROMPT)
    assert lm.prompt_ids(PROMPT) == token_ids(tokenizer, PROMPT.join(
        ("<start_of_turn>system\nYou are a helpful assistant.<end_of_turn>\n<start_of_turn>user\n",
         "<end_of_turn>\n<start_of_turn>model\n")))  # text prompts as before


def test_sampling_with_a_picture_is_seeded(encoder, picture) -> None:
    sampling = Sampling(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0, repetition_penalty=1.2, seed=3)
    first = generate_text(encoder, PROMPT, 10, sampling, image=picture)
    assert first == generate_text(encoder, PROMPT, 10, sampling, image=picture)


def test_preprocessing_is_comfyuis(encoder) -> None:
    torch.manual_seed(1)
    small = (torch.rand(1, 448, 448, 3) * 255).round() / 255
    pixels = encoder.vision.pixels(small)
    # "area" doubles a 448-pixel picture to 896 (each pixel 2 x 2), which is the tower's size: nothing else moves
    doubled = small.movedim(-1, 1).repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert pixels.shape == (1, 3, 896, 896) and (pixels - (doubled * 2 - 1)).abs().max() < 1e-6
    wide = torch.rand(2, 300, 700, 4)
    rgb = encoder.vision.pixels(wide[..., :3])
    assert torch.equal(encoder.vision.pixels(wide), rgb)  # alpha dropped; the first picture of a batch
    assert torch.equal(encoder.vision.pixels(wide[:1]), rgb) and rgb.shape == (1, 3, 896, 896)


def test_file_layout_round_trip(tmp_path, state, encoder, picture) -> None:
    path = write_tiny_gemma3(tmp_path / "gemma_3_12B_it.safetensors", seed=7, dtype=torch.float32, hidden=HIDDEN,
                             layers=LAYERS, vision=True)
    projection = tmp_path / "ltx.safetensors"
    write_safetensors(tiny_projection_state(seed=8, hidden=HIDDEN, layers=LAYERS), projection, {})
    loaded = load_ltx2_text_encoder(path, projection)
    assert loaded.unused_keys == []
    assert torch.equal(loaded.encoder.picture_tokens(picture), encoder.picture_tokens(picture))
    keys = {k for k in state if k.startswith((VISION_PREFIX, PROJECTOR_PREFIX))}
    assert f"{VISION_PREFIX}encoder.layers.1.self_attn.out_proj.weight" in keys
    assert f"{VISION_PREFIX}post_layernorm.weight" in keys
    assert keys >= {f"{PROJECTOR_PREFIX}mm_input_projection_weight", f"{PROJECTOR_PREFIX}mm_soft_emb_norm.weight"}
    text_only = tiny_gemma3_state(seed=7, hidden=HIDDEN, layers=LAYERS)
    assert all(torch.equal(state[k], v) for k, v in text_only.items())  # the option leaves the rest as it was
    assert set(state) - set(text_only) == keys


def test_a_file_without_the_tower_refuses_a_picture(state, encoder, picture) -> None:
    assert reads_pictures(encoder)
    text_only = {k: v for k, v in state.items() if not k.startswith((VISION_PREFIX, PROJECTOR_PREFIX))}
    blind = ltx2_text_encoder_from_state_dicts(text_only, tiny_projection_state(hidden=HIDDEN, layers=LAYERS)).encoder
    assert blind.vision is None and not reads_pictures(blind)
    with pytest.raises(TextGenerationError) as error:
        generate_text(blind, PROMPT, 4, image=picture)
    assert str(error.value) == NO_VISION and "no vision tower" in NO_VISION
    assert generate_text(blind, PROMPT, 4) == generate_text(encoder, PROMPT, 4)  # text as before


def test_broken_towers_are_refused(state) -> None:
    projection = tiny_projection_state(hidden=HIDDEN, layers=LAYERS)
    without = {k: v for k, v in state.items() if k != f"{PROJECTOR_PREFIX}mm_soft_emb_norm.weight"}
    with pytest.raises(CheckpointError, match="g.safetensors: 1 Gemma 3 multi-modal projector weights missing"):
        ltx2_text_encoder_from_state_dicts(without, projection, "g.safetensors")
    narrow = state | {f"{PROJECTOR_PREFIX}mm_input_projection_weight": torch.zeros(WIDTH, HIDDEN // 2)}
    with pytest.raises(CheckpointError, match="projector weights of the wrong shape"):
        ltx2_text_encoder_from_state_dicts(narrow, projection, "g.safetensors")
    odd = state | {f"{VISION_PREFIX}embeddings.position_embedding.weight": torch.zeros(20 * 20, WIDTH),
                   f"{VISION_PREFIX}embeddings.patch_embedding.weight": torch.zeros(WIDTH, 3, 14, 14)}
    with pytest.raises(CheckpointError, match="20 x 20 patches, which do not pool to 16 x 16"):
        ltx2_text_encoder_from_state_dicts(odd, projection, "g.safetensors")
    assert TOKENIZER_KEY in state
