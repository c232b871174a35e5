"""Z-Image LoRA names: the names LoRA files give the layers of our ZImageModel, and how a file is told Z-Image's.

Loom's ZImageModel keeps the released checkpoint's names (Lumina 2's: `layers.N.attention.qkv`, `attention.out`,
`feed_forward.w1/w2/w3`, `adaLN_modulation.0`, `x_embedder`, `final_layer.linear`, ...), which ComfyUI's repackaged
file has too. diffusers' ZImageTransformer2DModel splits the fused attention and renames a few layers (`attention.to_q`
/ `to_k` / `to_v`, `attention.to_out.0`, `attention.norm_q` / `norm_k`, `all_x_embedder.2-1`,
`all_final_layer.2-1.*`), and most Z-Image LoRAs (ai-toolkit's, diffusers' scripts', musubi-tuner's) use diffusers'
names, so both sets are read, each in every spelling ComfyUI reads (comfy/lora.py's Lumina 2 branch, built from the
same renaming) and diffusers' own Z-Image loader converts:

- ComfyUI / ai-toolkit: `diffusion_model.` then either name (`lora_down`/`lora_up` with `.alpha`, or
  `lora_A`/`lora_B`); DiffSynth-Studio: the bare name (`lora_A.default`);
- diffusers / PEFT: `transformer.` (PEFT's own `base_model.model.` too);
- kohya / musubi-tuner: `lora_unet_` and the name flattened (`lora_unet_layers_0_attention_to_q`,
  `lora_unet_layers_0_attention_qkv`); SimpleTuner's LyCORIS `lycoris_`, OneTrainer's `lora_transformer_` likewise.

diffusers' q, k and v are row slots of our fused `attention.qkv` (each with its own rank and alpha, as
`ldm.lora_flux` does for Flux); a LoRA of the fused layer itself patches it whole. Some kohya-style trainers write
an attention twice, the fused `qkv` next to `to_q` / `to_k` / `to_v` and `out` next to `to_out.0`: as diffusers'
loader does, the fused `qkv` and the bare `out` are then taken as repeats and left out (`z_image_redundant`). The RMS
norms take full-weight differences (`.diff`) where a trainer writes them.

The text encoder (Qwen3-4B) takes no LoRA: diffusers' Z-Image loader patches the transformer alone, and so does Loom
(`ldm.lora_families.takes_no_lora`), so a file's text-encoder keys are reported as patching nothing.

Family: names only Z-Image and Lumina 2 have are "z_image": `layers.N` / `noise_refiner.N` / `context_refiner.N`
followed by `attention`, `feed_forward` or `adaLN_modulation`, or `cap_embedder`, `all_x_embedder`,
`all_final_layer`, each bare or under one of the prefixes above; `ldm.lora_lumina2` first takes those whose names or
shapes tell Lumina 2's, and a Lumina 2 file that tells neither reads as Z-Image's and is let onto Lumina 2
(`ldm.lora_families.family_fits`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ldm.lora_flux import Slot
from ldm.qwen_image import RMSNorm
from ldm.z_image import NextDiT, ZImageModel

_PREFIXES = ("diffusion_model.", "", "transformer.", "base_model.model.")
_FLAT_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")
# Our path's pieces -> diffusers' (its single-file converter's renaming, which ComfyUI's LoRA names follow).
_RENAMES = ((re.compile(r"^x_embedder$"), "all_x_embedder.2-1"),
            (re.compile(r"^final_layer\."), "all_final_layer.2-1."),
            (re.compile(r"\.attention\.out$"), ".attention.to_out.0"),
            (re.compile(r"\.attention\.([qk])_norm$"), r".attention.norm_\1"))


def spellings(name: str) -> list[str]:
    """Every spelling of a layer name a file may use (the prefixes and flattenings of the module docstring)."""
    flat = name.replace(".", "_")
    return [p + name for p in _PREFIXES] + [p + flat for p in _FLAT_PREFIXES]


def targets(model: NextDiT) -> list[str]:
    """The paths a LoRA may patch in a Z-Image or Lumina 2 transformer: every linear layer and RMS norm (norms by
    full-weight differences)."""
    return [path for path, layer in model.named_modules() if isinstance(layer, nn.Linear | RMSNorm)]


def diffusers_name(path: str) -> str:
    """diffusers' name of one of our layer paths (the same where diffusers keeps it)."""
    for pattern, replacement in _RENAMES:
        path = pattern.sub(replacement, path)
    return path


def z_image_index(model: ZImageModel) -> dict[str, str]:
    """Every name a LoRA file may give a whole layer of a ZImageModel (ours and diffusers') -> its path."""
    index: dict[str, str] = {}
    for path in targets(model):
        for name in {path, diffusers_name(path)}:
            index.update(dict.fromkeys(spellings(name), path))
    return index


def z_image_slots(model: ZImageModel) -> dict[str, Slot]:
    """diffusers' q, k and v projections (every spelling) -> their rows of our fused `attention.qkv`."""
    dim = model.config.dim
    slots: dict[str, Slot] = {}
    for path, layer in model.named_modules():
        if path.endswith(".attention.qkv") and isinstance(layer, nn.Linear):
            block = path.removesuffix(".qkv")
            for part, name in enumerate(("to_q", "to_k", "to_v")):
                slots.update(dict.fromkeys(spellings(f"{block}.{name}"), Slot(path, part * dim, dim)))
    return slots


_TO_OUT = re.compile(r"(attention|attn)[._]to_out[._]0$")


def z_image_redundant(model: ZImageModel, names: Iterable[str]) -> set[str]:
    """A file's patch names that repeat others of the file (diffusers' rule, `redundant`)."""
    return redundant(z_image_index(model), z_image_slots(model), names)


def redundant(index: dict[str, str], slots: dict[str, Slot], names: Iterable[str]) -> set[str]:
    """Of a file's patch names, those that repeat others of the file (diffusers' rule): a whole `attention.qkv` where
    the file patches that layer's q, k or v apart, our `attention.out` where it patches diffusers' `to_out.0`
    (Z-Image's `attention.to_out.0`, Lumina 2's `attn.to_out.0`). `index` and `slots` are the model's names."""
    names = [n for n in names if n in index or n in slots]
    split = {slots[n].path for n in names if n in slots}
    renamed_out = {index[n] for n in names if _TO_OUT.search(n)}
    return {n for n in names if n in index and (index[n] in split or (index[n] in renamed_out
                                                                         and not _TO_OUT.search(n)))}


PREFIX_PATTERN = r"^(diffusion_model\.|transformer\.|base_model\.model\.|lora_unet_|lycoris_|lora_transformer_)?"
_MARKER = re.compile(PREFIX_PATTERN + r"((layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward|"
                     r"adaLN_modulation)[._]|(cap_embedder|all_x_embedder|all_final_layer)[._])")


def z_image_family(weights: dict) -> str | None:
    """"z_image" for a LoRA's patches by name (`Lora.weights`) that are recognisably Z-Image's, else None."""
    return "z_image" if any(_MARKER.search(n) for n in weights) else None
