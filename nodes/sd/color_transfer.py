"""ComfyUI's ColorTransfer: match an image's (or a video's frames') colours to a reference, as ComfyUI computes it.

Methods: reinhard_lab (each Lab channel shifted and scaled to the reference's mean and standard deviation),
mkl_lab (the Monge-Kantorovich linear map between the Lab covariances, Pitié and Kokaram 2007) and histogram (a
lookup table per RGB channel mapping the source's 256-bin CDF onto the reference's). Lab is kornia's, as ComfyUI's.
Source statistics: per_frame (each frame its own), uniform (pooled over all frames, one map for all) or target_frame
(one chosen frame's, one map for all, keeping the frames' differences). The reference's are pooled over its frames,
except per_frame with several reference frames, where frame i meets reference frame min(i, last).

`source_stats` is ComfyUI's dynamic combo: its choice target_frame brings the input `source_stats.target_index`, as
ResizeImageMaskNode's choices bring theirs (nodes/sd/utility_nodes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nodes.node import Node
from nodes.sd.models import device_and_dtype
from nodes.spec import Combo, Float, Int, Output, Socket

EPS = 1e-6
BINS = 256
METHODS = ["reinhard_lab", "mkl_lab", "histogram"]
SOURCE_STATS = {"per_frame": (), "uniform": (), "target_frame": ("target_index",)}


def _kornia_color() -> Any:
    """kornia.color, imported on use as the Canny node imports kornia."""
    try:
        from kornia import color
    except ImportError:
        raise RuntimeError("ColorTransfer needs kornia: pip install kornia") from None
    return color


def _lab(frame: torch.Tensor) -> torch.Tensor:
    """One [H, W, 3] frame in Lab, as [3, H * W]."""
    return _kornia_color().rgb_to_lab(frame.movedim(-1, 0)[None]).reshape(3, -1)


def _frame_stats(flat: torch.Tensor, reinhard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean [C, 1] and standard deviation [C, 1] (Reinhard) or covariance [C, C] (MKL) of [C, N]."""
    mean = flat.mean(dim=-1, keepdim=True)
    centered = flat - mean
    if reinhard:
        return mean, centered.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(EPS)
    return mean, centered @ centered.T / flat.shape[1]


