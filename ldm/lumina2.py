"""The Lumina Image 2.0 diffusion transformer (Alpha-VLLM's 2.6B "NextDiT", 2025; Neta Lumina is the same model
retrained); attribute names follow the released checkpoint, as ComfyUI's files keep them (lumina_2_model_bf16: fused
`attention.qkv`, `feed_forward.w1/w2/w3`, `adaLN_modulation`).

Z-Image (ldm.z_image) grew out of this model, and its modules are used here as they are: 2x2 patches of Flux's
16-channel latents become image tokens, the Gemma-2-2B prompt states [B, L, 2304] are RMS-normalised and projected to
text tokens, each stream is refined on its own (`noise_refiner`, modulated by the timestep; `context_refiner`,
unmodulated), then `layers` run one self-attention over [text, image] together; pre- and post-normalised blocks
modulated by a scale and a tanh gate per branch. Where Lumina 2 differs:

- no pad tokens and no padding of either stream;
- grouped attention: 24 query heads of 96 share 8 key / value heads (each key / value head serves 3 consecutive
  query heads);
- each block's modulation is SiLU then linear (Z-Image's has no SiLU), from a timestep embedding min(dim, 1024) wide;
- the noise level enters as 1 - sigma itself (0 is noise, 1 data; no factor 1000) and the output is negated, so the
  model predicts the velocity noise - data like Loom's other flow models (diffusers' Lumina2Pipeline passes
  1 - t / 1000 and negates; ComfyUI's NextDiT does both inside);
- RoPE with theta 10000 over axes 32 / 32 / 32 of a 96-wide head: text token j at (j, 0, 0) and image patch
  (row, col) at (Lt, row, col), Lt the prompt's real tokens (diffusers' and ComfyUI's placement).

Only the prompt's real tokens are used, as diffusers does with its padded prompts (`attn_mask`, 1 for each real
token: padding keys are masked in the context refiner and left out of the joint sequence); a batch whose prompts have
different real tokens runs one sample at a time. The weights' `norm_final` (an RMS norm no one applies) goes unused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.flux import pad_to_patch
from ldm.z_image import NextDiT, ZImageConfig, rope_angles

STANDARD_AXES = (32, 32, 32)  # the released model's RoPE split of its 96-wide heads
THETA = 10000.0
_LAYER = re.compile(r"layers\.(\d+)\.")
_REFINER = re.compile(r"noise_refiner\.(\d+)\.")
# Weights Lumina 2 files carry that the model never uses (the final RMS norm, dropped by ComfyUI and diffusers too).
UNUSED = ("norm_final.weight",)
_PROBES = ("cap_embedder.1.weight", "x_embedder.weight", "layers.0.attention.qkv.weight",
           "noise_refiner.0.attention.k_norm.weight")


@dataclass(frozen=True)
class Lumina2Config(ZImageConfig):
    """Shape of a Lumina 2 transformer (defaults: the released 2.6B model): ZImageConfig's fields, which the shared
    modules of ldm.z_image read, with fewer key / value heads than query heads and a SiLU before each modulation."""

    num_layers: int = 26
    num_refiner_layers: int = 2
    num_heads: int = 24
    head_dim: int = 96
    cap_feat_dim: int = 2304  # Gemma-2-2B's hidden size
    ffn_hidden: int = 9216
    t_hidden: int = 1024  # the timestep MLP's width, min(dim, 1024)
    adaln_dim: int = 1024  # the timestep embedding's width, min(dim, 1024)
    axes_dim: tuple[int, int, int] = STANDARD_AXES
    num_kv_heads: int = 8  # a field here (ZImageConfig's property: as many as query heads)

    @property
    def silu_modulation(self) -> bool:
        return True


def position_ids(text_tokens: int, rows: int, cols: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The RoPE positions of the text [Lt, 3] and of the image [rows * cols, 3] (the module docstring's)."""
    text = torch.zeros(text_tokens, 3, dtype=torch.long, device=device)
    text[:, 0] = torch.arange(text_tokens, device=device)
    image = torch.empty(rows * cols, 3, dtype=torch.long, device=device)
    image[:, 0] = text_tokens
    image[:, 1] = torch.arange(rows, device=device).repeat_interleave(cols)
    image[:, 2] = torch.arange(cols, device=device).repeat(rows)
    return text, image


