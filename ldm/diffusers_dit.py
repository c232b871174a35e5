"""Flux.1 and SD3 transformers in diffusers' layout (a diffusers folder's transformer/ file or shards), renamed to
Black Forest Labs' and Stability's layouts, which `ldm.flux` and `ldm.mmdit` read.

diffusers keeps each attention's q, k and v apart (`attn.to_q`...) where BFL and Stability fuse them (`qkv`, and
Flux's single blocks fuse the MLP's input too, `linear1`), names every module its own way, and stores the final
modulations' halves as (scale, shift) where the originals have (shift, scale). This is the inverse of diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` / `convert_sd3_transformer_checkpoint_to_diffusers`. Renamed
tensors are the file's own (no copy); only fused and swapped ones are new, each made once, its parts dropped as
it is made. Keys the conversion does not know keep their names (the loaders list them as unused). A diffusers
folder's shards (`diffusion_pytorch_model-00001-of-00003.safetensors` with its `.index.json`) load as one file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict
from ldm.t5 import descaled_fp8, scaling_keys

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.safetensors$")
_INDEX_SUFFIX = ".safetensors.index.json"


def _has(*names: str) -> Callable[[set[str]], bool]:
    return lambda keys: all(name in keys for name in names)


def _starts(*prefixes: str) -> Callable[[set[str]], bool]:
    return lambda keys: any(k.startswith(prefixes) for k in keys)


@dataclass(frozen=True)
class OtherModel:
    """A diffusers-layout model Loom does not run as a Flux or SD3 transformer, told by its key names."""

    what: str
    matches: Callable[[set[str]], bool]


_UNET = "an SD UNet (UNet2DConditionModel)"
# First match wins. Some share key names with Flux's or SD3's diffusers layout, so they are checked first.
OTHER_MODELS: tuple[OtherModel, ...] = (
    OtherModel("a Chroma transformer (ChromaTransformer2DModel)", _starts("distilled_guidance_layer.")),
    OtherModel(_UNET, _starts("down_blocks.0.resnets.")),
    OtherModel("a Wan video transformer (WanTransformer3DModel)", _starts("condition_embedder.", "blocks.0.attn1.")),
    OtherModel("a Flux.2 transformer (Flux2Transformer2DModel)", _starts("double_stream_modulation_img.",
                                                                        "time_guidance_embed.")),
    OtherModel("a HunyuanVideo transformer", _starts("context_embedder.token_refiner.")),
    OtherModel("an AuraFlow transformer", _starts("joint_transformer_blocks.")),
    OtherModel("a HiDream transformer", _starts("double_stream_blocks.")),
    OtherModel("a Lumina 2 transformer", _starts("noise_refiner.")),
    OtherModel("a Qwen-Image transformer (QwenImageTransformer2DModel)", _starts("txt_norm.")),
    OtherModel("a PixArt, Sana, LTX-Video or CogVideoX transformer", _starts("adaln_single.", "caption_projection.",
                                                                            "transformer_blocks.0.attn1.")),
)


def other_diffusers_model(keys: Iterable[str]) -> str | None:
    """What a diffusers-layout model that is neither Flux nor SD3 is ("a Wan video transformer ..."), else None."""
    keys = set(keys)
    # The original layouts: BFL's Chroma has a distilled_guidance_layer too, Lightricks' LTX-Video transformer
    # (patchify_proj) PixArt's adaln_single and caption_projection.
    if _starts("double_blocks.", "joint_blocks.", "model.diffusion_model.", "patchify_proj.")(keys):
        return None
    return next((m.what for m in OTHER_MODELS if m.matches(keys)), None)


def is_diffusers_flux(keys: Iterable[str]) -> bool:
    """Whether a state dict's keys are a Flux.1 transformer's in diffusers' layout (FluxTransformer2DModel)."""
    keys = set(keys)
    return (_has("x_embedder.weight", "time_text_embed.timestep_embedder.linear_1.weight",
                 "transformer_blocks.0.attn.to_q.weight")(keys) and _starts("single_transformer_blocks.")(keys)
            and other_diffusers_model(keys) is None)


