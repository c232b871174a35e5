"""LTX-2's text encoder (Lightricks' audio-video model), as ComfyUI's LTXAVTextEncoderLoader builds it from two files
and CLIPTextEncode runs it: Gemma 3 12B (instruction-tuned) and the feature extractor that LTX-2's checkpoint carries.
The embeddings connectors, which come after, are the diffusion model's (ldm.ltx2).

Weights. The Gemma file (Comfy-Org's gemma_3_12B_it.safetensors and its fp8 copies) holds the language model in
transformers' Gemma 3 names at ``model.`` (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``, the
q/k norms ``self_attn.{q,k}_norm`` over one head, the four norms of a Gemma block ``input_layernorm`` /
``post_attention_layernorm`` / ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``, ``model.norm``), its
tokenizer as ``spiece_model`` (the bytes of Gemma 3's sentencepiece model in a uint8 tensor), possibly ``lm_head.``
(left unused: the head is tied to the embedding) and the vision tower (see Pictures), which text encoding leaves
unused. Gemma 3 12B: 48 layers 3840 wide, 16 heads and 8 key/value heads of 256 (the width of ``q_norm``), MLP
15360 (tanh GELU), 262,208 embedding rows scaled by sqrt(3840), RMS norms that scale by 1 + weight (epsilon 1e-6);
five layers in six attend within a window of 1024 tokens (RoPE base 10,000), every sixth globally (RoPE base 1e6,
positions divided by 8). The shape is read from the weights. Scaled fp8 files are descaled as they load. The LTX-2 file
(ltx-2-19b-dev.safetensors and its variants) gives the feature extractor's linear map alone:
``text_embedding_projection.aggregate_embed.weight`` [3840, 3840 * 49] (and a ``.bias`` if a file has one); Comfy-Org's
split projection files name it ``text_embedding_projection.weight``. Only those keys are read from it. LTX-2.3's
per-modality maps (``video_aggregate_embed`` / ``audio_aggregate_embed``, with biases) take the states RMS-normed per
token instead (`DualProjection`); their two outputs go side by side to the transformer's connectors.

Tokenizer (ComfyUI's Gemma3_12BTokenizer): the file's sentencepiece model, `<bos>` (2) first, no end token, no chat
template (CLIPTextEncode tokenizes the prompt as written), and no prompt weights (ComfyUI disables them: brackets and
`(text:1.2)` are text; escaped `\\(` `\\)` become brackets). The prompt is padded on the left with `<pad>` (0) to at
least 1024 tokens (ComfyUI's min_length) and never cut; positions run 0, 1, ... over the padded row, pads masked.
(ComfyUI's tokenizer handles a prompt holding `<end_of_turn>` or `<image_soft_token>` specially, splitting it into
words; Loom tokenizes such a prompt whole, as sentencepiece does.)

Encoding (ComfyUI's LTXAVTEModel, single linear projection): the 49 hidden states (the embeddings, each layer's output
but the last, and the last one after the final norm; transformers' ``hidden_states``) are kept for the prompt's own
tokens (the left pad dropped). Each state is normalised over the prompt's tokens and width: 8 * (x - mean) /
(max - min + 1e-6), per layer; the 49 are interleaved per channel (feature c * 49 + layer, as [L, 3840, 49] flattened)
and mapped by the projection to 3840: `TextEncoding.cond` [B, L, 3840] float32. diffusers' LTX2Pipeline computes the
same with the pad kept and masked (its `per_layer_masked_mean_norm`, left padding to 1024 tokens; it strips a prompt
and cuts it at 1024 tokens, ComfyUI does neither). That is what
ComfyUI hands the model as cross_attn with ``unprocessed_ltxav_embeds`` True (`UNPROCESSED`): the model's
embeddings connectors have still to run on it. (For a checkpoint whose connectors are 3840 wide with two blocks,
LTX-2 19B's, current ComfyUI runs the connectors inside the text encoder instead, a compatibility path it marks for
removal; the model's `preprocess_text_embeds` runs the same connectors on the same features when the flag is
set, without a mask.) Normalisation is computed in float32 (ComfyUI computes it in bfloat16 on devices
that prefer it). Prompts are encoded one by one, as ComfyUI encodes each; a batch's features are followed by zeros to
the longest prompt and `TextEncoding.extra["attention_mask"]` ([B, L] int64) marks each prompt's tokens (all ones for
one prompt, which is ComfyUI's case: it hands no mask). The empty prompt is `<bos>` alone: one token.

Pictures (text generation only: ldm.textgen, TextGenerate / TextGenerateLTX2Prompt with an image; CLIPTextEncode
reads none). When the Gemma file holds them (Comfy-Org's gemma_3_12B_it.safetensors does, as ComfyUI's Gemma3_12B
names them), the vision tower is loaded with the language model: SigLIP at ``vision_model.`` in transformers'
SiglipVisionModel names (``embeddings.patch_embedding`` (with a bias) / ``position_embedding``,
``encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``layer_norm1`` / ``layer_norm2``, ``mlp.fc1`` / ``fc2``,
``post_layernorm``; no pooling head) and Gemma 3's projector at ``multi_modal_projector.``
(``mm_input_projection_weight`` [vision width, 3840], ``mm_soft_emb_norm.weight``). Gemma 3's tower: 27 layers 1152
wide, 16 heads, MLP 4304 (tanh GELU), LayerNorm epsilon 1e-6, 14-pixel patches of an 896 x 896 picture (64 x 64
patches, its 4096 learned positions); shapes are read from the weights (heads as ldm.siglip counts them). The
projector average-pools the last state (after ``post_layernorm``) in 4 x 4 patch squares to 16 x 16 = 256 soft
tokens (Gemma 3's mm_tokens_per_image; a tower of other size is pooled to 256 too), normalises them with Gemma's RMS
norm (1 + weight, epsilon 1e-6) and maps them to the language model's width; they go into the prompt unscaled (the
text embeddings are scaled by sqrt(width)), as transformers' Gemma3ForConditionalGeneration does. The picture
(ComfyUI's Gemma3_Tokenizer and Gemma3_12B.preprocess_embed): the first of an IMAGE batch, resized ("area", its
aspect kept) to about 896 * 896 pixels, its RGB channels (alpha dropped) resized as ComfyUI's clip_preprocess does
(the shortest side to 896, bicubic with antialiasing, the centre cropped; ldm.clip_vision.preprocess: 8-bit values)
and normalised with mean and std 0.5. The soft tokens take the place of the prompt's first `<image_soft_token>`
(Gemma 3's id 262144, which Gemma's sentencepiece model does not hold: the text on either side is tokenized
apart); attention stays causal over them, as in ComfyUI (transformers' processor would also pass token_type_ids,
making each picture's tokens attend to each other). A file without ``vision_model.`` weights loads as before and
its encoder refuses pictures (`vision` None).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.gemma_text import BOS, EOS, PAD, TOKENIZER_KEY, GemmaTokenizer, tiny_gemma_language_model
from ldm.quant_formats import dequantizing
from ldm.qwen_text import ATTENTION_MASK, load_prefixed
from ldm.t5 import descale, scaling_keys
from ldm.text_encoders import PinnableTextEncoder, TextEncoding

FAMILY = "ltx2"
ENCODER_NAME = "gemma3_12b"  # ComfyUI's name for the encoder (per_encoder key)
UNPROCESSED = "unprocessed_ltxav_embeds"  # ComfyUI's flag: the features still go through the model's connectors
MIN_LENGTH = 1024  # ComfyUI's min_length: prompts are left-padded to it
SCALE = 8.0  # the feature extractor's normalisation: SCALE * (x - mean) / (max - min + EPS)
EPS = 1e-6
SLIDING_WINDOW = 1024
SLIDING_PATTERN = 6  # every sixth layer attends globally
GLOBAL_ROPE = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
LOCAL_ROPE = {"rope_type": "default", "rope_theta": 10_000.0}
PROJECTION_KEYS = ("text_embedding_projection.aggregate_embed.", "text_embedding_projection.")
_DUAL_PROJECTION = "text_embedding_projection.video_aggregate_embed.weight"
_EMBED = "model.embed_tokens.weight"
_PRE_FFN = "model.layers.0.pre_feedforward_layernorm.weight"
_Q_NORM = "model.layers.0.self_attn.q_norm.weight"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
VISION_PREFIX = "vision_model."
PROJECTOR_PREFIX = "multi_modal_projector."
IMAGE_SOFT_TOKEN = "<image_soft_token>"  # where a picture goes in a prompt
IMAGE_TOKEN_ID = 262_144  # Gemma 3's id of `<image_soft_token>`: a picture's slot in token ids
IMAGE_TOKENS = 256  # Gemma 3's mm_tokens_per_image: soft tokens per picture
IMAGE_AREA = 896 * 896  # ComfyUI first resizes a picture to about this many pixels
_PATCH = VISION_PREFIX + "embeddings.patch_embedding.weight"
_UNUSED_PREFIXES = (VISION_PREFIX, PROJECTOR_PREFIX, "lm_head.")  # of the language model (the tower loads apart)
_NEEDS = ("LTX-2's text encoder takes Gemma 3 12B (gemma_3_12B_it.safetensors or an fp8 copy, with its tokenizer) "
          "and LTX-2's checkpoint (ltx-2-19b-dev.safetensors) or its text projection")


def is_gemma3(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (or a header's shapes) holds a Gemma 3 language model in ComfyUI's layout, any size."""
    return _EMBED in sd and _PRE_FFN in sd and _Q_NORM in sd


