"""Qwen-Image 2.1's text encoder (ldm.qwen3vl_text) against diffusers' QwenImage21Pipeline._get_qwen_prompt_embeds on
transformers' Qwen3VLForConditionalGeneration with the same tiny weights (loaded the transformers way, from the
file renamed to transformers' names) and a Qwen3VLProcessor made of the bundled tokenizer, Qwen2-VL's image
processor with Qwen3-VL's settings and Qwen3-VL's chat template reduced to its system turn: prompt ids, the dropped
system turn, the vision tower, pre-norm states with image pads kept or removed, image slots."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import QwenImage21Pipeline
from PIL import Image
from transformers import Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from ldm.checkpoint import CheckpointError
from ldm.qwen3vl_text import (
    IMAGE_SLOTS,
    SYSTEM_PROMPT,
    canonical,
    image_processor,
    is_qwen3vl,
    load_qwen21_text_encoder,
    mrope_section,
    over_white,
    preprocess,
    prompt_text,
    system_length,
    text_kind,
    tiny_qwen3vl_state,
    tokenize,
    write_tiny_qwen3vl,
)
from ldm.qwen_text import ATTENTION_MASK, VOCAB_FILE, tiny_qwen25_state
from ldm.qwen_vl import IMAGE_PAD, eight_bit, expand_image_pads

# Qwen3-VL's chat_template.jinja, the branch the pipeline renders to count the system turn's tokens.
SYSTEM_TEMPLATE = ("{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
                   "{%- for content in messages[0].content %}{{- content.text }}{%- endfor %}"
                   "{{- '<|im_end|>\\n' }}{%- endif %}")
PROMPTS = ["a red fox in the snow", "夕阳下的城市, neon signs"]
CPU = torch.device("cpu")


class PicturesOnlyProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor (transformers' video processors need torchvision, which Loom does
    not install)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument_name == "video_processor" else super().check_argument_for_proper_class(
            argument_name, argument)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_qwen3vl(tmp_path_factory.mktemp("q3vl") / "qwen3vl_8b_bf16.safetensors", seed=7)


@pytest.fixture(scope="module")
def encoder(tiny):
    loaded = load_qwen21_text_encoder([tiny])
    assert loaded.unused_keys == []  # the final norm and the LM head are known and skipped
    return loaded.encoder


@pytest.fixture(scope="module")
def reference(tiny) -> Qwen3VLForConditionalGeneration:
    """transformers' Qwen3-VL at the tiny file's sizes, its weights loaded under transformers' own names."""
    text = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=262144,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision)).eval()
    state = safetensors.torch.load_file(tiny)
    renamed = {("model.language_model." + k.removeprefix("model.") if k.startswith("model.")
                and not k.startswith("model.visual.") else k): v for k, v in state.items()}
    model.load_state_dict(renamed, strict=True)
    return model


@pytest.fixture(scope="module")
def pipeline(reference) -> QwenImage21Pipeline:
    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        spec = json.load(f)
    vocab = spec["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in vocab["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab["vocab"], merges=merges)
    added = sorted(spec["added_tokens"], key=lambda token: token["id"])  # in id order, so that the ids match
    tokenizer.add_special_tokens({"additional_special_tokens": [token["content"] for token in added]})
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD
    processor = PicturesOnlyProcessor(image_processor=image_processor(), tokenizer=tokenizer, video_processor=None,
                                      chat_template=SYSTEM_TEMPLATE)
    return QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=reference, processor=processor,
                               transformer=None)


