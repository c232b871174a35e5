"""CLIP vision encoders (the image half of CLIP): read their files, preprocess images as CLIP does, encode.

What they are for here: an image prompt. SD 2.1 unCLIP takes the projected image embedding as its `y`
(`ldm.unclip`); the T2I-Adapter style model turns the last hidden state into extra prompt tokens
(`ldm.style_model`); IP-Adapter-style plugins read the penultimate hidden states.

Two file layouts, both read into transformers' `CLIPVisionModelWithProjection`:
- transformers' (`vision_model.*`, `visual_projection.weight`): OpenAI's ViT-L/14, and the LAION ViT-H/14 and
  ViT-bigG/14 files IP-Adapter users keep in models/clip_vision;
- open_clip's (`conv1`, `transformer.resblocks.N.attn.in_proj_weight`, `proj`...), bare under `visual.` or
  inside an SD 2.1 unCLIP checkpoint under `embedder.model.visual.`; renamed explicitly (`_open_clip_pairs`).
The weights do not say which activation or how many heads a tower uses: OpenAI's towers (up to ViT-L, 1024
wide) use QuickGELU, LAION's ViT-H and bigG (1280 and 1664 wide) GELU, as ComfyUI's configs for them say;
every released tower has 16 heads from ViT-L up (64-wide heads below).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import safetensors
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _materialize, load_state_dict, read_shapes

# CLIP's image normalisation (OpenAI's, which the LAION towers were trained with too).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

UNCLIP_PREFIX = "embedder.model.visual."  # an SD 2.1 unCLIP checkpoint's image encoder
_HF_PROBE = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
_OPEN_CLIP_PROBE = "transformer.resblocks.0.attn.in_proj_weight"
# Where a file keeps its tower: (prefix, layout, the part of the file that belongs to the image encoder, whose
# other keys are reported as unused: in an unCLIP checkpoint, only `embedder.*` is the encoder's).
_LAYOUTS = ((UNCLIP_PREFIX, "open_clip", "embedder."), ("visual.", "open_clip", ""), ("", "hf", ""))
# Keys no computation reads: a position-id buffer (rebuilt, never loaded, as for the text encoders).
_IGNORED = ("vision_model.embeddings.position_ids",)
_HEADS = {1024: 16, 1280: 16, 1664: 16}  # ViT-L/14, ViT-H/14 (80-wide heads), ViT-bigG/14 (104-wide)


@dataclass(frozen=True)
class ClipVisionConfig:
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    projection_dim: int
    intermediate_size: int
    activation: str  # "quick_gelu" (OpenAI's towers) or "gelu" (LAION's)


@dataclass(eq=False)
class ClipVisionOutput:
    """What CLIP Vision Encode gives (CLIP_VISION_OUTPUT), under the attribute names of ComfyUI's
    `comfy.clip_vision.Output`, item access included (`out["image_embeds"]`), so that plugins written for it
    read it: `image_embeds` [B, projection_dim] (the projected class token), `last_hidden_state` [B, tokens,
    width] (the last layer's output, before the final LayerNorm), `penultimate_hidden_states` (the layer
    before's; IP-Adapter Plus reads it). `mm_projected` is None, as ComfyUI's is for CLIP towers."""

    last_hidden_state: Tensor
    image_embeds: Tensor
    penultimate_hidden_states: Tensor
    mm_projected: Tensor | None = None

    def __getitem__(self, key: str) -> Tensor | None:
        return getattr(self, key)

    def __setitem__(self, key: str, value: Tensor | None) -> None:
        setattr(self, key, value)

    def cache_size(self) -> int:
        tensors = [getattr(self, f.name) for f in fields(self)]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


@dataclass(frozen=True)
class _KeyPair:
    open_clip: str  # the name under the open_clip prefix
    hf: tuple[str, ...]
    kind: str = "copy"  # "copy", "transpose" (open_clip's `proj` is x @ P) or "split" (fused q, k, v)


_OPEN_CLIP_NAMES = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' name
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPEN_CLIP_LAYER_MODULES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _open_clip_pairs(layers: int) -> list[_KeyPair]:
    """Every open_clip vision weight with the transformers names it becomes (the attention's fused input
    projection holds q, k and v stacked in that order)."""
    pairs = [_KeyPair(ours, (theirs,)) for ours, theirs in _OPEN_CLIP_NAMES.items()]
    pairs.append(_KeyPair("proj", ("visual_projection.weight",), "transpose"))
    for i in range(layers):
        block, layer = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        pairs += [_KeyPair(f"{block}{ours}.{param}", (f"{layer}{theirs}.{param}",))
                  for ours, theirs in _OPEN_CLIP_LAYER_MODULES.items() for param in ("weight", "bias")]
        pairs += [_KeyPair(f"{block}attn.in_proj_{param}",
                           tuple(f"{layer}self_attn.{p}_proj.{param}" for p in "qkv"), "split")
                  for param in ("weight", "bias")]
    return pairs


def _layers(keys: list[str], pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _what_else(sd: StateDict) -> str:
    """A hint at what a file that holds no CLIP vision tower is instead."""
    if any(k.startswith("model.diffusion_model.") for k in sd):
        return ("a Stable Diffusion checkpoint without an image encoder (of checkpoints, only unCLIP ones hold "
                "one: load those with unCLIPCheckpointLoader)")
    if any(k.startswith(("text_model.", "transformer.resblocks.", "cond_stage_model.")) for k in sd):
        return "a CLIP text encoder (load it with Load CLIP)"
    return "no vision_model.* (transformers) or visual.* (open_clip) weights of a CLIP image tower"


def to_transformers(sd: StateDict, name: str = "file") -> tuple[StateDict, list[str]]:
    """The tower's weights under transformers' names, and the keys of the file's image-encoder part that no
    weight came from (unused). Raises CheckpointError when the state dict holds no CLIP vision tower."""
    layout = next(((prefix, kind, root) for prefix, kind, root in _LAYOUTS
                   if prefix + (_OPEN_CLIP_PROBE if kind == "open_clip" else _HF_PROBE) in sd), None)
    if layout is None:
        raise CheckpointError(f"{name}: not a CLIP vision model: {_what_else(sd)}")
    prefix, kind, root = layout
    if kind == "hf":
        weights = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))
                   and k not in _IGNORED}
        used = set(weights) | {k for k in _IGNORED if k in sd}
    else:
        # A whole CLIP model, or one cut down (an unCLIP checkpoint's embedder): what it keeps of the text half
        # beside `visual.` (token and position embeddings, `transformer.*`, ln_final, text_projection,
        # logit_scale) is known and read by nothing here, so not reported.
        model = prefix.removesuffix("visual.")
        text_half = {k for k in sd if k.startswith(model) and not k.startswith(prefix)}
        layers = _layers(list(sd), rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
        weights, used, missing = {}, set(), []
        for pair in _open_clip_pairs(layers):
            key = prefix + pair.open_clip
            if key not in sd:
                missing.append(key)
                continue
            used.add(key)
            tensor = sd[key]
            parts = (tensor.chunk(3, dim=0) if pair.kind == "split"
                     else (tensor.t(),) if pair.kind == "transpose" else (tensor,))
            weights.update(zip(pair.hf, parts, strict=True))
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise CheckpointError(f"{name}: incomplete CLIP vision model: no {shown}")
        used |= text_half
    return weights, sorted(k for k in sd if k.startswith(root) and k not in used)


def open_clip_state_dict(model: ClipVisionModel, prefix: str = "visual.") -> StateDict:
    """The tower's weights in open_clip's layout under `prefix` (the inverse of `to_transformers`): how SD 2.1
    unCLIP checkpoints store theirs (`UNCLIP_PREFIX`)."""
    state = model.model.state_dict()
    out = {}
    for pair in _open_clip_pairs(model.config.layers):
        tensors = [state[name] for name in pair.hf]
        out[prefix + pair.open_clip] = (torch.cat(tensors) if pair.kind == "split"
                                        else tensors[0].t().contiguous() if pair.kind == "transpose" else tensors[0])
    return out


def clip_vision_config(weights: StateDict, activation: str | None = None) -> ClipVisionConfig:
    """The tower's shape from its weights (transformers' names); `activation` overrides the rule by width."""
    try:
        width = weights["vision_model.embeddings.class_embedding"].shape[0]
        patch_size = weights["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        positions = weights["vision_model.embeddings.position_embedding.weight"].shape[0]
        intermediate = weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = weights["visual_projection.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"incomplete CLIP vision model: no weight {e}") from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointError(f"CLIP vision model with {positions} position embeddings: not a square grid "
                              "of patches and a class token")
    heads = _HEADS.get(width) or (width // 64 if width % 64 == 0 else max(1, width // 16))
    return ClipVisionConfig(
        width=width, layers=_layers(list(weights), r"vision_model\.encoder\.layers\.(\d+)\."), heads=heads,
        patch_size=patch_size, image_size=grid * patch_size, projection_dim=projection,
        intermediate_size=intermediate, activation=activation or ("gelu" if width >= 1280 else "quick_gelu"))


def preprocess(image: Tensor, size: int, crop: bool = True, mean: tuple[float, ...] = CLIP_MEAN,
               std: tuple[float, ...] = CLIP_STD) -> Tensor:
    """An IMAGE [B, H, W, C] in 0..1 as CLIP sees it: [B, 3, size, size] normalised with `mean` and `std` (CLIP's
    by default; SigLIP's are 0.5).

    As CLIP's processors do: the shortest side resized to `size` (bicubic, antialiased), the centre cropped;
    `crop=False` squashes the whole image to size x size instead (ComfyUI's crop "none"). Values are then
    rounded to 8 bits, as the processors see pictures, before normalising.
    """
    pixels = image[..., :3].movedim(-1, 1).float()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    height, width = pixels.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        target = (round(height * scale), round(width * scale)) if crop else (size, size)
        pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True)
        top, left = (pixels.shape[-2] - size) // 2, (pixels.shape[-1] - size) // 2
        pixels = pixels[..., top:top + size, left:left + size]
    pixels = (pixels.clamp(0, 1) * 255).round() / 255
    mean, std = (torch.tensor(v, device=pixels.device).view(1, 3, 1, 1) for v in (mean, std))
    return (pixels - mean) / std


class ClipVisionModel(nn.Module):
    """A CLIP image tower with its projection: transformers' `CLIPVisionModelWithProjection` as `model`."""

    def __init__(self, config: ClipVisionConfig) -> None:
        # Imported here: transformers takes seconds to import.
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        super().__init__()
        self.config = config
        self.model = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=config.width, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, image_size=config.image_size,
            patch_size=config.patch_size, projection_dim=config.projection_dim, hidden_act=config.activation,
            layer_norm_eps=1e-5))

    @torch.no_grad()
    def encode(self, image: Tensor, crop: bool = True) -> ClipVisionOutput:
        """Encode an IMAGE [B, H, W, C] in 0..1 (see `preprocess`); tensors come on the model's device."""
        weight = self.model.visual_projection.weight
        pixels = preprocess(image.to(weight.device), self.config.image_size, crop).to(weight.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return ClipVisionOutput(out.last_hidden_state, out.image_embeds, out.hidden_states[-2])


@dataclass
class LoadedClipVision:
    model: nn.Module  # a ClipVisionModel, or an ldm.siglip.SiglipVision (the same `encode`)
    unused_keys: list[str]
    path: Path


def _read(path: Path) -> StateDict:
    """The file's tensors; of an unCLIP checkpoint in safetensors, only its image encoder's (`embedder.*`),
    read without the gigabytes of UNet around them."""
    try:
        shapes = read_shapes(path)
        if shapes is None or not any(k.startswith(UNCLIP_PREFIX) for k in shapes):
            return load_state_dict(path)
        with safetensors.safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in shapes if k.startswith("embedder.")}
    except (safetensors.SafetensorError, OSError) as e:  # read_shapes reads the header unguarded
        raise CheckpointError(f"{path.name}: unreadable or truncated safetensors file ({e})") from None


def load_clip_vision(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     activation: str | None = None) -> LoadedClipVision:
    """A CLIP vision tower from a file in either layout (an SD 2.1 unCLIP checkpoint's too), on `device` in
    `dtype`. Every key of the file's image-encoder part is used or listed in `unused_keys`; a file holding no
    tower raises CheckpointError saying what it seems to be."""
    path = Path(path)
    weights, unused = to_transformers(_read(path), path.name)
    from ldm.siglip import is_siglip, load_siglip  # SigLIP reuses this module's preprocessing and output

    if is_siglip(weights):  # Flux Redux's image encoder: no class token, no projection
        siglip, more = load_siglip(weights, path, device, dtype)
        return LoadedClipVision(siglip, sorted({*unused, *more}), path)
    try:
        config = clip_vision_config(weights, activation)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: ClipVisionModel(config), {f"model.{k}": v for k, v in weights.items()},
                         "CLIP vision model", path, device, dtype)
    embeddings = model.model.vision_model.embeddings
    # A non-persistent buffer, left on the meta device by the weights-only load.
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
    return LoadedClipVision(model, unused, path)
