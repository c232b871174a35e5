"""Separately distributed model parts: UNet-only and CLIP text-encoder-only files, in LDM, diffusers and HF layouts.

A UNet file holds LDM keys (with or without `model.diffusion_model.`) or diffusers' names, renamed by a table
built from its own block counts; its family comes from the checkpoint family rules. A text-encoder file (one
CLIP-L, OpenCLIP-H or bigG, in transformers' or OpenCLIP's names) is told apart by its shape; the kinds loaded
together say the family. Every key is used, ignored by name, or listed as unused; other files are refused with
what they look like.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm import checkpoint as ckpt
from ldm.checkpoint import FAMILY_RULES, UNET_PREFIX, VAE_PREFIX, CheckpointError, ModelFamily, StateDict
from ldm.lora_formats import LORA_SUFFIXES
from ldm.lora_keys_sd import diffusers_unet_blocks, rename_path
from ldm.text_encoders import TextEncoder, TextEncoderConfig, text_encoder_config_from_state_dict
from ldm.unet import UNetConfig, UNetModel
from ldm.vae import VAEConfig

# --- what a file looks like ----------------------------------------------------------------------------

def _starts(*prefixes: str) -> Callable[[set[str]], bool]:
    return lambda keys: any(k.startswith(prefixes) for k in keys)


def _contains(*parts: str) -> Callable[[set[str]], bool]:
    return lambda keys: any(p in k for k in keys for p in parts)


@dataclass(frozen=True)
class Look:
    """One kind of weights file: how to recognise it from its key names, and what to do with it."""

    kind: str
    what: str
    advice: str
    matches: Callable[[set[str]], bool]


_UNSUPPORTED = "Loom runs SD1.x, SD2.x, SDXL, SD3 and Flux.1 models only"
# First match wins; the part kinds Loom loads ("unet", "text_encoder") come after the look-alikes they contain.
LOOKS: tuple[Look, ...] = (
    Look("checkpoint", "a full checkpoint (UNet, VAE and text encoders in one file)",
         "put it in models/checkpoints and load it with Load Checkpoint",
         lambda keys: _starts(UNET_PREFIX + "input_blocks.")(keys)
         and _starts(VAE_PREFIX, "cond_stage_model.", "conditioner.")(keys)),
    Look("lora", "a LoRA", "put it in models/loras and apply it with Load LoRA",
         lambda keys: any(k.endswith(LORA_SUFFIXES) for k in keys) or _starts("lora_unet_", "lora_te")(keys)),
    Look("controlnet", "a ControlNet", "put it in models/controlnet and load it with Load ControlNet Model",
         _starts("control_model.", "input_hint_block.", "zero_convs.", "controlnet_cond_embedding.")),
    Look("t2i_adapter", "a T2I-Adapter", "put it in models/controlnet and load it with Load ControlNet Model",
         _starts("adapter.body.", "body.0.block1.", "body.0.in_conv.")),
    Look("hunyuan_video15", "a HunyuanVideo 1.5 diffusion model", "put it in models/diffusion_models and load it with "
         "Load Diffusion Model", lambda keys: "cond_type_embedding.weight" in keys
         or UNET_PREFIX + "cond_type_embedding.weight" in keys),
    Look("hunyuan_image21", "a HunyuanImage 2.1 diffusion model", "put it in models/diffusion_models and load it with "
         "Load Diffusion Model", lambda keys: _contains("txt_in.individual_token_refiner.")(keys)
         and _contains("single_blocks.0.")(keys) and not _contains("vector_in.")(keys)),
    Look("latent_upscale_model", "a latent upscale model (HunyuanVideo 1.5's or LTX-2's)", "put it in "
         "models/latent_upscale_models and load it with Load Latent Upscale Model",
         lambda keys: {"conv_in.conv.weight", "up.0.block.0.conv1.conv.weight"} <= keys
         or "post_upsample_res_blocks.0.conv2.bias" in keys),
    Look("flux2", "a FLUX.2 diffusion model (dev or klein)", "put it in models/diffusion_models and load it with Load "
         "Diffusion Model (Black Forest Labs' layout: flux2_dev, flux-2-klein-4b / 9b)",
         _contains("single_stream_modulation.lin.")),
    Look("flux", "a Flux diffusion model", "put it in models/diffusion_models and load it with Load Diffusion "
         "Model (Black Forest Labs' layout, flux1-dev.safetensors, or a diffusers transformer/ file or its shards)",
         _contains("double_blocks.0.img_attn.", "single_transformer_blocks.0.")),
    Look("sd3", "an SD3 diffusion model (MMDiT)", "load a transformer file (Stability's layout or diffusers') "
         "from models/diffusion_models with Load Diffusion Model, or an SD3 checkpoint with Load Checkpoint, adding "
         "TripleCLIPLoader where the file has no text encoders",
         _contains("joint_blocks.0.context_block.", "transformer_blocks.0.attn.add_k_proj.")),
    Look("umt5", "UMT5-XXL, Wan's text encoder (T5's layout, a position bias in every block)", "put it in "
         "models/text_encoders and load it with Load CLIP, type wan",
         lambda keys: "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in keys),
    Look("t5", "a T5 text encoder (SD3, Flux and video models use it; byT5 is HunyuanVideo 1.5's and HunyuanImage "
         "2.1's glyph encoder)", "for Flux, put it in models/text_encoders and load it with DualCLIPLoader, type flux, "
         "with a CLIP-L file; for SD3, with TripleCLIPLoader; byT5 with DualCLIPLoader, type hunyuan_video_15 or "
         "hunyuan_image, with Qwen2.5-VL-7B",
         _contains("SelfAttention.k.weight", "DenseReluDense.")),
    Look("qwen25vl", "Qwen2.5-VL, Qwen-Image's, HunyuanVideo 1.5's and HunyuanImage 2.1's text encoder (a Qwen2 "
         "language model with q/k/v biases)", "put it in models/text_encoders and load it with Load CLIP, type "
         "qwen_image (Qwen-Image), or DualCLIPLoader, type hunyuan_video_15 or hunyuan_image, with the byT5 file",
         lambda keys: {"model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.bias"} <= keys),
    Look("qwen3", "Qwen3 (Qwen3-4B is Z-Image's text encoder: a language model with q/k norms)", "put it in "
         "models/text_encoders and load it with Load CLIP, type lumina2",
         lambda keys: {"model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"} <= keys
         and "model.layers.0.pre_feedforward_layernorm.weight" not in keys),  # Gemma 3 has q/k norms too
    Look("gemma2", "Gemma 2 (Gemma-2-2B is Lumina Image 2.0's text encoder)", "put it in models/text_encoders and "
         "load it with Load CLIP, type lumina2",
         lambda keys: {"model.embed_tokens.weight", "model.layers.0.pre_feedforward_layernorm.weight"} <= keys
         and "model.layers.0.self_attn.q_norm.weight" not in keys),
    Look("llama3", "Llama 3 (Llama 3.1 8B Instruct is HiDream-I1's fourth text encoder)", "put it in "
         "models/text_encoders and load it with QuadrupleCLIPLoader, with HiDream's CLIP-L, CLIP-G and T5-XXL files",
         lambda keys: {"model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight"} <= keys
         and not keys & {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_proj.bias",
                         "model.layers.0.pre_feedforward_layernorm.weight", "tekken_model"}),
    Look("llm", "a language-model text encoder (Llama, Gemma, Qwen: newer model families use them)", _UNSUPPORTED,
         _contains("embed_tokens.weight")),
    Look("clip_vision", "a CLIP vision model (it encodes images, for unCLIP and IP-Adapter)", _UNSUPPORTED,
         lambda keys: _starts("vision_model.", "visual.")(keys) and not _contains("token_embedding")(keys)),
    Look("vae", "a VAE", "put it in models/vae and load it with Load VAE",
         lambda keys: bool(keys & {"encoder.conv_in.weight", "encoder.conv_in.conv.weight"})
         or _starts(VAE_PREFIX)(keys)),
    Look("unet", "an SD UNet (diffusion model)",
         "put it in models/diffusion_models and load it with Load Diffusion Model",
         lambda keys: _starts(UNET_PREFIX + "input_blocks.", "input_blocks.", "down_blocks.0.resnets.")(keys)),
    Look("text_encoder", "a CLIP text encoder", "put it in models/text_encoders and load it with Load CLIP "
         "(DualCLIPLoader for SDXL's pair)", _contains("token_embedding.weight")),
    Look("embedding", "a textual inversion embedding", "put it in models/embeddings and write embedding:NAME in a "
         "prompt", lambda keys: bool(keys) and keys <= {"emb_params", "clip_l", "clip_g", "string_to_param.*"}),
    Look("upscaler", "an upscale model", "load it with Load Upscale Model",
         lambda keys: "conv_first.weight" in keys or "model.0.weight" in keys),
)


def look_of(keys: Iterable[str]) -> Look | None:
    """What a weights file is, from its key names (None when nothing known matches)."""
    names = {"string_to_param.*" if k.startswith("string_to_param.") else k for k in keys}
    return next((look for look in LOOKS if look.matches(names)), None)


def _refuse(path: Path, keys: Iterable[str], wanted: str) -> CheckpointError:
    keys = sorted(keys)
    look = look_of(keys)
    if look is None:
        shown = ", ".join(keys[:4]) or "none"
        return CheckpointError(f"{path.name} is not {wanted}: its {len(keys)} tensors ({shown}, ...) match no "
                               "model layout Loom knows")
    return CheckpointError(f"{path.name} is not {wanted}: it looks like {look.what}; {look.advice}")


# --- UNet ----------------------------------------------------------------------------------------------

# Inside a ResNet block, diffusers' names -> LDM's.
_DIFFUSERS_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def _diffusers_unet_names(keys: list[str]) -> dict[str, str]:
    """diffusers key -> LDM key, for every key a UNet of this file's block counts has (others are absent)."""
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    depths = tuple(len(_indices(keys, rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\."))
                   for level in levels)
    shape = UNetConfig(channel_mult=(1,) * len(levels), transformer_depth=depths,
                       num_res_blocks=len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\.")))
    to_ldm = {theirs: ours for ours, theirs in diffusers_unet_blocks(shape).items()}
    names = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        ldm = rename_path(module, to_ldm, _DIFFUSERS_RESNET)
        if ldm is not None:
            names[key] = f"{ldm}.{param}"
    return names


def unet_names(keys: Iterable[str], path: Path) -> tuple[dict[str, str], str]:
    """(file key -> LDM key without prefix, layout) of a UNet-only file; refuses any other kind of file."""
    keys = list(keys)
    look = look_of(keys)
    if look is None or look.kind != "unet":
        raise _refuse(path, keys, "a UNet-only file")
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return {k: k[len(UNET_PREFIX):] for k in keys if k.startswith(UNET_PREFIX)}, "ldm"
    if "input_blocks.0.0.weight" in keys:
        return {k: k for k in keys}, "ldm_unprefixed"
    return _diffusers_unet_names(keys), "diffusers"


def unet_family(weights: StateDict, metadata: dict[str, str] | None = None,
                v_prediction: bool | None = None, markers: Collection[str] = ()) -> ModelFamily:
    """Family and exact UNet shape from LDM-named UNet weights (no prefix), by the checkpoint family rules.

    A UNet file says nothing of its VAE: the family's standard one (with its latent scale) stands in.
    """
    metadata = metadata or {}
    prefixed = {UNET_PREFIX + k: v for k, v in weights.items()}
    rule = next((r for r in FAMILY_RULES if r.matches(prefixed)), None)
    if rule is None:
        raise CheckpointError("no SD1/SD2/SDXL UNet weights (input_blocks.0.0.weight)")
    try:
        config = ckpt._unet_config(prefixed, ckpt.head_layout(rule, metadata))
    except (KeyError, StopIteration) as e:
        raise CheckpointError(f"incomplete {rule.name} UNet: no weight {e}") from None
    return ModelFamily(rule.name, ckpt._prediction(rule, metadata, v_prediction, markers), config,
                       VAEConfig(scaling_factor=rule.scaling_factor), zero_snr="ztsnr" in markers)


@dataclass
class LoadedUNet:
    family: ModelFamily
    unet: UNetModel
    layout: str  # "ldm" (model.diffusion_model.), "ldm_unprefixed" or "diffusers"
    unused_keys: list[str]
    path: Path
    metadata: dict[str, str]


def peek_unet(path: str | Path) -> ModelFamily | None:
    """A UNet file's family from its .safetensors header alone (None for other formats); raises
    CheckpointError for a file that is not a UNet."""
    path = Path(path)
    shapes = ckpt.read_shapes(path)
    if shapes is None:
        return None
    names, _ = unet_names(shapes, path)
    try:
        return unet_family({names[k]: shapes[k] for k in names}, ckpt.read_metadata(path),
                           markers=[k for k in ckpt.MARKERS if k in shapes])
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None


def load_unet(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              v_prediction: bool | None = None) -> LoadedUNet:
    """Load a UNet-only file into a UNetModel on `device` in `dtype`; unused keys are listed, missing ones
    refused. `v_prediction` overrides the prediction type (as in `load_checkpoint`)."""
    path = Path(path)
    sd = ckpt.load_state_dict(path)
    names, layout = unet_names(sd, path)
    if len(set(names.values())) != len(names):
        raise CheckpointError(f"{path.name}: several tensors name the same UNet weight")
    weights = {names[k]: sd[k] for k in names}
    metadata = ckpt.read_metadata(path)
    try:
        family = unet_family(weights, metadata, v_prediction, [k for k in ckpt.MARKERS if k in sd])
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    unet = ckpt._materialize(lambda: UNetModel(family.unet_config), weights, "UNet", path, device, dtype)
    expected = set(unet.state_dict())
    unused = sorted(k for k in sd if names.get(k) not in expected and k not in ckpt.MARKERS)
    return LoadedUNet(family, unet, layout, unused, path, metadata)


# --- text encoders -------------------------------------------------------------------------------------

# (width, layers) of the released encoders: OpenAI CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14.
STANDARD_SHAPES = {"clip_l": (768, 12), "clip_h": (1024, 24), "clip_g": (1280, 32)}
# Kinds loaded together -> family; and where each kind sits in that family's LDM layout.
TEXT_FAMILIES = {("clip_l",): "sd1", ("clip_h",): "sd2", ("clip_g",): "sdxl_refiner", ("clip_g", "clip_l"): "sdxl"}
_SLOTS = {("sd1", "clip_l"): ("cond_stage_model.transformer.", "hf"),
          ("sd2", "clip_h"): ("cond_stage_model.model.", "openclip"),
          ("sdxl", "clip_l"): ("conditioner.embedders.0.transformer.", "hf"),
          ("sdxl", "clip_g"): ("conditioner.embedders.1.model.", "openclip"),
          ("sdxl_refiner", "clip_g"): ("conditioner.embedders.0.model.", "openclip")}
# Keys no SD text encoder computes with: a rebuilt position-id buffer, CLIP's contrastive temperature.
IGNORED_TEXT_KEYS = ("text_model.embeddings.position_ids", "logit_scale")
# OpenCLIP's names -> transformers'. Per layer, attn.in_proj_* stacks q, k and v along dim 0; OpenCLIP's
# text_projection is applied as x @ P, the transpose of transformers' Linear weight.
_OPENCLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "positional_embedding": "text_model.embeddings.position_embedding.weight",
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOKENS = "text_model.embeddings.token_embedding.weight"
_V5_TOP = ("embeddings.", "encoder.", "final_layer_norm.")
_OPENCLIP_FUSED = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_OPENCLIP_LAYER_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class TextEncoderFile:
    """One text-encoder file in transformers' names, and where each came from."""

    path: Path
    kind: str
    keys: list[str]  # the file's keys (without a single LDM prefix they all shared)
    weights: StateDict  # transformers names: text_model.*, text_projection.weight
    sources: dict[str, str]  # transformers name -> the file's key (q, k and v share OpenCLIP's in_proj)
    ignored: list[str]
    unused: list[str]
    missing_layers: int  # layers a standard encoder of this kind has beyond the file's (diffusers' SD2: 1)


def _strip_ldm_prefix(sd: StateDict) -> StateDict:
    """A text encoder saved under one LDM prefix (cond_stage_model.transformer., ...) without it."""
    found = [p for p, _ in _SLOTS.values() if all(k.startswith(p) for k in sd)]
    return {k[len(found[0]):]: v for k, v in sd.items()} if found else sd


def _to_transformers(sd: StateDict) -> tuple[StateDict, dict[str, str], list[str], list[str]]:
    """(weights, sources, ignored, unused) of a CLIP text tower in transformers' or OpenCLIP's names."""
    v5 = "embeddings.token_embedding.weight" in sd  # transformers 5 saves CLIPTextModel without text_model.
    out: StateDict = {}
    sources: dict[str, str] = {}
    ignored: list[str] = []
    unused: list[str] = []
    for original, tensor in sd.items():
        key = "text_model." + original if v5 and original.startswith(_V5_TOP) else original
        fused, layer = _OPENCLIP_FUSED.match(key), _OPENCLIP_LAYER_KEY.match(key)
        renamed: list[tuple[str, Tensor]] = []
        if key in IGNORED_TEXT_KEYS:
            ignored.append(original)
        elif key.startswith("text_model.") or key == "text_projection.weight":
            renamed = [(key, tensor)]
        elif key == "text_projection":  # OpenCLIP's, and ComfyUI's CLIPSave's before it wrote .weight
            renamed = [("text_projection.weight", tensor.t())]
        elif key in _OPENCLIP_TOP:
            renamed = [(_OPENCLIP_TOP[key], tensor)]
        elif fused:
            renamed = [(f"text_model.encoder.layers.{fused[1]}.self_attn.{name}_proj.{fused[2]}", part)
                       for name, part in zip("qkv", tensor.chunk(3, dim=0), strict=True)]
        elif layer and layer[2] in _OPENCLIP_LAYER:
            renamed = [(f"text_model.encoder.layers.{layer[1]}.{_OPENCLIP_LAYER[layer[2]]}.{layer[3]}", tensor)]
        else:
            unused.append(original)
        for name, value in renamed:
            out[name], sources[name] = value, original
    return out, sources, ignored, unused


def _kind(weights: StateDict, metadata: dict[str, str]) -> tuple[str, int]:
    """(kind, missing layers): our own metadata, else the released widths, else ComfyUI's rule by depth."""
    width = weights[_TOKENS].shape[1]
    layers = len(_indices(weights, r"text_model\.encoder\.layers\.(\d+)\."))
    kind = metadata.get("loom.text_encoder", "")
    if kind not in STANDARD_SHAPES:
        by_width = {w: k for k, (w, _) in STANDARD_SHAPES.items()}
        kind = by_width.get(width) or ("clip_g" if layers >= 31 else "clip_h" if layers >= 23 else "clip_l")
    standard_width, standard_layers = STANDARD_SHAPES[kind]
    return kind, standard_layers - layers if width == standard_width and layers < standard_layers else 0


def read_text_encoder(path: str | Path, sd: StateDict | None = None) -> TextEncoderFile:
    """A CLIP text-encoder file in transformers' names (`sd`: its tensors, when already read; the meta tensors
    of its header do); refuses any other kind of file."""
    path = Path(path)
    sd = ckpt.load_state_dict(path) if sd is None else sd
    look = look_of(sd)
    if look is None or look.kind != "text_encoder":
        raise _refuse(path, sd, "a CLIP text encoder")
    sd = _strip_ldm_prefix(sd)
    weights, sources, ignored, unused = _to_transformers(sd)
    if _TOKENS not in weights:
        raise CheckpointError(f"{path.name}: a CLIP text encoder in a layout Loom does not know (neither "
                              "transformers' text_model.* nor OpenCLIP's token_embedding, transformer.resblocks)")
    kind, missing = _kind(weights, ckpt.read_metadata(path))
    return TextEncoderFile(path, kind, list(sd), weights, sources, ignored, unused, missing)


def text_encoder_family(kinds: Iterable[str], names: str = "these files") -> str:
    """The family whose text encoders are exactly these kinds (sd1, sd2, sdxl or sdxl_refiner)."""
    kinds = tuple(sorted(kinds))
    if kinds not in TEXT_FAMILIES:
        known = "; ".join(f"{' + '.join(k)}: {f.upper()}" for k, f in TEXT_FAMILIES.items())
        raise CheckpointError(f"{names} hold {' + '.join(kinds)}, which is no SD family's set of text encoders "
                              f"({known})")
    return TEXT_FAMILIES[kinds]


def _to_ldm(part: TextEncoderFile, family: str) -> tuple[StateDict, dict[str, set[str]], list[str]]:
    """(`part` under `family`'s LDM keys, LDM key -> the file keys behind it, file keys the family never reads)."""
    prefix, layout = _SLOTS[(family, part.kind)]
    w, origin = part.weights, part.sources
    if layout == "hf":  # CLIP-L: its projection goes unused (SD's pooled prompt, where used, is bigG's)
        names = {k for k in w if k.startswith("text_model.")}
        return ({prefix + k: w[k] for k in names}, {prefix + k: {origin[k]} for k in names},
                [origin[k] for k in w if k not in names])
    renames = [(ours, (theirs,)) for ours, theirs in _OPENCLIP_TOP.items()]
    for i in _indices(w, r"text_model\.encoder\.layers\.(\d+)\."):
        hf, oc = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            renames += [(f"{oc}{ours}.{param}", (f"{hf}{theirs}.{param}",)) for ours, theirs in _OPENCLIP_LAYER.items()]
            renames.append((f"{oc}attn.in_proj_{param}", tuple(f"{hf}self_attn.{p}_proj.{param}" for p in "qkv")))
    out: StateDict = {}
    behind: dict[str, set[str]] = {}
    for ours, theirs in renames:
        if all(n in w for n in theirs):
            out[prefix + ours] = w[theirs[0]] if len(theirs) == 1 else torch.cat([w[n] for n in theirs])
            behind[prefix + ours] = {origin[n] for n in theirs}
    if "text_projection.weight" in w:
        out[prefix + "text_projection"] = w["text_projection.weight"].t().contiguous()
        behind[prefix + "text_projection"] = {origin["text_projection.weight"]}
    return out, behind, []


class PartTextEncoder(TextEncoder):
    """A TextEncoder from part files: it may lack its last layers (diffusers' SD2 copy drops the one SD2 never
    reads), and it may be pinned to the CPU (`.to()` then changes dtypes only, so the engine's moves leave it)."""

    missing_layers: int = 0
    pinned_to_cpu: bool = False

    def _layer(self, clip_skip: int | None) -> int:
        if not self.missing_layers:
            return super()._layer(clip_skip)
        layer = self.config.default_clip_skip if clip_skip is None else clip_skip
        depth = min(encoder.num_layers for encoder in self.config.encoders) + self.missing_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer <= -1:
            raise ValueError(f"clip_skip must be an int from -{depth} to -1 (-1 is the last layer), got {layer!r}")
        if layer > -1 - self.missing_layers:
            raise ValueError(f"this text encoder file lacks the last {self.missing_layers} of its {depth} layers; "
                             f"stop_at_clip_layer must be {-1 - self.missing_layers} or lower, not {layer}")
        return layer + self.missing_layers

    def to(self, *args: object, **kwargs: object) -> PartTextEncoder:
        if not self.pinned_to_cpu:
            return super().to(*args, **kwargs)
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        return self if dtype is None else super().to(dtype=dtype)


@dataclass
class LoadedTextEncoder:
    encoder: PartTextEncoder
    family: str  # "sd1", "sd2", "sdxl" or "sdxl_refiner"
    kinds: tuple[str, ...]  # of each file, in order
    paths: list[Path]
    unused_keys: list[str]  # "file name: key"
    ignored_keys: list[str]  # known keys no SD text encoder reads ("file name: key")


def load_text_encoders(paths: Iterable[str | Path], device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, pin_to_cpu: bool = False) -> LoadedTextEncoder:
    """Load one text-encoder file (SD1's CLIP-L, SD2's OpenCLIP-H, the SDXL refiner's bigG) or SDXL's two
    (CLIP-L and bigG, in any order) into one TextEncoder, as a checkpoint's would be."""
    files = [read_text_encoder(path) for path in paths]
    names = " and ".join(f.path.name for f in files)
    family = text_encoder_family((f.kind for f in files), names)
    if family in ("sdxl", "sdxl_refiner"):
        bigg = next(f for f in files if f.kind == "clip_g")
        if "text_projection.weight" not in bigg.weights:
            raise CheckpointError(f"{bigg.path.name}: OpenCLIP bigG without its text_projection (a CLIPTextModel, "
                                  "not a CLIPTextModelWithProjection); SDXL's pooled prompt needs it")
    if any(f.missing_layers for f in files) and len(files) > 1:
        raise CheckpointError(f"{names}: a text encoder lacks its last layers, which Loom allows alone only")
    weights: StateDict = {}
    behind: dict[str, tuple[Path, set[str]]] = {}
    ignored: dict[Path, set[str]] = {}
    for f in files:
        ldm, origin, unread = _to_ldm(f, family)
        weights.update(ldm)
        behind.update({k: (f.path, keys) for k, keys in origin.items()})
        ignored[f.path] = {*f.ignored, *unread}
    config = text_encoder_config_from_state_dict(weights)
    if config is None or config.family != family:
        raise CheckpointError(f"{names}: the text encoder weights are incomplete")
    encoder = _build(config, max(f.missing_layers for f in files), dtype)
    try:
        consumed = encoder.load_ldm_state_dict(weights)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{names}: {e}") from None
    encoder.to(device)
    encoder.pinned_to_cpu = pin_to_cpu
    used = {(path, key) for ldm in consumed if ldm in behind for path, keys in [behind[ldm]] for key in keys}
    unused = [f"{f.path.name}: {k}" for f in files for k in f.keys
              if (f.path, k) not in used and k not in ignored[f.path]]
    return LoadedTextEncoder(encoder, family, tuple(f.kind for f in files), [f.path for f in files], unused,
                             [f"{f.path.name}: {k}" for f in files for k in sorted(ignored[f.path])])


def _build(config: TextEncoderConfig, missing_layers: int, dtype: torch.dtype) -> PartTextEncoder:
    with torch.device("meta"):
        encoder = PartTextEncoder(config)
    encoder.missing_layers = missing_layers
    return encoder.to(dtype).eval().requires_grad_(False)


def peek_text_encoder(path: str | Path) -> str | None:
    """A text-encoder file's kind (clip_l, clip_h, clip_g) from its .safetensors header alone (None for other
    formats); raises CheckpointError for a file that is not one."""
    shapes = ckpt.read_shapes(path)
    return None if shapes is None else read_text_encoder(path, shapes).kind
