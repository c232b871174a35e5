"""ScaleROPE (ComfyUI's nodes_rope.py): a diffusion transformer's image RoPE positions scaled and shifted per axis.

ComfyUI keeps the six numbers in the model's `transformer_options["rope_options"]`, which the position code of some
of its DiTs reads (Flux's process_img, which its FLUX.2 shares, and Wan's rope_encode): along each axis of n patches
from offset o, position i becomes o + shift + i * scale (`ldm.flux.scaled_axis`, ComfyUI's arithmetic). Loom's Flux
(Flux.1 and its Kontext, Fill and Depth / Canny models, references included), FLUX.2 and Wan (2.1 / 2.2, VACE and
Fun Camera) read the same numbers from their `rope_scale` attribute, set here on a shallow copy of the transformer
(weights shared, as EasyCache's copy is); other models, whose positions Loom's code for them does not scale, are
refused. ComfyUI computes Wan's positions in the model's dtype (bf16 rounds fractional ones); Loom keeps float32.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ldm.flux import Flux, RopeScale
from ldm.flux2 import Flux2
from ldm.lora import shallow_copy
from ldm.wan import WanModel
from nodes.node import Node
from nodes.sd.models import DiffusionModel
from nodes.spec import Float, Output, Socket

# The transformers whose position code reads `rope_scale`: Flux.1's and FLUX.2's index (time) axis only shifts
# (scale_t is unused, as in ComfyUI), Wan's frames scale and shift too.
SCALABLE: tuple[type[nn.Module], ...] = (Flux, Flux2, WanModel)
_ADVANCED = {"advanced": True}


def with_rope_scale(model: DiffusionModel, scale: RopeScale) -> DiffusionModel:
    """`model` whose transformer is a copy (sharing its weights) placing its image tokens by `scale`."""
    if not isinstance(model.unet, SCALABLE):
        raise ValueError(f"ScaleROPE: {model.source} is a {type(model.unet).__name__}, whose RoPE positions Loom "
                         "cannot scale; it scales Flux.1 (and Kontext, Fill, Depth / Canny), FLUX.2 and Wan models. "
                         "Remove the node for this model")
    unet = shallow_copy(model.unet)
    unet.rope_scale = scale
    return replace(model, unet=unet, loras=(*model.loras, f"ScaleROPE {scale}"))


class ScaleROPE(Node):
    """The MODEL with its image positions along x, y and t scaled and shifted (Flux.1, FLUX.2, Wan)."""

    category = "advanced/model_patches"
    description = "Scale and shift the ROPE of the model."
    model = Socket("MODEL")
    scale_x = Float(1.0, min=0.0, max=100.0, step=0.1, extra=_ADVANCED)
    shift_x = Float(0.0, min=-256.0, max=256.0, step=0.1, extra=_ADVANCED)
    scale_y = Float(1.0, min=0.0, max=100.0, step=0.1, extra=_ADVANCED)
    shift_y = Float(0.0, min=-256.0, max=256.0, step=0.1, extra=_ADVANCED)
    scale_t = Float(1.0, min=0.0, max=100.0, step=0.1, extra=_ADVANCED)
    shift_t = Float(0.0, min=-256.0, max=256.0, step=0.1, extra=_ADVANCED)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, scale_x: float, shift_x: float, scale_y: float, shift_y: float,
                scale_t: float, shift_t: float) -> tuple[DiffusionModel]:
        return (with_rope_scale(model, RopeScale(scale_x, shift_x, scale_y, shift_y, scale_t, shift_t)),)


NODES = [ScaleROPE]