class Lumina2Model(NextDiT):
    """Lumina 2's transformer: Z-Image's modules and entry (`ldm.z_image.NextDiT`: `forward(x, timesteps, context,
    y=None, attn_mask=None)` predicts the velocity noise - data at flow levels sigma), no pad tokens."""

    model_name = "Lumina 2"
    text_encoder_name = "Gemma-2-2B"

    def _forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        c, dtype = self.config, self.dtype
        p = c.patch_size
        h, w = x.shape[-2:]
        padded = pad_to_patch(x, p).to(dtype)
        b, ch, hh, ww = padded.shape
        rows, cols = hh // p, ww // p
        # patches row by row, each patch's values (row, column, channel): the reference's order
        tokens = padded.reshape(b, ch, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, -1)
        temb = self.t_embedder(1 - t.float(), dtype)
        img = self.x_embedder(tokens)
        txt = self.cap_embedder(context.to(dtype))
        text_ids, image_ids = position_ids(context.shape[1], rows, cols, x.device)
        img_rope, txt_rope = rope_angles(image_ids, c.axes_dim, THETA), rope_angles(text_ids, c.axes_dim, THETA)
        for block in self.context_refiner:
            txt = block(txt, txt_rope)
        for block in self.noise_refiner:
            img = block(img, img_rope, temb)
        joint = torch.cat([txt, img], dim=1)
        rope = tuple(torch.cat(pair) for pair in zip(txt_rope, img_rope, strict=True))
        for block in self.layers:
            joint = block(joint, rope, temb)
        out = self.final_layer(joint[:, txt.shape[1]:], temb)
        out = out.reshape(b, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, hh, ww)
        return -out[..., :h, :w].to(x.dtype)


def is_lumina2(sd: Mapping[str, object], prefix: str = "") -> bool:
    """Whether a state dict holds a Lumina 2 transformer in its released layout (under `prefix`): NextDiT's names
    (ComfyUI's test: a caption embedder and refiner q/k norms) without the pad tokens Z-Image has."""
    return (all(f"{prefix}{k}" in sd for k in _PROBES)
            and f"{prefix}cap_pad_token" not in sd and f"{prefix}x_pad_token" not in sd)


def lumina2_config_from_state_dict(sd: Mapping[str, Tensor], axes_dim: tuple[int, int, int] | None = None,
                                   prefix: str = "") -> Lumina2Config:
    """The exact shape of Lumina 2 weights (under `prefix`) from their key names and tensor shapes. The RoPE split
    of a head is not in the weights: `axes_dim`, else the released (32, 32, 32) for 96-wide heads."""
    try:
        dim, patch_values = sd[f"{prefix}x_embedder.weight"].shape
        head_dim = sd[f"{prefix}layers.0.attention.q_norm.weight"].shape[0]
        qkv_rows = sd[f"{prefix}layers.0.attention.qkv.weight"].shape[0]
        if dim % head_dim or (qkv_rows - dim) % (2 * head_dim) or qkv_rows <= dim:
            raise ValueError(f"its fused q / k / v projection ({qkv_rows} rows) does not fit {dim // head_dim} "
                             f"heads of {head_dim}")
        heads, kv_heads = dim // head_dim, (qkv_rows - dim) // (2 * head_dim)
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot share {kv_heads} key / value heads evenly")
        if axes_dim is None:
            if head_dim != sum(STANDARD_AXES):
                raise ValueError(f"its heads are {head_dim} wide, not the released model's 96, and the file does "
                                 "not say how RoPE splits them (loom.lumina2_axes metadata)")
            axes_dim = STANDARD_AXES
        if sum(axes_dim) != head_dim:
            raise ValueError(f"a RoPE split {tuple(axes_dim)} for {head_dim}-wide heads")
        adaln_dim, t_hidden = sd[f"{prefix}t_embedder.mlp.2.weight"].shape
        return Lumina2Config(
            num_layers=len({int(m[1]) for k in sd if (m := _LAYER.match(k[len(prefix):]))}),
            num_refiner_layers=len({int(m[1]) for k in sd if (m := _REFINER.match(k[len(prefix):]))}),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, in_channels=patch_values // 4,
            cap_feat_dim=sd[f"{prefix}cap_embedder.1.weight"].shape[1],
            ffn_hidden=sd[f"{prefix}layers.0.feed_forward.w1.weight"].shape[0], t_hidden=t_hidden,
            adaln_dim=adaln_dim, axes_dim=tuple(axes_dim))
    except KeyError as e:
        raise ValueError(f"an incomplete Lumina 2 transformer: no weight {e}") from None
