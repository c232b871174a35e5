"""The Wan 2.1 / 2.2 video diffusion transformer (Alibaba's); attribute names follow the original checkpoint keys.

A rectified-flow transformer over video latents [B, C, T, H, W]: a 3-D convolution cuts them into 1x2x2 patches
(tokens, frame by frame, row by row), and `num_layers` blocks each run self-attention over all the video's tokens
(3-D RoPE: a head's channels split between the frame, row and column axes), cross-attention to the UMT5 prompt
(padded with zeros to 512 tokens, as Wan's pipeline and ComfyUI's tokenizer pad it), and an MLP; every block is
modulated (shift, scale, gate) by the timestep's embedding. The noise level enters as t * 1000 (ComfyUI's CONST
sampling gives t in 0..1), one per video or, for Wan 2.2 5B's image-to-video, one per latent frame (the start
image's frame at 0), each frame's tokens modulated by their frame's.

Kinds, all told apart by the weights: text-to-video (Wan 2.1 1.3B / 14B, the Wan 2.2 14B experts); image-to-video
(`in_dim` 36: 4 mask channels and the start image's latent follow the noisy latent's 16), with, for Wan 2.1's i2v
and first-last-frame (FLF2V) models, an image branch (`img_emb`): CLIP vision states [B, 257, 1280] (FLF2V: the two
images' [B, 514, 1280], with learnt positions) projected to extra keys and values the cross-attention also reads
(`k_img`, `v_img`); Wan 2.2's 5B TI2V model, 48 channels in and out (its own VAE's latent space); Wan 2.1 VACE,
text-to-video with a control branch (`ldm.wan_vace`, through the `run_blocks` hook); Wan 2.1 / 2.2 Fun camera
control, image-to-video models with an adapter of the camera's rays (`ldm.wan_camera`, through the same hook); Wan
Fun models with a reference image input (`ref_conv`: its latent as one frame of tokens before the video's). Phantom
(subject-to-video) is text-to-video: its subject images' latent frames follow the video's along time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import UNET_PREFIX
from ldm.flux import RopeScale, apply_rope, rope_angles, scaled_axis

TEXT_LEN = 512  # UMT5 tokens Wan's prompts are padded to
HEAD_DIM = 128  # every released Wan model's head width (1.3B: 1536 / 12, 14B: 5120 / 40, 5B: 3072 / 24)
IMAGE_INPUTS = ("none", "i2v", "flf2v")
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_VACE_BLOCK = re.compile(r"vace_blocks\.(\d+)\.")
_CAMERA_BLOCK = re.compile(r"control_adapter\.residual_blocks\.(\d+)\.")
# Wan variants whose extra parts change what the model computes; their files are refused rather than half-run.
VARIANTS = {"casual_audio_encoder.": "S2V", "audio_injector.": "S2V", "motion_encoder.": "Animate",
            "face_adapter.": "Animate", "pose_patch_embedding.": "Animate", "audio_proj.": "HuMo"}


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan transformer (defaults: Wan 2.1 14B text-to-video). `image_input`: "none", "i2v" (an
    `img_emb` branch for CLIP vision states of `clip_dim`) or "flf2v" (the same with `flf_tokens` learnt positions
    for the first and last frames' states). `vace_layers`: for a VACE model (`ldm.wan_vace`), the main blocks its
    VACE blocks feed, one each, in order; `vace_in_dim` the channels of its control input. `camera_in_dim`: for a Fun
    camera model (`ldm.wan_camera`), the channels of its camera input per pixel (24), 0 for none; `camera_blocks` the
    residual blocks of its adapter. `ref_conv_in_dim`: for a Wan Fun model that takes a reference image (Wan 2.1 Fun
    V1.1, Wan 2.2 Fun), the channels of the reference latent its `ref_conv` cuts into tokens, 0 for none."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_input: str = "none"
    clip_dim: int = 1280
    flf_tokens: int = 514
    text_len: int = TEXT_LEN
    vace_layers: tuple[int, ...] = ()
    vace_in_dim: int = 96
    camera_in_dim: int = 0
    camera_blocks: int = 1
    ref_conv_in_dim: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads or self.head_dim < 6:
            raise ValueError(f"a width of {self.dim} does not split into {self.num_heads} heads Wan's RoPE can use")
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input {self.image_input!r}: one of {', '.join(IMAGE_INPUTS)}")
        if self.vace_layers and (self.vace_layers[0] != 0 or list(self.vace_layers) != sorted(set(self.vace_layers))
                                 or self.vace_layers[-1] >= self.num_layers or self.image_input != "none"):
            raise ValueError(f"VACE blocks feeding blocks {list(self.vace_layers)}: a text-to-video model's blocks, "
                             f"ascending from 0, of its {self.num_layers}")
        if self.camera_in_dim and self.vace_layers:
            raise ValueError("a Wan model with both VACE blocks and a camera adapter: no released model has both")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Wan's RoPE split of a head: the rest for the frame axis, 2 * (head_dim // 6) for rows and for columns."""
        spatial = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * spatial, spatial, spatial

    @property
    def context_dim(self) -> int:
        """The prompt width it takes (UMT5-XXL's), under the name the samplers check prompts against."""
        return self.text_dim

    @property
    def kind(self) -> str:
        """"t2v", "i2v" (channels beside the latent's: a mask and the start image's latent), "flf2v" or "ti2v"
        (Wan 2.2 5B, 48-channel latents)."""
        if self.image_input == "flf2v":
            return "flf2v"
        if self.in_dim > self.out_dim:
            return "i2v"
        return "ti2v" if self.out_dim == 48 else "t2v"