def is_diffusers_sd3(keys: Iterable[str]) -> bool:
    """Whether a state dict's keys are an SD3 / SD3.5 MMDiT's in diffusers' layout (SD3Transformer2DModel)."""
    keys = set(keys)
    return (_has("pos_embed.proj.weight", "time_text_embed.timestep_embedder.linear_1.weight",
                 "transformer_blocks.0.attn.add_k_proj.weight")(keys)
            and not _starts("single_transformer_blocks.")(keys) and other_diffusers_model(keys) is None)


def _refusal(keys: Iterable[str], wanted: str) -> CheckpointError:
    other = other_diffusers_model(keys)
    found = f"it holds {other} in diffusers' layout" if other else "its keys are not diffusers' names for one"
    return CheckpointError(f"not {wanted} in diffusers' layout: {found}")


# --- renaming -------------------------------------------------------------------------------------------------

# (diffusers module, ours) for modules renamed whole; `{i}` is a block index. Their .weight and .bias follow.
_FLUX_RENAMES = (
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear"),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin"),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin"),
    ("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img_attn.norm.query_norm"),
    ("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img_attn.norm.key_norm"),
    ("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt_attn.norm.query_norm"),
    ("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt_attn.norm.key_norm"),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0"),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0"),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2"),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin"),
    ("single_transformer_blocks.{i}.attn.norm_q", "single_blocks.{i}.norm.query_norm"),
    ("single_transformer_blocks.{i}.attn.norm_k", "single_blocks.{i}.norm.key_norm"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
)
# (ours, the diffusers modules whose outputs it stacks, in order).
_FLUX_FUSED = (
    ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v")),
    ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                        "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj")),
    ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q",
                                   "single_transformer_blocks.{i}.attn.to_k",
                                   "single_transformer_blocks.{i}.attn.to_v",
                                   "single_transformer_blocks.{i}.proj_mlp")),
)
_SD3_RENAMES = (
    ("pos_embed.proj", "x_embedder.proj"), ("context_embedder", "context_embedder"),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"), ("proj_out", "final_layer.linear"),
    ("transformer_blocks.{i}.attn.norm_q", "joint_blocks.{i}.x_block.attn.ln_q"),
    ("transformer_blocks.{i}.attn.norm_k", "joint_blocks.{i}.x_block.attn.ln_k"),
    ("transformer_blocks.{i}.attn.norm_added_q", "joint_blocks.{i}.context_block.attn.ln_q"),
    ("transformer_blocks.{i}.attn.norm_added_k", "joint_blocks.{i}.context_block.attn.ln_k"),
    ("transformer_blocks.{i}.attn.to_out.0", "joint_blocks.{i}.x_block.attn.proj"),
    ("transformer_blocks.{i}.attn.to_add_out", "joint_blocks.{i}.context_block.attn.proj"),
    ("transformer_blocks.{i}.attn2.norm_q", "joint_blocks.{i}.x_block.attn2.ln_q"),
    ("transformer_blocks.{i}.attn2.norm_k", "joint_blocks.{i}.x_block.attn2.ln_k"),
    ("transformer_blocks.{i}.attn2.to_out.0", "joint_blocks.{i}.x_block.attn2.proj"),
    ("transformer_blocks.{i}.norm1.linear", "joint_blocks.{i}.x_block.adaLN_modulation.1"),
    ("transformer_blocks.{i}.norm1_context.linear", "joint_blocks.{i}.context_block.adaLN_modulation.1"),
    ("transformer_blocks.{i}.ff.net.0.proj", "joint_blocks.{i}.x_block.mlp.fc1"),
    ("transformer_blocks.{i}.ff.net.2", "joint_blocks.{i}.x_block.mlp.fc2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "joint_blocks.{i}.context_block.mlp.fc1"),
    ("transformer_blocks.{i}.ff_context.net.2", "joint_blocks.{i}.context_block.mlp.fc2"),
)
_SD3_FUSED = (
    ("joint_blocks.{i}.x_block.attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                           "transformer_blocks.{i}.attn.to_v")),
    ("joint_blocks.{i}.context_block.attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                                 "transformer_blocks.{i}.attn.add_k_proj",
                                                 "transformer_blocks.{i}.attn.add_v_proj")),
    ("joint_blocks.{i}.x_block.attn2.qkv", ("transformer_blocks.{i}.attn2.to_q", "transformer_blocks.{i}.attn2.to_k",
                                            "transformer_blocks.{i}.attn2.to_v")),
)
# The parameter each renamed module's .weight is (RMS norms: BFL's `scale`).
_FLUX_NORM = re.compile(r"\.(query_norm|key_norm)$")


def _blocks(keys: Iterable[str], prefix: str) -> list[int]:
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m[1]) for k in keys if (m := pattern.match(k))})


