"""LTX-2's audio path (Lightricks' audio-video model): the causal audio VAE between log-mel spectrograms and audio
latents, and the vocoder from mel spectrograms to waveforms.

Shapes (the released LTX-2 / LTX-2.3 settings; every number below comes from the config):

* waveform [B, 2, N] at any rate -> resampled to 16 kHz (`resample`: torchaudio's windowed-sinc resampler, which
  ComfyUI calls) -> log-mel [B, 2, frames, 64] (`log_mel`: torchaudio's MelSpectrogram as ComfyUI configures it:
  n_fft 1024, hop 160, Hann window, centred with reflection, magnitude, Slaney mel scale and norm, log of the
  values clamped to 1e-5; frames = N // 160 + 1).
* The encoder's two causal stride-2 steps make latents [B, 8, ceil(ceil(frames / 2) / 2), 16]: channels, time,
  mel bins / 4. One latent frame is 4 mel frames, so 16000 / 160 / 4 = 25 latent frames a second. Latents are
  normalised per feature in the transformer's token layout [B, T, 8 * 16] with the file's
  `per_channel_statistics` (mean-of-means, std-of-means; 128 entries), as ComfyUI's AudioLatentNormalizer and
  diffusers' LTX2Pipeline do: `encode` returns normalised latents and `decode` takes them.
* The decoder makes [B, 2, 4 T - 3, 64] log-mels (causal in time: the first latent stands for one mel frame).
* The vocoder: LTX-2's HiFi-GAN (leaky ReLU, 240 samples a mel frame: 24 kHz out) or LTX-2.3's BigVGAN v2
  (anti-aliased SnakeBeta, 160 samples a frame: 16 kHz) with its bandwidth extension (a causal STFT log-mel of that
  16 kHz waveform, a second BigVGAN's residual added to a 3x windowed-sinc upsample: 48 kHz out, clamped to -1..1).

Files: the all-in-one LTX-2 checkpoints keep the VAE under `audio_vae.` and the vocoder under `vocoder.` with the
original (ComfyUI's) names, which are Loom's module names; an LTX-2.3 vocoder's keys are `vocoder.vocoder.*`,
`vocoder.bwe_generator.*` and `vocoder.mel_stft.*`, and LTX-2's plain HiFi-GAN keys (`vocoder.conv_pre...`) are
kept under `vocoder.` inside Loom's LTX2Vocoder too. diffusers' AutoencoderKLLTX2Audio, LTX2Vocoder and
LTX2VocoderWithBWE layouts are renamed by `convert_diffusers_audio_vae` / `convert_diffusers_vocoder`. What the
weights do not say (sample rates, hops, n_fft, mel bins, the causal axis, the vocoder's upsampling strides) comes
from the safetensors header's `config` JSON when given (ComfyUI reads it the same way), else the released values.

Matched against diffusers' AutoencoderKLLTX2Audio, LTX2Vocoder and LTX2VocoderWithBWE (tests/ldm/test_ltx2_audio.py).
One difference from diffusers, following ComfyUI and Lightricks' config (`use_tanh_at_final: false`): LTX-2.3's
first-stage BigVGAN clamps its waveform to -1..1 before the bandwidth extension; diffusers leaves it unclamped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict

LATENT_DOWNSAMPLE = 4  # mel frames (and mel bins) per latent frame (bin)
VAE_PREFIX = "audio_vae."
VOCODER_PREFIX = "vocoder."
CAUSAL_AXES = ("none", "width", "height", "width-compatibility")


# --- audio front end -----------------------------------------------------------------------------------------

def resample(waveform: torch.Tensor, rate: int, new_rate: int, lowpass_filter_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """[..., N] from `rate` to `new_rate`: torchaudio.functional.resample's default (Hann-windowed sinc) method, the
    one ComfyUI's LTX audio VAE calls; ceil(N * new_rate / rate) samples out."""
    if rate == new_rate:
        return waveform
    g = math.gcd(int(rate), int(new_rate))
    orig, new = int(rate) // g, int(new_rate) // g
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new
         + torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig) * base
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    *lead, length = waveform.shape
    x = F.pad(waveform.reshape(-1, 1, length), (width, width + orig))
    out = F.conv1d(x, kernel[:, None].to(x), stride=orig)  # [M, new, steps]
    out = out.transpose(1, 2).reshape(x.shape[0], -1)[:, :math.ceil(new * length / orig)]
    return out.reshape(*lead, -1)


def _hz_to_slaney(f: torch.Tensor) -> torch.Tensor:
    log_step = math.log(6.4) / 27.0
    linear = f * 3.0 / 200.0
    return torch.where(f >= 1000.0, 15.0 + torch.log(f.clamp(min=1e-10) / 1000.0) / log_step, linear)