def _pooled_stats(frames: torch.Tensor, reinhard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The stats of all frames together, one frame at a time: the mean of the frame means, then the mean of each
    frame's second moments about it (frames of one size weigh alike)."""
    mean = torch.stack([_lab(frame).mean(dim=-1, keepdim=True) for frame in frames]).mean(dim=0)
    moments = []
    for frame in frames:
        centered = _lab(frame) - mean
        moments.append(centered.pow(2).mean(dim=-1, keepdim=True) if reinhard
                       else centered @ centered.T / centered.shape[1])
    moment = torch.stack(moments).mean(dim=0)
    return (mean, moment.sqrt().clamp_min(EPS)) if reinhard else (mean, moment)


def mkl_matrix(cov_source: torch.Tensor, cov_ref: torch.Tensor) -> torch.Tensor:
    """The symmetric T with T cov_source T^T = cov_ref: T = S^-1/2 (S^1/2 R S^1/2)^1/2 S^-1/2, through two
    eigendecompositions (eigenvalues clamped at 0, the source's square roots at EPS)."""
    values, vectors = torch.linalg.eigh(cov_source)
    root = values.clamp_min(0).sqrt().clamp_min(EPS)
    scaled = vectors * root
    mid_values, mid_vectors = torch.linalg.eigh(scaled.T @ cov_ref @ scaled)
    mid_root = (mid_vectors * mid_values.clamp_min(0).sqrt()) @ mid_vectors.T
    inverse = vectors / root
    return inverse @ mid_root @ inverse.T


def _lab_map(target: torch.Tensor, ref: torch.Tensor, mode: str, index: int,
             reinhard: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The map (Lab frame [3, N], frame number) -> corrected Lab frame, for a Lab method."""
    pooled_ref = _pooled_stats(ref, reinhard) if ref.shape[0] == 1 or mode != "per_frame" else None
    if mode != "per_frame":
        source = (_frame_stats(_lab(target[min(index, target.shape[0] - 1)]), reinhard) if mode == "target_frame"
                  else _pooled_stats(target, reinhard))
        (s_mean, s_spread), (r_mean, r_spread) = source, pooled_ref
        if reinhard:
            scale = r_spread / s_spread
            return lambda flat, i: flat * scale + (r_mean - scale * s_mean)
        matrix = mkl_matrix(s_spread, r_spread)
        return lambda flat, i: matrix @ flat + (r_mean - matrix @ s_mean)

    def per_frame(flat: torch.Tensor, i: int) -> torch.Tensor:
        s_mean, s_spread = _frame_stats(flat, reinhard)
        r_mean, r_spread = pooled_ref or _frame_stats(_lab(ref[min(i, ref.shape[0] - 1)]), reinhard)
        centered = flat - s_mean
        if reinhard:
            return centered * (r_spread / s_spread) + r_mean
        return mkl_matrix(s_spread, r_spread) @ centered + r_mean

    return per_frame


def _bins(flat: torch.Tensor) -> torch.Tensor:
    return (flat * (BINS - 1)).long().clamp(0, BINS - 1)


def _cdf(frames: torch.Tensor) -> torch.Tensor:
    """Per-channel 256-bin CDFs [C, 256] of [B, H, W, C] frames in 0..1, pooled over the frames."""
    flat = frames.movedim(-1, 0).reshape(frames.shape[-1], -1)
    counts = torch.zeros(flat.shape[0], BINS, dtype=flat.dtype, device=flat.device)
    counts.scatter_add_(1, _bins(flat), torch.ones_like(flat))
    cdf = counts.cumsum(dim=1)
    return cdf / cdf[:, -1:]


def histogram_lut(source: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-channel lookup table [C, 256] in 0..1: each source bin goes to the first reference bin whose CDF reaches
    the source bin's."""
    return torch.searchsorted(_cdf(ref), _cdf(source)).clamp_max(BINS - 1).float() / (BINS - 1)


def _blend(source: torch.Tensor, matched: torch.Tensor, strength: float) -> torch.Tensor:
    return matched if strength == 1.0 else torch.lerp(source, matched, strength)


def color_transfer(target: torch.Tensor, ref: torch.Tensor, method: str, mode: str, index: int,
                   strength: float) -> torch.Tensor:
    """`target` [B, H, W, C] with its colours matched to `ref` [B', H', W', C], in float32 on their device."""
    out = torch.empty_like(target)
    if method == "histogram":
        shared = None
        if mode != "per_frame":
            source = target[min(index, target.shape[0] - 1)][None] if mode == "target_frame" else target
            shared = histogram_lut(source, ref)
        for i, frame in enumerate(target):
            lut = shared if shared is not None else histogram_lut(frame[None], ref[min(i, ref.shape[0] - 1)][None])
            flat = frame.movedim(-1, 0).reshape(frame.shape[-1], -1)
            matched = lut.gather(1, _bins(flat))
            out[i] = _blend(flat, matched, strength).reshape(frame.movedim(-1, 0).shape).movedim(0, -1)
        return out.clamp_(0, 1)
    corrected_by = _lab_map(target, ref, mode, index, reinhard=method == "reinhard_lab")
    for i, frame in enumerate(target):
        flat = _lab(frame)
        lab = _blend(flat, corrected_by(flat, i), strength).reshape(3, *frame.shape[:2])
        out[i] = _kornia_color().lab_to_rgb(lab[None])[0].movedim(0, -1)
    return out.clamp_(0, 1)


class ColorTransfer(Node):
    """Matches the colours of image(s) to a reference: Reinhard or MKL in Lab, or per-channel histograms; per
    frame, pooled over the frames, or by one chosen frame. strength blends from the input (0) to the match (1) and
    beyond; without a reference the image passes through."""

    category = "image/postprocessing"
    # ComfyUI's order, which its editor files keep: target_index (of the choice target_frame) follows source_stats.
    inputs = {
        "image_target": Socket("IMAGE", tooltip="image(s) to apply the color transform to"),
        "image_ref": Socket("IMAGE", optional=True,
                            tooltip="reference image(s) to match colors to; if not provided, processing is skipped"),
        "method": Combo(METHODS),
        # dynamic_inputs tells the editor which inputs each choice brings (see ResizeImageMaskNode)
        "source_stats": Combo(list(SOURCE_STATS), extra={"dynamic_inputs": {
            choice: [f"source_stats.{name}" for name in names] for choice, names in SOURCE_STATS.items()}},
            tooltip="per_frame: each frame matched to image_ref on its own; uniform: the stats pooled over all "
                    "frames, one transform for all; target_frame: one chosen frame's stats, one transform for all "
                    "(keeps the frames' differences)"),
        "source_stats.target_index": Int(0, min=0, max=10000, optional=True,
                                         tooltip="the frame whose stats are the source baseline"),
        "strength": Float(1.0, min=0.0, max=10.0, step=0.01),
    }
    outputs = (Output("IMAGE", "image"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor (and Loom's) stores [method, source_stats, target_index if target_frame, strength]."""
        choice = values[1] if len(values) > 1 else None
        if choice not in SOURCE_STATS or len(values) != 3 + len(SOURCE_STATS[choice]):
            return None
        extra = dict(zip((f"source_stats.{n}" for n in SOURCE_STATS[choice]), values[2:-1], strict=True))
        return {"method": values[0], "source_stats": choice, **extra, "strength": values[-1]}

    def execute(self, image_target: torch.Tensor, method: str, source_stats: str, strength: float,
                image_ref: torch.Tensor | None = None, **options: Any) -> tuple[torch.Tensor]:
        if strength == 0 or image_ref is None:
            return (image_target,)
        for name, image in (("image_target", image_target), ("image_ref", image_ref)):
            if image.ndim != 4:
                raise ValueError(f"ColorTransfer: {name} has shape {tuple(image.shape)}; an IMAGE is "
                                 "[batch, height, width, channels]")
        channels = image_target.shape[-1], image_ref.shape[-1]
        if method != "histogram" and channels != (3, 3):
            raise ValueError(f"ColorTransfer: {method} works in Lab and needs RGB images; image_target has "
                             f"{channels[0]} channels and image_ref {channels[1]}: drop the alpha channel first, or "
                             "use histogram")
        if channels[0] != channels[1]:
            raise ValueError(f"ColorTransfer: image_target has {channels[0]} channels and image_ref {channels[1]}; "
                             "give both the same")
        index = options.get("source_stats.target_index")
        if source_stats == "target_frame" and index is None:
            raise ValueError("ColorTransfer: source_stats 'target_frame' needs the input source_stats.target_index")
        device, _, _ = device_and_dtype(self.ctx)
        with torch.inference_mode():
            out = color_transfer(image_target.to(device, torch.float32), image_ref.to(device, torch.float32),
                                 method, source_stats, index or 0, strength)
        return (out.cpu(),)


NODES = [ColorTransfer]
