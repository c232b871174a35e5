"""The Z-Image diffusion transformer (Tongyi-MAI's 6B single-stream "S3-DiT", 2025: Z-Image and Z-Image-Turbo);
attribute names follow ComfyUI's repackaged single file (z_image_turbo_bf16.safetensors), which are the released
checkpoint's (Lumina 2's NextDiT names: fused `attention.qkv`, `feed_forward.w1/w2/w3`, `adaLN_modulation`).

A rectified-flow transformer over Flux's 16-channel latents [B, 16, H, W]: 2x2 patches (each patch's values
row, column, then channel) become image tokens and the Qwen3-4B prompt states [B, L, 2560] are RMS-normalised and
projected to text tokens; each stream is padded with its learned pad token to a multiple of 32 tokens and refined
on its own (`noise_refiner`: the image, modulated by the timestep; `context_refiner`: the text, unmodulated), then
`layers` run one self-attention over [image, text] together (diffusers' order; ComfyUI's [text, image] gives
the same, the positions going with the tokens and nothing masked). Every block is pre- and post-normalised (RMS norms
around attention and the SwiGLU MLP), its modulation a scale and a tanh gate per branch.

The noise level enters as (1 - sigma) * 1000 (Lumina's convention: 0 is noise) and the output is negated, so that
the model predicts the velocity noise - data like Loom's other flow models (diffusers' ZImagePipeline passes
(1000 - t) / 1000 and negates; ComfyUI's NextDiT does both inside).

Positions (3-axis RoPE, theta 256, axes 32 / 48 / 48 of a 128-wide head): text token j at (1 + j, 0, 0), its pad
tokens numbered on; image patch (row, col) at (Lt + 1, row, col), Lt the padded text length, and the image's pad
tokens at (0, 0, 0) (diffusers' and ComfyUI's placement alike). The angles are computed as the reference does
(float64 products rounded to float32, then cos / sin in float32).

Only the prompt's real tokens are used, as diffusers' pipeline keeps them (`attn_mask`, 1 for each real token);
a batch whose prompts have different real tokens runs one sample at a time. (ComfyUI ignores the mask: its single
prompts carry no padding, so the two agree; a batch of prompts padded to one length would differ there.)

A copy patched with Fun ControlNets (`ldm.controlnet_z_image.with_fun_control`) adds their hints after the noise
refiner's and the main layers; the model itself runs without any.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.flux import apply_rope, pad_to_patch
from ldm.qwen_image import RMSNorm
from ldm.unet import timestep_embedding

STANDARD_AXES = (32, 48, 48)  # the released model's RoPE split of its 128-wide heads
THETA = 256.0
TIME_SCALE = 1000.0
PAD_MULTIPLE = 32  # each stream is padded with its pad token to a multiple of this many tokens
_LAYER = re.compile(r"layers\.(\d+)\.")
_REFINER = re.compile(r"noise_refiner\.(\d+)\.")
# Z-Image variants whose extra inputs change what the model computes; their files are refused by name.
VARIANTS = {"siglip_embedder.1.weight": "Z-Image-Omni (image-conditioned)",
            "__ming_image__": "Ming-Image", "clip_text_pooled_proj.1.weight": "NewBie"}
# Weights some files carry that the model never uses (Lumina 2's final RMS norm, dropped by ComfyUI and diffusers).
UNUSED = ("norm_final.weight",)


@dataclass(frozen=True)
class ZImageConfig:
    """Shape of a Z-Image transformer (defaults: the released 6B model)."""

    num_layers: int = 30
    num_refiner_layers: int = 2
    num_heads: int = 30
    head_dim: int = 128
    in_channels: int = 16
    patch_size: int = 2
    cap_feat_dim: int = 2560  # Qwen3-4B's hidden size
    ffn_hidden: int = 10240
    t_hidden: int = 1024  # the timestep MLP's width
    adaln_dim: int = 256  # the timestep embedding's width, min(dim, 256)
    axes_dim: tuple[int, int, int] = STANDARD_AXES
    eps: float = 1e-5

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def context_dim(self) -> int:
        """The prompt states' width (the text encoder's hidden size: Qwen3-4B's for Z-Image)."""
        return self.cap_feat_dim

    @property
    def num_kv_heads(self) -> int:
        """Key / value heads: as many as query heads (Lumina 2's config, `ldm.lumina2`, has fewer)."""
        return self.num_heads

    @property
    def silu_modulation(self) -> bool:
        """Whether each block's modulation applies a SiLU before its linear layer (Lumina 2's does)."""
        return False


