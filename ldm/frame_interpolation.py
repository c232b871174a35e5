"""Video frame interpolation networks: RIFE's IFNet (4.x with five IFBlocks) and FILM, read from their released
files in ComfyUI's key layout or RIFE's raw one, and told apart by their keys.

RIFE (Huang et al. 2022, "Real-Time Intermediate Flow Estimation for Video Frame Interpolation"), the Practical-RIFE
4.x IFNet: a small head encodes each frame; five IFBlocks, coarse (1/16) to fine, each look at both frames, their
features warped by the flow so far, the timestep and the previous mask and features, and refine two flows (to frame
0 and to frame 1) plus a blend mask. The middle frame blends the two warped frames by the mask. Frames must be a
multiple of 64 pixels (the node pads them).

FILM (Reda et al. 2022, "FILM: Frame Interpolation for Large Motion"): a 7-level image pyramid; a shared
feature extractor whose sub-levels are stacked across scales; flow estimated coarse to fine in both directions
(the deep levels share one predictor); the features warped to the timestep by the scaled flows and fused by a
U-Net-like decoder. The flows do not depend on the timestep, so every timestep of a pair shares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, load_state_dict

RIFE_SCALES = (16, 8, 4, 2, 1)  # the downscale each IFBlock works at, coarse to fine
RIFE_ALIGN = 64  # RIFE's frames must be a multiple of this (the coarsest block sees 1/16, then strides 4 more)
FLOW_CHANNELS = 13  # an IFBlock's output per pixel: 4 flow, 1 mask, 8 features


# --- RIFE --------------------------------------------------------------------------------------------------


def rife_warp(image: Tensor, flow: Tensor) -> Tensor:
    """`image` sampled at each pixel plus `flow` (x, y in pixels), bilinear, edges clamped (RIFE's backward warp,
    in float32 at least whatever the model's dtype)."""
    _, _, height, width = image.shape
    work = torch.promote_types(image.dtype, torch.float32)
    ys = torch.linspace(-1.0, 1.0, height, device=image.device, dtype=work)
    xs = torch.linspace(-1.0, 1.0, width, device=image.device, dtype=work)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0)[None]  # [1, 2, H, W]: x then y
    flow = flow.to(work)
    offset = torch.cat([flow[:, 0:1] / ((width - 1.0) / 2.0), flow[:, 1:2] / ((height - 1.0) / 2.0)], 1)
    grid = (base + offset).permute(0, 2, 3, 1)
    return F.grid_sample(image.to(work), grid, mode="bilinear", padding_mode="border",
                         align_corners=True).to(image.dtype)


class Head(nn.Module):
    """The per-frame encoder: three convolutions at half size, a transposed one back to full size."""

    def __init__(self, out_channels: int = 4) -> None:
        super().__init__()
        self.cnn0 = nn.Conv2d(3, 16, 3, 2, 1)
        self.cnn1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(16, out_channels, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        for conv in (self.cnn0, self.cnn1, self.cnn2):
            x = F.leaky_relu(conv(x), 0.2)
        return self.cnn3(x)


class ResConv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.conv(x) * self.beta, 0.2)


def _conv_lrelu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2))


