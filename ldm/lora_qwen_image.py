"""Qwen-Image LoRA names: the names LoRA files give the layers of our QwenImageModel, and how a file is told Qwen's.

Loom's QwenImageModel keeps the released checkpoint's names, which are diffusers' QwenImageTransformer2DModel's too
(`transformer_blocks.N.attn.to_q`, `attn.add_q_proj`, `attn.to_add_out`, `img_mod.1`, `img_mlp.net.0.proj`, ...), so
every layout Qwen-Image LoRAs come in is a prefix or a flattening of the same path:

- ComfyUI / the Lightning distillation LoRAs (lightx2v's Qwen-Image-Lightning 4- and 8-step files) / DiffSynth-Studio:
  `diffusion_model.transformer_blocks.N.attn.to_q` or the bare path (`lora_down`/`lora_up` with `.alpha`, or
  `lora_A`/`lora_B`, DiffSynth's `lora_A.default`), LyCORIS full-weight differences where a trainer writes them;
- diffusers / PEFT / SimpleTuner: `transformer.` then the path; SimpleTuner's LyCORIS `lycoris_` flattened;
- kohya / musubi-tuner / ai-toolkit: `lora_unet_transformer_blocks_N_attn_to_q` (the path flattened; OneTrainer's
  `lora_transformer_` likewise).

The text encoder (Qwen2.5-VL) takes no LoRA: diffusers' Qwen-Image loader patches the transformer alone, and so does
Loom (`ldm.lora.takes_no_lora`), so a file's text-encoder keys are reported as patching nothing.

Family: names only Qwen-Image has (`img_mod` / `txt_mod` / `img_mlp` / `txt_mlp` inside `transformer_blocks`,
`txt_norm`), its blocks under ComfyUI's or kohya's prefix with one joint `attn` (Flux's are `double_blocks` there,
SD3's `joint_blocks`), or diffusers' attention names on a block past Flux's last (18) at Qwen's width (3072) are
"qwen_image". Diffusers' attention names on blocks 0..18 alone at 3072 are Flux's too (ldm.lora_sd3 calls them
Flux's, as before).
"""

from __future__ import annotations

import re

from torch import nn

from ldm.qwen_image import QwenImageModel, RMSNorm


def _targets(model: QwenImageModel) -> list[str]:
    """The paths a LoRA may patch: every linear layer and RMS norm (norms by full-weight differences)."""
    return [path for path, layer in model.named_modules() if isinstance(layer, nn.Linear | RMSNorm)]


def qwen_image_index(model: QwenImageModel) -> dict[str, str]:
    """Every name a LoRA file may give a layer of a QwenImageModel -> its path."""
    index: dict[str, str] = {}
    for path in _targets(model):
        flat = path.replace(".", "_")
        index.update(dict.fromkeys((f"diffusion_model.{path}", path, f"transformer.{path}", f"lora_unet_{flat}",
                                    f"lycoris_{flat}", f"lora_transformer_{flat}"), path))
    return index


_PREFIX = r"^(diffusion_model\.|transformer\.|lora_unet_|lycoris_|lora_transformer_)?"
_MARKER = re.compile(_PREFIX + r"(transformer_blocks[._]\d+[._](img|txt)_(mod|mlp)[._]|txt_norm$)")
# ComfyUI's and kohya's prefixes on blocks with one joint attention: Flux's blocks are double_blocks under them.
_PREFIXED_BLOCK = re.compile(r"^(diffusion_model\.|lora_unet_)transformer_blocks[._]\d+[._]attn[._]"
                             r"(to_[qkv]|to_out[._]0|add_[qkv]_proj|to_add_out)$")
_ATTENTION = re.compile(_PREFIX + r"transformer_blocks[._](\d+)[._]attn[._](to_[qkv]|add_[qkv]_proj)$")
_WIDTH, _FLUX_BLOCKS = 3072, 19  # Qwen-Image's hidden size (Flux.1's too), Flux.1's double blocks


def qwen_image_family(weights: dict) -> str | None:
    """"qwen_image" for a LoRA's patches by name (`Lora.weights`) that are recognisably Qwen-Image's, else None."""
    if any(_MARKER.search(n) or _PREFIXED_BLOCK.search(n) for n in weights):
        return "qwen_image"
    for name, patch in weights.items():
        attention = _ATTENTION.search(name)
        if attention and int(attention[2]) >= _FLUX_BLOCKS and patch.out_features == _WIDTH:
            return "qwen_image"
    return None
