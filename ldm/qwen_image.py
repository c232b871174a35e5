"""The Qwen-Image diffusion transformer (Alibaba's 20B MMDiT, 2025); attribute names follow the released weights'.

A rectified-flow transformer over 16-channel latents (Wan 2.1's VAE) [B, 16, H, W]: 2x2 patches become image tokens,
the Qwen2.5-VL prompt states [B, L, 3584] are RMS-normalised and projected to text tokens, and `num_layers`
double-stream blocks each run one joint attention over [text, image] tokens (separate projections, RMS-normalised
queries and keys per head) and separate MLPs, both streams modulated (shift, scale, gate) by the timestep's
embedding. The noise level enters as t * 1000 (diffusers' pipeline passes t in 0..1 and the time projection scales
it by 1000; ComfyUI's sampling gives t in 0..1 too).

Positions ("MSRoPE", diffusers' QwenEmbedRope with scale_rope): a head's channels split between a frame, a row and
a column axis (16, 56, 56 of 128); image patches sit at frame 0, rows -(rows - rows // 2) .. rows // 2 - 1 (centred,
likewise columns), and text token j at (s + j, s + j, s + j) with s = max(rows // 2, cols // 2), after the image's.
On an odd patch grid ComfyUI centres the other way (-(rows // 2) .. ); Loom follows diffusers, Qwen's own release.

Qwen-Image-Edit (and Edit-2509 / 2511, the same weights' layout) take reference latents (`ref_latents`): each is cut
into 2x2 patches like the noisy latent and its tokens appended after the image's, centred like it, at frame index 1,
2, ... in turn (ComfyUI's default "index" method, diffusers' img_shapes; `reference_grids` for ComfyUI's others);
only the noisy latent's tokens are predicted. The text starts after the noisy latent's half-size, as in ComfyUI
(diffusers starts it after the largest of all the images: `text_after_all_images`). Edit-2511 (diffusers'
zero_cond_t, ComfyUI's "index_timestep_zero", the default for files marked `__index_timestep_zero__`) modulates the
reference tokens as at timestep 0; the text and the noisy latent's tokens see the real timestep.

Two things may add to the noisy latent's image tokens after each block (never to the references'): a ControlNet's
residuals (`forward`'s `control`, `ldm.controlnet_qwen_image`: residual i // ceil(blocks / residuals) after block i,
as diffusers adds controlnet_block_samples) and the model's `block_patches` (`with_block_patch`), each called as
`patch(i, image_tokens, (h, w))` after block i, returning what to add or None; the patches come first, as ComfyUI
runs its double-block patches before it adds a ControlNet's residual.

Qwen-Image-Layered (Qwen's RGBA layer decomposition; diffusers' use_additional_t_cond and use_layer3d_rope, told by
its `time_text_embed.addition_t_embedding` weight) denoises a latent of several frames [B, 16, layers + 1, H, W]
(frame 0 the composite image, then the layers, from ComfyUI's EmptyQwenImageLayeredLatentImage), frame f's patches
at frame index f, frame by frame in the token order; its reference latent (the picture to take apart, in its RGBA
VAE's latent space) sits at frame index -1 (the next at -2: ComfyUI's "negative_index", its default for this model,
diffusers' condition image), whatever the references' method. The timestep's embedding gains a learnt one of
`additional_t_cond` (0 or 1 per sample; 0, "is_rgb" false, is what diffusers' pipeline and ComfyUI pass).
`text_after_all_images` also starts the text after diffusers' layer count (frames plus references, less one),
which ComfyUI leaves out; the two agree whenever the latent is at least 2 * (layers + 1) patches on its longer side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.flux import apply_rope, pad_to_patch, patchify, rope_angles, unpatchify
from ldm.flux_variants import References, reference_placements
from ldm.unet import timestep_embedding

STANDARD_AXES = (16, 56, 56)  # the released model's RoPE split of its 128-wide heads
THETA = 10000
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
# Qwen-Image variants whose extra inputs change what the model computes; their files are refused by name.
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"
VARIANTS = {LAYERED_KEY: "Qwen-Image-Layered"}
# The empty tensor Comfy-Org's Edit-2511 files carry: its references are modulated at timestep 0 by default.
ZERO_COND_KEY = "__index_timestep_zero__"
# ComfyUI's reference methods for Qwen-Image: "index" and "index_timestep_zero" put reference i at frame i + 1;
# the others ("offset", and "uxo", which ComfyUI's Qwen-Image places the same way) at frame 1, side by side.
ZERO_COND_METHOD = "index_timestep_zero"
# A model patch run after each block: (block index, the noisy latent's image tokens [B, n, dim], the latent's (h, w)
# before padding) -> what to add to those tokens, or None.
BlockPatch = Callable[[int, Tensor, tuple[int, int]], Tensor | None]


@dataclass(frozen=True)
class QwenImageConfig:
    """Shape of a Qwen-Image transformer (defaults: the released 20B model)."""

    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64  # 16 latent channels x 2 x 2 patch
    out_channels: int = 16
    joint_attention_dim: int = 3584  # Qwen2.5-VL 7B's hidden size
    mlp_hidden: int = 12288
    patch_size: int = 2
    axes_dim: tuple[int, int, int] = STANDARD_AXES
    eps: float = 1e-6
    zero_cond_t: bool = False  # Edit-2511: references at timestep 0 unless the prompts choose another method
    layered: bool = False  # Qwen-Image-Layered: frames as layers, an extra timestep embedding (module docstring)

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def reference_method(self) -> str:
        """How references are placed when the prompts do not say (ComfyUI's default_ref_method)."""
        return ZERO_COND_METHOD if self.zero_cond_t else "index"

    @property
    def context_dim(self) -> int:
        """The prompt states' width (Qwen2.5-VL's hidden size)."""
        return self.joint_attention_dim

    @property
    def latent_channels(self) -> int:
        return self.out_channels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalised in float32, as diffusers' RMSNorm does: bf16 squares lose too much.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int, layered: bool = False):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        if layered:
            self.addition_t_embedding = nn.Embedding(2, dim)


class GeluProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # net.1 is the reference's dropout: an identity here, so that net.2's weights keep their key.
        self.net = nn.ModuleList([GeluProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class JointAttention(nn.Module):
    def __init__(self, c: QwenImageConfig):
        super().__init__()
        dim = c.dim
        self.heads = c.num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(c.head_dim, c.eps), RMSNorm(c.head_dim, c.eps)
        self.norm_added_q, self.norm_added_k = RMSNorm(c.head_dim, c.eps), RMSNorm(c.head_dim, c.eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1))  # [B, L, heads, head_dim]

    def _joint(self, txt: Tensor, img: Tensor, txt_proj: nn.Linear, img_proj: nn.Linear,
               txt_norm: RMSNorm | None = None, img_norm: RMSNorm | None = None) -> Tensor:
        """Text then image heads [B, heads, L, head_dim], each stream RMS-normalised per head if norms are given."""
        t, i = self._split(txt_proj(txt)), self._split(img_proj(img))
        if txt_norm is not None:
            t, i = txt_norm(t), img_norm(i)
        return torch.cat([t, i], dim=1).transpose(1, 2)

    def forward(self, img: Tensor, txt: Tensor, rope: tuple[Tensor, Tensor],
                mask: Tensor | None) -> tuple[Tensor, Tensor]:
        q = apply_rope(self._joint(txt, img, self.add_q_proj, self.to_q, self.norm_added_q, self.norm_q), *rope)
        k = apply_rope(self._joint(txt, img, self.add_k_proj, self.to_k, self.norm_added_k, self.norm_k), *rope)
        v = self._joint(txt, img, self.add_v_proj, self.to_v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        t = txt.shape[1]
        return self.to_out[0](out[:, t:]), self.to_add_out(out[:, :t])


def _modulate(x: Tensor, params: Tensor, ref_params: Tensor | None = None, n: int = 0) -> tuple[Tensor, Tensor]:
    """LayerNorm'd `x` shifted and scaled by params' (shift, scale, gate) thirds; returns it and the gate. With
    `ref_params`, the tokens from `n` on (Edit-2511's references) take those instead (a gate per token)."""
    if ref_params is not None:
        (head, head_gate), (tail, tail_gate) = _modulate(x[:, :n], params), _modulate(x[:, n:], ref_params)
        gates = (head_gate.expand(-1, n, -1), tail_gate.expand(-1, x.shape[1] - n, -1))
        return torch.cat([head, tail], dim=1), torch.cat(gates, dim=1)
    shift, scale, gate = params[:, None].chunk(3, dim=-1)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift, gate


class QwenImageBlock(nn.Module):
    def __init__(self, c: QwenImageConfig):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.attn = JointAttention(c)
        self.img_mlp = FeedForward(c.dim, c.mlp_hidden)
        self.txt_mlp = FeedForward(c.dim, c.mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor],
                mask: Tensor | None, ref_temb: Tensor | None = None, n: int = 0) -> tuple[Tensor, Tensor]:
        """`ref_temb`, if given, modulates the image tokens from `n` on (Edit-2511's references at timestep 0)."""
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        ref_mod1 = ref_mod2 = None
        if ref_temb is not None:
            ref_mod1, ref_mod2 = self.img_mod(ref_temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_in, img_gate = _modulate(img, img_mod1, ref_mod1, n)
        txt_in, txt_gate = _modulate(txt, txt_mod1)
        img_attn, txt_attn = self.attn(img_in, txt_in, rope, mask)
        img = img + img_gate * img_attn
        txt = txt + txt_gate * txt_attn
        img_in, img_gate = _modulate(img, img_mod2, ref_mod2, n)
        img = img + img_gate * self.img_mlp(img_in)
        txt_in, txt_gate = _modulate(txt, txt_mod2)
        txt = txt + txt_gate * self.txt_mlp(txt_in)
        if img.dtype == torch.float16:  # as the reference does, so fp16 runs do not overflow to inf
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


class NormOut(nn.Module):
    """The final adaptive LayerNorm; its modulation is (scale, shift), in that order (diffusers'
    AdaLayerNormContinuous), unlike the blocks' (shift, scale, gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


def msrope_grid(rows: int, cols: int, index: int = 0, row_offset: int = 0, col_offset: int = 0,
                device: torch.device | None = None) -> Tensor:
    """The RoPE positions [rows*cols, 3] of one image's patches, row by row: frame `index`, rows and columns centred
    (diffusers' scale_rope) and moved by the offsets (in patches)."""
    grid = torch.full((rows, cols, 3), float(index), device=device)
    grid[..., 1] = (torch.arange(rows, device=device) - (rows - rows // 2) + row_offset)[:, None].float()
    grid[..., 2] = (torch.arange(cols, device=device) - (cols - cols // 2) + col_offset)[None, :].float()
    return grid.reshape(-1, 3)


def text_ids(start: int, text_tokens: int, device: torch.device | None = None) -> Tensor:
    """The text tokens' RoPE positions [text_tokens, 3]: on the diagonal from `start`."""
    return torch.arange(start, start + text_tokens, device=device).float()[:, None].expand(-1, 3)


def msrope_ids(rows: int, cols: int, text_tokens: int, device: torch.device | None = None) -> Tensor:
    """The RoPE positions [text_tokens + rows*cols, 3] of the joint sequence (text first), as the module docstring
    says: image patches centred at frame 0, text on the diagonal after the image's largest half-size."""
    return torch.cat([text_ids(max(rows // 2, cols // 2), text_tokens, device), msrope_grid(rows, cols, device=device)])


def reference_grids(sizes: Sequence[tuple[int, int]], method: str) -> list[tuple[int, int, int]]:
    """Where ComfyUI's Qwen-Image puts references of `sizes` (h, w in latent pixels): (frame index, row offset,
    column offset in patches) for each, by `method` (`References`' methods)."""
    index = method in ("index", ZERO_COND_METHOD)
    return reference_placements(sizes, 0, 0, "index" if index else "offset")


class QwenImageModel(nn.Module):
    block_patches: tuple[BlockPatch, ...] = ()  # set on shallow copies (`with_block_patch`)

    def __init__(self, config: QwenImageConfig):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_channels, c.dim)
        self.txt_norm = RMSNorm(c.joint_attention_dim, c.eps)
        self.txt_in = nn.Linear(c.joint_attention_dim, c.dim)
        self.time_text_embed = TimeTextEmbed(c.dim, c.layered)
        self.transformer_blocks = nn.ModuleList([QwenImageBlock(c) for _ in range(c.num_layers)])
        self.norm_out = NormOut(c.dim)
        self.proj_out = nn.Linear(c.dim, c.patch_size**2 * c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from the prompt's RMS norm, which fp8 weight storage (ldm.quant) leaves as is."""
        return self.txt_norm.weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attn_mask: Tensor | None = None, ref_latents: References | Sequence[Tensor] | None = None,
                text_after_all_images: bool = False, control: Sequence[Tensor] | None = None,
                additional_t_cond: Tensor | None = None) -> Tensor:
        """Predict the velocity (noise - data) of latents `x` [B, 16, H, W] (or [B, 16, 1, H, W], returned in the
        same rank; a Layered model's [B, 16, layers + 1, H, W]) at flow levels `timesteps` [B] (0..1) given the
        Qwen2.5-VL prompt states `context` [B, L, context_dim]; `attn_mask` [B, L] (1 = a real token) keeps the image
        and text from attending to padding. `ref_latents` are Qwen-Image-Edit's reference latents in the model's
        latent space, [B or 1, 16, h, w] (or one frame of [.., 1, h, w]), each its own size; a plain sequence is
        placed by the model's default method (`QwenImageConfig.reference_method`). `text_after_all_images` starts
        the text's positions after the largest image, references included, as diffusers' edit pipelines do
        (ComfyUI's, the default: after the noisy latent). `control` is a ControlNet's residuals [B, n, dim] for the
        noisy latent's n image tokens (see the module docstring). `additional_t_cond` [B] (0 or 1, default 0) is a
        Layered model's extra timestep class. `y` is accepted for the sampler's common call and unused (Qwen-Image has
        no pooled prompt)."""
        c, dtype = self.config, self.dtype
        video = x.ndim == 5
        frames = self._frames(x)
        if context.ndim != 3 or context.shape[-1] != c.context_dim:
            raise ValueError(f"Qwen-Image takes Qwen2.5-VL prompt states [B, L, {c.context_dim}]; got "
                             f"{list(context.shape)} (a prompt from another text encoder?)")
        h, w = frames[0].shape[-2:]
        p = c.patch_size
        rows, cols = -(-h // p), -(-w // p)
        tokens = [patchify(pad_to_patch(f, p).to(dtype), p) for f in frames]
        grids = [msrope_grid(rows, cols, i, device=x.device) for i in range(len(frames))]
        start = max(rows // 2, cols // 2)
        method = None
        if ref_latents is not None:
            refs = ref_latents if isinstance(ref_latents, References) else References(tuple(ref_latents),
                                                                                       c.reference_method)
            method = refs.method
            more_tokens, more_grids, starts = self._reference_tokens(refs, x, dtype)
            tokens, grids = tokens + more_tokens, grids + more_grids
            start = max(start, *starts) if text_after_all_images else start
        if c.layered and text_after_all_images:
            start = max(start, len(grids) - 1)  # diffusers' layer count: frames and references, less one
        n = len(frames) * rows * cols  # the noisy latent's tokens, the only ones predicted
        img = self.img_in(torch.cat(tokens, dim=1))
        txt = self.txt_in(self.txt_norm(context.to(dtype)))
        t = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps
        temb = self._time_embedding(t, additional_t_cond, dtype)
        ref_temb = None
        if method == ZERO_COND_METHOD and img.shape[1] > n:
            ref_temb = self.time_text_embed.timestep_embedder(timestep_embedding(t.float() * 0, 256).to(dtype))
        ids = torch.cat([text_ids(start, txt.shape[1], x.device), *grids])
        rope = rope_angles(ids, c.axes_dim, THETA)
        mask = None if attn_mask is None else self._joint_mask(attn_mask, txt.shape[:2], img.shape[1])
        interval = None if control is None else self._control_interval(control, img.shape[0], n)
        for i, block in enumerate(self.transformer_blocks):
            img, txt = block(img, txt, temb, rope, mask, ref_temb, n)
            for patch in self.block_patches:  # first, as ComfyUI runs its double-block patches
                residual = patch(i, img[:, :n], (h, w))
                if residual is not None:
                    img = _add_to_image(img, residual, n)
            if interval is not None:
                img = _add_to_image(img, control[i // interval], n)
        out = self.proj_out(self.norm_out(img[:, :n], temb))
        parts = [unpatchify(part, rows * p, cols * p, p)[..., :h, :w] for part in out.chunk(len(frames), dim=1)]
        out = torch.stack(parts, dim=2).to(x.dtype)
        return out if video else out[:, :, 0]

    def _time_embedding(self, t: Tensor, additional_t_cond: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The timestep's embedding [B, dim] (t in 0..1, scaled by 1000), plus a Layered model's learnt one of
        `additional_t_cond` (0 if not given)."""
        embed = self.time_text_embed
        temb = embed.timestep_embedder(timestep_embedding(t.float() * 1000, 256).to(dtype))
        if not self.config.layered:
            if additional_t_cond is not None:
                raise ValueError("additional_t_cond is a Qwen-Image-Layered input; this model is not one")
            return temb
        if additional_t_cond is None:
            additional_t_cond = torch.zeros(t.shape[0], dtype=torch.long, device=t.device)
        return temb + embed.addition_t_embedding(additional_t_cond.to(t.device, torch.long)).to(dtype)

    def _frames(self, x: Tensor) -> list[Tensor]:
        """The latent's frames [B, 16, H, W]: one, or a Layered model's layers + 1 of [B, 16, layers + 1, H, W]."""
        if x.ndim == 5 and x.shape[2] > 1 and self.config.layered:
            return [self._image(frame, "latents") for frame in x.unbind(2)]
        return [self._image(x, "latents")]

    def _image(self, x: Tensor, what: str) -> Tensor:
        """A latent [B, 16, H, W], from one of one frame [B, 16, 1, H, W] (Wan 2.1's VAE makes those)."""
        c = self.config
        if x.ndim == 5:
            if x.shape[2] != 1:
                raise ValueError(f"Qwen-Image makes images: {what} of {x.shape[2]} frames; it takes one (only "
                                 "Qwen-Image-Layered takes a latent of several, its layers)")
            x = x[:, :, 0]
        if x.ndim != 4 or x.shape[1] * c.patch_size**2 != c.in_channels:
            raise ValueError(f"Qwen-Image takes {what} [B, {c.in_channels // c.patch_size**2}, H, W] (Wan 2.1's "
                             f"VAE); got {list(x.shape)}")
        return x

    def _reference_tokens(self, refs: References, x: Tensor, dtype: torch.dtype) -> tuple[list[Tensor],
                                                                                       list[Tensor], list[int]]:
        """Reference latents as image tokens for latents `x`, each with its RoPE positions (`reference_grids`) and
        half-size."""
        p, batch = self.config.patch_size, x.shape[0]
        latents = [self._image(r, "reference latents") for r in refs.latents]
        if self.config.layered:  # ComfyUI's "negative_index": frames -1, -2, ...
            placements = [(-1 - i, 0, 0) for i in range(len(latents))]
        else:
            placements = reference_grids([r.shape[-2:] for r in latents], refs.method)
        tokens, grids, starts = [], [], []
        for ref, (index, row, col) in zip(latents, placements, strict=True):
            if ref.shape[0] not in (1, batch):
                raise ValueError(f"a batch of {ref.shape[0]} reference latents for a batch of {batch} latents")
            padded = pad_to_patch(ref.to(x.device, dtype), p)
            rows, cols = padded.shape[-2] // p, padded.shape[-1] // p
            tokens.append(patchify(padded, p).expand(batch, -1, -1))
            grids.append(msrope_grid(rows, cols, index, row, col, device=x.device))
            starts.append(max(rows // 2, cols // 2))
        return tokens, grids, starts

    def _control_interval(self, control: Sequence[Tensor], batch: int, n: int) -> int:
        """How many consecutive blocks each ControlNet residual serves (diffusers' rule); checks their shapes."""
        blocks, dim = self.config.num_layers, self.config.dim
        if not 1 <= len(control) <= blocks:
            raise ValueError(f"{len(control)} ControlNet residuals for a Qwen-Image model of {blocks} blocks: it takes "
                             f"1 to {blocks}")
        for residual in control:
            if residual.shape != (batch, n, dim):
                raise ValueError(f"a ControlNet residual of shape {list(residual.shape)} for Qwen-Image latents of "
                                 f"{n} image tokens (batch {batch}, width {dim}): it takes [{batch}, {n}, {dim}] "
                                 "(a ControlNet made for another model, or for another latent size?)")
        return math.ceil(blocks / len(control))

    @staticmethod
    def _joint_mask(attn_mask: Tensor, text_shape: torch.Size, image_tokens: int) -> Tensor:
        """[B, 1, 1, L + N] bool: which keys every query may attend to (the image's always)."""
        batch, length = text_shape
        if attn_mask.ndim != 2 or attn_mask.shape[1] != length or attn_mask.shape[0] not in (1, batch):
            raise ValueError(f"a prompt attention mask of shape {list(attn_mask.shape)} for a prompt of {length} "
                             f"tokens (batch {batch}): it takes [B, {length}], 1 for each real token")
        text = attn_mask.to(torch.bool).expand(batch, -1)
        image = torch.ones(batch, image_tokens, dtype=torch.bool, device=attn_mask.device)
        return torch.cat([text, image], dim=1)[:, None, None]


def _add_to_image(img: Tensor, residual: Tensor, n: int) -> Tensor:
    """The image tokens `img` with `residual` added to the first `n` (the noisy latent's; references get none)."""
    residual = residual.to(img.dtype)
    if img.shape[1] == n:
        return img + residual
    return torch.cat([img[:, :n] + residual, img[:, n:]], dim=1)


def with_block_patch(model: QwenImageModel, patch: BlockPatch) -> QwenImageModel:
    """A shallow copy of `model` that also runs `patch` after each block (after those it already has); the model,
    which a cache may hold, is left as it was."""
    from ldm.lora import shallow_copy

    patched = shallow_copy(model)
    patched.block_patches = (*model.block_patches, patch)
    return patched


def is_qwen_image(sd: Mapping[str, Tensor], prefix: str = "") -> bool:
    """Whether a state dict holds a Qwen-Image transformer in its released layout (under `prefix`)."""
    return all(f"{prefix}{k}" in sd for k in ("txt_norm.weight", "img_in.weight",
                                                "transformer_blocks.0.img_mod.1.weight"))


def qwen_image_config_from_state_dict(sd: Mapping[str, Tensor], axes_dim: tuple[int, int, int] | None = None,
                                      prefix: str = "", layered: bool = False) -> QwenImageConfig:
    """The exact shape of Qwen-Image weights (under `prefix`) from their key names and tensor shapes. The RoPE
    split of a head is not in the weights: `axes_dim`, else the released (16, 56, 56) for 128-wide heads.
    Qwen-Image-Layered's weights are refused unless `layered` (for callers that can give it its inputs)."""
    for key, variant in VARIANTS.items():
        if f"{prefix}{key}" in sd and not (layered and key == LAYERED_KEY):
            raise ValueError(f"a {variant} model: Loom runs the Qwen-Image text-to-image transformer, not this variant")
    try:
        dim, in_channels = sd[f"{prefix}img_in.weight"].shape
        head_dim = sd[f"{prefix}transformer_blocks.0.attn.norm_q.weight"].shape[0]
        if axes_dim is None:
            if head_dim != sum(STANDARD_AXES):
                raise ValueError(f"its heads are {head_dim} wide, not the released model's 128, and the file does "
                                 "not say how RoPE splits them (loom.qwen_image_axes metadata)")
            axes_dim = STANDARD_AXES
        if sum(axes_dim) != head_dim:
            raise ValueError(f"a RoPE split {tuple(axes_dim)} for {head_dim}-wide heads")
        out_channels = sd[f"{prefix}proj_out.weight"].shape[0] // 4
        return QwenImageConfig(
            num_layers=len({int(m[1]) for k in sd if (m := _BLOCK.match(k[len(prefix):]))}),
            num_heads=dim // head_dim, head_dim=head_dim, in_channels=in_channels, out_channels=out_channels,
            joint_attention_dim=sd[f"{prefix}txt_in.weight"].shape[1],
            mlp_hidden=sd[f"{prefix}transformer_blocks.0.img_mlp.net.0.proj.weight"].shape[0],
            axes_dim=tuple(axes_dim), zero_cond_t=f"{prefix}{ZERO_COND_KEY}" in sd,
            layered=f"{prefix}{LAYERED_KEY}" in sd)
    except KeyError as e:
        raise ValueError(f"an incomplete Qwen-Image transformer: no weight {e}") from None
