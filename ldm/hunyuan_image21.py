"""The HunyuanImage 2.1 transformer (Tencent's 17B text-to-image DiT, 2025) and its refiner; attribute names follow the
keys of the files ComfyUI users load (Comfy-Org's repackaged hunyuanimage2.1*.safetensors: Tencent's names with each
double block's q, k and v fused into `*_attn_qkv` and each single block's q, k, v and MLP input into `linear1`, bare
or under `model.diffusion_model.`; ComfyUI builds them with comfy/ldm/hunyuan_video/model.py's HunyuanVideo, whose
loader only renames keys, so its files must hold the fused weights). It
computes what diffusers' HunyuanImageTransformer2DModel computes; `convert_state_dict` also takes diffusers' keys and
Tencent's own release (`img_attn_q/_k/_v`, `linear1_q/_k/_v/_mlp`, `linear2.fc`).

The family is HunyuanVideo 1.5's (ldm.hunyuan_video15, whose layers it imports) with single-stream blocks added:
- The latent becomes tokens through a convolution of kernel = stride = the patch (`img_in`, 1x1 in every release), row
  by row: the text-to-image models take the 64-channel, 32x VAE's latent [B, 64, H, W] (2-D patch, 2-D RoPE); the
  refiner a video-shaped [B, 128, F, H, W] (3-D patch 1x1x1, 3-D RoPE): the 64-channel noisy latent followed by the
  64-channel condition latent (ComfyUI's HunyuanImage21Refiner: the image to refine, x 0.75 or noise-augmented; F = 1
  for one image in diffusers' refiner pipeline). Out come 64 channels (a velocity), shaped as the input.
- The conditioning vector is the timestep's embedding (`time_in`: the 0..1000 timestep, sinusoidal, 256 wide, then an
  MLP). The distilled model has MeanFlow's `time_r_in` for the step's end time `timesteps_r`, averaged in:
  (vec + vec_r) / 2 (diffusers, and ComfyUI's meanflow_sum False), and, like the refiner, a guidance embedding
  (`guidance_in`, same kind as `time_in`) added on.
- The context is the prompt's Qwen2.5-VL states [B, L, 3584] refined by two self-attention blocks modulated by the
  timestep and the prompt's mean over its valid tokens (`txt_in`), and, when the prompt has quoted text, its byT5
  glyph states [B, L2, 1472] (`byt5_in`; the text-to-image models only). No type embedding, and no positions: text
  tokens are not rotated, so their order does not matter; valid tokens come first (byT5, then prompt, as diffusers
  orders them) and padding is left out of every attention.
- 20 double-stream blocks (Flux's design: per-stream modulation, q/k/v with biases, per-head RMS norms of q and k,
  GELU (tanh) MLP, joint attention with the image tokens first), then 40 single-stream blocks on the joined sequence
  (one modulation; `linear1` makes q, k, v and the MLP input at once, `linear2` merges attention and MLP outputs).
  Only image tokens are rotated: theta 256, a 128-wide head split 64 / 64 (rows, columns) or, for the refiner,
  16 / 56 / 56 (frames, rows, columns), channels in adjacent pairs.
- The output layer is modulated (shift, scale) by the conditioning vector, then unpatchified.

Released shapes: base and distilled 3584 wide (28 heads of 128), 20 + 40 blocks, 64 -> 64 channels, byT5; the
distilled one adds `guidance_in` and `time_r_in`. The refiner: 3328 wide (26 heads), 20 + 40 blocks, 128 -> 64
channels, `guidance_in`, no byT5, no `time_r_in`.

`HunyuanImage21.forward` takes what diffusers' transformer takes: `timesteps` = sigma x 1000, `timesteps_r` = the next
sigma x 1000 (0 at the last step), `guidance` = the distilled guidance strength x 1000 (ComfyUI passes the bare
strength, default 6.0, and multiplies it by 1000 inside). Masked (padding) tokens are left out of attention as keys;
the outputs match diffusers' to ~1e-6 in float32 (tests/ldm/test_hunyuan_image21.py).
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
from ldm.hunyuan_video15 import (
    ByT5Mapper,
    DoubleStreamBlock,
    FinalLayer,
    HunyuanVideo15Config,
    Modulation,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    TokenRefiner,
    _attend,
    _diffusers_name,
    _heads,
    _modulate,
    _valid,
    randomize,
    rope_axes_for,
)

_DOUBLE = re.compile(r"double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_blocks\.(\d+)\.")
_REFINER = re.compile(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.")


@dataclass(frozen=True)
class HunyuanImage21Config:
    in_channels: int = 64
    out_channels: int = 64
    hidden_size: int = 3584
    num_heads: int = 28
    depth: int = 20  # double-stream blocks
    depth_single: int = 40
    refiner_depth: int = 2
    mlp_ratio: float = 4.0
    patch_size: tuple[int, ...] = (1, 1)  # (rows, cols); the refiner's (frames, rows, cols)
    text_dim: int = 3584  # Qwen2.5-VL 7B's hidden states
    byt5_dim: int | None = 1472  # Glyph-SDXL-v2's byT5 states; None: no `byt5_in`
    byt5_hidden: int = 2048
    guidance_embed: bool = False  # `guidance_in`: the distilled model and the refiner
    meanflow: bool = False  # `time_r_in`: the distilled model
    rope_axes: tuple[int, ...] = (64, 64)
    rope_theta: int = 256

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

    @property
    def refiner(self) -> bool:
        """Whether this is the refiner's shape: a video-like [B, C, F, H, W] input (3-D patch)."""
        return len(self.patch_size) == 3

    @property
    def layers(self) -> HunyuanVideo15Config:
        """The shapes ldm.hunyuan_video15's layers read (its patch written 3-D: a 2-D patch with 1 frame)."""
        return HunyuanVideo15Config(
            in_channels=self.in_channels, out_channels=self.out_channels, hidden_size=self.hidden_size,
            num_heads=self.num_heads, depth=self.depth, refiner_depth=self.refiner_depth, mlp_ratio=self.mlp_ratio,
            patch_size=(1,) * (3 - len(self.patch_size)) + tuple(self.patch_size), text_dim=self.text_dim,
            byt5_dim=self.byt5_dim, byt5_hidden=self.byt5_hidden, image_dim=None, meanflow=self.meanflow)


