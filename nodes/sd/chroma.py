"""Chroma in the SD node set: its prompts at sampling, and the refusals of another family's prompts or model.

Chroma (`ldm.chroma`) loads through UNETLoader, CLIPLoader type "chroma" (T5-XXL alone) and VAELoader (Flux's ae),
or all in one through CheckpointLoaderSimple, and samples through KSampler with real CFG on Flux's levels; it has
no nodes of its own. Its prompts carry no
pooled vector, which is how a sampler tells them from a Flux or SD CLIP's: a Chroma model refuses prompts with
one, and validation refuses a Chroma CLIP's prompts for another model, and the reverse, from the loaders' facts.
"""

from __future__ import annotations

from typing import Any

from nodes.sd.models import DiffusionModel

_CLIP = ("a Chroma model takes prompts encoded by CLIPLoader with type chroma (T5-XXL alone); the {side} prompt "
         "carries a pooled CLIP vector, so it was encoded by another family's CLIP (Flux's DualCLIPLoader, an SD "
         "checkpoint's)")


def chroma_conditioning(conditioning: list, model: DiffusionModel, side: str = "positive") -> list:
    """A Chroma model's prompts as they are (it takes no `y`), after refusing any that another family's CLIP made."""
    if any(options.get("pooled_output") is not None for _, options in conditioning):
        raise ValueError(_CLIP.format(side=side) + f"; the model is {model.source}")
    if any("attention_mask" in options for _, options in conditioning):
        raise ValueError(f"the {side} prompt carries Apply Style Model's attn_bias (an attention bias over Flux's "
                         f"joint attention), which Loom's Chroma does not take; the model is {model.source}: use "
                         "strength_type multiply")
    return conditioning


def chroma_link_refusal(linked: dict[str, dict[str, Any]]) -> str | None:
    """Why a sampler's prompts do not fit its model where one side is Chroma and the other another family (from
    the loaders' facts); None where they fit or validation cannot tell."""
    model = linked.get("model", {}).get("family")
    for side in ("positive", "negative"):
        prompt = linked.get(side, {}).get("family")
        if model is None or prompt is None or model == prompt or "chroma" not in (model, prompt):
            continue
        if model == "chroma":
            return (f"the {side} prompt was encoded by a {prompt.upper()} CLIP; a Chroma model takes prompts "
                    "encoded by CLIPLoader with type chroma (T5-XXL alone)")
        return (f"the {side} prompt was encoded by Chroma's text encoder (CLIPLoader type chroma); the "
                f"{model.upper()} model takes its own family's CLIP")
    return None
