"""Skip-layer guidance for diffusion transformers (SD3's MMDiT, Flux): guidance away from the prediction of the same
model with some of its blocks skipped, as ComfyUI's SkipLayerGuidanceSD3 / SkipLayerGuidanceDiT nodes compute it.

The skipped model is a shallow copy whose block lists hold, at the skipped indices, copies of the blocks whose
forward hands their input streams back unchanged (a block "passes its input through"); every weight is shared and
the model's own code (`ldm.mmdit`, `ldm.flux`) is not touched.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ldm.sampling.denoiser import first_level
from ldm.sampling.model_patches import CfgArgs, Predict

# Block lists by stream kind, and how many streams each kind's forward takes first and hands back.
DOUBLE_LISTS = ("joint_blocks", "double_blocks")  # SD3's MMDiT, Flux
SINGLE_LISTS = ("single_blocks",)  # Flux


def parse_layers(text: str) -> tuple[int, ...]:
    """The block indices in a text such as "7, 8, 9": every run of digits, as ComfyUI reads it."""
    return tuple(int(n) for n in re.findall(r"\d+", text))


class _Skipped:
    """Mixed in before a block's class: the block returns its first `streams` arguments as they came."""

    streams = 2

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if self.streams == 1 else tuple(args[:self.streams])


@functools.cache
def _skipped_class(cls: type, streams: int) -> type:
    # A subclass, not a wrapper: the copy is still an instance of the block's class, so code that inspects the
    # blocks (Flux's dtype reads its first block's norm) sees what it expects.
    return type(f"Skipped{cls.__name__}", (_Skipped, cls), {"streams": streams})


def _skipped(block: nn.Module, streams: int) -> nn.Module:
    clone = copy.copy(block)  # shares its parameters, buffers and children
    clone.__class__ = _skipped_class(type(block), streams)
    return clone


def block_lists(model: nn.Module) -> tuple[str | None, str | None]:
    """The names of `model`'s double-stream (or joint) and single-stream block lists, None where it has none."""
    double = next((name for name in DOUBLE_LISTS if isinstance(getattr(model, name, None), nn.ModuleList)), None)
    single = next((name for name in SINGLE_LISTS if isinstance(getattr(model, name, None), nn.ModuleList)), None)
    return double, single


def check_layers(model: nn.Module, double: tuple[int, ...], single: tuple[int, ...]) -> str | None:
    """Why `double` and `single` cannot be skipped in `model` (not a diffusion transformer, an index past the
    last block); None when they can. Single-stream indices on a model without single-stream blocks (SD3) are
    not a problem: ComfyUI ignores them there, and so does `SkipLayers`."""
    double_name, single_name = block_lists(model)
    if double_name is None:
        return (f"skip-layer guidance needs a diffusion transformer (SD3 or Flux); this model "
                f"({type(model).__name__}) has no joint or double-stream blocks")
    for name, wanted, what in ((double_name, double, "double-stream" if double_name == "double_blocks" else "joint"),
                               (single_name, single if single_name else (), "single-stream")):
        count = len(getattr(model, name)) if name else 0
        wrong = [i for i in wanted if i >= count]
        if wrong:
            listed = ", ".join(map(str, wrong))
            named = f"{what} block {listed} is" if len(wrong) == 1 else f"{what} blocks {listed} are"
            return f"skip-layer guidance: {named} out of range; this model has {count} {what} blocks (0 to {count - 1})"
    return None


@dataclass(frozen=True)
class SkipLayers:
    """A transform for `Predict`: `model` with the blocks `double` (joint blocks in SD3, double-stream blocks in
    Flux) and `single` (Flux's single-stream blocks) passing their input through."""

    double: tuple[int, ...] = ()
    single: tuple[int, ...] = ()

    def __call__(self, model: nn.Module) -> nn.Module:
        problem = check_layers(model, self.double, self.single)
        if problem:
            raise ValueError(problem)
        clone = copy.copy(model)
        clone._modules = dict(model._modules)
        double_name, single_name = block_lists(model)
        for name, skipped, streams in ((double_name, self.double, 2), (single_name, self.single, 1)):
            if name is None or not skipped:
                continue
            blocks = getattr(model, name)
            clone._modules[name] = nn.ModuleList(
                _skipped(block, streams) if i in skipped else block for i, block in enumerate(blocks))
        return clone


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance (Stability AI's, for SD3.5; ComfyUI's SkipLayerGuidanceDiT, after Perturbed-Attention
    Guidance): while `sigma_end < sigma <= sigma_start` (the first item's level), one more prediction of the
    positive prompt by the model with `skip`'s blocks skipped, and `denoised + scale * (positive - skipped)`.
    With `rescaling_scale` r != 0 the result is then multiplied by `r * std(positive) / std(result) + 1 - r`
    (standard deviations over the whole batch). diffusers' StableDiffusion3Pipeline uses the same combination (in
    velocity space, which is the same, being linear) but chooses its steps by index, not by noise level."""

    skip: SkipLayers
    scale: float
    sigma_start: float
    sigma_end: float
    rescaling_scale: float = 0.0

    def __call__(self, args: CfgArgs, denoised: Tensor, predict: Predict) -> Tensor:
        if self.scale <= 0:
            return denoised
        sigma = first_level(args.sigma)
        if not self.sigma_end < sigma <= self.sigma_start:  # the window's end excluded, as ComfyUI's newer check
            return denoised
        guided = denoised + (args.cond - predict(self.skip)) * self.scale
        if self.rescaling_scale != 0:
            factor = args.cond.std() / guided.std()
            guided = guided * (self.rescaling_scale * factor + (1 - self.rescaling_scale))
        return guided


@dataclass(frozen=True)
class SkipLayersOnNegative:
    """Skip-layer guidance on the negative side alone (ComfyUI's SkipLayerGuidanceDiTSimple): a negative-side
    function (`ldm.sampling.model_patches.NegativeFunction`) under which, while `sigma_end < sigma <= sigma_start`, the
    negative prompt is predicted by the model with `skip`'s blocks skipped, the positive as usual; plain guidance
    then guides away from that weakened prediction. No extra model pass; nothing changes where no negative is
    predicted (cfg 1)."""

    skip: SkipLayers
    sigma_start: float
    sigma_end: float

    def __call__(self, sigma: float) -> SkipLayers | None:
        return self.skip if self.sigma_end < sigma <= self.sigma_start else None