class IFBlock(nn.Module):
    """One refinement step at 1/`scale` size: two strided convolutions, eight residual ones, a transposed
    convolution and pixel shuffle back; returns (flow change, mask logits, features) at full size."""

    def __init__(self, in_planes: int, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(_conv_lrelu(in_planes, channels // 2), _conv_lrelu(channels // 2, channels))
        self.convblock = nn.Sequential(*(ResConv(channels) for _ in range(8)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(channels, 4 * FLOW_CHANNELS, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: Tensor, flow: Tensor | None, scale: int) -> tuple[Tensor, Tensor, Tensor]:
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear")
        if flow is not None:
            x = torch.cat((x, F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear") / scale), 1)
        out = F.interpolate(self.lastconv(self.convblock(self.conv0(x))), scale_factor=scale, mode="bilinear")
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


class IFNet(nn.Module):
    """RIFE 4.x with five IFBlocks, module names as ComfyUI's (`encode.*`, `blocks.N.*`)."""

    pad_align = RIFE_ALIGN

    def __init__(self, head_channels: int = 4, channels: tuple[int, ...] = (192, 128, 96, 64, 32)) -> None:
        super().__init__()
        self.encode = Head(head_channels)
        first = 3 + 3 + 2 * head_channels + 1  # both frames, both features, the timestep
        later = first + 1 + (FLOW_CHANNELS - 5) + 4  # ... plus the mask, the features and the flow so far
        self.blocks = nn.ModuleList(IFBlock(first if i == 0 else later, c) for i, c in enumerate(channels))

    def extract_features(self, image: Tensor) -> Tensor:
        return self.encode(image)

    def forward(self, img0: Tensor, img1: Tensor, timestep: Tensor,
                features: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The frames at `timestep` ([B, 1, H, W], 0 is img0) between img0 and img1 ([B, 3, H, W])."""
        batch = img0.shape[0]
        f0, f1 = features if features is not None else (self.encode(img0), self.encode(img1))
        f0, f1 = f0.expand(batch, -1, -1, -1), f1.expand(batch, -1, -1, -1)
        flow = mask = feat = None
        warped0, warped1 = img0, img1
        for block, scale in zip(self.blocks, RIFE_SCALES, strict=True):
            if flow is None:
                flow, mask, feat = block(torch.cat((img0, img1, f0, f1, timestep), 1), None, scale)
            else:
                inputs = (warped0, warped1, rife_warp(f0, flow[:, :2]), rife_warp(f1, flow[:, 2:4]), timestep,
                          mask, feat)
                change, mask, feat = block(torch.cat(inputs, 1), flow, scale)
                flow = flow + change
            warped0, warped1 = rife_warp(img0, flow[:, :2]), rife_warp(img1, flow[:, 2:4])
        return torch.lerp(warped1, warped0, torch.sigmoid(mask))


def rife_layout(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A raw RIFE checkpoint (`module.`/`flownet.` prefixes, `blockN.`, the training-only `teacher.`/`caltime.`)
    in ComfyUI's names; a file already in them is returned as it is."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("module.").removeprefix("flownet.")
        if key.startswith(("teacher.", "caltime.")):
            continue
        if key.startswith("block") and key[5:6].isdigit() and key[6:7] == ".":
            key = f"blocks.{key[5]}.{key[7:]}"
        out[key] = value
    return out


def rife_config(sd: dict[str, Tensor]) -> tuple[int, tuple[int, ...]]:
    """(head channels, each block's width) of an IFNet state dict in ComfyUI's names."""
    head = sd["encode.cnn3.weight"].shape[1]  # a transposed convolution: [in, out, kh, kw]
    widths = tuple(sd[f"blocks.{i}.conv0.1.0.weight"].shape[0] for i in range(len(RIFE_SCALES))
                   if f"blocks.{i}.conv0.1.0.weight" in sd)
    return head, widths


# --- FILM --------------------------------------------------------------------------------------------------


def film_warp(image: Tensor, flow: Tensor) -> Tensor:
    """FILM's backward warp: pixel centres (align_corners=False) plus `flow` in pixels, edges clamped (in float32
    at least)."""
    _, _, height, width = flow.shape
    work = torch.promote_types(image.dtype, torch.float32)
    xs = torch.linspace(-(1 - 1 / width), 1 - 1 / width, width, device=flow.device, dtype=work)
    ys = torch.linspace(-(1 - 1 / height), 1 - 1 / height, height, device=flow.device, dtype=work)
    flow = flow.to(work)
    grid = torch.stack([xs[None, None, :] + flow[:, 0] / (width * 0.5),
                        ys[None, :, None] + flow[:, 1] / (height * 0.5)], dim=3)
    return F.grid_sample(image.to(work), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).to(image.dtype)


class FilmConv2d(nn.Module):
    """A convolution padded as TensorFlow's "same" (an even kernel pads right and bottom), LeakyReLU 0.2."""

    def __init__(self, cin: int, cout: int, size: int, activation: bool = True) -> None:
        super().__init__()
        self.even = size % 2 == 0
        self.activation = activation
        self.conv = nn.Conv2d(cin, cout, size, padding=0 if self.even else size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.pad(x, (0, 1, 0, 1)) if self.even else x)
        return F.leaky_relu(x, 0.2) if self.activation else x


class SubTreeExtractor(nn.Module):
    """Two convolutions per level, doubling the width, average-pooled between levels."""

    def __init__(self, filters: int, levels: int) -> None:
        super().__init__()
        widths = [3] + [filters << i for i in range(levels)]
        self.convs = nn.ModuleList(nn.Sequential(FilmConv2d(widths[i], widths[i + 1], 3),
                                                 FilmConv2d(widths[i + 1], widths[i + 1], 3)) for i in range(levels))

    def forward(self, image: Tensor, levels: int) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.convs[:levels]):
            image = layer(image if i == 0 else F.avg_pool2d(image, 2, 2))
            out.append(image)
        return out


class FeatureExtractor(nn.Module):
    def __init__(self, filters: int, sub_levels: int) -> None:
        super().__init__()
        self.extract_sublevels = SubTreeExtractor(filters, sub_levels)
        self.sub_levels = sub_levels

    def forward(self, images: list[Tensor]) -> list[Tensor]:
        """Level i stacks sub-level j of the extraction started j levels finer (cascaded features)."""
        levels = len(images)
        subs = [self.extract_sublevels(images[i], min(levels - i, self.sub_levels)) for i in range(levels)]
        return [torch.cat([subs[i - j][j] for j in range(min(i + 1, self.sub_levels))], 1) for i in range(levels)]


class FlowEstimator(nn.Module):
    def __init__(self, cin: int, num_convs: int, filters: int) -> None:
        super().__init__()
        widths = [cin] + [filters] * num_convs
        convs = [FilmConv2d(widths[i], filters, 3) for i in range(num_convs)]
        convs += [FilmConv2d(widths[-1], filters // 2, 1), FilmConv2d(filters // 2, 2, 1, activation=False)]
        self._convs = nn.ModuleList(convs)

    def forward(self, features_a: Tensor, features_b: Tensor) -> Tensor:
        x = torch.cat([features_a, features_b], 1)
        for conv in self._convs:
            x = conv(x)
        return x


class PyramidFlowEstimator(nn.Module):
    """Residual flow per level, coarse to fine. Level i uses predictor min(i, last); file names: the last
    (shared by the deep levels) is `_predictor`, the others `_predictors` from level last-1 down to 0."""

    def __init__(self, filters: int, flow_convs: tuple[int, ...], flow_filters: tuple[int, ...]) -> None:
        super().__init__()
        cin = [2 * sum(filters << j for j in range(i + 1)) for i in range(len(flow_convs))]
        predictors = [FlowEstimator(cin[i], flow_convs[i], flow_filters[i]) for i in range(len(flow_convs))]
        self._predictor = predictors[-1]
        self._predictors = nn.ModuleList(predictors[:-1][::-1])

    def predictor(self, level: int) -> FlowEstimator:
        specialized = len(self._predictors)
        return self._predictor if level >= specialized else self._predictors[specialized - 1 - level]

    def forward(self, features_a: list[Tensor], features_b: list[Tensor]) -> list[Tensor]:
        """The residual flow of each level (finest first)."""
        coarsest = len(features_a) - 1
        flow = self.predictor(coarsest)(features_a[-1], features_b[-1])
        residuals = [flow]
        for level in range(coarsest - 1, -1, -1):
            flow = F.interpolate(flow, size=features_a[level].shape[2:4], mode="bilinear") * 2
            residual = self.predictor(level)(features_a[level], film_warp(features_b[level], flow))
            residuals.append(residual)
            flow = flow + residual
        return residuals[::-1]


def synthesize_flow_pyramid(residuals: list[Tensor]) -> list[Tensor]:
    """Each level's flow: the coarser one upsampled and doubled, plus this level's residual (finest first)."""
    flow = residuals[-1]
    flows = [flow]
    for residual in residuals[-2::-1]:
        flow = F.interpolate(flow, size=residual.shape[2:4], mode="bilinear") * 2 + residual
        flows.append(flow)
    return flows[::-1]


def _fusion_channels(levels: int, filters: int) -> int:
    """Channels of an aligned level per direction, doubled: features, RGB (3) and flow (2)."""
    return (sum(filters << i for i in range(levels)) + 3 + 2) * 2


class Fusion(nn.Module):
    """The decoder: from the coarsest aligned level up, upsample (nearest), a 2x2 convolution, concatenate the
    level, two 3x3 convolutions; a 1x1 convolution to RGB at the end."""

    def __init__(self, levels: int, specialized: int, filters: int) -> None:
        super().__init__()
        self.output_conv = nn.Conv2d(filters, 3, 1)
        self.convs = nn.ModuleList()
        cin = _fusion_channels(levels, filters)
        for i in reversed(range(levels)):
            width = filters << min(i, specialized)
            self.convs.append(nn.ModuleList([
                FilmConv2d(cin, width, 2, activation=False),
                FilmConv2d(_fusion_channels(i + 1, filters) + width, width, 3),
                FilmConv2d(width, width, 3)]))
            cin = width

    def forward(self, pyramid: list[Tensor]) -> Tensor:
        x = pyramid[-1]
        for k, (up, conv1, conv2) in enumerate(self.convs):
            level = len(self.convs) - 1 - k
            x = up(F.interpolate(x, size=pyramid[level].shape[2:4], mode="nearest"))
            x = conv2(conv1(torch.cat([pyramid[level], x], 1)))
        return self.output_conv(x)


class FILMNet(nn.Module):
    """FILM, module names as ComfyUI's (`extract.*`, `predict_flow.*`, `fuse.*`)."""

    pad_align = 1
    pyramid_levels = 7
    fusion_levels = 5

    def __init__(self, filters: int = 64, sub_levels: int = 4, specialized_levels: int = 3,
                 flow_convs: tuple[int, ...] = (3, 3, 3, 3),
                 flow_filters: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        self.extract = FeatureExtractor(filters, sub_levels)
        self.predict_flow = PyramidFlowEstimator(filters, flow_convs, flow_filters)
        self.fuse = Fusion(sub_levels, specialized_levels, filters)

    def extract_features(self, image: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(image pyramid, feature pyramid) of one frame, finest first."""
        images = [image]
        for _ in range(1, self.pyramid_levels):
            images.append(F.avg_pool2d(images[-1], 2, 2))
        return images, self.extract(images)

    def forward_timesteps(self, img0: Tensor, img1: Tensor, timesteps: list[float],
                          features: tuple[Any, Any] | None = None) -> Tensor:
        """The frames at each of `timesteps` between img0 and img1 ([1, 3, H, W]); the flows are computed once."""
        (images0, feats0), (images1, feats1) = features or (self.extract_features(img0), self.extract_features(img1))
        levels = self.fusion_levels
        forward = synthesize_flow_pyramid(self.predict_flow(feats0, feats1))[:levels]
        backward = synthesize_flow_pyramid(self.predict_flow(feats1, feats0))[:levels]
        sources0 = [torch.cat([i, f], 1) for i, f in zip(images0[:levels], feats0[:levels], strict=True)]
        sources1 = [torch.cat([i, f], 1) for i, f in zip(images1[:levels], feats1[:levels], strict=True)]
        out = []
        for t in torch.tensor(timesteps, device=img0.device, dtype=img0.dtype):
            to0 = [flow * t for flow in backward]
            to1 = [flow * (1 - t) for flow in forward]
            aligned = [torch.cat([film_warp(s0, b), film_warp(s1, f), b, f], 1)
                       for s0, s1, b, f in zip(sources0, sources1, to0, to1, strict=True)]
            out.append(self.fuse(aligned))
        return torch.cat(out)


def film_config(sd: dict[str, Tensor]) -> dict[str, Any]:
    """FILMNet's widths from its weights (the released model: filters 64, flow (3,3,3,3) x (32,64,128,256))."""
    sub_levels = len({k.split(".")[3] for k in sd if k.startswith("extract.extract_sublevels.convs.")})
    specialized = len({k.split(".")[2] for k in sd if k.startswith("predict_flow._predictors.")})
    names = [f"predict_flow._predictors.{specialized - 1 - i}." for i in range(specialized)]
    names.append("predict_flow._predictor.")
    flow_convs, flow_filters = [], []
    for name in names:
        convs = len({k[len(name):].split(".")[1] for k in sd if k.startswith(name + "_convs.")})
        flow_convs.append(convs - 2)
        flow_filters.append(sd[f"{name}_convs.0.conv.weight"].shape[0])
    return {"filters": sd["extract.extract_sublevels.convs.0.0.conv.weight"].shape[0], "sub_levels": sub_levels,
            "flow_convs": tuple(flow_convs), "flow_filters": tuple(flow_filters)}


# --- loading -----------------------------------------------------------------------------------------------


@dataclass
class FrameInterpolationModel:
    """A loaded interpolation network and what it is."""

    model: IFNet | FILMNet
    architecture: str  # "RIFE" or "FILM"
    source: str = ""


FILM_MARKER = "extract.extract_sublevels.convs.0.0.conv.weight"


def frame_interpolation_model_from_state_dict(sd: dict[str, Tensor], source: str = "") -> FrameInterpolationModel:
    """The network a state dict holds: FILM (its feature extractor's first key), else RIFE's IFNet in ComfyUI's or
    the raw layout. Anything else, or weights that do not fit, raise CheckpointError."""
    name = source or "this file"
    model: IFNet | FILMNet
    if FILM_MARKER in sd:
        architecture = "FILM"
        try:
            model = FILMNet(**film_config(sd))
        except (KeyError, IndexError, ValueError) as exc:
            raise CheckpointError(f"{name}: an incomplete FILM model ({exc})") from None
    else:
        sd = rife_layout(sd)
        if "blocks.0.conv0.1.0.weight" not in sd:
            keys = list(sd)
            found = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "") or "no tensors"
            raise CheckpointError(f"{name} is not a frame interpolation model this engine reads (RIFE 4.x IFNet or "
                                  f"FILM); its weights: {found}")
        architecture = "RIFE"
        blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        if "encode.cnn3.weight" not in sd or blocks != len(RIFE_SCALES):
            head = "a" if "encode.cnn3.weight" in sd else "no"
            raise CheckpointError(f"{name}: a RIFE model with {blocks} IFBlocks and {head} feature head; only the RIFE "
                                  "4.x models with five IFBlocks and a feature head are supported, as in ComfyUI")
        model = IFNet(*rife_config(sd))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shapes that do not fit: torch lists every one of them
        first = str(exc).split("\n")[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(f"{name}: the {architecture} weights do not fit ({first})") from None
    if missing or unexpected:
        raise CheckpointError(f"{name}: the {architecture} weights do not fit (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return FrameInterpolationModel(model.eval().requires_grad_(False), architecture, source)


def load_frame_interpolation_model(path: str | Path) -> FrameInterpolationModel:
    return frame_interpolation_model_from_state_dict(load_state_dict(path), Path(path).name)


# --- the interpolation loop --------------------------------------------------------------------------------


def pad_to_multiple(frames: Tensor, align: int) -> Tensor:
    """Pad right and bottom to a multiple of `align`, reflecting (as ComfyUI); a side shorter than its padding
    cannot be reflected and is replicated instead."""
    height, width = frames.shape[-2:]
    pad_h, pad_w = -height % align, -width % align
    if not pad_h and not pad_w:
        return frames
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(frames, (0, pad_w, 0, pad_h), mode=mode)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


def interpolate_frames(net: IFNet | FILMNet, frames: Tensor, multiplier: int, device: torch.device | None = None,
                       on_step: Any = None) -> Tensor:
    """`multiplier - 1` frames at t = k / multiplier between each pair of `frames` ([N, 3, H, W], in the net's
    dtype), each original frame kept: [(N - 1) * multiplier + 1, 3, H, W], original k at index k * multiplier.

    ComfyUI's FrameInterpolate loop: padded to the net's alignment (cropped back after), each frame's features
    computed once and reused by the next pair, FILM's flows shared by every timestep of a pair, RIFE's timesteps
    run as one batch, halved while the device runs out of memory. `on_step(done)` after each batch.
    """
    count, channels, height, width = frames.shape
    if count < 2 or multiplier < 2:
        return frames
    device = device or frames.device
    frames = pad_to_multiple(frames, net.pad_align)
    padded_h, padded_w = frames.shape[-2:]
    between = multiplier - 1
    timesteps = [k / multiplier for k in range(1, multiplier)]
    t_map = torch.tensor(timesteps, device=device, dtype=frames.dtype).reshape(between, 1, 1, 1)
    t_map = t_map.expand(-1, 1, padded_h, padded_w)
    out = torch.empty((count - 1) * multiplier + 1, channels, padded_h, padded_w, dtype=frames.dtype)
    out[0] = frames[0]
    batch, done = between, 0
    features1 = None
    for i in range(count - 1):
        img0, img1 = frames[i:i + 1].to(device), frames[i + 1:i + 2].to(device)
        features0 = features1 if features1 is not None else net.extract_features(img0)
        features1 = net.extract_features(img1)
        base = i * multiplier + 1
        if isinstance(net, FILMNet):
            out[base:base + between] = net.forward_timesteps(img0, img1, timesteps, (features0, features1)).cpu()
            done += between
            if on_step is not None:
                on_step(done)
        else:
            j = 0
            while j < between:
                size = min(batch, between - j)
                try:
                    middle = net(img0.expand(size, -1, -1, -1), img1.expand(size, -1, -1, -1), t_map[j:j + size],
                                 (features0, features1))
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    if batch <= 1 or not _is_oom(exc):
                        raise
                    batch = max(1, batch // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                out[base + j:base + j + size] = middle.cpu()
                j += size
                done += size
                if on_step is not None:
                    on_step(done)
        out[base + between] = frames[i + 1]
    return out[:, :, :height, :width]
