"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models").

A small convolutional network that turns a hint image (edges, depth, sketch, colour...) into one feature map
per UNet level. Unlike a ControlNet it sees neither the latent nor the timestep, so it runs once per sampling
run, and its features are added to the outputs of the UNet's encoder blocks themselves (the blocks after them
see them, and so do their skip connections), not to the skip connections alone.

Files come in two layouts, both read here (ComfyUI's Load ControlNet Model reads both, and so does
`ldm.controlnet.load_controlnet`): TencentARC's (`conv_in`, `body.N.block1`...: the t2iadapter_*_sd14v1 and
sd15v2 releases; `body.N.in_conv`, `body.N.body.M`... for the "light" colour adapter), which the modules here
are named after, and diffusers' `T2IAdapter` (`adapter.conv_in`, `adapter.body.N.resnets.M`...: the SDXL
releases), renamed to it. The style adapter (an image prompt through CLIP vision) is not one of these.

Where the features go, as in ComfyUI (diffusers' `down_intrablock_additional_residuals` put them at the same
places): an SD1/SD2 adapter (pixel-unshuffled by 8) adds level i's features after the UNet's level i's last
res block; an SDXL adapter (unshuffled by 16) after level 0's downsample, level 1's and level 2's last res
blocks, and the middle block. `T2IAdapterControl` is one adapter applied to one conditioning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _indices, _materialize, read_metadata, write_safetensors
from ldm.controlnet import Control, LoadedControlNet, prepare_hint
from ldm.unet import ControlResiduals, UNetConfig


@dataclass(frozen=True)
class AdapterConfig:
    channels: tuple[int, ...]  # each level's feature channels
    hint_channels: int = 3  # 1: the hint is made grey first (the canny and sketch adapters)
    unshuffle: int = 8  # pixels per side folded into channels at the input; 16: an SDXL adapter
    num_res_blocks: int = 2
    light: bool = False  # the light adapter: narrow res blocks between 1x1 in and out convolutions
    kernel_size: int = 1  # of the full adapter's `in_conv` and res blocks' second convolution
    conv_downsample: bool = False  # a strided convolution between levels instead of 2x2 average pooling

    @property
    def xl(self) -> bool:
        return self.unshuffle == 16

    def downsamples(self, level: int) -> bool:
        """Whether `level` starts by halving the size: every level after the first, for SDXL the third only."""
        return level == 2 if self.xl else level > 0

    def scale(self, level: int) -> int:
        """How many times smaller than the latent `level`'s features are."""
        return self.unshuffle // 8 * 2 ** sum(self.downsamples(i) for i in range(level + 1))

    @property
    def places(self) -> tuple[str, ...]:
        """Where each level's features are added in the UNet (names from `ldm.unet.block_places`)."""
        if self.xl:
            return ("down0", "level1", "level2", "middle")
        return tuple(f"level{level}" for level in range(len(self.channels)))


def adapter_config_for(unet: UNetConfig, xl: bool = False, **options) -> AdapterConfig:
    """The adapter whose features fit `unet` as the released ones fit SD1.5's and SDXL's UNets (which gives
    their [320, 640, 1280, 1280]); for tiny test models."""
    widths = [unet.model_channels * mult for mult in unet.channel_mult]
    channels = (*widths[:3], widths[2]) if xl else tuple(widths)
    return AdapterConfig(channels, unshuffle=16 if xl else 8, **options)


