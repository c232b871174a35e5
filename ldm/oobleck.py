"""The Oobleck audio autoencoder (Stability AI's stable-audio-tools; the VAE of Stable Audio Open 1.0 and of ACE-Step
1.5): stereo waveforms in -1..1 to 64-channel latents at 1/hop of the sample rate (hop 2048 at 44.1 kHz for Stable
Audio Open, 1920 at 48 kHz, i.e. 25 latents a second, for ACE-Step 1.5) and back.

The network is convolutions only: Snake activations (x + sin^2(e^alpha x) / e^beta, per channel), weight-normed 1-d
convolutions, residual units with dilations 1, 3 and 9, strided convolutions down and transposed ones up. Module
attribute names are stable-audio-tools' keys (`encoder.layers.N.layers.M...`), which Stable Audio Open's single file
(under `pretransform.model.`) and ComfyUI's VAE files use; diffusers' AutoencoderOobleck names
(`encoder.block.N.res_unit1...`) are renamed on load. Weight norm is folded into plain weights on load: the network
computes the same function with one tensor per convolution instead of two.

With no normalisation or attention anywhere, every output depends only on a bounded window of the input, so long
audio is encoded and decoded in chunks with enough context on each side that the result is the same as in one piece.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ldm import checkpoint as ckpt
from ldm.checkpoint import CheckpointError, StateDict

SAO_PREFIX = "pretransform.model."  # where Stable Audio Open's single file keeps the VAE


@dataclass(frozen=True)
class OobleckConfig:
    """diffusers' AutoencoderOobleck arguments. The encoder ends in 2 * decoder_input_channels channels (the
    posterior's mean and scale): diffusers builds that last convolution encoder_hidden_size wide, which the released
    models' 128 = 2 * 64 makes the same. Downsampling ratios are even (as released), so T samples make exactly
    T / hop latent frames and back."""

    encoder_hidden_size: int = 128
    downsampling_ratios: tuple[int, ...] = (2, 4, 4, 8, 8)
    channel_multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    decoder_channels: int = 128
    decoder_input_channels: int = 64
    audio_channels: int = 2
    sampling_rate: int = 44100

    @property
    def latent_channels(self) -> int:
        return self.decoder_input_channels

    @property
    def hop_length(self) -> int:
        return math.prod(self.downsampling_ratios)


STABLE_AUDIO_OOBLECK = OobleckConfig()
ACE_STEP_OOBLECK = OobleckConfig(downsampling_ratios=(2, 4, 4, 6, 10), sampling_rate=48000)
# Stable Audio Open's levels, strides and 64 latent channels (latents fit its DiT and ComfyUI's StableAudio1 format)
# at a few channels a level: tests and examples.
TINY_OOBLECK = OobleckConfig(encoder_hidden_size=8, channel_multiples=(1, 1, 2, 2, 4), decoder_channels=8)
# Sample rates of the released hops; the weights do not say, and nothing else has either hop.
_RATES = {STABLE_AUDIO_OOBLECK.hop_length: 44100, ACE_STEP_OOBLECK.hop_length: 48000}
_DILATIONS = (1, 3, 9)


class Snake(nn.Module):
    """Snake activation with per-channel log-scale frequency alpha and magnitude beta (BigVGAN's SnakeBeta)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[:, None]
        inverse_beta = (self.beta.exp()[:, None] + 1e-9).reciprocal()
        return torch.addcmul(x, torch.sin(alpha * x).pow(2), inverse_beta)


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.layers = nn.Sequential(
            Snake(channels), nn.Conv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            Snake(channels), nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.layers = nn.Sequential(
            *(ResidualUnit(in_channels, d) for d in _DILATIONS), Snake(in_channels),
            nn.Conv1d(in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.layers = nn.Sequential(
            Snake(in_channels),
            nn.ConvTranspose1d(in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
            *(ResidualUnit(out_channels, d) for d in _DILATIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _encoder(c: OobleckConfig) -> nn.Module:
    widths = [c.encoder_hidden_size * m for m in (1, *c.channel_multiples)]
    return nn.Sequential(
        nn.Conv1d(c.audio_channels, widths[0], 7, padding=3),
        *(EncoderBlock(widths[i], widths[i + 1], s) for i, s in enumerate(c.downsampling_ratios)),
        Snake(widths[-1]), nn.Conv1d(widths[-1], 2 * c.latent_channels, 3, padding=1))


def _decoder(c: OobleckConfig) -> nn.Module:
    widths = [c.decoder_channels * m for m in (1, *c.channel_multiples)]
    levels = len(c.downsampling_ratios)
    return nn.Sequential(
        nn.Conv1d(c.latent_channels, widths[-1], 7, padding=3),
        *(DecoderBlock(widths[levels - i], widths[levels - i - 1], s)
          for i, s in enumerate(reversed(c.downsampling_ratios))),
        Snake(widths[0]), nn.Conv1d(widths[0], c.audio_channels, 7, padding=3, bias=False))


class _Layers(nn.Module):
    """A stable-audio-tools encoder or decoder: its `layers` Sequential, so the keys read `encoder.layers.N...`."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def encoder_context(c: OobleckConfig) -> int:
    """Latent frames of audio on each side that decide one latent (a bound): the context a chunked encode needs."""
    radius = 1  # the last convolution, kernel 3, in latent frames
    for stride in reversed(c.downsampling_ratios):
        radius = radius * stride + 2 * stride  # the strided convolution, kernel 2 * stride
        radius += 3 * sum(_DILATIONS)  # three residual units, kernel 7
    return math.ceil((radius + 3) / c.hop_length)


def decoder_context(c: OobleckConfig) -> int:
    """Latent frames on each side that decide one latent frame's audio (a bound): a chunked decode's context."""
    radius = 3  # the last convolution, kernel 7, in samples
    for stride in c.downsampling_ratios:  # the last block upsamples by the first ratio
        radius += 3 * sum(_DILATIONS)
        radius = math.ceil(radius / stride) + 2  # the transposed convolution, kernel 2 * stride
    return radius + 3


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, frames: int, chunk: int, context: int,
             frame_in: int, frame_out: int) -> torch.Tensor:
    """`fn` over `x` (`frames` latent frames of `frame_in` steps each) `chunk` frames at a time, each run with
    `context` frames either side (fewer at the ends, where `fn` pads as it does for the whole), keeping the middle."""
    pieces = []
    for start in range(0, frames, chunk):
        stop = min(start + chunk, frames)
        lo, hi = max(0, start - context), min(frames, stop + context)
        out = fn(x[..., lo * frame_in:hi * frame_in])
        pieces.append(out[..., (start - lo) * frame_out:(stop - lo) * frame_out])
    return torch.cat(pieces, dim=-1)


class OobleckVAE(nn.Module):
    def __init__(self, config: OobleckConfig = STABLE_AUDIO_OOBLECK):
        super().__init__()
        self.config = config
        self.encoder = _Layers(_encoder(config))
        self.decoder = _Layers(_decoder(config))

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def audio_channels(self) -> int:
        return self.config.audio_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.layers[0].weight.dtype

    def encode(self, waveform: torch.Tensor, chunk: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, audio_channels, T] in -1..1 -> the posterior's mean [B, latent_channels, ceil(T / hop)], the end
        zero-padded to a whole latent frame (ComfyUI instead crops T to a multiple of the hop, centred). `chunk`
        (latent frames) bounds memory on long audio without changing the result. With a `generator`, a sample of
        the posterior instead (mean + (softplus(scale) + 1e-4) * noise), as stable-audio-tools' and ComfyUI's
        encode always return."""
        if waveform.ndim != 3 or waveform.shape[1] != self.audio_channels:
            raise ValueError(f"expected a waveform [batch, {self.audio_channels}, samples], got "
                             f"{list(waveform.shape)}")
        hop = self.hop_length
        frames = -(-waveform.shape[-1] // hop)
        if frames == 0:
            raise ValueError("cannot encode an empty waveform")
        x = nn.functional.pad(waveform.to(self.dtype), (0, frames * hop - waveform.shape[-1]))
        if chunk is None or chunk >= frames:
            moments = self.encoder(x)
        else:
            moments = _chunked(self.encoder, x, frames, chunk, encoder_context(self.config), hop, 1)
        mean, scale = moments.chunk(2, dim=1)
        if generator is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return mean + (nn.functional.softplus(scale) + 1e-4) * noise.to(mean.device)

    def decode(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """[B, latent_channels, L] -> waveform [B, audio_channels, L * hop]; `chunk` (latent frames) bounds memory
        on long audio without changing the result."""
        if latents.ndim != 3 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents [batch, {self.latent_channels}, frames], got {list(latents.shape)}")
        z = latents.to(self.dtype)
        frames = z.shape[-1]
        if chunk is None or chunk >= frames:
            return self.decoder(z)
        return _chunked(self.decoder, z, frames, chunk, decoder_context(self.config), 1, self.hop_length)


# --- files -----------------------------------------------------------------------------------------------

_MARKERS = ("decoder.layers.1.layers.0.beta",  # stable-audio-tools' (ComfyUI's test too)
            "decoder.block.0.snake1.beta")  # diffusers'
_WEIGHT_NORM = (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1"))
_DIFFUSERS_UNIT = {"snake1": "0", "conv1": "1", "snake2": "2", "conv2": "3"}


def is_oobleck(sd: Collection[str], prefix: str = "") -> bool:
    """Whether a state dict's keys (under `prefix`) hold an Oobleck VAE, in either layout."""
    return any(prefix + marker in sd for marker in _MARKERS)


def _sat_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderOobleck key in stable-audio-tools' names (scripts/convert_stable_audio.py reversed)."""
    m = re.fullmatch(r"(encoder|decoder)\.(conv1|snake1|conv2)\.(.+)", key)
    if m:
        index = {"conv1": 0, "snake1": levels + 1, "conv2": levels + 2}[m[2]]
        return f"{m[1]}.layers.{index}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.(\w+)\.(.+)", key)
    if m is None:
        return key
    part, rest = m[3], m[4]
    unit = re.fullmatch(r"res_unit(\d)", part)
    if unit:
        inner, leaf = rest.split(".", 1)
        layer = int(unit[1]) - 1 if m[1] == "encoder" else int(unit[1]) + 1
        part, rest = f"{layer}.layers.{_DIFFUSERS_UNIT.get(inner, inner)}", leaf
    else:
        part = {"snake1": "3", "conv1": "4"}.get(part, part) if m[1] == "encoder" else \
            {"snake1": "0", "conv_t1": "1"}.get(part, part)
    return f"{m[1]}.layers.{int(m[2]) + 1}.layers.{part}.{rest}"


def _fold_weight_norm(sd: StateDict) -> StateDict:
    """Each weight-normed convolution's (magnitude, direction) pair as its weight, g * v / |v| with the norm over
    all but the first dimension (torch's weight_norm, dim=0), computed in float32."""
    out = dict(sd)
    for magnitude, direction in _WEIGHT_NORM:
        for key in [k for k in sd if k.endswith("." + direction)]:
            base = key[:-len(direction)]
            if base + magnitude not in sd:
                continue
            v, g = out.pop(key), out.pop(base + magnitude)
            norm = v.float().flatten(1).norm(dim=1).view(-1, *([1] * (v.ndim - 1)))
            out[base + "weight"] = (v.float() * (g.float() / norm)).to(v.dtype)
    return out


def to_stable_audio_layout(sd: StateDict) -> StateDict:
    """An Oobleck state dict (unprefixed) in Loom's names: stable-audio-tools' keys, Snake parameters as [C], weight
    norm folded. Loom's own names pass through."""
    if "decoder.block.0.snake1.beta" in sd:
        levels = len({int(m[1]) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
        sd = {_sat_key(k, levels): v for k, v in sd.items()}
    sd = {k: v.reshape(-1) if k.endswith((".alpha", ".beta")) else v for k, v in sd.items()}
    return _fold_weight_norm(sd)


def oobleck_config_from_state_dict(sd: StateDict, sampling_rate: int | None = None) -> OobleckConfig:
    """The config of an Oobleck VAE (Loom's names, as `to_stable_audio_layout` gives) from its weights' shapes; the
    sample rate, which the weights do not hold, from the hop (44.1 kHz for 2048, 48 kHz for 1920) unless given."""
    def weight(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"no {key}")
        return sd[key]

    first = weight("encoder.layers.0.weight")
    channels, audio_channels = first.shape[0], first.shape[1]
    levels = len({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.layers\.", k))})
    if levels == 0:
        raise ValueError("no encoder blocks (encoder.layers.N.layers...)")
    strides, multiples = [], []
    for n in range(1, levels + 1):
        down = weight(f"encoder.layers.{n}.layers.4.weight")
        if down.shape[-1] % 4 or down.shape[0] % channels:  # kernel 2 * stride, every released stride even
            raise ValueError(f"encoder block {n} does not have an Oobleck shape with an even stride "
                             f"({list(down.shape)})")
        strides.append(down.shape[-1] // 2)
        multiples.append(down.shape[0] // channels)
    decoder_widths = weight(f"decoder.layers.{levels + 1}.alpha").shape[0]
    hop = math.prod(strides)
    return OobleckConfig(encoder_hidden_size=channels, downsampling_ratios=tuple(strides),
                         channel_multiples=tuple(multiples), decoder_channels=decoder_widths,
                         decoder_input_channels=weight("decoder.layers.0.weight").shape[1],
                         audio_channels=audio_channels, sampling_rate=sampling_rate or _RATES.get(hop, 44100))


def _diffusers_sampling_rate(path: Path) -> int | None:
    """The sampling_rate of the config.json beside a diffusers file (`vae/config.json`), if there is one."""
    try:
        return int(json.loads((path.parent / "config.json").read_text())["sampling_rate"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_oobleck(sd_or_path: str | Path | StateDict, prefix: str = SAO_PREFIX, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, sampling_rate: int | None = None) -> OobleckVAE:
    """An Oobleck VAE from a file or state dict, frozen, on `device` in `dtype`: Stable Audio Open's single file (the
    VAE under `prefix`), a VAE file in stable-audio-tools' names (ComfyUI's), or diffusers' AutoencoderOobleck
    weights (a file, or its folder). Keys under `prefix` are used when there are any, else all of them. The sample
    rate comes from `sampling_rate`, else diffusers' config.json beside the file, else the hop. CheckpointError
    naming the file for anything that is not one, lacks weights, or holds weights an Oobleck VAE has no place for."""
    if isinstance(sd_or_path, dict):
        sd, path = sd_or_path, Path("state dict")
    else:
        path = Path(sd_or_path)
        if path.is_dir():
            path = path / "diffusion_pytorch_model.safetensors"
        sd = ckpt.load_state_dict(path)
    if prefix and any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not is_oobleck(sd):
        raise CheckpointError(f"{path.name}: not an Oobleck audio VAE (no {' or '.join(_MARKERS)}"
                              f"{f', under {prefix!r} or unprefixed' if prefix else ''})")
    if sampling_rate is None and path.is_file() and _MARKERS[1] in sd:
        sampling_rate = _diffusers_sampling_rate(path)
    sd = to_stable_audio_layout(sd)
    try:
        config = oobleck_config_from_state_dict(sd, sampling_rate)
    except ValueError as e:
        raise CheckpointError(f"{path.name}: not a whole Oobleck VAE ({e})") from None
    vae = ckpt._materialize(lambda: OobleckVAE(config), sd, "Oobleck VAE", path, device, dtype)
    unused = sorted(set(sd) - set(vae.state_dict()))
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise CheckpointError(f"{path.name}: {len(unused)} weights have no place in an Oobleck VAE: {shown}")
    return vae


# --- tiny files for tests ---------------------------------------------------------------------------------

def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def random_oobleck(config: OobleckConfig = TINY_OOBLECK, seed: int = 0) -> OobleckVAE:
    """An OobleckVAE with seeded random weights that keep activations in range (Snake parameters near 0, i.e. near
    x + sin^2(x), convolutions scaled by their fan-in, small biases)."""
    generator = torch.Generator().manual_seed(seed)
    model = OobleckVAE(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith((".alpha", ".beta")):
                param.copy_(0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.02 * noise)
            else:
                transposed = isinstance(_owner(model, name), nn.ConvTranspose1d)
                fan_in = 2 * param.shape[0] if transposed else param[0].numel()
                # A residual unit's output convolution quieter, so fifteen of them in a row do not blow up.
                gain = 0.3 if name.endswith("layers.3.weight") else 1.0
                param.copy_(noise * gain * fan_in ** -0.5)
    return model.eval().requires_grad_(False)


def unfold_weight_norm(sd: StateDict, generator: torch.Generator | None = None) -> StateDict:
    """Each convolution weight as a weight-norm pair (`weight_g`, `weight_v`), as the released files store them; v is
    the weight times a random positive factor per output, so reading the pair back must undo the scale."""
    out = {}
    for key, w in sd.items():
        if not key.endswith(".weight") or w.ndim != 3:
            out[key] = w
            continue
        base = key[:-len("weight")]
        scale = torch.rand(w.shape[0], 1, 1, generator=generator) + 0.5
        out[base + "weight_g"] = w.flatten(1).norm(dim=1).view(-1, 1, 1)
        out[base + "weight_v"] = w * scale
    return out


def _diffusers_key(key: str, levels: int) -> str:
    """A stable-audio-tools key in diffusers AutoencoderOobleck's names (scripts/convert_stable_audio.py's rules)."""
    m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
    if m is None:
        return key
    side, n, rest = m[1], int(m[2]), m[3]
    if not rest.startswith("layers."):
        outer = {0: "conv1", levels + 1: "snake1", levels + 2: "conv2"}[n]
        return f"{side}.{outer}.{rest}"
    block, rest = rest[len("layers."):].split(".", 1)
    if rest.startswith("layers."):  # a residual unit's layer
        inner, leaf = rest[len("layers."):].split(".", 1)
        unit = int(block) + 1 if side == "encoder" else int(block) - 1
        part = f"res_unit{unit}.{list(_DIFFUSERS_UNIT)[int(inner)]}"
        return f"{side}.block.{n - 1}.{part}.{leaf}"
    part = {"3": "snake1", "4": "conv1"}[block] if side == "encoder" else {"0": "snake1", "1": "conv_t1"}[block]
    return f"{side}.block.{n - 1}.{part}.{rest}"


def to_diffusers_layout(sd: StateDict, levels: int) -> StateDict:
    """Loom's (stable-audio-tools') keys as diffusers' AutoencoderOobleck's, Snake parameters as [1, C, 1]."""
    return {_diffusers_key(k, levels): v.view(1, -1, 1) if k.endswith((".alpha", ".beta")) else v
            for k, v in sd.items()}


def tiny_oobleck_weights(prefix: str = "", seed: int = 0, layout: str = "stable-audio",
                         config: OobleckConfig = TINY_OOBLECK) -> StateDict:
    """`random_oobleck`'s weights as a released file holds them, weight-normed: in stable-audio-tools' names under
    `prefix` (SAO_PREFIX: as in Stable Audio Open's single file, to merge into one; "": as a ComfyUI VAE file) or,
    with layout="diffusers", in AutoencoderOobleck's names."""
    if layout not in ("stable-audio", "diffusers"):
        raise ValueError(f"layout must be 'stable-audio' or 'diffusers', not {layout!r}")
    sd = unfold_weight_norm(random_oobleck(config, seed).state_dict(), torch.Generator().manual_seed(seed + 1))
    if layout == "diffusers":
        sd = to_diffusers_layout(sd, len(config.downsampling_ratios))
    return {prefix + k: v for k, v in sd.items()}


def write_tiny_oobleck(path: str | Path, prefix: str = "", seed: int = 0, dtype: torch.dtype = torch.float32,
                       layout: str = "stable-audio", config: OobleckConfig = TINY_OOBLECK) -> Path:
    """`tiny_oobleck_weights` as a file; in diffusers' layout with its config.json beside it (which diffusers itself
    can build only where encoder_hidden_size is twice the latent channels: not TINY_OOBLECK's 8 for 64)."""
    sd = tiny_oobleck_weights(prefix, seed, layout, config)
    if layout == "diffusers":
        fields = asdict(config)
        fields.update(downsampling_ratios=list(config.downsampling_ratios),
                      channel_multiples=list(config.channel_multiples), _class_name="AutoencoderOobleck")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        (Path(path).parent / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
    ckpt.write_safetensors(sd, path, {}, dtype)
    return Path(path)