def picture(height: int, width: int, seed: int, channels: int = 3) -> torch.Tensor:
    """An IMAGE [1, H, W, C] in 0..1: smooth colours and some noise."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    smooth = torch.stack([x, y, (x + y) / 2, 1 - x * y][:channels], -1)
    return (smooth * 0.8 + torch.rand(height, width, channels, generator=generator) * 0.2).clamp(0, 1)[None]


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(eight_bit(image[0]))


def test_prompts_are_diffusers(pipeline) -> None:
    assert pipeline.sys_prompt == SYSTEM_PROMPT
    assert prompt_text("x") == pipeline.prompt_template_t2i.format("x")
    assert prompt_text("x", 1) == pipeline.prompt_template_ti2i.format("x")
    assert prompt_text("", 2) == pipeline.prompt_template_ti2i.replace(
        "<|vision_end|>", "<|vision_end|> <image2><|vision_start|><|image_pad|><|vision_end|>").format(" ")
    assert system_length() == pipeline._drop_idx == 14
    assert prompt_text("a \\(b\\)") == prompt_text("a (b)")  # ComfyUI's bracket escapes undone
    assert mrope_section(128) == [24, 20, 20]  # Qwen3-VL-8B's


def test_token_ids_are_the_processors(pipeline) -> None:
    images = [picture(256, 320, 0), picture(288, 256, 1)]
    sizes = (preprocess(images)[1].prod(-1) // 4).tolist()
    assert sizes == [8 * 10, 9 * 8]  # one token per 32 x 32 pixels
    ids = expand_image_pads(tokenize(PROMPTS[1], 2), sizes)
    text = prompt_text(PROMPTS[1], 2)
    assert ids == pipeline.processor(text=[text], images=[pil(im) for im in images]).input_ids[0]
    assert tokenize(PROMPTS[0]) == pipeline.processor(text=[prompt_text(PROMPTS[0])]).input_ids[0]


def test_preprocessing_is_qwen3vl(pipeline) -> None:
    """Patches of 16 pixels, 2 equal frames, normalised with mean and std 0.5; pictures under 256 x 256 pixels in
    area are enlarged (the processor's minimum)."""
    image = picture(256, 288, 3)
    pixels, grid = preprocess([image])
    assert grid.tolist() == [[1, 16, 18]] and pixels.shape == (16 * 18, 3 * 2 * 16 * 16)
    first = pixels[0].view(3, 2, 16, 16)
    expected = torch.from_numpy(eight_bit(image[0])[:16, :16]).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(first[:, 0], expected)
    torch.testing.assert_close(first[:, 1], expected)
    assert preprocess([picture(64, 96, 4)])[1].tolist() == [[1, 14, 20]]


def test_alpha_over_white_is_diffusers() -> None:
    image = picture(64, 64, 5, channels=4)
    rgba = Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy(), "RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))  # QwenImage21Pipeline's compositing
    ours = eight_bit(over_white(image)).astype(np.int16)
    assert np.abs(ours - np.asarray(white, dtype=np.int16)).max() <= 1


def test_vision_tower_matches_transformers(encoder, reference) -> None:
    pixels, grid = preprocess([picture(256, 320, 0), picture(288, 256, 1)])
    with torch.no_grad():
        ours = encoder.qwen3vl_8b.visual(pixels, grid_thw=grid)
        theirs = reference.model.visual(pixels, grid_thw=grid)
    assert ours.pooler_output.shape == (80 + 72, 32) and len(ours.deepstack_features) == 2
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours.deepstack_features, theirs.deepstack_features, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_text_states_are_diffusers(encoder, pipeline, reference) -> None:
    with torch.no_grad():
        states, mask, pads = pipeline._get_qwen_prompt_embeds(PROMPTS + [""], device=CPU)
        normed = reference.model(input_ids=torch.tensor([tokenize(PROMPTS[0])])).last_hidden_state
    ours = encoder.encode(PROMPTS + [""])
    assert not pads.any() and IMAGE_SLOTS not in ours.extra
    assert torch.equal(ours.extra[ATTENTION_MASK], mask)
    torch.testing.assert_close(ours.cond, states, atol=1e-5, rtol=1e-5)
    # the states before the final norm, not the model's normed output
    assert not torch.allclose(ours.cond[0, :normed.shape[1] - 14], normed[0, 14:], atol=1e-2)


def test_image_states_are_diffusers(encoder, pipeline) -> None:
    images = [picture(256, 320, 0), picture(288, 256, 1)]
    with torch.no_grad():
        states, mask, pads = pipeline._get_qwen_prompt_embeds(PROMPTS, image=[pil(im) for im in images], device=CPU)
    kept = encoder.encode(PROMPTS, images=images, keep_vision=True)
    torch.testing.assert_close(kept.cond, states, atol=1e-5, rtol=1e-5)
    assert torch.equal(kept.extra[ATTENTION_MASK], mask)
    # "user\n" and <image1> (7 tokens), <|vision_start|>; 80 pads, <|vision_end|>, " <image2>" (4), <|vision_start|>
    assert kept.extra[IMAGE_SLOTS].tolist() == [[8, 8 + 80 + 6]] * 2
    removed = encoder.encode(PROMPTS, images=images)
    assert removed.extra[IMAGE_SLOTS].tolist() == [[8, 14]] * 2
    for i in range(2):
        expected = states[i][mask[i].bool() & ~pads[i]]
        assert int(removed.extra[ATTENTION_MASK][i].sum()) == len(expected)
        torch.testing.assert_close(removed.cond[i, :len(expected)], expected, atol=1e-5, rtol=1e-5)
        assert not removed.cond[i, len(expected):].any()
        slots = pads[i].nonzero()[:, 0]
        assert slots[0] == 8 and slots[80] == 8 + 80 + 6  # where the pads stood in diffusers' states


def test_layouts_and_detection(tiny, tmp_path) -> None:
    state = safetensors.torch.load_file(tiny)
    assert is_qwen3vl(state) and text_kind(state) == "qwen3vl_8b"
    hf = {("model.language_model." + k[6:] if k.startswith("model.") and not k.startswith("model.visual.") else k): v
          for k, v in state.items()}
    flat = {k.removeprefix("model.") if k.startswith("model.visual.") else k: v for k, v in state.items()}
    assert canonical(hf) == {k: k for k in hf if k != "lm_head.weight"}
    assert canonical(flat).keys() == canonical(state).keys() == canonical(hf).keys()
    assert is_qwen3vl(hf) and is_qwen3vl(flat)
    assert not is_qwen3vl(tiny_qwen25_state())  # Qwen2.5-VL: no q/k norms, no DeepStack
    text_only = {k: v for k, v in tiny_qwen3vl_state().items() if not k.startswith("model.visual.")}
    assert not is_qwen3vl(text_only)
    path = tmp_path / "text_only.safetensors"
    safetensors.torch.save_file(text_only, path)
    with pytest.raises(CheckpointError, match="not Qwen3-VL-8B"):
        load_qwen21_text_encoder([path])


def test_hf_layout_loads_the_same(tiny, tmp_path, encoder) -> None:
    state = safetensors.torch.load_file(tiny)
    hf = {("model.language_model." + k[6:] if k.startswith("model.") and not k.startswith("model.visual.") else k): v
          for k, v in state.items()}
    path = tmp_path / "hf.safetensors"
    safetensors.torch.save_file(hf, path)
    loaded = load_qwen21_text_encoder([path])
    assert loaded.unused_keys == []
    torch.testing.assert_close(loaded.encoder.encode(PROMPTS[:1]).cond, encoder.encode(PROMPTS[:1]).cond)


def test_text_generation_equals_transformers_generate(encoder, reference) -> None:
    """TextGenerate on Qwen-Image 2.1's encoder (ldm.textgen: its language model with the final norm put back and
    its head) writes, greedily, the tokens transformers' Qwen3VLForConditionalGeneration.generate writes."""
    from ldm.textgen import QWEN_STOPS, chat_lm, generate_ids

    lm = chat_lm(encoder)
    ids = lm.prompt_ids("a red fox in the snow")
    ours = generate_ids(lm, ids, 16)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=16, eos_token_id=sorted(QWEN_STOPS),
                                    pad_token_id=min(QWEN_STOPS))[0, len(ids):].tolist()
    assert len(ours) == 16 and ours == theirs


def test_text_generation_with_fp8_weights(tiny) -> None:
    """--te-weights-dtype fp8 stores the LM head in fp8 too: generation reads it back in full precision."""
    from ldm.quant import quantize_
    from ldm.textgen import generate_text

    encoder = quantize_(load_qwen21_text_encoder([tiny], dtype=torch.bfloat16).encoder, "fp8")
    assert encoder.lm_head.weight.dtype == torch.float8_e4m3fn
    assert isinstance(generate_text(encoder, "a red fox", max_length=4), str)
