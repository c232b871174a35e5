"""Stable Audio Open 1.0: its diffusion transformer and the two number conditioners, read from Stability's single file.

The file (stabilityai/stable-audio-open-1.0 `model.safetensors`, ComfyUI's stable-audio-open-1.0.safetensors) holds
the transformer under `model.model.`, the `seconds_start` / `seconds_total` conditioners under
`conditioner.conditioners.`, and the VAE under `pretransform.model.` (read elsewhere); the prompt's T5-base is a
separate file. Modules here are named after the file's keys (stable-audio-tools' DiffusionTransformer), so loading
needs no conversion table.

How the model is driven (ComfyUI's StableAudio1 / supported_models' StableAudio, and diffusers' StableAudioPipeline):

- latents are [B, 64, L], 44.1 kHz audio downsampled 2048 times: ComfyUI's EmptyLatentAudio makes
  `round(seconds * 44100 / 2048 / 2) * 2` frames (`latent_length`), 47.6 s by default (1024 frames);
- it predicts v on continuous levels (ComfyUI's V_PREDICTION_CONTINUOUS, sigma_data 1, sigma 0.03 to 500; Loom's
  `ldm.sampling.schedules.ContinuousVSchedule`); the transformer takes the timestep `atan(sigma) * 2 / pi`
  (`unet_timestep`), which is also diffusers' (its Cosine / EDM DPM-Solver schedulers' `precondition_noise`);
- the cross-attention context is the T5-base states of the prompt with padding zeroed (ComfyUI pads to at least 128
  tokens, diffusers to exactly 128), then the seconds_start and seconds_total embeddings as two more tokens; the
  global conditioning is the two embeddings side by side [B, 1536] (`stable_audio_conditioning`). Without seconds,
  ComfyUI takes seconds_start 0 and seconds_total `int(L / 21.53)` (`default_seconds_total`);
- the global conditioning plus the timestep's embedding is one token prepended to the latent's; the transformer's
  masks go unused (ComfyUI's attention takes none, nor does diffusers' pipeline), so padding acts only by its zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, load_state_dict, write_safetensors

DIT_PREFIX = "model.model."
CONDITIONER_PREFIX = "conditioner.conditioners."
NUMBER_CONDITIONERS = ("seconds_start", "seconds_total")
HEAD_DIM = 64  # stable-audio-tools' SAO heads (1536 / 24); the shapes cannot tell it, ComfyUI assumes it too
ROPE_BASE = 10000.0
SECONDS_RANGE = (0.0, 512.0)  # the seconds conditioners' min_val / max_val in SAO's model_config.json
SIGMA_MIN, SIGMA_MAX = 0.03, 500.0  # ComfyUI's sampling range (diffusers' converter sets sigma_min 0.3)
SAMPLE_RATE, DOWNSAMPLING = 44100, 2048
T5_MIN_TOKENS = 128  # ComfyUI pads the T5 prompt to at least this many tokens; diffusers' tokenizer to exactly it


@dataclass(frozen=True)
class StableAudioConfig:
    """The transformer's shape (Stable Audio Open 1.0's by default) and its conditioners' width."""

    io_channels: int = 64
    embed_dim: int = 1536
    depth: int = 24
    cond_token_dim: int = 768
    global_cond_dim: int = 1536
    rotary_dim: int = 32
    timestep_features_dim: int = 256
    ff_mult: int = 4
    number_embed_dim: int = 768
    number_features: int = 256

    def __post_init__(self) -> None:
        for name in ("embed_dim", "cond_token_dim"):
            if getattr(self, name) % HEAD_DIM:
                raise ValueError(f"{name} {getattr(self, name)} is not a whole number of {HEAD_DIM}-wide heads")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= HEAD_DIM:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and at most the head width {HEAD_DIM}")

    @property
    def num_heads(self) -> int:
        return self.embed_dim // HEAD_DIM

    @property
    def in_channels(self) -> int:
        """The latent's channels, as Loom's other model configs name them (no channels beside the latent's)."""
        return self.io_channels

    @property
    def context_dim(self) -> int:
        """The prompt's width, as Loom's other model configs name it (the sampler checks prompts against it)."""
        return self.cond_token_dim

    @property
    def kv_heads(self) -> int:
        """Cross-attention's key/value heads (12 for SAO, half the query heads: grouped-query attention)."""
        return self.cond_token_dim // HEAD_DIM


