"""The LTX-Video transformer (Lightricks, 0.9.x); attribute names follow Lightricks' (and ComfyUI's) checkpoint keys.

A rectified-flow video transformer over 128-channel latents of LTX's causal VAE (8x temporal, 32x32 spatial
compression): every latent pixel is one token (no patching; `patchify_proj` is a linear map). Each block runs
RMS-normed self-attention, then cross-attention to the T5-XXL prompt (projected by `caption_projection`), then a
GELU MLP; self-attention and MLP are modulated PixArt-alpha style (`adaln_single` embeds the timestep once, each
block adds its own `scale_shift_table`). Queries and keys are RMS-normed across all heads, and self-attention's
take rotary embeddings (RoPE) over the whole inner width, on three axes at once: each token's position in pixels
and seconds, relative to (20 s, 2048 px, 2048 px):

    frame f -> max(8 f + 1 - 8, 0) / frame_rate   (the VAE's causal first frame stands alone: ComfyUI's causal fix)
    row r   -> 32 r,  column c -> 32 c

diffusers' LTXPipeline uses 8 f / frame_rate instead (`rope_interpolation_scale`, no causal fix); its
LTXConditionPipeline, ComfyUI and Lightricks' own pipeline use the rule above, which `LTXVModel` follows.

`LTXVModel.forward(x, timesteps, context, y=None, attention_mask=None, frame_rate=25.0, keyframe_idxs=None)`:
`timesteps` are flow levels 0..1 ([B], or one per latent pixel [B, T, H, W] as image-to-video conditioning sets
them), scaled by 1000 as the model was trained; `attention_mask` [B, L] (1: attend) masks T5 padding out of
cross-attention. `keyframe_idxs` [B, 3, K] (ComfyUI's name) are the positions of the last K tokens, keyframe
guides appended after the video's frames (LTXVAddGuide): each one's (pixel frame, pixel row, pixel column), which
replace their place in the latent, the frame in seconds at the frame rate, as for every token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.unet import timestep_embedding

# Lightricks' positional reference: 20 seconds, 2048 pixels; the VAE's compression (frames, pixels per latent).
MAX_POSITIONS = (20.0, 2048.0, 2048.0)
VAE_SCALE = (8, 32, 32)
LTXV_HEADS = 32  # every LTX-Video 0.9.x: 32 heads (2B: 64 wide, 13B: 128 wide); not told by any weight's shape
TIMESTEP_CHANNELS = 256
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
PROBE = "adaln_single.linear.weight"


@dataclass(frozen=True)
class LTXVConfig:
    """Shape of an LTX-Video transformer (defaults: the 2B models, v0.9 to v0.9.6)."""

    in_channels: int = 128
    out_channels: int = 128
    inner_dim: int = 2048
    num_heads: int = LTXV_HEADS
    depth: int = 28
    caption_channels: int = 4096
    cross_attention_dim: int = 2048  # attn2's key / value input: the projected caption
    ff_dim: int = 8192
    qk_norm: bool = True
    theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.inner_dim % self.num_heads:
            raise ValueError(f"the inner width {self.inner_dim} does not split into {self.num_heads} heads")

    @property
    def context_dim(self) -> int:
        """The prompt width it takes (T5-XXL's), under the name the samplers check prompts against."""
        return self.caption_channels

    @property
    def latent_channels(self) -> int:
        return self.in_channels


class Attention(nn.Module):
    """Multi-head attention with Lightricks' names; q / k RMS-normed across heads (eps 1e-5) before RoPE."""

    def __init__(self, dim: int, context_dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.q_norm = nn.RMSNorm(dim, eps=1e-5) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim, eps=1e-5) if qk_norm else nn.Identity()
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # the key is to_out.0 (a dropout followed it)

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                bias: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.q_norm(self.to_q(x)), self.k_norm(self.to_k(context)), self.to_v(context)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # net.1 was a dropout: an identity keeps the output layer at Lightricks' key net.2
        self.net = nn.Sequential(GELUProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, c: LTXVConfig):
        super().__init__()
        self.attn1 = Attention(c.inner_dim, c.inner_dim, c.num_heads, c.qk_norm)
        self.attn2 = Attention(c.inner_dim, c.cross_attention_dim, c.num_heads, c.qk_norm)
        self.ff = FeedForward(c.inner_dim, c.ff_dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, c.inner_dim))

    def forward(self, x: Tensor, context: Tensor, temb: Tensor, rope: tuple[Tensor, Tensor],
                bias: Tensor | None) -> Tensor:
        """`temb` [B, 1 or S, 6 * D]: the timestep's modulation, for the whole video or per token."""
        mod = self.scale_shift_table + temb.unflatten(-1, (6, -1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(2)
        x = x + gate_msa * self.attn1(_norm(x) * (1 + scale_msa) + shift_msa, rope=rope)
        x = x + self.attn2(x, context, bias=bias)  # cross-attention is neither normed nor modulated
        return x + gate_mlp * self.ff(_norm(x) * (1 + scale_mlp) + shift_mlp)


def _norm(x: Tensor) -> Tensor:
    """RMS norm without a scale (eps 1e-6), in float32 as Lightricks' is."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class TimestepEmbedding(nn.Module):
    """PixArt-alpha's combined embedding, without its (unused) size conditions: only `timestep_embedder`."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)


class AdaLayerNormSingle(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.emb = TimestepEmbedding(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timesteps: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(the blocks' modulation [N, 6 D], the embedded timestep [N, D]) of timesteps [N] (0..1000)."""
        embedded = self.emb.timestep_embedder(timestep_embedding(timesteps, TIMESTEP_CHANNELS).to(dtype))
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def latent_positions(frames: int, rows: int, cols: int, frame_rate: float, device: torch.device | str = "cpu",
                     causal_fix: bool = True) -> Tensor:
    """[frames * rows * cols, 3]: each latent pixel's (seconds, pixel row, pixel column) in token order (see the
    module docstring); `causal_fix=False` gives diffusers' LTXPipeline's frame positions (8 f / frame_rate)."""
    f, r, c = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in (frames, rows, cols)),
                             indexing="ij")
    t = f * VAE_SCALE[0]
    if causal_fix:
        t = (t + 1 - VAE_SCALE[0]).clamp(min=0)
    return torch.stack([t / frame_rate, r * VAE_SCALE[1], c * VAE_SCALE[2]], dim=-1).flatten(0, 2)


def with_keyframes(positions: Tensor, keyframe_idxs: Tensor, frame_rate: float, batch: int) -> Tensor:
    """[batch, S, 3]: `positions` [S, 3] with the last K tokens' replaced by `keyframe_idxs` [1 or batch, 3, K] (pixel
    frame, pixel row, pixel column of each appended guide token), the frame in seconds at `frame_rate`."""
    tokens = keyframe_idxs.shape[-1]
    if keyframe_idxs.ndim != 3 or keyframe_idxs.shape[1] != 3 or keyframe_idxs.shape[0] not in (1, batch):
        raise ValueError(f"keyframe_idxs {list(keyframe_idxs.shape)} are not [B, 3, K] guide coordinates for a "
                         f"batch of {batch}")
    if tokens > positions.shape[0]:
        raise ValueError(f"{tokens} guide tokens for a latent of {positions.shape[0]}: the keyframe guides were not "
                         "appended to this latent (LTXVAddGuide's latent goes with its prompts)")
    guides = keyframe_idxs.float().transpose(1, 2) / torch.tensor([frame_rate, 1.0, 1.0], device=positions.device)
    positions = positions.expand(batch, -1, -1).clone()
    positions[:, positions.shape[1] - tokens:] = guides
    return positions


def rope_angles(positions: Tensor, dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(cos, sin) [(B,) S, dim] of LTX's RoPE at `positions` [(B,) S, 3]: dim // 6 frequencies from 1 to theta
    (times pi/2) per axis, interleaved axis by axis, each used by a pair of channels; the dim % 6 leading channels
    unrotated."""
    freqs = theta ** torch.linspace(0.0, 1.0, dim // 6, dtype=torch.float32, device=positions.device) * math.pi / 2
    fractions = positions.float() / torch.tensor(MAX_POSITIONS, device=positions.device)
    angles = (freqs * (fractions[..., None] * 2 - 1)).transpose(-1, -2).flatten(-2)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    pad = dim % 6
    return (F.pad(cos, (pad, 0), value=1.0), F.pad(sin, (pad, 0), value=0.0))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each channel pair (2i, 2i + 1) of `x` [B, S, dim] by its angle, in float32."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class LTXVModel(nn.Module):
    def __init__(self, config: LTXVConfig):
        super().__init__()
        self.config = c = config
        self.patchify_proj = nn.Linear(c.in_channels, c.inner_dim)
        self.adaln_single = AdaLayerNormSingle(c.inner_dim)
        self.caption_projection = CaptionProjection(c.caption_channels, c.inner_dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(c) for _ in range(c.depth)])
        self.scale_shift_table = nn.Parameter(torch.zeros(2, c.inner_dim))
        self.proj_out = nn.Linear(c.inner_dim, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from the output modulation table, which fp8 weight storage leaves as it is."""
        return self.scale_shift_table.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attention_mask: Tensor | None = None, frame_rate: float = 25.0,
                control: list[Tensor] | None = None, attn_mask: Tensor | None = None,
                denoise_mask: Tensor | None = None, keyframe_idxs: Tensor | None = None) -> Tensor:
        """Predict the velocity (noise - data) of video latents `x` [B, 128, T, H, W] at flow levels `timesteps`
        ([B] or [B, T, H, W], 0..1) given T5 states `context` [B, L, 4096]; see the module docstring.

        As the sampler calls it: `y` [B, 1 + 3 K] is the frame rate (LTXVConditioning's) followed by the prompt's
        `keyframe_idxs` flattened (`nodes.sd.ltxv.ltxv_conditioning`), `attn_mask` the prompt's attention mask
        [B, L] (as `attention_mask`), and `denoise_mask` [B, 1, T, H, W] a noise mask at the latent's size, each
        pixel's level being the mask times the step's (image-to-video: ComfyUI's process_timestep)."""
        c, dtype = self.config, self.dtype
        if y is not None:  # one frame rate per video; the prompts of a call share it (LTXVConditioning sets both)
            frame_rate = float(y.reshape(-1)[0])
            if y.shape[-1] > 1:
                if (y.shape[-1] - 1) % 3:
                    raise ValueError(f"`y` holds the frame rate and 3 coordinates per guide token; got {y.shape[-1]}")
                keyframe_idxs = y.reshape(y.shape[0], -1)[:, 1:].unflatten(1, (3, -1))
        attention_mask = attn_mask if attention_mask is None else attention_mask
        if denoise_mask is not None:
            timesteps = denoise_mask[:, 0] * timesteps.reshape(-1, 1, 1, 1)
        if control is not None:
            raise ValueError("ControlNets and T2I-Adapters do not fit an LTX-Video model")
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"an LTX-Video model denoises video latents [B, {c.in_channels}, T, H, W]; got "
                             f"{list(x.shape)}")
        batch, _, frames, rows, cols = x.shape
        tokens = frames * rows * cols
        levels = timesteps.reshape(batch, -1)
        if levels.shape[1] not in (1, tokens):
            raise ValueError(f"{levels.shape[1]} timesteps per video for {tokens} latent pixels")
        temb, embedded = self.adaln_single(levels.flatten() * 1000, dtype)
        temb, embedded = temb.unflatten(0, (batch, -1)), embedded.unflatten(0, (batch, -1))
        h = self.patchify_proj(x.flatten(2).transpose(1, 2).to(dtype))
        context = self.caption_projection(context.to(dtype))
        bias = None
        if attention_mask is not None:
            if attention_mask.shape != context.shape[:2]:
                raise ValueError(f"an attention mask of shape {list(attention_mask.shape)} for a prompt of "
                                 f"{list(context.shape[:2])} tokens")
            # Additive, as Lightricks': a fully masked prompt then gets uniform attention, not NaNs.
            bias = ((attention_mask.to(dtype) - 1) * torch.finfo(dtype).max)[:, None, None, :]
        positions = latent_positions(frames, rows, cols, frame_rate, x.device)
        if keyframe_idxs is not None:
            positions = with_keyframes(positions, keyframe_idxs.to(x.device), frame_rate, batch)
        rope = rope_angles(positions, c.inner_dim, c.theta)
        for block in self.transformer_blocks:
            h = block(h, context, temb, rope, bias)
        shift, scale = (self.scale_shift_table + embedded[:, :, None]).unbind(2)
        h = F.layer_norm(h.float(), (c.inner_dim,), eps=1e-6).to(dtype) * (1 + scale) + shift
        out = self.proj_out(h)
        return out.transpose(1, 2).reshape(batch, c.out_channels, frames, rows, cols).to(x.dtype)


def is_ltxv(keys: Mapping[str, object] | set[str], prefix: str = "") -> bool:
    """Whether a state dict (or its keys) holds an LTX-Video 0.9.x transformer in Lightricks' layout under `prefix`
    (LTX-2's audio-video transformer shares the names, and adds audio ones)."""
    return (f"{prefix}patchify_proj.weight" in keys and f"{prefix}{PROBE}" in keys
            and f"{prefix}audio_patchify_proj.weight" not in keys)


def ltxv_config_from_state_dict(sd: Mapping[str, Tensor], num_heads: int = LTXV_HEADS) -> LTXVConfig:
    """The shape of an LTX-Video transformer (no prefix) from its key names and tensor shapes; the head count is
    Lightricks' (32) unless given."""
    try:
        inner, in_channels = sd["patchify_proj.weight"].shape
        return LTXVConfig(
            in_channels=in_channels, out_channels=sd["proj_out.weight"].shape[0], inner_dim=inner,
            num_heads=num_heads, depth=len({int(m[1]) for k in sd if (m := _BLOCK.match(k))}),
            caption_channels=sd["caption_projection.linear_1.weight"].shape[1],
            cross_attention_dim=sd["transformer_blocks.0.attn2.to_k.weight"].shape[1],
            ff_dim=sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0],
            qk_norm="transformer_blocks.0.attn1.q_norm.weight" in sd)
    except KeyError as e:
        raise ValueError(f"an incomplete LTX-Video transformer: no weight {e}") from None
