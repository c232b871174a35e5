"""Chroma LoRA names: Flux's for the blocks Chroma shares with it, and the distilled guidance layer's.

Chroma keeps Flux's block weights under BFL's names (`ldm.chroma`), so kohya's `lora_unet_double_blocks_...`,
ComfyUI's `diffusion_model.` and diffusers' / PEFT's `transformer.transformer_blocks.N.attn.to_q` names (row slots
of the fused qkv / linear1, as for Flux: `ldm.lora_flux`) reach the same layers. A Flux LoRA's modulation entries
(`img_mod.lin`, `norm1.linear`, ...) have no layer in Chroma and go unmatched; the distilled guidance layer's names
are BFL's (`distilled_guidance_layer.layers.N.in_layer`) or diffusers' (`...layers.N.linear_1`). The text side is
T5 alone: kohya's `lora_te_` / `lora_te3_` and diffusers' `text_encoder.` names (`ldm.lora_t5`).
"""

from __future__ import annotations

from torch import nn

from ldm.chroma import Chroma
from ldm.lora_flux import _DOUBLE, _SINGLE, Slot, _bfl_slots, diffusers_slots, transformer_index
from ldm.lora_t5 import t5_index

_OUTER = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
          "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
          "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj"}


def _targets(model: Chroma) -> dict[str, str | Slot]:
    """diffusers' layer names -> our layer path (a whole layer) or a Slot of a fused one."""
    c = model.config
    h, mlp = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    targets: dict[str, str | Slot] = dict(_OUTER)
    for i in range(c.approximator_layers):
        for theirs, ours in (("linear_1", "in_layer"), ("linear_2", "out_layer")):
            targets[f"distilled_guidance_layer.layers.{i}.{theirs}"] = f"distilled_guidance_layer.layers.{i}.{ours}"
    for blocks, table, ours, count in (("transformer_blocks", _DOUBLE, "double_blocks", c.depth),
                                       ("single_transformer_blocks", _SINGLE, "single_blocks",
                                        c.depth_single_blocks)):
        for i in range(count):
            for theirs, (path, part) in table.items():
                if "mod" in path:  # Flux's per-block modulation: Chroma's comes from the guidance layer
                    continue
                path = f"{ours}.{i}.{path}"
                targets[f"{blocks}.{i}.{theirs}"] = path if part is None else Slot(
                    path, part * h, mlp if part == 3 else h)
    return targets


def chroma_index(model: Chroma) -> dict[str, str]:
    """Every name a LoRA file may give a whole layer of a Chroma transformer -> its path."""
    return transformer_index(model, _targets(model))


def chroma_slots(model: Chroma) -> dict[str, Slot]:
    """Names of the parts of fused layers -> their slots (diffusers' split q, k, v and proj_mlp)."""
    return {**_bfl_slots(model), **diffusers_slots(_targets(model))}


def chroma_text_index(encoder: nn.Module) -> dict[str, str]:
    """A ChromaTextEncoder's T5 layers by kohya's, diffusers' (`text_encoder.`) and ComfyUI's names."""
    return t5_index(encoder.t5xxl, "t5xxl", ("lora_te_", "lora_te3_"), "text_encoder.")
