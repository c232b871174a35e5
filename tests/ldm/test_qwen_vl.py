"""Qwen-Image-Edit's image-aware prompts (ldm.qwen_vl): the vision tower and the prompt states against diffusers'
QwenImageEditPipeline / QwenImageEditPlusPipeline.encode_prompt on transformers' Qwen2_5_VLForConditionalGeneration
with the same tiny weights and a Qwen2VLProcessor made of the bundled tokenizer and Qwen2-VL's image processor; the
template's token ids against the processor's; a file without a vision tower."""

from __future__ import annotations

import json
import lzma

import pytest
import safetensors.torch
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

from ldm.checkpoint import CheckpointError
from ldm.qwen_text import ATTENTION_MASK, VOCAB_FILE, load_qwen_image_text_encoder, write_tiny_qwen25vl
from ldm.qwen_vl import (
    EDIT_PLUS_TEMPLATE,
    EDIT_TEMPLATE,
    PICTURE,
    VISION_BLOCK,
    eight_bit,
    expand_image_pads,
    image_processor,
    image_prompt_ids,
    mrope_section,
    preprocess,
    with_image_placeholders,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PROMPTS = ["make the fox red", "turn the snow into sand at sunset, 夕阳"]
CPU = torch.device("cpu")


class MultimodalPositions(Qwen2_5_VLForConditionalGeneration):
    """The reference with Qwen2.5-VL's 3-D positions: diffusers 0.42 calls the text encoder without the processor's
    mm_token_type_ids, which transformers 5 needs to place image tokens (older versions read them off the ids)."""

    def forward(self, input_ids=None, **kwargs):
        kwargs.setdefault("mm_token_type_ids", (input_ids == self.config.image_token_id).int())
        return super().forward(input_ids=input_ids, **kwargs)


class PicturesOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor: transformers' video processors need torchvision, which Loom does
    not install (the pictures' own processor is the PIL one)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument_name == "video_processor" else super().check_argument_for_proper_class(
            argument_name, argument)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_qwen25vl(tmp_path_factory.mktemp("vl") / "qwen_2.5_vl_7b.safetensors", seed=5,
                               dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder(tiny):
    loaded = load_qwen_image_text_encoder([tiny])
    assert loaded.unused_keys == []  # the vision tower's weights are read now
    return loaded.encoder


def reference_model(tiny, cls=MultimodalPositions) -> Qwen2_5_VLForConditionalGeneration:
    """transformers' Qwen2.5-VL as Qwen2.5-VL-7B's config has it, at the tiny file's sizes, with its weights."""
    text = dict(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                  fullatt_block_indexes=[1], window_size=112, tokens_per_second=2)
    model = cls(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    state = safetensors.torch.load_file(tiny)
    renamed = {"model.language_model." + k.removeprefix("model."): v
               for k, v in state.items() if k.startswith("model.")}
    renamed |= {"model." + k: v for k, v in state.items() if k.startswith("visual.")}
    result = model.load_state_dict(renamed, strict=False)
    assert not result.unexpected_keys and result.missing_keys == ["lm_head.weight"]
    return model


@pytest.fixture(scope="module")
def reference(tiny):
    return reference_model(tiny)


@pytest.fixture(scope="module")
def processor() -> PicturesOnlyProcessor:
    """Qwen2VLProcessor (diffusers' Edit pipelines' processor class) on the bundled vocabulary and merges."""
    with lzma.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        model = json.load(f)["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    return PicturesOnlyProcessor(image_processor=image_processor(), tokenizer=tokenizer, video_processor=None)


def picture(height: int, width: int, seed: int) -> torch.Tensor:
    """An IMAGE picture [H, W, 3] in 0..1: smooth colours and some noise."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    smooth = torch.stack([x, y, (x + y) / 2], -1)
    return (smooth * 0.8 + torch.rand(height, width, 3, generator=generator) * 0.2).clamp(0, 1)


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(eight_bit(image))


def test_templates_are_diffusers() -> None:
    edit = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                 transformer=None)
    plus = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=None)
    assert edit.prompt_template_encode == EDIT_TEMPLATE and plus.prompt_template_encode == EDIT_PLUS_TEMPLATE
    assert edit.prompt_template_encode_start_idx == plus.prompt_template_encode_start_idx == 64
    assert mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL-7B's


def test_token_ids_are_the_processors(processor) -> None:
    """The template's ids with each picture's tokens expanded equal what transformers' processor makes."""
    images = [picture(200, 250, 0), picture(120, 90, 1)]
    sizes = (preprocess(images)[1].prod(-1) // 4).tolist()
    assert sizes == [7 * 9, 4 * 3]  # 196 x 252 px: 14 x 18 patches; 112 x 84 px: 8 x 6; merged 2 x 2
    ids = expand_image_pads(image_prompt_ids(PROMPTS[1], 1), sizes[:1])
    assert ids == processor(text=[EDIT_TEMPLATE.format(PROMPTS[1])], images=[pil(images[0])]).input_ids[0]
    plus = PICTURE.format(1) + PICTURE.format(2) + PROMPTS[0]
    ids = expand_image_pads(image_prompt_ids(plus, 2, EDIT_PLUS_TEMPLATE), sizes)
    assert ids == processor(text=[EDIT_PLUS_TEMPLATE.format(plus)], images=[pil(im) for im in images]).input_ids[0]


def test_image_placeholders_follow_comfyui() -> None:
    user = "<|im_start|>user\n"
    assert with_image_placeholders(f"{user}hi", 2) == f"{user}{VISION_BLOCK * 2}hi"
    assert with_image_placeholders(f"a {VISION_BLOCK}b", 2) == f"a {VISION_BLOCK * 2}b"
    assert with_image_placeholders("hi", 1) == VISION_BLOCK + "hi"
    assert with_image_placeholders(EDIT_TEMPLATE.format("x"), 1) == EDIT_TEMPLATE.format("x")
    with pytest.raises(ValueError, match="2 image placeholders .* for 1 image"):
        with_image_placeholders(VISION_BLOCK * 2, 1)


def test_vision_tower_matches_transformers(encoder, reference, processor) -> None:
    images = [picture(200, 250, 0), picture(300, 140, 2)]
    pixels, grid = preprocess(images)
    expected = processor.image_processor(images=[pil(im) for im in images], return_tensors="pt")
    assert torch.equal(pixels, expected["pixel_values"]) and torch.equal(grid, expected["image_grid_thw"])
    with torch.no_grad():
        ours = encoder.visual(pixels, grid_thw=grid).pooler_output
        theirs = torch.cat(reference.get_image_features(pixels, grid).pooler_output)
    assert ours.shape == (63 + 11 * 5, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_edit_prompt_matches_diffusers(encoder, reference, processor) -> None:
    image = picture(200, 250, 0)
    pipeline = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=processor.tokenizer,
                                     processor=processor, transformer=None)
    with torch.no_grad():
        states, mask = pipeline.encode_prompt(PROMPTS[0], image=pil(image), device=CPU)
        batch, batch_mask = pipeline._get_qwen_prompt_embeds(PROMPTS, image=[pil(image)] * 2, device=CPU)
    ours = encoder.encode([PROMPTS[0]], images=[image])
    # kept from <|vision_start|> on: the picture's 63 tokens, <|vision_end|>, the prompt's 4, 5 closing the turns
    assert mask is None and ours.cond.shape == (1, 1 + 63 + 1 + 4 + 5, 32)
    torch.testing.assert_close(ours.cond, states, atol=1e-5, rtol=1e-5)
    both = encoder.encode(PROMPTS, images=[image])  # every prompt sees the picture, padded on the right
    assert torch.equal(both.extra[ATTENTION_MASK], batch_mask)
    torch.testing.assert_close(both.cond, batch, atol=1e-5, rtol=1e-5)


def test_edit_plus_prompt_matches_diffusers(encoder, reference, processor) -> None:
    images = [picture(200, 250, 0), picture(120, 90, 1)]
    pipeline = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=reference,
                                         tokenizer=processor.tokenizer, processor=processor, transformer=None)
    with torch.no_grad():
        states, _ = pipeline.encode_prompt(PROMPTS[1], image=[pil(im) for im in images], device=CPU)
    prompt = PICTURE.format(1) + PICTURE.format(2) + PROMPTS[1]
    ours = encoder.encode([prompt], images=images, template=EDIT_PLUS_TEMPLATE)
    torch.testing.assert_close(ours.cond, states, atol=1e-5, rtol=1e-5)
    assert ours.cond.shape[1] == states.shape[1]


def test_image_tokens_take_3d_positions(encoder, tiny, processor) -> None:
    """Without the multimodal positions (plain 1-D RoPE) the states differ: the 3-D ones are what is matched."""
    image = picture(200, 250, 0)
    plain = QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=reference_model(
        tiny, Qwen2_5_VLForConditionalGeneration), tokenizer=processor.tokenizer, processor=processor, transformer=None)
    with torch.no_grad():
        states, _ = plain.encode_prompt(PROMPTS[0], image=pil(image), device=CPU)
    ours = encoder.encode([PROMPTS[0]], images=[image]).cond
    assert ours.shape == states.shape and not torch.allclose(ours, states, atol=1e-3)


def test_a_file_without_vision_tower(tiny, tmp_path) -> None:
    state = safetensors.torch.load_file(tiny)
    text_only = tmp_path / "qwen_text_only.safetensors"
    safetensors.torch.save_file({k: v for k, v in state.items() if not k.startswith("visual.")}, text_only)
    loaded = load_qwen_image_text_encoder([text_only])
    assert loaded.encoder.visual is None and loaded.unused_keys == []
    assert loaded.encoder.encode([PROMPTS[0]]).cond.shape == (1, 9, 32)  # text alone still encodes
    with pytest.raises(CheckpointError, match=r"no vision tower \(visual\.\*\), which Qwen-Image-Edit needs"):
        loaded.encoder.encode([PROMPTS[0]], images=[picture(64, 64, 0)])
    broken = tmp_path / "qwen_broken_tower.safetensors"
    safetensors.torch.save_file({k: v for k, v in state.items() if "blocks.1.attn.qkv" not in k}, broken)
    with pytest.raises(CheckpointError, match=r"qwen_broken_tower.safetensors: 2 Qwen2.5-VL weights missing.*"
                                              r"visual.blocks.1.attn.qkv"):
        load_qwen_image_text_encoder([broken])