def prompt_text(prompt: str) -> str:
    """The text ComfyUI tokenizes for `prompt` with prompt weights disabled: escaped brackets become brackets."""
    return prompt.replace("\\(", "(").replace("\\)", ")")


def token_ids(tokenizer: GemmaTokenizer, prompt: str) -> list[int]:
    """ComfyUI's tokens for `prompt`: `<bos>`, then the text tokenized whole (see the module docstring)."""
    return [BOS, *tokenizer.encode(prompt_text(prompt))]


def picture_token_ids(tokenizer: GemmaTokenizer, prompt: str) -> list[int]:
    """`token_ids` of a prompt with a picture: its first `<image_soft_token>` one IMAGE_TOKEN_ID (the picture's
    slot), the text before and after it tokenized apart; as `token_ids` when the prompt holds none."""
    text = prompt_text(prompt)
    if IMAGE_SOFT_TOKEN not in text:
        return [BOS, *tokenizer.encode(text)]
    before, after = text.split(IMAGE_SOFT_TOKEN, 1)
    return [BOS, *tokenizer.encode(before), IMAGE_TOKEN_ID, *tokenizer.encode(after)]


def left_padded(ids: list[int], min_length: int = MIN_LENGTH) -> tuple[Tensor, Tensor]:
    """(ids [1, L], mask [1, L] int64) of one prompt's tokens after `<pad>` tokens, L = max(min_length, tokens)."""
    length = max(min_length, len(ids))
    row = torch.full((1, length), PAD, dtype=torch.long)
    mask = torch.zeros_like(row)
    row[0, length - len(ids):], mask[0, length - len(ids):] = torch.tensor(ids), 1
    return row, mask


