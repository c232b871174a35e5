"""ACE-Step 1.5's diffusion model (the music generator), read from the original "AceStepConditionGenerationModel" file.

The file (ComfyUI's acestep_v1.5_turbo.safetensors and the base / sft / XL variants, loaded by UNETLoader) holds four
parts beside the learned `null_condition_emb`: the flow transformer under `decoder.`, the condition encoder under
`encoder.` (caption projector, lyric encoder, timbre encoder), and the 5 Hz audio tokenizer / detokenizer under
`tokenizer.` / `detokenizer.` (an attention pooler, a residual FSQ over levels 8,8,8,5,5,5, and its inverse). Modules
here are named after the file's keys, so `load_state_dict(strict=True)` takes the file as it is.

How the model is called (ComfyUI's `AceStepConditionGenerationModel.forward` / `prepare_condition`; diffusers'
AceStepPipeline assembles the same from its AceStepConditionEncoder, AceStepAudioTokenizer,
AceStepAudioTokenDetokenizer and AceStepTransformer1DModel):

- latents are [B, 64, L] at 25 frames a second; `timesteps` are the flow time sigma in [0, 1], embedded at 1000 times
  (ComfyUI's timestep_embedding with time_factor 1000, diffusers' `t * 1000`); the decoder's second time embedding
  takes t - r with r = t, i.e. zero;
- the cross-attention sequence is the lyric encoder's states, then the timbre encoder's one token per item (the
  first token of the reference latents run through it), then the caption's Qwen3-0.6B states projected: ComfyUI
  passes no masks, so its `pack_sequences` is a plain concatenation. With `null_condition` every one of those states
  is `null_condition_emb` (the unconditional branch of the base / sft models' guidance);
- the decoder's input is the noisy latent beside the context latents: 64 channels of "LM hints" (audio codes
  through the FSQ's codebook and the detokenizer, or the reference through tokenizer and detokenizer) or, for
  `is_covers=False`, the reference latents themselves, then a chunk mask of ones (64 channels);
- the output is the flow velocity v = noise - x0: ACE-Step trains x_t = t * noise + (1 - t) * x0 and its sampler
  (diffusers' pipeline through FlowMatchEulerDiscreteScheduler) steps x += (t_next - t) * v, which is ComfyUI's CONST
  sampling with denoised = x - sigma * v.

Where ComfyUI and diffusers differ, this follows ComfyUI:

- the lyric, timbre, pooler and detokenizer encoders attend fully; diffusers (after ACE-Step's code) gives their
  even layers a 128-token sliding window, which changes lyrics longer than 129 tokens and timbre references longer
  than 129 frames (the decoder's even layers use the window in both);
- the FSQ bounds each code with tanh (vector-quantize-pytorch's symmetry-preserving bound) where diffusers clamps to
  [-1, 1]; the reference is padded to a multiple of 5 frames with zeros, not with the silence latent;
- the detokenizer's final RMSNorm uses the dtype's epsilon (ComfyUI builds it without one), not 1e-6;
- the decoder's condition embedder reads the encoder's width from the file (ComfyUI's is square, so XL's 2048-wide
  encoder under a 2560-wide decoder needs this), and the tokenizer / detokenizer heads come from the shapes, not
  ComfyUI's fixed 16 / 8.

One deliberate difference from ComfyUI: each batch item's timbre token is its own reference's. ComfyUI's
`unpack_timbre_embeddings` gets an order mask of zeros, so with a batch of B > 1 references item 0 sees all B timbre
tokens and the other items see B zero vectors; with one item the two agree. A `silence_latent` in a state dict
(diffusers' converted condition encoder carries one) is not read: that layout is not this file's, and the values
are the ones in ldm/data/ace_step15_silence_latent.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.flux_presets import distinct_random_

SILENCE_LATENT_FILE = Path(__file__).parent / "data" / "ace_step15_silence_latent.json"
# Loom's files record a sliding window other than the released 128 (the tiny test models') under this metadata key.
WINDOW_KEY = "loom.sliding_window"
PAD_AUDIO_CODE = 35847  # ComfyUI pads too-short audio codes with this index (a code of silence)
TIME_FACTOR = 1000.0
TIME_FEATURES = 256
_PROBE = ("decoder.time_embed_r.linear_1.weight", "decoder.condition_embedder.weight",
          "encoder.timbre_encoder.embed_tokens.weight", "tokenizer.quantizer.project_in.weight",
          "detokenizer.special_tokens", "null_condition_emb")


@dataclass(frozen=True)
class StackShape:
    """One transformer stack's widths: hidden size, query / key-value heads, head width, SwiGLU width."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads do not share {self.kv_heads} key/value heads evenly")


