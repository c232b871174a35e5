"""Lumina Image 2.0's nodes: the prompt node (the user's prompt behind one of the system prompts Lumina 2 was trained
with) and RenormCFG (its reference sampler's guidance as a model patch)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ldm.gemma_text import SYSTEM_PROMPTS, lumina2_prompt
from ldm.sampling.model_patches import RenormCFG as RenormCFGFunction
from nodes.node import Node
from nodes.sd.conditioning import _encoded
from nodes.sd.models import Clip, DiffusionModel, clip_family_facts, family_refusal
from nodes.spec import Combo, Float, Output, Socket, String

_CLIP_NEEDS = ("CLIPTextEncodeLumina2 needs Lumina Image 2.0's Gemma-2-2B (CLIPLoader type lumina2, or the "
               "lumina_2.safetensors checkpoint); {source} is {family} (use CLIP Text Encode)")


class CLIPTextEncodeLumina2(Node):
    """Encodes `user_prompt` behind a system prompt ("superior" or "alignment") as "{system} <Prompt Start> {user}",
    the text Lumina 2 was trained on; (word:1.2) weights work as in CLIP Text Encode."""

    display_name = "CLIP Text Encode for Lumina2"
    category = "conditioning"
    system_prompt = Combo(list(SYSTEM_PROMPTS), tooltip="Lumina 2's two system prompts: " + "; ".join(
        f"{name}: {text}" for name, text in SYSTEM_PROMPTS.items()))
    user_prompt = String("", multiline=True, tooltip="the prompt")
    clip = Socket("CLIP")
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        clip = linked.get("clip", {})
        return family_refusal(clip.get("family"), "lumina2", clip.get("source", "the CLIP linked"), _CLIP_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return clip_family_facts(linked)

    def execute(self, system_prompt: str, user_prompt: str, clip: Clip) -> tuple[list]:
        refusal = family_refusal(clip.family_name, "lumina2", clip.source, _CLIP_NEEDS)
        if refusal:
            raise ValueError(refusal)
        return (_encoded(self, clip, lumina2_prompt(user_prompt, system_prompt), lambda encoding: {}),)


class RenormCFG(Node):
    """Lumina 2's guidance (`ldm.sampling.model_patches.RenormCFG`): CFG only below a noise level, and the guided
    prediction's norm capped at a multiple of the positive prediction's, against the over-saturation strong cfg
    gives. Any model takes it; it replaces the guidance of other guidance patches such as RescaleCFG."""

    category = "advanced/model"
    model = Socket("MODEL")
    cfg_trunc = Float(100.0, min=0.0, max=100.0, step=0.01, tooltip=(
        "guidance applies where the noise level sigma (1 = pure noise for flow models) is below this; at higher "
        "levels the positive prediction is used alone. The default 100 guides every step"))
    renorm_cfg = Float(1.0, min=0.0, max=100.0, step=0.01, tooltip=(
        "the guided prediction's norm is capped at this many times the positive prediction's (per image); 0 turns "
        "the cap off"))
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, cfg_trunc: float, renorm_cfg: float) -> tuple[DiffusionModel]:
        patches = replace(model.sampling_patches, cfg_function=RenormCFGFunction(cfg_trunc, renorm_cfg))
        return (replace(model, sampling_patches=patches),)


NODES = [CLIPTextEncodeLumina2, RenormCFG]