def normalized_features(states: Tensor) -> Tensor:
    """The feature extractor's input from one prompt's stacked states [B, layers, L, D] (its tokens only): each layer
    normalised over the tokens and width, SCALE * (x - mean) / (max - min + EPS), then [B, L, D * layers] with
    feature c * layers + layer."""
    x = states.float().movedim(1, -1)  # [B, L, D, layers]
    low, high = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    x = SCALE * (x - x.mean(dim=(1, 2), keepdim=True)) / (high - low + EPS)
    return x.flatten(2)


def gemma3_config_from_state_dict(sd: Mapping[str, Any]) -> Any:
    """transformers' Gemma3TextConfig of the language model in `sd`, its shape read from the weights (the head width
    from the q norm), computing as ComfyUI's Gemma 3 does (see the module docstring)."""
    from transformers import Gemma3TextConfig

    vocab, hidden = sd[_EMBED].shape
    layers = len({int(m[1]) for k in sd if (m := _LAYER.match(k))})
    head_dim = sd[_Q_NORM].shape[0]
    q_rows = sd["model.layers.0.self_attn.q_proj.weight"].shape[0]
    k_rows = sd["model.layers.0.self_attn.k_proj.weight"].shape[0]
    if q_rows % head_dim or k_rows % head_dim:
        raise ValueError(f"its attention ({q_rows} query rows, {k_rows} key rows) does not fit heads {head_dim} wide")
    mlp = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    layer_types = ["full_attention" if (i + 1) % SLIDING_PATTERN == 0 else "sliding_attention" for i in range(layers)]
    return Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                            num_attention_heads=q_rows // head_dim, num_key_value_heads=k_rows // head_dim,
                            head_dim=head_dim, query_pre_attn_scalar=head_dim, hidden_activation="gelu_pytorch_tanh",
                            rms_norm_eps=1e-6, max_position_embeddings=131072, sliding_window=SLIDING_WINDOW,
                            layer_types=layer_types, rope_parameters={"full_attention": dict(GLOBAL_ROPE),
                                                                      "sliding_attention": dict(LOCAL_ROPE)},
                            attn_logit_softcapping=None, final_logit_softcapping=None, use_cache=False,
                            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def _held(sd: Mapping[str, Tensor]) -> str:
    from ldm.gemma_text import gemma_kind
    from ldm.parts import look_of

    kind = gemma_kind(sd)
    if kind is not None:
        return "Gemma 2 (Lumina 2's text encoder)"
    look = look_of(sd)
    return look.what if look is not None else "no model layout Loom knows"