class Attention(nn.Module):
    """Self-attention with the fused q / k / v projection (queries, then keys, then values; Lumina 2 has fewer key /
    value heads, each shared by a group of consecutive query heads)."""

    def __init__(self, c: ZImageConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv = nn.Linear(c.dim, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=False)
        self.out = nn.Linear(c.num_heads * c.head_dim, c.dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(c.head_dim, c.eps), RMSNorm(c.head_dim, c.eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        kv = self.kv_heads * self.head_dim
        q, k, v = (part.unflatten(-1, (-1, self.head_dim))  # each [B, L, heads, head_dim]
                   for part in self.qkv(x).split([self.heads * self.head_dim, kv, kv], dim=-1))
        q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)
        q, k, v = apply_rope(q, *rope), apply_rope(k, *rope), v.transpose(1, 2)
        if self.kv_heads != self.heads:
            group = self.heads // self.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return _finite16(self.out(out.transpose(1, 2).flatten(2)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return _finite16(self.w2(_finite16(F.silu(self.w1(x)) * self.w3(x))))


def _finite16(x: Tensor) -> Tensor:
    """fp16 activations with inf / nan replaced by the largest finite values (0 for nan), as ComfyUI keeps a 6B
    model's fp16 runs from overflowing; other dtypes as they are."""
    return torch.nan_to_num(x, nan=0.0, posinf=65504.0, neginf=-65504.0) if x.dtype == torch.float16 else x


class ZImageBlock(nn.Module):
    """A pre- and post-normalised transformer block; with `modulation`, the timestep embedding scales each
    branch's input (1 + scale) and gates its output (tanh)."""

    def __init__(self, c: ZImageConfig, modulation: bool = True):
        super().__init__()
        self.attention = Attention(c)
        self.feed_forward = FeedForward(c.dim, c.ffn_hidden)
        self.attention_norm1, self.attention_norm2 = RMSNorm(c.dim, c.eps), RMSNorm(c.dim, c.eps)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(c.dim, c.eps), RMSNorm(c.dim, c.eps)
        if modulation:
            linear = nn.Linear(c.adaln_dim, 4 * c.dim)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), linear) if c.silu_modulation else nn.Sequential(linear)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], temb: Tensor | None = None) -> Tensor:
        if temb is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(temb)[:, None].chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, c: ZImageConfig):
        super().__init__()
        self.linear = nn.Linear(c.dim, c.patch_size**2 * c.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.adaln_dim, c.dim))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale = self.adaLN_modulation(temb)[:, None]
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale))


class TimestepEmbedder(nn.Module):
    def __init__(self, c: ZImageConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, c.t_hidden), nn.SiLU(), nn.Linear(c.t_hidden, c.adaln_dim))

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.mlp(timestep_embedding(t, 256).to(dtype))


def rope_angles(ids: Tensor, axes_dim: tuple[int, ...], theta: float = THETA) -> tuple[Tensor, Tensor]:
    """(cos, sin) [L, head_dim/2] float32 for integer positions `ids` [L, 3]: per axis, position * theta^(-2j/d)
    in float64, rounded to float32 before cos / sin, as the reference's tables are."""
    precise = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=precise, device=ids.device) / dim)
        angles.append((ids[:, axis].to(precise)[:, None] * omega).float())
    both = torch.cat(angles, dim=-1)
    return both.cos(), both.sin()


