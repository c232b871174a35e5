"""Qwen-Image 2.1's text encoder, Qwen3-VL-8B-Instruct, as ComfyUI's TextEncodeQwenImage21 (CLIPLoader type
"qwen_image" with a Qwen3-VL-8B file) and diffusers' QwenImage21Pipeline._get_qwen_prompt_embeds encode prompts.

Weights: Comfy-Org's qwen3vl_8b_bf16.safetensors (Comfy-Org/Qwen-Image-2.1, text_encoders/). Its layout was not read
from ComfyUI itself; two independent third-party loaders of that file agree on it: the language model at ``model.``
in transformers' Qwen3 names (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj`` / ``q_norm`` / ``k_norm``,
``model.norm``), the vision tower at ``model.visual.`` in transformers' Qwen3-VL names (``patch_embed.proj``,
``pos_embed``, ``blocks.N.attn.qkv``, ``mlp.linear_fc1``, ``merger.*``, ``deepstack_merger_list.K.*``) and
``lm_head``. transformers' own spelling (``model.language_model.*``) and the flat ComfyUI spelling of the tower
(``visual.*``) load too. The final norm and the LM head are knowingly left unused (the states are taken before the
norm). Scaled fp8 files are descaled as they load (ldm.qwen_text).
Shapes come from the weights (head width from the q norm); Qwen3-VL's constants: RoPE base 5e6 with interleaved
multimodal sections [24, 20, 20] of 64 frequencies (time, rows, columns), RMS epsilon 1e-6; vision tower: 16 heads
(4 for Loom's tiny towers narrower than 512), patches of 16 pixels and 2 frames merged 2x2, 2,304 learned positions
(from the weights), DeepStack taps after blocks 8, 16, 24 (27-block towers; 5, 11, 17 for 24 blocks; the first
blocks for tiny towers), whose merged features are added to the image tokens after the first decoder layers.
The model runs on transformers' Qwen3VLModel (its multimodal RoPE positions and DeepStack injection).

Tokenizer: Qwen3's (ldm.qwen3_text: Qwen2's BPE plus Qwen3's added tokens).

Encoding (diffusers' QwenImage21Pipeline; ComfyUI's TextEncodeQwenImage21 flags `prevent_empty_text` and
`keep_vision` name the same points): an empty prompt becomes " "; the prompt goes, raw (no chat template call), into
`<|im_start|>system\\nComprehend and analyze the provided prompt.<|im_end|>\\n<|im_start|>user\\n{}<|im_end|>\\n
<|im_start|>assistant\\n`; with N images the user turn starts with `<image1><|vision_start|><|image_pad|>
<|vision_end|>` and, for i >= 2, ` <image{i}>` and another vision block (`<imageN>` is text). Each `<|image_pad|>`
becomes one token per merged 2x2 patch of its image (32 x 32 pixels). ComfyUI's bracket escapes `\\(` `\\)` are
undone, as its other Qwen encoders do. The states are the last decoder layer's output BEFORE the final RMSNorm
(diffusers' forward hook on the norm), from the user turn on: the system turn's tokens (`_drop_idx`, 14) are dropped.
With reference latents (`keep_vision=False`, the default with images) the image-pad states are removed and
`extra["image_slots"]` ([B, N] int64) holds, for each image, the index in `cond` where its pads stood (the
transformer splices that image's latent tokens there); with `keep_vision=True` they stay and the slot is the index of
the image's first pad. A batch is padded on the right (diffusers pads on the left: the same states, RoPE being
relative and the positions counted over the real tokens), each prompt's states are followed by zeros to the longest
and `extra["attention_mask"]` ([B, L] int64) marks its tokens.

Images: IMAGE tensors [1, H, W, C] in 0..1, alpha (C = 4) composited over white, as 8-bit RGB through Qwen2-VL's
image processor with Qwen3-VL's settings (patch 16, merge 2, temporal patch 2 duplicating the frame, mean and std
0.5, 65,536 to 16,777,216 pixels, PIL bicubic resizing to the nearest multiples of 32: none for the node's sizes
unless the picture is under 256 x 256 pixels in area).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.qwen3_text import QWEN3_VOCAB_SIZE, token_ids
from ldm.qwen_text import ATTENTION_MASK, PAD_TOKEN, load_prefixed, padded
from ldm.qwen_vl import IMAGE_PAD, VISION_BLOCK, eight_bit, expand_image_pads
from ldm.t5 import scaling_keys
from ldm.text_encoders import PinnableTextEncoder, TextEncoding

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
SYSTEM_TURN = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
TEMPLATE = SYSTEM_TURN + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_SLOTS = "image_slots"
ENCODER_NAME = "qwen3vl_8b"  # ComfyUI's name for the encoder (per_encoder key)
FAMILY = "qwen_image21"
QWEN3VL_8B_WIDTH = 4096
MIN_PIXELS, MAX_PIXELS = 256 * 256, 4096 * 4096  # Qwen3-VL's preprocessor_config.json (shortest / longest edge)
PATCH, MERGE, FRAMES = 16, 2, 2
ROPE_THETA = 5_000_000.0
DEEPSTACK_TAPS = {27: [8, 16, 24], 24: [5, 11, 17]}  # vision blocks whose output feeds a DeepStack merger

# Where the parts of a file go in transformers' Qwen3VLModel (under "model."): file prefix -> model prefix, first
# match wins (Comfy-Org's spelling last, since its "model." also starts the others).
_PREFIXES = (("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
             ("visual.", "model.visual."), ("model.", "model.language_model."))
_EMBED = "model.language_model.embed_tokens.weight"
_Q_NORM = "model.language_model.layers.0.self_attn.q_norm.weight"
_DEEPSTACK = "model.visual.deepstack_merger_list.0.norm.weight"
_UNUSED = ("model.language_model.norm.weight",)  # the final norm: the states are taken before it


def canonical(sd: Mapping[str, Any]) -> dict[str, str]:
    """The keys of `sd` as transformers' Qwen3VLModel names them (under "model."), each to the file's own key; the
    LM head and other keys outside the model are left out."""
    out = {}
    for key in sd:
        for prefix, target in _PREFIXES:
            if key.startswith(prefix):
                out[target + key.removeprefix(prefix)] = key
                break
    return out


def is_qwen3vl(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a header's shapes) holds Qwen3-VL (language model and vision tower) in any of the
    spellings Loom reads: Qwen3's q/k norms (Qwen2.5-VL has none) and a DeepStack merger (Qwen3 has no tower)."""
    names = canonical(sd)
    return _EMBED in names and _Q_NORM in names and _DEEPSTACK in names