def gemma3_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype) -> tuple[Any, set[str]]:
    """transformers' Gemma3TextModel holding the language model in `sd`, frozen, in `dtype`, and the keys it used or
    knowingly ignored; a CheckpointError naming `name` when the file is not Gemma 3 or its weights do not fit."""
    from transformers import Gemma3TextModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    if not is_gemma3(sd):
        raise CheckpointError(f"{name}: not Gemma 3: it holds {_held(sd)}; {_NEEDS}")
    if TOKENIZER_KEY not in sd:
        raise CheckpointError(f"{name}: a Gemma 3 file without its tokenizer (no `spiece_model` tensor, which "
                              "Comfy-Org's gemma_3_12B_it.safetensors carries); Loom ships no Gemma tokenizer")
    try:
        config = gemma3_config_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    with torch.device("meta"):
        model = Gemma3TextModel(config).to(dtype)
    used = load_prefixed(model, sd, "model.", name, dtype, "Gemma 3")
    # buffers outside the state dict, left on the meta device: made here
    model.embed_tokens.embed_scale = torch.tensor(config.hidden_size**0.5, dtype=dtype)
    model.rotary_emb = Gemma3RotaryEmbedding(config)
    ignored = {k for k in sd if k.startswith(_UNUSED_PREFIXES) or k == TOKENIZER_KEY}
    return model.eval().requires_grad_(False), used | scaling_keys(sd) | ignored


class Gemma3Vision(nn.Module):
    """Gemma 3's picture reader: transformers' SiglipVisionModel (`vision_tower`, the file's ``vision_model.``) and
    Gemma3MultiModalProjector (`multi_modal_projector`), giving a picture's soft tokens (see the module docstring)."""

    def __init__(self, tower: nn.Module, projector: nn.Module, image_size: int) -> None:
        super().__init__()
        self.vision_tower = tower
        self.multi_modal_projector = projector
        self.image_size = image_size

    def forward(self, pixels: Tensor) -> Tensor:
        """Soft tokens [B, IMAGE_TOKENS, text width] of normalised pixels [B, 3, image_size, image_size]."""
        weight = self.multi_modal_projector.mm_input_projection_weight
        states = self.vision_tower(pixel_values=pixels.to(weight.device, weight.dtype)).last_hidden_state
        return self.multi_modal_projector(states)

    def pixels(self, image: Tensor) -> Tensor:
        """The first picture of an IMAGE [B, H, W, C] in 0..1 as ComfyUI hands it to the tower: [1, 3, image_size,
        image_size], resized to about IMAGE_AREA pixels ("area"), then shortest side, centre crop, mean and std 0.5."""
        from ldm.clip_vision import preprocess
        from ldm.siglip import SIGLIP_MEAN, SIGLIP_STD

        picture = image[:1].movedim(-1, 1).float()
        height, width = picture.shape[-2:]
        scale = math.sqrt(IMAGE_AREA / (height * width))
        picture = F.interpolate(picture, size=(round(height * scale), round(width * scale)), mode="area")
        return preprocess(picture.movedim(1, -1)[..., :3], self.image_size, True, SIGLIP_MEAN, SIGLIP_STD)


