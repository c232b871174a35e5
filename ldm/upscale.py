"""Image upscale models: ESRGAN's RRDBNet (ESRGAN, Real-ESRGAN, BSRGAN and the many community "4x-..." files
trained on it) and Real-ESRGAN's SRVGGNetCompact, read from their .pth/.safetensors files in any of their
key layouts, and tiled upscaling with overlap so any image size fits in memory.

RRDBNet (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks"): a 3x3
convolution, residual-in-residual dense blocks (five convolutions each, growth 32, scaled by 0.2), a
nearest-neighbour x2 upsampling plus convolution per factor of two, and two output convolutions. Real-ESRGAN's
x1 and x2 models first fold the image into channels (pixel unshuffle) and share the x4 body.
SRVGGNetCompact (Wang et al. 2021, Real-ESRGAN): plain convolutions with PReLU, a pixel shuffle, plus the
nearest-upsampled input.
SPAN, SwinIR, HAT and DAT live in their own modules (ldm/upscale_span.py, upscale_swin.py, upscale_hat.py,
upscale_dat.py); this one tells the architectures apart and loads them all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm import upscale_dat, upscale_hat, upscale_span, upscale_swin
from ldm.checkpoint import CheckpointError, load_state_dict, unwrap_weights


class ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(features, 1))


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN's generator in Real-ESRGAN's layer names (conv_first, body.N.rdbK.convJ, conv_body, conv_upI,
    conv_hr, conv_last). `unshuffle` > 1 folds the input into channels first (Real-ESRGAN x2 / x1)."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, upsamples: int = 2,
                 unshuffle: int = 1) -> None:
        super().__init__()
        self.in_channels = in_nc
        self.unshuffle = unshuffle
        self.scale = 2**upsamples // unshuffle
        self.conv_first = nn.Conv2d(in_nc * unshuffle**2, nf, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(nf) for _ in range(nb)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.ups = nn.ModuleList(nn.Conv2d(nf, nf, 3, 1, 1) for _ in range(upsamples))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if self.unshuffle > 1:
            f = self.unshuffle
            # Reflect, as the reference does; an image smaller than the padding can only be replicated.
            mode = "reflect" if min(height, width) > f else "replicate"
            x = F.pad(x, (0, -width % f, 0, -height % f), mode=mode)
            x = F.pixel_unshuffle(x, f)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        return out[..., :height * self.scale, :width * self.scale]


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact model (realesr-general-x4v3, realesr-animevideov3): `body` alternates 3x3
    convolutions and PReLUs, as in its files."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, num_conv: int = 16, scale: int = 4) -> None:
        super().__init__()
        self.scale, self.in_channels = scale, in_nc
        layers: list[nn.Module] = [nn.Conv2d(in_nc, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        layers.append(nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# --- files -------------------------------------------------------------------------------------------------------

_RDB = re.compile(r"^(?:model\.1\.sub|RRDB_trunk|body)\.(\d+)\.(?:RDB|rdb)(\d)\.conv(\d)(?:\.0)?\.(weight|bias)$")


def _rrdb_layout(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any of RRDBNet's key layouts in ours: old ESRGAN (model.N...), BSRGAN (RRDB_trunk...), Real-ESRGAN."""
    out: dict[str, Tensor] = {}
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := _RDB.match(k)))
    # Old ESRGAN numbers its sequential: 0 first conv, 1 the residual trunk (blocks, then its conv at index
    # `blocks`), then per upsampling (upsample, conv, act): conv at 3, 6, ...; then hr conv, act, last conv.
    old = [int(m.group(1)) for k in sd if (m := re.match(r"^model\.(\d+)\.weight$", k))]
    old_ups = sorted(n for n in old if n > 1)
    renames = {"model.0": "conv_first", f"model.1.sub.{blocks}": "conv_body", "trunk_conv": "conv_body",
               "HRconv": "conv_hr"}
    if old_ups:
        *ups, hr, last = old_ups
        if ups != list(range(3, 3 * len(ups) + 1, 3)) or hr != 3 * len(ups) + 2 or last != hr + 2:
            raise ValueError(f"layers model.{old_ups} are not an ESRGAN's upsampling and output convolutions")
        renames.update({f"model.{n}": f"ups.{i}" for i, n in enumerate(ups)})
        renames.update({f"model.{hr}": "conv_hr", f"model.{last}": "conv_last"})
    for key, tensor in sd.items():
        if m := _RDB.match(key):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = tensor
            continue
        layer, _, kind = key.rpartition(".")
        if m := re.match(r"^(?:conv_up|upconv)(\d)$", layer):
            layer = f"ups.{int(m.group(1)) - 1}"
        out[f"{renames.get(layer, layer)}.{kind}"] = tensor
    return out


@dataclass
class UpscaleModel:
    """A loaded upscale model: the module, its factor, and what it is."""

    model: nn.Module
    scale: int
    architecture: str
    source: str = ""
    supports_half: bool = True  # False: fp16 overflows it (the transformers), so run it in fp32 or bf16

    def __call__(self, image: Tensor) -> Tensor:
        return self.model(image)


def upscale_model_from_state_dict(sd: dict[str, Tensor], source: str = "") -> UpscaleModel:
    """Build the model a state dict holds (RRDBNet or SRVGGNetCompact, in any of their layouts)."""
    sd = {k.removeprefix("module."): v for k, v in unwrap_weights(sd).items() if isinstance(v, Tensor)}
    try:
        return _build(sd, source)
    except (KeyError, IndexError, ValueError) as exc:  # a tensor the layout needs is missing
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(f"{source or 'this file'}: an incomplete upscale model ({what})") from None