def text_kind(sd: Mapping[str, Any]) -> str | None:
    """"qwen3vl_8b" for Qwen-Image 2.1's encoder (or a tiny test copy), "qwen3vl" for another size, else None."""
    if not is_qwen3vl(sd):
        return None
    width = sd[canonical(sd)[_EMBED]].shape[1]
    return ENCODER_NAME if width == QWEN3VL_8B_WIDTH or width < 512 else "qwen3vl"


def mrope_section(head_dim: int) -> list[int]:
    """How Qwen3-VL shares a head's rotary frequencies among time, rows and columns: [24, 20, 20] of 128's 64."""
    third = 5 * head_dim // 32
    return [head_dim // 2 - 2 * third, third, third]


def qwen3vl_config(sd: Mapping[str, Any]) -> Any:
    """transformers' Qwen3VLConfig of the model in `sd`, its shape read from the weights."""
    from transformers import Qwen3VLConfig

    names = canonical(sd)

    def shape(key: str) -> tuple[int, ...]:
        return tuple(sd[names[key]].shape)

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in names if k.startswith(prefix)})

    lm = "model.language_model.layers.0."
    vocab, hidden = shape(_EMBED)
    head_dim = shape(_Q_NORM)[0]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=shape(lm + "mlp.gate_proj.weight")[0],
                num_hidden_layers=count("model.language_model.layers."),
                num_attention_heads=shape(lm + "self_attn.q_proj.weight")[0] // head_dim,
                num_key_value_heads=shape(lm + "self_attn.k_proj.weight")[0] // head_dim, head_dim=head_dim,
                rms_norm_eps=1e-6, max_position_embeddings=262144, pad_token_id=PAD_TOKEN, use_cache=False,
                rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                                 "mrope_section": mrope_section(head_dim), "mrope_interleaved": True})
    width = shape("model.visual.patch_embed.proj.weight")[0]
    depth = count("model.visual.blocks.")
    taps = count("model.visual.deepstack_merger_list.")
    vision = dict(depth=depth, hidden_size=width, num_heads=16 if width >= 512 else 4,
                  intermediate_size=shape("model.visual.blocks.0.mlp.linear_fc1.weight")[0],
                  out_hidden_size=shape("model.visual.merger.linear_fc2.weight")[0],
                  num_position_embeddings=shape("model.visual.pos_embed.weight")[0], patch_size=PATCH,
                  temporal_patch_size=FRAMES, spatial_merge_size=MERGE,
                  deepstack_visual_indexes=DEEPSTACK_TAPS.get(depth, list(range(taps))))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def qwen3vl_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[Any, set[str]]:
    """transformers' Qwen3VLModel holding the weights of `sd`, frozen, in `dtype`, its final norm an identity (the
    states are taken before it), and the file keys it used or knowingly ignored; a CheckpointError naming `name`
    when the file is not Qwen3-VL or its weights do not fit."""
    from transformers import Qwen3VLModel

    if not is_qwen3vl(sd):
        raise _refusal(name, sd)
    config = qwen3vl_config(sd)
    with torch.device("meta"):
        model = Qwen3VLModel(config).to(dtype)
    model.language_model.norm = torch.nn.Identity()
    names = canonical(sd)
    renamed = {k: sd[v] for k, v in names.items()}
    used = load_prefixed(model, renamed, "model.", name, dtype, "Qwen3-VL")
    # RoPE frequencies are buffers outside the state dict, left on the meta device: computed here.
    for rotary, inv_freq in ((model.language_model.rotary_emb, model.language_model.rotary_emb
                              .compute_default_rope_parameters(config.text_config)[0]),
                             (model.visual.rotary_pos_emb, model.visual.rotary_pos_emb
                              .compute_axial_rope_parameters(config.vision_config)[0])):
        rotary.inv_freq, rotary.original_inv_freq = inv_freq, inv_freq.clone()
    used_keys = {names[k] for k in used | set(_UNUSED) if k in names} | scaling_keys(sd)
    return model.eval().requires_grad_(False), used_keys | {k for k in sd if k.startswith("lm_head.")}


