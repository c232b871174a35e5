"""The Flux.1 transformer (Black Forest Labs' dev and schnell); attribute names follow BFL's checkpoint keys.

A rectified-flow transformer: the 16-channel latent is cut into 2x2 patches (64 values each) and embedded as
image tokens; the T5 prompt (`context`) as text tokens. `depth` double-stream blocks keep the two streams apart,
with their own weights, and attend jointly; `depth_single_blocks` single-stream blocks then run on the
concatenated sequence (text first). Positions enter through 3-axis rotary embeddings (RoPE) on the queries and
keys: text tokens sit at (0, 0, 0), image patch (row, col) at (0, row, col). Every block is modulated (shift,
scale, gate) by one vector: the embeddings of the timestep (the noise level sigma in 0..1, times 1000), of the
pooled CLIP-L prompt, and, for guidance-distilled models (dev), of the guidance strength.

`Flux.forward(x, timesteps, context, y)` keeps the UNet's calling convention (`ldm.sampling.denoiser`): `y` is the
pooled CLIP-L vector [B, vec_in_dim], followed, for a model with a guidance embedding, by the guidance strength
(one more column); without it a dev model runs unguided, as ComfyUI's FluxDisableGuidance makes it. The edit models
(`ldm.flux_variants`) take more: Fill and Depth / Canny their extra channels after the latent's in `x`, Kontext its
reference latents as `ref_latents`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.flux_variants import References, edit_kind, input_refusal, reference_placements
from ldm.unet import timestep_embedding

# Black Forest Labs' RoPE split of a 128-wide head: 16 channels for the (unused) first axis, 56 per image axis.
STANDARD_AXES = (16, 56, 56)
_DOUBLE = re.compile(r"double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_blocks\.(\d+)\.")
# What a block calls on its joint attention output [B, L, hidden] when given one (`Flux.attention_output`).
AttentionHook = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FluxConfig:
    """Shape of a Flux transformer (defaults: Flux.1-dev). `context_dim` is the T5 width (BFL's context_in_dim)."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = STANDARD_AXES
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True
    patch_size: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"the RoPE axes {self.axes_dim} must add up to the head width "
                             f"{self.hidden_size} / {self.num_heads}")

    @property
    def latent_channels(self) -> int:
        """The channels of the latent it denoises (Fill's and Depth's inputs are wider: `input_channels`)."""
        return self.out_channels // self.patch_size**2

    @property
    def input_channels(self) -> int:
        """The channels `Flux.forward`'s `x` has: the latent's, then an edit model's extra ones."""
        return self.in_channels // self.patch_size**2

    @property
    def edit_kind(self) -> str | None:
        """"fill", "control" (Depth / Canny) or None (`ldm.flux_variants.edit_kind`)."""
        return edit_kind(self.in_channels, self.out_channels, self.patch_size)

    @property
    def y_dim(self) -> int:
        """The width of `Flux.forward`'s `y`: the pooled prompt, and the guidance strength if the model takes one."""
        return self.vec_in_dim + int(self.guidance_embed)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalised in float32, as BFL does: bf16 squares lose too much.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    """Only the weights: the double block runs its two streams' attention jointly."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """(shift, scale, gate) triples from the conditioning vector: two for a double block, one for a single."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.parts = 6 if double else 3
        self.lin = nn.Linear(dim, self.parts * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.parts, dim=-1)


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _heads(qkv: Tensor, heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*D] -> q, k, v [B, heads, L, D/heads], q and k RMS-normalised."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return norm.query_norm(q).to(v.dtype), norm.key_norm(k).to(v.dtype), v


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each adjacent channel pair (2i, 2i+1) of `x` [B, H, L, D] by the angles whose cos/sin are [L, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([cos * even - sin * odd, sin * even + cos * odd], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None = None) -> Tensor:
    """Joint attention with RoPE; `mask` an additive bias [B or 1, 1, L, L] over the joint sequence (`joint_bias`)."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class DoubleStreamBlock(nn.Module):
    def __init__(self, c: FluxConfig):
        super().__init__()
        self.heads = c.num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(c.hidden_size, double=True))
            setattr(self, f"{stream}_attn", SelfAttention(c.hidden_size, c.num_heads, c.qkv_bias))
            setattr(self, f"{stream}_mlp", _mlp(c.hidden_size, c.mlp_ratio))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor],
                mask: Tensor | None = None, attention_hook: AttentionHook | None = None) -> tuple[Tensor, Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        img_q, img_k, img_v = _heads(self.img_attn.qkv((1 + img_scale1) * _norm(img) + img_shift1), self.heads,
                                     self.img_attn.norm)
        txt_q, txt_k, txt_v = _heads(self.txt_attn.qkv((1 + txt_scale1) * _norm(txt) + txt_shift1), self.heads,
                                     self.txt_attn.norm)
        out = attention(torch.cat([txt_q, img_q], 2), torch.cat([txt_k, img_k], 2), torch.cat([txt_v, img_v], 2),
                        rope, mask)
        if attention_hook is not None:
            out = attention_hook(out)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        img = img + img_gate1 * self.img_attn.proj(img_out)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * _norm(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * _norm(txt) + txt_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel: linear1 makes q, k, v and the MLP's input at once, linear2 merges both."""

    def __init__(self, c: FluxConfig):
        super().__init__()
        self.heads, self.hidden = c.num_heads, c.hidden_size
        self.mlp_hidden = int(c.hidden_size * c.mlp_ratio)
        self.linear1 = nn.Linear(c.hidden_size, 3 * c.hidden_size + self.mlp_hidden)
        self.linear2 = nn.Linear(c.hidden_size + self.mlp_hidden, c.hidden_size)
        self.norm = QKNorm(c.hidden_size // c.num_heads)
        self.modulation = Modulation(c.hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None = None,
                attention_hook: AttentionHook | None = None) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1((1 + scale) * _norm(x) + shift).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        out = attention(*_heads(qkv, self.heads, self.norm), rope, mask)
        if attention_hook is not None:
            out = attention_hook(out)
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * _norm(x) + shift)


def patchify(x: Tensor, patch: int = 2) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p] image tokens, row by row, each patch's values channel-major."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, h: int, w: int, patch: int = 2) -> Tensor:
    """The inverse of `patchify` for a latent of h x w (multiples of `patch`)."""
    b, _, d = tokens.shape
    c = d // patch**2
    return tokens.reshape(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@dataclass(frozen=True)
class RopeScale:
    """ComfyUI's `rope_options` (its ScaleROPE node): a DiT's image positions along x (columns), y (rows) and t
    (frames; Flux's index axis, which only shifts) stretched by `scale_*` and moved by `shift_*` (`scaled_axis`)."""

    scale_x: float = 1.0
    shift_x: float = 0.0
    scale_y: float = 1.0
    shift_y: float = 0.0
    scale_t: float = 1.0
    shift_t: float = 0.0


def scaled_axis(count: int, offset: float, scale: float, shift: float,
                device: torch.device | None = None) -> Tensor:
    """The positions [count] float32 of one axis of `count` patches from `offset` under a RopeScale: offset + shift
    + i * scale, in ComfyUI's arithmetic (a linspace to its stretched length's end), so the same floats."""
    start = offset + shift
    return torch.linspace(start, ((count - 1.0) * scale + 1.0) - 1 + start, steps=count, device=device,
                          dtype=torch.float32)


def grid_ids(rows: int, cols: int, index: int = 0, row_offset: int = 0, col_offset: int = 0,
             device: torch.device | None = None, rope_scale: RopeScale | None = None) -> Tensor:
    """The RoPE positions [rows*cols, 3] of an image's patches, row by row: (index, row_offset + row, col_offset +
    col); the noisy latent's at index 0 from (0, 0), Kontext's references elsewhere (`reference_placements`).
    With `rope_scale` the rows and columns are scaled and shifted and the index shifted (ComfyUI's process_img
    under rope_options)."""
    if rope_scale is not None:
        grid = torch.full((rows, cols, 3), index + rope_scale.shift_t, device=device)
        grid[..., 1] = scaled_axis(rows, row_offset, rope_scale.scale_y, rope_scale.shift_y, device)[:, None]
        grid[..., 2] = scaled_axis(cols, col_offset, rope_scale.scale_x, rope_scale.shift_x, device)[None, :]
        return grid.reshape(-1, 3)
    grid = torch.full((rows, cols, 3), float(index), device=device)
    grid[..., 1] = torch.arange(row_offset, row_offset + rows, device=device)[:, None]
    grid[..., 2] = torch.arange(col_offset, col_offset + cols, device=device)[None, :]
    return grid.reshape(-1, 3)


def position_ids(rows: int, cols: int, text_tokens: int, device: torch.device | None = None) -> Tensor:
    """The RoPE positions [text_tokens + rows*cols, 3]: text tokens at 0, then image patch (0, row, col)."""
    return torch.cat([torch.zeros(text_tokens, 3, device=device), grid_ids(rows, cols, device=device)])


def pad_to_patch(x: Tensor, p: int) -> Tensor:
    """Sizes that are not a multiple of the patch are padded, wrapping round, as ComfyUI does (cropped back after)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % p, 0, -h % p), mode="circular") if h % p or w % p else x


def joint_bias(mask: Tensor, text_tokens: int, image_tokens: int, dtype: torch.dtype) -> Tensor:
    """The additive attention bias [B, 1, L, L] over the joint sequence (text, then image tokens) from ComfyUI's
    `attention_mask` [B, T + n, T + n] (or [T + n, T + n]): n is the number of image tokens, or 1, an entry that
    stands for every image token (ComfyUI's `attention_mask_img_shape` of (1, 1), Apply Style Model's, resized to
    the latent; Kontext's reference tokens included)."""
    mask = mask[None] if mask.ndim == 2 else mask
    size = text_tokens + image_tokens
    if mask.ndim != 3 or mask.shape[-1] != mask.shape[-2] or mask.shape[-1] not in (text_tokens + 1, size):
        raise ValueError(f"an attention mask of shape {list(mask.shape)} for {text_tokens} text and {image_tokens} "
                         f"image tokens: it takes [B, {text_tokens} + 1, {text_tokens} + 1] (or [B, {size}, {size}]); "
                         "was the prompt changed after Apply Style Model (attn_bias) made its mask?")
    if mask.shape[-1] != size:
        index = torch.cat([torch.arange(text_tokens), torch.full((image_tokens,), text_tokens)]).to(mask.device)
        mask = mask[:, index][:, :, index]
    return mask[:, None].to(dtype)


def rope_angles(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """(cos, sin) [L, head_dim/2] float32 of the rotation angles: per axis i, position * theta^(-2j/axes_dim[i])."""
    precise = torch.float32 if ids.device.type == "mps" else torch.float64  # float64 as BFL computes them
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=precise, device=ids.device) / dim)
        angles.append(ids[:, axis].to(precise)[:, None] * omega)
    both = torch.cat(angles, dim=-1)
    return both.cos().float(), both.sin().float()


class Flux(nn.Module):
    rope_scale: RopeScale | None = None  # ScaleROPE's, set on a shallow copy (nodes.sd.rope)
    # Called as `attention_output(out, image_start)` on every block's joint attention output [B, L, hidden] (text
    # tokens first, the image's from `image_start`), returning its replacement: ComfyUI's attn1_output_patch with
    # its img_slice, set on a shallow copy (NAGuidance's, ldm.nag).
    attention_output: Callable[[Tensor, int], Tensor] | None = None

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = MLPEmbedder(256, c.hidden_size)
        self.txt_in = nn.Linear(c.context_dim, c.hidden_size)
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
                control: list[Tensor] | None = None, ref_latents: References | Sequence[Tensor] | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """Predict the velocity (noise - data) of latents `x` [B, C, H, W] at noise levels `timesteps` [B] (0..1)
        given the T5 prompt `context` [B, L, context_dim] and `y` (see the module docstring). For Fill and
        Depth / Canny models `x` carries their extra channels after the latent's; `ref_latents` are Kontext's
        reference latents [B or 1, C, h, w] (a list is placed by the "offset" method); `control` a ControlNet's
        residuals for the image tokens, one per double-stream block then one per single-stream block; `attn_mask`
        an additive bias over the joint attention in ComfyUI's layout (`joint_bias`; Apply Style Model's attn_bias)."""
        c, dtype = self.config, self.dtype
        if control is not None and (not isinstance(control, list) or len(control) != c.depth + c.depth_single_blocks):
            raise ValueError("a Flux model takes a Flux ControlNet's residuals (ldm.controlnet_flux), one per block; "
                             "T2I-Adapters and the ControlNets of other families do not fit it")
        if x.shape[1] != c.input_channels:
            raise ValueError(input_refusal(c.input_channels, c.latent_channels, x.shape[1]))
        h, w = x.shape[-2:]
        p = c.patch_size
        padded = pad_to_patch(x, p)
        rows, cols = padded.shape[-2] // p, padded.shape[-1] // p
        tokens_in, ids = [patchify(padded.to(dtype), p)], [grid_ids(rows, cols, device=x.device,
                                                                    rope_scale=self.rope_scale)]
        if ref_latents is not None:
            refs = ref_latents if isinstance(ref_latents, References) else References(tuple(ref_latents))
            more_tokens, more_ids = self._reference_tokens(refs, x, rows, cols)
            tokens_in, ids = tokens_in + more_tokens, ids + more_ids
        img = self.img_in(torch.cat(tokens_in, dim=1))
        vec = self.time_in(timestep_embedding(timesteps * 1000, 256).to(dtype))
        pooled, guidance = self._split_y(y, x.shape[0], x.device)
        if guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance * 1000, 256).to(dtype))
        vec = vec + self.vector_in(pooled.to(dtype))
        txt = self.txt_in(context.to(dtype))
        rope = rope_angles(torch.cat([torch.zeros(txt.shape[1], 3, device=x.device), *ids]), c.axes_dim, c.theta)
        n, t = rows * cols, txt.shape[1]  # the noisy latent's tokens: a ControlNet's residuals go to them
        bias = None if attn_mask is None else joint_bias(attn_mask.to(x.device), t, img.shape[1], dtype)
        hook = None if self.attention_output is None else functools.partial(self.attention_output, image_start=t)
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, rope, mask=bias, attention_hook=hook)
            if control is not None:
                img = torch.cat([img[:, :n] + control[i].to(img.dtype), img[:, n:]], dim=1)
        tokens = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            tokens = block(tokens, vec, rope, mask=bias, attention_hook=hook)
            if control is not None:
                residual = control[c.depth + i].to(tokens.dtype)
                tokens = torch.cat([tokens[:, :t], tokens[:, t:t + n] + residual, tokens[:, t + n:]], dim=1)
        # Only the noisy latent's tokens are predicted; the references' are context.
        out = self.final_layer(tokens[:, t:t + n], vec)
        return unpatchify(out, rows * p, cols * p, p)[..., :h, :w].to(x.dtype)

    def _reference_tokens(self, refs: References, x: Tensor, rows: int, cols: int) -> tuple[list[Tensor],
                                                                                         list[Tensor]]:
        """Kontext's reference latents as image tokens, each with its RoPE positions (`reference_placements`)."""
        c, p = self.config, self.config.patch_size
        if c.edit_kind is not None or any(r.shape[1] != c.latent_channels for r in refs.latents):
            widths = sorted({r.shape[1] for r in refs.latents})
            raise ValueError(f"reference latents (Kontext's, ReferenceLatent) of {widths} channels cannot go to a "
                             f"Flux model whose img_in takes {c.input_channels} channels ("
                             + (f"a {c.edit_kind} model: its extra channels are not a reference image's"
                                if c.edit_kind else f"{c.latent_channels}-channel latents") + ")")
        batch = x.shape[0]
        padded = [pad_to_patch(r.to(x.device, self.dtype), p) for r in refs.latents]
        placements = reference_placements([r.shape[-2:] for r in padded], rows, cols, refs.method, p)
        tokens, ids = [], []
        for ref, (index, row, col) in zip(padded, placements, strict=True):
            if ref.shape[0] not in (1, batch):
                raise ValueError(f"a batch of {ref.shape[0]} reference latents for a batch of {batch} latents")
            tokens.append(patchify(ref, p).expand(batch, -1, -1))
            ids.append(grid_ids(ref.shape[-2] // p, ref.shape[-1] // p, index, row, col, device=x.device,
                                rope_scale=self.rope_scale))
        return tokens, ids

    def _split_y(self, y: Tensor | None, batch: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        c = self.config
        if y is None:
            return torch.zeros(batch, c.vec_in_dim, device=device), None
        if y.shape[-1] not in (c.vec_in_dim, c.y_dim):
            raise ValueError(f"y is {y.shape[-1]} wide; this Flux model takes the pooled prompt ({c.vec_in_dim})"
                             + (" and the guidance strength" if c.guidance_embed else ""))
        if y.shape[-1] == c.vec_in_dim:
            return y, None
        return y[:, :c.vec_in_dim], y[:, c.vec_in_dim].float()


def is_flux(sd: Mapping[str, Tensor], prefix: str = "") -> bool:
    """Whether a state dict holds a Flux.1 transformer in BFL's layout (under `prefix`); FLUX.2's, which shares
    the names but modulates every block from shared layers, is not one (ldm.flux2)."""
    return (f"{prefix}double_blocks.0.img_attn.qkv.weight" in sd and f"{prefix}img_in.weight" in sd
            and f"{prefix}single_stream_modulation.lin.weight" not in sd)


def flux_config_from_state_dict(sd: Mapping[str, Tensor], axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """The exact shape of a BFL-layout Flux transformer (no prefix) from its key names and tensor shapes.

    The RoPE split of a head is not in the weights: `axes_dim`, else BFL's (16, 56, 56) for 128-wide heads."""
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        if axes_dim is None:
            if head_dim != sum(STANDARD_AXES):
                raise ValueError(f"its heads are {head_dim} wide, not Flux.1's 128, and the file does not say how "
                                 "RoPE splits them (loom.flux_config metadata)")
            axes_dim = STANDARD_AXES
        edit_kind(in_channels, sd["final_layer.linear.weight"].shape[0])  # refuses a width no Flux.1 model has
        return FluxConfig(
            in_channels=in_channels, out_channels=sd["final_layer.linear.weight"].shape[0],
            vec_in_dim=sd["vector_in.in_layer.weight"].shape[1], context_dim=sd["txt_in.weight"].shape[1],
            hidden_size=hidden, mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
            num_heads=hidden // head_dim, depth=len({int(m[1]) for k in sd if (m := _DOUBLE.match(k))}),
            depth_single_blocks=len({int(m[1]) for k in sd if (m := _SINGLE.match(k))}), axes_dim=tuple(axes_dim),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd, guidance_embed="guidance_in.in_layer.weight" in sd)
    except KeyError as e:
        raise ValueError(f"an incomplete Flux transformer: no weight {e}") from None


def config_metadata(config: FluxConfig) -> dict[str, str]:
    """Metadata that carries what the weights cannot tell (the RoPE split), for files Loom writes."""
    return {"loom.flux_config": json.dumps(asdict(config))}


def axes_from_metadata(metadata: Mapping[str, str]) -> tuple[int, ...] | None:
    saved = metadata.get("loom.flux_config")
    return None if saved is None else tuple(json.loads(saved)["axes_dim"])