class Downsample(nn.Module):
    """Halves the size: with a stride-2 convolution (`op`) where the file has one, else with 2x2 average
    pooling that pads an odd side by one at both ends, the zeros counted (TencentARC's rule, which ComfyUI
    keeps; diffusers' `ceil_mode` pooling differs on odd sizes)."""

    def __init__(self, channels: int, conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.op is not None:
            return self.op(x)
        return F.avg_pool2d(x, 2, padding=(x.shape[2] % 2, x.shape[3] % 2))


class ResnetBlock(nn.Module):
    """The full adapter's block: optional downsample and 1x1 (kernel_size) widening, then x + conv(relu(conv x))."""

    def __init__(self, in_c: int, out_c: int, down: bool, kernel_size: int, conv_downsample: bool):
        super().__init__()
        self.down_opt = Downsample(in_c, conv_downsample) if down else None
        pad = kernel_size // 2
        self.in_conv = nn.Conv2d(in_c, out_c, kernel_size, padding=pad) if in_c != out_c else None
        self.block1 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.block2 = nn.Conv2d(out_c, out_c, kernel_size, padding=pad)

    def forward(self, x: Tensor) -> Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


class LightResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class Extractor(nn.Module):
    """One level of the light adapter: a 1x1 convolution to a quarter of the width, res blocks, a 1x1 back."""

    def __init__(self, in_c: int, out_c: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.down_opt = Downsample(in_c, conv=False) if down else None
        self.in_conv = nn.Conv2d(in_c, out_c // 4, 1)
        self.body = nn.Sequential(*(LightResnetBlock(out_c // 4) for _ in range(num_res_blocks)))
        self.out_conv = nn.Conv2d(out_c // 4, out_c, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = c = config
        cin = c.hint_channels * c.unshuffle**2
        if c.light:
            widths = (cin, *c.channels)
            self.body = nn.ModuleList(Extractor(widths[level], widths[level + 1], c.num_res_blocks,
                                                c.downsamples(level)) for level in range(len(c.channels)))
            return
        self.conv_in = nn.Conv2d(cin, c.channels[0], 3, padding=1)
        blocks = []
        for level, width in enumerate(c.channels):
            for j in range(c.num_res_blocks):
                first = j == 0 and level > 0
                blocks.append(ResnetBlock(c.channels[level - 1] if first else width, width,
                                          first and c.downsamples(level), c.kernel_size, c.conv_downsample))
        self.body = nn.ModuleList(blocks)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, hint: Tensor) -> list[Tensor]:
        """One feature map per level for hints [B, hint_channels, H, W] in 0..1, H and W multiples of
        `config.unshuffle`: level i's is [B, channels[i], H / 8 / scale(i), W / 8 / scale(i)]."""
        x = F.pixel_unshuffle(hint.to(self.dtype), self.config.unshuffle)
        if self.config.light:
            features = []
            for extractor in self.body:
                x = extractor(x)
                features.append(x)
            return features
        x = self.conv_in(x)
        n = self.config.num_res_blocks
        features = []
        for level in range(len(self.config.channels)):
            for block in self.body[level * n:(level + 1) * n]:
                x = block(x)
            features.append(x)
        return features

    def unet_mismatch(self, unet: UNetConfig) -> str | None:
        """Why this adapter's features do not fit `unet`'s blocks; None when they do. Features for a place the
        UNet lacks (an SD1.5 adapter's last level on SDXL) are left out, as ComfyUI leaves them."""
        shapes = _block_shapes(unet)
        for level, place in enumerate(self.config.places):
            if place not in shapes:
                continue
            ours, theirs = (self.config.channels[level], self.config.scale(level)), shapes[place]
            if theirs != ours:
                return (f"the T2I-Adapter's level {level} features ({ours[0]} channels at 1/{ours[1]} of the latent's "
                        f"size) do not fit the UNet's block there ({theirs[0]} channels at 1/{theirs[1]})")
        return None


def _block_shapes(c: UNetConfig) -> dict[str, tuple[int, int]]:
    """(channels, how many times smaller than the latent) of the UNet's outputs named by `block_places`."""
    shapes = {}
    for level, mult in enumerate(c.channel_mult):
        shapes[f"level{level}"] = (c.model_channels * mult, 2**level)
        if level != len(c.channel_mult) - 1:
            shapes[f"down{level}"] = (c.model_channels * mult, 2 ** (level + 1))
    shapes["middle"] = (c.model_channels * c.channel_mult[-1], 2 ** (len(c.channel_mult) - 1))
    return shapes


# --- files --------------------------------------------------------------------------------------------


def is_t2i_adapter(sd: StateDict) -> bool:
    """Whether a state dict is a T2I-Adapter (of any kind, the style adapter too)."""
    return "style_embedding" in sd or any(k.startswith(("adapter.", "body.")) for k in sd)


def _from_diffusers(sd: StateDict) -> tuple[StateDict, int]:
    """diffusers' T2IAdapter names -> TencentARC's, and the res blocks per level."""
    keys = list(sd)
    light = "adapter.body.0.out_conv.weight" in sd
    n = len(_indices(keys, r"adapter\.body\.0\.resnets\.(\d+)\.")) or 2
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"adapter\.body\.(\d+)\.(?:resnets\.(\d+)\.)?(.+)", key)
        if m is None:
            out[key.removeprefix("adapter.")] = value  # conv_in; anything else is reported as unused
            continue
        level, j, rest = int(m[1]), m[2], m[3]
        if light:
            out[f"body.{level}." + (f"body.{j}." if j is not None else "") + rest] = value
        else:  # `in_conv` belongs to a level's first block
            out[f"body.{level * n + int(j or 0)}.{rest}"] = value
    return out, n


def adapter_config(sd: StateDict, num_res_blocks: int = 2) -> AdapterConfig:
    """The shape of a TencentARC-named adapter state dict. The full adapter's flat `body.N` list does not say
    where levels end: `num_res_blocks` does (2 in every release, which ComfyUI assumes)."""
    keys = list(sd)
    if "body.0.in_conv.weight" in sd:  # the light adapter: a full one's first block has no in_conv
        levels = _indices(keys, r"body\.(\d+)\.out_conv\.weight")
        channels = tuple(sd[f"body.{level}.out_conv.weight"].shape[0] for level in levels)
        config = AdapterConfig(channels, sd["body.0.in_conv.weight"].shape[1] // 64, light=True,
                               num_res_blocks=len(_indices(keys, r"body\.0\.body\.(\d+)\.block1\.")))
    elif "conv_in.weight" in sd:
        cin = sd["conv_in.weight"].shape[1]
        unshuffle = 16 if cin in (256, 768) else 8  # ComfyUI's rule: 1 or 3 hint channels unshuffled by 16
        blocks = _indices(keys, r"body\.(\d+)\.block1\.weight")
        if not blocks or len(blocks) % num_res_blocks:
            raise CheckpointError(f"a T2I-Adapter of {len(blocks)} res blocks, not levels of {num_res_blocks}")
        channels = tuple(sd[f"body.{i}.block1.weight"].shape[0] for i in blocks[::num_res_blocks])
        config = AdapterConfig(channels, cin // unshuffle**2, unshuffle, num_res_blocks,
                               kernel_size=sd["body.0.block2.weight"].shape[2],
                               conv_downsample=any(k.endswith("down_opt.op.weight") for k in keys))
        if config.xl and len(channels) != 4:
            raise CheckpointError(f"an SDXL T2I-Adapter of {len(channels)} levels (the released ones have 4)")
    else:
        raise CheckpointError("not a T2I-Adapter that this engine knows (no conv_in or body.0.in_conv weights)")
    if config.hint_channels not in (1, 3):
        raise CheckpointError(f"a T2I-Adapter for {config.hint_channels}-channel hints (the released ones take 1 or 3)")
    return config


def load_t2i_adapter(sd: StateDict, path: Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> LoadedControlNet:
    """A T2I-Adapter from the state dict of the file `path`, in either layout. Its family is "sdxl" for an SDXL
    adapter, and None for the others, which fit any UNet with SD1's or SD2's blocks."""
    if "style_embedding" in sd:
        raise CheckpointError(f"{path.name}: a T2I-Adapter style model (an image prompt through CLIP vision), not a "
                              "ControlNet: put it in models/style_models and load it with Load Style Model")
    num_res_blocks = int(read_metadata(path).get("loom.num_res_blocks", 2))  # saved by save_t2i_adapter
    if any(k.startswith("adapter.") for k in sd):
        sd, num_res_blocks = _from_diffusers(sd)
    try:
        config = adapter_config(sd, num_res_blocks)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: T2IAdapter(config), sd, "T2I-Adapter", path, device, dtype)
    expected = set(model.state_dict())
    return LoadedControlNet(model, "sdxl" if config.xl else None, sorted(k for k in sd if k not in expected), path)


def save_t2i_adapter(path: str | Path, model: T2IAdapter, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a TencentARC-layout .safetensors adapter (what `load_t2i_adapter` reads back)."""
    path = Path(path)
    write_safetensors(model.state_dict(), path, {"loom.num_res_blocks": str(model.config.num_res_blocks)}, dtype)
    return path


# --- applying one ------------------------------------------------------------------------------------


@dataclass(eq=False)
class T2IAdapterControl(Control):
    """A T2I-Adapter applied to one conditioning (`model` is a `T2IAdapter`). Its features depend on the hint
    alone: made once per run and latent shape, then scaled by the strength at each step its range allows."""

    def features(self, x: Tensor, repeats: int = 1) -> ControlResiduals:
        """The features for one UNet call on `x`, which holds `repeats` copies of the latent batch."""
        batch, _, height, width = x.shape
        key = (batch, height, width, repeats, x.device, self.model.dtype)
        if key not in self._hints:
            if len(self._hints) >= 4:  # as Control._hint: a few shapes in turn at most
                self._hints.clear()
            self._hints[key] = self._made(x, batch // repeats, repeats)
        return ControlResiduals(features={place: f * self.strength for place, f in self._hints[key].items()})

    def _made(self, x: Tensor, per_copy: int, repeats: int) -> dict[str, Tensor]:
        config = self.model.config
        # ComfyUI's hint: 8x the latent, rounded up to whole unshuffle cells, cropped at the centre and resized.
        size = [math.ceil(n * 8 / config.unshuffle) * config.unshuffle for n in x.shape[-2:]]
        hint = prepare_hint(self.hint.to(x.device, torch.float32), *size)
        if config.hint_channels == 1 and hint.shape[1] > 1:
            hint = hint.mean(dim=1, keepdim=True)
        hint = hint[:per_copy]  # the adapter runs on each hint image once; they are cycled over the batch
        index = torch.arange(per_copy, device=x.device) % hint.shape[0]
        features = self.model(hint)
        return {place: f[index].repeat(repeats, 1, 1, 1) for place, f in zip(config.places, features, strict=True)}


def add_residuals(total: list[Tensor] | ControlResiduals | None,
                  more: list[Tensor] | ControlResiduals) -> list[Tensor] | ControlResiduals:
    """The sum of what two controls add to one UNet call: ControlNets' residual lists, or `ControlResiduals`
    once a T2I-Adapter is among them; `total` None: nothing yet."""
    if total is None:
        return more
    if isinstance(total, list) and isinstance(more, list):
        return [a + b for a, b in zip(total, more, strict=True)]
    a, b = (r if isinstance(r, ControlResiduals) else ControlResiduals(skips=r) for r in (total, more))
    features = dict(a.features)
    for place, f in b.features.items():
        features[place] = features[place] + f if place in features else f
    skips = a.skips if b.skips is None else add_residuals(a.skips, b.skips)
    return ControlResiduals(skips, features)
