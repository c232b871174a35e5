"""The MMDiT transformer of Stable Diffusion 3 and 3.5; attribute names follow Stability's single-file checkpoint keys.

A rectified-flow transformer (Esser et al. 2024, "Scaling Rectified Flow Transformers"): the 16-channel latent is
cut into 2x2 patches by a strided convolution (`x_embedder`) and gets a learnt position table (`pos_embed`, a
square grid, cropped to the latent's size about its centre); the prompt's token embeddings (`context`, CLIP-L/G
and T5 in one sequence) are projected by `context_embedder`. Each joint block keeps two streams with their own
weights (`x_block` for the image, `context_block` for the text) that attend jointly, text first. Every block is
modulated (shift, scale, gate) by one vector: the embeddings of the timestep (sigma in 0..1, times 1000) and of the
pooled CLIP-L and CLIP-G prompts (`y`). The last block's context stream is "pre-only": it feeds the joint attention
and nothing else. SD3.5 adds RMS norms on each head's queries and keys (`ln_q`, `ln_k`), and SD3.5-medium's MMDiT-X
blocks a second, image-only attention (`x_block.attn2`) in the first blocks.

`MMDiT.forward(x, timesteps, context, y)` keeps the UNet's calling convention (`ldm.sampling.denoiser`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.unet import timestep_embedding

_BLOCK = re.compile(r"joint_blocks\.(\d+)\.")
_ATTN2 = re.compile(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight")


@dataclass(frozen=True)
class MMDiTConfig:
    """Shape of an MMDiT (defaults: SD3 medium). `adm_in_channels` is the pooled prompt's width (CLIP-L + CLIP-G),
    `context_dim` the token embeddings' (T5's); `dual_attention_layers` are the MMDiT-X blocks (SD3.5 medium)."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    adm_in_channels: int = 2048
    context_dim: int = 4096
    pos_embed_max_size: int = 192
    qk_norm: bool = False
    dual_attention_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"the width {self.hidden_size} is not a multiple of the {self.num_heads} heads")


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # normalised in float32: half-precision squares lose too much
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class Embedder(nn.Module):
    """Linear, SiLU, linear (`mlp.0`, `mlp.2`): the timestep's and the pooled prompt's embeddings."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Only the weights and the head split: the joint block runs both streams' attention at once. A pre-only
    stream (the last block's context) has no output projection."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        if qk_norm:
            self.ln_q, self.ln_k = RMSNorm(dim // heads), RMSNorm(dim // heads)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L, D] -> q, k, v [B, heads, L, D/heads], q and k RMS-normalised where the model has the norms."""
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class DismantledBlock(nn.Module):
    """One stream of a joint block, split (as Stability's code calls it "dismantled") around the joint attention:
    `pre` gives the stream's q, k, v, `post` applies the attention's result and the MLP."""

    def __init__(self, c: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.attn = Attention(c.hidden_size, c.num_heads, c.qk_norm, pre_only)
        if dual:
            self.attn2 = Attention(c.hidden_size, c.num_heads, c.qk_norm)
        if not pre_only:
            hidden = int(c.hidden_size * c.mlp_ratio)
            self.mlp = nn.Sequential()
            self.mlp.add_module("fc1", nn.Linear(c.hidden_size, hidden))
            self.mlp.add_module("act", nn.GELU(approximate="tanh"))
            self.mlp.add_module("fc2", nn.Linear(hidden, c.hidden_size))
        self.parts = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, self.parts * c.hidden_size))

    def pre(self, x: Tensor, vec: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """The stream's q, k, v for the joint attention, and the modulation `post` needs."""
        mods = self.adaLN_modulation(vec)[:, None, :].chunk(self.parts, dim=-1)
        return self.attn.split(_modulate(x, mods[0], mods[1])), mods

    def post(self, x: Tensor, attended: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """The block's output from its input `x` and the joint attention's result for this stream."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp, *second = mods
        out = x + gate_msa * self.attn.proj(attended)
        if self.dual:
            # MMDiT-X: a second attention over the image tokens alone, on the block's input with its own modulation.
            shift2, scale2, gate2 = second
            out = out + gate2 * self.attn2.proj(_attend(*self.attn2.split(_modulate(x, shift2, scale2))))
        return out + gate_mlp * self.mlp.fc2(self.mlp.act(self.mlp.fc1(_modulate(out, shift_mlp, scale_mlp))))


class JointBlock(nn.Module):
    def __init__(self, c: MMDiTConfig, index: int, context_pre_only: bool | None = None):
        """`context_pre_only`: whether the context stream is pre-only; by default, in the model's last block (a
        ControlNet's blocks all keep theirs)."""
        super().__init__()
        pre_only = index == c.depth - 1 if context_pre_only is None else context_pre_only
        self.context_block = DismantledBlock(c, pre_only=pre_only)
        self.x_block = DismantledBlock(c, dual=index in c.dual_attention_layers)

    def forward(self, context: Tensor, x: Tensor, vec: Tensor) -> tuple[Tensor, Tensor]:
        (cq, ck, cv), context_mods = self.context_block.pre(context, vec)
        (xq, xk, xv), x_mods = self.x_block.pre(x, vec)
        out = _attend(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2))
        context_out, x_out = out[:, :context.shape[1]], out[:, context.shape[1]:]
        x = self.x_block.post(x, x_out, x_mods)
        if not self.context_block.pre_only:
            context = self.context_block.post(context, context_out, context_mods)
        return context, x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))


