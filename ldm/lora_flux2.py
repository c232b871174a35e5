"""FLUX.2 LoRA names: the names LoRA files give the layers of our Flux2 transformer, and how a file is told FLUX.2's.

Loom's Flux2 keeps Black Forest Labs' names (`double_blocks.N.img_attn.qkv`, `img_mlp.0`, `single_blocks.N.linear1`,
the shared `double_stream_modulation_img.lin`, ...: ldm.flux2). diffusers' Flux2Transformer2DModel splits the double
blocks' fused attentions (`attn.to_q` / `to_k` / `to_v` of the image stream, `attn.add_q_proj` / ... of the text
stream) and renames the rest (`ff.linear_in`, `ff_context.linear_out`, `attn.to_out.0`, `attn.to_add_out`, the single
blocks' `attn.to_qkv_mlp_proj` and `attn.to_out`, `double_stream_modulation_img.linear`, `x_embedder`,
`time_guidance_embed.timestep_embedder.linear_1`, `proj_out`, `norm_out.linear`: its single-file converter's
renaming). Both sets are read, each in every spelling trainers write:

- ai-toolkit and ComfyUI: `diffusion_model.` then BFL's names (`lora_A`/`lora_B`, or `lora_down`/`lora_up` with
  `.alpha`); some ai-toolkit exports put diffusers' names there instead;
- diffusers / PEFT: `transformer.` then diffusers' names (PEFT's own `base_model.model.` too); DiffSynth: bare;
- kohya / musubi-tuner: `lora_unet_` and BFL's name flattened (`lora_unet_double_blocks_0_img_attn_qkv`);
  SimpleTuner's LyCORIS `lycoris_`, OneTrainer's `lora_transformer_` likewise, on either set of names.

diffusers' q, k and v are row slots of our fused `img_attn.qkv` / `txt_attn.qkv`, each with its own rank and alpha
(`ldm.lora_flux`'s Slot and SlicedWeight); diffusers' fused `attn.to_qkv` / `attn.to_added_qkv` (its LoKr files) and
BFL's `qkv` patch the layer whole. The single blocks are fused in diffusers too (`to_qkv_mlp_proj` is our `linear1`),
so they need no slots; ComfyUI's `linear1_qkv` (its q, k, v rows) is read as for Flux.1. diffusers' `norm_out.linear`
is our `final_layer.adaLN_modulation.1` with its halves swapped (scale, shift), a slot rolled by half its rows, as its
single-file converter swaps the weight. (diffusers' own LoRA converter maps a BFL-named `final_layer.adaLN_modulation.1`
onto `norm_out.linear` without that swap; Loom patches the layer the file names.) No FLUX.2 trainer is known to write
a layer twice, so no patch is left out as a repeat.

Family: FLUX.2 and Flux.1 share BFL's block names, so a file is FLUX.2's ("flux2") where it has names Flux.1 lacks
(the shared modulations, diffusers' `ff.linear_in` / `to_qkv_mlp_proj` / single-block `attn.to_out`) or BFL-named
layers of FLUX.2's shapes: a SwiGLU MLP (img_mlp.0 six times as wide out as in; img_mlp.2 three times as wide in as
out), single blocks' linear1 nine times as wide out as in (linear2 four times as wide in as out), or a width of 4096
or 6144 (klein 9B, dev; Flux.1's is 3072). The reverse marks (per-block modulations, `proj_mlp`, `ff.net`, Flux.1's
shapes, a double block past FLUX.2's 8) tell a Flux.1 file (`is_flux1_lora`). A file with neither (attention alone,
3072 wide: FLUX.2 [klein] 4B's width and Flux.1's) reads as "flux" (ldm.lora_families), as before, and patches a
FLUX.2 model where its names and shapes fit, as a file of no known family does.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ldm.flux2 import Flux2
from ldm.lora_flux import Slot, _bfl_slots
from ldm.lora_formats import WeightPatch

_PREFIXES = ("diffusion_model.", "", "transformer.", "base_model.model.")
_FLAT_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")
# diffusers' name inside transformer_blocks.N -> ours inside double_blocks.N (a whole layer).
_DOUBLE = {"attn.to_qkv": "img_attn.qkv", "attn.to_added_qkv": "txt_attn.qkv", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
           "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
# ... and its split q, k, v: (our fused layer, the part's index).
_DOUBLE_PARTS = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                 "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                 "attn.add_v_proj": ("txt_attn.qkv", 2)}
# single_transformer_blocks.N -> single_blocks.N
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_OUTER = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}


def _spellings(name: str) -> list[str]:
    flat = name.replace(".", "_")
    return [p + name for p in _PREFIXES] + [p + flat for p in _FLAT_PREFIXES]


def _diffusers_targets(model: Flux2) -> dict[str, str | Slot]:
    """diffusers' layer names -> our layer path (a whole layer) or a Slot of a fused one."""
    c = model.config
    h = c.hidden_size
    targets: dict[str, str | Slot] = {k: v for k, v in _OUTER.items()
                                      if c.guidance_embed or not v.startswith("guidance_in")}
    targets["norm_out.linear"] = Slot("final_layer.adaLN_modulation.1", 0, 2 * h, roll=h)
    for i in range(c.depth):
        targets.update({f"transformer_blocks.{i}.{theirs}": f"double_blocks.{i}.{ours}"
                        for theirs, ours in _DOUBLE.items()})
        targets.update({f"transformer_blocks.{i}.{theirs}": Slot(f"double_blocks.{i}.{ours}", part * h, h)
                        for theirs, (ours, part) in _DOUBLE_PARTS.items()})
    for i in range(c.depth_single_blocks):
        targets.update({f"single_transformer_blocks.{i}.{theirs}": f"single_blocks.{i}.{ours}"
                        for theirs, ours in _SINGLE.items()})
    return targets


