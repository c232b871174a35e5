"""The LTX-2 audio-video transformer (Lightricks, 19B; ComfyUI's "LTXAV"), with its text embeddings connectors.

File layout: Lightricks' single file (`ltx-2-19b-dev.safetensors`, its fp8 and distilled copies) holds the transformer
under `model.diffusion_model.` (`MODEL_KEYS_PREFIX`); `LTX2Model` takes exactly those keys, prefix stripped:

    patchify_proj, audio_patchify_proj                      latent channels -> width (video 4096, audio 2048)
    adaln_single, audio_adaln_single                        timestep -> 6 modulations per block, and the output's
    av_ca_video_scale_shift_adaln_single, av_ca_a2v_gate_adaln_single,
    av_ca_audio_scale_shift_adaln_single, av_ca_v2a_gate_adaln_single
                                                            timestep -> the audio<->video cross-attention's 4 scale /
                                                            shift and 1 gate modulations (per stream)
    caption_projection, audio_caption_projection            connector output (3840) -> each stream's width
    video_embeddings_connector, audio_embeddings_connector  the text connectors (`preprocess_text_embeds`)
    transformer_blocks.N                                    attn1, attn2, ff, scale_shift_table [6, D] (video);
                                                            audio_attn1, audio_attn2, audio_ff, audio_scale_shift_table;
                                                            audio_to_video_attn, video_to_audio_attn,
                                                            scale_shift_table_a2v_ca_video [5, D],
                                                            scale_shift_table_a2v_ca_audio [5, Da]
    scale_shift_table, audio_scale_shift_table, proj_out, audio_proj_out   the output layers

LTX-2.3 (22B; the same names, found from the weights) differs: every attention of the blocks has `to_gate_logits`
[heads, query width] (each head's output times 2 sigmoid of it, of the attention's query input); the blocks' tables
have 9 rows, rows 6-8 shifting, scaling and gating the prompt cross-attention's query, with
`prompt_scale_shift_table` / `audio_prompt_scale_shift_table` [2, D] plus `prompt_adaln_single` /
`audio_prompt_adaln_single` (of each item's largest level) shifting and scaling the prompt; no caption projections
(the connectors are as wide as their streams, 4096 and 2048, 32 heads, their attention gated too, and take each
stream's own features from the text encoder).

`config_from_state_dict` reads every width from the weights; what no shape tells (head counts: 32 and 32, the
connectors' 30; the RoPE settings and the cross-attention gate's timestep scale) ComfyUI reads from the file's
`config` metadata (its `transformer` section, `LTX2Config.from_metadata`) and defaults as `LTX2Config` does
(LTX-2.0: split RoPE from float64 frequencies, causal first frame, middle-of-token positions, gate scale 1000;
ComfyUI's own defaults for a file without that metadata differ: interleaved RoPE, float32, no causal fix, span
starts, gate scale 1).
`convert_diffusers_state_dict` renames diffusers' `LTX2VideoTransformer3DModel` (and `LTX2TextConnectors`)
keys to this layout.

Latents: video [B, 128, F, H, W] (LTX-2's VAE: 1 + 8 (F - 1) frames, 32x32 pixels per latent pixel), one token per
latent pixel; audio [B, 8, T, 16] (8 channels x 16 mel bins, 25 latent frames a second: 16 kHz mel, hop 160,
4x downsampled), one token per latent frame whose 128 features are (channel, bin) in that order.

Each block, as ComfyUI's `BasicAVTransformerBlock`: per stream, RMS-normed self-attention modulated by the stream's
timestep (shift / scale / gate), then RMS-normed cross-attention to the stream's prompt (unmodulated); then audio-
to-video (video queries audio) and video-to-audio cross-attention, both from the RMS norms taken before either, each
side's input shifted / scaled by `scale_shift_table_a2v_ca_*` plus the av_ca scale-shift embedding of its own
stream's (per-token) timestep, the result gated by the gate embedding of the OTHER stream's largest timestep (over
the whole batch) times av_ca_timestep_scale / timestep_scale (ComfyUI since its PR #14097, May 2026, written by
Lightricks; before it every modulation took the stream's own timestep); then each stream's modulated GELU MLP.
Queries and keys are RMS-normed over all heads (eps 1e-5, as ComfyUI) before RoPE.

RoPE ("split": each head's channels in two halves rotated against each other; "interleaved": channel pairs), at
fractional positions (coordinate / maximum, then 2 x - 1), frequencies theta ** linspace(0, 1) * pi / 2 per axis:

    video self-attention  (seconds, pixel row, pixel column) / (20, 2048, 2048), where a latent pixel spans frames
                          [8 f - 7, 8 f + 1) clamped at 0 (the causal first frame), divided by `frame_rate`, rows
                          [32 r, 32 r + 32), columns likewise; the middle of each span (`use_middle_indices_grid`)
    audio self-attention  seconds / 20: latent frame t spans mel frames [4 t - 3, 4 t + 1) clamped at 0, times
                          160 / 16000
    audio<->video         the time axis alone (video seconds as above, audio seconds), middle of the span, over the
                          audio width and heads, maximum max(20, 20)

Timesteps are flow levels (sigma 0..1) as ComfyUI passes them (its LTXAV samples as a FLUX-type model: the model
gets sigma itself, no multiplier), scaled by 1000 here; the video's may be one per latent pixel [B, F * H * W] and
the audio's one per latent frame [B, T] (ComfyUI's denoise masks for conditioned frames).

Text: Gemma 3's stacked states, normalised and projected to 3840 by the text encoder's `text_embedding_projection`
(not in this module; LTX-2.3: per-stream projections to 4096 and 2048, side by side), go through each connector: the
prompt's tokens moved to the front and the rest of max(1024, L) rounded up to the register count filled with the
learnable registers (by absolute position), then its blocks (2 in LTX-2.0; counted from the weights) of RMS-normed
self-attention (1-D RoPE of the model's type over positions / 4096, 30 heads) and GELU MLP, and a final RMS norm;
every token, registers included, is attended to afterwards.

Differences from diffusers 0.42.1 (ComfyUI's followed): q / k norm eps 1e-5 (diffusers 1e-6); the av cross-attention
gates take the other stream's largest timestep, the scale / shift the stream's own (diffusers takes one timestep for
both: its own with use_cross_timestep=False, the other stream's, per item, with True, its pipeline's default; all
agree when both streams share one level per item and the batch shares it); the video-side cross RoPE splits over the
audio heads (diffusers the video heads; both 32 in LTX-2); ComfyUI runs the connector on an unpadded prompt padded
to 1024 with registers, diffusers on the tokenizer's padding (equal when diffusers' prompt is padded to 1024); masks
are -finfo.max biases (diffusers -10000); LTX-2.3's prompt modulation takes each item's largest level (diffusers the
`sigma` it is given). Not supported: a prompt projection before the connectors (ComfyUI's
caption_proj_before_connector with a first linear; refused by `config_from_state_dict`). ComfyUI's guidance
switches (ID-LoRA reference audio tokens, STG's value passthrough, severed audio<->video cross-attention) are
`LTX2Model.forward`'s keywords (`ldm.ltx2_guidance` runs the passes).

Keyframe guides (LTXVAddGuide's frames appended after the video's, their positions `keyframe_idxs`) of strength
other than 1, or with an attention mask, are attended to less (or more), as ComfyUI's
LTXVModel._build_guide_self_attention_mask does from the conditioning's `guide_attention_entries`: the video
self-attention (every block's attn1; not the audio's, the prompt's nor the audio<->video cross-attention) gets an
additive logit bias (`guide_attention_bias`), the same for every head, log(weight) (in the model's dtype; finfo.min at
0) between each token before the guides and each guide token, both ways, 0 elsewhere (the video among itself, the
guides among themselves); none at all when every weight is 1. A token's weight is its guide's strength, times its
attention mask's mean over the pixels it stands for. A bias of log(w) multiplies a key's softmax weight by w before
the normalisation. IC-LoRA guides encoded smaller and spread over the full grid have holes, whose noise mask is
negative: those tokens are left out of the model altogether (`kept_tokens`, ComfyUI's grid mask).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.ltxv import CaptionProjection, FeedForward, TimestepEmbedding
from ldm.unet import timestep_embedding

MODEL_KEYS_PREFIX = "model.diffusion_model."
TIMESTEP_CHANNELS = 256
CONNECTOR_MIN_TOKENS = 1024  # ComfyUI pads every prompt to at least this many tokens with the registers
AUDIO_CHANNELS, AUDIO_BINS = 8, 16
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
_CONNECTOR_BLOCK = re.compile(r"video_embeddings_connector\.transformer_1d_blocks\.(\d+)\.")


@dataclass(frozen=True)
class LTX2Config:
    """Shape and settings of an LTX-2 transformer (defaults: LTX-2.0 19B)."""

    in_channels: int = 128
    out_channels: int = 128
    num_heads: int = 32
    head_dim: int = 128
    depth: int = 48
    caption_channels: int = 3840
    audio_in_channels: int = 128
    audio_out_channels: int = 128
    audio_num_heads: int = 32
    audio_head_dim: int = 64
    connector_dim: int = 3840  # the video connector's width (LTX-2.3: the video width, 4096)
    connector_heads: int = 30
    audio_connector_dim: int = 3840  # LTX-2.3: the audio width, 2048
    audio_connector_heads: int = 30
    connector_depth: int = 2
    connector_registers: int = 128  # 0: none
    connector_gated_attention: bool = False  # LTX-2.3's connectors' per-head gates
    caption_projection: bool = True  # LTX-2.0's connector output -> stream width MLPs (LTX-2.3 has none)
    gated_attention: bool = False  # LTX-2.3: every block attention's per-head gate (`to_gate_logits`)
    cross_attention_adaln: bool = False  # LTX-2.3: timestep-modulated prompt cross-attention (9-row tables)
    theta: float = 10000.0
    max_pos: tuple[float, float, float] = (20.0, 2048.0, 2048.0)
    audio_max_pos: float = 20.0
    connector_max_pos: float = 4096.0
    rope_type: str = "split"  # or "interleaved"
    rope_float64: bool = True  # ComfyUI's frequencies_precision "float64"
    causal_temporal_positioning: bool = True
    use_middle_indices_grid: bool = True
    timestep_scale: float = 1000.0
    av_ca_timestep_scale: float = 1000.0
    vae_scale: tuple[int, int, int] = (8, 32, 32)
    audio_sample_rate: int = 16000
    audio_hop_length: int = 160
    audio_downsample: int = 4

    def __post_init__(self) -> None:
        if self.rope_type not in ("split", "interleaved"):
            raise ValueError(f"rope_type is 'split' or 'interleaved', not {self.rope_type!r}")
        for width, heads in ((self.connector_dim, self.connector_heads),
                             (self.audio_connector_dim, self.audio_connector_heads)):
            if width % heads:
                raise ValueError(f"the connector width {width} does not split into {heads} heads")
        if not self.caption_projection and (self.connector_dim, self.audio_connector_dim) != (
                self.inner_dim, self.audio_inner_dim):
            raise ValueError("without caption projections the connectors must be as wide as their streams")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def audio_inner_dim(self) -> int:
        return self.audio_num_heads * self.audio_head_dim

    @property
    def context_dim(self) -> int:
        """The text feature width the connectors take (the text encoder's projection's; LTX-2.3: both streams'
        features side by side)."""
        return self.caption_channels if self.caption_projection else self.connector_dim + self.audio_connector_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    def from_metadata(self, metadata: Mapping[str, str] | None) -> LTX2Config:
        """This config with the settings the file's `config` metadata (JSON, `transformer` section, Lightricks'
        names, as ComfyUI reads it) states; shapes stay as the weights tell."""
        t = _metadata_transformer(metadata)
        names = {"positional_embedding_theta": "theta", "rope_type": "rope_type",
                 "causal_temporal_positioning": "causal_temporal_positioning",
                 "use_middle_indices_grid": "use_middle_indices_grid",
                 "timestep_scale_multiplier": "timestep_scale",
                 "av_ca_timestep_scale_multiplier": "av_ca_timestep_scale"}
        changes = {ours: t[theirs] for theirs, ours in names.items() if theirs in t}
        if "frequencies_precision" in t:
            changes["rope_float64"] = t["frequencies_precision"] == "float64"
        if "positional_embedding_max_pos" in t:
            changes["max_pos"] = tuple(float(v) for v in t["positional_embedding_max_pos"])
        if "audio_positional_embedding_max_pos" in t:
            changes["audio_max_pos"] = float(t["audio_positional_embedding_max_pos"][0])
        return replace(self, **changes)


def _metadata_transformer(metadata: Mapping[str, str] | None) -> dict:
    """The `transformer` section of a file's `config` metadata (JSON), or {}."""
    return json.loads(metadata["config"]).get("transformer", {}) if metadata and "config" in metadata else {}