@dataclass(frozen=True)
class AceStep15Config:
    """The model's shape, the 2B turbo / base / sft's by default (XL: a 2560-wide, 32-layer, 32-head decoder over
    the same 2048-wide encoder; read it with `config_from_state_dict`). `encoder` is the condition encoder's stacks
    (lyric and timbre), `tokenizer` the attention pooler's and the detokenizer's."""

    decoder: StackShape = StackShape(hidden=2048, heads=16, kv_heads=8, head_dim=128, mlp=6144)
    encoder: StackShape = StackShape(hidden=2048, heads=16, kv_heads=8, head_dim=128, mlp=6144)
    tokenizer: StackShape = StackShape(hidden=2048, heads=16, kv_heads=8, head_dim=128, mlp=6144)
    decoder_layers: int = 24
    lyric_layers: int = 8
    timbre_layers: int = 4
    tokenizer_layers: int = 2
    detokenizer_layers: int = 2
    patch_size: int = 2
    decoder_in_channels: int = 192  # the decoder's patch input: noisy latent, context latent, chunk mask: 64 each
    audio_channels: int = 64
    sliding_window: int = 128  # even-numbered decoder layers attend within |i - j| <= this
    text_hidden_dim: int = 1024  # Qwen3-0.6B's width
    timbre_hidden_dim: int = 64
    pool_window: int = 5  # 25 Hz latent frames per 5 Hz audio code
    fsq_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
    rms_eps: float = 1e-6
    rope_base: float = 1e6

    @property
    def in_channels(self) -> int:
        """The latent's channels, as Loom's other model configs name them (the context latents and chunk mask the
        decoder also takes are the model's own)."""
        return self.audio_channels

    @property
    def context_dim(self) -> int:
        """The prompt states' width the model takes (the sampler checks prompts against it)."""
        return self.text_hidden_dim


_TINY_STACK = StackShape(hidden=64, heads=16, kv_heads=8, head_dim=4, mlp=192)
TINY_ACE_STEP15 = AceStep15Config(decoder=_TINY_STACK, encoder=_TINY_STACK, tokenizer=_TINY_STACK, decoder_layers=2,
                                  lyric_layers=1, timbre_layers=1, tokenizer_layers=1, detokenizer_layers=2,
                                  sliding_window=4, text_hidden_dim=32)


# --- silence ---------------------------------------------------------------------------------------------------

@functools.cache
def _silence_frames() -> tuple[Tensor, Tensor]:
    data = json.loads(SILENCE_LATENT_FILE.read_text())
    return torch.tensor(data["head"], dtype=torch.float32).T, torch.tensor(data["frame"], dtype=torch.float32)


