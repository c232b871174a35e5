"""The FLUX.2 transformer (Black Forest Labs' FLUX.2 [dev] 32B, FLUX.2 [klein] 4B and 9B); attribute names follow
BFL's checkpoint keys, as Comfy-Org's single files hold them (flux2_dev_fp8mixed, flux-2-klein-4b, ...).

Flux.1's double- / single-stream design (ldm.flux) with these differences:
- The FLUX.2 VAE's latent [B, 128, H/16, W/16] already packs 2x2 patches of its 32 channels: each latent pixel is
  one image token (patch 1). The prompt (`context`) is the text encoder's stacked hidden states: Mistral Small 3's
  3 x 5120 = 15360 wide for dev, Qwen3-4B's 3 x 2560 = 7680 for klein 4B, Qwen3-8B's 3 x 4096 = 12288 for klein 9B.
- No biases anywhere; no pooled prompt (no vector_in): the conditioning vector is the timestep's embedding, plus
  the guidance strength's for dev (guidance_in; klein has none).
- The modulation is shared: one projection of the vector for every double block's image stream
  (double_stream_modulation_img), one for their text stream, one for every single block; the blocks hold none.
- The MLPs are SwiGLU (silu of the first half times the second): img_mlp.0 is twice as wide as img_mlp.2 takes,
  and the single blocks' fused linear1 makes q, k, v and both halves of the MLP's input.
- 4-axis RoPE (32 channels each of a 128-wide head, theta 2000) over positions (t, h, w, l): image token (row,
  col) at (0, row, col, 0), text token j at (0, 0, 0, j).

Reference latents (FLUX.2's multi-reference editing, ComfyUI's ReferenceLatent) are appended as more image tokens,
each at its own position; only the noisy latent's tokens are predicted. Placed by `References.method`: "index" (the
FLUX.2 default, diffusers' Flux2Pipeline and ComfyUI alike) puts reference i at time 10 * (i + 1) from (0, 0);
"offset" and "uxo" as for Flux.1 Kontext (`ldm.flux_variants.reference_placements`); "index_timestep_zero" as
"index", the references' modulation taken at timestep 0 (ComfyUI's choice of that name).

FLUX.2 [klein] 9B KV (ComfyUI's FluxKVCache) is trained with the references modulated at timestep 0 and attending
only to themselves, so their keys and values in every block depend on the references alone: the first call computes
them with the full sequence (`ReferenceKV` records them), later calls of the run leave the reference tokens out and
attend to the recorded keys and values instead (diffusers' Flux2KleinKVPipeline, "extract" then "cached").

`Flux2.forward(x, timesteps, context, y, ref_latents, attn_mask)` keeps the calling convention of Loom's flow
models (ldm.sampling.denoiser): `timesteps` is sigma in 0..1, the output the velocity noise - data, and `y` [B, 1]
dev's guidance strength; without it a dev model runs unguided (ComfyUI's FluxDisableGuidance, as ldm.flux does).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.flux import AttentionHook, QKNorm, RopeScale, _heads, apply_rope, attention, rope_angles, scaled_axis
from ldm.flux_variants import References, reference_placements
from ldm.unet import timestep_embedding

STANDARD_AXES = (32, 32, 32, 32)  # BFL's RoPE split of a 128-wide head: (t, h, w, l)
THETA = 2000
TIME_SCALE = 1000.0
LATENT_CHANNELS = 128
# The time coordinate of reference i is REFERENCE_TIME_STEP * (i + 1) under "index" (ComfyUI's ref_index_scale,
# diffusers' Flux2Pipeline._prepare_image_ids `scale`).
REFERENCE_TIME_STEP = 10
DEFAULT_REFERENCE_METHOD = "index"
ZERO_TIME_METHOD = "index_timestep_zero"
_DOUBLE = re.compile(r"double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_blocks\.(\d+)\.")
# Weights of models built on FLUX.2's layout that compute something else; their files are refused by name.
VARIANTS = {"vector_in.in_layer.weight": "a pooled-prompt embedding (vector_in), which FLUX.2 does not have",
            "txt_norm.scale": "a norm of the prompt states (txt_norm), which FLUX.2 does not have",
            "double_blocks.0.img_mlp.gate_proj.weight": "a gate_proj / up_proj MLP, not FLUX.2's fused SwiGLU"}


@dataclass(frozen=True)
class Flux2Config:
    """Shape of a FLUX.2 transformer (defaults: FLUX.2 [dev]). `context_dim` is BFL's context_in_dim."""

    in_channels: int = LATENT_CHANNELS
    context_dim: int = 15360
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    mlp_hidden: int = 18432  # 3 x hidden_size in the released models
    axes_dim: tuple[int, ...] = STANDARD_AXES
    theta: int = THETA
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"the RoPE axes {self.axes_dim} must add up to the head width "
                             f"{self.hidden_size} / {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def latent_channels(self) -> int:
        return self.in_channels