def tiny_config(**changes: object) -> LTX2Config:
    """A small LTX-2 (2 layers, width 64, 2 heads; audio 32 wide) that builds in milliseconds, for tests; see
    `tiny_config_23` for LTX-2.3's layout."""
    base = LTX2Config(in_channels=16, out_channels=16, num_heads=2, head_dim=32, depth=2, caption_channels=48,
                      audio_in_channels=AUDIO_CHANNELS * AUDIO_BINS, audio_out_channels=AUDIO_CHANNELS * AUDIO_BINS,
                      audio_num_heads=2, audio_head_dim=16, connector_dim=48, connector_heads=2,
                      audio_connector_dim=48, audio_connector_heads=2, connector_depth=2, connector_registers=8)
    return replace(base, **changes)


def tiny_config_23(**changes: object) -> LTX2Config:
    """`tiny_config` in LTX-2.3's layout: gated attention everywhere, modulated prompt cross-attention, no caption
    projections (the connectors as wide as their streams)."""
    return tiny_config(caption_channels=64, connector_dim=64, audio_connector_dim=32, connector_gated_attention=True,
                       caption_projection=False, gated_attention=True, cross_attention_adaln=True,
                       **changes)


# ---------------------------------------------------------------------------------------------------------- RoPE


def rope_frequencies(positions: Tensor, maxima: tuple[float, ...], dim: int, heads: int, c: LTX2Config
                     ) -> tuple[Tensor, Tensor]:
    """(cos, sin) of LTX's RoPE at `positions` [B, A, S] (A axes, in their units) for attention `dim` wide over
    `heads`: split [B, heads, S, dim / heads / 2], interleaved [B, S, dim]; the frequencies missing to fill the
    width (dim % (2 A) channels) are unrotated, first."""
    axes = positions.shape[1]
    grid_dtype = torch.float64 if c.rope_float64 else torch.float32
    freqs = (c.theta ** torch.linspace(0.0, 1.0, dim // (2 * axes), dtype=grid_dtype, device=positions.device)
             * math.pi / 2).to(torch.float32)
    fractions = positions.float() / torch.tensor(maxima, dtype=torch.float32, device=positions.device)[:, None]
    angles = (freqs * (fractions.transpose(1, 2)[..., None] * 2 - 1)).transpose(-1, -2).flatten(2)  # [B, S, n]
    if c.rope_type == "interleaved":
        pad = dim - 2 * angles.shape[-1]
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
        return F.pad(cos, (pad, 0), value=1.0), F.pad(sin, (pad, 0), value=0.0)
    pad = dim // 2 - angles.shape[-1]
    cos, sin = F.pad(angles.cos(), (pad, 0), value=1.0), F.pad(angles.sin(), (pad, 0), value=0.0)
    return cos.unflatten(-1, (heads, -1)).transpose(1, 2), sin.unflatten(-1, (heads, -1)).transpose(1, 2)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate `x` [B, S, H * D] by `rope` (see `rope_frequencies`; its shape tells split from interleaved)."""
    cos, sin = rope
    if cos.ndim == 3:  # interleaved: channel pairs (2i, 2i + 1)
        real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)
    heads = cos.shape[1]
    xs = x.unflatten(-1, (heads, 2, -1)).transpose(1, 2).float()  # [B, H, S, 2, D / 2]
    first, second = xs.unbind(-2)
    cos, sin = cos.float(), sin.float()
    out = torch.stack([first * cos - second * sin, second * cos + first * sin], dim=-2)
    return out.transpose(1, 2).flatten(2).to(x.dtype)


def video_positions(batch: int, frames: int, rows: int, cols: int, frame_rate: float, c: LTX2Config,
                    device: torch.device | str = "cpu", keyframe_idxs: Tensor | None = None,
                    kept: Tensor | None = None) -> Tensor:
    """[B, 3, F * H * W, 2]: each latent pixel's [start, end) in (seconds, pixel rows, pixel columns); the last K
    tokens' spans replaced by `keyframe_idxs` [1 or B, 3, K, 2] (pixel frames, rows, columns: ComfyUI's, for
    keyframe guides appended after the video's frames) before the frames become seconds; only the tokens `kept`
    [F * H * W] marks (bool; None: all), in order, where the model drops the others (IC-LoRA guides' holes)."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device)
                                        for n in (frames, rows, cols)), indexing="ij")).flatten(1)
    spans = torch.stack([grid, grid + 1], dim=-1) * torch.tensor(c.vae_scale, dtype=torch.float32,
                                                                 device=device)[:, None, None]
    if c.causal_temporal_positioning:
        spans[0] = (spans[0] + 1 - c.vae_scale[0]).clamp(min=0)
    spans = spans.expand(batch, -1, -1, -1).clone()
    if keyframe_idxs is not None:
        tokens = keyframe_idxs.shape[2]
        if keyframe_idxs.ndim != 4 or keyframe_idxs.shape[1] != 3 or keyframe_idxs.shape[3] != 2 \
                or tokens > spans.shape[2]:
            raise ValueError(f"keyframe_idxs {list(keyframe_idxs.shape)} are not [B, 3, K, 2] spans of the last "
                             f"K of {spans.shape[2]} tokens")
        spans[:, :, spans.shape[2] - tokens:] = keyframe_idxs.to(spans)
    if kept is not None:
        spans = spans[:, :, kept.to(spans.device)]
    spans[:, 0] = spans[:, 0] / frame_rate
    return spans