def _refusal(name: str, sd: Mapping[str, Tensor]) -> CheckpointError:
    from ldm.parts import look_of

    look = look_of(sd)
    held = look.what if look is not None else "no model layout Loom knows"
    return CheckpointError(f"{name}: not Qwen3-VL-8B, Qwen-Image 2.1's text encoder: it holds {held}; CLIPLoader "
                           "type qwen_image takes qwen3vl_8b_bf16.safetensors for Qwen-Image 2.1")


# ---- prompts ----------------------------------------------------------------------------------------------------


def prompt_text(prompt: str, images: int = 0) -> str:
    """A Qwen-Image 2.1 prompt as encoded (see the module docstring), with vision blocks for `images` images."""
    text = prompt.replace("\\(", "(").replace("\\)", ")") or " "
    vision = "".join(("" if i == 1 else " ") + f"<image{i}>" + VISION_BLOCK for i in range(1, images + 1))
    return TEMPLATE.format(vision + text)


@lru_cache(maxsize=1)
def system_length() -> int:
    """How many tokens the system turn takes (diffusers' `_drop_idx`): the states start after them."""
    return len(token_ids(SYSTEM_TURN))


def tokenize(prompt: str, images: int = 0) -> list[int]:
    """The token ids of a prompt with `images` images, one `<|image_pad|>` per image (expanded by the caller)."""
    return token_ids(prompt_text(prompt, images))