# The released models (context_dim: their text encoder's 3 stacked hidden states).
FLUX2_DEV = Flux2Config()
FLUX2_KLEIN_4B = Flux2Config(context_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                             mlp_hidden=9216, guidance_embed=False)
FLUX2_KLEIN_9B = Flux2Config(context_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                             mlp_hidden=12288, guidance_embed=False)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, bias=False)
        self.out_layer = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """The (shift, scale, gate) triples every block of a stream shares, [B, sets * 3 * dim], from the vector."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.lin = nn.Linear(dim, sets * 3 * dim, bias=False)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec))


def swiglu(x: Tensor) -> Tensor:
    """silu of the first half of the last axis times the second half (FLUX.2's MLP activation)."""
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


class SelfAttention(nn.Module):
    """Only the weights: the double block runs its two streams' attention jointly."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim, bias=False)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


def _modulate(x: Tensor, params: Tensor, ref_params: Tensor | None = None, n: int = 0) -> tuple[Tensor, Tensor]:
    """LayerNorm'd `x` shifted and scaled by `params`' (shift, scale, gate) thirds [B, 3 * dim]; returns it and the
    gate. With `ref_params`, the tokens from `n` on (references at timestep 0) take those instead."""
    if ref_params is not None:
        (head, head_gate), (tail, tail_gate) = _modulate(x[:, :n], params), _modulate(x[:, n:], ref_params)
        gates = (head_gate.expand(-1, n, -1), tail_gate.expand(-1, x.shape[1] - n, -1))
        return torch.cat([head, tail], dim=1), torch.cat(gates, dim=1)
    shift, scale, gate = params[:, None].chunk(3, dim=-1)
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift, gate


def _finite16(x: Tensor) -> Tensor:
    """fp16 activations with inf / nan replaced by the largest finite values (0 for nan), as ComfyUI's and
    diffusers' FLUX.2 keep fp16 runs from overflowing; other dtypes as they are."""
    return torch.nan_to_num(x, nan=0.0, posinf=65504.0, neginf=-65504.0) if x.dtype == torch.float16 else x


@dataclass(eq=False)
class BlockKV:
    """One block's reference keys and values [B, heads, R, head_dim] after RoPE: recorded from the joint sequence's
    tokens from `start` on (the references, at its end) while `k` is None, attended to after that."""

    start: int = 0
    k: Tensor | None = None
    v: Tensor | None = None


def _attend(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
            ref: BlockKV | None) -> Tensor:
    """Joint attention (`ldm.flux.attention`); with `ref`, the references attend only to themselves: recorded into
    `ref` when it is empty, else its keys and values are attended to beside the sequence's own."""
    if ref is None:
        return attention(q, k, v, rope, mask)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if ref.k is None:
        s = ref.start
        ref.k, ref.v = k[:, :, s:].contiguous(), v[:, :, s:].contiguous()
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, :s], k, v, attn_mask=mask),
                         F.scaled_dot_product_attention(q[:, :, s:], ref.k, ref.v)], dim=2)
    else:
        if mask is not None:  # the key mask [B, 1, 1, L]: every reference key is real
            mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], ref.k.shape[2])], dim=-1)
        out = F.scaled_dot_product_attention(q, torch.cat([k, ref.k], dim=2), torch.cat([v, ref.v], dim=2),
                                             attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class ReferenceKV:
    """The references' keys and values per block for one sampling run (FLUX.2 [klein] 9B KV, ComfyUI's FluxKVCache),
    for the last few sets of references seen (a run's positive and negative prompts may hold different ones).
    Entries are matched by value: batched calls concatenate their rows' references anew at every step."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._entries: list[tuple[References, Tensor | None, int, list[BlockKV]]] = []

    def find(self, refs: References, guidance: Tensor | None, batch: int) -> list[BlockKV] | None:
        """The blocks' keys and values recorded for these references, guidance strengths and batch, if any."""
        for key, key_guidance, key_batch, blocks in self._entries:
            if key_batch == batch and _same_references(key, refs) and _same(key_guidance, guidance):
                return blocks
        return None

    def add(self, refs: References, guidance: Tensor | None, batch: int, blocks: list[BlockKV]) -> None:
        """Record a call's filled `blocks`, forgetting the oldest entry beyond `capacity`."""
        self._entries = [*self._entries, (refs, guidance, batch, blocks)][-self.capacity:]


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or (a.shape == b.shape and torch.equal(a, b.to(a.device))))


