"""HiDream-I1 LoRA names: the names LoRA files give the layers of our HiDreamModel, and how a file is told HiDream's.

Loom's HiDreamModel keeps diffusers' HiDreamImageTransformer2DModel names, which ComfyUI's single files keep too
(`double_stream_blocks.N.block.attn1.to_q`, `attn1.to_q_t`, `ff_i.experts.N.w1`, `ff_i.shared_experts.w2`, `ff_t.w3`,
`adaLN_modulation.1`, `caption_projection.N.linear`, ...), so every layout HiDream LoRAs come in is a prefix or a
flattening of the same path:

- diffusers / PEFT (HiDreamImageLoraLoaderMixin, SimpleTuner): `transformer.` then the path (PEFT's own
  `base_model.model.` too);
- ai-toolkit / ComfyUI: `diffusion_model.` then the path (`lora_A` / `lora_B`, or `lora_down` / `lora_up` with
  `.alpha`), which diffusers' loader turns into its own names by swapping the prefix; the bare path likewise;
- kohya-style trainers: `lora_unet_` and the path flattened (`lora_unet_double_stream_blocks_0_block_attn1_to_q`);
  SimpleTuner's LyCORIS `lycoris_` and OneTrainer's `lora_transformer_` likewise.

The mixture of experts is patched expert by expert, each by its own name. The gate (`ff_i.gate`) is not a linear
layer, in diffusers' model or ours, but a bare weight [experts, width]: PEFT-based trainers cannot target it, yet
ComfyUI maps its name as it maps every weight, so a file that patches it (a low-rank pair or a LyCORIS full-weight
difference) is read by name too. The q / k RMS norms take full-weight differences (`.diff`) where a trainer writes
them.

The four text encoders (CLIP-L, CLIP-G, T5-XXL, Llama 3.1) take no LoRA: diffusers' HiDream loader patches the
transformer alone, and so does Loom (`ldm.lora_families.takes_no_lora`).

Family "hidream": names only HiDream has, bare or under one of the prefixes above: a `double_stream_blocks.N.block.`
or `single_stream_blocks.N.block.` layer, a `caption_projection.N.linear` or the `p_embedder.pooled_embedder`.
"""

from __future__ import annotations

import re

from torch import nn

from ldm.hidream import HiDreamModel, MoEGate
from ldm.lora_z_image import PREFIX_PATTERN, spellings


def targets(model: HiDreamModel) -> list[str]:
    """The paths a LoRA may patch: every linear layer, the experts' gates and the q / k RMS norms (by full-weight
    differences)."""
    return [path for path, layer in model.named_modules() if isinstance(layer, nn.Linear | nn.RMSNorm | MoEGate)]


def hidream_index(model: HiDreamModel) -> dict[str, str]:
    """Every name a LoRA file may give a layer of a HiDreamModel (every spelling of its path) -> its path."""
    index: dict[str, str] = {}
    for path in targets(model):
        index.update(dict.fromkeys(spellings(path), path))
    return index


_MARKER = re.compile(PREFIX_PATTERN + r"((double|single)_stream_blocks[._]\d+[._]block[._]|"
                     r"caption_projection[._]\d+[._]linear$|p_embedder[._]pooled_embedder[._])")


def hidream_family(weights: dict) -> str | None:
    """"hidream" for a LoRA's patches by name (`Lora.weights`) that are recognisably HiDream's, else None."""
    return "hidream" if any(_MARKER.search(n) for n in weights) else None
