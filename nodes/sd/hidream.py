"""HiDream-I1 nodes: loading its four text encoders (QuadrupleCLIPLoader), its prompt encoding with a text for each
encoder (CLIPTextEncodeHiDream), and what its transformer takes from the prompts (the sampler's
`hidream_conditioning`).

HiDream-I1 (full, dev and fast) reads a prompt four ways: CLIP-L's and CLIP-G's pooled text embeddings (its `y`,
2048 wide), T5-XXL's hidden states (the context) and Llama 3.1 8B Instruct's hidden states of every layer, which the
conditioning carries as `conditioning_llama3` (ComfyUI's name) beside the context; the sampler hands them to the
transformer (`ldm.sampling.cond_jobs.MODEL_INPUTS`). It samples on SD3's shifted flow levels (ModelSamplingSD3;
shift 3.0 for full, 6.0 for dev and fast) in Flux's 16-channel latent space (EmptySD3LatentImage, Flux's ae).
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.hidream_text import FAMILY, LLAMA_KEY
from nodes.node import Node
from nodes.sd.conditioning import _encoded
from nodes.sd.models import Clip, DiffusionModel, clip_family_facts, family_refusal
from nodes.sd.part_loaders import TEXT_ENCODERS, _fingerprint, load_clip, part_file, text_kinds_problem
from nodes.spec import Output, Socket, String

KINDS = ["clip_l", "clip_g", "t5xxl", "llama3"]
_ENCODERS = ("load CLIP-L, CLIP-G, T5-XXL and Llama 3.1 8B with QuadrupleCLIPLoader (clip_l_hidream, clip_g_hidream, "
             "t5xxl_fp8_e4m3fn_scaled, llama_3.1_8b_instruct_fp8_scaled) and encode with its CLIP")
_CLIP_NEEDS = "CLIPTextEncodeHiDream needs HiDream's text encoders (QuadrupleCLIPLoader); {source} is {family}"


def hidream_conditioning(conditioning: list, model: DiffusionModel, side: str) -> list:
    """Each entry as a HiDream transformer takes it: `y` its pooled CLIP-L and CLIP-G prompts, and its Llama states
    (which only HiDream's text encoders make: another family's prompts are refused by name)."""
    out = []
    for embedding, options in conditioning:
        if options.get(LLAMA_KEY) is None:
            raise ValueError(f"the {side} prompt has no Llama 3.1 hidden states, which the HiDream model "
                             f"{model.source} takes: {_ENCODERS}")
        pooled = options.get("pooled_output")
        width = model.family.unet_config.text_emb_dim
        y = torch.zeros(embedding.shape[0], width) if pooled is None else pooled.float()
        out.append((embedding, {**options, "y": y}))
    return out


class QuadrupleCLIPLoader(Node):
    """Loads HiDream-I1's four text encoders as one CLIP: CLIP-L, CLIP-G (OpenCLIP bigG), T5-XXL and Llama 3.1 8B
    Instruct, in any order, from models/text_encoders or models/clip (fp8 and scaled fp8 copies too)."""

    category = "advanced/loaders"
    clip_name1 = part_file(TEXT_ENCODERS)
    clip_name2 = part_file(TEXT_ENCODERS)
    clip_name3 = part_file(TEXT_ENCODERS)
    clip_name4 = part_file(TEXT_ENCODERS)
    outputs = (Output("CLIP"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return _fingerprint(TEXT_ENCODERS, *(inputs.get(f"clip_name{i}", "") for i in (1, 2, 3, 4)))

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        """Files that are not HiDream's four (as their headers tell) are refused before anything runs."""
        return text_kinds_problem([inputs.get(f"clip_name{i}") for i in (1, 2, 3, 4)], KINDS,
                                  "QuadrupleCLIPLoader takes HiDream's CLIP-L (clip_l), CLIP-G (clip_g), T5-XXL "
                                  "(t5xxl) and Llama 3.1 8B (llama3)")

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: {"family": FAMILY}}

    def execute(self, clip_name1: str, clip_name2: str, clip_name3: str, clip_name4: str) -> tuple[Clip]:
        from ldm.hidream_text import load_hidream_text_encoder

        names = (clip_name1, clip_name2, clip_name3, clip_name4)
        return (load_clip(self, names, "default", load_hidream_text_encoder, FAMILY),)


class CLIPTextEncodeHiDream(Node):
    """Encodes a prompt for HiDream with a text for each of its four encoders."""

    category = "advanced/conditioning"
    clip = Socket("CLIP")
    clip_l = String("", multiline=True)
    clip_g = String("", multiline=True)
    t5xxl = String("", multiline=True)
    llama = String("", multiline=True)
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("clip", {}).get("family"), FAMILY, "the CLIP linked", _CLIP_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return clip_family_facts(linked)

    def execute(self, clip: Clip, clip_l: str, clip_g: str, t5xxl: str, llama: str) -> tuple[list]:
        refusal = family_refusal(clip.family_name, FAMILY, clip.source, _CLIP_NEEDS)
        if refusal:
            raise ValueError(refusal)
        return (_encoded(self, clip, clip_l, lambda encoding: {"pooled_output": encoding.pooled.float().cpu()},
                         per_encoder={"clip_g": [clip_g], "t5xxl": [t5xxl], "llama": [llama]}),)


NODES = [QuadrupleCLIPLoader, CLIPTextEncodeHiDream]