def _same_references(a: References, b: References) -> bool:
    return a.method == b.method and len(a.latents) == len(b.latents) and all(
        _same(x, y) for x, y in zip(a.latents, b.latents, strict=True))


def with_reference_kv(model: nn.Module) -> nn.Module:
    """A copy of a FLUX.2 transformer (sharing its weights) that samples with its reference keys and values recorded
    on a run's first call and reused after (ComfyUI's FluxKVCache; the sampler gives each run a `ReferenceKV`)."""
    from ldm.lora import shallow_copy

    if not isinstance(model, Flux2):
        raise TypeError(f"reference key-value caching is FLUX.2's; not for a {type(model).__name__}")
    patched = shallow_copy(model)
    patched.reference_kv = True
    return patched


class ReferenceKVRun:
    """One sampling run's calls of a `with_reference_kv` transformer (`module`, on its device), sharing one
    `ReferenceKV`; calls without references go to `unet` (the same module, maybe compiled or graphed)."""

    def __init__(self, unet: Any, module: nn.Module):
        self.unet, self.module, self.store = unet, module, ReferenceKV()

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, ref_latents: Any = None,
                 **extra: Any) -> Tensor:
        if ref_latents is None:
            return self.unet(x, t, context, y=y, **extra)
        return self.module(x, t, context, y=y, ref_latents=ref_latents, reference_kv=self.store, **extra)

    def over(self, module: nn.Module) -> ReferenceKVRun:
        """A run of another module (a guidance pass's patched copy) with its own cache of the references."""
        return ReferenceKVRun(module, module)