HUNYUAN_IMAGE21 = HunyuanImage21Config()
HUNYUAN_IMAGE21_DISTILLED = replace(HUNYUAN_IMAGE21, guidance_embed=True, meanflow=True)
HUNYUAN_IMAGE21_REFINER = HunyuanImage21Config(
    in_channels=128, hidden_size=3328, num_heads=26, patch_size=(1, 1, 1), byt5_dim=None, guidance_embed=True,
    rope_axes=(16, 56, 56))


def image_rope_axes(dims: int, head_dim: int) -> tuple[int, ...]:
    """The RoPE split of a head: halves for a 2-D latent (64 / 64 of 128), HunyuanVideo's for a 3-D one."""
    return (head_dim // 2, head_dim // 2) if dims == 2 else rope_axes_for(head_dim)


def tiny_config(**changes: object) -> HunyuanImage21Config:
    """A small HunyuanImage 2.1 (width 64, 2 heads, 2 + 2 blocks, 1 refiner block) with the real channel counts and
    condition widths, for tests; `refiner_tiny_config` for the refiner's shape."""
    base = HunyuanImage21Config(hidden_size=64, num_heads=2, depth=2, depth_single=2, refiner_depth=1,
                                rope_axes=image_rope_axes(2, 32))
    return replace(base, **changes)


def refiner_tiny_config(**changes: object) -> HunyuanImage21Config:
    """`tiny_config` in the refiner's shape: 128 -> 64 channels, 3-D patch, guidance, no byT5."""
    return tiny_config(**{"in_channels": 128, "patch_size": (1, 1, 1), "byt5_dim": None, "guidance_embed": True,
                          "rope_axes": image_rope_axes(3, 32), **changes})


# -------------------------------------------------------------------------------------------------------- layers


class PatchEmbed2d(nn.Module):
    """`img_in` of a 2-D latent (ldm.hunyuan_video15.PatchEmbed is the 3-D one, used for the refiner)."""

    def __init__(self, c: HunyuanImage21Config):
        super().__init__()
        self.proj = nn.Conv2d(c.in_channels, c.hidden_size, c.patch_size, stride=c.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SingleStreamBlock(nn.Module):
    """Attention and a GELU (tanh) MLP in parallel on the joined sequence (image tokens first, rotated)."""

    def __init__(self, c: HunyuanImage21Config):
        super().__init__()
        self.heads, self.hidden, self.mlp_dim = c.num_heads, c.hidden_size, c.mlp_dim
        self.linear1 = nn.Linear(c.hidden_size, 3 * c.hidden_size + c.mlp_dim)
        self.linear2 = nn.Linear(c.hidden_size + c.mlp_dim, c.hidden_size)
        self.q_norm = RMSNorm(c.head_dim)
        self.k_norm = RMSNorm(c.head_dim)
        self.modulation = Modulation(c.hidden_size, 3)

    def forward(self, x: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor], image_tokens: int,
                mask: Tensor | None) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(_modulate(x, shift, scale)).split([3 * self.hidden, self.mlp_dim], dim=-1)
        q, k, v = (_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        q, k = (torch.cat([apply_rope(t[:, :, :image_tokens], *rope), t[:, :, image_tokens:]], dim=2)
                for t in (self.q_norm(q), self.k_norm(k)))
        return x + self.linear2(torch.cat([_attend(q, k, v, mask), F.gelu(mlp, approximate="tanh")], dim=-1)) * gate


# --------------------------------------------------------------------------------------------------------- model


def _grid_ids(grid: tuple[int, ...], device: torch.device) -> Tensor:
    """The RoPE positions [prod(grid), len(grid)] of the patches, in token order."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def _valid_first(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """Each row's valid tokens first (in order), cut to the longest row's valid count; the mask (None: all valid)."""
    if bool(mask.all()):
        return tokens, None
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)[:, :int(mask.sum(dim=1).max())]
    tokens = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    mask = mask.gather(1, order)
    return tokens, None if bool(mask.all()) else mask


class HunyuanImage21(nn.Module):
    def __init__(self, config: HunyuanImage21Config = HUNYUAN_IMAGE21):
        super().__init__()
        self.config = c = config
        if c.head_dim * c.num_heads != c.hidden_size or sum(c.rope_axes) != c.head_dim:
            raise ValueError(f"width {c.hidden_size} with {c.num_heads} heads does not fit RoPE axes {c.rope_axes}")
        if len(c.patch_size) != len(c.rope_axes) or len(c.patch_size) not in (2, 3):
            raise ValueError(f"patch {c.patch_size} and RoPE axes {c.rope_axes}: both 2-D or both 3-D")
        layers = c.layers
        self.img_in = PatchEmbed(layers) if c.refiner else PatchEmbed2d(c)
        self.time_in = TimestepEmbedder(c.hidden_size)
        if c.meanflow:
            self.time_r_in = TimestepEmbedder(c.hidden_size)
        if c.guidance_embed:
            self.guidance_in = TimestepEmbedder(c.hidden_size)
        self.txt_in = TokenRefiner(layers)
        if c.byt5_dim is not None:
            self.byt5_in = ByT5Mapper(c.byt5_dim, c.byt5_hidden, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(layers) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c) for _ in range(c.depth_single))
        self.final_layer = FinalLayer(layers)

    def context_tokens(self, context: Tensor, timesteps: Tensor, context_mask: Tensor | None = None,
                       byt5: Tensor | None = None, byt5_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The context stream [B, L', hidden] and its validity mask [B, L'] (None: all valid): byT5 and prompt
        tokens, each batch row's valid ones first in that order, cut to the longest row's valid count."""
        batch, device = context.shape[0], context.device
        text_mask = _valid(context_mask, batch, context.shape[1], device)
        parts, masks = [], []
        if byt5 is not None:
            if self.config.byt5_dim is None:
                raise ValueError("this HunyuanImage 2.1 model (the refiner) has no byT5 input (byt5_in)")
            parts.append(self.byt5_in(byt5))
            masks.append(_valid(byt5_mask, batch, byt5.shape[1], device))
        parts.append(self.txt_in(context, timesteps, text_mask))
        masks.append(text_mask)
        if context_mask is None and (byt5 is None or byt5_mask is None):
            return torch.cat(parts, dim=1), None  # no mask given: no host read, so a CUDA graph can capture the call
        return _valid_first(torch.cat(parts, dim=1), torch.cat(masks, dim=1))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, context_mask: Tensor | None = None,
                byt5: Tensor | None = None, byt5_mask: Tensor | None = None, guidance: Tensor | None = None,
                timesteps_r: Tensor | None = None) -> Tensor:
        """x [B, in_channels, H, W] (the refiner: [B, in_channels, F, H, W]; sizes multiples of the patch),
        timesteps [B] in 0..1000, context [B, L, text_dim], byt5 [B, L2, byt5_dim] or None (no glyph text), masks
        [B, L] bool or 0/1 (None: all valid), guidance [B] the distilled strength x 1000 (required by models with
        `guidance_in`, ignored by others), timesteps_r [B] in 0..1000 (MeanFlow's step end; None: left out).
        Returns [B, out_channels, H, W] (the refiner: [B, out_channels, F, H, W])."""
        c = self.config
        if x.ndim != len(c.patch_size) + 2:
            raise ValueError(f"this HunyuanImage 2.1 model takes a {len(c.patch_size) + 2}-D latent, not "
                             f"{list(x.shape)}" + (" (the refiner: [B, C, frames, H, W])" if c.refiner else ""))
        if c.guidance_embed and guidance is None:
            raise ValueError("this guidance-distilled HunyuanImage 2.1 model needs a guidance strength (x 1000)")
        b, sizes = x.shape[0], tuple(x.shape[2:])
        grid = tuple(s // p for s, p in zip(sizes, c.patch_size, strict=True))
        img = self.img_in(x)
        vec = self.time_in(timesteps, img.dtype)
        if timesteps_r is not None and c.meanflow:
            vec = (vec + self.time_r_in(timesteps_r, img.dtype)) / 2
        if c.guidance_embed:
            vec = vec + self.guidance_in(guidance, img.dtype)
        txt, mask = self.context_tokens(context.to(img.dtype), timesteps, context_mask,
                                        None if byt5 is None else byt5.to(img.dtype), byt5_mask)
        n = img.shape[1]
        if mask is not None:
            mask = torch.cat([_valid(None, b, n, x.device), mask], dim=1)[:, None, None, :]
        rope = rope_angles(_grid_ids(grid, x.device), c.rope_axes, c.rope_theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, rope, mask)
        tokens = torch.cat([img, txt], dim=1)
        for block in self.single_blocks:
            tokens = block(tokens, vec, rope, n, mask)
        out = self.final_layer(tokens[:, :n], vec).reshape(b, *grid, c.out_channels, *c.patch_size)
        dims = len(grid)
        order = [0, dims + 1] + [i for d in range(dims) for i in (d + 1, dims + 2 + d)]
        return out.permute(*order).reshape(b, c.out_channels, *sizes)


# --------------------------------------------------------------------------------------------------- state dicts


def is_hunyuan_image21(sd: Mapping[str, object], prefix: str = "") -> bool:
    """Whether a state dict (or its keys) holds a HunyuanImage 2.1 transformer (base, distilled or refiner), in the
    files', Tencent's or diffusers' layout. Told from HunyuanVideo 1.0 (which shares `txt_in`, `double_blocks` and
    `single_blocks`) by its `vector_in`, and from HunyuanVideo 1.5 by single blocks and no `cond_type_embedding`."""
    if f"{prefix}txt_in.individual_token_refiner.blocks.0.norm1.weight" in sd:
        single = any(f"{prefix}single_blocks.0.{name}.weight" in sd for name in ("linear1", "linear1_q"))
        return (single and f"{prefix}cond_type_embedding.weight" not in sd
                and not any(k.startswith(f"{prefix}vector_in.") for k in sd))
    return (f"{prefix}time_guidance_embed.timestep_embedder.linear_1.weight" in sd
            and f"{prefix}context_embedder.proj_in.weight" in sd)


def _count(sd: Mapping[str, Tensor], pattern: re.Pattern) -> int:
    return len({int(m[1]) for k in sd if (m := pattern.match(k))})


def config_from_state_dict(sd: Mapping[str, Tensor], prefix: str = "") -> HunyuanImage21Config:
    """The shape of a HunyuanImage 2.1 transformer (the files' layout, under `prefix`) from its tensor shapes; the
    RoPE split is `image_rope_axes` (not in the weights)."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith(("vector_in.", "cond_type_embedding.")) for k in sd):
        raise ValueError("a HunyuanVideo 1.0 / 1.5 transformer, not HunyuanImage 2.1")
    try:
        patch = sd["img_in.proj.weight"]
        hidden, in_channels = patch.shape[:2]
        head_dim = sd["single_blocks.0.q_norm.weight"].shape[0]
        byt5 = sd.get("byt5_in.fc1.weight")
        config = HunyuanImage21Config(
            in_channels=in_channels,
            out_channels=sd["final_layer.linear.weight"].shape[0] // math.prod(patch.shape[2:]),
            hidden_size=hidden, num_heads=hidden // head_dim, depth=_count(sd, _DOUBLE),
            depth_single=_count(sd, _SINGLE), refiner_depth=_count(sd, _REFINER),
            mlp_ratio=(sd["single_blocks.0.linear2.weight"].shape[1] - hidden) / hidden,
            patch_size=tuple(patch.shape[2:]), text_dim=sd["txt_in.input_embedder.weight"].shape[1],
            byt5_dim=None if byt5 is None else byt5.shape[1],
            byt5_hidden=HUNYUAN_IMAGE21.byt5_hidden if byt5 is None else byt5.shape[0],
            guidance_embed="guidance_in.mlp.0.weight" in sd, meanflow="time_r_in.mlp.0.weight" in sd,
            rope_axes=image_rope_axes(patch.ndim - 2, head_dim))
    except KeyError as e:
        raise ValueError(f"an incomplete HunyuanImage 2.1 transformer: no weight {e}") from None
    return config


# diffusers' names -> the files': those ldm.hunyuan_video15 does not know (its `_diffusers_name` does the rest).
_DIFFUSERS_TOP = (
    ("time_guidance_embed.timestep_embedder.linear_1.", "time_in.mlp.0."),
    ("time_guidance_embed.timestep_embedder.linear_2.", "time_in.mlp.2."),
    ("time_guidance_embed.timestep_embedder_r.linear_1.", "time_r_in.mlp.0."),
    ("time_guidance_embed.timestep_embedder_r.linear_2.", "time_r_in.mlp.2."),
    ("time_guidance_embed.guidance_embedder.linear_1.", "guidance_in.mlp.0."),
    ("time_guidance_embed.guidance_embedder.linear_2.", "guidance_in.mlp.2."),
)
# Inside a single block; an index is the part of the fused `linear1` (q, k, v, MLP input).
_DIFFUSERS_SINGLE: dict[str, tuple[str, int | None]] = {
    "norm.linear.": ("modulation.linear.", None), "attn.to_q.": ("linear1.", 0), "attn.to_k.": ("linear1.", 1),
    "attn.to_v.": ("linear1.", 2), "proj_mlp.": ("linear1.", 3), "attn.norm_q.": ("q_norm.", None),
    "attn.norm_k.": ("k_norm.", None), "proj_out.": ("linear2.", None)}
_SINGLE_KEY = re.compile(r"single_transformer_blocks\.(\d+)\.(.*)")
_SPLIT_QKV = re.compile(r"(double_blocks\.\d+\.(?:img|txt)_attn_)([qkv])\.(weight|bias)")
_SPLIT_LINEAR1 = re.compile(r"(single_blocks\.\d+\.linear1)_(q|k|v|mlp)\.(weight|bias)")
_LINEAR2_FC = re.compile(r"(single_blocks\.\d+\.linear2)\.fc\.(weight|bias)")


def _diffusers_key(key: str) -> tuple[str, int | None]:
    """A diffusers key's name in the files' layout, and which part of a fused weight it is (None: whole)."""
    for old, new in _DIFFUSERS_TOP:
        if key.startswith(old):
            return new + key[len(old):], None
    if single := _SINGLE_KEY.fullmatch(key):
        for old, (new, index) in _DIFFUSERS_SINGLE.items():
            if single[2].startswith(old):
                return f"single_blocks.{single[1]}.{new}{single[2][len(old):]}", index
        return key, None
    return _diffusers_name(key)


def _tencent_key(key: str) -> tuple[str, int | None]:
    """A key of Tencent's release in the files' layout (q, k, v and the MLP input parts of fused weights)."""
    if split := _SPLIT_QKV.fullmatch(key):
        return f"{split[1]}qkv.{split[3]}", "qkv".index(split[2])
    if split := _SPLIT_LINEAR1.fullmatch(key):
        return f"{split[1]}.{split[3]}", ("q", "k", "v", "mlp").index(split[2])
    if fc := _LINEAR2_FC.fullmatch(key):
        return f"{fc[1]}.{fc[2]}", None
    return key, None


def convert_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A HunyuanImage 2.1 transformer's weights in the files' layout (bare keys) from that layout (returned as it
    is), Tencent's release (q, k, v and the single blocks' MLP input apart, `linear2.fc`: fused and renamed) or
    diffusers' (renamed, fused, the output modulation's (scale, shift) swapped to (shift, scale))."""
    diffusers = "time_guidance_embed.timestep_embedder.linear_1.weight" in sd
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, Tensor]] = {}
    for key, value in sd.items():
        name, index = _diffusers_key(key) if diffusers else _tencent_key(key)
        if diffusers and name.startswith("final_layer.adaLN_modulation."):
            value = torch.cat(value.chunk(2)[::-1])
        if index is None:
            out[name] = value
        else:
            parts.setdefault(name, {})[index] = value
    for name, pieces in parts.items():
        expected = 4 if ".linear1." in name else 3
        if sorted(pieces) != list(range(expected)):
            raise ValueError(f"{name}: not all of its {expected} fused parts are there")
        out[name] = torch.cat([pieces[i] for i in range(expected)])
    return out


def tiny_state_dict(seed: int = 0, config: HunyuanImage21Config | None = None) -> dict[str, Tensor]:
    """Random weights (ldm.hunyuan_video15.randomize) of a HunyuanImage 2.1 (default `tiny_config()`) in the files'
    layout."""
    model = randomize(HunyuanImage21(config or tiny_config()), seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}