# The architectures in their own modules, tried in order: (name, test on the keys, builder of the module and the
# state dict in its names). HAT before SwinIR, whose block keys HAT's files hold too.
_ARCHITECTURES: tuple[tuple[str, Callable[[dict[str, Tensor]], bool],
                            Callable[[dict[str, Tensor]], tuple[nn.Module, dict[str, Tensor]]]], ...] = (
    ("SPAN", upscale_span.is_span, upscale_span.span_from_state_dict),
    ("HAT", upscale_hat.is_hat, upscale_hat.hat_from_state_dict),
    ("SwinIR", upscale_swin.is_swinir, upscale_swin.swinir_from_state_dict),
    ("DAT", upscale_dat.is_dat, upscale_dat.dat_from_state_dict),
)


def _build(sd: dict[str, Tensor], source: str) -> UpscaleModel:
    if any(_RDB.match(k) for k in sd):
        if any(".conv1x1." in k for k in sd):
            raise CheckpointError(f"{source or 'this file'} is an ESRGAN+ model, which is not supported")
        sd = _rrdb_layout(sd)
        nb = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
        upsamples = sum(1 for k in sd if k.startswith("ups.") and k.endswith(".weight"))
        in_nc, out_nc = sd["conv_first.weight"].shape[1], sd["conv_last.weight"].shape[0]
        unshuffle = int(math.isqrt(in_nc // out_nc)) if in_nc in (out_nc * 4, out_nc * 16) else 1
        model: nn.Module = RRDBNet(in_nc // unshuffle**2, out_nc, sd["conv_first.weight"].shape[0], nb, upsamples,
                                   unshuffle)
        architecture = "ESRGAN (RRDBNet)"
    elif "body.0.weight" in sd and sd.get("body.1.weight") is not None and sd["body.1.weight"].ndim == 1:
        convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("body.") and sd[k].ndim == 4)
        in_nc, nf = sd["body.0.weight"].shape[1], sd["body.0.weight"].shape[0]
        last = sd[f"body.{convs[-1]}.weight"].shape[0]
        scale = int(math.isqrt(last // in_nc))
        model = SRVGGNetCompact(in_nc, last // scale**2, nf, len(convs) - 2, scale)
        architecture = "Real-ESRGAN compact (SRVGGNetCompact)"
    elif rule := next((rule for rule in _ARCHITECTURES if rule[1](sd)), None):
        architecture, _, build = rule
        model, sd = build(sd)
    else:
        keys = list(sd)
        found = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "") or "no tensors"
        raise CheckpointError(f"{source or 'this file'} is not an upscale model this engine reads (ESRGAN/RRDBNet, "
                              f"Real-ESRGAN compact, SPAN, SwinIR, HAT or DAT); its weights: {found}")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shapes that do not fit: torch lists every one of them
        first = str(exc).split("\n")[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(f"{source or 'this file'}: the {architecture} weights do not fit ({first})") from None
    if missing or unexpected:
        raise CheckpointError(f"{source or 'this file'}: the {architecture} weights do not fit (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(model, "in_channels", 3) != 3:
        raise CheckpointError(f"{source or 'this file'} takes {model.in_channels}-channel images; only RGB "
                              "upscale models are supported")
    scale = model.scale
    return UpscaleModel(model.eval().requires_grad_(False), scale, architecture, source,
                        getattr(model, "supports_half", True))


def load_upscale_model(path: str | Path) -> UpscaleModel:
    return upscale_model_from_state_dict(load_state_dict(path), Path(path).name)


def tiled_upscale(model: Callable[[Tensor], Tensor], image: Tensor, scale: int, tile: int = 512,
                  overlap: int = 32) -> Tensor:
    """`model` over [B, C, H, W] in tiles of `tile` pixels that overlap by `overlap`, blended with linear ramps
    across the overlaps, so the result matches one pass away from the seams and any size fits in memory."""
    batch, channels, height, width = image.shape
    if height <= tile and width <= tile:
        return model(image)
    out = torch.zeros(batch, channels, height * scale, width * scale, device=image.device, dtype=image.dtype)
    weight = torch.zeros(1, 1, height * scale, width * scale, device=image.device, dtype=image.dtype)
    stride = tile - overlap
    for top in _starts(height, tile, stride):
        for left in _starts(width, tile, stride):
            piece = model(image[:, :, top:top + tile, left:left + tile])
            h, w = piece.shape[-2:]
            ramp = _ramp(h, overlap * scale, top > 0, top + tile < height)[:, None] * _ramp(
                w, overlap * scale, left > 0, left + tile < width)[None, :]
            ramp = ramp.to(image.device, image.dtype)
            out[:, :, top * scale:top * scale + h, left * scale:left * scale + w] += piece * ramp
            weight[:, :, top * scale:top * scale + h, left * scale:left * scale + w] += ramp
    return out / weight


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _ramp(length: int, overlap: int, fade_in: bool, fade_out: bool) -> Tensor:
    ramp = torch.ones(length)
    fade = torch.linspace(0, 1, overlap + 2)[1:-1]  # never 0: every pixel keeps some weight
    if fade_in and overlap:
        ramp[:overlap] = torch.minimum(ramp[:overlap], fade)
    if fade_out and overlap:
        ramp[-overlap:] = torch.minimum(ramp[-overlap:], fade.flip(0))
    return ramp
