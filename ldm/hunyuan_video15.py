"""The HunyuanVideo 1.5 transformer (Tencent's 8.3B video DiT, 2025); attribute names follow the keys of the files
ComfyUI users load (Comfy-Org/HunyuanVideo_1.5_repackaged, split_files/diffusion_models/hunyuanvideo1.5_*: Tencent's
names with each stream's q, k and v fused, bare or under `model.diffusion_model.`). It computes what diffusers'
HunyuanVideo15Transformer3DModel computes; `convert_state_dict` also takes diffusers' keys and Tencent's own release
(q, k and v apart).

The model:
- Video latents [B, C, F, H, W] become tokens through a 3-D convolution (`img_in`, patch 1x1x1 in every release),
  frame by frame, row by row. C is the noisy latent's 32 channels followed by the condition's (the 480p / 720p
  models: 32 channels of the start image's latent, zeros for text-to-video, and a 1-channel mask: 65 in all; the
  1080p super-resolution model has 98, as ComfyUI detects it; read from the weights). Out come 32 channels (a
  velocity).
- The conditioning vector is the timestep's embedding (`time_in`: the 0..1000 timestep, sinusoidal, 256 wide, then an
  MLP); MeanFlow-distilled models (those with `time_r_in`, e.g. the 1080p SR one) add that of the step's end time
  `timesteps_r` (ComfyUI: the next sigma of the schedule, x 1000).
- The context is up to three token kinds, each projected to the model's width and tagged with a learnt type vector
  (`cond_type_embedding`, rows 0 / 1 / 2): the prompt's Qwen2.5-VL states [B, L, 3584], refined by two
  self-attention blocks modulated by the timestep and the prompt's mean (`txt_in`, padding masked out); the glyph
  text's byT5 states [B, L2, 1472] (`byt5_in`); the start image's SigLIP states [B, 729, 1152] (`vision_in`, the
  image-to-video models; text-to-video leaves them out). Valid tokens come first, as diffusers orders them: image,
  byT5, prompt; padding is left out of every attention.
- 54 double-stream blocks (Flux's design, no single-stream blocks): the video and context streams each have their
  own modulation (shift, scale, gate x 2 from the conditioning vector), q/k/v with biases, per-head RMS norms of q and
  k, and a GELU (tanh) MLP; they attend jointly, video tokens first. Only video tokens are rotated: 3-D RoPE, theta
  256, a 128-wide head split 16 / 56 / 56 between frame, row and column, channels in adjacent pairs.
- The output layer is modulated (shift, scale) by the conditioning vector, then unpatchified.

`HunyuanVideo15.forward(x, timesteps, context, ...)` takes timesteps on the model's 0..1000 scale; the caller
concatenates the condition channels to `x`. No known release has a guidance embedding (`guidance_in`, which
ComfyUI's loader would build if present): the CFG-distilled models are run at guidance 1; such weights are refused.
Masked (padding) tokens are left out of attention as keys; the outputs match diffusers' to ~1e-6 in float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.flux import apply_rope, rope_angles
from ldm.unet import timestep_embedding
from ldm.wan import grid_ids

FREQUENCY_DIM = 256  # the sinusoidal timestep embedding's width
COND_TEXT, COND_BYT5, COND_IMAGE = 0, 1, 2  # rows of `cond_type_embedding`
_DOUBLE = re.compile(r"double_blocks\.(\d+)\.")
_REFINER = re.compile(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.")


@dataclass(frozen=True)
class HunyuanVideo15Config:
    in_channels: int = 65
    out_channels: int = 32
    hidden_size: int = 2048
    num_heads: int = 16
    depth: int = 54
    refiner_depth: int = 2
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 1, 1)  # (frames, rows, cols)
    text_dim: int = 3584  # Qwen2.5-VL 7B's hidden states
    byt5_dim: int | None = 1472  # Glyph-SDXL-v2's byT5 states; None: no `byt5_in`
    byt5_hidden: int = 2048
    image_dim: int | None = 1152  # SigLIP so400m's states; None: no `vision_in`
    rope_axes: tuple[int, int, int] = (16, 56, 56)
    rope_theta: int = 256
    meanflow: bool = False  # `time_r_in`: the MeanFlow-distilled models' embedding of the step's end time

    @property
    def context_dim(self) -> int:
        """The prompt's width (Qwen2.5-VL's states)."""
        return self.text_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


HUNYUAN_VIDEO15 = HunyuanVideo15Config()


def rope_axes_for(head_dim: int) -> tuple[int, int, int]:
    """The RoPE split of a head: 16 / 56 / 56 for the released 128-wide heads, the same proportions for others."""
    frames = head_dim // 8
    return frames, (head_dim - frames) // 2, (head_dim - frames) // 2


def tiny_config(**changes: object) -> HunyuanVideo15Config:
    """A small HunyuanVideo 1.5 (width 64, 2 heads, 2 blocks, 1 refiner block) with the real channel counts and
    condition widths, for tests."""
    base = HunyuanVideo15Config(hidden_size=64, num_heads=2, depth=2, refiner_depth=1, rope_axes=rope_axes_for(32))
    return replace(base, **changes)


# -------------------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class TimestepEmbedder(nn.Module):
    """`mlp.0` / `mlp.2`: the sinusoidal embedding of a 0..1000 time through Linear, SiLU, Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.mlp(timestep_embedding(t, FREQUENCY_DIM).to(dtype))


class TextEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Modulation(nn.Module):
    def __init__(self, dim: int, parts: int):
        super().__init__()
        self.parts = parts
        self.linear = nn.Linear(dim, parts * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(vec))[:, None, :].chunk(self.parts, dim=-1)


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, L, heads*dim] -> [B, heads, L, dim]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA over [B, H, L, D]; `mask` [B, 1, 1, Lk] bool (True: attend) or None. Out [B, L, H*D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def _norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return _norm(x) * (1 + scale) + shift


class RefinerBlock(nn.Module):
    """A prompt refiner block: self-attention and a SiLU MLP, each gated by the timestep-and-prompt vector."""

    def __init__(self, c: HunyuanVideo15Config):
        super().__init__()
        self.heads = c.num_heads
        dim = c.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn_qkv = nn.Linear(dim, 3 * dim)
        self.self_attn_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, c.mlp_dim, nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        gate_attn, gate_mlp = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        q, k, v = (_heads(t, self.heads) for t in self.self_attn_qkv(self.norm1(x)).chunk(3, dim=-1))
        x = x + self.self_attn_proj(_attend(q, k, v, mask)) * gate_attn
        return x + self.mlp(self.norm2(x)) * gate_mlp


class TokenRefiner(nn.Module):
    """`txt_in`: the prompt's states projected to the model's width and refined, modulated by the timestep's
    embedding plus that of the prompt's mean over its valid tokens."""

    def __init__(self, c: HunyuanVideo15Config):
        super().__init__()
        self.input_embedder = nn.Linear(c.text_dim, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.c_embedder = TextEmbedder(c.text_dim, c.hidden_size)
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(RefinerBlock(c) for _ in range(c.refiner_depth))

    def forward(self, x: Tensor, timesteps: Tensor, mask: Tensor) -> Tensor:
        weights = mask.to(torch.float32)[..., None]
        pooled = ((x.float() * weights).sum(dim=1) / weights.sum(dim=1)).to(x.dtype)
        c = self.t_embedder(timesteps, x.dtype) + self.c_embedder(pooled)
        attn_mask = None if bool(mask.all()) else mask[:, None, None, :]
        x = self.input_embedder(x)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, attn_mask)
        return x


class ByT5Mapper(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(self.layernorm(x))))))