def silence_latent(length: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Tensor:
    """ACE-Step's latent of silence, [1, 64, length]: four leading frames, then one frame repeated. It stands in
    for the timbre reference (and the context of text-to-music) when the user gives no audio."""
    head, frame = _silence_frames()
    latent = frame[:, None].repeat(1, length)
    latent[:, :head.shape[1]] = head[:, :length]
    return latent[None].to(device=device, dtype=dtype)


# --- building blocks -------------------------------------------------------------------------------------------

def rope(length: int, head_dim: int, base: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Qwen3's rotary cos / sin [length, head_dim]: the frequencies repeated in two halves (rotate-half layout)."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def band_mask(length: int, window: int, device: torch.device) -> Tensor | None:
    """The sliding window as a boolean [length, length] mask (True where |i - j| <= window), or None when the
    window covers the whole sequence."""
    if length <= window + 1:
        return None
    positions = torch.arange(length, device=device)
    return (positions[:, None] - positions[None, :]).abs() <= window


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on queries and keys; rotary positions on self-attention only."""

    def __init__(self, dim: int, shape: StackShape, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = shape.heads, shape.kv_heads, shape.head_dim
        self.q_proj = nn.Linear(dim, shape.heads * shape.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, shape.kv_heads * shape.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, shape.kv_heads * shape.head_dim, bias=False)
        self.o_proj = nn.Linear(shape.heads * shape.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(shape.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(shape.head_dim, eps=eps)

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.heads, self.head_dim))).transpose(1, 2)
        k = self.k_norm(self.k_proj(source).unflatten(-1, (self.kv_heads, self.head_dim))).transpose(1, 2)
        v = self.v_proj(source).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """SwiGLU."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=False)
        self.up_proj = nn.Linear(dim, inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TimestepEmbedding(nn.Module):
    """Sinusoids of 1000 t ([cos, sin], 256 features), a two-layer MLP, and the six AdaLN vectors from it."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_FEATURES, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        half = TIME_FEATURES // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = TIME_FACTOR * t.float()[:, None] * freqs
        features = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.linear_1.bias.dtype)  # not fp8 storage
        temb = self.linear_2(F.silu(self.linear_1(features)))
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class DiTLayer(nn.Module):
    """AdaLN self-attention, plain cross-attention, AdaLN SwiGLU."""

    def __init__(self, config: AceStep15Config):
        super().__init__()
        shape, eps = config.decoder, config.rms_eps
        self.self_attn_norm = nn.RMSNorm(shape.hidden, eps=eps)
        self.self_attn = Attention(shape.hidden, shape, eps)
        self.cross_attn_norm = nn.RMSNorm(shape.hidden, eps=eps)
        self.cross_attn = Attention(shape.hidden, shape, eps)
        self.mlp_norm = nn.RMSNorm(shape.hidden, eps=eps)
        self.mlp = MLP(shape.hidden, shape.mlp)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, shape.hidden))

    def forward(self, x: Tensor, modulation: Tensor, context: Tensor, rope: tuple[Tensor, Tensor],
                mask: Tensor | None) -> Tensor:
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = (self.scale_shift_table + modulation).chunk(6, dim=1)
        x = x + self.self_attn(self.self_attn_norm(x) * (1 + scale) + shift, rope=rope, mask=mask) * gate
        x = x + self.cross_attn(self.cross_attn_norm(x), context=context)
        return x + self.mlp(self.mlp_norm(x) * (1 + mlp_scale) + mlp_shift) * mlp_gate


class Decoder(nn.Module):
    """The flow transformer: patchify [context latents, noisy latent], DiT layers, AdaLN out, unpatchify."""

    def __init__(self, config: AceStep15Config):
        super().__init__()
        self.config = config
        hidden, patch = config.decoder.hidden, config.patch_size
        # Index 1: the original wraps each conv in a Sequential between two rearranges.
        self.proj_in = nn.Sequential(nn.Identity(), nn.Conv1d(config.decoder_in_channels, hidden, patch, stride=patch))
        self.time_embed = TimestepEmbedding(hidden)
        self.time_embed_r = TimestepEmbedding(hidden)
        self.condition_embedder = nn.Linear(config.encoder.hidden, hidden)
        self.layers = nn.ModuleList(DiTLayer(config) for _ in range(config.decoder_layers))
        self.norm_out = nn.RMSNorm(hidden, eps=config.rms_eps)
        self.proj_out = nn.Sequential(nn.Identity(),
                                      nn.ConvTranspose1d(hidden, config.audio_channels, patch, stride=patch))
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, hidden))

    def forward(self, x: Tensor, t: Tensor, r: Tensor, context: Tensor, context_latents: Tensor) -> Tensor:
        """x [B, L, 64], t and r [B], context [B, S, encoder width], context_latents [B, L, 128] -> v [B, L, 64]."""
        temb, modulation = self.time_embed(t)
        temb_r, modulation_r = self.time_embed_r(t - r)
        temb, modulation = temb + temb_r, modulation + modulation_r
        h = torch.cat([context_latents, x], dim=-1)
        length = h.shape[1]
        h = F.pad(h, (0, 0, 0, -length % self.config.patch_size))
        h = self.proj_in(h.transpose(1, 2)).transpose(1, 2)
        context = self.condition_embedder(context)
        shape = self.config.decoder
        rotary = rope(h.shape[1], shape.head_dim, self.config.rope_base, h.device, h.dtype)
        window = band_mask(h.shape[1], self.config.sliding_window, h.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, modulation, context, rotary, window if i % 2 == 0 else None)
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale) + shift
        return self.proj_out(h.transpose(1, 2)).transpose(1, 2)[:, :length]


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and SwiGLU, full attention (as ComfyUI runs every encoder stack)."""

    def __init__(self, shape: StackShape, eps: float):
        super().__init__()
        self.self_attn = Attention(shape.hidden, shape, eps)
        self.input_layernorm = nn.RMSNorm(shape.hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(shape.hidden, eps=eps)
        self.mlp = MLP(shape.hidden, shape.mlp)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope=rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderStack(nn.Module):
    """Input projection (`embed_tokens`), encoder layers with rotary positions, final RMSNorm."""

    def __init__(self, in_dim: int, shape: StackShape, layers: int, config: AceStep15Config):
        super().__init__()
        self.head_dim, self.rope_base = shape.head_dim, config.rope_base
        self.embed_tokens = nn.Linear(in_dim, shape.hidden)
        self.layers = nn.ModuleList(EncoderLayer(shape, config.rms_eps) for _ in range(layers))
        self.norm = nn.RMSNorm(shape.hidden, eps=config.rms_eps)

    def run(self, h: Tensor) -> Tensor:
        """The layers and the norm over already embedded tokens [N, S, hidden]."""
        rotary = rope(h.shape[1], self.head_dim, self.rope_base, h.device, h.dtype)
        for layer in self.layers:
            h = layer(h, rotary)
        return self.norm(h)


class LyricEncoder(EncoderStack):
    def __init__(self, config: AceStep15Config):
        super().__init__(config.text_hidden_dim, config.encoder, config.lyric_layers, config)

    def forward(self, lyric_embed: Tensor) -> Tensor:
        return self.run(self.embed_tokens(lyric_embed))


class TimbreEncoder(EncoderStack):
    def __init__(self, config: AceStep15Config):
        super().__init__(config.timbre_hidden_dim, config.encoder, config.timbre_layers, config)
        self.special_token = nn.Parameter(torch.zeros(1, 1, config.encoder.hidden))  # in the file, unused

    def forward(self, reference: Tensor) -> Tensor:
        """reference [B, Lr, 64] -> one timbre token per item [B, 1, hidden] (the first position's state)."""
        return self.run(self.embed_tokens(reference))[:, :1]


class ConditionEncoder(nn.Module):
    def __init__(self, config: AceStep15Config):
        super().__init__()
        self.text_projector = nn.Linear(config.text_hidden_dim, config.encoder.hidden, bias=False)
        self.lyric_encoder = LyricEncoder(config)
        self.timbre_encoder = TimbreEncoder(config)

    def forward(self, text: Tensor, lyric_embed: Tensor, reference: Tensor) -> Tensor:
        """[lyric states, timbre token, projected caption states] along the sequence."""
        return torch.cat([self.lyric_encoder(lyric_embed), self.timbre_encoder(reference),
                          self.text_projector(text)], dim=1)


class AttentionPooler(EncoderStack):
    """Each window of latent frames, behind a learned token, through the stack; the token's state is the window's."""

    def __init__(self, config: AceStep15Config):
        shape = config.tokenizer
        super().__init__(shape.hidden, shape, config.tokenizer_layers, config)
        self.special_token = nn.Parameter(torch.zeros(1, 1, shape.hidden))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, window, hidden] -> [B, N, hidden]."""
        batch, windows, size, hidden = x.shape
        h = self.embed_tokens(x)
        h = torch.cat([self.special_token.expand(batch, windows, 1, hidden).to(h.dtype), h], dim=2)
        return self.run(h.reshape(batch * windows, size + 1, hidden))[:, 0].reshape(batch, windows, hidden)


class ResidualFSQ(nn.Module):
    """ACE-Step's one-quantizer residual FSQ: project to 6 dims, bound (a soft clamp, then tanh), round each dim to
    its level's grid, project back. Code index = sum of each dim's level digit times the product of earlier levels."""

    def __init__(self, config: AceStep15Config):
        super().__init__()
        self.levels = config.fsq_levels
        self.project_in = nn.Linear(config.tokenizer.hidden, len(self.levels))
        self.project_out = nn.Linear(len(self.levels), config.tokenizer.hidden)

    def _levels(self, like: Tensor) -> Tensor:
        return torch.tensor(self.levels, device=like.device, dtype=torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        levels = self._levels(x)
        z = self.project_in(x).float()
        soft_clamp = 1 + 1 / (levels - 1)
        z = (z / soft_clamp).tanh() * soft_clamp
        digits = torch.floor((levels - 1) * (z.tanh() + 1) / 2 + 0.5)
        codes = digits * (2 / (levels - 1)) - 1
        return self.project_out(codes.to(x.dtype))

    def output_from_indices(self, indices: Tensor, dtype: torch.dtype) -> Tensor:
        """Code indices [B, N] (0 .. prod(levels) - 1) -> the quantizer's output [B, N, hidden]."""
        levels = self._levels(indices)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0)
        digits = torch.div(indices.long()[..., None], basis.long(), rounding_mode="floor") % levels.long()
        codes = digits.float() * (2 / (levels - 1)) - 1
        return self.project_out(codes.to(dtype))


class AudioTokenizer(nn.Module):
    """25 Hz latents -> 5 Hz quantized vectors (the FSQ's output; the indices are not needed here)."""

    def __init__(self, config: AceStep15Config):
        super().__init__()
        self.window = config.pool_window
        self.audio_acoustic_proj = nn.Linear(config.audio_channels, config.tokenizer.hidden)
        self.attention_pooler = AttentionPooler(config)
        self.quantizer = ResidualFSQ(config)

    def forward(self, latents: Tensor) -> Tensor:
        """latents [B, L, 64] (zero-padded to whole windows) -> [B, ceil(L / 5), hidden]."""
        latents = F.pad(latents, (0, 0, 0, -latents.shape[1] % self.window))
        windows = latents.unflatten(1, (-1, self.window))
        return self.quantizer(self.attention_pooler(self.audio_acoustic_proj(windows)))


class AudioTokenDetokenizer(EncoderStack):
    """5 Hz vectors -> 25 Hz 64-channel hints: each vector copied into a window of learned tokens, run through the
    stack window by window, projected to latent channels."""

    def __init__(self, config: AceStep15Config):
        shape = config.tokenizer
        super().__init__(shape.hidden, shape, config.detokenizer_layers, config)
        self.norm = nn.RMSNorm(shape.hidden)  # no epsilon: the dtype's, as ComfyUI builds this norm
        self.special_tokens = nn.Parameter(torch.zeros(1, config.pool_window, shape.hidden))
        self.proj_out = nn.Linear(shape.hidden, config.audio_channels)

    def forward(self, vectors: Tensor) -> Tensor:
        batch, tokens, hidden = vectors.shape
        h = self.embed_tokens(vectors)[:, :, None] + self.special_tokens[None].to(vectors.dtype)
        h = self.run(h.reshape(batch * tokens, -1, hidden))
        return self.proj_out(h).reshape(batch, -1, self.proj_out.out_features)


# --- the model -------------------------------------------------------------------------------------------------

def _batched(x: Tensor, batch: int, what: str) -> Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"{what} has a batch of {x.shape[0]}, the latent {batch}")
    return x.expand(batch, *x.shape[1:])


class AceStep15Model(nn.Module):
    """ACE-Step 1.5's diffusion model in the original layout (see the module's docstring for how it is called)."""

    def __init__(self, config: AceStep15Config = AceStep15Config()):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.encoder = ConditionEncoder(config)
        self.tokenizer = AudioTokenizer(config)
        self.detokenizer = AudioTokenDetokenizer(config)
        self.null_condition_emb = nn.Parameter(torch.zeros(1, 1, config.encoder.hidden))

    def lm_hints(self, length: int, reference: Tensor, audio_codes: Tensor | None) -> Tensor:
        """The 25 Hz hints [B, length, 64]: from the audio codes (padded with the silence code up to
        ceil(length / 5)) or else from the reference [B, Lr, 64] through tokenizer and detokenizer."""
        if audio_codes is not None:
            missing = math.ceil(length / self.config.pool_window) - audio_codes.shape[1]
            if missing > 0:
                audio_codes = F.pad(audio_codes, (0, missing), value=PAD_AUDIO_CODE)
            vectors = self.tokenizer.quantizer.output_from_indices(audio_codes, reference.dtype)
        else:
            vectors = self.tokenizer(reference)
        hints = self.detokenizer(vectors)
        if hints.shape[1] < length:
            raise ValueError(f"the timbre reference has {reference.shape[1]} frames, the latent {length}: its hints "
                             "cannot cover it (give audio codes or a reference at least as long)")
        return hints[:, :length]

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, lyric_embed: Tensor, refer_audio: Tensor,
                audio_codes: Tensor | None = None, is_covers: bool | None = None,
                null_condition: bool | Tensor = False) -> Tensor:
        """The flow velocity (noise - x0) [B, 64, L] of the noisy latent x [B, 64, L] at flow times `timesteps` [B].

        context: the caption's Qwen3-0.6B last hidden states [B, Lt, 1024]; lyric_embed: the lyrics' Qwen3-0.6B
        token embeddings [B, Ll, 1024]; refer_audio: timbre reference latents [B or 1, 64, Lr] (the silence latent
        when the user gives none); audio_codes: 5 Hz code indices [B or 1, N]; is_covers False takes the reference
        itself (Lr = L) as the context latents instead of its hints; null_condition: the unconditional branch, for
        the whole batch (a bool) or per item (a [B] bool tensor: cond and uncond batched together)."""
        batch, length = x.shape[0], x.shape[2]
        latent = x.transpose(1, 2)
        reference = _batched(refer_audio, batch, "refer_audio").transpose(1, 2).to(latent.dtype)
        null = torch.as_tensor(null_condition, device=x.device).reshape(-1).expand(batch)
        if bool(null.all()):  # nothing of the prompt is seen: its shape is all the encoder would give
            states = lyric_embed.shape[1] + 1 + context.shape[1]
            encoded = self.null_condition_emb.to(latent.dtype).expand(batch, states, -1)
        else:
            encoded = self.encoder(_batched(context, batch, "context").to(latent.dtype),
                                   _batched(lyric_embed, batch, "lyric_embed").to(latent.dtype), reference)
            encoded = torch.where(null[:, None, None], self.null_condition_emb.to(encoded.dtype), encoded)
        if is_covers is False:
            if reference.shape[1] != length:
                raise ValueError(f"is_covers=False takes the reference as the context latents: it has "
                                 f"{reference.shape[1]} frames, the latent {length}")
            source = reference
        else:
            codes = None if audio_codes is None else _batched(audio_codes, batch, "audio_codes")
            source = self.lm_hints(length, reference, codes)
        context_latents = torch.cat([source, torch.ones_like(latent)], dim=-1)
        t = timesteps.float().expand(batch)  # float32 however the model runs, as ComfyUI passes it
        return self.decoder(latent, t, t, encoded, context_latents).transpose(1, 2)


