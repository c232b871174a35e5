"""Attention for the UNet and VAE: SDPA with an optional query-chunked path; the LDM spatial transformer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.layout import GroupNorm, is_channels_last


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              query_chunk: int | None = None) -> torch.Tensor:
    """Multi-head attention over [B, L, heads*dim] tensors, returning [B, Lq, heads*dim].

    With `query_chunk`, queries are processed in slices of that many tokens so the
    [Lq, Lk] score matrix never exists in full: the memory-saving path for large images.
    """
    b, lq, inner = q.shape
    dim = inner // heads
    q, k, v = (t.view(b, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    if query_chunk is None or query_chunk >= lq:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + query_chunk], k, v)
                         for i in range(0, lq, query_chunk)], dim=2)
    return out.transpose(1, 2).reshape(b, lq, inner)


def attention_with_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention`, computed explicitly so that its map is there too: [B, Lq, heads*dim] and the softmax
    probabilities [B*heads, Lq, Lk], in fp32."""
    b, lq, inner = q.shape
    dim = inner // heads
    q, k, v = (t.view(b, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    probs = (q.float() @ k.float().transpose(-1, -2) * dim**-0.5).softmax(dim=-1)
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, lq, inner)
    return out, probs.reshape(b * heads, lq, -1)


class CrossAttention(nn.Module):
    """LDM `CrossAttention`: self-attention when no context is given. With `identity_attention` (set on a
    patched copy, see `ldm.patches.perturbed_attention_copy`), self-attention's map is the identity: each
    token gets its own value. With a `recorder` (on a copy, see `ldm.patches.AttentionRecorder`), each
    self-attention map is handed to it. With `hypernetworks` (on a copy, see `ldm.hypernetwork`), each
    transforms the key and value inputs in turn. With a `token_merge` (on a copy, see `ldm.tome`), self-attention
    runs the merged tokens' queries over every token's keys and values, and the output is unmerged."""

    identity_attention = False
    recorder: Callable[[torch.Tensor], None] | None = None
    hypernetworks: tuple[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], ...] = ()
    token_merge: Callable[[torch.Tensor], Any] | None = None  # x -> an `ldm.tome.TokenMerge`, or None

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.query_chunk: int | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        keys = values = x if context is None else context
        for hypernetwork in self.hypernetworks:
            keys, values = hypernetwork(keys, values)
        if self.identity_attention and context is None:
            return self.to_out(self.to_v(values))
        if self.recorder is not None and context is None:
            out, probs = attention_with_map(self.to_q(x), self.to_k(keys), self.to_v(values), self.heads)
            self.recorder(probs)
            return self.to_out(out)
        merging = self.token_merge(x) if self.token_merge is not None and context is None else None
        q = self.to_q(x if merging is None else merging.merge(x))
        out = self.to_out(attention(q, self.to_k(keys), self.to_v(values), self.heads, self.query_chunk))
        return out if merging is None else merging.unmerge(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is a parameterless dropout in LDM; keeping it keeps `net.2` at its checkpoint name.
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """LDM's transformer block. With `disable_self_attn` (the x4 upscaler's lower levels) the first attention
    attends to the context as the second does, not to the image itself. With a `fuser` (on a copy, see
    `ldm.gligen.grounded_unet`), the image tokens pass through it between self- and cross-attention. With an
    `attn1_output` (on a copy, see `nodes.sd.nag`), the first attention's output passes through it before it is
    added to the tokens (ComfyUI's attn1_output_patch)."""

    fuser: Callable[[torch.Tensor], torch.Tensor] | None = None
    attn1_output: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """`tiles` (nh, nw, h, w): self-attention runs within each of nh x nw tiles of the h x w token grid
        (HyperTile) rather than over the whole of it."""
        if self.disable_self_attn:  # no self-attention: nothing to tile either
            out = self.attn1(self.norm1(x), context)
        elif tiles is None or tiles[0] * tiles[1] == 1:
            out = self.attn1(self.norm1(x))
        else:
            nh, nw, h, w = tiles
            b, _, c = x.shape
            n = self.norm1(x).reshape(b, nh, h // nh, nw, w // nw, c).permute(0, 1, 3, 2, 4, 5)
            out = self.attn1(n.reshape(b * nh * nw, -1, c)).reshape(b, nh, nw, h // nh, w // nw, c)
            out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, c)
        if self.attn1_output is not None:
            out = self.attn1_output(out)
        x = out + x
        if self.fuser is not None:
            x = self.fuser(x)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image-to-tokens transformer; `proj_in`/`proj_out` are 1x1 convs (SD1) or linear (SD2, SDXL). With a
    `hypertile` (on a copy, see `ldm.patches.HyperTile`), each block's self-attention runs within tiles."""

    hypertile: Callable[[int, int, int], tuple[int, int]] | None = None

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool, disable_self_attn: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm(32, channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, disable_self_attn) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # One contiguous copy to tokens-last; a transposed view would make every later op copy or stride.
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, None if self.hypertile is None else (*self.hypertile(h, w, x.shape[-1]), h, w))
        if self.use_linear:
            x = self.proj_out(x)
        # Back in the input's memory format: a channels-last UNet (its convolutions' preferred layout on
        # CUDA) gets this view as it is, with no copy, and no layout conversion before the next conv.
        layout = torch.channels_last if is_channels_last(x_in) else torch.contiguous_format
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def set_attention_chunking(model: nn.Module, query_chunk: int | None) -> None:
    """Switch every attention layer in `model` to the chunked path (or back, with None)."""
    for module in model.modules():
        if hasattr(module, "query_chunk"):
            module.query_chunk = query_chunk