class VisionProjection(nn.Module):
    """`vision_in.proj`: LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PatchEmbed(nn.Module):
    def __init__(self, c: HunyuanVideo15Config):
        super().__init__()
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, c.patch_size, stride=c.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DoubleStreamBlock(nn.Module):
    def __init__(self, c: HunyuanVideo15Config):
        super().__init__()
        self.heads = c.num_heads
        dim = c.hidden_size
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(dim, 6))
            self.add_module(f"{stream}_attn_qkv", nn.Linear(dim, 3 * dim))
            self.add_module(f"{stream}_attn_q_norm", RMSNorm(c.head_dim))
            self.add_module(f"{stream}_attn_k_norm", RMSNorm(c.head_dim))
            self.add_module(f"{stream}_attn_proj", nn.Linear(dim, dim))
            self.add_module(f"{stream}_mlp", Mlp(dim, c.mlp_dim, nn.GELU(approximate="tanh")))

    def _qkv(self, stream: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (_heads(t, self.heads) for t in getattr(self, f"{stream}_attn_qkv")(x).chunk(3, dim=-1))
        return getattr(self, f"{stream}_attn_q_norm")(q), getattr(self, f"{stream}_attn_k_norm")(k), v

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor],
                mask: Tensor | None) -> tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self._qkv("img", _modulate(img, i_shift1, i_scale1))
        tq, tk, tv = self._qkv("txt", _modulate(txt, t_shift1, t_scale1))
        iq, ik = apply_rope(iq, *rope), apply_rope(ik, *rope)
        out = _attend(torch.cat([iq, tq], dim=2), torch.cat([ik, tk], dim=2), torch.cat([iv, tv], dim=2), mask)
        img_out, txt_out = out[:, :img.shape[1]], out[:, img.shape[1]:]
        img = img + self.img_attn_proj(img_out) * i_gate1
        img = img + self.img_mlp(_modulate(img, i_shift2, i_scale2)) * i_gate2
        txt = txt + self.txt_attn_proj(txt_out) * t_gate1
        txt = txt + self.txt_mlp(_modulate(txt, t_shift2, t_scale2)) * t_gate2
        return img, txt


class FinalLayer(nn.Module):
    def __init__(self, c: HunyuanVideo15Config):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 2 * c.hidden_size))
        self.linear = nn.Linear(c.hidden_size, math.prod(c.patch_size) * c.out_channels)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))


# --------------------------------------------------------------------------------------------------------- model


def _valid(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    return torch.ones(batch, length, dtype=torch.bool, device=device) if mask is None else mask.to(device).bool()


class HunyuanVideo15(nn.Module):
    def __init__(self, config: HunyuanVideo15Config = HUNYUAN_VIDEO15):
        super().__init__()
        self.config = c = config
        if c.head_dim * c.num_heads != c.hidden_size or sum(c.rope_axes) != c.head_dim:
            raise ValueError(f"width {c.hidden_size} with {c.num_heads} heads does not fit RoPE axes {c.rope_axes}")
        self.img_in = PatchEmbed(c)
        self.time_in = TimestepEmbedder(c.hidden_size)
        if c.meanflow:
            self.time_r_in = TimestepEmbedder(c.hidden_size)
        self.txt_in = TokenRefiner(c)
        if c.byt5_dim is not None:
            self.byt5_in = ByT5Mapper(c.byt5_dim, c.byt5_hidden, c.hidden_size)
        if c.image_dim is not None:
            self.vision_in = VisionProjection(c.image_dim, c.hidden_size)
        self.cond_type_embedding = nn.Embedding(3, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c) for _ in range(c.depth))
        self.final_layer = FinalLayer(c)

    def context_tokens(self, context: Tensor, timesteps: Tensor, context_mask: Tensor | None = None,
                       byt5: Tensor | None = None, byt5_mask: Tensor | None = None,
                       image: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The context stream [B, L', hidden] and its validity mask [B, L'] (None: all valid): image, byT5 and
        prompt tokens, each batch row's valid ones first in that order, cut to the longest row's valid count."""
        batch, device = context.shape[0], context.device
        types = self.cond_type_embedding.weight
        text_mask = _valid(context_mask, batch, context.shape[1], device)
        parts, masks = [], []
        if image is not None:
            if self.config.image_dim is None:
                raise ValueError("this HunyuanVideo 1.5 model has no image input (vision_in)")
            parts.append(self.vision_in(image) + types[COND_IMAGE])
            masks.append(_valid(None, batch, image.shape[1], device))
        if byt5 is not None:
            if self.config.byt5_dim is None:
                raise ValueError("this HunyuanVideo 1.5 model has no byT5 input (byt5_in)")
            parts.append(self.byt5_in(byt5) + types[COND_BYT5])
            masks.append(_valid(byt5_mask, batch, byt5.shape[1], device))
        parts.append(self.txt_in(context, timesteps, text_mask) + types[COND_TEXT])
        masks.append(text_mask)
        tokens, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
        if context_mask is None and (byt5 is None or byt5_mask is None) or bool(mask.all()):
            return tokens, None  # (no mask given: no host read, so a CUDA graph can capture the call)
        order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)[:, :int(mask.sum(dim=1).max())]
        tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
        mask = mask.gather(1, order)
        return tokens, None if bool(mask.all()) else mask

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, context_mask: Tensor | None = None,
                byt5: Tensor | None = None, byt5_mask: Tensor | None = None, image: Tensor | None = None,
                timesteps_r: Tensor | None = None) -> Tensor:
        """x [B, in_channels, F, H, W] (F, H, W multiples of the patch), timesteps [B] in 0..1000, context [B, L,
        text_dim], byt5 [B, L2, byt5_dim] or None (no glyph text), image [B, N, image_dim] or None (text-to-video),
        masks [B, L] bool or 0/1 (None: all valid), timesteps_r [B] (MeanFlow models' step end; None: left out).
        Returns [B, out_channels, F, H, W]."""
        c = self.config
        b, _, f, h, w = x.shape
        grid = (f // c.patch_size[0], h // c.patch_size[1], w // c.patch_size[2])
        img = self.img_in(x)
        vec = self.time_in(timesteps, img.dtype)
        if timesteps_r is not None and c.meanflow:
            vec = vec + self.time_r_in(timesteps_r, img.dtype)
        txt, mask = self.context_tokens(context.to(img.dtype), timesteps, context_mask,
                                        None if byt5 is None else byt5.to(img.dtype), byt5_mask,
                                        None if image is None else image.to(img.dtype))
        if mask is not None:
            mask = torch.cat([_valid(None, b, img.shape[1], x.device), mask], dim=1)[:, None, None, :]
        rope = rope_angles(grid_ids(*grid, device=x.device), c.rope_axes, c.rope_theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope, mask)
        out = self.final_layer(img, vec).reshape(b, *grid, c.out_channels, *c.patch_size)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c.out_channels, f, h, w)