# ---- images -----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def image_processor() -> Any:
    """Qwen2-VL's image processor with Qwen3-VL-8B-Instruct's settings (see the module docstring)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=PATCH, temporal_patch_size=FRAMES, merge_size=MERGE,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=MIN_PIXELS,
                                    max_pixels=MAX_PIXELS)


def over_white(image: Tensor) -> Tensor:
    """An IMAGE [1, H, W, C] (or [H, W, C]) as the RGB picture [H, W, 3] the vision tower sees: alpha, when there is
    one, composited over white."""
    picture = image[0] if image.dim() == 4 else image
    if picture.shape[-1] == 4:
        alpha = picture[..., 3:]
        return picture[..., :3] * alpha + (1 - alpha)
    return picture[..., :3]


def preprocess(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """IMAGE tensors -> the vision tower's patches [N, 1536] and each image's grid [n, 3] (1, rows, columns of
    16-pixel patches)."""
    out = image_processor()(images=[eight_bit(over_white(image)) for image in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def vision_features(model: Any, images: list[Tensor]) -> tuple[Any, Tensor]:
    """The vision tower's output for `images` (transformers' get_image_features: merged embeddings and DeepStack
    features, split per image) and the images' grids."""
    pixels, grid = preprocess(images)
    device = model.language_model.embed_tokens.weight.device
    return model.get_image_features(pixels.to(device), grid.to(device)), grid


def pad_runs(ids: list[int]) -> list[int]:
    """Where each run of `<|image_pad|>` in `ids` starts (one run per image)."""
    return [i for i, token in enumerate(ids) if token == IMAGE_PAD and (i == 0 or ids[i - 1] != IMAGE_PAD)]


# ---- the encoder ------------------------------------------------------------------------------------------------


