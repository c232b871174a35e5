"""Wan LoRA names: the original (ComfyUI's) names of our WanModel's layers, kohya's flattened ones, diffusers'.

Loom's WanModel keeps the original checkpoint names (`ldm.wan`), so the layouts Wan LoRAs come in map onto it as:

- ComfyUI / diffusion-pipe / the original trainers: `diffusion_model.blocks.N.self_attn.q` (`lora_down`/`lora_up` or
  `lora_A`/`lora_B`, `.alpha`), DiffSynth-Studio's without the prefix, and full-weight differences (`.diff`,
  `.diff_b`) such as the lightx2v and CausVid distillation LoRAs carry for norms, biases, `head.head` and the
  modulation tables (`blocks.N.modulation`, a bare parameter, patched as ComfyUI patches it);
- kohya's musubi-tuner: `lora_unet_blocks_N_self_attn_q` (Wan Fun's files: `lora_unet__blocks_...`);
- diffusers / PEFT: `transformer.blocks.N.attn1.to_q` (attn1 the self-attention, attn2 the cross-attention,
  `add_k_proj` / `add_v_proj` the image keys and values, `ffn.net.0.proj` / `ffn.net.2` the MLP,
  `condition_embedder.*` the text, time and image embedders, `proj_out` the head; `lora_B.bias` where diffusers
  turned a `diff_b` into PEFT's lora bias), OneTrainer's `lora_transformer_` flattened.

Wan's text encoder (UMT5) takes no LoRA: diffusers' Wan loader patches the transformer alone, and so does Loom
(`ldm.lora_families._index` gives the text encoder no names, so its keys are reported as patching nothing).

Family: the original block names with Wan's one-letter projections (`self_attn.q`, `cross_attn.k_img`, `ffn.0`), or
diffusers' `blocks.N.attn1` / `ffn.net` directly under `transformer.`, are Wan's alone; the self-attention's width
tells Wan 2.2's 5B model (3072, "wan22") from Wan 2.1's and the 2.2 14B experts' (1536, 5120, "wan21").
"""

from __future__ import annotations

import re

from torch import nn

from ldm.wan import RMSNorm, WanModel

# Our name inside blocks.N -> diffusers' (WanTransformer3DModel, as diffusers' single-file converter renames it).
_BLOCK = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
          "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
          "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
          "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
          "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
          "cross_attn.norm_k_img": "attn2.norm_added_k", "norm3": "norm2", "ffn.0": "ffn.net.0.proj",
          "ffn.2": "ffn.net.2", "modulation": "scale_shift_table"}
_OUTER = {"patch_embedding": "patch_embedding",
          "text_embedding.0": "condition_embedder.text_embedder.linear_1",
          "text_embedding.2": "condition_embedder.text_embedder.linear_2",
          "time_embedding.0": "condition_embedder.time_embedder.linear_1",
          "time_embedding.2": "condition_embedder.time_embedder.linear_2",
          "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
          "head.modulation": "scale_shift_table", "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
          "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
          "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
          "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
          "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}
_LAYERS = (nn.Linear, nn.Conv3d, nn.LayerNorm, RMSNorm)
_PARAMETERS = ("modulation", "emb_pos")  # tensors that are no layer's weight, patched by `.diff` alone
_BLOCK_PATH = re.compile(r"blocks\.(\d+)\.(.+)")


def diffusers_name(path: str) -> str | None:
    """diffusers' name of one of our WanModel layer (or parameter) paths, None if it has none."""
    block = _BLOCK_PATH.fullmatch(path)
    if block:
        inner = _BLOCK.get(block[2])
        return None if inner is None else f"blocks.{block[1]}.{inner}"
    return _OUTER.get(path)


def _targets(model: WanModel) -> list[str]:
    """The paths a LoRA may patch: every linear, conv and norm layer with a weight, and the modulation tables."""
    paths = [path for path, layer in model.named_modules()
             if isinstance(layer, _LAYERS) and getattr(layer, "weight", None) is not None]
    return paths + [name for name, _ in model.named_parameters() if name.rpartition(".")[2] in _PARAMETERS]


def wan_index(model: WanModel) -> dict[str, str]:
    """Every name a LoRA file may give a layer (or modulation table) of a WanModel -> its path."""
    index: dict[str, str] = {}
    for path in _targets(model):
        flat = path.replace(".", "_")
        index.update(dict.fromkeys((f"diffusion_model.{path}", path, f"lora_unet_{flat}", f"lora_unet__{flat}",
                                    f"lycoris_{flat}"), path))
        theirs = diffusers_name(path)
        if theirs is not None:
            index.update(dict.fromkeys((f"transformer.{theirs}", theirs,
                                        f"lora_transformer_{theirs.replace('.', '_')}"), path))
    return index


_PREFIX = r"^(diffusion_model\.|lora_unet__?|lycoris_|transformer\.|lora_transformer_)?"
_ORIGINAL = re.compile(_PREFIX + r"blocks[._]\d+[._]((self|cross)_attn[._]([qkvo]|[kv]_img|norm_[qk]|norm_k_img)|"
                       r"ffn[._][02])$")
_DIFFUSERS = re.compile(_PREFIX + r"blocks[._]\d+[._](attn[12][._](to_[qkv]|to_out[._]0|add_[kv]_proj)|"
                        r"ffn[._]net[._](0[._]proj|2))$")
_SELF_Q = re.compile(r"blocks[._]\d+[._](self_attn[._]q|attn1[._]to_q)$")
_WIDTHS = {1536: "wan21", 5120: "wan21", 3072: "wan22"}  # Wan 2.1 1.3B, 14B (and 2.2's 14B experts); 2.2 5B


def wan_family(weights: dict) -> str | None:
    """"wan21", "wan22" or, of an unreleased width, "wan" for a LoRA's patches by name (`Lora.weights`) that are
    Wan's; None for other LoRAs."""
    if not any(_ORIGINAL.search(n) or _DIFFUSERS.search(n) for n in weights):
        return None
    widths = {patch.out_features for name, patch in weights.items() if _SELF_Q.search(name)}
    return _WIDTHS.get(widths.pop(), "wan") if len(widths) == 1 else "wan"