class DoubleStreamBlock(nn.Module):
    def __init__(self, c: Flux2Config):
        super().__init__()
        self.heads = c.num_heads
        self.img_attn, self.txt_attn = SelfAttention(c.hidden_size, c.num_heads), SelfAttention(c.hidden_size,
                                                                                                 c.num_heads)
        self.img_mlp, self.txt_mlp = _mlp(c.hidden_size, c.mlp_hidden), _mlp(c.hidden_size, c.mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, img_mod: Tensor, txt_mod: Tensor, rope: tuple[Tensor, Tensor],
                mask: Tensor | None = None, ref_mod: Tensor | None = None, n: int = 0,
                ref_kv: BlockKV | None = None, attention_hook: AttentionHook | None = None) -> tuple[Tensor, Tensor]:
        """`img_mod` / `txt_mod` the shared modulations [B, 6 * dim]; `ref_mod`, if given, modulates the image tokens
        from `n` on (the references); `ref_kv` records or gives the references' keys and values (`_attend`)."""
        img_mod1, img_mod2 = img_mod.chunk(2, dim=-1)
        txt_mod1, txt_mod2 = txt_mod.chunk(2, dim=-1)
        ref_mod1, ref_mod2 = (None, None) if ref_mod is None else ref_mod.chunk(2, dim=-1)
        img_in, img_gate = _modulate(img, img_mod1, ref_mod1, n)
        txt_in, txt_gate = _modulate(txt, txt_mod1)
        img_q, img_k, img_v = _heads(self.img_attn.qkv(img_in), self.heads, self.img_attn.norm)
        txt_q, txt_k, txt_v = _heads(self.txt_attn.qkv(txt_in), self.heads, self.txt_attn.norm)
        out = _attend(torch.cat([txt_q, img_q], 2), torch.cat([txt_k, img_k], 2), torch.cat([txt_v, img_v], 2),
                      rope, mask, ref_kv)
        if attention_hook is not None:
            out = attention_hook(out)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        img = img + img_gate * self.img_attn.proj(img_out)
        img_in, img_gate = _modulate(img, img_mod2, ref_mod2, n)
        img = img + img_gate * self.img_mlp(img_in)
        txt = txt + txt_gate * self.txt_attn.proj(txt_out)
        txt_in, txt_gate = _modulate(txt, txt_mod2)
        txt = txt + txt_gate * self.txt_mlp(txt_in)
        return _finite16(img), _finite16(txt)


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel: linear1 makes q, k, v and the MLP's (gate, value) at once, linear2 merges."""

    def __init__(self, c: Flux2Config):
        super().__init__()
        self.heads, self.hidden, self.mlp_hidden = c.num_heads, c.hidden_size, c.mlp_hidden
        self.linear1 = nn.Linear(c.hidden_size, 3 * c.hidden_size + 2 * c.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(c.hidden_size + c.mlp_hidden, c.hidden_size, bias=False)
        self.norm = QKNorm(c.head_dim)

    def forward(self, x: Tensor, mod: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None = None,
                ref_mod: Tensor | None = None, n: int = 0, ref_kv: BlockKV | None = None,
                attention_hook: AttentionHook | None = None) -> Tensor:
        x_in, gate = _modulate(x, mod, ref_mod, n)
        qkv, mlp = self.linear1(x_in).split([3 * self.hidden, 2 * self.mlp_hidden], dim=-1)
        out = _attend(*_heads(qkv, self.heads, self.norm), rope, mask, ref_kv)
        if attention_hook is not None:
            out = attention_hook(out)
        return _finite16(x + gate * self.linear2(torch.cat([out, swiglu(mlp)], dim=2)))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift)


def image_ids(rows: int, cols: int, time: int = 0, row_offset: int = 0, col_offset: int = 0,
              device: torch.device | None = None, rope_scale: RopeScale | None = None) -> Tensor:
    """The RoPE positions [rows*cols, 4] of a latent's tokens, row by row: (time, row_offset + row, col_offset +
    col, 0); the noisy latent's at time 0 from (0, 0), references elsewhere (see the module docstring). With
    `rope_scale` the rows and columns are scaled and shifted and the time shifted (ComfyUI's Flux process_img under
    rope_options, which its FLUX.2 runs)."""
    grid = torch.zeros(rows, cols, 4, device=device)
    if rope_scale is not None:
        grid[..., 0] = time + rope_scale.shift_t
        grid[..., 1] = scaled_axis(rows, row_offset, rope_scale.scale_y, rope_scale.shift_y, device)[:, None]
        grid[..., 2] = scaled_axis(cols, col_offset, rope_scale.scale_x, rope_scale.shift_x, device)[None, :]
        return grid.reshape(-1, 4)
    grid[..., 0] = float(time)
    grid[..., 1] = torch.arange(row_offset, row_offset + rows, device=device)[:, None]
    grid[..., 2] = torch.arange(col_offset, col_offset + cols, device=device)[None, :]
    return grid.reshape(-1, 4)


def text_ids(tokens: int, device: torch.device | None = None) -> Tensor:
    """The RoPE positions [tokens, 4] of the prompt: token j at (0, 0, 0, j)."""
    ids = torch.zeros(tokens, 4, device=device)
    ids[:, 3] = torch.arange(tokens, device=device)
    return ids