def audio_positions(batch: int, frames: int, c: LTX2Config, device: torch.device | str = "cpu") -> Tensor:
    """[B, 1, T, 2]: each audio latent frame's [start, end) in seconds (the mel frames it stands for, causal)."""
    t = torch.arange(frames, dtype=torch.float32, device=device)
    mel = torch.stack([t, t + 1], dim=-1) * c.audio_downsample
    mel = (mel + 1 - c.audio_downsample).clamp(min=0)
    return (mel * c.audio_hop_length / c.audio_sample_rate).expand(batch, 1, -1, -1)


def reference_audio_positions(batch: int, frames: int, c: LTX2Config, device: torch.device | str = "cpu") -> Tensor:
    """[B, 1, R, 2]: a reference clip's latent frames' spans in seconds, as `audio_positions`, shifted to end one
    latent frame's time (hop x downsampling) before 0, the audio's start (ComfyUI's ID-LoRA convention)."""
    spans = audio_positions(batch, frames, c, device)
    last_end = max(frames * c.audio_downsample + 1 - c.audio_downsample, 0)  # in mel frames
    return spans - (last_end + c.audio_downsample) * c.audio_hop_length / c.audio_sample_rate


def guide_attention_bias(guide_attention: Tensor, tokens: int, guide_tokens: int, dtype: torch.dtype,
                         kept: Tensor | None = None) -> Tensor | None:
    """ComfyUI's per-guide attention control (LTXVModel._build_guide_self_attention_mask): the video
    self-attention's additive bias [B or 1, 1, S, S] over the `tokens` S the model runs, the last of them the guide
    tokens it keeps. `guide_attention` [B, K, 2] covers all `guide_tokens` K keyframe tokens in the order the guides
    were appended: each token's guide (0, 1, ...) and a weight; a guide's weights go to its kept tokens (`kept` [K],
    bool; None: all) in order: its strength, times its pixel mask's where it has one (`nodes.sd.ltx2`). Between
    every token before the guides and each guide token, both ways: log(weight) in `dtype` (clamped at its smallest
    normal; finfo.min at 0; above 0 for a weight above 1, which draws attention to the guide), 0 elsewhere; one row
    for the batch where its items agree. None (no bias) where every weight is 1."""
    if guide_attention.ndim != 3 or tuple(guide_attention.shape[1:]) != (guide_tokens, 2):
        raise ValueError(f"guide attention {list(guide_attention.shape)} is not [B, {guide_tokens}, 2]: one (guide, "
                         f"weight) per keyframe token")
    guides = guide_attention[..., 0].round().long()
    if (guides != guides[:1]).any():
        raise ValueError("the batch's items number their guide tokens differently")
    kept = torch.ones(guide_tokens, dtype=torch.bool) if kept is None else kept.cpu()
    if kept.shape != (guide_tokens,):
        raise ValueError(f"{kept.shape[0]} kept marks for {guide_tokens} guide tokens")
    pieces, start = [], 0
    for count in torch.unique_consecutive(guides[0].cpu(), return_counts=True)[1].tolist():
        pieces.append(guide_attention[:, start:start + int(kept[start:start + count].sum()), 1])
        start += count
    weights = torch.cat(pieces, dim=1).to(dtype)  # [B, K'] over the kept guide tokens
    if weights.shape[1] > tokens:
        raise ValueError(f"{weights.shape[1]} guide tokens among {tokens} tokens")
    if bool((weights == 1).all()):
        return None
    if bool((weights == weights[:1]).all()):
        weights = weights[:1]
    finfo = torch.finfo(dtype)
    log_weights = torch.where(weights > 0, weights.clamp(min=finfo.tiny).log(), finfo.min)
    start = tokens - weights.shape[1]
    bias = weights.new_zeros(weights.shape[0], 1, tokens, tokens)
    bias[:, 0, :start, start:] = log_weights[:, None, :]
    bias[:, 0, start:, :start] = log_weights[:, :, None]
    return bias