# Two heads of self-attention, one key/value head of cross-attention, conditioners 64 wide (global 128).
TINY_STABLE_AUDIO = StableAudioConfig(io_channels=8, embed_dim=128, depth=2, cond_token_dim=64, global_cond_dim=128,
                                      number_embed_dim=64)


# --- time ----------------------------------------------------------------------------------------------------

def unet_timestep(sigma: Tensor | float) -> Tensor | float:
    """The transformer's timestep for noise level `sigma`: atan(sigma) * 2 / pi (ComfyUI's ModelSamplingContinuousV)."""
    return sigma.atan() * (2 / math.pi) if isinstance(sigma, Tensor) else math.atan(sigma) * 2 / math.pi


def latent_length(seconds: float) -> int:
    """Latent frames for `seconds` of audio, as ComfyUI's EmptyLatentAudio makes them (an even count)."""
    return round(seconds * SAMPLE_RATE / DOWNSAMPLING / 2) * 2


def default_seconds_total(length: int) -> int:
    """The seconds_total ComfyUI conditions on when a prompt names none: the latent's length in seconds, truncated."""
    return int(length / 21.53)


# --- transformer -----------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """stable-audio-tools' LayerNorm: `gamma` and `beta` (zeros in SAO, which ComfyUI's own saves leave out)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the first `cos.shape[-1]` channels of each head (rotate-half pairing, in float32)."""
    rot = cos.shape[-1]
    head, rest = x[..., :rot].float(), x[..., rot:]
    first, second = head.chunk(2, dim=-1)
    turned = head * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([turned.to(x.dtype), rest], dim=-1)


class Attention(nn.Module):
    """Self-attention (fused `to_qkv`, rotary positions) or cross-attention (`to_q`, fused `to_kv` over the context,
    whose heads are shared by groups of query heads); no biases."""

    def __init__(self, dim: int, context_dim: int | None = None):
        super().__init__()
        self.heads = dim // HEAD_DIM
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        else:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, context_dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, _ = x.shape
        if context is None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q = self.to_q(x)
            k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (-1, HEAD_DIM)).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.silu(gate)


class FeedForward(nn.Module):
    """SwiGLU; `ff.1` is an empty slot of stable-audio-tools' (a rearrange for its convolutional variant)."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.ff = nn.Sequential(GLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class TransformerBlock(nn.Module):
    def __init__(self, config: StableAudioConfig):
        super().__init__()
        dim = config.embed_dim
        self.pre_norm = LayerNorm(dim)
        self.self_attn = Attention(dim)
        self.cross_attend_norm = LayerNorm(dim)
        self.cross_attn = Attention(dim, config.cond_token_dim)
        self.ff_norm = LayerNorm(dim)
        self.ff = FeedForward(dim, config.ff_mult)

    def forward(self, x: Tensor, context: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.self_attn(self.pre_norm(x), rope=rope)
        x = x + self.cross_attn(self.cross_attend_norm(x), context)
        return x + self.ff(self.ff_norm(x))


class ContinuousTransformer(nn.Module):
    def __init__(self, config: StableAudioConfig):
        super().__init__()
        self.project_in = nn.Linear(config.io_channels, config.embed_dim, bias=False)
        self.project_out = nn.Linear(config.embed_dim, config.io_channels, bias=False)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.depth))
        self.rotary_dim = config.rotary_dim

    def rope(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin of rotary angles for positions 0..length-1, in float32 whatever the weights' dtype (the file's
        `rotary_pos_emb.inv_freq` holds the same frequencies; a bf16 copy would misplace late positions)."""
        inv_freq = ROPE_BASE ** -(torch.arange(0, self.rotary_dim, 2, device=device, dtype=torch.float32)
                                  / self.rotary_dim)
        angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def _mlp(dim_in: int, dim: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim, bias=bias), nn.SiLU(), nn.Linear(dim, dim, bias=bias))


