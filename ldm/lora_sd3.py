"""SD3/SD3.5 LoRA names: kohya's and Stability's names of our MMDiT's layers, diffusers' split ones as row slots.

Loom's MMDiT keeps Stability's layout, which fuses what diffusers' SD3Transformer2DModel keeps apart: a joint
block's `x_block.attn.qkv` is diffusers' `attn.to_q`, `to_k`, `to_v` stacked by rows (`context_block.attn.qkv`:
`add_q_proj`, `add_k_proj`, `add_v_proj`; SD3.5 medium's `x_block.attn2.qkv`: `attn2.to_q` ...). Those parts become
`ldm.lora_flux.Slot`s, as Flux's do. Two modulations have their halves swapped in diffusers (scale, shift where
Stability has shift, scale): `norm_out.linear` (`final_layer.adaLN_modulation.1`) and the last block's
`norm1_context.linear`, whose context stream is pre-only (no output projection, no MLP, two modulation parts).

Family: Stability's block names (`joint_blocks`, `context_block`, `x_block`) are SD3's alone; a diffusers file of
top-level `transformer_blocks` is Flux's or SD3's, told apart by what only SD3 has (`pos_embed`, `attn2`) or by
released widths (blocks 1536/2432 wide vs Flux's 3072, a 2048-wide pooled embedder vs Flux's 768). A file that
shows neither (say a tiny model's, or one of an unreleased width with neither marker) stays undecided.
"""

from __future__ import annotations

import re

from torch import nn

from ldm.lora_flux import Slot, diffusers_slots, transformer_index
from ldm.lora_t5 import t5_index
from ldm.mmdit import MMDiT

_OUTER = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
# diffusers' name inside transformer_blocks.N -> ours inside joint_blocks.N (whole layers).
_IMAGE = {"norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
          "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
_CONTEXT = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
            "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
_QKV = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv"}


def _diffusers_targets(model: MMDiT) -> dict[str, str | Slot]:
    """diffusers' layer names -> our layer path (a whole layer) or a Slot."""
    c = model.config
    h = c.hidden_size
    targets: dict[str, str | Slot] = dict(_OUTER)
    targets["norm_out.linear"] = Slot("final_layer.adaLN_modulation.1", 0, 2 * h, roll=h)
    for i, block in enumerate(model.joint_blocks):
        ours, theirs = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        pre_only = block.context_block.pre_only
        for name, path in {**_IMAGE, **({} if pre_only else _CONTEXT)}.items():
            targets[theirs + name] = ours + path
        if pre_only:
            targets[theirs + "norm1_context.linear"] = Slot(ours + "context_block.adaLN_modulation.1", 0, 2 * h,
                                                            roll=h)
        qkv = dict(_QKV)
        if block.x_block.dual:
            qkv["attn2.to_"] = "x_block.attn2.qkv"
            targets[theirs + "attn2.to_out.0"] = ours + "x_block.attn2.proj"
        for head, path in qkv.items():
            for part, letter in enumerate("qkv"):
                name = f"{head}{letter}" if head.endswith("to_") else f"{head}{letter}_proj"
                targets[theirs + name] = Slot(ours + path, part * h, h)
    return targets


def sd3_index(model: MMDiT) -> dict[str, str]:
    """Every name a LoRA file may give a whole layer of an MMDiT (Stability's names) -> its path."""
    return transformer_index(model, _diffusers_targets(model), (nn.Linear, nn.Conv2d))


def sd3_slots(model: MMDiT) -> dict[str, Slot]:
    """diffusers' names of the parts of fused layers (and of the swapped modulations) -> their slots."""
    return diffusers_slots(_diffusers_targets(model))


def sd3_text_index(encoder: nn.Module) -> dict[str, str]:
    """An SD3TextEncoder's CLIP-L and CLIP-G layers by kohya's SD3 names (`lora_te1_`, `lora_te2_`) and
    diffusers' (`text_encoder.`, `text_encoder_2.`), and its T5's (`lora_te3_`, `text_encoder_3.`: ldm.lora_t5;
    also ComfyUI's number for T5 after the CLIPs present, `lora_te1_` with none)."""
    index: dict[str, str] = {}
    if encoder.t5xxl is not None:
        after_clips = f"lora_te{1 + (encoder.clip_l is not None) + (encoder.clip_g is not None)}_"
        index = t5_index(encoder.t5xxl, "t5xxl", tuple(dict.fromkeys(("lora_te3_", after_clips))), "text_encoder_3.")
    for attr, kohya, diffusers in (("clip_l", "lora_te1_", "text_encoder."),
                                   ("clip_g", "lora_te2_", "text_encoder_2.")):
        clip = getattr(encoder, attr)
        if clip is None:
            continue
        for name, transformer in clip.encoders.items():
            for path, layer in transformer.text_model.named_modules():
                if isinstance(layer, nn.Linear | nn.LayerNorm):
                    hf, ours = "text_model." + path, f"{attr}.encoders.{name}.text_model.{path}"
                    index[kohya + hf.replace(".", "_")] = ours
                    index[diffusers + hf] = ours
    return index


_STABILITY = re.compile(r"(^|[._])(joint_blocks|context_block|x_block)[._]")
_TOP = r"^(transformer\.|lora_transformer_|lycoris_)?"
_SD3_ONLY = re.compile(_TOP + r"(pos_embed[._]proj|transformer_blocks[._]\d+[._]attn2[._])")
_BLOCK_ATTENTION = re.compile(_TOP + r"transformer_blocks[._]\d+[._]attn[._](to_[qkv]|add_[qkv]_proj)$")
_POOLED = re.compile(_TOP + r"time_text_embed[._]text_embedder[._]linear_1$")
_SD3_WIDTHS, _FLUX_WIDTH = (1536, 2432), 3072  # SD3 medium and SD3.5 medium, SD3.5 large; Flux.1


def transformer_family(weights: dict) -> str | None:
    """"sd3" or "flux" for a LoRA's patches by name (`Lora.weights`) where its transformer names tell, else None."""
    if any(_STABILITY.search(n) or _SD3_ONLY.search(n) for n in weights):
        return "sd3"
    for name, patch in weights.items():
        if _BLOCK_ATTENTION.search(name) and patch.out_features in (*_SD3_WIDTHS, _FLUX_WIDTH):
            return "flux" if patch.out_features == _FLUX_WIDTH else "sd3"
        if _POOLED.search(name) and patch.in_numel in (768, 2048):
            return "flux" if patch.in_numel == 768 else "sd3"
    return None
