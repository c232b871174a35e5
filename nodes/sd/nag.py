"""NAGuidance (ComfyUI's nodes_nag.py): Normalized Attention Guidance, a negative prompt for distilled models. The
math is in `ldm.nag`; the node sets it as the attention output patch of a shallow copy of the Flux transformer or SD
UNet (weights shared, as ScaleROPE's copy is) and has the guider predict the negative prompt even at cfg 1."""

from __future__ import annotations

from dataclasses import replace

from ldm.attention import BasicTransformerBlock
from ldm.flux import Flux
from ldm.flux2 import Flux2
from ldm.lora import shallow_copy
from ldm.nag import NormalizedAttentionGuidance
from ldm.unet import UNetModel
from nodes.node import Node
from nodes.sd.models import DiffusionModel
from nodes.spec import Float, Output, Socket

# The models whose attention outputs take the patch, as ComfyUI's attn1_output_patch reaches them: the Flux.1 and
# FLUX.2 blocks' joint attention (its image tokens), the SD UNets' transformer blocks' self-attention.
GUIDED = (Flux, Flux2, UNetModel)


def with_nag(model: DiffusionModel, scale: float, alpha: float, tau: float) -> DiffusionModel:
    """`model` whose transformer is a copy guided away from the negative prompt in attention (the given one is left
    as it was)."""
    if not isinstance(model.unet, GUIDED):
        raise ValueError(f"NAGuidance: {model.source} is a {type(model.unet).__name__}; Loom applies Normalized "
                         "Attention Guidance to Flux.1 (dev, schnell, Kontext, Fill, Depth / Canny), FLUX.2 and SD "
                         "UNets (SD1, SD2, SDXL) only. Remove the node for this model")
    patch = NormalizedAttentionGuidance(scale, alpha, tau)
    unet = shallow_copy(model.unet)
    if isinstance(unet, Flux | Flux2):
        unet.attention_output = patch
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            block.attn1_output = patch
    unet.cuda_graphs_safe = False  # the patch reads the call's row layout on the host
    return replace(model, unet=unet, sampling_patches=replace(model.sampling_patches, keep_negative=True),
                   loras=(*model.loras, f"NAG {scale:g}/{alpha:g}/{tau:g}"))


class NAGuidance(Node):
    """Applies Normalized Attention Guidance to models, enabling negative prompts on distilled/schnell models."""

    display_name = "Normalized Attention Guidance"
    category = ""
    model = Socket("MODEL", tooltip="The model to apply NAG to.")
    nag_scale = Float(5.0, min=0.0, max=50.0, step=0.1,
                      tooltip="The guidance scale factor. Higher values push further from the negative prompt.")
    nag_alpha = Float(0.5, min=0.0, max=1.0, step=0.01,
                      tooltip="Blending factor for the normalized attention. 1.0 is full replacement, 0.0 is no "
                              "effect.")
    nag_tau = Float(1.5, min=1.0, max=10.0, step=0.01)
    outputs = (Output("MODEL", tooltip="The patched model with NAG enabled."),)

    def execute(self, model: DiffusionModel, nag_scale: float, nag_alpha: float,
                nag_tau: float) -> tuple[DiffusionModel]:
        return (with_nag(model, nag_scale, nag_alpha, nag_tau),)


NODES = [NAGuidance]