def _point(spans: Tensor, middle: bool) -> Tensor:
    """[B, A, S] positions from [B, A, S, 2] spans: their middles, or their starts (ComfyUI's two choices)."""
    return spans.mean(-1) if middle else spans[..., 0]


# ------------------------------------------------------------------------------------------------------- layers


def _norm(x: Tensor) -> Tensor:
    """RMS norm without a scale (eps 1e-6), in float32."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)


class Attention(nn.Module):
    """Lightricks' attention: q / k RMS-normed over all heads (eps 1e-5), RoPE on q and k (each its own); `gated`
    (LTX-2.3): each head's output times 2 sigmoid(`to_gate_logits`(query input))."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, gated: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.q_norm = nn.RMSNorm(inner, eps=1e-5)
        self.k_norm = nn.RMSNorm(inner, eps=1e-5)
        self.to_gate_logits = nn.Linear(query_dim, heads) if gated else None
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # the key is to_out.0

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None,
                k_rope: tuple[Tensor, Tensor] | None = None, bias: Tensor | None = None,
                passthrough: bool = False) -> Tensor:
        """`passthrough` (a self-attention's, for spatio-temporal guidance): each token's own value, no queries,
        keys, RoPE nor bias, as ComfyUI's CrossAttention with `stg_skip_self_attn`; still gated and projected."""
        if passthrough:
            if context is not None:
                raise ValueError("only a self-attention passes its values through")
            out = self.to_v(x).unflatten(-1, (self.heads, -1))  # [B, S, H, D]
        else:
            context = x if context is None else context
            q, k, v = self.q_norm(self.to_q(x)), self.k_norm(self.to_k(context)), self.to_v(context)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope if k_rope is None else k_rope)
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)  # [B, S, H, D]
        if self.to_gate_logits is not None:
            out = out * (2 * torch.sigmoid(self.to_gate_logits(x)))[..., None]
        return self.to_out[0](out.flatten(2))