def flux2_index(model: Flux2) -> dict[str, str]:
    """Every name a LoRA file may give a whole layer of a Flux2 transformer (BFL's and diffusers') -> its path.
    BFL's come last, so that `diffusion_model.` + our path is the name written back for each layer."""
    index: dict[str, str] = {}
    for name, target in _diffusers_targets(model).items():
        if isinstance(target, str):
            index.update(dict.fromkeys(_spellings(name), target))
    for path, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            index.update(dict.fromkeys(_spellings(path), path))
    return index


def flux2_slots(model: Flux2) -> dict[str, Slot]:
    """diffusers' q, k and v projections and its swapped `norm_out.linear` (every spelling), and ComfyUI's
    `linear1_qkv` -> their rows of our fused layers."""
    slots = {spelling: target for name, target in _diffusers_targets(model).items() if isinstance(target, Slot)
             for spelling in _spellings(name)}
    return {**_bfl_slots(model), **slots}


_PREFIX = r"^(diffusion_model\.|transformer\.|base_model\.model\.|lora_unet_|lycoris_|lora_transformer_)?"
_FLUX2_NAME = re.compile(_PREFIX + r"(double_stream_modulation_(img|txt)|single_stream_modulation)[._]|"
                         + _PREFIX + r"(transformer_blocks[._]\d+[._]ff(_context)?[._]linear_(in|out)|"
                         r"single_transformer_blocks[._]\d+[._]attn[._](to_qkv_mlp_proj|to_out))$")
_FLUX1_NAME = re.compile(r"(^|[._])(double_blocks[._]\d+[._](img|txt)_mod[._]lin|single_blocks[._]\d+[._]modulation"
                         r"[._]lin|vector_in[._]|time_text_embed[._]|transformer_blocks[._]\d+[._](norm1(_context)?"
                         r"[._]linear|ff(_context)?[._]net[._])|single_transformer_blocks[._]\d+[._](proj_mlp|proj_out|"
                         r"norm[._]linear|attn[._]to_[qkv])$)")
# A double block FLUX.2 does not have: the released models have 8 at most (dev, klein 9B), Flux.1 has 19.
_DOUBLE_BLOCK = re.compile(r"(^|[._])(double_blocks|(?<!single_)transformer_blocks)[._](\d+)[._]")
_FLUX2_DOUBLE_BLOCKS = 8
_BFL = r"(^|[._])"
# BFL-named layers whose shapes tell: (name, the ratio of their wider side to the model width in FLUX.2 and in
# Flux.1 (None: the same), the wider side, the model width, each read from a patch). FLUX.2's MLPs are SwiGLU, 3 x the
# width wide (their input layer twice that); Flux.1's are GELU, 4 x.
_Shape = tuple[re.Pattern, tuple[int, int] | None, Callable[[WeightPatch], int], Callable[[WeightPatch], int]]
_SHAPES: tuple[_Shape, ...] = (
    (re.compile(_BFL + r"double_blocks[._]\d+[._](img|txt)_mlp[._]0$"), (6, 4), lambda p: p.out_features,
     lambda p: p.in_numel),
    (re.compile(_BFL + r"double_blocks[._]\d+[._](img|txt)_mlp[._]2$"), (3, 4), lambda p: p.in_numel,
     lambda p: p.out_features),
    (re.compile(_BFL + r"single_blocks[._]\d+[._]linear1$"), (9, 7), lambda p: p.out_features, lambda p: p.in_numel),
    (re.compile(_BFL + r"single_blocks[._]\d+[._]linear2$"), (4, 5), lambda p: p.in_numel, lambda p: p.out_features),
    (re.compile(_BFL + r"double_blocks[._]\d+[._](img|txt)_attn[._](qkv|proj)$"), None, lambda p: p.in_numel,
     lambda p: p.in_numel),
)
_FLUX2_WIDTHS = (4096, 6144)  # FLUX.2 [klein] 9B, [dev]; Flux.1's (and [klein] 4B's) is 3072


def _shape_says(name: str, patch: WeightPatch) -> str | None:
    """"flux2" or "flux" where a BFL-named patch's shape is only one generation's, else None."""
    for pattern, ratios, wide, width in _SHAPES:
        if not pattern.search(name):
            continue
        dim = width(patch)
        if dim in _FLUX2_WIDTHS:
            return "flux2"
        if ratios is not None and dim and wide(patch) in (ratios[0] * dim, ratios[1] * dim):
            return "flux2" if wide(patch) == ratios[0] * dim else "flux"
        return None
    return None


def flux2_family(weights: dict[str, WeightPatch]) -> str | None:
    """"flux2" for a LoRA's patches by name (`Lora.weights`) that are recognisably FLUX.2's, else None."""
    if any(_FLUX2_NAME.search(n) for n in weights):
        return "flux2"
    return "flux2" if any(_shape_says(n, p) == "flux2" for n, p in weights.items()) else None


def is_flux1_lora(weights: dict[str, WeightPatch]) -> bool:
    """Whether patches on the Flux layout are recognisably Flux.1's (names or shapes FLUX.2 does not have)."""
    if flux2_family(weights) is not None:
        return False
    return any(_FLUX1_NAME.search(n) or _shape_says(n, p) == "flux"
               or ((block := _DOUBLE_BLOCK.search(n)) and int(block[3]) >= _FLUX2_DOUBLE_BLOCKS)
               for n, p in weights.items())
