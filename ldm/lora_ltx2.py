"""LTX-2 LoRA names: the names LoRA files give the layers of our LTX2Model (LTX-2.0 19B, LTX-2.3 22B), and how a
file is told LTX-2's.

Loom's LTX2Model keeps Lightricks' checkpoint names (`ldm.ltx2`: `transformer_blocks.N.attn1.to_q`, `audio_attn2`,
`audio_to_video_attn`, `video_to_audio_attn`, `ff.net.0.proj`, `audio_ff.net.2`, `av_ca_a2v_gate_adaln_single.linear`,
`video_embeddings_connector.transformer_1d_blocks.N.attn1.to_q`, ...), and LoraLoader hands LoRAs the LTX2Denoiser
that wraps it (its `model.`). LoRAs come as:

- Lightricks (the distilled LoRAs `ltx-2-19b-distilled-lora-384`, `ltx-2.3-22b-distilled-lora-384`, the camera-control
  and IC-LoRAs, and every LoRA its trainer `ltx-trainer` saves): PEFT's `lora_A` / `lora_B` under `diffusion_model.`
  then those names (`diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_A.weight`), ComfyUI's format; ComfyUI
  reads them, and `.alpha` where a file has one, by its generic `diffusion_model.` names;
- DiffSynth-Studio: the same names bare (`transformer_blocks.0.attn1.to_out.0.lora_B.default.weight`), which
  ComfyUI reads for LTX-2 since its PR #14349; kohya-style `lora_unet_` with the name flattened (ComfyUI's generic
  names for every model);
- diffusers / PEFT (LTX2LoraLoaderMixin): `transformer.` then diffusers' LTX2VideoTransformer3DModel names (`proj_in`,
  `audio_proj_in`, `time_embed`, `audio_time_embed`, `av_cross_attn_video_scale_shift`, `norm_q` / `norm_k`, the
  cross-attention tables `video_a2v_cross_attn_scale_shift_table`, `prompt_adaln`; the blocks' layers as ours), and
  `connectors.` then its LTX2TextConnectors names for the connectors (`video_connector.transformer_blocks.N.attn1
  .to_q`); diffusers' own loader turns a `diffusion_model.` file into those names.

Every linear layer and q / k norm is patched by name, the modulation tables and connector registers by full-weight
differences (`.diff`). The text encoder (Gemma 3 and its feature projection, a file's `text_embedding_projection.`
keys) takes no LoRA here (`ldm.lora_families.takes_no_lora`): its keys are reported as patching nothing.

Family "ltx2": a name only LTX-2 has, under any of those prefixes (its audio stream's, the audio-video cross-attention
and its modulations, the text connectors, LTX-2.3's gates and prompt modulation). A file of video-block names alone
(the LTX-Video names; 4096 wide, as LTX-Video 13B's) does not tell LTX-2's from LTX-Video's: it reads as "ltxv"
(`ldm.lora_ltxv`) and fits an LTX-2 model too (`ldm.lora_families.family_fits`), where its shapes decide.
"""

from __future__ import annotations

import re

from torch import nn

from ldm.ltx2 import _DIFFUSERS_PARTS, _DIFFUSERS_TOP, LTX2Model

_CONNECTORS = ("video_embeddings_connector", "audio_embeddings_connector")  # diffusers' under `connectors.`
_TOP = {ours: theirs for theirs, ours in _DIFFUSERS_TOP.items()}
_PARTS = {ours: theirs for theirs, ours in _DIFFUSERS_PARTS.items()}


def diffusers_name(path: str) -> str:
    """diffusers' name of one of our LTX2Model layer (or parameter) paths (a connector's without `connectors.`)."""
    top, *parts = path.split(".")
    return ".".join([_TOP.get(top, top), *(_PARTS.get(p, p) for p in parts)])


def targets(model: LTX2Model) -> list[str]:
    """The paths a LoRA may patch: every linear layer and q / k norm, and the parameters of no layer of their own
    (modulation tables, connector registers)."""
    layers = {path for path, layer in model.named_modules() if isinstance(layer, nn.Linear | nn.RMSNorm)
              and getattr(layer, "weight", None) is not None}
    return sorted(layers) + [name for name, _ in model.named_parameters() if name.rpartition(".")[0] not in layers]


def spellings(path: str) -> set[str]:
    """Every name a file may give the layer at `path` in the model (see the module docstring)."""
    diffusers = ("connectors." if path.startswith(_CONNECTORS) else "transformer.") + diffusers_name(path)
    return {f"diffusion_model.{path}", path, f"lora_unet_{path.replace('.', '_')}", diffusers}


def ltx2_index(module: nn.Module) -> dict[str, str]:
    """Every name a LoRA file may give a layer of an LTX2Model, or of the denoiser that wraps it (its `model`) -> its
    path in `module`."""
    model, prefix = (module, "") if isinstance(module, LTX2Model) else (module.model, "model.")
    index: dict[str, str] = {}
    for path in targets(model):
        index.update(dict.fromkeys(spellings(path), prefix + path))
    return index


_PREFIX = r"^(diffusion_model\.|transformer\.|connectors\.|lora_unet_)?"
# Outer layers only LTX-2 has, in our and diffusers' names.
_OUTER = ("audio_patchify_proj", "audio_proj_in", "audio_adaln_single", "audio_time_embed", "audio_caption_projection",
          "audio_proj_out", "audio_scale_shift_table", "av_ca_", "av_cross_attn_", "prompt_adaln", "audio_prompt_adaln",
          "video_embeddings_connector", "audio_embeddings_connector", "video_connector", "audio_connector")
# A block's layers and tables only LTX-2 has (LTX-2.3's gates: `to_gate_logits` of any attention).
_BLOCK = ("audio_attn1", "audio_attn2", "audio_ff", "audio_to_video_attn", "video_to_audio_attn",
          "audio_scale_shift_table", "scale_shift_table_a2v_ca_", "video_a2v_cross_attn_", "audio_a2v_cross_attn_",
          "prompt_scale_shift_table", "audio_prompt_scale_shift_table", r"attn[12][._]to_gate_logits")
_MARKER = re.compile(_PREFIX + r"((" + "|".join(_OUTER) + r")|transformer_blocks[._]\d+[._](" + "|".join(_BLOCK)
                     + r"))")


def ltx2_family(weights: dict) -> str | None:
    """"ltx2" for a LoRA's patches by name (`Lora.weights`) that are recognisably LTX-2's, else None."""
    return "ltx2" if any(_MARKER.search(n) for n in weights) else None