class AdaLayerNormSingle(nn.Module):
    """PixArt-alpha's timestep embedding and its `coefficient` modulations (ComfyUI's embedding_coefficient)."""

    def __init__(self, dim: int, coefficient: int = 6):
        super().__init__()
        self.emb = TimestepEmbedding(dim)
        self.linear = nn.Linear(dim, coefficient * dim)

    def forward(self, timesteps: Tensor, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(modulations [B, N, coefficient * D], embedding [B, N, D]) of timesteps [B, N] (already scaled)."""
        embedded = self.emb.timestep_embedder(timestep_embedding(timesteps.flatten(), TIMESTEP_CHANNELS).to(dtype))
        return self.linear(F.silu(embedded)).unflatten(0, (batch, -1)), embedded.unflatten(0, (batch, -1))


def _modulations(table: Tensor, temb: Tensor) -> tuple[Tensor, ...]:
    """table [K, D] + temb [B, N, K * D] -> K tensors [B, N, D]."""
    return (table.to(temb.dtype) + temb.unflatten(-1, (table.shape[0], -1))).unbind(2)


class AVBlock(nn.Module):
    def __init__(self, c: LTX2Config):
        super().__init__()
        d, da, g = c.inner_dim, c.audio_inner_dim, c.gated_attention
        self.attn1 = Attention(d, d, c.num_heads, c.head_dim, g)
        self.audio_attn1 = Attention(da, da, c.audio_num_heads, c.audio_head_dim, g)
        self.attn2 = Attention(d, d, c.num_heads, c.head_dim, g)
        self.audio_attn2 = Attention(da, da, c.audio_num_heads, c.audio_head_dim, g)
        self.audio_to_video_attn = Attention(d, da, c.audio_num_heads, c.audio_head_dim, g)  # q: video, kv: audio
        self.video_to_audio_attn = Attention(da, d, c.audio_num_heads, c.audio_head_dim, g)  # q: audio, kv: video
        self.ff = FeedForward(d, 4 * d)
        self.audio_ff = FeedForward(da, 4 * da)
        rows = 9 if c.cross_attention_adaln else 6
        self.scale_shift_table = nn.Parameter(torch.zeros(rows, d))
        self.audio_scale_shift_table = nn.Parameter(torch.zeros(rows, da))
        if c.cross_attention_adaln:
            self.prompt_scale_shift_table = nn.Parameter(torch.zeros(2, d))
            self.audio_prompt_scale_shift_table = nn.Parameter(torch.zeros(2, da))
        self.scale_shift_table_a2v_ca_audio = nn.Parameter(torch.zeros(5, da))
        self.scale_shift_table_a2v_ca_video = nn.Parameter(torch.zeros(5, d))

    @staticmethod
    def _text(x: Tensor, context: Tensor, attn: Attention, query_mods: tuple[Tensor, ...], prompt_table: Tensor | None,
              prompt_temb: Tensor | None, bias: Tensor | None) -> Tensor:
        """Prompt cross-attention: of the RMS-normed stream, or (LTX-2.3) of it shifted / scaled by the table's rows
        6-8 with the prompt shifted / scaled by the prompt table, gated by row 8."""
        if prompt_table is None:
            return attn(_norm(x), context, bias=bias)
        shift_q, scale_q, gate_q = query_mods
        shift_kv, scale_kv = _modulations(prompt_table, prompt_temb)
        return attn(_norm(x) * (1 + scale_q) + shift_q, context * (1 + scale_kv) + shift_kv, bias=bias) * gate_q

    def forward(self, v: Tensor, a: Tensor | None, s: dict, passthrough: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """One block over video tokens `v` and audio tokens `a` (None: video only); `s` holds the prepared
        contexts, masks, modulations and RoPE (see `LTX2Model.forward`) and whether each audio<->video
        cross-attention adds its output (`a2v`, `v2a`); `passthrough`: both self-attentions pass their values
        through (`Attention`)."""
        v_mods = _modulations(self.scale_shift_table, s["v_temb"])
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = v_mods[:6]
        v = v + self.attn1(_norm(v) * (1 + scale) + shift, rope=s["v_rope"], bias=s["v_self_bias"],
                           passthrough=passthrough) * gate
        v = v + self._text(v, s["v_context"], self.attn2, v_mods[6:], getattr(self, "prompt_scale_shift_table", None),
                           s.get("v_prompt_temb"), s["bias"])
        if a is not None:
            a_mods = _modulations(self.audio_scale_shift_table, s["a_temb"])
            a_shift, a_scale, a_gate, a_shift_mlp, a_scale_mlp, a_gate_mlp = a_mods[:6]
            a = a + self.audio_attn1(_norm(a) * (1 + a_scale) + a_shift, rope=s["a_rope"],
                                     passthrough=passthrough) * a_gate
            a = a + self._text(a, s["a_context"], self.audio_attn2, a_mods[6:],
                               getattr(self, "audio_prompt_scale_shift_table", None), s.get("a_prompt_temb"),
                               s["bias"])
            vn, an = _norm(v), _norm(a)
            v_a2v_scale, v_a2v_shift, v_v2a_scale, v_v2a_shift = _modulations(
                self.scale_shift_table_a2v_ca_video[:4], s["v_ca_temb"])
            a_a2v_scale, a_a2v_shift, a_v2a_scale, a_v2a_shift = _modulations(
                self.scale_shift_table_a2v_ca_audio[:4], s["a_ca_temb"])
            (a2v_gate,) = _modulations(self.scale_shift_table_a2v_ca_video[4:], s["a2v_gate_temb"])
            (v2a_gate,) = _modulations(self.scale_shift_table_a2v_ca_audio[4:], s["v2a_gate_temb"])
            if s.get("a2v", True):
                v = v + self.audio_to_video_attn(vn * (1 + v_a2v_scale) + v_a2v_shift,
                                                 an * (1 + a_a2v_scale) + a_a2v_shift,
                                                 rope=s["v_cross_rope"], k_rope=s["a_cross_rope"]) * a2v_gate
            if s.get("v2a", True):
                a = a + self.video_to_audio_attn(an * (1 + a_v2a_scale) + a_v2a_shift,
                                                 vn * (1 + v_v2a_scale) + v_v2a_shift,
                                                 rope=s["a_cross_rope"], k_rope=s["v_cross_rope"]) * v2a_gate
            a = a + self.audio_ff(_norm(a) * (1 + a_scale_mlp) + a_shift_mlp) * a_gate_mlp
        v = v + self.ff(_norm(v) * (1 + scale_mlp) + shift_mlp) * gate_mlp
        return v, a


# --------------------------------------------------------------------------------------------------- connectors


class ConnectorBlock(nn.Module):
    def __init__(self, dim: int, heads: int, gated: bool):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, dim // heads, gated)
        self.ff = FeedForward(dim, 4 * dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], bias: Tensor | None) -> Tensor:
        x = x + self.attn1(_norm(x), rope=rope, bias=bias)
        return x + self.ff(_norm(x))


class EmbeddingsConnector(nn.Module):
    """A stack of 1-D transformer blocks over the text features, the padding replaced by learnable registers."""

    def __init__(self, c: LTX2Config, dim: int, heads: int):
        super().__init__()
        self.config, self.dim, self.heads = c, dim, heads
        self.transformer_1d_blocks = nn.ModuleList([ConnectorBlock(dim, heads, c.connector_gated_attention)
                                                    for _ in range(c.connector_depth)])
        if c.connector_registers:
            self.learnable_registers = nn.Parameter(torch.zeros(c.connector_registers, dim))

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(states, mask) of text features `x` [B, L, C] whose tokens `mask` [B, L] (1: a token; None: all)
        marks; with registers every token of the output counts (its mask None)."""
        c = self.config
        bias = None
        if c.connector_registers:
            x = self._with_registers(x, mask)
        elif mask is not None:
            bias = ((mask.to(x.dtype) - 1) * torch.finfo(x.dtype).max)[:, None, None, :]
        positions = torch.arange(x.shape[1], dtype=torch.float32, device=x.device).expand(x.shape[0], 1, -1)
        rope = rope_frequencies(positions, (c.connector_max_pos,), self.dim, self.heads, replace(c, rope_float64=True))
        for block in self.transformer_1d_blocks:
            x = block(x, rope, bias)
        return _norm(x), (None if c.connector_registers else mask)

    def _with_registers(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """The prompt's tokens first (in order), then registers by absolute position, to max(1024, L) tokens
        rounded up to whole register sets."""
        registers = self.learnable_registers
        batch, length, _ = x.shape
        total = registers.shape[0] * math.ceil(max(CONNECTOR_MIN_TOKENS, length) / registers.shape[0])
        fill = registers.to(x.dtype).repeat(total // registers.shape[0], 1).expand(batch, -1, -1)
        if mask is None:
            return torch.cat([x, fill[:, length:]], dim=1)
        keep = mask.bool()
        order = torch.argsort((~keep).int(), dim=1, stable=True)
        x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x, fill[:, length:]], dim=1)
        front = torch.arange(total, device=x.device) < keep.sum(1, keepdim=True)
        return torch.where(front[..., None], x, fill)


# -------------------------------------------------------------------------------------------------------- model


class LTX2Model(nn.Module):
    def __init__(self, config: LTX2Config, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.config = c = config
        d, da = c.inner_dim, c.audio_inner_dim
        self.patchify_proj = nn.Linear(c.in_channels, d)
        self.audio_patchify_proj = nn.Linear(c.audio_in_channels, da)
        rows = 9 if c.cross_attention_adaln else 6
        self.adaln_single = AdaLayerNormSingle(d, rows)
        self.audio_adaln_single = AdaLayerNormSingle(da, rows)
        if c.cross_attention_adaln:
            self.prompt_adaln_single = AdaLayerNormSingle(d, 2)
            self.audio_prompt_adaln_single = AdaLayerNormSingle(da, 2)
        self.av_ca_video_scale_shift_adaln_single = AdaLayerNormSingle(d, 4)
        self.av_ca_a2v_gate_adaln_single = AdaLayerNormSingle(d, 1)
        self.av_ca_audio_scale_shift_adaln_single = AdaLayerNormSingle(da, 4)
        self.av_ca_v2a_gate_adaln_single = AdaLayerNormSingle(da, 1)
        if c.caption_projection:
            self.caption_projection = CaptionProjection(c.connector_dim, d)
            self.audio_caption_projection = CaptionProjection(c.audio_connector_dim, da)
        self.video_embeddings_connector = EmbeddingsConnector(c, c.connector_dim, c.connector_heads)
        self.audio_embeddings_connector = EmbeddingsConnector(c, c.audio_connector_dim, c.audio_connector_heads)
        self.transformer_blocks = nn.ModuleList([AVBlock(c) for _ in range(c.depth)])
        self.scale_shift_table = nn.Parameter(torch.zeros(2, d))
        self.audio_scale_shift_table = nn.Parameter(torch.zeros(2, da))
        self.proj_out = nn.Linear(d, c.out_channels)
        self.audio_proj_out = nn.Linear(da, c.audio_out_channels)
        self.to(**{k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None})

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype, read from the output modulation table, which fp8 weight storage leaves as it is."""
        return self.scale_shift_table.dtype

    def preprocess_text_embeds(self, features: Tensor, attention_mask: Tensor | None = None
                               ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(video context, audio context, mask) of the text encoder's projected features [B, L, caption_channels]
        (LTX-2.3: [B, L, video width + audio width], each stream's own; `attention_mask` [B, L], 1 for a prompt
        token; None: all are, as ComfyUI passes an unpadded prompt): each stream's connector output [B, L', C]; the
        mask None when registers fill the padding (every token counts)."""
        c = self.config
        features = features.to(self.dtype)
        video_features = audio_features = features
        if features.shape[-1] == c.connector_dim + c.audio_connector_dim:
            video_features, audio_features = features.split([c.connector_dim, c.audio_connector_dim], dim=-1)
        video, mask = self.video_embeddings_connector(video_features, attention_mask)
        audio, _ = self.audio_embeddings_connector(audio_features, attention_mask)
        return video, audio, mask

    def forward(self, video_latent: Tensor, audio_latent: Tensor | None, video_timestep: Tensor,
                audio_timestep: Tensor | None, video_context: Tensor, audio_context: Tensor | None,
                context_mask: Tensor | None = None, frame_rate: float = 25.0,
                keyframe_idxs: Tensor | None = None, guide_attention: Tensor | None = None, *,
                kept_tokens: Tensor | None = None,
                ref_audio: Tensor | None = None, stg_blocks: frozenset[int] = frozenset(), a2v: bool = True,
                v2a: bool = True) -> tuple[Tensor, Tensor | None]:
        """Velocities of `video_latent` [B, 128, F, H, W] and `audio_latent` [B, 8, T, 16] (None: video only, as
        ComfyUI runs a latent without audio) at flow levels `video_timestep` ([B], or [B, F * H * W] per latent
        pixel) and `audio_timestep` ([B] or [B, T]; None: the video's, its first level when per pixel), given the
        connectors' outputs (`preprocess_text_embeds`) and their `context_mask` [B, L'] (1: attend; None: all)
        and the video's `frame_rate` (ComfyUI's LTXVConditioning, 25 by default); `keyframe_idxs` as
        `video_positions` takes them; `guide_attention` [B, K, 2]: each guide token's guide and weight, which weaken
        (or strengthen) the video self-attention between the video and the guides (`guide_attention_bias`);
        `kept_tokens` [F * H * W] (bool): the video tokens the model runs (ComfyUI's grid mask: where the noise mask
        is not negative, as at IC-LoRA guides' holes), the others left out and their velocities 0.

        ComfyUI's switches for guidance passes (ID-LoRA's reference, STG, modality guidance): `ref_audio` [B or 1,
        R, 128]: a reference clip's latent frames, put before the audio's (at level 0, `reference_audio_positions`)
        and left out of the output; `stg_blocks`: the blocks whose self-attentions (video and audio) pass their
        values through (`Attention`); `a2v`, `v2a` False: the audio-to-video, video-to-audio cross-attention adds
        nothing."""
        c, dtype = self.config, self.dtype
        if video_latent.ndim != 5 or video_latent.shape[1] != c.in_channels:
            raise ValueError(f"LTX-2 takes video latents [B, {c.in_channels}, F, H, W]; got {list(video_latent.shape)}")
        batch, _, frames, rows, cols = video_latent.shape
        v_levels = video_timestep.reshape(batch, -1).float() * c.timestep_scale
        if v_levels.shape[1] not in (1, frames * rows * cols):
            raise ValueError(f"{v_levels.shape[1]} video timesteps for {frames * rows * cols} latent pixels")
        tokens = video_latent.flatten(2).transpose(1, 2)
        if kept_tokens is not None:
            if kept_tokens.shape != (frames * rows * cols,):
                raise ValueError(f"{list(kept_tokens.shape)} kept marks for {frames * rows * cols} latent pixels")
            kept_tokens = kept_tokens.to(video_latent.device)
            tokens = tokens[:, kept_tokens]
            v_levels = v_levels if v_levels.shape[1] == 1 else v_levels[:, kept_tokens]
        v_temb, v_embedded = self.adaln_single(v_levels, batch, dtype)
        v = self.patchify_proj(tokens.to(dtype))
        v_spans = video_positions(batch, frames, rows, cols, frame_rate, c, v.device, keyframe_idxs, kept_tokens)
        s = {"v_temb": v_temb, "v_context": self._project(video_context.to(dtype), "caption_projection"), "bias": None,
             "v_rope": rope_frequencies(_point(v_spans, c.use_middle_indices_grid), c.max_pos, c.inner_dim,
                                        c.num_heads, c), "v_self_bias": None}
        if guide_attention is not None:
            if keyframe_idxs is None:
                raise ValueError("guide attention entries without the guides' keyframe_idxs")
            guides = keyframe_idxs.shape[2]
            kept_guides = None if kept_tokens is None else kept_tokens[kept_tokens.shape[0] - guides:]
            s["v_self_bias"] = guide_attention_bias(guide_attention.to(v.device), v.shape[1], guides, dtype,
                                                    kept_guides)
        if c.cross_attention_adaln:  # each item's largest level, as ComfyUI's compute_prompt_timestep
            s["v_prompt_temb"] = self.prompt_adaln_single(v_levels.amax(1, keepdim=True), batch, dtype)[0]
        if context_mask is not None:
            s["bias"] = ((context_mask.to(dtype) - 1) * torch.finfo(dtype).max)[:, None, None, :]
        s["a2v"], s["v2a"] = a2v, v2a
        a = None
        if ref_audio is not None and audio_latent is None:
            raise ValueError("reference audio needs an audio latent to go before: sample an audio-video latent "
                             "(LTXVConcatAVLatent)")
        if audio_latent is not None:
            if audio_latent.ndim != 4 or audio_latent.shape[1] * audio_latent.shape[3] != c.audio_in_channels:
                raise ValueError(f"LTX-2 takes audio latents [B, {AUDIO_CHANNELS}, T, {AUDIO_BINS}]; got "
                                 f"{list(audio_latent.shape)}")
            a, a_embedded = self._prepare_audio(audio_latent, audio_timestep, video_timestep, v_levels,
                                                audio_context, v_spans, s, ref_audio)
        for i, block in enumerate(self.transformer_blocks):
            v, a = block(v, a, s, passthrough=i in stg_blocks)
        shift, scale = (self.scale_shift_table.to(dtype) + v_embedded[:, :, None]).unbind(2)
        v = F.layer_norm(v.float(), (c.inner_dim,), eps=1e-6).to(dtype) * (1 + scale) + shift
        video_out = self.proj_out(v)
        if kept_tokens is not None:  # the tokens left out move nowhere, as ComfyUI's
            video_out = video_out.new_zeros(batch, frames * rows * cols, c.out_channels).index_copy(
                1, kept_tokens.nonzero().flatten(), video_out)
        video_out = video_out.transpose(1, 2).reshape(batch, c.out_channels, frames, rows, cols)
        if a is None:
            return video_out.to(video_latent.dtype), None
        a = a[:, a.shape[1] - audio_latent.shape[2]:]  # without the reference's frames
        shift, scale = (self.audio_scale_shift_table.to(dtype) + a_embedded[:, :, None]).unbind(2)
        a = F.layer_norm(a.float(), (c.audio_inner_dim,), eps=1e-6).to(dtype) * (1 + scale) + shift
        audio_out = self.audio_proj_out(a).unflatten(-1, (audio_latent.shape[1], -1)).transpose(1, 2)
        return video_out.to(video_latent.dtype), audio_out.to(audio_latent.dtype)

    def _project(self, context: Tensor, name: str) -> Tensor:
        """A connector's output through the stream's caption projection (LTX-2.0), or as it is (LTX-2.3)."""
        return getattr(self, name)(context) if self.config.caption_projection else context

    def _prepare_audio(self, audio_latent: Tensor, audio_timestep: Tensor | None, video_timestep: Tensor,
                       v_levels: Tensor, audio_context: Tensor | None, v_spans: Tensor, s: dict,
                       ref_audio: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The audio tokens (`ref_audio`'s first) and the embedded timestep of the audio's; fills `s` with the audio
        stream's and the audio<->video cross-attention's modulations, contexts and RoPE."""
        c, dtype = self.config, self.dtype
        batch, _, frames, _ = audio_latent.shape
        if audio_context is None:
            raise ValueError("an audio latent needs the audio connector's context")
        a_timestep = video_timestep.reshape(batch, -1)[:, :1] if audio_timestep is None else audio_timestep
        a_levels = a_timestep.reshape(batch, -1).float() * c.timestep_scale
        if a_levels.shape[1] not in (1, frames):
            raise ValueError(f"{a_levels.shape[1]} audio timesteps for {frames} latent frames")
        tokens = audio_latent.transpose(1, 2).flatten(2).to(dtype)
        a_spans = audio_positions(batch, frames, c, tokens.device)
        refs = 0
        if ref_audio is not None:  # ComfyUI's LTXAVModel._process_input and _prepare_timestep
            if ref_audio.ndim != 3 or ref_audio.shape[2] != c.audio_in_channels or ref_audio.shape[0] not in (
                    1, batch):
                raise ValueError(f"reference audio tokens are [1 or {batch}, R, {c.audio_in_channels}]; got "
                                 f"{list(ref_audio.shape)}")
            refs = ref_audio.shape[1]
            tokens = torch.cat([ref_audio.to(tokens).expand(batch, -1, -1), tokens], dim=1)
            a_spans = torch.cat([reference_audio_positions(batch, refs, c, tokens.device), a_spans], dim=2)
            a_levels = torch.cat([a_levels.new_zeros(batch, refs), a_levels.expand(batch, frames)], dim=1)
        gate_factor = c.av_ca_timestep_scale / c.timestep_scale
        s["a_temb"], a_embedded = self.audio_adaln_single(a_levels, batch, dtype)
        a_embedded = a_embedded[:, refs:]
        s["v_ca_temb"] = self.av_ca_video_scale_shift_adaln_single(v_levels, batch, dtype)[0]
        a_max, v_max = (t.max().expand(batch, 1) for t in (a_levels, v_levels))
        s["a2v_gate_temb"] = self.av_ca_a2v_gate_adaln_single(a_max * gate_factor, batch, dtype)[0]
        s["a_ca_temb"] = self.av_ca_audio_scale_shift_adaln_single(a_levels, batch, dtype)[0]
        s["v2a_gate_temb"] = self.av_ca_v2a_gate_adaln_single(v_max * gate_factor, batch, dtype)[0]
        s["a_context"] = self._project(audio_context.to(dtype), "audio_caption_projection")
        if c.cross_attention_adaln:
            s["a_prompt_temb"] = self.audio_prompt_adaln_single(a_levels.amax(1, keepdim=True), batch, dtype)[0]
        a = self.audio_patchify_proj(tokens)
        s["a_rope"] = rope_frequencies(_point(a_spans, c.use_middle_indices_grid), (c.audio_max_pos,),
                                       c.audio_inner_dim, c.audio_num_heads, c)
        cross_max = (max(c.max_pos[0], c.audio_max_pos),)
        s["v_cross_rope"] = rope_frequencies(_point(v_spans[:, :1], True), cross_max, c.audio_inner_dim,
                                             c.audio_num_heads, c)
        s["a_cross_rope"] = rope_frequencies(_point(a_spans, True), cross_max, c.audio_inner_dim,
                                             c.audio_num_heads, c)
        return a, a_embedded


# ----------------------------------------------------------------------------------------------- state dicts


def is_ltx2(keys: Mapping[str, object] | set[str], prefix: str = "") -> bool:
    """Whether a state dict (or its keys) holds an LTX-2 audio-video transformer in Lightricks' layout."""
    return f"{prefix}audio_adaln_single.linear.weight" in keys and f"{prefix}patchify_proj.weight" in keys


def config_from_state_dict(sd: Mapping[str, Tensor], prefix: str = "", num_heads: int = 32,
                           audio_num_heads: int = 32, connector_heads: int | None = None,
                           audio_connector_heads: int | None = None,
                           metadata: Mapping[str, str] | None = None) -> LTX2Config:
    """The shape of an LTX-2 (2.0 or 2.3) transformer under `prefix` from its tensor shapes; the head counts are
    Lightricks' (32 and 32, as ComfyUI assumes; the connectors' 30 in LTX-2.0, 32 in LTX-2.3) unless given or
    stated by the file's `metadata`, which also gives the settings no shape tells (default: LTX-2.0's)."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    try:
        inner, in_channels = sd["patchify_proj.weight"].shape
        audio_inner, audio_in = sd["audio_patchify_proj.weight"].shape
        connector = "video_embeddings_connector.transformer_1d_blocks.0.attn1."
        connector_dim = sd[connector + "to_q.weight"].shape[0]
        audio_connector_dim = sd["audio_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.weight"].shape[0]
        projected = "caption_projection.linear_2.weight" in sd
        if "caption_projection.linear_1.weight" in sd and not projected:
            raise ValueError("an LTX transformer projecting the prompt before its connectors: not supported")
        told = _metadata_transformer(metadata)
        connector_heads = connector_heads or told.get("connector_num_attention_heads") or (30 if projected else 32)
        audio_connector_heads = (audio_connector_heads or told.get("audio_connector_num_attention_heads")
                                 or connector_heads)
        registers = sd.get("video_embeddings_connector.learnable_registers")
        config = LTX2Config(
            in_channels=in_channels, out_channels=sd["proj_out.weight"].shape[0], num_heads=num_heads,
            head_dim=inner // num_heads, depth=len({int(m[1]) for k in sd if (m := _BLOCK.match(k))}),
            caption_channels=sd["caption_projection.linear_1.weight"].shape[1] if projected else connector_dim,
            audio_in_channels=audio_in, audio_out_channels=sd["audio_proj_out.weight"].shape[0],
            audio_num_heads=audio_num_heads, audio_head_dim=audio_inner // audio_num_heads,
            connector_dim=connector_dim, connector_heads=connector_heads,
            audio_connector_dim=audio_connector_dim, audio_connector_heads=audio_connector_heads,
            connector_depth=len({int(m[1]) for k in sd if (m := _CONNECTOR_BLOCK.match(k))}),
            connector_registers=0 if registers is None else registers.shape[0],
            connector_gated_attention=connector + "to_gate_logits.weight" in sd, caption_projection=projected,
            gated_attention="transformer_blocks.0.attn1.to_gate_logits.weight" in sd,
            cross_attention_adaln=sd["transformer_blocks.0.scale_shift_table"].shape[0] == 9)
    except KeyError as e:
        raise ValueError(f"an incomplete LTX-2 transformer: no weight {e}") from None
    if config.inner_dim != inner or config.audio_inner_dim != audio_inner:
        raise ValueError(f"widths {inner} / {audio_inner} do not split into {num_heads} / {audio_num_heads} heads")
    return config.from_metadata(metadata)


_DIFFUSERS_TOP = {"proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj", "time_embed": "adaln_single",
                  "audio_time_embed": "audio_adaln_single",
                  "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
                  "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
                  "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
                  "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
                  "prompt_adaln": "prompt_adaln_single", "audio_prompt_adaln": "audio_prompt_adaln_single",
                  "video_connector": "video_embeddings_connector",
                  "audio_connector": "audio_embeddings_connector"}
_DIFFUSERS_PARTS = {"norm_q": "q_norm", "norm_k": "k_norm", "transformer_blocks": "transformer_1d_blocks",
                    "video_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_video",
                    "audio_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_audio"}


def convert_diffusers_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' `LTX2VideoTransformer3DModel` keys (and `LTX2TextConnectors`' `video_connector.` /
    `audio_connector.` ones) renamed to Lightricks' / ComfyUI's; the connectors' `text_proj_in` (LTX-2.3:
    `video_text_proj_in`, `audio_text_proj_in`: the text encoder's feature projections, not this module's) are left
    out."""
    out = {}
    for key, value in sd.items():
        top, _, rest = key.partition(".")
        if top in ("text_proj_in", "video_text_proj_in", "audio_text_proj_in"):
            continue
        parts = [_DIFFUSERS_PARTS.get(p, p) for p in rest.split(".")] if rest else []
        out[".".join([_DIFFUSERS_TOP.get(top, top), *parts])] = value
    return out