class Qwen21TextEncoder(PinnableTextEncoder):
    """Qwen3-VL-8B encoding as Qwen-Image 2.1 reads it (see the module docstring); the interface of
    ``ldm.text_encoders.TextEncoder``: `encode` gives the states of each prompt's user turn on, no pooled vector,
    the attention mask and, with images, the image slots. Pinned to the CPU (`pinned_to_cpu`, CLIPLoader's device
    "cpu"), `.to()` changes its dtype only."""

    main_encoder = ENCODER_NAME

    def __init__(self, model: Any, final_norm: nn.Module | None = None, lm_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.qwen3vl_8b = model
        # For TextGenerate only (ldm.textgen): the encoding takes the states before the final norm.
        self.final_norm, self.lm_head = final_norm, lm_head

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None,
               images: list[Tensor] | None = None, keep_vision: bool = False) -> TextEncoding:
        """`cond`: [B, L, hidden], zeros after each prompt's states; `extra["attention_mask"]`: [B, L] int64; with
        `images` (IMAGE tensors [1, H, W, C] in 0..1, seen by every prompt) `extra["image_slots"]`: [B, N] int64,
        and the image tokens' states kept only with `keep_vision`. Clip skip, prompt weights and textual-inversion
        embeddings do not apply."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = (per_encoder or {}).get(ENCODER_NAME, prompts)
        images = images or []
        rows = [tokenize(p, len(images)) for p in prompts]
        hidden, rows = self._states(rows, images)
        drop = system_length()
        kept, slots = [], []
        for i, row in enumerate(rows):
            ids = torch.tensor(row[drop:])
            states = hidden[i, drop:len(row)]
            starts = pad_runs(row[drop:])
            if images and not keep_vision:
                states = states[ids != IMAGE_PAD]
                starts = [start - int((ids[:start] == IMAGE_PAD).sum()) for start in starts]
            kept.append(states)
            slots.append(starts)
        length = max(len(states) for states in kept)
        cond = hidden.new_zeros(len(kept), length, hidden.shape[-1])
        mask = torch.zeros(len(kept), length, dtype=torch.long)
        for i, states in enumerate(kept):
            cond[i, :len(states)] = states
            mask[i, :len(states)] = 1
        extra = {ATTENTION_MASK: mask}
        if images:
            extra[IMAGE_SLOTS] = torch.tensor(slots, dtype=torch.long)
        return TextEncoding(cond, None, extra)

    def _states(self, rows: list[list[int]], images: list[Tensor]) -> tuple[Tensor, list[list[int]]]:
        """The pre-norm last states [B, L, hidden] of token rows (their image pads expanded to each image's tokens,
        every row seeing all of `images`) and the expanded rows."""
        model, device = self.qwen3vl_8b, self.device
        if not images:
            ids, mask = padded(rows)
            return model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state, rows
        features, grid = vision_features(model, images)
        rows = [expand_image_pads(row, (grid.prod(-1) // MERGE ** 2).tolist()) for row in rows]
        ids, mask = (t.to(device) for t in padded(rows))
        batch = len(rows)
        features.pooler_output = tuple(features.pooler_output) * batch
        features.deepstack_features = [tuple(level) * batch for level in features.deepstack_features]
        # the multimodal RoPE positions (get_rope_index) passed in, so that the model keeps no state between calls
        positions, _ = model.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE_PAD).int(),
                                            image_grid_thw=grid.repeat(batch, 1), attention_mask=mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs={"image": features})
        return out.last_hidden_state, rows


@dataclass
class LoadedQwen21Text:
    encoder: Qwen21TextEncoder
    unused_keys: list[str]  # "file name: key"
    family: str = FAMILY


def load_qwen_image_type_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                                      dtype: torch.dtype = torch.float32) -> Any:
    """CLIPLoader type qwen_image: Qwen-Image 2.1's Qwen3-VL-8B (this module's) or Qwen-Image's Qwen2.5-VL-7B
    (`ldm.qwen_text`), the file telling which."""
    from ldm.qwen_text import load_qwen_image_text_encoder

    shapes = ckpt.shapes_or_none(paths[0]) if len(paths) == 1 else None
    if shapes is not None and is_qwen3vl(shapes):
        return load_qwen21_text_encoder(paths, device, dtype)
    return load_qwen_image_text_encoder(paths, device, dtype)


def load_qwen21_text_encoder(paths: list[str | Path], device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.float32) -> LoadedQwen21Text:
    """One Qwen3-VL-8B file (qwen3vl_8b_bf16.safetensors, or a scaled fp8 copy) as Qwen-Image 2.1's text encoder,
    on `device` in `dtype`."""
    if len(paths) != 1:
        raise CheckpointError(f"Qwen-Image 2.1 takes one Qwen3-VL-8B text encoder file; got {len(paths)}")
    path = Path(paths[0])
    sd = ckpt.load_state_dict(path)
    model, used = qwen3vl_from_weights(sd, path.name, dtype)
    unused = sorted(f"{path.name}: {k}" for k in sd if k not in used)
    encoder = Qwen21TextEncoder(model, *_generation_parts(sd, model, dtype))
    return LoadedQwen21Text(encoder.to(device).eval().requires_grad_(False), unused)


def _generation_parts(sd: Mapping[str, Tensor], model: Any, dtype: torch.dtype) -> tuple[nn.Module, nn.Linear]:
    """The language model's final norm and its head (the file's `lm_head`, else tied to the embedding), which only
    text generation uses."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    text = model.config.text_config
    norm = Qwen3VLTextRMSNorm(text.hidden_size, eps=text.rms_norm_eps).to(dtype)
    key = canonical(sd).get(_UNUSED[0])  # the final norm's key in the file
    if key is not None:
        with torch.no_grad():
            norm.weight.copy_(sd[key].to(dtype))
    head = nn.Linear(text.hidden_size, text.vocab_size, bias=False, dtype=dtype, device="meta")
    weight = sd.get("lm_head.weight")
    head.weight = nn.Parameter((weight if weight is not None else model.language_model.embed_tokens.weight)
                               .to(dtype), requires_grad=False)
    return norm, head


