"""Qwen2.5-VL's vision tower and the prompts it reads pictures into, for Qwen-Image-Edit.

As ComfyUI's TextEncodeQwenImageEdit / TextEncodeQwenImageEditPlus encode them (diffusers' QwenImageEditPipeline and
QwenImageEditPlusPipeline likewise).

Weights: the vision tower Comfy-Org's Qwen2.5-VL-7B files keep under ``visual.``, in transformers' names
(``visual.patch_embed.proj``, ``visual.blocks.N.attn.qkv`` / ``proj``, ``norm1`` / ``norm2``, ``mlp.gate_proj`` /
``up_proj`` / ``down_proj``, ``visual.merger.ln_q`` / ``mlp.0`` / ``mlp.2``), run on transformers'
Qwen2_5_VisionTransformerPretrainedModel. The shape comes from the weights: width (1280 in the 7B), blocks (32), MLP
width (3420), output width (the language model's); heads are 80 wide (16 in the 7B) or, for towers narrower than 320,
a quarter of the width (Loom's tiny test models); full attention in every eighth block (7, 15, 23, 31; the last block
of a tower shallower than 8), windows of 112 pixels elsewhere; patches of 14 pixels, 2 frames, merged 2x2.

Images: Qwen2-VL's image processor (transformers' Qwen2VLImageProcessorPil: the torchvision one needs torchvision,
which Loom does not install) with Qwen2.5-VL's limits, 3,136 to 12,845,056 pixels: each picture as 8 bits, resized
(PIL's bicubic) to the multiples of 28 nearest its size, normalised with CLIP's mean and std, cut in 14-pixel patches
taken twice in time. (ComfyUI resizes bilinearly in float, a small difference.)

Prompts: in Qwen-Image-Edit's template (EDIT_TEMPLATE: one picture before the prompt), or any template with the
pictures in the prompt (TextEncodeQwenImageEditPlus: EDIT_PLUS_TEMPLATE, `Picture N: ` and a vision block each); as
ComfyUI's tokenizer does, a prompt with fewer `<|image_pad|>` than pictures gets the missing vision blocks after its
first one (or at the start of the user turn), and more placeholders than pictures is an error. Each placeholder
becomes one token per merged 2x2 patch of its picture, holding the tower's output. The language model runs as
Qwen2.5-VL's (transformers' Qwen2_5_VLModel around the loaded weights): image tokens at 3-D multimodal RoPE positions
(its get_rope_index: the picture's time, row and column after the text before it; the text after it goes on from its
longest side). The kept states start at the user turn's text (ldm.qwen_text.template_end; 64 tokens into the Edit
templates, diffusers' drop), so they hold the picture tokens too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm.checkpoint import CheckpointError
from ldm.qwen_text import PAD_TOKEN, load_prefixed, padded, prompt_text, token_ids

EDIT_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
               "objects, background), then explain how the user's text instruction should alter or modify the image. "
               "Generate a new image that meets the user's requirements while maintaining consistency with the "
               "original input where appropriate.<|im_end|>\n<|im_start|>user\n")
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
EDIT_TEMPLATE = EDIT_SYSTEM + VISION_BLOCK + "{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
PICTURE = "Picture {}: " + VISION_BLOCK  # TextEncodeQwenImageEditPlus' label of its N-th image input
IMAGE_PAD = 151655  # <|image_pad|>
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
PREFIX = "visual."
_BLOCK = re.compile(r"visual\.blocks\.(\d+)\.")
_USER_TURN = "<|im_start|>user\n"


def vision_config_from_state_dict(sd: Mapping[str, Any]) -> Any:
    """transformers' Qwen2_5_VLVisionConfig of the vision tower in `sd`, its shape read from the weights."""
    from transformers import Qwen2_5_VLVisionConfig

    width = sd[PREFIX + "patch_embed.proj.weight"].shape[0]
    depth = len({int(m[1]) for k in sd if (m := _BLOCK.match(k))})
    full = [i for i in range(depth) if i % 8 == 7] or [depth - 1]
    return Qwen2_5_VLVisionConfig(depth=depth, hidden_size=width, num_heads=width // 80 if width >= 320 else 4,
                                  intermediate_size=sd[PREFIX + "blocks.0.mlp.gate_proj.weight"].shape[0],
                                  out_hidden_size=sd[PREFIX + "merger.mlp.2.weight"].shape[0],
                                  fullatt_block_indexes=full, window_size=112, patch_size=14, temporal_patch_size=2,
                                  spatial_merge_size=2, tokens_per_second=2)


