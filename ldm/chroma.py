"""Chroma (lodestones' Flux.1-schnell-derived transformer): BFL's key layout without per-block modulation weights.

Chroma keeps Flux's double- and single-stream blocks (the same attention, MLP and q/k-norm weights under the same
names) but drops every block's `*_mod.lin` / `modulation.lin`, the pooled-CLIP `vector_in`, `time_in` and
`guidance_in`, and the final layer's `adaLN_modulation`. One "distilled guidance layer" (an approximator MLP) makes
all modulation vectors instead: for each modulation slot i it reads [timestep embedding (16), guidance embedding
(16, guidance 0), slot-index embedding of i * 1000 (32)] and gives one hidden-size vector. The slots are laid out as
ComfyUI and diffusers read them: 3 per single block (shift, scale, gate), then 6 per double block for the image
stream, 6 per double block for the text stream, then the final layer's (shift, scale). Only T5 conditions it.

`Chroma.forward(x, timesteps, context, y=None, attention_mask=None)` keeps Flux's calling convention (`y` unused:
there is no pooled prompt); `attention_mask` [B, L_text] (True: attend) masks text tokens out as keys, as
diffusers' ChromaPipeline masks T5 padding. ComfyUI feeds Chroma unpadded T5 prompts, so it needs none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.flux import (
    STANDARD_AXES,
    MLPEmbedder,
    QKNorm,
    RMSNorm,
    SelfAttention,
    _heads,
    _mlp,
    _norm,
    apply_rope,
    grid_ids,
    pad_to_patch,
    patchify,
    rope_angles,
    unpatchify,
)
from ldm.unet import timestep_embedding

_DOUBLE = re.compile(r"double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_blocks\.(\d+)\.")
_APPROX = re.compile(r"distilled_guidance_layer\.layers\.(\d+)\.")
PROBE = "distilled_guidance_layer.in_proj.weight"


@dataclass(frozen=True)
class ChromaConfig:
    """Shape of a Chroma transformer (defaults: Chroma1-HD / v4x). `approximator_*`: the distilled guidance layer's
    input width (64), hidden width (5120) and residual layers (5)."""

    in_channels: int = 16  # the latent's channels (Flux's VAE); img_in takes them patchified: 16 * 2 * 2
    out_channels: int = 16
    context_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = STANDARD_AXES
    theta: int = 10000
    approximator_in: int = 64
    approximator_hidden: int = 5120
    approximator_layers: int = 5
    patch_size: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"the RoPE axes {self.axes_dim} must add up to the head width "
                             f"{self.hidden_size} / {self.num_heads}")
        if self.approximator_in % 4:
            raise ValueError(f"the distilled guidance layer's input ({self.approximator_in}) must split in quarters")

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def modulations(self) -> int:
        """How many modulation vectors the approximator makes (344 for Chroma's 19 + 38 blocks)."""
        return 3 * self.depth_single_blocks + 12 * self.depth + 2


class Approximator(nn.Module):
    """The distilled guidance layer: in_proj, residual RMS-normed MLPs, out_proj; applied to each slot alone."""

    def __init__(self, c: ChromaConfig):
        super().__init__()
        self.in_proj = nn.Linear(c.approximator_in, c.approximator_hidden)
        self.layers = nn.ModuleList([MLPEmbedder(c.approximator_hidden, c.approximator_hidden)
                                     for _ in range(c.approximator_layers)])
        self.norms = nn.ModuleList([RMSNorm(c.approximator_hidden) for _ in range(c.approximator_layers)])
        self.out_proj = nn.Linear(c.approximator_hidden, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


def _attention(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], keys: Tensor | None) -> Tensor:
    """Flux's attention, with `keys` [B, L] (True: attend) masking keys out when given."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if keys is None else keys[:, None, None, :])
    return out.transpose(1, 2).flatten(2)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * _norm(x) + shift


class ChromaDoubleBlock(nn.Module):
    """Flux's double-stream block, its (shift, scale, gate) x 2 per stream given rather than computed."""

    def __init__(self, c: ChromaConfig):
        super().__init__()
        self.heads = c.num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_attn", SelfAttention(c.hidden_size, c.num_heads, qkv_bias=True))
            setattr(self, f"{stream}_mlp", _mlp(c.hidden_size, c.mlp_ratio))

    def forward(self, img: Tensor, txt: Tensor, img_mod: Tensor, txt_mod: Tensor, rope: tuple[Tensor, Tensor],
                keys: Tensor | None) -> tuple[Tensor, Tensor]:
        """`img_mod`, `txt_mod`: [B, 6, D] (shift, scale, gate for attention, then for the MLP)."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod[:, :, None].unbind(1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod[:, :, None].unbind(1)
        img_q, img_k, img_v = _heads(self.img_attn.qkv(_modulate(img, i_shift1, i_scale1)), self.heads,
                                     self.img_attn.norm)
        txt_q, txt_k, txt_v = _heads(self.txt_attn.qkv(_modulate(txt, t_shift1, t_scale1)), self.heads,
                                     self.txt_attn.norm)
        out = _attention(torch.cat([txt_q, img_q], 2), torch.cat([txt_k, img_k], 2), torch.cat([txt_v, img_v], 2),
                         rope, keys)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(img_out)
        img = img + i_gate2 * self.img_mlp(_modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * self.txt_mlp(_modulate(txt, t_shift2, t_scale2))
        return img, txt


class ChromaSingleBlock(nn.Module):
    """Flux's single-stream block (linear1 / linear2, attention and MLP in parallel), its modulation given."""

    def __init__(self, c: ChromaConfig):
        super().__init__()
        self.heads, self.hidden = c.num_heads, c.hidden_size
        self.mlp_hidden = int(c.hidden_size * c.mlp_ratio)
        self.linear1 = nn.Linear(c.hidden_size, 3 * c.hidden_size + self.mlp_hidden)
        self.linear2 = nn.Linear(c.hidden_size + self.mlp_hidden, c.hidden_size)
        self.norm = QKNorm(c.hidden_size // c.num_heads)

    def forward(self, x: Tensor, mod: Tensor, rope: tuple[Tensor, Tensor], keys: Tensor | None) -> Tensor:
        shift, scale, gate = mod[:, :, None].unbind(1)
        qkv, mlp = self.linear1(_modulate(x, shift, scale)).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        out = _attention(*_heads(qkv, self.heads, self.norm), rope, keys)
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=2))


class ChromaLastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        shift, scale = mod[:, :, None].unbind(1)
        return self.linear(_modulate(x, shift, scale))


class Chroma(nn.Module):
    def __init__(self, config: ChromaConfig):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_channels * c.patch_size**2, c.hidden_size)
        self.txt_in = nn.Linear(c.context_dim, c.hidden_size)
        self.distilled_guidance_layer = Approximator(c)
        self.double_blocks = nn.ModuleList([ChromaDoubleBlock(c) for _ in range(c.depth)])
        self.single_blocks = nn.ModuleList([ChromaSingleBlock(c) for _ in range(c.depth_single_blocks)])
        self.final_layer = ChromaLastLayer(c.hidden_size, c.out_channels * c.patch_size**2)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from an RMS norm's scale, which fp8 weight storage (ldm.quant) leaves as it is."""
        return self.distilled_guidance_layer.norms[0].scale.dtype if self.config.approximator_layers else \
            self.img_in.bias.dtype

    def modulations(self, timesteps: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, config.modulations, hidden]: every block's modulation vectors at noise levels `timesteps` (0..1)."""
        c = self.config
        quarter = c.approximator_in // 4
        batch, device = timesteps.shape[0], timesteps.device
        time = timestep_embedding(timesteps * 1000, quarter)
        guidance = timestep_embedding(torch.zeros(batch, device=device), quarter)  # Chroma runs at guidance 0
        index = timestep_embedding(torch.arange(c.modulations, device=device) * 1000.0, 2 * quarter)
        vec = torch.cat([torch.cat([time, guidance], dim=1)[:, None].expand(-1, c.modulations, -1),
                         index[None].expand(batch, -1, -1)], dim=-1)
        return self.distilled_guidance_layer(vec.to(dtype))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attention_mask: Tensor | None = None, control: list[Tensor] | None = None) -> Tensor:
        """Predict the velocity (noise - data) of latents `x` [B, C, H, W] at noise levels `timesteps` [B] (0..1)
        given the T5 prompt `context` [B, L, context_dim]; `attention_mask` [B, L] masks text tokens out."""
        c, dtype = self.config, self.dtype
        if control is not None:
            raise ValueError("ControlNets and T2I-Adapters do not fit a Chroma model (Loom has no Chroma ControlNet)")
        if x.shape[1] != c.latent_channels:
            raise ValueError(f"a Chroma model denoises {c.latent_channels}-channel latents (Flux's VAE); got "
                             f"{x.shape[1]} channels")
        h, w = x.shape[-2:]
        p = c.patch_size
        padded = pad_to_patch(x, p)
        rows, cols = padded.shape[-2] // p, padded.shape[-1] // p
        img = self.img_in(patchify(padded.to(dtype), p))
        txt = self.txt_in(context.to(dtype))
        mods = self.modulations(timesteps, dtype)
        t = txt.shape[1]
        ids = torch.cat([torch.zeros(t, 3, device=x.device), grid_ids(rows, cols, device=x.device)])
        rope = rope_angles(ids, c.axes_dim, c.theta)
        keys = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != t:
                raise ValueError(f"an attention mask of {attention_mask.shape[-1]} text tokens for {t}")
            keys = torch.cat([attention_mask.to(x.device, torch.bool),
                              torch.ones(x.shape[0], rows * cols, dtype=torch.bool, device=x.device)], dim=1)
        singles, doubles = 3 * c.depth_single_blocks, 6 * c.depth
        for i, block in enumerate(self.double_blocks):
            img_at, txt_at = singles + 6 * i, singles + doubles + 6 * i
            img, txt = block(img, txt, mods[:, img_at:img_at + 6], mods[:, txt_at:txt_at + 6], rope, keys)
        tokens = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            tokens = block(tokens, mods[:, 3 * i:3 * i + 3], rope, keys)
        out = self.final_layer(tokens[:, t:], mods[:, -2:])
        return unpatchify(out, rows * p, cols * p, p)[..., :h, :w].to(x.dtype)