# --- reading and writing files ---------------------------------------------------------------------------------

def is_ace_step15(sd: Mapping[str, object]) -> bool:
    """Whether a state dict (or a header's shapes) holds ACE-Step 1.5's model in the original layout (prefix
    `model.diffusion_model.` stripped)."""
    return all(k in sd for k in _PROBE)


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"no {key}: not ACE-Step 1.5's model in the original layout")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    numbers = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if numbers != set(range(len(numbers))):
        raise CheckpointError(f"{prefix}* are numbered {sorted(numbers)}, not from 0 without gaps")
    return len(numbers)


def _stack_shape(sd: Mapping[str, Tensor], layer: str) -> StackShape:
    head_dim = _shape(sd, layer + "self_attn.q_norm.weight")[0]
    queries, hidden = _shape(sd, layer + "self_attn.q_proj.weight")
    return StackShape(hidden=hidden, heads=queries // head_dim,
                      kv_heads=_shape(sd, layer + "self_attn.k_proj.weight")[0] // head_dim,
                      head_dim=head_dim, mlp=_shape(sd, layer + "mlp.gate_proj.weight")[0])


def config_from_state_dict(sd: Mapping[str, Tensor], sliding_window: int = AceStep15Config.sliding_window,
                           ) -> AceStep15Config:
    """The config of an ACE-Step 1.5 file's state dict (or a header's shapes), every size from the weights' shapes.
    The sliding window, the FSQ levels (6 of them: checked) and the RoPE base are not in the weights: ACE-Step's."""
    hidden, in_channels, patch = _shape(sd, "decoder.proj_in.1.weight")
    codebook_dim = _shape(sd, "tokenizer.quantizer.project_in.weight")[0]
    if codebook_dim != len(AceStep15Config.fsq_levels):
        raise CheckpointError(f"the FSQ has {codebook_dim} dims, ACE-Step's levels are {AceStep15Config.fsq_levels}")
    try:
        return AceStep15Config(
            decoder=_stack_shape(sd, "decoder.layers.0."),
            encoder=_stack_shape(sd, "encoder.lyric_encoder.layers.0."),
            tokenizer=_stack_shape(sd, "tokenizer.attention_pooler.layers.0."),
            decoder_layers=_count(sd, "decoder.layers."),
            lyric_layers=_count(sd, "encoder.lyric_encoder.layers."),
            timbre_layers=_count(sd, "encoder.timbre_encoder.layers."),
            tokenizer_layers=_count(sd, "tokenizer.attention_pooler.layers."),
            detokenizer_layers=_count(sd, "detokenizer.layers."),
            patch_size=patch, decoder_in_channels=in_channels,
            audio_channels=_shape(sd, "decoder.proj_out.1.weight")[1],
            sliding_window=sliding_window,
            text_hidden_dim=_shape(sd, "encoder.text_projector.weight")[1],
            timbre_hidden_dim=_shape(sd, "encoder.timbre_encoder.embed_tokens.weight")[1],
            pool_window=_shape(sd, "detokenizer.special_tokens")[1])
    except ValueError as e:
        raise CheckpointError(f"ACE-Step 1.5 weights of a shape Loom cannot run: {e}") from None


