"""Flux.1's edit models: Kontext's reference latents (extra image tokens), and the extra input channels of Fill
(masked image + folded mask) and Depth / Canny (a control image's latent).

- Kontext (FLUX.1-Kontext-dev) is Flux.1-dev's transformer: each reference latent is cut into 2x2 patches like the
  noisy latent and appended to the image tokens, with RoPE positions of its own (first axis 1, as Black Forest
  Labs and diffusers place one reference); only the noisy latent's tokens are kept at the end. Several references
  are placed by one of ComfyUI's methods (`REFERENCE_METHODS`, see `reference_placements`).
- Fill (FLUX.1-Fill-dev) takes 384 values per patch: 64 of the noisy latent, then 320 of a 80-channel concat, the
  masked image's latent (16 channels) and the pixel-resolution mask folded 8x8 into 64 channels (`fold_mask`).
- Depth / Canny (FLUX.1-Depth-dev, FLUX.1-Canny-dev) take 128: the noisy latent's 64, then the control image's
  latent's 64.
A model's kind is told by how much wider its input (img_in) is than its output (final_layer): `edit_kind`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# ComfyUI's FluxKontextMultiReferenceLatentMethod values (its "uxo/uno" choice is stored as "uxo"); Loom's Flux places
# references by the first three, and Qwen-Image by all (its last, Edit-2511's, also modulates them at timestep 0).
FLUX_METHODS = ("offset", "index", "uxo")
REFERENCE_METHODS = (*FLUX_METHODS, "index_timestep_zero")
# Fill's mask is folded from pixels into the latent's grid: one channel per pixel of an 8x8 block.
MASK_FOLD = 8


@dataclass(frozen=True, eq=False)
class References:
    """Reference latents [B, C, h, w] in the model's latent space (each its own size), and how they are placed."""

    latents: tuple[Tensor, ...]
    method: str = "offset"

    def __post_init__(self) -> None:
        if self.method not in REFERENCE_METHODS:
            raise ValueError(f"unknown reference latent method {self.method!r}; one of {REFERENCE_METHODS}")

    def compatible(self, other: References | None) -> bool:
        """Whether two jobs' references can share one batched model call: same method, count and shapes."""
        return (other is not None and self.method == other.method and len(self.latents) == len(other.latents)
                and all(a.shape[1:] == b.shape[1:] for a, b in zip(self.latents, other.latents, strict=True)))

    @staticmethod
    def batched(group: Sequence[References]) -> References:
        """The references of jobs batched into one call, each concatenated along the batch in the jobs' order."""
        return References(tuple(torch.cat(parts) for parts in zip(*(r.latents for r in group), strict=True)),
                          group[0].method)


def reference_placements(sizes: Sequence[tuple[int, int]], rows: int, cols: int, method: str = "offset",
                         patch: int = 2) -> list[tuple[int, int, int]]:
    """The RoPE placement (first-axis index, row offset, column offset; offsets in patches) of reference latents
    of `sizes` (h, w in latent pixels) beside a noisy latent of `rows` x `cols` patches, as ComfyUI places them:
    "offset" puts all at index 1, each after the ones before along the side that keeps the block squarest;
    "index" puts each at its own index (1, 2, ...) from (0, 0); "uxo" (UNO/USO) at index 0, diagonally past
    the noisy latent and the references before."""
    if method not in REFERENCE_METHODS:
        raise ValueError(f"unknown reference latent method {method!r}; one of {REFERENCE_METHODS}")
    if method not in FLUX_METHODS:
        raise ValueError(f"reference latent method {method!r} (Qwen-Image-Edit-2511's timestep-0 references): "
                         f"Loom's Flux places references by one of {FLUX_METHODS}")
    out = []
    h = w = 0  # the extent (latent pixels) the references placed so far cover
    for i, (ref_h, ref_w) in enumerate(sizes):
        if method == "index":
            index, row, col = i + 1, 0, 0
        elif method == "uxo":
            index, row, col = 0, rows * patch + h, cols * patch + w
            h, w = h + ref_h, w + ref_w
        else:
            index, row, col = 1, 0, 0
            if ref_h + h > ref_w + w:
                col = w
            else:
                row = h
            h, w = max(h, ref_h + row), max(w, ref_w + col)
        out.append((index, (row + patch // 2) // patch, (col + patch // 2) // patch))
    return out


def edit_kind(in_channels: int, out_channels: int, patch: int = 2) -> str | None:
    """"fill", "control" (Depth / Canny) or None (text-to-image, Kontext) for a transformer whose img_in takes
    `in_channels` values per patch and whose output has `out_channels`; a width none of these has is refused."""
    latent, extra = out_channels // patch**2, (in_channels - out_channels) // patch**2
    if in_channels % patch**2 or extra * patch**2 != in_channels - out_channels:
        raise ValueError(f"img_in takes {in_channels} values per {patch}x{patch} patch: not a whole number of "
                         "channels")
    if extra == 0:
        return None
    if extra == latent:
        return "control"
    if extra == latent + MASK_FOLD**2:
        return "fill"
    raise ValueError(f"a Flux transformer whose img_in takes {in_channels} values per patch ({in_channels // patch**2}"
                     f" channels) for a {latent}-channel latent: Loom runs Flux.1 ({latent}), Fill ({2 * latent + 64}) "
                     f"and Depth / Canny ({2 * latent}), no other kind")


def input_refusal(input_channels: int, latent_channels: int, given: int) -> str:
    """Why a model taking `input_channels` (`latent_channels` of them the latent's) refuses an input of `given`."""
    extra = input_channels - latent_channels
    takes = {0: "", latent_channels: f" and {extra} of a control image (Depth / Canny: InstructPixToPixConditioning)",
             latent_channels + MASK_FOLD**2: f" and {extra} of a masked image and its mask (Fill: "
                                             "InpaintModelConditioning)"}
    return (f"this Flux model takes {input_channels} input channels: a {latent_channels}-channel latent"
            f"{takes.get(extra, f' and {extra} more')}; it was given {given}")


def fold_mask(mask: Tensor) -> Tensor:
    """A pixel-resolution mask [B, 1, 8h, 8w] as Fill takes it, [B, 64, h, w]: channel 8*i + j holds the pixel
    (i, j) of each 8x8 block (diffusers' FluxFillPipeline.prepare_mask_latents, ComfyUI's Flux concat)."""
    b, _, height, width = mask.shape
    if height % MASK_FOLD or width % MASK_FOLD:
        raise ValueError(f"a {height}x{width} mask does not fold into 8x8 blocks")
    h, w = height // MASK_FOLD, width // MASK_FOLD
    return mask.reshape(b, h, MASK_FOLD, w, MASK_FOLD).permute(0, 2, 4, 1, 3).reshape(b, MASK_FOLD**2, h, w)