# --------------------------------------------------------------------------------------------------- state dicts


def is_hunyuan_video15(sd: Mapping[str, object], prefix: str = "") -> bool:
    """Whether a state dict (or its keys) holds a HunyuanVideo 1.5 transformer, in the files' / Tencent's layout or
    diffusers'. Told from HunyuanVideo 1.0 and HunyuanImage 2.1 (which share `txt_in` and `double_blocks` and have
    `single_blocks`) by `cond_type_embedding` (diffusers: `cond_type_embed`) and no single blocks."""
    if f"{prefix}cond_type_embedding.weight" in sd:
        return (f"{prefix}txt_in.individual_token_refiner.blocks.0.norm1.weight" in sd
                and f"{prefix}single_blocks.0.linear1.weight" not in sd)
    return f"{prefix}cond_type_embed.weight" in sd and f"{prefix}context_embedder.proj_in.weight" in sd


def _count(sd: Mapping[str, Tensor], pattern: re.Pattern) -> int:
    return len({int(m[1]) for k in sd if (m := pattern.match(k))})


def config_from_state_dict(sd: Mapping[str, Tensor], prefix: str = "") -> HunyuanVideo15Config:
    """The shape of a HunyuanVideo 1.5 transformer (the files' layout, under `prefix`) from its tensor shapes; the
    RoPE split is `rope_axes_for` the head width (not in the weights)."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith("guidance_in.") for k in sd):
        raise ValueError("a HunyuanVideo transformer with a guidance embedding: not HunyuanVideo 1.5")
    try:
        patch = sd["img_in.proj.weight"]
        hidden, in_channels = patch.shape[:2]
        head_dim = sd["double_blocks.0.img_attn_q_norm.weight"].shape[0]
        byt5 = sd.get("byt5_in.fc1.weight")
        image = sd.get("vision_in.proj.0.weight")
        config = HunyuanVideo15Config(
            in_channels=in_channels,
            out_channels=sd["final_layer.linear.weight"].shape[0] // math.prod(patch.shape[2:]),
            hidden_size=hidden, num_heads=hidden // head_dim, depth=_count(sd, _DOUBLE),
            refiner_depth=_count(sd, _REFINER), mlp_ratio=sd["double_blocks.0.img_mlp.fc1.weight"].shape[0] / hidden,
            patch_size=tuple(patch.shape[2:]), text_dim=sd["txt_in.input_embedder.weight"].shape[1],
            byt5_dim=None if byt5 is None else byt5.shape[1],
            byt5_hidden=HUNYUAN_VIDEO15.byt5_hidden if byt5 is None else byt5.shape[0],
            image_dim=None if image is None else image.shape[0], rope_axes=rope_axes_for(head_dim),
            meanflow="time_r_in.mlp.0.weight" in sd)
    except KeyError as e:
        raise ValueError(f"an incomplete HunyuanVideo 1.5 transformer: no weight {e}") from None
    return config


# diffusers' names -> the files': whole-key prefixes, then (inside blocks) suffixes; a target with an index is one
# third of a fused q/k/v.
_DIFFUSERS_TOP = (
    ("time_embed.timestep_embedder.linear_1.", "time_in.mlp.0."),
    ("time_embed.timestep_embedder.linear_2.", "time_in.mlp.2."),
    ("time_embed.timestep_embedder_r.linear_1.", "time_r_in.mlp.0."),
    ("time_embed.timestep_embedder_r.linear_2.", "time_r_in.mlp.2."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1.", "txt_in.t_embedder.mlp.0."),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2.", "txt_in.t_embedder.mlp.2."),
    ("context_embedder.time_text_embed.text_embedder.", "txt_in.c_embedder."),
    ("context_embedder.proj_in.", "txt_in.input_embedder."),
    ("context_embedder.token_refiner.refiner_blocks.", "txt_in.individual_token_refiner.blocks."),
    ("context_embedder_2.norm.", "byt5_in.layernorm."),
    ("context_embedder_2.linear_1.", "byt5_in.fc1."),
    ("context_embedder_2.linear_2.", "byt5_in.fc2."),
    ("context_embedder_2.linear_3.", "byt5_in.fc3."),
    ("image_embedder.norm_in.", "vision_in.proj.0."),
    ("image_embedder.linear_1.", "vision_in.proj.1."),
    ("image_embedder.linear_2.", "vision_in.proj.3."),
    ("image_embedder.norm_out.", "vision_in.proj.4."),
    ("x_embedder.proj.", "img_in.proj."),
    ("cond_type_embed.", "cond_type_embedding."),
    ("transformer_blocks.", "double_blocks."),
    ("norm_out.linear.", "final_layer.adaLN_modulation.1."),
    ("proj_out.", "final_layer.linear."),
)
_DIFFUSERS_BLOCK: dict[str, tuple[str, int | None]] = {
    "norm1.linear.": ("img_mod.linear.", None), "norm1_context.linear.": ("txt_mod.linear.", None),
    "attn.to_q.": ("img_attn_qkv.", 0), "attn.to_k.": ("img_attn_qkv.", 1), "attn.to_v.": ("img_attn_qkv.", 2),
    "attn.add_q_proj.": ("txt_attn_qkv.", 0), "attn.add_k_proj.": ("txt_attn_qkv.", 1),
    "attn.add_v_proj.": ("txt_attn_qkv.", 2), "attn.norm_q.": ("img_attn_q_norm.", None),
    "attn.norm_k.": ("img_attn_k_norm.", None), "attn.norm_added_q.": ("txt_attn_q_norm.", None),
    "attn.norm_added_k.": ("txt_attn_k_norm.", None), "attn.to_out.0.": ("img_attn_proj.", None),
    "attn.to_add_out.": ("txt_attn_proj.", None), "ff.net.0.proj.": ("img_mlp.fc1.", None),
    "ff.net.2.": ("img_mlp.fc2.", None), "ff_context.net.0.proj.": ("txt_mlp.fc1.", None),
    "ff_context.net.2.": ("txt_mlp.fc2.", None)}
_DIFFUSERS_REFINER: dict[str, tuple[str, int | None]] = {
    "attn.to_q.": ("self_attn_qkv.", 0), "attn.to_k.": ("self_attn_qkv.", 1), "attn.to_v.": ("self_attn_qkv.", 2),
    "attn.to_out.0.": ("self_attn_proj.", None), "ff.net.0.proj.": ("mlp.fc1.", None),
    "ff.net.2.": ("mlp.fc2.", None), "norm_out.linear.": ("adaLN_modulation.1.", None)}
_BLOCK_KEY = re.compile(r"(double_blocks\.\d+\.|txt_in\.individual_token_refiner\.blocks\.\d+\.)(.*)")
_SPLIT_QKV = re.compile(r"(double_blocks\.\d+\.(?:img|txt)_attn_)([qkv])\.(weight|bias)")


def _diffusers_name(key: str) -> tuple[str, int | None]:
    """A diffusers key's name in the files' layout, and which third of a fused q/k/v it is (None: whole)."""
    for old, new in _DIFFUSERS_TOP:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    block = _BLOCK_KEY.fullmatch(key)
    if block is None:
        return key, None
    table = _DIFFUSERS_BLOCK if block[1].startswith("double") else _DIFFUSERS_REFINER
    for old, (new, index) in table.items():
        if block[2].startswith(old):
            return block[1] + new + block[2][len(old):], index
    return key, None


def convert_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A HunyuanVideo 1.5 transformer's weights in the files' layout (bare keys) from that layout (returned as it
    is), Tencent's release (each stream's q, k, v apart: fused) or diffusers' (renamed, q/k/v fused, the output
    modulation's (scale, shift) swapped to (shift, scale))."""
    diffusers = "cond_type_embed.weight" in sd
    out: dict[str, Tensor] = {}
    thirds: dict[str, list[Tensor | None]] = {}
    for key, value in sd.items():
        if diffusers:
            name, index = _diffusers_name(key)
            if name.startswith("final_layer.adaLN_modulation."):
                value = torch.cat(value.chunk(2)[::-1])
        elif split := _SPLIT_QKV.fullmatch(key):
            name, index = f"{split[1]}qkv.{split[3]}", "qkv".index(split[2])
        else:
            name, index = key, None
        if index is None:
            out[name] = value
        else:
            thirds.setdefault(name, [None] * 3)[index] = value
    for name, parts in thirds.items():
        if any(p is None for p in parts):
            raise ValueError(f"{name}: q, k and v are not all there")
        out[name] = torch.cat(parts)
    return out


@torch.no_grad()
def randomize(model: HunyuanVideo15, seed: int = 0) -> HunyuanVideo15:
    """Random weights of useful size, in place: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), the
    rest ~ N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2 and not isinstance(module, nn.Embedding):
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif name == "weight" and isinstance(module, (nn.LayerNorm, RMSNorm)):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def tiny_state_dict(seed: int = 0, config: HunyuanVideo15Config | None = None) -> dict[str, Tensor]:
    """Random weights (`randomize`) of a HunyuanVideo 1.5 (default `tiny_config()`) in the files' layout."""
    model = randomize(HunyuanVideo15(config or tiny_config()), seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}