def load_ace_step15(sd: Mapping[str, Tensor], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32,
                    sliding_window: int = AceStep15Config.sliding_window) -> AceStep15Model:
    """The model holding exactly `sd` (prefix stripped), on `device` in `dtype`: a missing or an extra key is an
    error. The sliding window is not in the weights (Loom's files record theirs under WINDOW_KEY, which
    `ldm.ace_step15_files` reads)."""
    with torch.device("meta"):
        model = AceStep15Model(config_from_state_dict(sd, sliding_window))
    model.load_state_dict({k: v.to(device, dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_ace_step15(config: AceStep15Config = TINY_ACE_STEP15, seed: int = 0) -> AceStep15Model:
    """A model with seeded random weights, each distinct (norm scales near 1, small biases, matrices at
    1/sqrt(fan-in))."""
    return distinct_random_(AceStep15Model(config).eval(), seed, norm_scales=("norm.weight",))


def write_tiny_ace_step15(path: str | Path, seed: int = 0, text_hidden: int = 32) -> Path:
    """Write a random tiny ACE-Step 1.5 file in the original layout (TINY_ACE_STEP15, its caption / lyric width
    `text_hidden`: the tiny text encoder's); returns the path. Its music is noise."""
    config = dataclasses.replace(TINY_ACE_STEP15, text_hidden_dim=text_hidden)
    path = Path(path)
    write_safetensors(random_ace_step15(config, seed).state_dict(), path,
                      {"loom.seed": str(seed), WINDOW_KEY: str(config.sliding_window)})
    return path
