"""The Qwen-Image 2.1 diffusion transformer (Qwen's single-stream, block-causal DiT, 2026); attribute names follow
Comfy-Org's qwen_image_2.1_bf16.safetensors (diffusers' names, with the SwiGLU's gate and up projections fused into
one `img_mlp.gate_up` [gate; up]; `to_loom_layout` converts diffusers' split `gate_layer` / `proj`).

A rectified-flow transformer over the 64-channel, 16x VAE's latents [B, 64, H, W], unpatched (one token per latent
pixel, taken row by row). The Qwen3-VL-8B prompt states [B, L, 4096] (the image pads' states removed, as ComfyUI's
encoder gives them with references: keep_vision=False) pass a zero-centred RMS norm (scale = weight + 1) and a
two-layer GELU projection. The sequence is the text with each reference latent's tokens spliced in at its image slot
(the text position where its image pads were; after the text if it has none), then the target latent's tokens.
`num_layers` single-stream blocks follow, all modulated by one shared projection of the timestep's embedding (a scale
and a tanh gate per branch, no shift): x += tanh(g1) attn(LN(x)(1 + s1)); x += tanh(g2) swiglu(LN(x)(1 + s2)).
Text and reference tokens are modulated as at timestep 0 (diffusers' causal_condition), the target's at its own.

Attention is block-causal: text is causal, each image block (each reference, the target) attends to itself entirely
and to everything before it; the target, last, sees everything. Padded prompt tokens (`attn_mask`) are no one's keys
(diffusers' rule; ComfyUI takes no mask). The prefix (text and references) thus never sees the target and, modulated
at t = 0, is the same at every step: `PrefixKV` keeps its keys and values per block for a sampling run (ComfyUI's
QwenImage21Cache, diffusers' kv_cache), so later calls compute only the target's rows.

Positions (3-axis RoPE, theta 10000, axes 16 / 56 / 56 of a 128-wide head, pairs interleaved): a running position p
from 0; text token at (p, p, p), p += 1; an image block of h x w at frame p, rows -(h - h // 2) .. h // 2 - 1 and
likewise columns, then p += max(h, w). ComfyUI moves a reference whose side has the other parity than the target's by
half a token (+-0.5) so that it centres on the target; Loom does as ComfyUI (diffusers has no such offset; the two
agree when every side has the target's parity, which ComfyUI's 32-pixel sizing makes the usual case).

The noise level t (sigma, 0..1) enters as t * 1000, rounded to the compute dtype first as ComfyUI does. Checked against
diffusers 0.42's QwenImage21Transformer2DModel called as QwenImage21Pipeline calls it (tests/ldm/test_qwen_image21.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import write_safetensors
from ldm.flux import apply_rope, rope_angles
from ldm.flux_presets import distinct_random_
from ldm.qwen_image import RMSNorm, text_ids
from ldm.unet import timestep_embedding

STANDARD_AXES = (16, 56, 56)  # the released model's RoPE split of its 128-wide heads
THETA = 10000
TIME_SCALE = 1000.0
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
# diffusers' split SwiGLU projections, fused as [gate; up] in the released file's `img_mlp.gate_up`.
_GATE, _UP, _FUSED = "img_mlp.gate_layer.weight", "img_mlp.proj.weight", "img_mlp.gate_up.weight"
# Files Loom writes carry the RoPE split, which the weights cannot tell (the released model's heads are 128 wide).
AXES_KEY = "loom.qwen_image21_axes"


@dataclass(frozen=True)
class QwenImage21Config:
    """Shape of a Qwen-Image 2.1 transformer (defaults: the released model)."""

    num_layers: int = 32
    num_heads: int = 32
    head_dim: int = 128
    channels: int = 64  # the VAE's latent channels
    text_dim: int = 4096  # Qwen3-VL-8B's hidden size
    mlp_ratio: int = 3
    axes_dim: tuple[int, int, int] = STANDARD_AXES
    patch_size: int = 1  # latents go in unpatched; the only size the released model (and this code) has
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.patch_size != 1:
            raise ValueError(f"Qwen-Image 2.1 takes latents unpatched (patch size 1), not {self.patch_size}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"a RoPE split {tuple(self.axes_dim)} for {self.head_dim}-wide heads")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_ratio * self.dim

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def out_channels(self) -> int:
        return self.channels

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def context_dim(self) -> int:
        """The prompt states' width (Qwen3-VL-8B's hidden size)."""
        return self.text_dim


class ZeroCentredRMSNorm(nn.Module):
    """RMS norm whose weight is stored as scale - 1, applied in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (self.weight.float() + 1)).to(x.dtype)