def vision_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[Any, set[str]]:
    """transformers' Qwen2_5_VisionTransformerPretrainedModel holding the vision tower in `sd`, frozen, in `dtype`,
    and the keys it used; a CheckpointError naming `name` when its weights are incomplete or do not fit."""
    from transformers import Qwen2_5_VisionTransformerPretrainedModel

    if PREFIX + "merger.mlp.2.weight" not in sd or PREFIX + "blocks.0.mlp.gate_proj.weight" not in sd:
        raise CheckpointError(f"{name}: an incomplete Qwen2.5-VL vision tower (visual.*: no merger or no blocks)")
    config = vision_config_from_state_dict(sd)
    with torch.device("meta"):
        model = Qwen2_5_VisionTransformerPretrainedModel(config).to(dtype)
    used = load_prefixed(model, sd, PREFIX, name, dtype)
    # The axial RoPE's frequencies are buffers outside the state dict, left on the meta device: computed here.
    inv_freq = model.rotary_pos_emb.compute_axial_rope_parameters(config)[0]
    model.rotary_pos_emb.inv_freq, model.rotary_pos_emb.original_inv_freq = inv_freq, inv_freq.clone()
    return model.eval().requires_grad_(False), used


@lru_cache(maxsize=1)
def image_processor() -> Any:
    """Qwen2-VL's image processor with Qwen2.5-VL's settings (patch 14, merge 2, temporal patch 2, CLIP's mean and
    std: the class defaults; the pixel limits of MIN_PIXELS and MAX_PIXELS)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def eight_bit(image: Tensor) -> np.ndarray:
    """An IMAGE picture [H, W, C] in 0..1 as the 8-bit RGB array [H, W, 3] the processor resizes (as a PIL image)."""
    return (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def preprocess(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pictures [H, W, 3] in 0..1 -> the vision tower's patches [N, 1176] and each picture's grid [n, 3] (1, rows,
    columns of 14-pixel patches)."""
    out = image_processor()(images=[eight_bit(image) for image in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def with_image_placeholders(text: str, count: int) -> str:
    """`text` with a vision block for each of `count` pictures (ComfyUI's rule): missing ones go after its first
    vision block, or at the start of the user turn (of the text, without one)."""
    have = text.count("<|image_pad|>")
    if have > count:
        raise ValueError(f"the prompt holds {have} image placeholders (<|image_pad|>) for {count} image(s)")
    blocks = VISION_BLOCK * (count - have)
    if not blocks:
        return text
    if VISION_BLOCK in text:
        at = text.index(VISION_BLOCK) + len(VISION_BLOCK)
    else:
        at = text.index(_USER_TURN) + len(_USER_TURN) if _USER_TURN in text else 0
    return text[:at] + blocks + text[at:]


def image_prompt_ids(prompt: str, count: int, template: str = EDIT_TEMPLATE) -> list[int]:
    """The token ids of a prompt with `count` pictures, one `<|image_pad|>` per picture (see the module docstring)."""
    return token_ids(with_image_placeholders(prompt_text(prompt, template), count))


def expand_image_pads(row: list[int], sizes: list[int]) -> list[int]:
    """`row` with its i-th `<|image_pad|>` repeated `sizes[i]` times (one token per merged patch of picture i)."""
    out: list[int] = []
    pictures = iter(sizes)
    for token in row:
        out.extend([token] * next(pictures) if token == IMAGE_PAD else [token])
    return out


def mrope_section(head_dim: int) -> list[int]:
    """How Qwen2.5-VL splits a head's rotary frequencies among time, rows and columns: [16, 24, 24] of 128's 64."""
    third = 3 * head_dim // 16
    return [head_dim // 2 - 2 * third, third, third]


def vl_model(language: Any, visual: Any) -> Any:
    """transformers' Qwen2_5_VLModel around the loaded language model (a Qwen2Model: its parameters themselves,
    not copies) and vision tower, for its multimodal RoPE and get_rope_index."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    lm = language.config
    head_dim = lm.hidden_size // lm.num_attention_heads
    if head_dim != lm.head_dim:
        raise ValueError(f"a Qwen2.5-VL language model with {lm.num_attention_heads} heads of {lm.head_dim} in "
                         f"{lm.hidden_size} has no multimodal form")
    text = dict(vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
                num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
                num_key_value_heads=lm.num_key_value_heads, rms_norm_eps=lm.rms_norm_eps,
                max_position_embeddings=lm.max_position_embeddings, pad_token_id=PAD_TOKEN,
                rope_parameters={"rope_type": "default", "rope_theta": lm.rope_parameters["rope_theta"],
                                 "mrope_section": mrope_section(head_dim)})
    config = Qwen2_5_VLConfig(text_config=text, vision_config=visual.config)
    with torch.device("meta"):
        model = Qwen2_5_VLModel(config)
    model.visual = visual
    model.language_model.load_state_dict(dict(language.named_parameters()), assign=True)
    rotary = model.language_model.rotary_emb
    inv_freq = rotary.compute_default_rope_parameters(config.text_config)[0].to(language.device)
    rotary.inv_freq, rotary.original_inv_freq = inv_freq, inv_freq.clone()
    return model.eval()


def image_prompt_states(encoder: Any, prompts: list[str], images: list[Tensor],
                        template: str | None = None) -> tuple[Tensor, list[list[int]]]:
    """The language model's last states [B, L, hidden] of `prompts`, each with all of `images` ([H, W, 3] in 0..1)
    through the vision tower of `encoder` (an ldm.qwen_text.QwenImageTextEncoder), and each prompt's token ids with
    the image tokens expanded."""
    if encoder.visual is None:
        raise CheckpointError("this Qwen2.5-VL text encoder file has no vision tower (visual.*), which Qwen-Image-Edit "
                              "needs to read its images: use Comfy-Org's qwen_2.5_vl_7b.safetensors or "
                              "qwen_2.5_vl_7b_fp8_scaled.safetensors")
    language, visual = encoder.qwen25_7b, encoder.visual
    device = language.device
    pixels, grid = preprocess(images)
    merged = visual(pixels.to(device, visual.dtype), grid_thw=grid.to(device)).pooler_output
    sizes = (grid.prod(-1) // visual.spatial_merge_unit).tolist()
    rows = [expand_image_pads(image_prompt_ids(p, len(images), template or EDIT_TEMPLATE), sizes) for p in prompts]
    ids, mask = (t.to(device) for t in padded(rows))
    embeds = language.embed_tokens(ids)
    is_image = (ids == IMAGE_PAD).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, merged.to(embeds.dtype).repeat(len(rows), 1))
    model = vl_model(language, visual)
    positions, _ = model.get_rope_index(ids, mm_token_type_ids=is_image[..., 0].int(),
                                        image_grid_thw=grid.repeat(len(rows), 1), attention_mask=mask)
    hidden = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    return hidden.last_hidden_state, rows


def tiny_visual_state(rand: Callable[..., Tensor], out: int, width: int = 32, depth: int = 2) -> dict[str, Tensor]:
    """Random vision-tower weights (`visual.`) for Loom's tiny Qwen2.5-VL files: `width` wide (4 heads), `depth`
    blocks (the last with full attention), an MLP twice as wide, merged into `out` (the language model's width)."""
    block = {"norm1.weight": (width,), "norm2.weight": (width,), "attn.qkv.weight": (3 * width, width),
             "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
             "mlp.gate_proj.weight": (2 * width, width), "mlp.gate_proj.bias": (2 * width,),
             "mlp.up_proj.weight": (2 * width, width), "mlp.up_proj.bias": (2 * width,),
             "mlp.down_proj.weight": (width, 2 * width), "mlp.down_proj.bias": (width,)}
    state = {PREFIX + "patch_embed.proj.weight": rand(width, 3, 2, 14, 14) / 10,  # 1,176 inputs per patch
             PREFIX + "merger.ln_q.weight": 1 + rand(width), PREFIX + "merger.mlp.0.weight": rand(4 * width, 4 * width),
             PREFIX + "merger.mlp.0.bias": rand(4 * width), PREFIX + "merger.mlp.2.weight": rand(out, 4 * width),
             PREFIX + "merger.mlp.2.bias": rand(out)}
    for i in range(depth):
        state |= {f"{PREFIX}blocks.{i}.{name}": rand(*shape) + name.startswith("norm")
                  for name, shape in block.items()}
    return state