def has_vision(sd: Mapping[str, Any]) -> bool:
    """Whether a Gemma 3 file (or a header's shapes) holds the vision tower."""
    return _PATCH in sd


def gemma3_vision_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype,
                               text_config: Any) -> tuple[Gemma3Vision | None, set[str]]:
    """Gemma 3's vision tower and projector from a Gemma file's weights (None when it holds none), frozen, in
    `dtype`, and the keys they used; a CheckpointError naming `name` when they are incomplete or do not fit the
    language model (`text_config`)."""
    if not has_vision(sd):
        return None, set()
    from transformers import Gemma3Config, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    from ldm.siglip import siglip_config

    try:
        shape = siglip_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: Gemma 3's vision tower: {e}") from None
    grid = shape.image_size // shape.patch_size
    side = math.isqrt(IMAGE_TOKENS)
    if grid % side:
        raise CheckpointError(f"{name}: Gemma 3's vision tower has {grid} x {grid} patches, which do not pool to "
                              f"{side} x {side} soft tokens")
    vision = SiglipVisionConfig(hidden_size=shape.width, intermediate_size=shape.intermediate_size,
                                num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                image_size=shape.image_size, patch_size=shape.patch_size, vision_use_head=False)
    config = Gemma3Config(text_config=text_config.to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=IMAGE_TOKENS)
    with torch.device("meta"):
        tower = SiglipVisionModel(config.vision_config).to(dtype)
        projector = Gemma3MultiModalProjector(config).to(dtype)
    used = load_prefixed(tower, sd, VISION_PREFIX, name, dtype, "Gemma 3 vision tower")
    used |= load_prefixed(projector, sd, PROJECTOR_PREFIX, name, dtype, "Gemma 3 multi-modal projector")
    embeddings = tower.embeddings
    # a buffer outside the state dict, left on the meta device: made here
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    model = Gemma3Vision(tower, projector, shape.image_size).eval().requires_grad_(False)
    return model, used | {k for k in scaling_keys(sd) if k.startswith((VISION_PREFIX, PROJECTOR_PREFIX))}


class DualProjection(nn.Module):
    """LTX-2.3's feature extractor: each layer's states RMS-normed per token over the width, laid out [B, L, D *
    layers] (feature c * layers + layer), then projected to each stream's width, the input scaled by sqrt(that width /
    D) (ComfyUI's; diffusers' LTX2TextConnectors with per_modality_projections); the video's and the audio's features
    side by side [B, L, Dv + Da], which the transformer's connectors take apart."""

    def __init__(self, video: nn.Linear, audio: nn.Linear, width: int):
        super().__init__()
        self.video_aggregate_embed, self.audio_aggregate_embed, self.width = video, audio, width

    def forward(self, stacked: Tensor) -> Tensor:
        """[B, layers, L, D] states of a prompt's tokens -> [B, L, Dv + Da]."""
        x = stacked.float().movedim(1, -1)  # [B, L, D, layers]
        x = (x * torch.rsqrt(x.pow(2).mean(dim=2, keepdim=True) + 1e-6)).flatten(2)
        x = x.to(self.video_aggregate_embed.weight.dtype)
        return torch.cat([linear(x * math.sqrt(linear.out_features / self.width))
                          for linear in (self.video_aggregate_embed, self.audio_aggregate_embed)], dim=-1)