class TextProjection(nn.Module):
    def __init__(self, text_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = ZeroCentredRMSNorm(text_dim, eps)
        self.in_layer = nn.Linear(text_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # [gate; up]
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * up)


@dataclass(eq=False)
class BlockKV:
    """One block's prefix keys and values [B, heads, P, head_dim] after RoPE: recorded while `k` is None, then
    attended to by the target's queries instead of recomputing the prefix."""

    k: Tensor | None = None
    v: Tensor | None = None


@dataclass(frozen=True)
class Masks:
    """The block-causal attention's masks: `prefix` [B or 1, 1, P, P] bool for the prefix's queries over its own keys
    (None when there is no prefix), `keys` [B, 1, 1, P + N] bool for the target's queries (None: every key)."""

    prefix: Tensor | None
    keys: Tensor | None


def _attend(q: Tensor, k: Tensor, v: Tensor, masks: Masks, kv: BlockKV | None) -> Tensor:
    """Block-causal attention of [B, heads, L, head_dim] heads: the prefix's rows over the prefix's keys under
    `masks.prefix`, the target's over all keys. With a filled `kv`, q / k / v are the target's alone and the prefix's
    keys and values are `kv`'s; with an empty one, the prefix's are recorded into it."""
    if kv is not None and kv.k is not None:
        k, v = torch.cat([kv.k, k], dim=2), torch.cat([kv.v, v], dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks.keys)
    if masks.prefix is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks.keys)
    p = masks.prefix.shape[-1]
    if kv is not None:
        kv.k, kv.v = k[:, :, :p].clone(), v[:, :, :p].clone()
    prefix = F.scaled_dot_product_attention(q[:, :, :p], k[:, :, :p], v[:, :, :p], attn_mask=masks.prefix)
    target = F.scaled_dot_product_attention(q[:, :, p:], k, v, attn_mask=masks.keys)
    return torch.cat([prefix, target], dim=2)


class Attention(nn.Module):
    def __init__(self, c: QwenImage21Config):
        super().__init__()
        self.heads = c.num_heads
        self.to_q = nn.Linear(c.dim, c.dim, bias=False)
        self.to_k = nn.Linear(c.dim, c.dim, bias=False)
        self.to_v = nn.Linear(c.dim, c.dim, bias=False)
        self.norm_q, self.norm_k = RMSNorm(c.head_dim, c.eps), RMSNorm(c.head_dim, c.eps)
        self.to_out = nn.ModuleList([nn.Linear(c.dim, c.dim, bias=False)])

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], masks: Masks, kv: BlockKV | None) -> Tensor:
        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.heads, -1))  # [B, L, heads, head_dim]

        q = apply_rope(self.norm_q(heads(self.to_q(x))).transpose(1, 2), *rope)
        k = apply_rope(self.norm_k(heads(self.to_k(x))).transpose(1, 2), *rope)
        v = heads(self.to_v(x)).transpose(1, 2)
        return self.to_out[0](_attend(q, k, v, masks, kv).transpose(1, 2).flatten(2))


# A modulation parameter for the prefix [1, 1, dim] and for the target [B, 1, dim].
Rows = tuple[Tensor, Tensor]


def _scaled(x: Tensor, scale: Rows, p: int) -> Tensor:
    """LayerNorm'd `x` (no affine) times 1 + scale: the t = 0 row for the first `p` tokens, the target's after."""
    x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
    return torch.cat([x[:, :p] * (1 + scale[0]), x[:, p:] * (1 + scale[1])], dim=1)


def _gated(x: Tensor, y: Tensor, gate: Rows, p: int) -> Tensor:
    return x + torch.cat([y[:, :p] * gate[0], y[:, p:] * gate[1]], dim=1)