def _expand(template: str, keys: set[str]) -> list[tuple[str, str]]:
    """Each block's `{i}` filled in, for the blocks the keys have (the template itself when it has none)."""
    if "{i}" not in template:
        return [("", "")]
    return [("{i}", str(i)) for i in _blocks(keys, template.split(".{i}.")[0])]


def _convert(sd: StateDict, renames: tuple, fused: tuple, swapped: set[str], ours_of_weight: Callable[[str], str]
             ) -> StateDict:
    """Rename and fuse `sd` (consumed: each tensor leaves it as it is converted); unknown keys keep their names."""
    keys = set(sd)
    out: StateDict = {}
    for ours, parts in fused:
        for hole, i in _expand(parts[0], keys):
            for param in ("weight", "bias"):
                names = [f"{p.replace(hole, i) if hole else p}.{param}" for p in parts]
                present = [n for n in names if n in sd]
                if present and len(present) < len(names):
                    raise CheckpointError(f"a diffusers-layout transformer with {present[0]} but no "
                                          f"{next(n for n in names if n not in sd)}")
                if present:
                    fused_tensor = torch.cat([sd[n] for n in names])
                    for n in names:
                        del sd[n]
                    out[f"{ours.replace(hole, i) if hole else ours}.{param}"] = fused_tensor
    for theirs, ours in renames:
        for hole, i in _expand(theirs, keys):
            source, target = (theirs.replace(hole, i), ours.replace(hole, i)) if hole else (theirs, ours)
            for param in ("weight", "bias"):
                if f"{source}.{param}" in sd:
                    tensor = sd.pop(f"{source}.{param}")
                    if target in swapped:
                        tensor = torch.cat(tensor.chunk(2)[::-1])  # (scale, shift) -> (shift, scale)
                    out[f"{target}.{ours_of_weight(target) if param == 'weight' else param}"] = tensor
    out.update(sd)  # what no rule knows, under its own name
    sd.clear()
    return out


def flux_from_diffusers(sd: StateDict) -> StateDict:
    """A diffusers-layout Flux.1 transformer (FluxTransformer2DModel's keys) in BFL's layout; `sd` is consumed."""
    if not is_diffusers_flux(sd):
        raise _refusal(sd, "a Flux.1 transformer")
    swapped = {"final_layer.adaLN_modulation.1"}
    renames = (*_FLUX_RENAMES, ("norm_out.linear", "final_layer.adaLN_modulation.1"))
    return _convert(descaled(sd), renames, _FLUX_FUSED, swapped,
                    lambda target: "scale" if _FLUX_NORM.search(target) else "weight")


def sd3_from_diffusers(sd: StateDict) -> StateDict:
    """A diffusers-layout SD3 / SD3.5 MMDiT (SD3Transformer2DModel's keys) in Stability's layout; `sd` is consumed.

    The last block's context stream is pre-only: its modulation is diffusers' AdaLayerNormContinuous, (scale,
    shift) like the final layer's, so both are swapped back."""
    if not is_diffusers_sd3(sd):
        raise _refusal(sd, "an SD3 transformer")
    sd = descaled(sd)
    last = max(_blocks(sd, "transformer_blocks"), default=0)
    swapped = {"final_layer.adaLN_modulation.1", f"joint_blocks.{last}.context_block.adaLN_modulation.1"}
    out = _convert(sd, (*_SD3_RENAMES, ("norm_out.linear", "final_layer.adaLN_modulation.1")), _SD3_FUSED, swapped,
                   lambda target: "weight")
    if "pos_embed.pos_embed" in out:
        out["pos_embed"] = out.pop("pos_embed.pos_embed")
    return out


def descaled(sd: StateDict) -> StateDict:
    """ComfyUI's scaled fp8 weights descaled before fusing (q, k and v have a scale each, a fused weight one)."""
    if not any(k.endswith((".scale_weight", ".weight_scale")) for k in sd):
        return sd
    skipped = scaling_keys(sd)
    weights = {k: v for k, v in descaled_fp8(sd).items() if k not in skipped}
    sd.clear()
    return weights


