"""HunyuanVideo 1.5 LoRA names: the names LoRA files give the layers of our HunyuanVideo15 (Tencent's names, each
double block's q, k, v fused as in Comfy-Org's files), and how a file is told HunyuanVideo 1.5's.

LoraLoader hands LoRAs the HunyuanVideo15Denoiser that wraps the model (its `model.`). Files come as:

- Tencent's names (`double_blocks.0.img_attn_qkv`, `img_mod.linear`, `img_mlp.fc1`, `txt_in.individual_token_refiner
  .blocks.0.self_attn_qkv`, `byt5_in.fc1`, `vision_in.proj.1`, `final_layer.linear`) under `diffusion_model.` or
  `transformer.` (diffusion-pipe; ComfyUI reads both for every HunyuanVideo model), or bare; kohya's musubi-tuner
  flattened under `lora_unet_` (`lora_unet_double_blocks_0_img_mod_linear`). Tencent's release and musubi-tuner's
  model keep a double block's q, k and v apart (`img_attn_q`, `img_attn_k`, `img_attn_v`): each patches its third of
  the fused layer (a `ldm.lora_flux.Slot`).
- ComfyUI's own names of the same layers (what its loader renames Tencent's to, and what its LoRA extraction writes):
  `img_mod.lin`, `img_attn.qkv`, `img_attn.proj`, `img_mlp.0` / `.2`, `img_attn.norm.query_norm.scale`, the refiner's
  `self_attn.qkv`, `mlp.0`, the embedders' `in_layer` / `out_layer` (`time_in`, `txt_in.t_embedder`,
  `txt_in.c_embedder`), under `diffusion_model.`, `transformer.` or flattened under `lora_unet_`.
- diffusers / PEFT: `transformer.` then HunyuanVideo15Transformer3DModel's names (`transformer_blocks.0.attn.to_q`,
  `attn.add_k_proj`, `ff_context.net.0.proj`, `context_embedder.token_refiner.refiner_blocks.0.attn.to_v`,
  `context_embedder_2.linear_1`, `image_embedder.linear_1`, `proj_out`; the renaming of `ldm.hunyuan_video15`), also
  bare, OneTrainer's `lora_transformer_` flattened and LyCORIS' `lycoris_`. q, k, v patch their slots of the fused
  layers, and `norm_out.linear`, the output modulation with its halves swapped (scale, shift), its rolled slot.
  (diffusers 0.42's HunyuanVideo 1.5 pipelines have no LoRA loader mixin; its transformer takes PEFT adapters by
  these names, `load_lora_adapter`.)

Linear layers, the patch embedding, norms and the type embedding are patched by name (norms and embeddings by
full-weight differences, `.diff`; biases by `.diff_b`). The text encoder (Qwen2.5-VL and byT5) takes no LoRA
(`ldm.lora_families.takes_no_lora`): ComfyUI reads no trainer's names for it (only its own `text_encoders.` keys).

Family "hunyuan_video15": a name only the HunyuanVideo models have (Tencent's dotted block names, the flattened ones
that differ from Flux's, the refiner, byT5 and vision inputs, the type embedding, their diffusers names), or Flux's /
diffusers' double-stream block names 2048 wide alone (Flux's models are 3072 wide and more); neither with
single-stream blocks, nor (the HunyuanVideo names) 3072 or 3584 wide: HunyuanVideo 1.0's and HunyuanImage 2.1's.
"""

from __future__ import annotations

import re

from torch import nn

from ldm.hunyuan_video15 import _DIFFUSERS_BLOCK, _DIFFUSERS_REFINER, _DIFFUSERS_TOP, HunyuanVideo15, RMSNorm
from ldm.lora_flux import Slot, diffusers_spellings
from ldm.lora_formats import WeightPatch

