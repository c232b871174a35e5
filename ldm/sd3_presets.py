"""Tiny random-weight Stable Diffusion 3 files in the real layouts, for tests and trying workflows without downloads.

`make_sd3_files(models_dir)` writes what an SD3 user's folders hold, tiny: an all-in-one checkpoint in Stability's
layout with its three text encoders (sd3.5_large.safetensors-like, models/checkpoints), the same without them
(sd3_medium.safetensors-like), and the text encoders as TripleCLIPLoader's files (models/text_encoders: CLIP-L and
CLIP-G in transformers' CLIPTextModelWithProjection names, T5 in T5EncoderModel's). Their widths fit together (CLIP-L
+ CLIP-G fit in T5's width, the transformer's context width; their projections make its pooled width), so workflows
run end to end; the pictures are noise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ldm.checkpoint import UNET_PREFIX, VAE_PREFIX, write_safetensors
from ldm.flux_presets import TINY_FLUX_VAE, distinct_random_
from ldm.mmdit import MMDiT, MMDiTConfig
from ldm.presets import randomize_
from ldm.sd3_text import PREFIXES
from ldm.t5 import T5Config, build_t5
from ldm.vae import AutoencoderKL

TINY_T5 = T5Config(vocab_size=32128, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
# (width, layers, MLP width, projection) of the tiny CLIP-L and CLIP-G.
TINY_CLIPS = {"clip_l": (32, 2, 64, 32), "clip_g": (48, 2, 96, 48)}
TINY_SD3 = MMDiTConfig(hidden_size=32, depth=2, num_heads=2, adm_in_channels=32 + 48, context_dim=TINY_T5.d_model,
                       pos_embed_max_size=16)
VARIANTS = {"sd3-medium": TINY_SD3,
            "sd3.5-large": dataclasses.replace(TINY_SD3, depth=3, num_heads=4, qk_norm=True),
            "sd3.5-medium": dataclasses.replace(TINY_SD3, depth=3, qk_norm=True, dual_attention_layers=(0, 1))}
TINY_SD3_VAE = dataclasses.replace(TINY_FLUX_VAE, scaling_factor=1.5305)
_NORMS = ("norm1.weight", "norm2.weight", "final_layer_norm.weight", "layer_norm.weight", ".ln_q.weight",
          ".ln_k.weight")


def random_mmdit(config: MMDiTConfig = TINY_SD3, seed: int = 0) -> MMDiT:
    """An MMDiT with seeded random weights, each distinct (see ``ldm.flux_presets.random_flux``), and a random
    position table."""
    model = distinct_random_(MMDiT(config).eval(), seed, norm_scales=_NORMS)
    model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model


def random_clip(kind: str, seed: int = 0) -> torch.nn.Module:
    """transformers' CLIPTextModelWithProjection of the tiny CLIP-L or CLIP-G shape, seeded random weights. CLIP-L's
    projection is the identity, so that diffusers (which projects CLIP-L's pooled state) and ComfyUI (which does
    not, as ``ldm.sd3_text``) read the files alike."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    hidden, layers, mlp, projection = TINY_CLIPS[kind]
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                            num_attention_heads=hidden // 16, max_position_embeddings=77, projection_dim=projection,
                            hidden_act="quick_gelu" if kind == "clip_l" else "gelu", bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407 if kind == "clip_l" else 0)
    model = distinct_random_(CLIPTextModelWithProjection(config).eval(), seed, norm_scales=_NORMS)
    if kind == "clip_l":
        model.text_projection.weight.data.copy_(torch.eye(projection, hidden))
    return model


def random_t5(seed: int = 0) -> torch.nn.Module:
    """transformers' T5EncoderModel of the tiny shape, seeded random weights."""
    return distinct_random_(build_t5(TINY_T5).model.eval(), seed, norm_scales=_NORMS)


def tiny_sd3_parts(variant: str = "sd3-medium", seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of tiny SD3 parts in their files' layouts: "unet" (Stability's MMDiT), "clip_l" and
    "clip_g" (transformers' CLIPTextModelWithProjection), "t5xxl" (T5EncoderModel, without the tied embed_tokens
    copy), "vae" (the 16-channel autoencoder in LDM names)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    vae = randomize_(AutoencoderKL(TINY_SD3_VAE), torch.Generator().manual_seed(seed + 1))
    return {"unet": random_mmdit(VARIANTS[variant], seed).state_dict(),
            "clip_l": random_clip("clip_l", seed + 2).state_dict(),
            "clip_g": random_clip("clip_g", seed + 3).state_dict(),
            "t5xxl": {k: v for k, v in random_t5(seed + 4).state_dict().items() if k != "encoder.embed_tokens.weight"},
            "vae": vae.state_dict()}


def make_sd3_files(models_dir: str | Path, variant: str = "sd3-medium", seed: int = 0,
                   dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write tiny SD3 files into the model folders under `models_dir`; returns each file's path by part
    ("checkpoint": with the text encoders, "bare_checkpoint": without, "clip_l", "clip_g", "t5xxl")."""
    models_dir = Path(models_dir)
    parts = tiny_sd3_parts(variant, seed)
    paths = {"checkpoint": models_dir / "checkpoints" / f"{variant}-tiny-incl-clips-t5.safetensors",
             "bare_checkpoint": models_dir / "checkpoints" / f"{variant}-tiny.safetensors",
             **{kind: models_dir / "text_encoders" / f"sd3-{kind}-tiny.safetensors" for kind in PREFIXES}}
    for kind in PREFIXES:  # the tiny CLIP widths are not the released ones: the metadata says which is which
        write_safetensors(parts[kind], paths[kind], {} if kind == "t5xxl" else {"loom.text_encoder": kind}, dtype)
    bare = {**{UNET_PREFIX + k: v for k, v in parts["unet"].items()},
            **{VAE_PREFIX + k: v for k, v in parts["vae"].items()}}
    write_safetensors(bare, paths["bare_checkpoint"], {}, dtype)
    text = {PREFIXES[kind] + k: v for kind in PREFIXES for k, v in parts[kind].items()}
    write_safetensors({**bare, **text}, paths["checkpoint"], {}, dtype)
    return paths