# ---- tiny test files --------------------------------------------------------------------------------------------


def tiny_qwen3vl_state(seed: int = 0, hidden: int = 32, layers: int = 3, vision_width: int = 32,
                       vision_depth: int = 3, taps: int = 2) -> dict[str, Tensor]:
    """Random Qwen3-VL weights in Comfy-Org's layout: a language model `hidden` wide (4 heads of hidden // 4, 2
    key/value heads, MLP 2 * hidden, Qwen3's full 151,936 embedding rows so that real prompts' ids fit, an LM head),
    and a vision tower `vision_width` wide (4 heads), `vision_depth` blocks, `taps` DeepStack mergers, 64 learned
    positions (an 8 x 8 grid)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    head, kv = hidden // 4, hidden // 2
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
             "self_attn.q_norm.weight": (head,), "self_attn.k_norm.weight": (head,),
             "mlp.gate_proj.weight": (2 * hidden, hidden), "mlp.up_proj.weight": (2 * hidden, hidden),
             "mlp.down_proj.weight": (hidden, 2 * hidden)}
    state = {"model.embed_tokens.weight": rand(QWEN3_VOCAB_SIZE, hidden), "model.norm.weight": 1 + rand(hidden),
             "lm_head.weight": rand(QWEN3_VOCAB_SIZE, hidden)}
    for i in range(layers):
        # norms around 1, as trained ones are (transformers initialises them to exactly 1)
        state |= {f"model.layers.{i}.{name}": rand(*shape) + name.endswith("norm.weight")
                  for name, shape in layer.items()}
    width, merged = vision_width, 4 * vision_width
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "norm2.weight": (width,), "norm2.bias": (width,),
             "attn.qkv.weight": (3 * width, width), "attn.qkv.bias": (3 * width,),
             "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
             "mlp.linear_fc1.weight": (2 * width, width), "mlp.linear_fc1.bias": (2 * width,),
             "mlp.linear_fc2.weight": (width, 2 * width), "mlp.linear_fc2.bias": (width,)}

    def merger(norm: int) -> dict[str, Tensor]:
        return {"norm.weight": 1 + rand(norm), "norm.bias": rand(norm), "linear_fc1.weight": rand(merged, merged),
                "linear_fc1.bias": rand(merged), "linear_fc2.weight": rand(hidden, merged),
                "linear_fc2.bias": rand(hidden)}

    tower = {"patch_embed.proj.weight": rand(width, 3, FRAMES, PATCH, PATCH) / 4, "patch_embed.proj.bias": rand(width),
             "pos_embed.weight": rand(64, width)}
    for i in range(vision_depth):
        tower |= {f"blocks.{i}.{name}": rand(*shape) + name.startswith(("norm1.w", "norm2.w"))
                  for name, shape in block.items()}
    tower |= {f"merger.{k}": v for k, v in merger(width).items()}
    for i in range(taps):
        tower |= {f"deepstack_merger_list.{i}.{k}": v for k, v in merger(merged).items()}
    return state | {f"model.visual.{k}": v for k, v in tower.items()}


def write_tiny_qwen3vl(path: str | Path, seed: int = 0, hidden: int = 32, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny random Qwen3-VL file in Comfy-Org's layout (see `tiny_qwen3vl_state`), a stand-in for
    qwen3vl_8b_bf16.safetensors: its text states are `hidden` wide (the transformer's context width)."""
    path = Path(path)
    write_safetensors(tiny_qwen3vl_state(seed, hidden), path, {"loom.seed": str(seed)}, dtype)
    return path