_LAYERS = (nn.Linear, nn.Conv3d, nn.LayerNorm, RMSNorm, nn.Embedding)
# ComfyUI's renaming of Tencent's names, in order (the files' loader, comfy/supported_models.py's HunyuanVideo).
_COMFY = (("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
          ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
          ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
          ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
          ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
          ("_attn_q_norm.", "_attn.norm.query_norm.scale."), ("_attn_k_norm.", "_attn.norm.key_norm.scale."),
          ("_attn_proj.", "_attn.proj."), ("_in.mlp.0.", "_in.in_layer."), ("_in.mlp.2.", "_in.out_layer."))
_BLOCKS = {"double_blocks.": ("transformer_blocks.", _DIFFUSERS_BLOCK),
           "txt_in.individual_token_refiner.blocks.": ("context_embedder.token_refiner.refiner_blocks.",
                                                       _DIFFUSERS_REFINER)}
_BLOCK_PATH = re.compile(r"(double_blocks\.|txt_in\.individual_token_refiner\.blocks\.)(\d+)\.(.+)")
_FUSED_QKV = re.compile(r"(double_blocks\.\d+\.(?:img|txt)_attn_)qkv")


def comfy_name(path: str) -> str:
    """ComfyUI's name of one of our layer paths (a q / k norm's with its parameter, `scale`)."""
    name = path + "."
    for ours, theirs in _COMFY:
        name = name.replace(ours, theirs)
    return name[:-1]


def diffusers_names(path: str) -> list[tuple[str, int | None]]:
    """diffusers' names of one of our layer paths, each with the third of the fused q / k / v it is (None: the whole
    layer); none for a layer diffusers does not have apart (the output modulation: see `hunyuan_video15_slots`)."""
    block = _BLOCK_PATH.fullmatch(path)
    if block:
        prefix, table = _BLOCKS[block[1]]
        inner = block[3] + "."
        renamed = [(theirs, part) for theirs, (ours, part) in table.items() if ours == inner]
        return [(f"{prefix}{block[2]}.{theirs[:-1]}", part) for theirs, part in renamed or [(inner, None)]]
    for theirs, ours in _DIFFUSERS_TOP:
        if (path + ".").startswith(ours) and not ours.startswith("final_layer.adaLN_modulation."):
            return [((theirs + (path + ".")[len(ours):])[:-1], None)]
    return []


def targets(model: HunyuanVideo15) -> list[str]:
    """The paths a LoRA may patch: every linear, convolution, norm and embedding layer with a weight."""
    return [path for path, layer in model.named_modules()
            if isinstance(layer, _LAYERS) and getattr(layer, "weight", None) is not None]


def spellings(path: str) -> set[str]:
    """Every name a file may give the whole layer at `path` in the model (see the module docstring)."""
    names = set()
    for name in (path, comfy_name(path)):
        names |= {f"diffusion_model.{name}", f"transformer.{name}", f"lora_unet_{name.replace('.', '_')}"}
    names.add(path)
    for theirs, part in diffusers_names(path):
        if part is None:
            names.update(diffusers_spellings(theirs))
    return names


def _split(module: nn.Module) -> tuple[HunyuanVideo15, str]:
    """The model inside `module` (itself, or a denoiser's `model`) and the prefix of its paths in `module`."""
    return (module, "") if isinstance(module, HunyuanVideo15) else (module.model, "model.")


def hunyuan_video15_index(module: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a whole layer of a HunyuanVideo15, or of the denoiser that wraps it (its
    `model`) -> its path in `module`."""
    model, prefix = _split(module)
    index: dict[str, str] = {}
    for path in targets(model):
        index.update(dict.fromkeys(spellings(path), prefix + path))
    return index


def hunyuan_video15_slots(module: nn.Module) -> dict[str, Slot]:
    """Names of the parts of fused layers (Tencent's / musubi-tuner's and diffusers' q, k, v; diffusers' swapped
    output modulation) -> their slots in `module` (a HunyuanVideo15 or its denoiser)."""
    model, prefix = _split(module)
    h = model.config.hidden_size
    slots: dict[str, Slot] = {}
    for path in targets(model):
        for theirs, part in diffusers_names(path):
            if part is not None:
                slots.update(dict.fromkeys(diffusers_spellings(theirs), Slot(prefix + path, part * h, h)))
        fused = _FUSED_QKV.fullmatch(path)
        if fused:
            for part, letter in enumerate("qkv"):
                name = fused[1] + letter
                slot = Slot(prefix + path, part * h, h)
                slots.update(dict.fromkeys((f"diffusion_model.{name}", f"transformer.{name}", name,
                                            f"lora_unet_{name.replace('.', '_')}"), slot))
    modulation = Slot(prefix + "final_layer.adaLN_modulation.1", 0, 2 * h, roll=h)
    slots.update(dict.fromkeys(diffusers_spellings("norm_out.linear"), modulation))
    return slots


_PREFIX = r"^(diffusion_model\.|transformer\.|lora_unet_|lycoris_|lora_transformer_)?"
# Names only the HunyuanVideo models have (Tencent's, flattened where they differ from Flux's, and diffusers').
_MARKER = re.compile(_PREFIX + r"(double_blocks\.\d+\.(img|txt)_(attn_(qkv|proj|[qkv])|mod\.linear|mlp\.fc[12])$"
                     r"|double_blocks_\d+_(img|txt)_(attn_[qkv]|mod_linear|mlp_fc[12])$"
                     r"|txt_in[._]individual_token_refiner[._]|byt5_in[._]|vision_in[._]proj[._]|cond_type_embed"
                     r"|time_r_in[._]|context_embedder_2[._]|image_embedder[._]|time_embed[._]timestep_embedder_r[._]"
                     r"|context_embedder[._]token_refiner[._])")
# Double-stream block layers in Flux's and diffusers' names (shared with Flux, SD3, Qwen-Image): their width tells.
_SHARED = re.compile(_PREFIX + r"(double_blocks[._]\d+[._](img|txt)_(attn[._]qkv|attn[._]proj|mod[._]lin|mlp[._]0)"
                     r"|transformer_blocks[._]\d+[._](attn[._](add_[qkv]_proj|to_add_out)|norm1_context[._]linear"
                     r"|ff_context[._]net[._]0[._]proj))$")
_SINGLE = re.compile(r"(^|[._])single_(transformer_)?blocks[._]\d")
# Block layers whose input is the model's width (all but the MLPs' second layers).
_WIDE_INPUT = re.compile(r"(double_blocks|transformer_blocks|refiner_blocks|individual_token_refiner[._]blocks)"
                         r"[._]\d+[._](?!.*(mlp[._](fc)?2|net[._]2)$)")
_WIDTH = 2048
_OTHER_WIDTHS = {3072, 3584}  # HunyuanVideo 1.0's and HunyuanImage 2.1's, on Tencent's names too


def hunyuan_video15_family(weights: dict[str, WeightPatch]) -> str | None:
    """"hunyuan_video15" for a LoRA's patches by name (`Lora.weights`) that are recognisably HunyuanVideo 1.5's,
    else None."""
    if any(_SINGLE.search(n) for n in weights):
        return None
    widths = {patch.in_numel for name, patch in weights.items() if _WIDE_INPUT.search(name) and patch.in_numel > 1}
    if any(_MARKER.search(n) for n in weights) and not widths & _OTHER_WIDTHS:
        return "hunyuan_video15"
    return "hunyuan_video15" if widths == {_WIDTH} and any(_SHARED.search(n) for n in weights) else None
