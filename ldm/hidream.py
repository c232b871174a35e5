"""The HiDream-I1 transformer (HiDream.ai's 17B sparse diffusion transformer, 2025: full, dev and fast share it);
attribute names follow diffusers' HiDreamImageTransformer2DModel, whose names ComfyUI's single files keep
(hidream_i1_full_fp16, hidream_i1_dev_bf16, ...: the same keys, bare or under `model.diffusion_model.`).

A Flux-like double- / single-stream design with these differences:
- 2x2 patches of Flux's 16-channel latent become image tokens, each patch's values channel-minor ((p1 p2 C)).
- The conditioning vector is the timestep's embedding (sigma * 1000) plus the pooled prompt's: CLIP-L's and CLIP-G's
  projected text embeds side by side, [B, 2048] (`y`).
- The prompt is two encoders' states: T5-XXL's last hidden states (`context`, [B, L_t5, 4096]) and the hidden states
  of Llama 3.1 8B's decoder layers (`llama`, [B, 32, L_llama, 4096], the embedding output left out). Each block
  reads one Llama layer (`HiDreamConfig.llama_layers`; the released model: layers 0..31 for the first 32 blocks,
  layer 31 for the last 16), each through its own projection (`caption_projection.i`); the T5 states have the last
  projection.
- The text stream of the double blocks starts as [T5, the last block's Llama layer]; each double block runs it with
  its own Llama layer appended and keeps only the first part's update. The single blocks run [image, that text
  stream] with their own Llama layer appended, dropped again after each block.
- Attention: q, k and v have biases; q and k are RMS-normalised over the whole width (not per head), then rotated:
  Flux's RoPE (theta 10000) over axes 64 / 32 / 32 of 128-wide heads, image patch (row, col) at (0, row, col), every
  text token at (0, 0, 0), i.e. not rotated.
- The image stream's feed-forward is a mixture of experts: a shared SwiGLU expert plus the 2 of 4 routed SwiGLU
  experts a softmax gate scores highest per token, weighted by their (unnormalised) gate scores (DeepSeek's MoE as
  diffusers' MoEGate / MOEFeedForwardSwiGLU compute it in eval mode). The double blocks' text stream has a plain
  SwiGLU.
- The output is negated: the transformer (diffusers' and ComfyUI's alike) predicts data - noise, which diffusers'
  HiDreamImagePipeline and ComfyUI negate.

`HiDreamModel.forward(x, timesteps, context, y, llama)` keeps the calling convention of Loom's flow models
(ldm.sampling.denoiser): `timesteps` is sigma in 0..1 and the output the velocity noise - data. Latents of any size
run as they are, as in ComfyUI (odd sizes padded to the patch, wrapping round, and cropped back); diffusers pads the
tokens of non-square latents to 4096 (its `max_resolution`) and zeroes the padding's keys, which changes the result,
so Loom follows ComfyUI there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.flux import attention, pad_to_patch, rope_angles
from ldm.unet import timestep_embedding

THETA = 10000
TIME_SCALE = 1000.0
FREQUENCY_DIM = 256  # the sinusoidal timestep embedding's width
PATCH = 2
STANDARD_AXES = (64, 32, 32)  # the released RoPE split of a 128-wide head
# The Llama layer each block reads (double blocks first), as diffusers' HiDream-I1 config and ComfyUI's
# model_detection give it: not in the weights.
RELEASED_LLAMA_LAYERS = (*range(32), *[31] * 16)
_DOUBLE = re.compile(r"double_stream_blocks\.(\d+)\.")
_SINGLE = re.compile(r"single_stream_blocks\.(\d+)\.")
_EXPERT = re.compile(r"double_stream_blocks\.0\.block\.ff_i\.experts\.(\d+)\.")
_PROBES = ("caption_projection.0.linear.weight", "double_stream_blocks.0.block.adaLN_modulation.1.bias",
           "x_embedder.proj.weight")


@dataclass(frozen=True)
class HiDreamConfig:
    """Shape of a HiDream-I1 transformer (defaults: the released one). `axes_dim` (whose sum is the head width),
    `llama_layers` and `num_activated_experts` are not in the weights; the rest is."""

    in_channels: int = 16
    hidden_size: int = 2560
    num_layers: int = 16
    num_single_layers: int = 32
    axes_dim: tuple[int, int, int] = STANDARD_AXES
    t5_dim: int = 4096  # caption_channels[0]
    llama_dim: int = 4096  # caption_channels[1]
    text_emb_dim: int = 2048
    num_routed_experts: int = 4
    num_activated_experts: int = 2
    ffn_hidden: int = 6912  # the routed experts' and the text stream's SwiGLU width (diffusers' rule for 4 * dim)
    shared_hidden: int = 3584  # the shared expert's (for 2 * dim)
    llama_layers: tuple[int, ...] = RELEASED_LLAMA_LAYERS

    def __post_init__(self) -> None:
        if self.hidden_size % self.head_dim:
            raise ValueError(f"the RoPE axes {self.axes_dim} add up to a head width that does not divide the "
                             f"transformer's width {self.hidden_size}")
        if len(self.llama_layers) != self.num_layers + self.num_single_layers:
            raise ValueError(f"{len(self.llama_layers)} Llama layers for {self.num_layers} + "
                             f"{self.num_single_layers} blocks: each block reads one")
        if not 0 < self.num_activated_experts <= self.num_routed_experts:
            raise ValueError(f"{self.num_activated_experts} of {self.num_routed_experts} experts cannot be chosen")

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dim)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def context_dim(self) -> int:
        """The prompt states' width the sampler checks prompts against: T5's (the context)."""
        return self.t5_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels


HIDREAM_I1 = HiDreamConfig()


class MLP(nn.Module):
    """linear_2(silu(linear_1(x))): the timestep's and the pooled prompt's embedders (diffusers' TimestepEmbedding)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEmbed(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.timestep_embedder = MLP(FREQUENCY_DIM, hidden)


class PooledEmbed(nn.Module):
    def __init__(self, text_emb_dim: int, hidden: int):
        super().__init__()
        self.pooled_embedder = MLP(text_emb_dim, hidden)


class PatchEmbed(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, hidden, bias=False)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEGate(nn.Module):
    """Top-k routing: the k experts of highest softmax score per token, with those scores (not renormalised)."""

    def __init__(self, dim: int, experts: int, active: int):
        super().__init__()
        self.active = active
        self.weight = nn.Parameter(torch.empty(experts, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, dim] -> (scores, expert indices), each [N, k]."""
        return F.linear(x, self.weight).softmax(dim=-1).topk(self.active, dim=-1, sorted=False)


class MoEFeedForward(nn.Module):
    """The shared expert on every token plus each token's routed experts, weighted by their gate scores."""

    def __init__(self, c: HiDreamConfig):
        super().__init__()
        self.shared_experts = SwiGLU(c.hidden_size, c.shared_hidden)
        self.experts = nn.ModuleList([SwiGLU(c.hidden_size, c.ffn_hidden) for _ in range(c.num_routed_experts)])
        self.gate = MoEGate(c.hidden_size, c.num_routed_experts, c.num_activated_experts)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores, chosen = self.gate(flat)
        routed = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):  # only the tokens routed to each expert run through it
            token, slot = (chosen == index).nonzero(as_tuple=True)
            routed.index_add_(0, token, expert(flat[token]) * scores[token, slot, None])
        return routed.view(x.shape) + self.shared_experts(x)


class Attention(nn.Module):
    """The image stream's q / k / v / out (and, in a double block, the text stream's `_t` ones); q and k are
    RMS-normalised over the whole width before they are split into heads."""

    def __init__(self, c: HiDreamConfig, double: bool):
        super().__init__()
        dim = c.hidden_size
        for suffix in ("", "_t") if double else ("",):
            for name in ("to_q", "to_k", "to_v", "to_out"):
                setattr(self, name + suffix, nn.Linear(dim, dim))
            setattr(self, "q_rms_norm" + suffix, nn.RMSNorm(dim, eps=1e-5))
            setattr(self, "k_rms_norm" + suffix, nn.RMSNorm(dim, eps=1e-5))

    def qkv(self, x: Tensor, heads: int, suffix: str = "") -> tuple[Tensor, Tensor, Tensor]:
        """One stream's q, k, v [B, heads, L, D/heads]."""
        q = getattr(self, "q_rms_norm" + suffix)(getattr(self, "to_q" + suffix)(x)).to(x.dtype)
        k = getattr(self, "k_rms_norm" + suffix)(getattr(self, "to_k" + suffix)(x)).to(x.dtype)
        v = getattr(self, "to_v" + suffix)(x)
        return tuple(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly over [image, text]."""

    def __init__(self, c: HiDreamConfig):
        super().__init__()
        self.heads = c.num_heads
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 12 * c.hidden_size))
        self.attn1 = Attention(c, double=True)
        self.ff_i = MoEFeedForward(c)
        self.ff_t = SwiGLU(c.hidden_size, c.ffn_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        (shift_i, scale_i, gate_i, mlp_shift_i, mlp_scale_i, mlp_gate_i,
         shift_t, scale_t, gate_t, mlp_shift_t, mlp_scale_t, mlp_gate_t) = self.adaLN_modulation(vec)[:, None].chunk(
            12, dim=-1)
        qi, ki, vi = self.attn1.qkv(_modulate(img, shift_i, scale_i), self.heads)
        qt, kt, vt = self.attn1.qkv(_modulate(txt, shift_t, scale_t), self.heads, "_t")
        out = attention(torch.cat([qi, qt], 2), torch.cat([ki, kt], 2), torch.cat([vi, vt], 2), rope)
        img = img + gate_i * self.attn1.to_out(out[:, :img.shape[1]])
        txt = txt + gate_t * self.attn1.to_out_t(out[:, img.shape[1]:])
        img = img + mlp_gate_i * self.ff_i(_modulate(img, mlp_shift_i, mlp_scale_i))
        txt = txt + mlp_gate_t * self.ff_t(_modulate(txt, mlp_shift_t, mlp_scale_t))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [image, text] tokens with the image stream's weights only."""

    def __init__(self, c: HiDreamConfig):
        super().__init__()
        self.heads = c.num_heads
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 6 * c.hidden_size))
        self.attn1 = Attention(c, double=False)
        self.ff_i = MoEFeedForward(c)

    def forward(self, x: Tensor, vec: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = self.adaLN_modulation(vec)[:, None].chunk(6, dim=-1)
        x = x + gate * self.attn1.to_out(attention(*self.attn1.qkv(_modulate(x, shift, scale), self.heads), rope))
        return x + mlp_gate * self.ff_i(_modulate(x, mlp_shift, mlp_scale))


class Block(nn.Module):
    """The checkpoint's `.block.` level: every block sits one module deeper than it runs."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))


def patchify(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 2*2*C] image tokens, row by row, each patch's values channel-minor."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(
        b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def unpatchify(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of `patchify` for a latent of h x w (multiples of 2)."""
    b, _, d = tokens.shape
    return tokens.reshape(b, h // PATCH, w // PATCH, PATCH, PATCH, d // PATCH**2).permute(0, 5, 1, 3, 2, 4).reshape(
        b, -1, h, w)


class HiDreamModel(nn.Module):
    # The experts' token counts are read on the host (each runs on its own tokens only): no CUDA-graph replay.
    cuda_graphs_safe = False

    def __init__(self, config: HiDreamConfig = HIDREAM_I1):
        super().__init__()
        self.config = c = config
        self.t_embedder = TimestepEmbed(c.hidden_size)
        self.p_embedder = PooledEmbed(c.text_emb_dim, c.hidden_size)
        self.x_embedder = PatchEmbed(c.in_channels * PATCH**2, c.hidden_size)
        self.double_stream_blocks = nn.ModuleList([Block(DoubleStreamBlock(c)) for _ in range(c.num_layers)])
        self.single_stream_blocks = nn.ModuleList([Block(SingleStreamBlock(c)) for _ in range(c.num_single_layers)])
        self.final_layer = LastLayer(c.hidden_size, PATCH**2 * c.out_channels)
        # one projection per block's Llama layer, then the T5 states'
        self.caption_projection = nn.ModuleList(
            [TextProjection(c.llama_dim, c.hidden_size) for _ in c.llama_layers] + [TextProjection(c.t5_dim,
                                                                                                   c.hidden_size)])

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from an RMS norm's weight, which fp8 weight storage (ldm.quant) leaves as it is."""
        blocks = self.double_stream_blocks or self.single_stream_blocks
        return blocks[0].block.attn1.q_rms_norm.weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                llama: Tensor | None = None) -> Tensor:
        """Predict the velocity (noise - data) of latents `x` [B, C, H, W] at noise levels `timesteps` [B] (0..1)
        given the T5 states `context` [B, L, t5_dim], the pooled CLIP-L and CLIP-G prompts `y` [B, text_emb_dim]
        (zeros when None, as a prompt without them) and the Llama states `llama` [B, layers, L', llama_dim]."""
        c, dtype = self.config, self.dtype
        self._check_inputs(x, context, y, llama)
        h, w = x.shape[-2:]
        padded = pad_to_patch(x, PATCH)
        rows, cols = padded.shape[-2] // PATCH, padded.shape[-1] // PATCH
        img = self.x_embedder.proj(patchify(padded.to(dtype)))
        vec = self.t_embedder.timestep_embedder(timestep_embedding(timesteps * TIME_SCALE, FREQUENCY_DIM).to(dtype))
        pooled = torch.zeros(x.shape[0], c.text_emb_dim, device=x.device) if y is None else y
        vec = vec + self.p_embedder.pooled_embedder(pooled.to(dtype))
        prompts = [projection.linear(llama[:, layer].to(dtype))
                   for projection, layer in zip(self.caption_projection, c.llama_layers, strict=False)]
        txt = torch.cat([self.caption_projection[-1].linear(context.to(dtype)), prompts[-1]], dim=1)
        n, t = rows * cols, txt.shape[1]  # image tokens; text tokens that stay (each block's Llama layer goes)
        ids = torch.zeros(n + t + prompts[0].shape[1], 3, device=x.device)  # text at (0, 0, 0)
        ids[:n, 1] = torch.arange(rows, device=x.device).repeat_interleave(cols).float()
        ids[:n, 2] = torch.arange(cols, device=x.device).repeat(rows).float()
        rope = rope_angles(ids, c.axes_dim, THETA)
        for block, prompt in zip(self.double_stream_blocks, prompts, strict=False):
            img, txt = block.block(img, torch.cat([txt, prompt], dim=1), vec, rope)
            txt = txt[:, :t]
        tokens = torch.cat([img, txt], dim=1)
        for block, prompt in zip(self.single_stream_blocks, prompts[c.num_layers:], strict=True):
            tokens = block.block(torch.cat([tokens, prompt], dim=1), vec, rope)[:, :n + t]
        out = self.final_layer(tokens[:, :n], vec)
        return -unpatchify(out, rows * PATCH, cols * PATCH)[..., :h, :w].to(x.dtype)

    def _check_inputs(self, x: Tensor, context: Tensor, y: Tensor | None, llama: Tensor | None) -> None:
        """ValueErrors that name what does not fit (a prompt from another family's text encoders, most likely)."""
        c, batch = self.config, x.shape[0]
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"a HiDream model takes latents [B, {c.in_channels}, H, W], not {list(x.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != c.t5_dim:
            raise ValueError(f"a HiDream model takes T5-XXL states [{batch}, L, {c.t5_dim}] as its context, not "
                             f"{list(context.shape)}")
        if y is not None and tuple(y.shape) != (batch, c.text_emb_dim):
            raise ValueError(f"a HiDream model takes the pooled CLIP-L and CLIP-G prompts [{batch}, {c.text_emb_dim}] "
                             f"as its y, not {list(y.shape)}")
        if llama is None:
            raise ValueError("a HiDream model needs the Llama 3.1 hidden states of the prompt (HiDream's text "
                             "encoders, QuadrupleCLIPLoader, make them)")
        layers = max(c.llama_layers) + 1
        if llama.ndim != 4 or llama.shape[0] != batch or llama.shape[1] < layers or llama.shape[-1] != c.llama_dim:
            raise ValueError(f"a HiDream model takes the Llama states [{batch}, layers >= {layers}, L, {c.llama_dim}]"
                             f", not {list(llama.shape)}")