def to_original_layout(sd: StateDict) -> StateDict:
    """`sd` in BFL's or Stability's layout if it is a diffusers-layout Flux or SD3 transformer (consumed), else
    `sd` itself (an SD UNet in diffusers' layout too: `ldm.parts` reads it); a CheckpointError naming another
    diffusers model (`OTHER_MODELS`)."""
    if is_diffusers_flux(sd):
        return flux_from_diffusers(sd)
    if is_diffusers_sd3(sd):
        return sd3_from_diffusers(sd)
    other = other_diffusers_model(sd)
    if other not in (None, _UNET):
        raise CheckpointError(f"it holds {other} in diffusers' layout; Loom runs Flux.1 and SD3 transformers "
                              "(in diffusers' layout too) and SD UNets, not this model")
    return sd


# --- files and shards -----------------------------------------------------------------------------------------

def shard_paths(path: str | Path) -> list[Path]:
    """The files of a model: the shards an `.index.json` (or any shard `NAME-0000k-of-0000n.safetensors`, by the
    index beside it, else by the numbering) stands for, in order; `[path]` for a file of its own."""
    path = Path(path)
    match = _SHARD.match(path.name)
    index = path if path.name.endswith(_INDEX_SUFFIX) else (
        path.with_name(match["stem"] + _INDEX_SUFFIX) if match else None)
    if index is not None and index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index.name}: not a diffusers shard index (no weight_map: {e})") from None
        shards = [index.parent / name for name in names]
    elif match:
        count = int(match["count"])
        shards = [path.with_name(f"{match['stem']}-{k:0{len(match['index'])}}-of-{match['count']}.safetensors")
                  for k in range(1, count + 1)]
    else:
        return [path]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise CheckpointError(f"{path.name}: a model in {len(shards)} shards, of which {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not in {path.parent}")
    return shards


def _joined(path: Path, read: Callable[[Path], StateDict | None]) -> StateDict | None:
    joined: StateDict = {}
    for shard in shard_paths(path):
        part = read(shard)
        if part is None:
            return None
        joined.update(part)
    return joined


def _refused(path: Path, sd: StateDict) -> StateDict:
    try:
        return to_original_layout(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None


def read_dit_shapes(path: str | Path) -> StateDict | None:
    """`ckpt.read_shapes` of a file or all its shards, a diffusers-layout Flux / SD3 transformer's in the original
    layout (meta tensors: nothing is read but headers)."""
    path = Path(path)
    shapes = _joined(path, ckpt.read_shapes)
    return None if shapes is None else _refused(path, shapes)


def load_dit_state_dict(path: str | Path) -> StateDict:
    """`ckpt.load_state_dict` of a file or all its shards, a diffusers-layout Flux / SD3 transformer's converted to
    the original layout."""
    path = Path(path)
    return _refused(path, _joined(path, ckpt.load_state_dict))


def dit_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a file, or of its first shard. A diffusers folder's config.json beside it gives the Flux
    RoPE split (`axes_dims_rope`) where the weights cannot: heads other than Flux.1's 128 wide need it."""
    first = shard_paths(path)[0]
    metadata = ckpt.read_metadata(first)
    config = first.with_name("config.json")
    if "loom.flux_config" not in metadata and config.is_file():
        try:
            axes = json.loads(config.read_text()).get("axes_dims_rope")
        except (OSError, ValueError, AttributeError):
            axes = None  # not diffusers' config: the weights alone tell what they can
        if isinstance(axes, list) and all(isinstance(a, int) for a in axes):
            metadata["loom.flux_config"] = json.dumps({"axes_dim": axes})
    return metadata


def diffusers_file_kind(path: str | Path) -> str | None:
    """"flux" or "sd3" for a diffusers-layout transformer file (or shard set), from its headers; None for other
    files and formats; a CheckpointError naming another diffusers model (`to_original_layout`)."""
    path = Path(path)
    shapes = _joined(path, ckpt.read_shapes)
    if shapes is None:
        return None
    if is_diffusers_flux(shapes):
        return "flux"
    if is_diffusers_sd3(shapes):
        return "sd3"
    _refused(path, shapes)
    return None