def _linear(sd: Mapping[str, Tensor], prefix: str, dtype: torch.dtype, in_features: int, name: str) -> nn.Linear:
    weight = sd[prefix + "weight"]
    if weight.ndim != 2 or weight.shape[1] != in_features:
        raise CheckpointError(f"{name}: its text projection {tuple(weight.shape)} does not take the Gemma's "
                              f"{in_features} features (width times layers + 1)")
    bias = prefix + "bias" in sd
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=dtype)
    scale = sd.get(prefix + "scale_weight", sd.get(prefix + "weight_scale"))
    tensors = {"weight": (weight if scale is None else descale(weight, scale)).to(dtype)}
    if bias:
        tensors["bias"] = sd[prefix + "bias"].to(dtype)
    linear.load_state_dict(tensors, assign=True)
    return linear.requires_grad_(False)


def projection_from_weights(sd: Mapping[str, Tensor], name: str, dtype: torch.dtype, width: int,
                            layers: int) -> tuple[nn.Module, set[str]]:
    """The feature extractor's projection (of the `width` * `layers` states of the Gemma it follows) from an
    LTX-2 checkpoint's or projection file's weights, frozen, in `dtype`, and the keys it used: LTX-2's one linear map
    (its input normalised by `normalized_features`), or LTX-2.3's `DualProjection`."""
    if _DUAL_PROJECTION in sd:
        prefixes = tuple(f"{PROJECTION_KEYS[1]}{part}_aggregate_embed." for part in ("video", "audio"))
        if prefixes[1] + "weight" not in sd:
            raise CheckpointError(f"{name}: LTX-2.3's video text projection without its audio one "
                                  f"(`{prefixes[1]}weight`)")
        video, audio = (_linear(sd, p, dtype, width * layers, name) for p in prefixes)
        module: nn.Module = DualProjection(video, audio, width)
    else:
        prefix = next((p for p in PROJECTION_KEYS if p + "weight" in sd), None)
        if prefix is None:
            raise CheckpointError(f"{name}: no LTX-2 text projection (`{PROJECTION_KEYS[0]}weight` or "
                                  f"`{PROJECTION_KEYS[1]}weight`); {_NEEDS}")
        prefixes, module = (prefix,), _linear(sd, prefix, dtype, width * layers, name)
    used = {p + suffix for p in prefixes for suffix in ("weight", "bias")} & set(sd)
    return module, used | {k for k in scaling_keys(sd) if k.startswith(prefixes)}


