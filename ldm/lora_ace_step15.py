"""ACE-Step 1.5 LoRA names: the names LoRA files give the layers of our AceStep15Model, and how a file is told ACE-Step
1.5's.

Loom's AceStep15Model keeps ACE-Step's own module names, which ComfyUI's files keep too (`decoder.layers.N.self_attn
.q_proj`, `cross_attn.o_proj`, `mlp.gate_proj`, `decoder.time_embed.linear_1`, `encoder.lyric_encoder.layers.N...`),
and LoraLoader hands LoRAs the AceStep15Denoiser that wraps it (its `model.`). The layouts ACE-Step 1.5 LoRAs come in:

- ACE-Step 1.5's own trainer (ace-step/ACE-Step-1.5, acestep/training/lora_utils.py): PEFT on the decoder alone, so
  the names are the decoder's, `base_model.model.layers.N.self_attn.q_proj` (`lora_A` / `lora_B`, no alphas); its
  LoKr adapters (lokr_utils.py, LyCORIS on the decoder) flatten the same names under `lycoris_`
  (`lycoris_layers_0_cross_attn_k_proj`). ComfyUI's ACE-Step 1.5 branch of `model_lora_keys_unet` maps both prefixes
  onto `diffusion_model.decoder.`;
- ComfyUI's names for every model (LoRAs it trains, and kohya-style files): the whole model's path under
  `diffusion_model.` (`diffusion_model.decoder.layers.0.mlp.up_proj`) or flattened under `lora_unet_`
  (`lora_unet_decoder_layers_0_self_attn_q_proj`), condition encoder and tokenizers included;
- diffusers (AceStepLoraLoaderMixin, which patches its AceStepTransformer1DModel, the decoder, alone): `transformer.`
  then the decoder's names in diffusers' spelling (`to_q` / `to_k` / `to_v` / `to_out.0` for `q_proj` / `k_proj` /
  `v_proj` / `o_proj`, `norm_q` / `norm_k` for the q / k RMS norms, the rest as ACE-Step names them); its loader
  takes a file with ACE-Step's `q_proj` / `k_proj` names as the trainer's, dropping a `base_model.model.` prefix
  where there is one, then adding `transformer.` and renaming, so ACE-Step's bare decoder names are read too (under
  `transformer.` they are not: it would prefix them twice).

Every linear layer is patched by name; the RMS norms take full-weight differences (`.diff`) where a trainer writes
them. The patch and unpatch convolutions are left to ComfyUI's generic names alone and are not read here (no trainer
targets them).

The text encoders (Qwen3-0.6B, and the 5 Hz language model) take no LoRA: diffusers' ACE-Step loader patches the
transformer alone, ACE-Step's trainer the decoder alone, and so does Loom (`ldm.lora_families.takes_no_lora`).

Family "ace_step15": names only ACE-Step 1.5 has, under one of the prefixes above: a decoder layer
(`decoder.layers.N.`; the decoder's own `layers.N.self_attn` / `cross_attn` / `mlp` under the trainer's or LyCORIS'
prefix; its attentions under diffusers' prefix or bare), or the condition encoder's lyric / timbre encoders, the
tokenizer's attention pooler or the detokenizer.
"""

from __future__ import annotations

import re

from torch import nn

from ldm.ace_step15 import AceStep15Model

_DECODER = "decoder."
# Prefixes of the whole model's names (ComfyUI's) and of the decoder's own (the trainer's, bare, LyCORIS'); diffusers'
# `transformer.` goes with its own names alone (`spellings`).
_MODEL_PREFIXES, _MODEL_FLAT = ("diffusion_model.",), ("lora_unet_",)
_DECODER_PREFIXES, _DECODER_FLAT = ("base_model.model.", ""), ("lycoris_",)
# ACE-Step's attention names -> diffusers' (its AceStepAttention).
_DIFFUSERS_RENAMES = ((re.compile(r"\.([qkv])_proj$"), r".to_\1"), (re.compile(r"\.o_proj$"), ".to_out.0"),
                      (re.compile(r"\.([qk])_norm$"), r".norm_\1"))


def targets(model: AceStep15Model) -> list[str]:
    """The paths a LoRA may patch in the model: every linear layer and RMS norm (norms by full-weight differences)."""
    return [path for path, layer in model.named_modules() if isinstance(layer, nn.Linear | nn.RMSNorm)]


def diffusers_name(decoder_path: str) -> str:
    """diffusers' name of a decoder layer (a path under `decoder.`, without it) in its AceStepTransformer1DModel."""
    for pattern, replacement in _DIFFUSERS_RENAMES:
        decoder_path = pattern.sub(replacement, decoder_path)
    return decoder_path


def spellings(path: str) -> set[str]:
    """Every name a file may give the layer at `path` in the model (see the module docstring)."""
    names = {p + path for p in _MODEL_PREFIXES} | {p + path.replace(".", "_") for p in _MODEL_FLAT}
    if path.startswith(_DECODER):
        own = path.removeprefix(_DECODER)
        names |= {p + own for p in _DECODER_PREFIXES} | {p + own.replace(".", "_") for p in _DECODER_FLAT}
        names.add("transformer." + diffusers_name(own))
    return names


def ace_step15_index(module: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a layer of an AceStep15Model, or of the denoiser that wraps it (its `model`)
    -> its path in `module`."""
    model, prefix = (module, "") if isinstance(module, AceStep15Model) else (module.model, "model.")
    index: dict[str, str] = {}
    for path in targets(model):
        index.update(dict.fromkeys(spellings(path), prefix + path))
    return index


_MARKER = re.compile(
    r"^(diffusion_model\.|lora_unet_)?(decoder[._]layers[._]\d+[._]|encoder[._](lyric|timbre)_encoder[._]"
    r"|tokenizer[._]attention_pooler[._]|detokenizer[._])"
    r"|^(base_model\.model\.|lycoris_)layers[._]\d+[._](self_attn|cross_attn|mlp)[._]"
    r"|^(transformer\.)?layers[._]\d+[._](self|cross)_attn[._]")


def ace_step15_family(weights: dict) -> str | None:
    """"ace_step15" for a LoRA's patches by name (`Lora.weights`) that are recognisably ACE-Step 1.5's, else None."""
    return "ace_step15" if any(_MARKER.search(n) for n in weights) else None