def real_tokens(context: Tensor, mask: Tensor) -> Tensor:
    """The prompt's real tokens [B, n, D] by a mask [L] shared by the batch; an all-padding prompt keeps all its
    tokens, as ComfyUI, which ignores the mask, does."""
    return context[:, mask] if mask.any() else context


def _padded(n: int) -> int:
    return n + (-n) % PAD_MULTIPLE


def _with_pad(x: Tensor, token: Tensor) -> Tensor:
    """Tokens [B, n, dim] followed by the pad token up to a multiple of PAD_MULTIPLE."""
    extra = _padded(x.shape[1]) - x.shape[1]
    return torch.cat([x, token.to(x.dtype)[None].expand(x.shape[0], extra, -1)], dim=1) if extra else x


def position_ids(text_tokens: int, rows: int, cols: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The RoPE positions of the padded text [Lt, 3] and of the padded image [N, 3] (the module docstring's)."""
    lt = _padded(text_tokens)
    text = torch.zeros(lt, 3, dtype=torch.long, device=device)
    text[:, 0] = torch.arange(1, lt + 1, device=device)
    image = torch.zeros(_padded(rows * cols), 3, dtype=torch.long, device=device)
    image[: rows * cols, 0] = lt + 1
    image[: rows * cols, 1] = torch.arange(rows, device=device).repeat_interleave(cols)
    image[: rows * cols, 2] = torch.arange(cols, device=device).repeat(rows)
    return text, image


class NextDiT(nn.Module):
    """What Z-Image and Lumina 2 (ldm.lumina2) share: the modules under Lumina 2's NextDiT names and the entry
    (the input checks, the prompt's real tokens by its mask, one frame of 5-D latents); each subclass computes
    `_forward` on the real tokens, and names its model and text encoder in errors."""

    model_name = "Z-Image"
    text_encoder_name = "Qwen3-4B"

    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.config = c = config
        self.x_embedder = nn.Linear(c.patch_size**2 * c.in_channels, c.dim)
        self.noise_refiner = nn.ModuleList([ZImageBlock(c) for _ in range(c.num_refiner_layers)])
        self.context_refiner = nn.ModuleList([ZImageBlock(c, modulation=False) for _ in range(c.num_refiner_layers)])
        self.t_embedder = TimestepEmbedder(c)
        self.cap_embedder = nn.Sequential(RMSNorm(c.cap_feat_dim, c.eps), nn.Linear(c.cap_feat_dim, c.dim))
        self.layers = nn.ModuleList([ZImageBlock(c) for _ in range(c.num_layers)])
        self.final_layer = FinalLayer(c)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from the prompt's RMS norm, which fp8 weight storage (ldm.quant) leaves as is."""
        return self.cap_embedder[0].weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """Predict the velocity (noise - data) of latents `x` [B, 16, H, W] (or [B, 16, 1, H, W], returned in the
        same rank) at flow levels `timesteps` [B] (sigma, 0..1) given the text encoder's prompt states `context`
        [B, L, context_dim]; `attn_mask` [B, L] (1 = a real token) keeps the real tokens only. `y` is accepted for
        the sampler's common call and unused (neither model has a pooled prompt)."""
        c, name = self.config, self.model_name
        video = x.ndim == 5
        if video:
            if x.shape[2] != 1:
                raise ValueError(f"{name} makes images: latents of {x.shape[2]} frames; it takes one")
            x = x[:, :, 0]
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"{name} takes latents [B, {c.in_channels}, H, W] (Flux's VAE); got {list(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != c.context_dim:
            raise ValueError(f"{name} takes {self.text_encoder_name} prompt states [B, L, {c.context_dim}]; got "
                             f"{list(context.shape)} (a prompt from another text encoder?)")
        t = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps.reshape(-1)
        context = context.expand(x.shape[0], -1, -1) if context.shape[0] == 1 else context
        extra = self._per_sample_inputs(x)
        if attn_mask is not None:
            mask = self._mask(attn_mask, context.shape[:2])
            if not (mask == mask[:1]).all():  # prompts with different real tokens: one sample at a time
                out = torch.cat([self._forward(x[i:i + 1], t[i:i + 1], real_tokens(context[i:i + 1], mask[i]),
                                               *(e[i:i + 1] for e in extra)) for i in range(x.shape[0])])
                return out[:, :, None] if video else out
            context = real_tokens(context, mask[0])
        out = self._forward(x, t, context, *extra)
        return out[:, :, None] if video else out

    def _per_sample_inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """Inputs [B, ...] beyond the latents `x` (4-D), timesteps and prompt that `_forward` takes after them, one
        row per sample, sliced with the batch when it runs one sample at a time: none here (ZImageModel's are its
        Fun ControlNets' control contexts)."""
        return ()

    def _forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _mask(attn_mask: Tensor, text_shape: torch.Size) -> Tensor:
        """The prompt's attention mask [B, L] as bools (one row for the whole batch spread to it)."""
        batch, length = text_shape
        if attn_mask.ndim != 2 or attn_mask.shape[1] != length or attn_mask.shape[0] not in (1, batch):
            raise ValueError(f"a prompt attention mask of shape {list(attn_mask.shape)} for a prompt of {length} "
                             f"tokens (batch {batch}): it takes [B, {length}], 1 for each real token")
        return attn_mask.to(torch.bool).expand(batch, -1)


def patch_tokens(x: Tensor, p: int) -> Tensor:
    """Latents [B, C, H, W] (H, W multiples of `p`) -> patch tokens [B, H/p * W/p, p * p * C], row by row, each
    patch's values (row, column, channel): the reference's order."""
    b, ch, hh, ww = x.shape
    return x.reshape(b, ch, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (hh // p) * (ww // p), -1)


class FunControl(Protocol):
    """A Fun ControlNet bound to a patched ZImageModel (`ldm.controlnet_z_image.with_fun_control`), as the model
    calls it: its control context for the latents, then its hints for the noise refiner's layers and the main ones
    (each scaled by its strength)."""

    def context(self, x: Tensor) -> Tensor: ...

    def refiner_stage(self, control: Tensor, img: Tensor, rope: tuple[Tensor, Tensor], temb: Tensor,
                      pad_token: Tensor) -> tuple[Tensor, dict[int, Tensor]]: ...

    def layer_hints(self, control: Tensor, txt: Tensor, joint: Tensor, rope: tuple[Tensor, Tensor],
                    temb: Tensor) -> Iterator[tuple[int, Tensor]]: ...


class ZImageModel(NextDiT):
    # The Fun ControlNets of a patched copy (`ldm.controlnet_z_image.with_fun_control`), applied in this order; the
    # model itself has none and computes exactly as without them.
    fun_controls: tuple[FunControl, ...] = ()

    def __init__(self, config: ZImageConfig):
        super().__init__(config)
        self.x_pad_token = nn.Parameter(torch.zeros(1, config.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, config.dim))

    def _per_sample_inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(control.context(x) for control in self.fun_controls)

    def _forward(self, x: Tensor, t: Tensor, context: Tensor, *controls: Tensor) -> Tensor:
        """The velocity; `controls` are the control contexts [B, control_in_dim, H, W] of `fun_controls`."""
        c, dtype = self.config, self.dtype
        p = c.patch_size
        h, w = x.shape[-2:]
        padded = pad_to_patch(x, p).to(dtype)
        b, ch, hh, ww = padded.shape
        rows, cols = hh // p, ww // p
        tokens = patch_tokens(padded, p)
        temb = self.t_embedder((1 - t.float()) * TIME_SCALE, dtype)
        img = _with_pad(self.x_embedder(tokens), self.x_pad_token)
        txt = _with_pad(self.cap_embedder(context.to(dtype)), self.cap_pad_token)
        text_ids, image_ids = position_ids(context.shape[1], rows, cols, x.device)
        img_rope, txt_rope = rope_angles(image_ids, c.axes_dim), rope_angles(text_ids, c.axes_dim)
        # each Fun ControlNet's control tokens after its refiner stage, and its hints for the noise refiner
        staged = [fun.refiner_stage(control, img, img_rope, temb, self.x_pad_token)
                  for fun, control in zip(self.fun_controls, controls, strict=True)]
        for i, block in enumerate(self.noise_refiner):
            img = block(img, img_rope, temb)
            for _, hints in staged:
                img = img + hints[i] if i in hints else img
        for block in self.context_refiner:
            txt = block(txt, txt_rope)
        joint = torch.cat([img, txt], dim=1)
        rope = tuple(torch.cat(pair) for pair in zip(img_rope, txt_rope, strict=True))
        # the hints for the main layers, each computed when the one before it has been added
        streams = [fun.layer_hints(control, txt, joint, rope, temb)
                   for fun, (control, _) in zip(self.fun_controls, staged, strict=True)]
        due = [next(stream, None) for stream in streams]
        for i, block in enumerate(self.layers):
            joint = block(joint, rope, temb)
            for k, stream in enumerate(streams):
                if due[k] is not None and due[k][0] == i:
                    joint = joint + due[k][1]
                    due[k] = next(stream, None)
        out = self.final_layer(joint[:, : rows * cols], temb)
        out = out.reshape(b, rows, cols, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, hh, ww)
        return -out[..., :h, :w].to(x.dtype)


def is_z_image(sd: Mapping[str, Tensor], prefix: str = "") -> bool:
    """Whether a state dict holds a Z-Image transformer in its released layout (under `prefix`): Lumina 2's names
    with the pad tokens only Z-Image has."""
    return all(f"{prefix}{k}" in sd for k in ("cap_pad_token", "x_pad_token", "cap_embedder.1.weight",
                                                "layers.0.attention.qkv.weight"))


def z_image_config_from_state_dict(sd: Mapping[str, Tensor], axes_dim: tuple[int, int, int] | None = None,
                                   prefix: str = "") -> ZImageConfig:
    """The exact shape of Z-Image weights (under `prefix`) from their key names and tensor shapes. The RoPE split
    of a head is not in the weights: `axes_dim`, else the released (32, 48, 48) for 128-wide heads."""
    for key, variant in VARIANTS.items():
        if f"{prefix}{key}" in sd:
            raise ValueError(f"a {variant} model: Loom runs the Z-Image text-to-image transformer, not this variant")
    try:
        dim, patch_values = sd[f"{prefix}x_embedder.weight"].shape
        head_dim = sd[f"{prefix}layers.0.attention.q_norm.weight"].shape[0]
        if sd[f"{prefix}layers.0.attention.qkv.weight"].shape[0] != 3 * dim:
            raise ValueError("its attention has fewer key / value heads than query heads, which Z-Image's does not")
        if axes_dim is None:
            if head_dim != sum(STANDARD_AXES):
                raise ValueError(f"its heads are {head_dim} wide, not the released model's 128, and the file does "
                                 "not say how RoPE splits them (loom.z_image_axes metadata)")
            axes_dim = STANDARD_AXES
        if sum(axes_dim) != head_dim:
            raise ValueError(f"a RoPE split {tuple(axes_dim)} for {head_dim}-wide heads")
        adaln_dim, t_hidden = sd[f"{prefix}t_embedder.mlp.2.weight"].shape
        return ZImageConfig(
            num_layers=len({int(m[1]) for k in sd if (m := _LAYER.match(k[len(prefix):]))}),
            num_refiner_layers=len({int(m[1]) for k in sd if (m := _REFINER.match(k[len(prefix):]))}),
            num_heads=dim // head_dim, head_dim=head_dim, in_channels=patch_values // 4,
            cap_feat_dim=sd[f"{prefix}cap_embedder.1.weight"].shape[1],
            ffn_hidden=sd[f"{prefix}layers.0.feed_forward.w1.weight"].shape[0], t_hidden=t_hidden,
            adaln_dim=adaln_dim, axes_dim=tuple(axes_dim))
    except KeyError as e:
        raise ValueError(f"an incomplete Z-Image transformer: no weight {e}") from None