class LTX2TextEncoder(PinnableTextEncoder):
    """Gemma 3 and LTX-2's feature extractor, encoding as ComfyUI does (see the module docstring); the interface of
    ``ldm.text_encoders.TextEncoder``: `encode` gives each prompt's features, no pooled vector, and the attention
    mask in `extra["attention_mask"]`. Pinned to the CPU (`pinned_to_cpu`, the loader's device "cpu"), `.to()`
    changes its dtype only."""

    main_encoder = ENCODER_NAME

    def __init__(self, model: Any, projection: nn.Linear, tokenizer: GemmaTokenizer, min_length: int = MIN_LENGTH,
                 vision: Gemma3Vision | None = None) -> None:
        super().__init__()
        self.gemma3_12b = model
        self.text_embedding_projection = projection
        self.tokenizer = tokenizer
        self.min_length = min_length
        self.vision = vision  # None: the file held no vision tower, pictures are refused

    def picture_tokens(self, image: Tensor) -> Tensor:
        """The soft tokens [IMAGE_TOKENS, width] of the first picture of an IMAGE [B, H, W, C] in 0..1, in the
        language model's dtype on its device (see the module docstring); the encoder must have its `vision`."""
        if self.vision is None:
            raise ValueError("this Gemma 3 was loaded without a vision tower")
        embed = self.gemma3_12b.embed_tokens.weight
        return self.vision(self.vision.pixels(image))[0].to(embed.device, embed.dtype)

    def encode(self, prompts: list[str], clip_skip: int | None = None, per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """`cond`: [B, L, projection width] float32, L the longest prompt's tokens (with `<bos>`), zeros after each
        prompt's; `extra["attention_mask"]`: [B, L] int64. Clip skip, prompt weights and textual-inversion
        embeddings do not apply."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = (per_encoder or {}).get(ENCODER_NAME, prompts)
        rows = [self.features(token_ids(self.tokenizer, p)) for p in prompts]
        length = max(len(row) for row in rows)
        cond = torch.zeros(len(rows), length, rows[0].shape[-1], device=rows[0].device)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            cond[i, :len(row)], mask[i, :len(row)] = row, 1
        return TextEncoding(cond, None, {ATTENTION_MASK: mask})

    def features(self, ids: list[int]) -> Tensor:
        """One prompt's features [tokens, projection width] float32 from its token ids (`token_ids`)."""
        padded, mask = left_padded(ids, self.min_length)
        device = self.gemma3_12b.device
        states = self.gemma3_12b(input_ids=padded.to(device), attention_mask=mask.to(device),
                                 output_hidden_states=True).hidden_states
        stacked = torch.stack([s[:, -len(ids):] for s in states], dim=1)  # [1, layers + 1, tokens, D]
        projection = self.text_embedding_projection
        if isinstance(projection, DualProjection):  # LTX-2.3's: it normalises its input itself
            return projection(stacked)[0].float()
        return projection(normalized_features(stacked).to(projection.weight.dtype))[0].float()


@dataclass
class LoadedLTX2Text:
    encoder: LTX2TextEncoder
    unused_keys: list[str]  # "file name: key" (the Gemma file's only: the LTX-2 file is read for its projection)
    family: str = FAMILY


def ltx2_text_encoder_from_state_dicts(gemma_sd: Mapping[str, Tensor], ltx_sd: Mapping[str, Tensor],
                                       gemma_name: str = "Gemma 3", ltx_name: str = "LTX-2",
                                       device: torch.device | str = "cpu",
                                       dtype: torch.dtype = torch.float32) -> LoadedLTX2Text:
    """LTX-2's text encoder from Gemma 3's weights (gemma_3_12B_it.safetensors' layout, its tokenizer included) and
    LTX-2's (the checkpoint's, any part of it holding the projection, or a projection file's); the names name them
    in errors."""
    gemma_sd = dequantizing(gemma_sd)  # Comfy-Org's gemma_3_12B_it_fp4_mixed: NVFP4 layers read one at a time
    model, used = gemma3_from_weights(gemma_sd, gemma_name, dtype)
    config = model.config
    vision, _ = gemma3_vision_from_weights(gemma_sd, gemma_name, dtype, config)
    projection, _ = projection_from_weights(ltx_sd, ltx_name, dtype, config.hidden_size, config.num_hidden_layers + 1)
    tokenizer = GemmaTokenizer.from_tensor(gemma_sd[TOKENIZER_KEY])
    unused = sorted(f"{gemma_name}: {k}" for k in gemma_sd if k not in used)
    encoder = LTX2TextEncoder(model, projection, tokenizer, vision=vision)
    return LoadedLTX2Text(encoder.to(device).eval(), unused)


def projection_state(path: str | Path) -> dict[str, Tensor]:
    """The text projection's tensors (and their fp8 scales) of an LTX-2 checkpoint or projection file, the rest of a
    .safetensors file left on disk."""
    path = Path(path)
    shapes = ckpt.read_shapes(path)
    if shapes is None:
        return {k: v for k, v in ckpt.load_state_dict(path).items() if k.startswith(PROJECTION_KEYS[1])}
    with safetensors.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in shapes if k.startswith(PROJECTION_KEYS[1])}