def is_hidream(sd: Mapping[str, object], prefix: str = "") -> bool:
    """Whether a state dict (or a header's shapes) holds a HiDream-I1 transformer in diffusers' / ComfyUI's layout
    (under `prefix`)."""
    return all(f"{prefix}{k}" in sd for k in _PROBES)


def hidream_config_from_state_dict(sd: Mapping[str, Tensor], prefix: str = "",
                                   axes_dim: tuple[int, ...] | None = None,
                                   llama_layers: tuple[int, ...] | None = None) -> HiDreamConfig:
    """The exact shape of HiDream-I1 weights (under `prefix`) from their key names and tensor shapes. What the
    weights cannot tell: the RoPE split of a head (`axes_dim`, else the released (64, 32, 32)) and the Llama layer
    each block reads (`llama_layers`, else `RELEASED_LLAMA_LAYERS`, for 48 blocks only); 2 active experts."""
    def shape(key: str) -> tuple[int, ...]:
        return tuple(sd[prefix + key].shape)

    try:
        hidden, patch_values = shape("x_embedder.proj.weight")
        blocks = [k[len(prefix):] for k in sd if k.startswith(prefix)]
        num_layers = len({m[1] for k in blocks if (m := _DOUBLE.match(k))})
        num_single = len({m[1] for k in blocks if (m := _SINGLE.match(k))})
        experts = len({m[1] for k in blocks if (m := _EXPERT.match(k))})
        if not num_layers or not experts:
            raise ValueError("a HiDream transformer without double-stream blocks or experts, which Loom cannot run")
        if llama_layers is None:
            if num_layers + num_single != len(RELEASED_LLAMA_LAYERS):
                raise ValueError(f"{num_layers} + {num_single} blocks, not the released 16 + 32, and the file does "
                                 "not say which Llama layer each reads (loom.hidream_layout metadata)")
            llama_layers = RELEASED_LLAMA_LAYERS
        ff = "double_stream_blocks.0.block.ff_i."
        return HiDreamConfig(
            in_channels=patch_values // PATCH**2, hidden_size=hidden, num_layers=num_layers,
            num_single_layers=num_single, axes_dim=tuple(axes_dim or STANDARD_AXES),
            t5_dim=shape(f"caption_projection.{num_layers + num_single}.linear.weight")[1],
            llama_dim=shape("caption_projection.0.linear.weight")[1],
            text_emb_dim=shape("p_embedder.pooled_embedder.linear_1.weight")[1], num_routed_experts=experts,
            ffn_hidden=shape(ff + "experts.0.w1.weight")[0], shared_hidden=shape(ff + "shared_experts.w1.weight")[0],
            llama_layers=tuple(llama_layers))
    except KeyError as e:
        raise ValueError(f"an incomplete HiDream transformer: no weight {e}") from None