def unpatchify(tokens: Tensor, rows: int, cols: int, patch: int) -> Tensor:
    """[B, rows*cols, p*p*C] -> [B, C, rows*p, cols*p]; each token's values are patch-row, patch-col, channel."""
    b = tokens.shape[0]
    x = tokens.reshape(b, rows, cols, patch, patch, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, -1, rows * patch, cols * patch)


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        self.x_embedder = PatchEmbed(c.in_channels, c.hidden_size, c.patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, c.pos_embed_max_size**2, c.hidden_size))
        self.t_embedder = Embedder(256, c.hidden_size)
        self.y_embedder = Embedder(c.adm_in_channels, c.hidden_size)
        self.context_embedder = nn.Linear(c.context_dim, c.hidden_size)
        self.joint_blocks = nn.ModuleList([JointBlock(c, i) for i in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from a bias, which fp8 weight storage (ldm.quant) leaves as it is."""
        return self.context_embedder.bias.dtype

    def cropped_pos_embed(self, rows: int, cols: int) -> Tensor:
        """The position table's rows x cols window about its centre, [1, rows*cols, hidden]."""
        size = self.config.pos_embed_max_size
        if rows > size or cols > size:
            raise ValueError(f"a latent of {rows} x {cols} patches is larger than this model's position table "
                             f"({size} x {size} patches)")
        top, left = (size - rows) // 2, (size - cols) // 2
        grid = self.pos_embed.reshape(1, size, size, -1)[:, top:top + rows, left:left + cols]
        return grid.reshape(1, rows * cols, -1)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                control: Sequence[Tensor] | None = None) -> Tensor:
        """Predict the velocity (noise - data) of latents `x` [B, C, H, W] at noise levels `timesteps` [B] (0..1)
        given the prompt's token embeddings `context` [B, L, context_dim] and pooled embeddings `y`.

        `control`: an SD3 ControlNet's outputs (`ldm.controlnet_sd3`), [B, tokens, hidden] each, added to the
        image tokens after the blocks as diffusers' SD3Transformer2DModel adds them: block i gets output
        i // ceil(blocks / outputs), the last block (its context stream pre-only) none."""
        if control is not None and not isinstance(control, (list, tuple)):
            raise ValueError("SD3 models take SD3 ControlNets only: Loom runs no T2I-Adapter with SD3")
        h, w = x.shape[-2:]
        img, txt, vec, (rows, cols) = embed_inputs(self, x, timesteps, context, y)
        interval = math.ceil(len(self.joint_blocks) / len(control)) if control else 0
        for i, block in enumerate(self.joint_blocks):
            txt, img = block(txt, img, vec)
            if interval and not block.context_block.pre_only:
                img = img + control[i // interval].to(img.dtype)
        out = self.final_layer(img, vec)
        return unpatchify(out, rows, cols, self.config.patch_size)[..., :h, :w].to(x.dtype)


def embed_inputs(model: nn.Module, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """The image tokens (patches plus positions), text tokens and modulation vector of an MMDiT, or of an SD3
    ControlNet, which has the same embedders; and the patch grid's (rows, cols)."""
    c, dtype = model.config, model.dtype
    h, w = x.shape[-2:]
    p = c.patch_size
    # Sizes that are not a multiple of the patch are padded (wrapping round, as ComfyUI does) and cropped back.
    padded = F.pad(x, (0, -w % p, 0, -h % p), mode="circular") if h % p or w % p else x
    rows, cols = padded.shape[-2] // p, padded.shape[-1] // p
    img = model.x_embedder(padded.to(dtype)) + model.cropped_pos_embed(rows, cols).to(dtype)
    vec = model.t_embedder(timestep_embedding(timesteps * 1000, 256).to(dtype))
    if y is None:
        y = torch.zeros(x.shape[0], c.adm_in_channels, device=x.device)
    if y.shape[-1] != c.adm_in_channels:
        raise ValueError(f"y is {y.shape[-1]} wide; this SD3 model takes the pooled prompts "
                         f"({c.adm_in_channels}: CLIP-L's and CLIP-G's)")
    vec = vec + model.y_embedder(y.to(dtype))
    return img, model.context_embedder(context.to(dtype)), vec, (rows, cols)


def is_mmdit(sd: Mapping[str, Tensor], prefix: str = "") -> bool:
    """Whether a state dict holds an SD3 MMDiT in Stability's layout (under `prefix`)."""
    return f"{prefix}joint_blocks.0.x_block.attn.qkv.weight" in sd and f"{prefix}x_embedder.proj.weight" in sd


def mmdit_config_from_state_dict(sd: Mapping[str, Tensor]) -> MMDiTConfig:
    """The exact shape of a Stability-layout MMDiT (no prefix) from its key names and tensor shapes.

    The head count is not in the weights: SD3.5's per-head norms give the head width; without them (SD3 medium)
    it is Stability's rule, one head per block (64-wide heads at width 64 * depth)."""
    try:
        hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
        depth = len({int(m[1]) for k in sd if (m := _BLOCK.match(k))})
        qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
        heads = hidden // sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk_norm else depth
        table = sd["pos_embed"].shape[1]
        size = math.isqrt(table)
        if size * size != table:
            raise ValueError(f"its position table has {table} entries, not a square grid")
        return MMDiTConfig(
            in_channels=in_channels, out_channels=sd["final_layer.linear.weight"].shape[0] // patch**2,
            patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
            mlp_ratio=sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0] / hidden,
            adm_in_channels=sd["y_embedder.mlp.0.weight"].shape[1], context_dim=sd["context_embedder.weight"].shape[1],
            pos_embed_max_size=size, qk_norm=qk_norm,
            dual_attention_layers=tuple(sorted(int(m[1]) for k in sd if (m := _ATTN2.match(k)))))
    except KeyError as e:
        raise ValueError(f"an incomplete SD3 transformer: no weight {e}") from None
