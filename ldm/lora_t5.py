"""T5-XXL LoRA names: what trainers call the layers of Flux's and SD3's T5 encoder, mapped onto `ldm.t5.T5Encoder`.

T5's file keys are transformers' T5EncoderModel names (`encoder.block.N.layer.0.SelfAttention.q`, `...layer.1.
DenseReluDense.wi_0`), and so are Loom's layers under `T5Encoder.model`. Trainers write them as:

- kohya's sd-scripts: `lora_te3_` + the name flattened (`lora_te3_encoder_block_0_layer_0_SelfAttention_q`), for
  SD3 (CLIP-L te1, CLIP-G te2, T5 te3) and for Flux alike (CLIP-L te1, T5 te3). OneTrainer's Flux files and early
  sd-scripts Flux builds number Flux's T5 `lora_te2_`; ComfyUI reads both for Flux, and for SD3 numbers T5 after
  the CLIPs the model has (te3 with both, te1 with none).
- diffusers / PEFT: the pipeline's component name, `text_encoder_2.` in FluxPipeline, `text_encoder_3.` in
  StableDiffusion3Pipeline, then the dotted name.
- ComfyUI's generic layout: `text_encoders.t5xxl.transformer.` then the dotted name.
"""

from __future__ import annotations

import re

from torch import nn

from ldm.t5 import T5Encoder

# A T5 layer's name, flattened or dotted: what tells a T5 key from a CLIP one under a shared prefix (lora_te2_).
T5_LAYER_NAME = re.compile(r"(^|[._])encoder[._]block[._]\d+[._]layer[._]\d+[._](SelfAttention|DenseReluDense)[._]")


def t5_index(t5: T5Encoder, ours: str, kohya: tuple[str, ...], diffusers: str) -> dict[str, str]:
    """Every name a LoRA file may give a linear layer of `t5` -> its path in the text encoder holding it, `ours`
    being the T5Encoder's path there (e.g. "t5xxl"): kohya's flattened names under each of `kohya`'s prefixes,
    diffusers' under `diffusers` (the pipeline's component name with its dot), and ComfyUI's generic one."""
    index: dict[str, str] = {}
    for path, layer in t5.model.named_modules():
        if isinstance(layer, nn.Linear):
            target = f"{ours}.model.{path}"
            index.update({prefix + path.replace(".", "_"): target for prefix in kohya})
            index[diffusers + path] = target
            index["text_encoders.t5xxl.transformer." + path] = target
    return index


def is_t5_name(name: str) -> bool:
    """Whether a LoRA module name is a T5 layer's (in any of the layouts above)."""
    return T5_LAYER_NAME.search(name) is not None
