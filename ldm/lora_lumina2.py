"""Lumina Image 2.0 LoRA names: the names LoRA files give the layers of our Lumina2Model, and how a file is told
Lumina 2's.

Loom's Lumina2Model keeps the released checkpoint's names, which Z-Image inherited (`layers.N.attention.qkv`,
`attention.out`, `feed_forward.w1/w2/w3`, `adaLN_modulation.1`, `t_embedder.mlp.0`, `cap_embedder.1`,
`final_layer.linear`, ...), so Z-Image's names and spellings (`ldm.lora_z_image`) are read as they are. Three sets of
names are read, each in every spelling of that module (`diffusion_model.`, bare, `transformer.`, `base_model.model.`;
flattened under `lora_unet_`, `lycoris_`, `lora_transformer_`):

- ours, the original module tree's: kohya's sd-scripts (`lora_unet_layers_0_attention_qkv`, alphas; its split_qkv
  option still saves the q / k / v fused), ComfyUI's own and the `diffusion_model.` files diffusers' Lumina 2 loader
  converts (`diffusion_model.layers.0.attention.qkv.lora_A.weight`);
- diffusers' Lumina2Transformer2DModel's (its Lumina2LoraLoaderMixin, PEFT-based trainers on diffusers' model):
  `attn.to_q` / `to_k` / `to_v`, `attn.to_out.0`, `attn.norm_q`, `feed_forward.linear_1/2/3`, `norm1.linear` (the
  modulation), `norm1.norm` / `norm2` (a context refiner's bare `norm1`), `time_caption_embed.timestep_embedder.
  linear_1/2`, `time_caption_embed.caption_embedder.N`, `norm_out.linear_1` / `linear_2` (the final layer's
  modulation and linear);
- Z-Image's diffusers names (`attention.to_q`, `attention.to_out.0`, `all_x_embedder.2-1`, ...), which ComfyUI maps
  for Lumina 2 as for Z-Image.

diffusers' q, k and v are row slots of our fused `attention.qkv`: the queries' `dim` rows, then the keys' and the
values' `num_kv_heads * head_dim` each (Lumina 2's grouped attention: 768 rows each on the released model's 2304).
A fused layer written next to its parts is a repeat and left out, as for Z-Image (`ldm.lora_z_image.redundant`).
The text encoder (Gemma-2-2B) takes no LoRA, as in diffusers' Lumina 2 loader (`ldm.lora_families.takes_no_lora`).

Family "lumina2": diffusers' Lumina 2 names (`layers.N.attn.`, `feed_forward.linear_N`, `norm1.linear`,
`time_caption_embed`, `norm_out.linear_N`), or the original / Z-Image names where the attention's shapes tell
Lumina 2's: fewer key / value rows than query rows (a fused `qkv` more than `dim` rows but fewer than 3 * `dim`, or
a `to_k` / `to_v` narrower than its input), or the released model's width (2304) going in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ldm.lora_flux import Slot
from ldm.lora_z_image import PREFIX_PATTERN, redundant, spellings, targets
from ldm.lora_z_image import diffusers_name as z_image_name
from ldm.lumina2 import Lumina2Model

RELEASED_WIDTH = 2304  # Lumina 2's (and Neta Lumina's) hidden size; Z-Image's is 3840
# Our path's pieces -> diffusers' Lumina2Transformer2DModel's (its single-file converter's renaming), in this order.
_RENAMES = ((re.compile(r"^t_embedder\.mlp\.0$"), "time_caption_embed.timestep_embedder.linear_1"),
            (re.compile(r"^t_embedder\.mlp\.2$"), "time_caption_embed.timestep_embedder.linear_2"),
            (re.compile(r"^cap_embedder\."), "time_caption_embed.caption_embedder."),
            (re.compile(r"^final_layer\.adaLN_modulation\.1$"), "norm_out.linear_1"),
            (re.compile(r"^final_layer\.linear$"), "norm_out.linear_2"),
            (re.compile(r"^(context_refiner\.\d+)\.attention_norm1$"), r"\1.norm1"),
            (re.compile(r"\.attention_norm1$"), ".norm1.norm"),
            (re.compile(r"\.attention_norm2$"), ".norm2"),
            (re.compile(r"\.adaLN_modulation\.1$"), ".norm1.linear"),
            (re.compile(r"\.attention\.out$"), ".attn.to_out.0"),
            (re.compile(r"\.attention\.([qk])_norm$"), r".attn.norm_\1"),
            (re.compile(r"\.feed_forward\.w([123])$"), r".feed_forward.linear_\1"))


def diffusers_name(path: str) -> str:
    """diffusers' Lumina2Transformer2DModel name of one of our layer paths (the same where diffusers keeps it)."""
    for pattern, replacement in _RENAMES:
        path = pattern.sub(replacement, path)
    return path


def lumina2_index(model: Lumina2Model) -> dict[str, str]:
    """Every name a LoRA file may give a whole layer of a Lumina2Model (ours, diffusers' and Z-Image's diffusers
    names) -> its path."""
    index: dict[str, str] = {}
    for path in targets(model):
        for name in {path, diffusers_name(path), z_image_name(path)}:
            index.update(dict.fromkeys(spellings(name), path))
    return index


def lumina2_slots(model: Lumina2Model) -> dict[str, Slot]:
    """The q, k and v projections by diffusers' names (`attn.to_q`) and Z-Image's (`attention.to_q`), every
    spelling -> their rows of our fused `attention.qkv`."""
    c = model.config
    kv = c.num_kv_heads * c.head_dim
    rows = {"to_q": (0, c.dim), "to_k": (c.dim, kv), "to_v": (c.dim + kv, kv)}
    slots: dict[str, Slot] = {}
    for path, layer in model.named_modules():
        if path.endswith(".attention.qkv") and isinstance(layer, nn.Linear):
            block = path.removesuffix(".attention.qkv")
            for attention in ("attn", "attention"):
                for name, (start, size) in rows.items():
                    slots.update(dict.fromkeys(spellings(f"{block}.{attention}.{name}"), Slot(path, start, size)))
    return slots


def lumina2_redundant(model: Lumina2Model, names: Iterable[str]) -> set[str]:
    """A file's patch names that repeat others of the file: a fused `qkv` next to its q / k / v, `out` next to
    `to_out.0` (`ldm.lora_z_image.redundant`)."""
    return redundant(lumina2_index(model), lumina2_slots(model), names)


_BLOCK = r"(layers|noise_refiner|context_refiner)[._]\d+[._]"
_DIFFUSERS = re.compile(PREFIX_PATTERN + r"(" + _BLOCK + r"(attn[._]|feed_forward[._]linear_\d|norm1[._]linear)|"
                        r"time_caption_embed[._]|norm_out[._]linear_\d)")
_ATTENTION = re.compile(PREFIX_PATTERN + _BLOCK + r"(attention|attn)[._](?P<part>qkv|to_q|to_k|to_v)$")


def lumina2_family(weights: dict) -> str | None:
    """"lumina2" for a LoRA's patches by name (`Lora.weights`) that are recognisably Lumina 2's (the module
    docstring's rule), else None."""
    for name, patch in weights.items():
        if _DIFFUSERS.search(name):
            return "lumina2"
        attention = _ATTENTION.search(name)
        if attention is None:
            continue
        part = attention["part"]
        grouped = (patch.in_numel < patch.out_features < 3 * patch.in_numel if part == "qkv"
                   else part != "to_q" and patch.out_features < patch.in_numel)
        if grouped or patch.in_numel == RELEASED_WIDTH:
            return "lumina2"
    return None