def _slaney_to_hz(m: torch.Tensor) -> torch.Tensor:
    log_step = math.log(6.4) / 27.0
    return torch.where(m >= 15.0, 1000.0 * torch.exp(log_step * (m - 15.0)), m * 200.0 / 3.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels]: Slaney-scale triangles from 0 Hz to Nyquist with Slaney's area norm
    (torchaudio.functional.melscale_fbanks with norm and mel_scale "slaney")."""
    freqs = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = torch.tensor([0.0, sample_rate / 2.0], dtype=torch.float64)
    lo, hi = _hz_to_slaney(edges)
    points = _slaney_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64))
    gaps = points.diff()
    slopes = points[None] - freqs[:, None]
    rising = -slopes[:, :-2] / gaps[:-1]
    falling = slopes[:, 2:] / gaps[1:]
    bank = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return (bank * (2.0 / (points[2:] - points[:-2]))[None]).float()


def log_mel(waveform: torch.Tensor, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> torch.Tensor:
    """Waveform [B, C, N] -> log-mel [B, C, N // hop + 1, n_mels] in float32, as ComfyUI's AudioPreprocessor makes
    it (magnitude STFT, centred with reflection, periodic Hann window as long as n_fft)."""
    b, c, n = waveform.shape
    x = waveform.float().reshape(b * c, n)
    window = torch.hann_window(n_fft, device=x.device)
    spec = torch.stft(x, n_fft, hop_length, n_fft, window, center=True, pad_mode="reflect", return_complex=True)
    mel = torch.matmul(spec.abs().transpose(1, 2), mel_filterbank(sample_rate, n_fft, n_mels).to(x.device))
    return torch.log(mel.clamp(min=1e-5)).reshape(b, c, -1, n_mels)


# --- audio VAE -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioVAEConfig:
    """The causal audio VAE's shape (diffusers' AutoencoderKLLTX2Audio arguments, attention given per level) and the
    mel front end it was trained on."""

    base_channels: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 2  # mel channels in (stereo)
    out_channels: int = 2  # mel channels out
    latent_channels: int = 8
    double_z: bool = True
    norm_type: str = "pixel"  # "pixel" (RMS over channels) or "group" (32 groups)
    causality_axis: str = "height"  # the time axis of [B, C, time, mel]
    attn_levels: tuple[int, ...] = ()  # levels with an attention block after each res block
    mid_attention: bool = False
    sample_rate: int = 16000
    mel_hop_length: int = 160
    n_fft: int = 1024
    mel_bins: int = 64

    def __post_init__(self):
        if self.causality_axis not in CAUSAL_AXES:
            raise ValueError(f"causality_axis must be one of {CAUSAL_AXES}, got {self.causality_axis!r}")
        if self.norm_type not in ("pixel", "group"):
            raise ValueError(f"norm_type must be 'pixel' or 'group', got {self.norm_type!r}")

    @property
    def latent_mel_bins(self) -> int:
        return self.mel_bins // LATENT_DOWNSAMPLE

    @property
    def latents_per_second(self) -> float:
        return self.sample_rate / self.mel_hop_length / LATENT_DOWNSAMPLE


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-6)


def _norm(channels: int, kind: str) -> nn.Module:
    return nn.GroupNorm(32, channels, eps=1e-6) if kind == "group" else PixelNorm()


class CausalConv2d(nn.Module):
    """A stride-1 conv padded on the causal axis' past side only (both sides, halved, on the other axis)."""

    def __init__(self, cin: int, cout: int, kernel: int, axis: str):
        super().__init__()
        p = kernel - 1
        self.padding = {"none": (p // 2, p - p // 2, p // 2, p - p // 2),
                        "height": (p // 2, p - p // 2, p, 0)}.get(axis, (p, 0, p // 2, p - p // 2))
        self.conv = nn.Conv2d(cin, cout, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, c: AudioVAEConfig):
        super().__init__()
        self.norm1 = _norm(cin, c.norm_type)
        self.conv1 = CausalConv2d(cin, cout, 3, c.causality_axis)
        self.norm2 = _norm(cout, c.norm_type)
        self.conv2 = CausalConv2d(cout, cout, 3, c.causality_axis)
        if cin != cout:
            self.nin_shortcut = CausalConv2d(cin, cout, 1, c.causality_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over every (time, mel) position, 1x1 conv projections."""

    def __init__(self, channels: int, norm_type: str):
        super().__init__()
        self.norm = _norm(channels, norm_type)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    _PADS = {"none": (0, 1, 0, 1), "width": (2, 0, 0, 1), "height": (0, 1, 2, 0), "width-compatibility": (1, 0, 0, 1)}

    def __init__(self, channels: int, axis: str):
        super().__init__()
        self.pad = self._PADS[axis]
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class Upsample(nn.Module):
    """Nearest 2x, a causal conv, then the first step of the causal axis dropped (2 n - 1 steps from n)."""

    def __init__(self, channels: int, axis: str):
        super().__init__()
        self.axis = axis
        self.conv = CausalConv2d(channels, channels, 3, axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        if self.axis == "height":
            return x[:, :, 1:]
        return x[:, :, :, 1:] if self.axis == "width" else x


def _mid(channels: int, c: AudioVAEConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, c)
    mid.attn_1 = AttnBlock(channels, c.norm_type) if c.mid_attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, c)
    return mid


def _run_level(level: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        x = block(x)
        if len(level.attn):
            x = level.attn[i](x)
    return x


class AudioEncoder(nn.Module):
    def __init__(self, c: AudioVAEConfig):
        super().__init__()
        self.conv_in = CausalConv2d(c.in_channels, c.base_channels, 3, c.causality_axis)
        self.down = nn.ModuleList()
        cin = c.base_channels
        for i, mult in enumerate(c.ch_mult):
            level, cout = nn.Module(), c.base_channels * mult
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, c) for j in range(c.num_res_blocks))
            level.attn = nn.ModuleList(AttnBlock(cout, c.norm_type) for _ in range(c.num_res_blocks)
                                       if i in c.attn_levels)
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(cout, c.causality_axis)
            self.down.append(level)
            cin = cout
        self.mid = _mid(cin, c)
        self.norm_out = _norm(cin, c.norm_type)
        self.conv_out = CausalConv2d(cin, c.latent_channels * (2 if c.double_z else 1), 3, c.causality_axis)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(mel)
        for level in self.down:
            x = _run_level(level, x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        return self.conv_out(F.silu(self.norm_out(x)))


class AudioDecoder(nn.Module):
    def __init__(self, c: AudioVAEConfig):
        super().__init__()
        cin = c.base_channels * c.ch_mult[-1]
        self.conv_in = CausalConv2d(c.latent_channels, cin, 3, c.causality_axis)
        self.mid = _mid(cin, c)
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            level, cout = nn.Module(), c.base_channels * c.ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, c)
                                        for j in range(c.num_res_blocks + 1))
            level.attn = nn.ModuleList(AttnBlock(cout, c.norm_type) for _ in range(c.num_res_blocks + 1)
                                       if i in c.attn_levels)
            if i != 0:
                level.upsample = Upsample(cout, c.causality_axis)
            levels.insert(0, level)
            cin = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, c.norm_type)
        self.conv_out = CausalConv2d(cin, c.out_channels, 3, c.causality_axis)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            x = _run_level(level, x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class LatentStatistics(nn.Module):
    """The file's per-feature latent statistics, over the token layout's channels * latent mel bins features."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean-of-means", torch.zeros(features))
        self.register_buffer("std-of-means", torch.ones(features))

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return self._in_tokens(latents, lambda t: (t - self.get_buffer("mean-of-means").to(t))
                               / self.get_buffer("std-of-means").to(t))

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return self._in_tokens(latents, lambda t: t * self.get_buffer("std-of-means").to(t)
                               + self.get_buffer("mean-of-means").to(t))

    @staticmethod
    def _in_tokens(latents: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        b, c, t, f = latents.shape
        tokens = fn(latents.permute(0, 2, 1, 3).reshape(b, t, c * f))
        return tokens.reshape(b, t, c, f).permute(0, 2, 1, 3)


class LTX2AudioVAE(nn.Module):
    """LTX-2's audio VAE. `encode(waveform, rate)` -> normalised latents [B, 8, T, 16]; `decode(latents)` -> log-mel
    [B, 2, 4 T - 3, 64] for the vocoder. Module names are the file's (under `audio_vae.`)."""

    def __init__(self, config: AudioVAEConfig = AudioVAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = AudioEncoder(config)
        self.decoder = AudioDecoder(config)
        self.per_channel_statistics = LatentStatistics(config.latent_channels * config.latent_mel_bins)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def latents_per_second(self) -> float:
        return self.config.latents_per_second

    def num_latent_frames(self, frames: int, frame_rate: float) -> int:
        """Latent frames for `frames` video frames at `frame_rate`: ceil(seconds * 25), ComfyUI's
        LTXVEmptyLatentAudio (num_of_latents_from_frames)."""
        return math.ceil(float(frames) / frame_rate * self.latents_per_second)

    def latent_shape(self, frames: int, frame_rate: float, batch_size: int = 1) -> tuple[int, int, int, int]:
        """LTXVEmptyLatentAudio's latent: [batch, latent channels, num_latent_frames, mel bins / 4]."""
        c = self.config
        return batch_size, c.latent_channels, self.num_latent_frames(frames, frame_rate), c.latent_mel_bins

    def waveform_to_mel(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """[B, C, N] at `sample_rate` (mono is spread to the encoder's channels) -> log-mel [B, C, frames, bins]."""
        c = self.config
        if waveform.ndim != 3:
            raise ValueError(f"expected a waveform [batch, channels, samples], got {list(waveform.shape)}")
        if waveform.shape[1] != c.in_channels:
            if waveform.shape[1] != 1:
                raise ValueError(f"the audio VAE takes {c.in_channels} channels (or mono), got {waveform.shape[1]}")
            waveform = waveform.expand(-1, c.in_channels, -1)
        waveform = resample(waveform.float(), sample_rate, c.sample_rate)
        return log_mel(waveform, c.sample_rate, c.n_fft, c.mel_hop_length, c.mel_bins)

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, C, frames, bins] -> normalised latents (the posterior's mean)."""
        moments = self.encoder(mel.to(self.dtype))
        return self.per_channel_statistics.normalize(moments[:, :self.config.latent_channels])

    def encode(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Waveform [B, C, N] at `sample_rate` -> normalised latents [B, latent channels, T, mel bins / 4]."""
        return self.encode_mel(self.waveform_to_mel(waveform, sample_rate))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, latent channels, T, bins / 4] -> log-mel [B, out channels, 4 T - 3, mel bins]
        (4 T when not causal), cropped or zero-padded to that as ComfyUI and diffusers do."""
        c = self.config
        if latents.ndim != 4 or latents.shape[1] != c.latent_channels:
            raise ValueError(f"expected latents [batch, {c.latent_channels}, frames, bins], got {list(latents.shape)}")
        z = self.per_channel_statistics.denormalize(latents.to(self.dtype))
        mel = self.decoder(z)
        frames = latents.shape[2] * LATENT_DOWNSAMPLE
        if c.causality_axis != "none":
            frames = max(frames - (LATENT_DOWNSAMPLE - 1), 1)
        mel = mel[:, :, :frames, :c.mel_bins]
        return F.pad(mel, (0, c.mel_bins - mel.shape[3], 0, frames - mel.shape[2]))


# --- vocoder -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratorConfig:
    """One HiFi-GAN / BigVGAN v2 generator: mel [B, in_channels, T] -> waveform [B, out_channels, T * prod(rates)].
    `final` is what bounds the output: "tanh", "clamp" (-1..1) or "none"."""

    in_channels: int = 128
    initial_channels: int = 1024
    upsample_rates: tuple[int, ...] = (6, 5, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 15, 8, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    out_channels: int = 2
    bigvgan: bool = False  # AMP blocks with anti-aliased Snake activations; else leaky-ReLU HiFi-GAN
    snake_beta: bool = True  # BigVGAN's SnakeBeta (alpha and beta) rather than Snake (alpha)
    final: str = "tanh"
    final_bias: bool = True

    @property
    def hop(self) -> int:
        return math.prod(self.upsample_rates)


@dataclass(frozen=True)
class VocoderConfig:
    """The vocoder: one generator, or (LTX-2.3) a generator, then the bandwidth extension: a causal STFT log-mel
    (`bwe_n_fft`, `bwe_hop`, `bwe_mels`) of its waveform into the second generator `bwe`, whose output adds to the
    first waveform upsampled from `input_sample_rate` to `sample_rate`."""

    vocoder: GeneratorConfig = field(default_factory=GeneratorConfig)
    bwe: GeneratorConfig | None = None
    sample_rate: int = 24000  # of the output
    input_sample_rate: int = 16000  # of the first generator's waveform, with a bandwidth extension
    bwe_n_fft: int = 512
    bwe_hop: int = 80
    bwe_mels: int = 64


LTX2_VOCODER = VocoderConfig()
LTX23_VOCODER = VocoderConfig(
    vocoder=GeneratorConfig(initial_channels=1536, upsample_rates=(5, 2, 2, 2, 2, 2),
                            upsample_kernel_sizes=(11, 4, 4, 4, 4, 4), bigvgan=True, final="clamp", final_bias=False),
    bwe=GeneratorConfig(initial_channels=512, upsample_rates=(6, 5, 2, 2, 2), upsample_kernel_sizes=(12, 11, 4, 4, 4),
                        bigvgan=True, final="none", final_bias=False),
    sample_rate=48000)


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """BigVGAN's anti-aliasing low-pass: a Kaiser-windowed sinc, [1, 1, kernel_size], summing to one."""
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    t = torch.arange(-half, half) + 0.5 if kernel_size % 2 == 0 else torch.arange(kernel_size) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class _KaiserUpsample(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio, self.pad = ratio, kernel_size // ratio - 1
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.filter.to(x).expand(c, -1, -1), stride=self.ratio, groups=c)
        return x[..., self.crop_left:-self.crop_right]


class _LowPass(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.stride, self.pad = ratio, (kernel_size // 2 - int(kernel_size % 2 == 0), kernel_size // 2)
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, self.pad, mode="replicate")
        return F.conv1d(x, self.filter.to(x).expand(c, -1, -1), stride=self.stride, groups=c)


class _KaiserDownsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.lowpass = _LowPass()


class Snake(nn.Module):
    """x + sin^2(e^alpha x) / e^beta per channel (beta = alpha for plain Snake)."""

    def __init__(self, channels: int, beta: bool):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        if beta:
            self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.to(x)[None, :, None].exp()
        amplitude = self.beta.to(x)[None, :, None].exp() if hasattr(self, "beta") else alpha
        return x + torch.sin(x * alpha).pow(2) / (amplitude + 1e-9)


class AntiAliasSnake(nn.Module):
    """BigVGAN's Activation1d: 2x Kaiser-sinc upsample, Snake, low-pass 2x downsample."""

    def __init__(self, channels: int, beta: bool):
        super().__init__()
        self.act = Snake(channels, beta)
        self.upsample = _KaiserUpsample()
        self.downsample = _KaiserDownsample()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample.lowpass(self.act(self.upsample(x)))


class ResBlock(nn.Module):
    """HiFi-GAN's ResBlock1 (leaky ReLU 0.1) or BigVGAN's AMPBlock1 (anti-aliased Snake): per dilation,
    act -> dilated conv -> act -> conv, added to the input."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...], g: GeneratorConfig):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2)
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2)
                                    for _ in dilations)
        if g.bigvgan:
            self.acts1 = nn.ModuleList(AntiAliasSnake(channels, g.snake_beta) for _ in dilations)
            self.acts2 = nn.ModuleList(AntiAliasSnake(channels, g.snake_beta) for _ in dilations)

    def _act(self, acts: str, i: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, acts)[i](x) if hasattr(self, acts) else F.leaky_relu(x, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2, strict=True)):
            x = x + c2(self._act("acts2", i, c1(self._act("acts1", i, x))))
        return x


class Generator(nn.Module):
    def __init__(self, g: GeneratorConfig):
        super().__init__()
        self.config = g
        self.conv_pre = nn.Conv1d(g.in_channels, g.initial_channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        ch = g.initial_channels
        for rate, kernel in zip(g.upsample_rates, g.upsample_kernel_sizes, strict=True):
            self.ups.append(nn.ConvTranspose1d(ch, ch // 2, kernel, rate, padding=(kernel - rate) // 2))
            ch //= 2
            self.resblocks.extend(ResBlock(ch, k, d, g)
                                  for k, d in zip(g.resblock_kernel_sizes, g.resblock_dilations, strict=True))
        if g.bigvgan:
            self.act_post = AntiAliasSnake(ch, g.snake_beta)
        self.conv_post = nn.Conv1d(ch, g.out_channels, 7, padding=3, bias=g.final_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, kernels = self.config, len(self.config.resblock_kernel_sizes)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(x if g.bigvgan else F.leaky_relu(x, 0.1))
            x = sum(block(x) for block in self.resblocks[i * kernels:(i + 1) * kernels]) / kernels
        x = self.conv_post(self.act_post(x) if g.bigvgan else F.leaky_relu(x))  # HiFi-GAN's last slope: 0.01
        if g.final == "tanh":
            return torch.tanh(x)
        return x.clamp(-1, 1) if g.final == "clamp" else x


class _STFT(nn.Module):
    def __init__(self, n_fft: int):
        super().__init__()
        bins = n_fft // 2 + 1
        self.register_buffer("forward_basis", torch.zeros(2 * bins, 1, n_fft))
        self.register_buffer("inverse_basis", torch.zeros(2 * bins, 1, n_fft))  # kept for the file; unused


class CausalMelSTFT(nn.Module):
    """The bandwidth extension's analysis: a causal STFT (left padding only) with the file's windowed DFT bases,
    magnitudes, the file's mel basis, log of the values clamped to 1e-5. [M, N] -> [M, mels, frames]."""

    def __init__(self, n_fft: int, hop: int, mels: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.stft_fn = _STFT(n_fft)
        self.register_buffer("mel_basis", torch.zeros(mels, n_fft // 2 + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x[:, None], (max(0, self.n_fft - self.hop), 0))
        spec = F.conv1d(x, self.stft_fn.forward_basis.to(x), stride=self.hop)
        real, imag = spec.chunk(2, dim=1)
        mel = torch.matmul(self.mel_basis.to(x), torch.sqrt(real ** 2 + imag ** 2))
        return torch.log(mel.clamp(min=1e-5))


def hann_sinc_upsample(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """[B, C, N] -> [B, C, N * ratio]: the bandwidth extension's skip path (a Hann-windowed sinc, width 6,
    rolloff 0.99, edges replicated), as ComfyUI's and diffusers' UpSample1d with window_type "hann"."""
    rolloff, taps_width = 0.99, 6
    width = math.ceil(taps_width / rolloff)
    size = 2 * width * ratio + 1
    t = (torch.arange(size, dtype=torch.float32) / ratio - width) * rolloff
    window = torch.cos(t.clamp(-taps_width, taps_width) * math.pi / taps_width / 2) ** 2
    taps = (torch.sinc(t) * window * rolloff / ratio).to(x).view(1, 1, -1)
    c = x.shape[1]
    y = ratio * F.conv_transpose1d(F.pad(x, (width, width), mode="replicate"), taps.expand(c, -1, -1),
                                   stride=ratio, groups=c)
    return y[..., 2 * width * ratio:-(size - ratio)]


class LTX2Vocoder(nn.Module):
    """Log-mel [B, C, frames, bins] (the audio VAE's decode) -> waveform [B, C, samples] at `sample_rate`
    (frames * hop samples: 240 a frame for LTX-2 at 24 kHz, 480 for LTX-2.3 at 48 kHz)."""

    def __init__(self, config: VocoderConfig = LTX2_VOCODER):
        super().__init__()
        self.config = config
        self.vocoder = Generator(config.vocoder)
        if config.bwe is not None:
            self.bwe_generator = Generator(config.bwe)
            self.mel_stft = CausalMelSTFT(config.bwe_n_fft, config.bwe_hop, config.bwe_mels)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def dtype(self) -> torch.dtype:
        return self.vocoder.conv_pre.weight.dtype

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.ndim != 4:
            raise ValueError(f"expected a log-mel [batch, channels, frames, bins], got {list(mel.shape)}")
        x = self.vocoder(mel.to(self.dtype).transpose(2, 3).flatten(1, 2))
        if self.config.bwe is None:
            return x
        b, c, n = x.shape
        hop = self.config.bwe_hop
        x = F.pad(x, (0, -n % hop))
        bwe_mel = self.mel_stft(x.flatten(0, 1)).unflatten(0, (b, c))  # [B, C, mels, frames]
        residual = self.bwe_generator(bwe_mel.flatten(1, 2))
        skip = hann_sinc_upsample(x, self.config.sample_rate // self.config.input_sample_rate)
        out = (residual + skip).clamp(-1, 1)
        return out[..., :n * self.config.sample_rate // self.config.input_sample_rate]


# --- files ---------------------------------------------------------------------------------------------------

# The released generators' strides, known by their transposed convolutions' kernels (weights hold no strides).
_KNOWN_RATES = {(16, 15, 8, 4, 4): (6, 5, 2, 2, 2), (11, 4, 4, 4, 4, 4): (5, 2, 2, 2, 2, 2),
                (12, 11, 4, 4, 4): (6, 5, 2, 2, 2)}


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m[1]) for k in sd if (m := re.match(pattern, k))})


def _header_config(metadata: Mapping[str, str] | None, part: str) -> dict:
    """The `part` ("audio_vae" or "vocoder") of a safetensors header's `config` JSON, or {}."""
    raw = (metadata or {}).get("config") or {}
    try:
        section = (json.loads(raw) if isinstance(raw, str) else raw).get(part)
    except (ValueError, AttributeError):
        return {}
    return section if isinstance(section, dict) else {}


def audio_vae_config_from_state_dict(sd: Mapping[str, torch.Tensor],
                                     metadata: Mapping[str, str] | None = None) -> AudioVAEConfig:
    """The audio VAE's config (its own names, no prefix) from the weights' shapes; the front end and causal axis from
    the header's `config` (ComfyUI's reading of it: an encoder section without causality_axis means "width"), else
    LTX-2's 16 kHz, hop 160, n_fft 1024, "height"; the mel bins from the latent statistics' length
    (latent channels * bins / 4) unless the header says."""
    def weight(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"no {key}")
        return sd[key]

    conv_in = weight("encoder.conv_in.conv.weight")
    base = conv_in.shape[0]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ValueError("no encoder levels (encoder.down.N...)")
    mult = tuple(weight(f"encoder.down.{i}.block.0.conv1.conv.weight").shape[0] // base for i in levels)
    latent = weight("decoder.conv_in.conv.weight").shape[1]
    mel_bins = weight("per_channel_statistics.mean-of-means").shape[0] // latent * LATENT_DOWNSAMPLE
    header = _header_config(metadata, "audio_vae")
    params = header.get("model", {}).get("params", {})
    enc = params.get("encoder", params.get("ddconfig", {}))
    stft = params.get("preprocessing", {}).get("stft", {})
    rate = header.get("variables", {}).get("sampling_rate", params.get("sampling_rate",
                                                                       header.get("sampling_rate", 16000)))
    return AudioVAEConfig(
        base_channels=base, ch_mult=mult, num_res_blocks=len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        in_channels=conv_in.shape[1], out_channels=weight("decoder.conv_out.conv.weight").shape[0],
        latent_channels=latent, double_z=weight("encoder.conv_out.conv.weight").shape[0] == 2 * latent,
        norm_type="group" if "encoder.norm_out.weight" in sd else "pixel",
        causality_axis=str(enc.get("causality_axis", "width") or "none") if enc else "height",
        attn_levels=tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd),
        mid_attention="encoder.mid.attn_1.q.weight" in sd, sample_rate=int(rate),
        mel_hop_length=int(stft.get("hop_length", 160)), n_fft=int(stft.get("filter_length", 1024)),
        mel_bins=int(enc.get("mel_bins") or mel_bins))


def _generator_config(sd: Mapping[str, torch.Tensor], prefix: str, header: dict, final: str) -> GeneratorConfig:
    pre = sd[f"{prefix}conv_pre.weight"]
    ups = _indices(sd, rf"{re.escape(prefix)}ups\.(\d+)\.weight")
    kernels = tuple(sd[f"{prefix}ups.{i}.weight"].shape[-1] for i in ups)
    rates = header.get("upsample_rates") or _KNOWN_RATES.get(kernels)
    if rates is None:
        raise ValueError(f"vocoder upsampling kernels {kernels} are not a released shape and the header gives no "
                         "upsample_rates")
    per_level = len(_indices(sd, rf"{re.escape(prefix)}resblocks\.(\d+)\.convs1\.0\.weight")) // len(ups)
    res_kernels = tuple(sd[f"{prefix}resblocks.{j}.convs1.0.weight"].shape[-1] for j in range(per_level))
    dilations = header.get("resblock_dilation_sizes") or [
        (1, 3, 5)[:len(_indices(sd, rf"{re.escape(prefix)}resblocks\.{j}\.convs1\.(\d+)\.weight"))]
        for j in range(per_level)]
    bigvgan = f"{prefix}act_post.act.alpha" in sd
    return GeneratorConfig(in_channels=pre.shape[1], initial_channels=pre.shape[0], upsample_rates=tuple(rates),
                           upsample_kernel_sizes=kernels, resblock_kernel_sizes=res_kernels,
                           resblock_dilations=tuple(tuple(d) for d in dilations),
                           out_channels=sd[f"{prefix}conv_post.weight"].shape[0], bigvgan=bigvgan,
                           snake_beta=not bigvgan or f"{prefix}act_post.act.beta" in sd, final=final,
                           final_bias=f"{prefix}conv_post.bias" in sd)


def vocoder_config_from_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                                   mel_sample_rate: int = 16000, mel_hop_length: int = 160) -> VocoderConfig:
    """The vocoder's config (file names without the `vocoder.` prefix: `conv_pre...` for LTX-2, `vocoder.*`,
    `bwe_generator.*`, `mel_stft.*` for LTX-2.3) from the weights' shapes and the header's `config` (upsampling
    strides and rates), else the released strides; the output rate from the mel rate and the total upsampling."""
    header = _header_config(metadata, "vocoder")
    if "bwe_generator.conv_pre.weight" not in sd:
        main_header = header.get("vocoder", header)
        final = "tanh" if main_header.get("use_tanh_at_final", True) else "clamp"
        g = _generator_config(sd, "", main_header, final)
        rate = main_header.get("output_sample_rate") or mel_sample_rate * g.hop // mel_hop_length
        return VocoderConfig(vocoder=g, sample_rate=int(rate))
    main_header, bwe_header = header.get("vocoder", {}), header.get("bwe", {})
    main = _generator_config(sd, "vocoder.", main_header,
                             "tanh" if main_header.get("use_tanh_at_final", False) else "clamp")
    bwe = _generator_config(sd, "bwe_generator.", bwe_header, "none")
    n_fft = sd["mel_stft.stft_fn.forward_basis"].shape[-1]
    hop = int(bwe_header.get("hop_length", 80))
    input_rate = int(bwe_header.get("input_sampling_rate", mel_sample_rate * main.hop // mel_hop_length))
    return VocoderConfig(vocoder=main, bwe=bwe, input_sample_rate=input_rate,
                         sample_rate=int(bwe_header.get("output_sampling_rate", input_rate * bwe.hop // hop)),
                         bwe_n_fft=n_fft, bwe_hop=hop, bwe_mels=sd["mel_stft.mel_basis"].shape[0])


def convert_diffusers_audio_vae(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers' AutoencoderKLLTX2Audio weights -> the original names (its converter's map, reversed)."""
    names = {"latents_mean": "per_channel_statistics.mean-of-means",
             "latents_std": "per_channel_statistics.std-of-means"}
    return {names.get(k, k): v for k, v in sd.items()}


def convert_diffusers_vocoder(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers' LTX2Vocoder / LTX2VocoderWithBWE weights -> the original names (its converter's map, reversed)."""
    renames = (("upsamplers.", "ups."), ("resnets.", "resblocks."), ("conv_in.", "conv_pre."),
               ("conv_out.", "conv_post."), ("act_out.", "act_post."),
               ("downsample.filter", "downsample.lowpass.filter"))
    out = {}
    for key, value in sd.items():
        for old, new in renames:
            key = re.sub(rf"(^|\.){re.escape(old)}", rf"\g<1>{new}", key)
        out[key] = value
    return out


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _load(factory: Callable[[], nn.Module], sd: StateDict, what: str, path: Path, device: torch.device | str,
          dtype: torch.dtype) -> nn.Module:
    """`factory()` with the file's weights, strictly: the anti-aliasing filters (fixed, not learned) the file may
    leave out are computed; anything else missing or left over is a CheckpointError."""
    with torch.device("meta"):
        expected = set(factory().state_dict())
    sd = {**{k: kaiser_sinc_filter(0.25, 0.3, 12) for k in expected if k.endswith(".filter") and k not in sd}, **sd}
    unused = sorted(set(sd) - expected)
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise CheckpointError(f"{path.name}: {len(unused)} weights have no place in the {what}: {shown}")
    return ckpt._materialize(factory, sd, what, path, device, dtype)


def load_ltx2_audio(sd_or_path: str | Path | Mapping[str, torch.Tensor], prefix_vae: str = VAE_PREFIX,
                    prefix_vocoder: str = VOCODER_PREFIX, metadata: Mapping[str, str] | None = None,
                    device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[LTX2AudioVAE, LTX2Vocoder]:
    """The audio VAE and vocoder of an LTX-2 / LTX-2.3 file or state dict (the keys under each prefix), frozen, on
    `device` in `dtype`; diffusers' layouts are renamed. `metadata` (the safetensors header, read from the file when
    a path is given) fills in what the weights do not hold. Strict: CheckpointError for missing weights, weights with
    no place, or shapes that do not fit."""
    if isinstance(sd_or_path, Mapping):
        sd, path = dict(sd_or_path), Path("state dict")
    else:
        path = Path(sd_or_path)
        sd = ckpt.load_state_dict(path)
        metadata = ckpt.read_metadata(path) if metadata is None else metadata
    vae_sd, voc_sd = _strip(sd, prefix_vae), _strip(sd, prefix_vocoder)
    if "latents_mean" in vae_sd:
        vae_sd = convert_diffusers_audio_vae(vae_sd)
    if "conv_in.weight" in voc_sd or "vocoder.conv_in.weight" in voc_sd:
        voc_sd = convert_diffusers_vocoder(voc_sd)
    try:
        vae_config = audio_vae_config_from_state_dict(vae_sd, metadata)
        voc_config = vocoder_config_from_state_dict(voc_sd, metadata, vae_config.sample_rate,
                                                    vae_config.mel_hop_length)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path.name}: not a whole LTX-2 audio VAE and vocoder ({e})") from None
    if voc_config.bwe is None:  # LTX-2's lone generator sits under `vocoder.` in Loom's module
        voc_sd = {f"vocoder.{k}": v for k, v in voc_sd.items()}
    vae = _load(lambda: LTX2AudioVAE(vae_config), vae_sd, "LTX-2 audio VAE", path, device, dtype)
    vocoder = _load(lambda: LTX2Vocoder(voc_config), voc_sd, "LTX-2 vocoder", path, device, dtype)
    return vae, vocoder