def reference_positions(sizes: Sequence[tuple[int, int]], rows: int, cols: int,
                        method: str = DEFAULT_REFERENCE_METHOD) -> list[tuple[int, int, int]]:
    """(time, row offset, column offset) of reference latents of `sizes` (h, w) beside a noisy latent of rows x
    cols, as ComfyUI places them for FLUX.2: "index" (and "index_timestep_zero") at times 10, 20, ... from (0, 0);
    "offset" and "uxo" as Flux.1 Kontext's (`reference_placements`, one token per latent pixel)."""
    if method in (DEFAULT_REFERENCE_METHOD, ZERO_TIME_METHOD):
        return [(REFERENCE_TIME_STEP * (i + 1), 0, 0) for i in range(len(sizes))]
    return reference_placements(sizes, rows, cols, method, patch=1)


class Flux2(nn.Module):
    rope_scale: RopeScale | None = None  # ScaleROPE's, set on a shallow copy (nodes.sd.rope)
    # NAGuidance's attention output patch, as Flux.1's (`ldm.flux.Flux.attention_output`), set on a shallow copy.
    attention_output: Callable[[Tensor, int], Tensor] | None = None

    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_channels, c.hidden_size, bias=False)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(256, c.hidden_size)
        self.txt_in = nn.Linear(c.context_dim, c.hidden_size, bias=False)
        self.double_stream_modulation_img = Modulation(c.hidden_size, sets=2)
        self.double_stream_modulation_txt = Modulation(c.hidden_size, sets=2)
        self.single_stream_modulation = Modulation(c.hidden_size, sets=1)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(c) for _ in range(c.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(c) for _ in range(c.depth_single_blocks)])
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from an RMS norm's scale, which fp8 weight storage (ldm.quant) leaves as it is."""
        block = next(iter(self.double_blocks or self.single_blocks))
        norm = block.img_attn.norm if isinstance(block, DoubleStreamBlock) else block.norm
        return norm.query_norm.scale.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                ref_latents: References | Sequence[Tensor] | None = None, attn_mask: Tensor | None = None,
                reference_kv: ReferenceKV | None = None) -> Tensor:
        """Predict the velocity (noise - data) of latents `x` [B, 128, H, W] at noise levels `timesteps` [B] (sigma,
        0..1) given the prompt states `context` [B, L, context_dim]. `y` [B, 1] is the guidance strength of a model
        with a guidance embedding (dev; None: unguided); a model without one (klein) ignores it, as ComfyUI does.
        `ref_latents` are reference latents [B or 1, 128, h, w] in the model's latent space, each its own size (a
        plain sequence is placed by "index"); `attn_mask` [B, L] (1 = a real token) keeps every token from
        attending to the prompt's padding. With `reference_kv` (klein 9B KV), the references are modulated at
        timestep 0 and attend only to themselves, their keys and values recorded there on the first call for them
        and reused by later ones."""
        c, dtype = self.config, self.dtype
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"FLUX.2 takes latents [B, {c.in_channels}, H, W] (the FLUX.2 VAE's, 2x2 patches of 32 "
                             f"channels at 1/16 of the picture); got {list(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != c.context_dim:
            raise ValueError(f"this FLUX.2 model takes prompt states [B, L, {c.context_dim}]; got "
                             f"{list(context.shape)} (a prompt from another text encoder?)")
        batch, (rows, cols) = x.shape[0], x.shape[-2:]
        t = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(-1)
        context = context.expand(batch, -1, -1) if context.shape[0] == 1 else context
        tokens, ids = [x.to(dtype).flatten(2).transpose(1, 2)], [image_ids(rows, cols, device=x.device,
                                                                           rope_scale=self.rope_scale)]
        guidance = self._guidance(y, batch)
        refs = None if ref_latents is None else (
            ref_latents if isinstance(ref_latents, References)
            else References(tuple(ref_latents), DEFAULT_REFERENCE_METHOD))
        cached = None if refs is None or reference_kv is None else reference_kv.find(refs, guidance, batch)
        if refs is not None and cached is None:
            more_tokens, more_ids = self._reference_tokens(refs, batch, rows, cols, x.device)
            tokens, ids = tokens + more_tokens, ids + more_ids
        n = rows * cols  # the noisy latent's tokens, the only ones predicted
        img = self.img_in(torch.cat(tokens, dim=1))
        txt = self.txt_in(context.to(dtype))
        t_len = txt.shape[1]
        vec = self._vector(t, guidance, dtype)
        zero_time = refs is not None and (reference_kv is not None or refs.method == ZERO_TIME_METHOD)
        ref_vec = self._vector(torch.zeros_like(t), guidance, dtype) if zero_time and img.shape[1] > n else None
        recording = refs is not None and reference_kv is not None and cached is None
        blocks_kv = ([BlockKV(t_len + n) for _ in range(len(self.double_blocks) + len(self.single_blocks))]
                     if recording else cached)
        ref_kv = iter(blocks_kv or ())
        rope = rope_angles(torch.cat([text_ids(t_len, x.device), *ids]), c.axes_dim, c.theta)
        mask = None if attn_mask is None else self._key_mask(attn_mask, txt.shape[:2], img.shape[1])
        img_mod, txt_mod = self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec)
        ref_mod = None if ref_vec is None else self.double_stream_modulation_img(ref_vec)
        hook = None if self.attention_output is None else functools.partial(self.attention_output, image_start=t_len)
        for block in self.double_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, rope, mask, ref_mod, n, next(ref_kv, None), hook)
        joint = torch.cat([txt, img], dim=1)
        mod = self.single_stream_modulation(vec)
        ref_mod = None if ref_vec is None else self.single_stream_modulation(ref_vec)
        for block in self.single_blocks:
            joint = block(joint, mod, rope, mask, ref_mod, t_len + n, next(ref_kv, None), hook)
        if recording:  # only once every block's are in
            reference_kv.add(refs, guidance, batch, blocks_kv)
        out = self.final_layer(joint[:, t_len:t_len + n], vec)
        return out.transpose(1, 2).reshape(batch, c.out_channels, rows, cols).to(x.dtype)

    def _vector(self, t: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The conditioning vector: the timestep's embedding, plus the guidance strength's if given."""
        vec = self.time_in(timestep_embedding(t.float() * TIME_SCALE, 256).to(dtype))
        if guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance * TIME_SCALE, 256).to(dtype))
        return vec

    def _guidance(self, y: Tensor | None, batch: int) -> Tensor | None:
        if y is None or not self.config.guidance_embed:
            return None
        if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1) or y.numel() not in (1, batch):
            raise ValueError(f"y of shape {list(y.shape)}: a FLUX.2 model takes y [B, 1], the guidance strength")
        return y.reshape(-1).float().expand(batch)

    @staticmethod
    def _key_mask(attn_mask: Tensor, text_shape: torch.Size, image_tokens: int) -> Tensor | None:
        """The prompt's mask [B, L] as a boolean key mask [B, 1, 1, L + image tokens] over the joint sequence
        (every image token attended to); None when every token is real."""
        batch, length = text_shape
        if attn_mask.ndim != 2 or attn_mask.shape[1] != length or attn_mask.shape[0] not in (1, batch):
            raise ValueError(f"a prompt attention mask of shape {list(attn_mask.shape)} for a prompt of {length} "
                             f"tokens (batch {batch}): FLUX.2 takes [B, {length}], 1 for each real token")
        text = attn_mask.to(torch.bool).expand(batch, -1)
        if text.all():
            return None
        joint = torch.cat([text, text.new_ones(batch, image_tokens)], dim=1)
        return joint[:, None, None, :]

    def _reference_tokens(self, refs: References, batch: int, rows: int, cols: int,
                          device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
        """Reference latents as image tokens, each with its RoPE positions (`reference_positions`)."""
        c = self.config
        for ref in refs.latents:
            if ref.ndim != 4 or ref.shape[1] != c.in_channels:
                raise ValueError(f"a reference latent of shape {list(ref.shape)}: FLUX.2 takes reference latents "
                                 f"[B, {c.in_channels}, h, w] (the FLUX.2 VAE's)")
            if ref.shape[0] not in (1, batch):
                raise ValueError(f"a batch of {ref.shape[0]} reference latents for a batch of {batch} latents")
        placements = reference_positions([tuple(r.shape[-2:]) for r in refs.latents], rows, cols, refs.method)
        tokens, ids = [], []
        for ref, (time, row, col) in zip(refs.latents, placements, strict=True):
            tokens.append(ref.to(device, self.dtype).flatten(2).transpose(1, 2).expand(batch, -1, -1))
            ids.append(image_ids(ref.shape[-2], ref.shape[-1], time, row, col, device=device,
                                 rope_scale=self.rope_scale))
        return tokens, ids


def is_flux2(sd: Mapping[str, Tensor], prefix: str = "") -> bool:
    """Whether a state dict holds a FLUX.2 transformer in BFL's layout (under `prefix`): Flux's names with the
    shared modulations."""
    return all(f"{prefix}{k}" in sd for k in ("img_in.weight", "double_stream_modulation_img.lin.weight",
                                                "single_stream_modulation.lin.weight"))


def flux2_config_from_state_dict(sd: Mapping[str, Tensor], axes_dim: tuple[int, ...] | None = None,
                                 prefix: str = "") -> Flux2Config:
    """The exact shape of BFL-layout FLUX.2 weights (under `prefix`) from their key names and tensor shapes; a
    ValueError saying what does not fit a layout Loom runs. The RoPE split of a head is not in the weights:
    `axes_dim`, else BFL's (32, 32, 32, 32) for 128-wide heads."""
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    for key, what in VARIANTS.items():
        if key in keys:
            raise ValueError(f"a transformer on FLUX.2's layout with {what}: Loom runs FLUX.2 [dev] and [klein]")
    biased = sorted(k for k in keys if k.endswith(".bias"))
    if biased:
        raise ValueError(f"its layers have biases ({biased[0]}, ...), which FLUX.2's do not: not a FLUX.2 "
                         "transformer Loom knows")
    try:
        hidden, in_channels = sd[f"{prefix}img_in.weight"].shape
        out_channels = sd[f"{prefix}final_layer.linear.weight"].shape[0]
        if in_channels != out_channels:
            raise ValueError(f"img_in takes {in_channels} channels and final_layer gives {out_channels}: FLUX.2 "
                             "takes and predicts the same latent (an edit variant Loom does not know)")
        head_dim = sd[f"{prefix}double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        if axes_dim is None:
            if head_dim != sum(STANDARD_AXES):
                raise ValueError(f"its heads are {head_dim} wide, not FLUX.2's 128, and the file does not say how "
                                 "RoPE splits them (loom.flux2_axes metadata)")
            axes_dim = STANDARD_AXES
        if len(axes_dim) != 4 or sum(axes_dim) != head_dim:
            raise ValueError(f"a RoPE split {tuple(axes_dim)} for {head_dim}-wide heads: FLUX.2 takes 4 axes")
        mlp_hidden = sd[f"{prefix}double_blocks.0.img_mlp.2.weight"].shape[1]
        if sd[f"{prefix}double_blocks.0.img_mlp.0.weight"].shape[0] != 2 * mlp_hidden:
            raise ValueError("its MLP's input layer is not twice as wide as its output layer takes (FLUX.2's SwiGLU)")
        if sd[f"{prefix}single_blocks.0.linear1.weight"].shape[0] != 3 * hidden + 2 * mlp_hidden:
            raise ValueError("its single-stream blocks' linear1 does not make q, k, v and a SwiGLU MLP as wide as "
                             "the double blocks'")
        return Flux2Config(
            in_channels=in_channels, context_dim=sd[f"{prefix}txt_in.weight"].shape[1], hidden_size=hidden,
            num_heads=hidden // head_dim, depth=len({int(m[1]) for k in keys if (m := _DOUBLE.match(k))}),
            depth_single_blocks=len({int(m[1]) for k in keys if (m := _SINGLE.match(k))}), mlp_hidden=mlp_hidden,
            axes_dim=tuple(axes_dim), guidance_embed="guidance_in.in_layer.weight" in keys)
    except KeyError as e:
        raise ValueError(f"an incomplete FLUX.2 transformer: no weight {e}") from None
