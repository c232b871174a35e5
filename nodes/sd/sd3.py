"""Stable Diffusion 3 / 3.5 nodes: loading its three text encoders, its prompt encoding, and its model sampling."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from nodes.node import Node
from nodes.sd.conditioning import _encoded
from nodes.sd.models import SD3_SHIFTED, Clip, DiffusionModel, clip_family_facts, family_refusal
from nodes.sd.part_loaders import TEXT_ENCODERS, _fingerprint, load_clip, part_file, text_kinds_problem
from nodes.spec import Combo, Float, Output, Socket, String


def sd3_y(conditioning: list) -> list:
    """Each entry with the `y` an SD3 transformer takes (``ldm.mmdit``): its pooled CLIP-L and CLIP-G prompts
    (zeros for a conditioning without them, e.g. one a plugin made)."""
    return [(embedding, {**options, "y": options["pooled_output"].float() if "pooled_output" in options
                         else torch.zeros(embedding.shape[0], 2048)}) for embedding, options in conditioning]


_SD3_ENCODERS = ("load CLIP-L, CLIP-G and T5-XXL with TripleCLIPLoader (clip_l.safetensors, clip_g.safetensors, "
                 "t5xxl_fp16.safetensors) and encode with its CLIP")


class NoTextEncoders(nn.Module):
    """The CLIP of a checkpoint that ships without text encoders (sd3_medium.safetensors, LTX-Video's all-in-one
    files): encoding with it says where the encoders are to come from (`advice`; SD3's unless given)."""

    def __init__(self, source: str, advice: str = _SD3_ENCODERS) -> None:
        super().__init__()
        self.source = source
        self.advice = advice
        self.register_buffer("_device", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device.device

    @property
    def dtype(self) -> torch.dtype:
        return self._device.dtype

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"{self.source} holds no text encoders: {self.advice}")


class TripleCLIPLoader(Node):
    """Loads SD3's three text encoders as one CLIP: CLIP-L, CLIP-G (OpenCLIP bigG) and T5-XXL, in any order, from
    models/text_encoders or models/clip."""

    category = "advanced/loaders"
    clip_name1 = part_file(TEXT_ENCODERS)
    clip_name2 = part_file(TEXT_ENCODERS)
    clip_name3 = part_file(TEXT_ENCODERS)
    outputs = (Output("CLIP"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _fingerprint(TEXT_ENCODERS, *(inputs.get(f"clip_name{i}", "") for i in (1, 2, 3)))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        """Files that are not SD3's three (as their headers tell) are refused before anything runs."""
        return text_kinds_problem([inputs.get(f"clip_name{i}") for i in (1, 2, 3)], ["clip_g", "clip_l", "t5xxl"],
                                  "TripleCLIPLoader takes SD3's CLIP-L (clip_l), CLIP-G (clip_g) and T5-XXL (t5xxl)")

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: {"family": "sd3"}}

    def execute(self, clip_name1: str, clip_name2: str, clip_name3: str) -> tuple[Clip]:
        from ldm.sd3_text import load_sd3_text_encoders

        return (load_clip(self, (clip_name1, clip_name2, clip_name3), "default", load_sd3_text_encoders, "sd3"),)


_CLIP_NEEDS = ("CLIPTextEncodeSD3 needs SD3's text encoders (TripleCLIPLoader, or an SD3 checkpoint with them); "
               "{source} is {family} (use CLIP Text Encode)")
_MODEL_NEEDS = "{node} is for SD3, Wan, Qwen-Image and HiDream models; {{source}} is {{family}}"


class CLIPTextEncodeSD3(Node):
    """Encodes a prompt for SD3 with a text for each encoder (clip_l, clip_g, t5xxl). empty_padding "none" leaves
    out the tokens of an empty T5 text (and of the CLIP part, where both CLIP texts are empty); "empty_prompt"
    encodes empty texts as the empty prompt."""

    category = "advanced/conditioning"
    clip = Socket("CLIP")
    clip_l = String("", multiline=True)
    clip_g = String("", multiline=True)
    t5xxl = String("", multiline=True)
    empty_padding = Combo(["none", "empty_prompt"])
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("clip", {}).get("family"), "sd3", "the CLIP linked", _CLIP_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return clip_family_facts(linked)

    def execute(self, clip: Clip, clip_l: str, clip_g: str, t5xxl: str, empty_padding: str) -> tuple[list]:
        refusal = family_refusal(clip.family_name, "sd3", clip.source, _CLIP_NEEDS)
        if refusal:
            raise ValueError(refusal)
        return (_encoded(self, clip, clip_l, lambda encoding: {"pooled_output": encoding.pooled.float().cpu()},
                         per_encoder={"clip_g": [clip_g], "t5xxl": [t5xxl]}, drop_empty=empty_padding == "none"),)


def _shift_refusal(family: str | None, source: str, node: str = "ModelSamplingSD3") -> str | None:
    return None if family in SD3_SHIFTED else family_refusal(family, "sd3", source, _MODEL_NEEDS.format(node=node))


class ModelSamplingSD3(Node):
    """Samples an SD3 or Wan model with the time shift `shift` (SD3: 3.0 as released; higher spends more steps at
    high noise)."""

    category = "advanced/model"
    model = Socket("MODEL")
    shift = Float(3.0, min=0.0, max=100.0, step=0.01)
    outputs = (Output("MODEL"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return _shift_refusal(linked.get("model", {}).get("family"), "the MODEL linked", cls.__name__)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, shift: float) -> tuple[DiffusionModel]:
        from ldm.sampling.flow import SD3FlowSchedule

        refusal = _shift_refusal(model.family.name, model.source, type(self).__name__)
        if refusal:
            raise ValueError(refusal)
        return (replace(model, schedule=SD3FlowSchedule(shift), prediction_type="flow"),)


class ModelSamplingAuraFlow(ModelSamplingSD3):
    """ModelSamplingSD3's time shift under AuraFlow's default (1.73); ComfyUI's Qwen-Image and some Wan workflows
    set their shift with it. (ComfyUI also passes AuraFlow's timesteps unscaled; Loom's flow models all take the
    level itself, so only the shift differs.)"""

    shift = Float(1.73, min=0.0, max=100.0, step=0.01)


NODES: list[Any] = [TripleCLIPLoader, CLIPTextEncodeSD3, ModelSamplingSD3, ModelSamplingAuraFlow]