class RMSNorm(nn.Module):
    """Wan's RMS norm (over the whole width for q and k), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNorm(nn.LayerNorm):
    """A layer norm computed in float32 whatever the model's dtype, its result in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def _plain_norm(x: Tensor, eps: float) -> Tensor:
    """The blocks' and head's layer norm without weights, in float32 (the modulation follows in float32)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """The tokens [B, F*n, dim] normed, scaled and shifted in float32 by their frame's [B, F, 1, dim] (F = 1: one
    noise level for the whole video), in x's dtype. Grouping the tokens by frame keeps the per-frame levels of
    Wan 2.2's image-to-video from costing a modulation per token."""
    h = _plain_norm(x, eps).unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift
    return h.flatten(1, 2).to(x.dtype)


def _gated(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + y * gate in float32, the gate [B, F, 1, dim] one per frame as in `_modulate`, in x's dtype."""
    return (x.float() + (y.float().unflatten(1, (gate.shape[1], -1)) * gate).flatten(1, 2)).to(x.dtype)


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Attention(nn.Module):
    """Self-attention (with RoPE) or, `image` set, the image models' cross-attention, which also attends to the
    projected CLIP vision states through its own keys and values and adds the two results."""

    def __init__(self, c: WanConfig, image: bool = False):
        super().__init__()
        self.heads = c.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(c.dim, c.dim) for _ in range(4))
        self.norm_q = RMSNorm(c.dim, c.eps) if c.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(c.dim, c.eps) if c.qk_norm else nn.Identity()
        if image:
            self.k_img, self.v_img = nn.Linear(c.dim, c.dim), nn.Linear(c.dim, c.dim)
            self.norm_k_img = RMSNorm(c.dim, c.eps) if c.qk_norm else nn.Identity()

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                image: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        q = _heads(self.norm_q(self.q(x)), self.heads)
        k = _heads(self.norm_k(self.k(source)), self.heads)
        v = _heads(self.v(source), self.heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = _attend(q, k, v)
        if image is not None and hasattr(self, "k_img"):
            k_img = _heads(self.norm_k_img(self.k_img(image)), self.heads)
            out = out + _attend(q, k_img, _heads(self.v_img(image), self.heads))
        return self.o(out)


class Block(nn.Module):
    def __init__(self, c: WanConfig):
        super().__init__()
        self.eps = c.eps
        self.self_attn = Attention(c)
        self.norm3 = LayerNorm(c.dim, c.eps) if c.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(c, image=c.image_input != "none")
        self.ffn = nn.Sequential(nn.Linear(c.dim, c.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(c.ffn_dim, c.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, c.dim))

    def forward(self, x: Tensor, e: Tensor, rope: tuple[Tensor, Tensor], context: Tensor,
                image: Tensor | None) -> Tensor:
        # The modulation and the residual sums in float32, as Wan runs them; the layers in the model's dtype.
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).unsqueeze(3).unbind(2)
        x = _gated(x, self.self_attn(_modulate(x, shift1, scale1, self.eps), rope=rope), gate1)
        x = x + self.cross_attn(self.norm3(x), context, image=image)
        return _gated(x, self.ffn(_modulate(x, shift2, scale2, self.eps)), gate2)


class Head(nn.Module):
    def __init__(self, c: WanConfig):
        super().__init__()
        self.eps = c.eps
        self.head = nn.Linear(c.dim, c.out_dim * math.prod(c.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, c.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.float() + e[:, :, None].float()).unsqueeze(3).unbind(2)
        return self.head(_modulate(x, shift, scale, self.eps))


class ImageEmbedding(nn.Module):
    """CLIP vision states to cross-attention tokens (Wan's MLPProj); FLF2V's adds learnt positions first."""

    def __init__(self, c: WanConfig):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm(c.clip_dim), nn.Linear(c.clip_dim, c.clip_dim), nn.GELU(),
                                  nn.Linear(c.clip_dim, c.dim), LayerNorm(c.dim))
        if c.image_input == "flf2v":
            self.emb_pos = nn.Parameter(torch.zeros(1, c.flf_tokens, c.clip_dim))

    def forward(self, clip_fea: Tensor) -> Tensor:
        if hasattr(self, "emb_pos"):
            if clip_fea.shape[1] > self.emb_pos.shape[1]:
                raise ValueError(f"{clip_fea.shape[1]} CLIP vision tokens for a first-last-frame model that places "
                                 f"at most {self.emb_pos.shape[1]}")
            clip_fea = clip_fea + self.emb_pos[:, :clip_fea.shape[1]].to(clip_fea.dtype)
        return self.proj(clip_fea)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's timestep embedding [B] -> [B, dim], cosines first, computed in float64 as Wan computes it."""
    precise = torch.float32 if t.device.type == "mps" else torch.float64
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=precise, device=t.device) / half)
    args = t.to(precise)[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def frame_timesteps(timesteps: Tensor, denoise_mask: Tensor | None, batch: int, frames: int) -> Tensor:
    """The noise level [batch, frames] of each latent frame: `timesteps` [B or 1, frames] as given, or, from
    `denoise_mask` [B or 1, 1 or C, frames, h, w] (1 = denoise) and one level per video `timesteps` [B or 1], the
    mask's mean over channels, rows and columns times the level, as ComfyUI's WAN22 model makes them (the frames a
    start image fixes at 0)."""
    if denoise_mask is not None:
        if denoise_mask.ndim != 5 or denoise_mask.shape[0] not in (1, batch) or denoise_mask.shape[2] != frames:
            raise ValueError(f"a denoise mask [{batch} or 1, 1 or C, {frames}, h, w] for this latent, not "
                             f"{tuple(denoise_mask.shape)}")
        if timesteps.numel() not in (1, batch):
            raise ValueError(f"timesteps {tuple(timesteps.shape)} with a denoise mask: one level per video [{batch}]")
        timesteps = denoise_mask.float().mean(dim=(1, 3, 4)) * timesteps.reshape(-1, 1)
    if timesteps.ndim != 2 or timesteps.shape[0] not in (1, batch) or timesteps.shape[1] != frames:
        raise ValueError(f"per-frame timesteps [{batch}, {frames}] for this latent, not {tuple(timesteps.shape)}")
    return timesteps.expand(batch, -1)


def pad_to_patch(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """Frames, rows and columns that are not a multiple of the patch are padded, wrapping round, as ComfyUI pads
    them (cropped back after)."""
    t, h, w = x.shape[-3:]
    pads = (0, -w % patch[2], 0, -h % patch[1], 0, -t % patch[0])
    return F.pad(x, pads, mode="circular") if any(pads) else x


def grid_ids(frames: int, rows: int, cols: int, device: torch.device | None = None,
             rope_scale: RopeScale | None = None) -> Tensor:
    """The RoPE positions [frames*rows*cols, 3] of the patches, in token order: (frame, row, col); with
    `rope_scale` each axis scaled and shifted (ComfyUI's rope_encode under rope_options)."""
    if rope_scale is not None:
        r = rope_scale
        axes = [scaled_axis(n, 0, scale, shift, device)
                for n, scale, shift in ((frames, r.scale_t, r.shift_t), (rows, r.scale_y, r.shift_y),
                                        (cols, r.scale_x, r.shift_x))]
    else:
        axes = [torch.arange(n, device=device) for n in (frames, rows, cols)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class WanModel(nn.Module):
    rope_scale: RopeScale | None = None  # ScaleROPE's, set on a shallow copy (nodes.sd.rope)

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.num_layers)])
        self.head = Head(c)
        if c.image_input != "none":
            self.img_emb = ImageEmbedding(c)
        if c.ref_conv_in_dim:
            self.ref_conv = nn.Conv2d(c.ref_conv_in_dim, c.dim, kernel_size=c.patch_size[1:], stride=c.patch_size[1:])

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from the head's modulation, which fp8 weight storage (ldm.quant) leaves alone."""
        return self.head.modulation.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                clip_fea: Tensor | None = None, denoise_mask: Tensor | None = None,
                time_dim_concat: Tensor | None = None, reference_latent: Tensor | None = None,
                ref_latents: Any = None, **block_inputs: Any) -> Tensor:
        """Predict the velocity (noise - data) of video latents `x` [B, in_dim, T, H, W] (an image-to-video
        model's extra channels after the latent's) at flow noise levels `timesteps` (0..1), [B] or, one per latent
        frame, [B, T] (Wan 2.2 5B's image-to-video), given the UMT5 prompt `context` [B, L, text_dim].
        `denoise_mask` [B or 1, 1 or C, T, h, w] (1 = denoise): per-frame levels from it and `timesteps` [B], see
        `frame_timesteps`. `clip_fea` [B, 257 (FLF2V: 514), clip_dim]: the CLIP vision states of the
        image(s) for Wan 2.1's i2v / FLF2V models (without them the image branch is skipped). `y`: Wan's own
        image-to-video input [B, C, T, H, W] (mask and image latent) to append to `x`'s channels, or, 3-D, the CLIP
        vision states, as Loom's sampler passes a model's `y`. `time_dim_concat` [B or 1, C, n, H, W]: latent frames
        appended after the video's along time (Phantom's subject images), seen by attention and dropped from the
        result. `reference_latent` [B or 1, C, H, W]: for a model with `ref_conv` (Wan Fun's reference image), a
        latent cut into tokens put before the video's, at RoPE frame 0 (the video's frames from 1), and dropped
        from the result. `ref_latents`: the sampler's per-entry references (`ldm.flux_variants.References`, one
        latent), which `nodes.sd.wan.wan_references` makes: 5-D, the `time_dim_concat`; 4-D, the
        `reference_latent`. `block_inputs`: a subclass's to `run_blocks`."""
        c, dtype = self.config, self.dtype
        if ref_latents is not None:
            latent = ref_latents.latents[-1]
            if latent.ndim == 5:
                time_dim_concat = latent
            else:
                reference_latent = latent
        if y is not None and y.ndim == 5:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        elif y is not None:
            clip_fea = y if clip_fea is None else clip_fea
        if x.ndim != 5 or x.shape[1] != c.in_dim:
            raise ValueError(f"a Wan model takes video latents [B, {c.in_dim}, frames, h, w], not "
                             f"{tuple(x.shape)}" + (f" ({c.out_dim} latent channels, then {c.in_dim - c.out_dim} of "
                                                    "mask and start image)" if c.in_dim > c.out_dim else ""))
        if context.shape[-1] != c.text_dim:
            raise ValueError(f"the prompt is {context.shape[-1]} wide; Wan takes UMT5-XXL's {c.text_dim}")
        batch, size = x.shape[0], x.shape[-3:]
        padded = pad_to_patch(x, c.patch_size)
        if time_dim_concat is not None:
            padded = torch.cat([padded, self._subject_frames(time_dim_concat, padded)], dim=2)
        grid = [n // p for n, p in zip(padded.shape[-3:], c.patch_size, strict=True)]
        tokens = self.patch_embedding(padded.to(dtype)).flatten(2).transpose(1, 2)
        references = 0
        if reference_latent is not None:
            reference = self._reference_tokens(reference_latent, padded)
            tokens, references = torch.cat([reference, tokens], dim=1), reference.shape[1]
        # A reference takes RoPE frame 0, the video's frames (and any subject frames) follow from 1.
        rope_frames = grid[0] + (1 if references else 0)
        rope = rope_angles(grid_ids(rope_frames, *grid[1:], device=x.device, rope_scale=self.rope_scale),
                           c.rope_axes, 10000)

        per_frame = denoise_mask is not None or timesteps.ndim == 2
        if per_frame and (time_dim_concat is not None or references):
            raise ValueError("per-frame noise levels (Wan 2.2 5B's image-to-video) do not combine with subject "
                             "frames (WanPhantomSubjectToVideo) or a reference image (Wan22FunControlToVideo)")
        if per_frame:
            # A level per frame of tokens: a patch's first frame's (released models' patches are one frame deep).
            t = frame_timesteps(timesteps, denoise_mask, batch, size[0])[:, ::c.patch_size[0]]
        else:
            t = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(batch)
            t = t[:, None]
        # Embedded per level ([B, F]: F = 1 or a level per frame), then shared by the frame's tokens.
        e = self.time_embedding(sinusoidal_embedding(t.flatten() * 1000, c.freq_dim).to(dtype))
        e0 = self.time_projection(e).unflatten(1, (6, c.dim)).float().unflatten(0, t.shape)
        e = e.unflatten(0, t.shape)
        if context.shape[1] < c.text_len:  # Wan pads its prompts with zeros, which still count as tokens
            context = F.pad(context, (0, 0, 0, c.text_len - context.shape[1]))
        context = self.text_embedding(context.to(dtype))
        image = None
        if clip_fea is not None and c.image_input != "none":
            image = self.img_emb(clip_fea.to(dtype))
            image = image.expand(batch, -1, -1) if image.shape[0] == 1 else image
        tokens = self.run_blocks(tokens, e0, rope, context, image, **block_inputs)
        out = self.head(tokens, e)[:, references:]
        return self._unpatchify(out, grid)[..., :size[0], :size[1], :size[2]].to(x.dtype)

    def _subject_frames(self, frames: Tensor, padded: Tensor) -> Tensor:
        """`time_dim_concat` [B or 1, C, n, H, W], padded to whole patches, at the padded latent's batch."""
        frames = pad_to_patch(frames.to(padded.dtype), self.config.patch_size)
        if (frames.ndim != 5 or frames.shape[0] not in (1, padded.shape[0]) or frames.shape[1] != padded.shape[1]
                or frames.shape[-2:] != padded.shape[-2:]):
            raise ValueError(f"subject frames [B, {padded.shape[1]}, n, {', '.join(map(str, padded.shape[-2:]))}] "
                             f"to append to this latent, not {tuple(frames.shape)}: a Phantom model takes them "
                             "without extra input channels, and they do not combine with area prompts")
        return frames.expand(padded.shape[0], -1, -1, -1, -1)

    def _reference_tokens(self, reference: Tensor, padded: Tensor) -> Tensor:
        """A reference latent [B or 1, C, H, W] through `ref_conv`: one frame of tokens [B, rows*cols, dim]."""
        if not hasattr(self, "ref_conv"):
            raise ValueError("a reference image latent for a Wan model without a reference input (ref_conv): Wan "
                             "Fun models from V1.1 and Wan 2.2 Fun take one")
        patch = self.config.patch_size
        reference = pad_to_patch(reference[:, :, None].to(self.dtype), patch)[:, :, 0]
        if (reference.shape[0] not in (1, padded.shape[0]) or reference.shape[1] != self.config.ref_conv_in_dim
                or reference.shape[-2:] != padded.shape[-2:]):
            raise ValueError(f"a reference latent [B, {self.config.ref_conv_in_dim}, "
                             f"{', '.join(map(str, padded.shape[-2:]))}] for this latent, not "
                             f"{tuple(reference.shape)}")
        tokens = self.ref_conv(reference).flatten(2).transpose(1, 2)
        return tokens.expand(padded.shape[0], -1, -1)

    def run_blocks(self, tokens: Tensor, e0: Tensor, rope: tuple[Tensor, Tensor], context: Tensor,
                   image: Tensor | None) -> Tensor:
        """The blocks over the patch-embedded tokens [B, L, dim] (the hook `ldm.wan_vace` extends)."""
        for block in self.blocks:
            tokens = block(tokens, e0, rope, context, image)
        return tokens

    def _unpatchify(self, tokens: Tensor, grid: list[int]) -> Tensor:
        """[B, f*h*w, out_dim*pt*ph*pw] (each token's values patch-major, channel last) -> [B, out_dim, T, H, W]."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], -1, f * pt, h * ph, w * pw)


def is_wan(keys: Collection[str], prefix: str = "") -> bool:
    """Whether state-dict keys (or a state dict) hold a Wan transformer in the original layout, under `prefix`."""
    return all(f"{prefix}{k}" in keys for k in ("patch_embedding.weight", "head.modulation",
                                                "blocks.0.cross_attn.q.weight"))


def wan_weights(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The transformer's tensors of a Wan file without `model.diffusion_model.` if the file has it."""
    if is_wan(sd, UNET_PREFIX):
        return {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    return dict(sd)


def wan_config_from_state_dict(sd: Mapping[str, Tensor], num_heads: int | None = None) -> WanConfig:
    """The exact shape of a Wan transformer (bare keys or under `model.diffusion_model.`) from its key names and
    tensor shapes. The head count is not in the weights: `num_heads`, else Wan's 128-wide heads."""
    sd = wan_weights(sd)
    variant = next((name for part, name in VARIANTS.items() if any(k.startswith(part) for k in sd)), None)
    if variant is not None:
        raise ValueError(f"a Wan {variant} model: only Wan's text-to-video and image-to-video transformers are "
                         "supported")
    try:
        dim, in_dim, *patch = sd["patch_embedding.weight"].shape
        if num_heads is None:
            if dim % HEAD_DIM:
                raise ValueError(f"its width {dim} is not a multiple of Wan's {HEAD_DIM}-wide heads, and the file "
                                 "does not say how many heads it has (loom.wan_num_heads metadata)")
            num_heads = dim // HEAD_DIM
        image_input = ("flf2v" if "img_emb.emb_pos" in sd else "i2v" if "img_emb.proj.0.weight" in sd else "none")
        clip_dim = sd["img_emb.proj.0.weight"].shape[0] if image_input != "none" else 1280
        num_layers = len({int(m[1]) for k in sd if (m := _BLOCK.match(k))})
        vace = len({int(m[1]) for k in sd if (m := _VACE_BLOCK.match(k))})
        # The weights only count the VACE blocks; which main blocks they feed is Wan's (and ComfyUI's) rule:
        # every (layers // VACE blocks)th from 0 (1.3B: 15 of 30, every 2nd; 14B: 8 of 40, every 5th).
        vace_layers = tuple(range(0, num_layers, max(num_layers // vace, 1)))[:vace] if vace else ()
        if len(vace_layers) != vace:
            raise ValueError(f"{vace} VACE blocks for {num_layers} main blocks: at most one each")
        # A Fun camera adapter: its conv takes the camera's channels folded 8x8 (the VAE's downscale) into 64 each.
        camera_in_dim = sd["control_adapter.conv.weight"].shape[1] // 64 if "control_adapter.conv.weight" in sd else 0
        camera_blocks = len({int(m[1]) for k in sd if (m := _CAMERA_BLOCK.match(k))})
        ref_conv_in_dim = sd["ref_conv.weight"].shape[1] if "ref_conv.weight" in sd else 0
        return WanConfig(
            dim=dim, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_heads=num_heads,
            num_layers=num_layers, in_dim=in_dim,
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
            freq_dim=sd["time_embedding.0.weight"].shape[1], text_dim=sd["text_embedding.0.weight"].shape[1],
            patch_size=tuple(patch),
            qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd,
            image_input=image_input, clip_dim=clip_dim,
            flf_tokens=sd["img_emb.emb_pos"].shape[1] if image_input == "flf2v" else 514, vace_layers=vace_layers,
            vace_in_dim=sd["vace_patch_embedding.weight"].shape[1] if vace else 96,
            camera_in_dim=camera_in_dim, camera_blocks=camera_blocks if camera_in_dim else 1,
            ref_conv_in_dim=ref_conv_in_dim)
    except KeyError as e:
        raise ValueError(f"an incomplete Wan transformer: no weight {e}") from None