class StableAudioDiT(nn.Module):
    """Stable Audio's diffusion transformer: v-prediction for latents [B, io_channels, L].

    Called as Loom's denoiser calls a UNet, `model(x, timesteps, context, y=global)`: `timesteps` [B] (or [1]) is
    `unet_timestep(sigma)`, `context` [B, N, cond_token_dim] the prompt's tokens with the two seconds tokens, `y`
    [B, global_cond_dim] the global conditioning (`stable_audio_conditioning` makes both); without `y` the prepended
    token carries the timestep alone (as ComfyUI's does)."""

    def __init__(self, config: StableAudioConfig = StableAudioConfig()):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.timestep_features = nn.Module()
        self.timestep_features.weight = nn.Parameter(torch.randn(config.timestep_features_dim // 2, 1))
        self.to_timestep_embed = _mlp(config.timestep_features_dim, dim, bias=True)
        self.to_cond_embed = _mlp(config.cond_token_dim, config.cond_token_dim, bias=False)
        self.to_global_embed = _mlp(config.global_cond_dim, dim, bias=False)
        self.preprocess_conv = nn.Conv1d(config.io_channels, config.io_channels, 1, bias=False)
        self.transformer = ContinuousTransformer(config)
        self.postprocess_conv = nn.Conv1d(config.io_channels, config.io_channels, 1, bias=False)

    def timestep_embedding(self, timesteps: Tensor) -> Tensor:
        """Random Fourier features of the timestep (cos then sin, computed in float32) through the timestep MLP."""
        angles = 2 * math.pi * timesteps.float()[:, None] @ self.timestep_features.weight.float().T
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.to_timestep_embed(features.to(self.timestep_features.weight.dtype))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        c = self.config
        if x.ndim != 3 or x.shape[1] != c.io_channels:
            raise ValueError(f"Stable Audio takes latents [B, {c.io_channels}, L], not {list(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != c.cond_token_dim:
            raise ValueError(f"Stable Audio takes a context [B, N, {c.cond_token_dim}], not {list(context.shape)}")
        b, _, length = x.shape
        dtype = self.preprocess_conv.weight.dtype  # inputs are taken in the weights' dtype, the output given in x's
        timesteps = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps.reshape(b)
        prepended = self.timestep_embedding(timesteps)
        if y is not None:
            if y.shape[-1] != c.global_cond_dim:
                raise ValueError(f"Stable Audio's global conditioning is {c.global_cond_dim} wide, not {y.shape[-1]}")
            prepended = prepended + self.to_global_embed(y.reshape(b, c.global_cond_dim).to(dtype))
        context = self.to_cond_embed(context.to(dtype))
        h = x.to(dtype)
        h = self.transformer.project_in((self.preprocess_conv(h) + h).transpose(1, 2))
        h = torch.cat([prepended[:, None], h], dim=1)
        rope = self.transformer.rope(length + 1, x.device)
        for layer in self.transformer.layers:
            h = layer(h, context, rope)
        out = self.transformer.project_out(h)[:, 1:].transpose(1, 2)
        return (self.postprocess_conv(out) + out).to(x.dtype)


# --- conditioners ----------------------------------------------------------------------------------------------

class LearnedPositionalEmbedding(nn.Module):
    """A number t in [0, 1] as [t, sin(2 pi t w), cos(2 pi t w)] with learned frequencies w."""

    def __init__(self, features: int):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(features // 2))

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None] * self.weights[None] * (2 * math.pi)
        return torch.cat([t[:, None], angles.sin(), angles.cos()], dim=-1)


class NumberEmbedder(nn.Module):
    def __init__(self, dim: int, features: int):
        super().__init__()
        self.embedding = nn.Sequential(LearnedPositionalEmbedding(features), nn.Linear(features + 1, dim))


class NumberConditioner(nn.Module):
    """A number of seconds as one token [B, 1, dim]: clamped to [min_val, max_val], scaled to [0, 1], embedded."""

    def __init__(self, dim: int = 768, features: int = 256, min_val: float = SECONDS_RANGE[0],
                 max_val: float = SECONDS_RANGE[1]):
        super().__init__()
        self.embedder = NumberEmbedder(dim, features)
        self.min_val, self.max_val = min_val, max_val

    def forward(self, seconds: Tensor | Sequence[float] | float) -> Tensor:
        weight = self.embedder.embedding[1].weight
        seconds = torch.as_tensor(seconds, dtype=torch.float32, device=weight.device).reshape(-1)
        scaled = (seconds.clamp(self.min_val, self.max_val) - self.min_val) / (self.max_val - self.min_val)
        return self.embedder.embedding(scaled.to(weight.dtype))[:, None]


class StableAudioConditioners(nn.Module):
    """The file's number conditioners, `seconds_start` and `seconds_total` (keys under `conditioner.conditioners.`)."""

    def __init__(self, config: StableAudioConfig = StableAudioConfig(), min_val: float = SECONDS_RANGE[0],
                 max_val: float = SECONDS_RANGE[1]):
        super().__init__()
        self.seconds_start = NumberConditioner(config.number_embed_dim, config.number_features, min_val, max_val)
        self.seconds_total = NumberConditioner(config.number_embed_dim, config.number_features, min_val, max_val)


def _per_row(seconds: Tensor | Sequence[float] | float, batch: int, name: str) -> Tensor:
    seconds = torch.as_tensor(seconds, dtype=torch.float32).reshape(-1)
    if seconds.numel() == 1:
        return seconds.expand(batch)
    if seconds.numel() != batch:
        raise ValueError(f"{name}: {seconds.numel()} values for a batch of {batch} prompts (give one or {batch})")
    return seconds


def stable_audio_conditioning(t5_states: Tensor, mask: Tensor | None, seconds_start: Tensor | Sequence[float] | float,
                              seconds_total: Tensor | Sequence[float] | float,
                              conditioners: StableAudioConditioners) -> tuple[Tensor, Tensor]:
    """The transformer's `context` [B, N + 2, D] and global conditioning `y` [B, 2 D] for prompts encoded by T5-base
    (`t5_states` [B, N, D], `mask` [B, N] 1 on real tokens or None): the states with padding zeroed, then the
    seconds_start and seconds_total tokens; `y` is the two tokens side by side. Seconds are one value or one per
    prompt."""
    if t5_states.ndim != 3:
        raise ValueError(f"T5 states must be [B, N, D], not {list(t5_states.shape)}")
    b = t5_states.shape[0]
    start = conditioners.seconds_start(_per_row(seconds_start, b, "seconds_start")).to(t5_states.dtype)
    total = conditioners.seconds_total(_per_row(seconds_total, b, "seconds_total")).to(t5_states.dtype)
    if start.shape[-1] != t5_states.shape[-1]:
        raise ValueError(f"T5 states {t5_states.shape[-1]} wide; the seconds conditioners make {start.shape[-1]}")
    if mask is not None:
        if mask.shape != t5_states.shape[:2]:
            raise ValueError(f"mask {list(mask.shape)} does not match T5 states {list(t5_states.shape[:2])}")
        t5_states = t5_states * mask.to(t5_states.device, t5_states.dtype)[..., None]
    context = torch.cat([t5_states, start.to(t5_states.device), total.to(t5_states.device)], dim=1)
    return context, torch.cat([start, total], dim=-1).reshape(b, -1).to(t5_states.device)


# --- files -----------------------------------------------------------------------------------------------------

_PROBE = (DIT_PREFIX + "transformer.layers.0.self_attn.to_qkv.weight", DIT_PREFIX + "timestep_features.weight",
          DIT_PREFIX + "to_cond_embed.0.weight")


def is_stable_audio(sd: Mapping[str, object]) -> bool:
    """Whether a state dict (or a header's shapes) holds Stable Audio's transformer in Stability's layout."""
    return all(k in sd for k in _PROBE)


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"no {key}: not Stable Audio's transformer in Stability's layout")
    return tuple(sd[key].shape)


def stable_audio_config(sd: Mapping[str, Tensor]) -> StableAudioConfig:
    """The config of a Stable Audio single file (its state dict or a header's shapes), from the weights' shapes."""
    p = DIT_PREFIX
    blocks = p + "transformer.layers."
    layers = {int(k[len(blocks):].split(".")[0]) for k in sd if k.startswith(blocks)}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"transformer layers {sorted(layers)} are not numbered from 0 without gaps")
    embed_dim, io_channels = _shape(sd, p + "transformer.project_in.weight")
    cond_dim = _shape(sd, p + "to_cond_embed.0.weight")[1]
    start = CONDITIONER_PREFIX + "seconds_start.embedder.embedding."
    inv_freq = sd.get(p + "transformer.rotary_pos_emb.inv_freq")
    try:
        return StableAudioConfig(
            io_channels=io_channels, embed_dim=embed_dim, depth=len(layers), cond_token_dim=cond_dim,
            global_cond_dim=_shape(sd, p + "to_global_embed.0.weight")[1],
            rotary_dim=2 * inv_freq.shape[0] if inv_freq is not None else max(HEAD_DIM // 2, 32),
            timestep_features_dim=2 * _shape(sd, p + "timestep_features.weight")[0],
            ff_mult=_shape(sd, p + "transformer.layers.0.ff.ff.2.weight")[1] // embed_dim,
            number_embed_dim=_shape(sd, start + "1.weight")[0], number_features=2 * _shape(sd, start + "0.weights")[0])
    except ValueError as e:
        raise CheckpointError(f"Stable Audio weights of a shape Loom cannot run: {e}") from None


def _check_rope(inv_freq: Tensor | None, config: StableAudioConfig) -> None:
    """The file's rotary frequencies must be the ones the transformer computes (base 10000)."""
    if inv_freq is None:
        return
    expected = ROPE_BASE ** -(torch.arange(0, config.rotary_dim, 2, dtype=torch.float32) / config.rotary_dim)
    if not torch.allclose(inv_freq.float().cpu(), expected, rtol=1e-2):
        raise CheckpointError("rotary_pos_emb.inv_freq is not base 10000's: a rotary embedding Loom does not run")


def _adopt(module: nn.Module, weights: StateDict, what: str, device: torch.device | str,
           dtype: torch.dtype) -> nn.Module:
    """`module` (built on the meta device) holding exactly `weights`: a missing or an unexpected key is an error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    for problem, keys in (("is missing", missing), ("has weights Loom does not run:", unexpected)):
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            raise CheckpointError(f"the {what} {problem} {shown}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"the {what}'s {k} is {list(v.shape)}, expected {list(expected[k].shape)}")
    module.load_state_dict({k: v.to(device, dtype) for k, v in weights.items()}, assign=True)
    return module.eval().requires_grad_(False)


def load_stable_audio(sd_or_path: StateDict | str | Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[StableAudioDiT, StableAudioConditioners]:
    """The transformer and the seconds conditioners of a Stable Audio single file (a path or its state dict), on
    `device` in `dtype`. Every key under `model.model.` and the two conditioners' prefixes is used (the rotary
    frequencies checked, the norms' betas, which ComfyUI's saves drop, taken as zeros where absent); the rest of the
    file (the VAE under `pretransform.model.`) is left to its own reader."""
    name = Path(sd_or_path).name if isinstance(sd_or_path, str | Path) else "state dict"
    sd = load_state_dict(sd_or_path) if isinstance(sd_or_path, str | Path) else sd_or_path
    try:
        if not is_stable_audio(sd):
            raise CheckpointError("not a Stable Audio checkpoint (no model.model.transformer.layers.0.self_attn / "
                                  "timestep_features / to_cond_embed weights in Stability's layout)")
        config = stable_audio_config(sd)
        dit_weights = {k[len(DIT_PREFIX):]: v for k, v in sd.items() if k.startswith(DIT_PREFIX)}
        _check_rope(dit_weights.pop("transformer.rotary_pos_emb.inv_freq", None), config)
        for k in [k for k in dit_weights if k.endswith("norm.gamma")]:
            dit_weights.setdefault(k.removesuffix("gamma") + "beta", torch.zeros_like(dit_weights[k]))
        numbers = tuple(CONDITIONER_PREFIX + n + "." for n in NUMBER_CONDITIONERS)
        cond_weights = {k[len(CONDITIONER_PREFIX):]: v for k, v in sd.items() if k.startswith(numbers)}
        with torch.device("meta"):
            dit, conditioners = StableAudioDiT(config), StableAudioConditioners(config)
        dit = _adopt(dit, dit_weights, "Stable Audio transformer", device, dtype)
        conditioners = _adopt(conditioners, cond_weights, "seconds conditioners", device, dtype)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    return dit, conditioners


def _random_(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("gamma"):
                param.copy_(1 + 0.2 * noise)
            elif param.ndim == 1 or name.endswith("timestep_features.weight"):
                param.copy_(0.05 * noise if name.endswith(("beta", "bias")) else noise)
            else:
                param.copy_(noise * param[0].numel() ** -0.5)


def random_stable_audio(config: StableAudioConfig = TINY_STABLE_AUDIO,
                        seed: int = 0) -> tuple[StableAudioDiT, StableAudioConditioners]:
    """A transformer and conditioners with seeded random weights (norm scales near 1, unit-variance Fourier
    frequencies, other matrices scaled to keep activations near unit size)."""
    generator = torch.Generator().manual_seed(seed)
    dit, conditioners = StableAudioDiT(config).eval(), StableAudioConditioners(config).eval()
    _random_(dit, generator)
    _random_(conditioners, generator)
    return dit, conditioners


def stable_audio_state_dict(dit: StableAudioDiT, conditioners: StableAudioConditioners) -> StateDict:
    """Both in Stability's single-file names, with the rotary frequencies its files carry."""
    rotary = dit.config.rotary_dim
    inv_freq = ROPE_BASE ** -(torch.arange(0, rotary, 2, dtype=torch.float32) / rotary)
    return {**{DIT_PREFIX + k: v for k, v in dit.state_dict().items()},
            DIT_PREFIX + "transformer.rotary_pos_emb.inv_freq": inv_freq,
            **{CONDITIONER_PREFIX + k: v for k, v in conditioners.state_dict().items()}}


def write_tiny_stable_audio(path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                            extra: Mapping[str, Tensor] | None = None,
                            config: StableAudioConfig = TINY_STABLE_AUDIO) -> Path:
    """Write a random Stable Audio single file (`config`'s transformer and conditioners in Stability's names, plus
    `extra` tensors as they are, e.g. a VAE under `pretransform.model.`); returns the path. Its audio is noise."""
    tensors = stable_audio_state_dict(*random_stable_audio(config, seed))
    clash = sorted(set(tensors) & set(extra or {}))
    if clash:
        raise ValueError(f"extra tensors would overwrite the model's own: {', '.join(clash[:4])}")
    path = Path(path)
    write_safetensors({**tensors, **(extra or {})}, path, {"loom.seed": str(seed)}, dtype)
    return path