class QwenImage21Block(nn.Module):
    def __init__(self, c: QwenImage21Config):
        super().__init__()
        self.attn = Attention(c)
        self.img_mlp = SwiGLU(c.dim, c.mlp_hidden)

    def forward(self, x: Tensor, mod: tuple[Rows, Rows, Rows, Rows], rope: tuple[Tensor, Tensor], masks: Masks,
                p: int, kv: BlockKV | None) -> Tensor:
        """`mod` is (scale1, tanh gate1, scale2, tanh gate2); the first `p` tokens of `x` are the prefix's."""
        scale1, gate1, scale2, gate2 = mod
        x = _gated(x, self.attn(_scaled(x, scale1, p), rope, masks, kv), gate1, p)
        x = _gated(x, self.img_mlp(_scaled(x, scale2, p)), gate2, p)
        if x.dtype == torch.float16:  # as the reference does, so fp16 runs do not overflow to inf
            x = x.clip(-65504, 65504)
        return x


class NormOut(nn.Module):
    """The final adaptive LayerNorm: a scale only, no shift."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + self.linear(F.silu(temb))[:, None])


@dataclass(frozen=True)
class Sequence21:
    """The joint sequence before the blocks: `tokens` [B, P + N, dim], their RoPE positions `ids` [P + N, 3], the
    prefix's blocks (`blocks` [P] long: -1 for text, i for reference i) and which keys are real (`keys` [B, P + N]
    bool, or None for all)."""

    tokens: Tensor
    ids: Tensor
    blocks: Tensor
    keys: Tensor | None

    @property
    def prefix_len(self) -> int:
        return self.blocks.shape[0]


def image_ids(rows: int, cols: int, frame: float, rows_target: int, cols_target: int,
              device: torch.device | None = None) -> Tensor:
    """The RoPE positions [rows*cols, 3] of an image block at `frame`: rows and columns centred on 0, moved by half a
    token where a side's parity differs from the target's (ComfyUI's, so that the block centres on the target)."""
    def axis(n: int, n_target: int) -> Tensor:
        return torch.arange(n, device=device) - (n - n // 2) + 0.5 * (n % 2 - n_target % 2)

    grid = torch.full((rows, cols, 3), float(frame), device=device)
    grid[..., 1] = axis(rows, rows_target)[:, None]
    grid[..., 2] = axis(cols, cols_target)[None, :]
    return grid.reshape(-1, 3)


class PrefixKV:
    """The prefix's (text and references') keys and values per block for one sampling run (ComfyUI's QwenImage21Cache,
    diffusers' kv_cache), for the last few prefixes seen (a run's positive and negative prompts). Entries are matched
    by value: the prompt states, their mask, the references, their slots, the batch and the target's size (on which
    the references' positions depend)."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._entries: list[tuple[tuple, list[BlockKV]]] = []

    def find(self, key: tuple) -> list[BlockKV] | None:
        """The blocks' keys and values recorded for this prefix, if any."""
        return next((blocks for k, blocks in self._entries if _same_key(k, key)), None)

    def add(self, key: tuple, blocks: list[BlockKV]) -> None:
        """Record a call's filled `blocks`, forgetting the oldest entry beyond `capacity`."""
        self._entries = [*self._entries, (key, blocks)][-self.capacity:]


def _same_key(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape
                    and torch.equal(x, y.to(x.device))):
                return False
        elif x != y:
            return False
    return True


@dataclass
class _Call:
    """One forward's inputs, checked and expanded to the batch."""

    x: Tensor
    context: Tensor
    mask: Tensor | None
    refs: list[Tensor]
    slots: list[int]


class QwenImage21Model(nn.Module):
    def __init__(self, config: QwenImage21Config):
        super().__init__()
        self.config = c = config
        self.time_text_embed = TimeTextEmbed(c.dim)
        self.txt_in = TextProjection(c.text_dim, c.dim, c.eps)
        self.img_in = nn.Linear(c.channels, c.dim, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 4 * c.dim, bias=False))  # shared by every block
        self.transformer_blocks = nn.ModuleList([QwenImage21Block(c) for _ in range(c.num_layers)])
        self.norm_out = NormOut(c.dim)
        self.proj_out = nn.Linear(c.dim, c.channels, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from the text norm's weight, which fp8 weight storage (ldm.quant) leaves as is."""
        return self.txt_in.text_norm.weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attn_mask: Tensor | None = None, ref_latents: Sequence[Tensor] | None = None,
                image_slots: Sequence[int] | None = None, prefix_kv: PrefixKV | None = None) -> Tensor:
        """Predict the velocity (noise - data) of latents `x` [B, 64, H, W] at noise levels `timesteps` [B] (sigma,
        0..1) given the Qwen3-VL prompt states `context` [B or 1, L, context_dim] without the image pads' states;
        `attn_mask` [B or 1, L] (1 = a real token) keeps every token from attending to the prompt's padding.
        `ref_latents` are reference latents [B or 1, 64, h_i, w_i] (Qwen-Image-Edit-style), spliced in before the
        prompt token `image_slots[i]` (0..L, in order; after the prompt where no slot is given). With `prefix_kv`,
        the prefix's keys and values are recorded on the first call for this prefix and reused by later ones (the
        same velocities, computed for the target's tokens only). `y` is accepted for the sampler's common call and
        unused (no pooled prompt)."""
        c, dtype = self.config, self.dtype
        call = self._checked(x, context, attn_mask, ref_latents, image_slots)
        batch, rows, cols = x.shape[0], x.shape[-2], x.shape[-1]
        t = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(-1)
        t = ((t.to(x.device) * TIME_SCALE).to(dtype) / TIME_SCALE).to(dtype)  # ComfyUI's rounding to the dtype
        temb = self.time_text_embed.timestep_embedder(
            timestep_embedding(torch.cat([t, t.new_zeros(1)]).float() * TIME_SCALE, 256).to(dtype))
        mod = tuple((part[-1:, None], part[:-1, None]) for part in self._modulation(temb))
        key = self._prefix_key(call) if prefix_kv is not None else None
        cached = None if key is None else prefix_kv.find(key)
        seq = self._sequence(call, dtype)
        p = seq.prefix_len
        if cached is not None:  # the prefix's keys and values are known: the target's rows alone
            tokens, ids, p = seq.tokens[:, p:], seq.ids[p:], 0
            masks = Masks(None, seq.keys[:, None, None] if seq.keys is not None else None)
            blocks_kv = cached
        else:
            tokens, ids = seq.tokens, seq.ids
            masks = _block_causal_masks(seq)
            blocks_kv = [BlockKV() for _ in self.transformer_blocks] if key is not None and p > 0 else None
        rope = rope_angles(ids, c.axes_dim, THETA)
        for i, block in enumerate(self.transformer_blocks):
            tokens = block(tokens, mod, rope, masks, p, None if blocks_kv is None else blocks_kv[i])
        if key is not None and cached is None and blocks_kv is not None:
            prefix_kv.add(key, blocks_kv)
        out = self.proj_out(self.norm_out(tokens[:, p:], temb[:-1]))
        return out.transpose(1, 2).reshape(batch, c.channels, rows, cols).to(x.dtype)

    def _modulation(self, temb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(scale1, tanh gate1, scale2, tanh gate2) [B + 1, dim] each, the last row timestep 0's."""
        scale1, gate1, scale2, gate2 = self.modulation(temb).chunk(4, dim=-1)
        return scale1, gate1.tanh(), scale2, gate2.tanh()

    def _checked(self, x: Tensor, context: Tensor, attn_mask: Tensor | None, ref_latents: Sequence[Tensor] | None,
                 image_slots: Sequence[int] | None) -> _Call:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.channels:
            raise ValueError(f"Qwen-Image 2.1 takes latents [B, {c.channels}, H, W] (its 16x VAE's); got "
                             f"{list(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != c.context_dim or context.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"Qwen-Image 2.1 takes prompt states [B, L, {c.context_dim}] for {x.shape[0]} latents; "
                             f"got {list(context.shape)} (a prompt from another text encoder?)")
        batch, length = x.shape[0], context.shape[1]
        if attn_mask is not None and (attn_mask.ndim != 2 or attn_mask.shape[1] != length
                                      or attn_mask.shape[0] not in (1, batch)):
            raise ValueError(f"a prompt attention mask of shape {list(attn_mask.shape)} for a prompt of {length} "
                             f"tokens (batch {batch}): it takes [B, {length}], 1 for each real token")
        refs = list(ref_latents or [])
        for ref in refs:
            if ref.ndim != 4 or ref.shape[1] != c.channels or ref.shape[0] not in (1, batch):
                raise ValueError(f"reference latents [{batch} or 1, {c.channels}, h, w] for latents "
                                 f"{list(x.shape)}; got {list(ref.shape)}")
        slots = [int(s) for s in (image_slots or [])][:len(refs)]
        slots += [length] * (len(refs) - len(slots))
        if any(not 0 <= s <= length for s in slots) or slots != sorted(slots):
            raise ValueError(f"image slots {slots} for a prompt of {length} tokens: they go in order, 0..{length}")
        mask = None if attn_mask is None else attn_mask.to(x.device, torch.bool).expand(batch, -1)
        refs = [r.to(x.device).expand(batch, -1, -1, -1) for r in refs]
        return _Call(x, context.to(x.device).expand(batch, -1, -1), mask, refs, slots)

    def _sequence(self, call: _Call, dtype: torch.dtype) -> Sequence21:
        """Text with each reference's tokens at its slot, the target's last (module docstring), with positions."""
        x, device = call.x, call.x.device
        rows, cols = x.shape[-2:]
        txt = self.txt_in(call.context.to(dtype))
        bounds = [0, *call.slots, txt.shape[1]]
        tokens, ids, blocks, keys = [], [], [], []
        position = 0
        for i, image in enumerate([*call.refs, x]):
            start, end = bounds[i], bounds[i + 1]
            tokens.append(txt[:, start:end])
            ids.append(text_ids(position, end - start, device))
            blocks.append(torch.full((end - start,), -1, device=device))
            keys.append(None if call.mask is None else call.mask[:, start:end])
            position += end - start
            h, w = image.shape[-2:]
            tokens.append(self.img_in(image.to(dtype).flatten(2).transpose(1, 2)))
            ids.append(image_ids(h, w, position, rows, cols, device))
            blocks.append(torch.full((h * w,), i, device=device))
            keys.append(None if call.mask is None else call.mask.new_ones(x.shape[0], h * w))
            position += max(h, w)
        key_mask = None if call.mask is None else torch.cat(keys, dim=1)
        return Sequence21(torch.cat(tokens, dim=1), torch.cat(ids), torch.cat(blocks[:-1]), key_mask)

    @staticmethod
    def _prefix_key(call: _Call) -> tuple:
        """What the prefix's keys and values depend on: the prompt, its mask, the slots, the latents' batch and size
        (the references' positions depend on the target's parity) and the references."""
        return call.context, call.mask, tuple(call.slots), tuple(call.x.shape), *call.refs


def _block_causal_masks(seq: Sequence21) -> Masks:
    """The prefix's block-causal mask (a key before the query, or in the query's image block; real keys only, a
    padded query keeping its own key so that no row is empty) and the target's key mask."""
    p = seq.prefix_len
    keys = None if seq.keys is None else seq.keys[:, None, None]
    if p == 0:
        return Masks(None, keys)
    index = torch.arange(p, device=seq.blocks.device)
    same_image = (seq.blocks[:, None] == seq.blocks[None, :]) & (seq.blocks[:, None] >= 0)
    allowed = (index[:, None] >= index[None, :]) | same_image
    if seq.keys is not None:
        allowed = allowed & (seq.keys[:, None, :p] | torch.eye(p, dtype=torch.bool, device=index.device))
    return Masks(allowed[None, None] if allowed.ndim == 2 else allowed[:, None], keys)


def to_loom_layout(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Weights (under `prefix`) in the released file's layout: diffusers' split SwiGLU projections (`img_mlp.gate_layer`
    and `img_mlp.proj`) fused into `img_mlp.gate_up` [gate; up]; every other key as it is."""
    out = {}
    for key, value in sd.items():
        if key.endswith(_GATE) and key.startswith(prefix):
            base = key[:-len(_GATE)]
            out[base + _FUSED] = torch.cat([value, sd[base + _UP]], dim=0)
        elif not (key.endswith(_UP) and key[:-len(_UP)] + _GATE in sd):
            out[key] = value
    return out


def is_qwen_image21(sd: Mapping[str, Tensor], prefix: str = "") -> bool:
    """Whether a state dict holds a Qwen-Image 2.1 transformer (under `prefix`), in the released or diffusers' layout:
    its shared `modulation`, zero-centred text norm and bias-free image input (Qwen-Image has `txt_norm` and per-block
    `img_mod`, Flux `double_blocks`, Z-Image `layers`)."""
    return all(f"{prefix}{k}" in sd for k in ("modulation.1.weight", "txt_in.text_norm.weight", "img_in.weight",
                                                "transformer_blocks.0.attn.norm_q.weight"))


def config_from_state_dict(sd: Mapping[str, Tensor], axes_dim: tuple[int, int, int] | None = None,
                           prefix: str = "") -> QwenImage21Config:
    """The exact shape of Qwen-Image 2.1 weights (under `prefix`, either layout) from their key names and tensor
    shapes. The RoPE split of a head is not in the weights: `axes_dim`, else the released (16, 56, 56) for 128-wide
    heads."""
    try:
        dim, channels = sd[f"{prefix}img_in.weight"].shape
        head_dim = sd[f"{prefix}transformer_blocks.0.attn.norm_q.weight"].shape[0]
        fused = sd.get(f"{prefix}transformer_blocks.0.{_FUSED}")
        hidden = fused.shape[0] // 2 if fused is not None else sd[f"{prefix}transformer_blocks.0.{_UP}"].shape[0]
        out_channels = sd[f"{prefix}proj_out.weight"].shape[0]
        text_dim = sd[f"{prefix}txt_in.in_layer.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"an incomplete Qwen-Image 2.1 transformer: no weight {e}") from None
    if axes_dim is None:
        if head_dim != sum(STANDARD_AXES):
            raise ValueError(f"its heads are {head_dim} wide, not the released model's 128, and the weights do not "
                             "say how RoPE splits them")
        axes_dim = STANDARD_AXES
    if out_channels != channels or hidden % dim:
        raise ValueError(f"not a Qwen-Image 2.1 shape: {channels} channels in, {out_channels} out, an MLP {hidden} "
                         f"wide for width {dim}")
    return QwenImage21Config(
        num_layers=len({int(m[1]) for k in sd if k.startswith(prefix) and (m := _BLOCK.match(k[len(prefix):]))}),
        num_heads=dim // head_dim, head_dim=head_dim, channels=channels, text_dim=text_dim, mlp_ratio=hidden // dim,
        axes_dim=tuple(axes_dim))


# A tiny model for tests: prompt states 32 wide (the tiny Qwen3-VL encoder's), the released 64 latent channels.
TINY_QWEN_IMAGE21 = QwenImage21Config(num_layers=2, num_heads=4, head_dim=16, text_dim=32, axes_dim=(4, 6, 6))


def random_qwen_image21(config: QwenImage21Config = TINY_QWEN_IMAGE21, seed: int = 0) -> QwenImage21Model:
    """A Qwen-Image 2.1 transformer with seeded random weights, each distinct (`ldm.flux_presets.distinct_random_`;
    the query / key norms' weights near 1, the zero-centred text norm's near 0)."""
    return distinct_random_(QwenImage21Model(config).eval(), seed, norm_scales=("norm_q.weight", "norm_k.weight"))


def write_tiny_qwen_image21(path: str | Path, seed: int = 0, config: QwenImage21Config = TINY_QWEN_IMAGE21,
                            dtype: torch.dtype = torch.bfloat16, prefix: str = "") -> Path:
    """Write a tiny random Qwen-Image 2.1 transformer in the released file's layout (its keys under `prefix`: bare,
    as Comfy-Org's file is), with the RoPE split in Loom's metadata (`AXES_KEY`); returns the path. Its images are
    noise."""
    model = random_qwen_image21(config, seed)
    path = Path(path)
    write_safetensors({prefix + k: v for k, v in model.state_dict().items()}, path,
                      {AXES_KEY: ",".join(map(str, config.axes_dim)), "loom.seed": str(seed)}, dtype)
    return path