def load_ltx2_text_encoder(gemma_path: str | Path, ltx_path: str | Path, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> LoadedLTX2Text:
    """ComfyUI's LTXAVTextEncoderLoader: a Gemma 3 12B file (text_encoder) and an LTX-2 checkpoint or text projection
    file (ckpt_name), on `device` in `dtype`."""
    gemma_path, ltx_path = Path(gemma_path), Path(ltx_path)
    return ltx2_text_encoder_from_state_dicts(ckpt.load_state_dict(gemma_path), projection_state(ltx_path),
                                              gemma_path.name, ltx_path.name, device, dtype)


def tiny_gemma3_state(seed: int = 0, hidden: int = 32, layers: int = 3, vision: bool = False) -> dict[str, Tensor]:
    """Random Gemma 3 weights in Comfy-Org's layout with a tiny tokenizer (ldm.gemma_text's `tiny_spiece_model`) as
    `spiece_model`: a language model `hidden` wide, 4 heads of hidden // 2, 2 key/value heads, MLP 2 * hidden; with
    `vision`, also a tiny vision tower and projector (`tiny_gemma3_vision_state`, drawn after the language model, whose
    weights stay those drawn without)."""
    generator = torch.Generator().manual_seed(seed)
    state = tiny_gemma_language_model(generator, hidden, hidden // 2, layers, qk_norms=True)
    return state | (tiny_gemma3_vision_state(generator, hidden) if vision else {})


def tiny_gemma3_vision_state(generator: torch.Generator, hidden: int, width: int = 32, layers: int = 2,
                             patch: int = 28) -> dict[str, Tensor]:
    """Random weights of a tiny Gemma 3 vision tower in Comfy-Org's layout: SigLIP `width` wide (2 heads), `layers`
    layers, MLP 2 * width, `patch`-pixel patches of an 896-pixel picture (32 x 32 for 28, pooled 2 x 2 to the 256 soft
    tokens), and the projector to a language model `hidden` wide."""
    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    grid = 896 // patch
    layer = {"layer_norm1.weight": (width,), "layer_norm1.bias": (width,), "layer_norm2.weight": (width,),
             "layer_norm2.bias": (width,), "mlp.fc1.weight": (2 * width, width), "mlp.fc1.bias": (2 * width,),
             "mlp.fc2.weight": (width, 2 * width), "mlp.fc2.bias": (width,)}
    layer |= {f"self_attn.{p}_proj.{w}": (width, width) if w == "weight" else (width,)
              for p in ("q", "k", "v", "out") for w in ("weight", "bias")}
    tower = {"embeddings.patch_embedding.weight": rand(width, 3, patch, patch) / 4,
             "embeddings.patch_embedding.bias": rand(width),
             "embeddings.position_embedding.weight": rand(grid**2, width),
             "post_layernorm.weight": 1 + rand(width), "post_layernorm.bias": rand(width)}
    for i in range(layers):
        # LayerNorm weights around 1, as trained ones are
        tower |= {f"encoder.layers.{i}.{name}": rand(*shape) + name.endswith(("norm1.weight", "norm2.weight"))
                  for name, shape in layer.items()}
    state = {VISION_PREFIX + k: v for k, v in tower.items()}
    state[PROJECTOR_PREFIX + "mm_input_projection_weight"] = rand(width, hidden)
    state[PROJECTOR_PREFIX + "mm_soft_emb_norm.weight"] = rand(width)
    return state


def tiny_projection_state(seed: int = 0, hidden: int = 32, layers: int = 3,
                          width: int | None = None) -> dict[str, Tensor]:
    """A random text projection in LTX-2's checkpoint layout for a tiny Gemma 3 `hidden` wide with `layers` layers:
    ``text_embedding_projection.aggregate_embed.weight`` [width (default `hidden`), hidden * (layers + 1)], for a
    tiny LTX-2 checkpoint to carry."""
    generator = torch.Generator().manual_seed(seed)
    features = hidden * (layers + 1)
    weight = torch.randn((width or hidden, features), generator=generator) / features**0.5
    return {PROJECTION_KEYS[0] + "weight": weight}


def write_tiny_gemma3(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float16, hidden: int = 32,
                      layers: int = 3, vision: bool = False) -> Path:
    """A tiny random Gemma 3 file in Comfy-Org's layout, its tokenizer embedded (see `tiny_gemma3_state`; with
    `vision`, a tiny vision tower too), a stand-in for gemma_3_12B_it.safetensors; a tiny LTX-2 checkpoint takes
    `tiny_projection_state(hidden=hidden, layers=layers)` with it."""
    path = Path(path)
    write_safetensors(tiny_gemma3_state(seed, hidden, layers, vision), path, {"loom.seed": str(seed)}, dtype)
    return path
