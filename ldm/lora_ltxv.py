"""LTX-Video LoRA names: Lightricks' (ComfyUI's) names of our LTXVModel's layers, and diffusers' where they differ.

Loom's LTXVModel keeps Lightricks' checkpoint names (`ldm.ltxv`), which diffusers' LTXVideoTransformer3DModel shares
inside the blocks (`transformer_blocks.N.attn1.to_q`, `attn2`, `ff.net.0.proj`, `ff.net.2`) but for the q/k norms
(`q_norm` / diffusers' `norm_q`) and three outer layers (`patchify_proj` / `proj_in`, `adaln_single` /
`time_embed`). LoRAs come as:

- ComfyUI / LTX-Video-Trainer: `diffusion_model.transformer_blocks.N.attn1.to_q.lora_A.weight` (also without the
  prefix, as ComfyUI reads them), with LyCORIS' full-weight differences where a trainer writes them;
- diffusers / PEFT: `transformer.` then diffusers' names (diffusers' own loader also turns a ComfyUI file into
  `transformer.` then Lightricks' names, which are the same inside the blocks); kohya-style `lora_unet_` flattened.

LTX-Video's T5 text encoder takes no LoRA (diffusers' LTX-Video loader patches the transformer alone).

Family: those block names with LTX-Video's markers (`patchify_proj`, `adaln_single`, `attn1.q_norm`) or at the
released widths (2048 for the 2B models, 4096 for the 13B) are LTX-Video's; the same block names at other widths
are also PixArt's, CogVideoX's and Mochi's diffusers names, and stay undecided. LTX-2's video stream keeps all these
names at 13B's width: a file with LTX-2's own names reads as LTX-2's first (`ldm.lora_ltx2`), one without them as
LTX-Video's, which fits an LTX-2 model too (`ldm.lora_families.family_fits`).
"""

from __future__ import annotations

import re

from torch import nn

from ldm.ltxv import LTXVModel

_RENAMES = (("patchify_proj", "proj_in"), ("adaln_single.", "time_embed."), (".q_norm", ".norm_q"),
            (".k_norm", ".norm_k"))


def diffusers_name(path: str) -> str:
    """diffusers' name of one of our LTXVModel layer (or parameter) paths."""
    for ours, theirs in _RENAMES:
        path = path.replace(ours, theirs)
    return path


def _targets(model: LTXVModel) -> list[str]:
    """The paths a LoRA may patch: every linear layer and q/k norm, and the modulation tables."""
    paths = [path for path, layer in model.named_modules() if isinstance(layer, nn.Linear | nn.RMSNorm)
             and getattr(layer, "weight", None) is not None]
    return paths + [name for name, _ in model.named_parameters() if name.endswith("scale_shift_table")]


def ltxv_index(model: LTXVModel) -> dict[str, str]:
    """Every name a LoRA file may give a layer (or modulation table) of an LTXVModel -> its path."""
    index: dict[str, str] = {}
    for path in _targets(model):
        theirs = diffusers_name(path)
        index.update(dict.fromkeys((f"diffusion_model.{path}", path, f"transformer.{path}", f"transformer.{theirs}",
                                    f"lora_unet_{path.replace('.', '_')}"), path))
    return index


_PREFIX = r"^(diffusion_model\.|transformer\.|lora_unet_)?"
_BLOCK = re.compile(_PREFIX + r"transformer_blocks[._]\d+[._](attn[12][._](to_[qkv]|to_out[._]0)|"
                    r"ff[._]net[._](0[._]proj|2))$")
_MARKER = re.compile(_PREFIX + r"(patchify_proj|adaln_single[._].*|"
                     r"transformer_blocks[._]\d+[._]attn[12][._][qk]_norm)$")
_INNER = re.compile(r"transformer_blocks[._]\d+[._]attn[12][._](to_q|to_out[._]0)$")  # inner_dim outputs
_WIDTHS = (2048, 4096)  # LTX-Video 0.9.x 2B, 13B


def ltxv_family(weights: dict) -> str | None:
    """"ltxv" for a LoRA's patches by name (`Lora.weights`) that are recognisably LTX-Video's, else None."""
    if any(_MARKER.search(n) for n in weights):
        return "ltxv"
    blocks = {patch.out_features for name, patch in weights.items() if _INNER.search(name)}
    if any(_BLOCK.search(n) for n in weights) and blocks and blocks <= set(_WIDTHS):
        return "ltxv"
    return None
