"""SD1/SD2/SDXL LoRA names: LDM UNet paths in diffusers' layout, the names files give UNet and CLIP layers."""

from __future__ import annotations

import re

from torch import nn

from ldm.unet import UNetConfig, UNetModel

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_unet_blocks(config: UNetConfig) -> dict[str, str]:
    """LDM block path -> diffusers UNet2DConditionModel block path, for this UNet's shape."""
    n, levels = config.num_res_blocks, len(config.channel_mult)
    blocks = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
              "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
              "middle_block.2": "mid_block.resnets.1"}
    for level in range(levels):
        for j in range(n):
            block = 1 + level * (n + 1) + j
            blocks[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            blocks[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            blocks[f"input_blocks.{(level + 1) * (n + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    for up in range(levels):
        has_attention = bool(config.transformer_depth[levels - 1 - up])
        for j in range(n + 1):
            blocks[f"output_blocks.{up * (n + 1) + j}.0"] = f"up_blocks.{up}.resnets.{j}"
            if has_attention:
                blocks[f"output_blocks.{up * (n + 1) + j}.1"] = f"up_blocks.{up}.attentions.{j}"
        upsample = f"output_blocks.{up * (n + 1) + n}.{2 if has_attention else 1}.conv"
        blocks[upsample] = f"up_blocks.{up}.upsamplers.0.conv"
    return blocks


def rename_path(path: str, blocks: dict[str, str], resnet: dict[str, str] = _RESNET) -> str | None:
    """`path` with its longest prefix found in `blocks` replaced by that prefix's entry (None if no prefix
    is there). Inside a diffusers ResNet block (`.resnets.` on either side), the rest is renamed by `resnet`:
    `_RESNET` from LDM names, its inverse towards them."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        if head in blocks:
            target = blocks[head]
            if rest and (".resnets." in target or ".resnets." in head):
                rest = resnet.get(rest, rest)
            return f"{target}.{rest}" if rest else target
    return None


def diffusers_unet_name(ldm_name: str, blocks: dict[str, str]) -> str | None:
    """The diffusers name of one of our UNet module paths (None if it has none)."""
    return rename_path(ldm_name, blocks)


_PATCHABLE = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)  # norms: LyCORIS full-weight (w_norm) patches


def _diffusers_names(name: str) -> list[str]:
    """The names diffusers' LoRA layouts give a diffusers UNet layer: PEFT's with and without `unet.`, and the
    older attention-processor one (`attn1.processor.to_q`, `attn1.processor.to_out` for `attn1.to_out.0`)."""
    processor = re.sub(r"\.(to_[qkv]|to_out)(\.0)?$", r".processor.\1", name)
    return [f"{prefix}{n}" for prefix in ("unet.", "") for n in dict.fromkeys((name, processor))]




def sd_unet_index(unet: UNetModel) -> dict[str, str]:
    """Every name a LoRA file may use for a patchable layer of an SD UNet -> its path in `unet`."""
    index: dict[str, str] = {}
    blocks = diffusers_unet_blocks(unet.config)
    for path, layer in unet.named_modules():
        if isinstance(layer, _PATCHABLE):
            flat = path.replace(".", "_")
            index.update({"lora_unet_" + flat: path, "lycoris_" + flat: path, "diffusion_model." + path: path})
            diffusers = diffusers_unet_name(path, blocks)
            if diffusers:
                index["lora_unet_" + diffusers.replace(".", "_")] = path
                index.update(dict.fromkeys(_diffusers_names(diffusers), path))
    return index


def sd_clip_index(encoders: nn.ModuleDict) -> dict[str, str]:
    """Every name a LoRA file may use for a layer of SD's CLIP text encoders (`encoders`, SDXL's two) -> its path
    in their owner (`encoders.NAME.text_model...`)."""
    index: dict[str, str] = {}
    two = len(encoders) == 2  # SDXL: CLIP-L is kohya's te1 / diffusers' text_encoder, bigG te2 / _2
    for i, (name, encoder) in enumerate(encoders.items()):
        kohya = f"lora_te{i + 1}_" if two else "lora_te_"
        diffusers = "text_encoder_2." if two and i else "text_encoder."
        for path, layer in encoder.text_model.named_modules():
            if isinstance(layer, nn.Linear | nn.LayerNorm):
                hf = "text_model." + path
                index[kohya + hf.replace(".", "_")] = f"encoders.{name}.text_model.{path}"
                index[diffusers + hf] = f"encoders.{name}.text_model.{path}"
    return index