def is_chroma(sd: Mapping[str, Tensor], prefix: str = "") -> bool:
    """Whether a state dict holds a Chroma transformer in BFL's layout (under `prefix`)."""
    return f"{prefix}{PROBE}" in sd and f"{prefix}img_in.weight" in sd


def chroma_config_from_state_dict(sd: Mapping[str, Tensor]) -> ChromaConfig:
    """The exact shape of a BFL-layout Chroma transformer (no prefix) from its key names and tensor shapes; the
    RoPE split is Flux.1's (16, 56, 56) for 128-wide heads, else the tiny files' split of their width."""
    try:
        hidden, patch_in = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        approx_hidden, approx_in = sd[PROBE].shape
        return ChromaConfig(
            in_channels=patch_in // 4, out_channels=sd["final_layer.linear.weight"].shape[0] // 4,
            context_dim=sd["txt_in.weight"].shape[1], hidden_size=hidden,
            mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden, num_heads=hidden // head_dim,
            depth=len({int(m[1]) for k in sd if (m := _DOUBLE.match(k))}),
            depth_single_blocks=len({int(m[1]) for k in sd if (m := _SINGLE.match(k))}),
            axes_dim=STANDARD_AXES if head_dim == sum(STANDARD_AXES) else small_axes(head_dim),
            approximator_in=approx_in, approximator_hidden=approx_hidden,
            approximator_layers=len({int(m[1]) for k in sd if (m := _APPROX.match(k))}))
    except KeyError as e:
        raise ValueError(f"an incomplete Chroma transformer: no weight {e}") from None


def small_axes(head_dim: int) -> tuple[int, int, int]:
    """A RoPE split of a head narrower than Flux.1's, in BFL's proportions (even parts): 16 = (4, 6, 6)."""
    side = (head_dim * 56 // 128) // 2 * 2
    return head_dim - 2 * side, side, side
