"""ComfyUI's TextGenerate ("Generate Text"): the language model inside a CLIP writes text for a prompt (prompt
enhancement); the generation itself is ldm.textgen's.

`sampling_mode` is a ComfyUI dynamic combo: "on" brings its own inputs, which API prompts carry as
`sampling_mode.temperature`, `sampling_mode.top_k`, ... (Loom declares each one, optional, as ResizeImageMaskNode
does); "off" decodes greedily. An `image` is read by LTX-2's Gemma 3 when its file holds the vision tower (its first
picture, ldm.textgen's Pictures); other CLIPs, and a Gemma 3 file without the tower, refuse it. Video and audio are
refused: no CLIP Loom generates with reads them.

TextGenerateLTX2Prompt ("Generate LTX2 Prompt", the LTX-2 templates' prompt enhancer) is TextGenerate with LTX-2's
system prompt and Gemma 3 chat turns around the user's prompt (ldm.textgen.ltx2_enhancement_prompt; an optional
linked `system_prompt` replaces LTX-2's, as in current ComfyUI); its text comes back stripped, the prompt itself
when nothing is written. With an `image` (the LTX-2.3 image-to-video templates link the first frame) it writes an
image-to-video prompt: LTX-2's image-to-video system prompt, the picture's soft tokens before the user's prompt;
a CLIP without Gemma 3's vision tower refuses it (IMAGE_REFUSED).
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.ltx2_text import FAMILY as LTX2_FAMILY
from ldm.textgen import NEEDS, Sampling, TextGenerationError, generate_text, ltx2_enhancement_prompt, reads_pictures
from nodes.node import Node
from nodes.sd.models import Clip, on_device
from nodes.spec import Boolean, Combo, Float, InputSpec, Int, Output, Socket, String

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "presence_penalty")
# The families of the CLIPs that can generate (ldm.textgen.chat_lm): Z-Image's Qwen3-4B, Lumina 2's Gemma-2-2B,
# Qwen-Image 2.1's Qwen3-VL-8B, LTX-2's Gemma 3 12B.
GENERATING_FAMILIES = frozenset({"z_image", "lumina2", "qwen_image21", LTX2_FAMILY})

_INPUTS: dict[str, InputSpec] = {
    "clip": Socket("CLIP", tooltip="a CLIP holding a causal language model (Qwen3-4B, Gemma-2-2B, Qwen3-VL-8B or "
                   "LTX-2's Gemma 3 12B)"),
    "prompt": String("", multiline=True, tooltip="the prompt; with use_default_template it is the user's turn"),
    "image": Socket("IMAGE", optional=True, tooltip="a picture for the model to read (its first one): LTX-2's Gemma 3 "
                    "with its vision tower only"),
    "video": Socket("VIDEO", optional=True, tooltip="not supported"),
    "audio": Socket("AUDIO", optional=True, tooltip="not supported"),
    "max_length": Int(512, min=1, max=32768, tooltip="the most tokens to write"),
    "sampling_mode": Combo(["on", "off"], tooltip="on: sample with the sampling_mode.* settings; off: greedy",
                           extra={"dynamic_inputs": {"on": [f"sampling_mode.{k}" for k in SAMPLING_KEYS], "off": []}}),
    "sampling_mode.temperature": Float(0.7, min=0.01, max=2.0, step=0.000001, optional=True),
    "sampling_mode.top_k": Int(64, min=0, max=1000, optional=True, tooltip="0: no top-k"),
    "sampling_mode.top_p": Float(0.95, min=0.0, max=1.0, step=0.01, optional=True),
    "sampling_mode.min_p": Float(0.05, min=0.0, max=1.0, step=0.01, optional=True),
    "sampling_mode.repetition_penalty": Float(1.05, min=0.0, max=5.0, step=0.01, optional=True),
    "sampling_mode.seed": Int(0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True),
    "sampling_mode.presence_penalty": Float(0.0, min=0.0, max=5.0, step=0.01, optional=True),
    "thinking": Boolean(False, optional=True, tooltip="let a thinking model (Qwen3) think first; off adds the "
                        "empty think block"),
    "use_default_template": Boolean(True, optional=True, tooltip="put the prompt in the model's chat template; "
                                    "off: the prompt is tokenized as it is"),
}


def sampling_of(mode: str, options: dict[str, Any]) -> Sampling | None:
    """The sampling settings of sampling_mode "on" (defaults where an input is absent); None for "off"."""
    if mode == "off":
        return None
    given = {k: options[f"sampling_mode.{k}"] for k in SAMPLING_KEYS if options.get(f"sampling_mode.{k}") is not None}
    return Sampling(**given)


class TextGenerate(Node):
    """Writes text with the language model of a CLIP (Z-Image's Qwen3-4B, Lumina 2's Gemma-2-2B, Qwen-Image 2.1's
    Qwen3-VL-8B or LTX-2's Gemma 3 12B) from a prompt in its chat template (and a picture, for Gemma 3 with its vision
    tower), greedily or sampled."""

    display_name = "Generate Text"
    category = "textgen"
    inputs = _INPUTS
    outputs = (Output("STRING", "generated_text"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [prompt, max_length, sampling_mode, the choice's widgets (seven numbers for "on";
        six before presence_penalty), thinking, use_default_template] (older files lack the booleans)."""
        if len(values) < 3 or values[2] not in ("on", "off"):
            return None
        out = {"prompt": values[0], "max_length": values[1], "sampling_mode": values[2]}
        rest = list(values[3:])
        if values[2] == "on":
            count = next((i for i, v in enumerate(rest) if isinstance(v, bool)), len(rest))
            if count not in (len(SAMPLING_KEYS) - 1, len(SAMPLING_KEYS)):
                return None
            out |= {f"sampling_mode.{k}": v for k, v in zip(SAMPLING_KEYS, rest[:count], strict=False)}
            rest = rest[count:]
        if len(rest) > 2:
            return None
        return out | dict(zip(("thinking", "use_default_template"), rest, strict=False))

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        family = linked.get("clip", {}).get("family")
        if family is not None and family not in GENERATING_FAMILIES:
            return f"the CLIP linked is {family}'s. {NEEDS}"
        unknown = sorted(name for name in linked if name not in cls.inputs)
        return f"TextGenerate has no input {', '.join(unknown)}" if unknown else None

    def execute(self, clip: Clip, prompt: str, max_length: int, sampling_mode: str, image: Any = None,
                video: Any = None, audio: Any = None, thinking: bool = False, use_default_template: bool = True,
                **options: Any) -> tuple[str]:
        given = [name for name, value in (("video", video), ("audio", audio)) if value is not None]
        if given:
            raise TextGenerationError(f"TextGenerate: Loom's generating CLIPs read text only (and pictures, for "
                                      f"LTX-2's Gemma 3); disconnect the {' and '.join(given)} input")
        sampling = sampling_of(sampling_mode, options)
        with torch.inference_mode():
            encoder = on_device(self.ctx, clip.encoder)
            return (generate_text(encoder, prompt, max_length, sampling, thinking, use_default_template, image),)


IMAGE_REFUSED = ("TextGenerateLTX2Prompt: an image-to-video prompt needs Gemma 3's vision tower, which this CLIP does "
                 "not hold (a Gemma 3 file without vision_model.* / multi_modal_projector.* weights: Comfy-Org's "
                 "gemma_3_12B_it.safetensors has them); disconnect the image to write a text-to-video prompt")


class TextGenerateLTX2Prompt(TextGenerate):
    """Writes an LTX-2 video prompt from the user's prompt with the language model of a CLIP (LTX-2's Gemma 3 12B),
    under LTX-2's text-to-video system prompt, or its image-to-video one with the first frame linked (see the module
    docstring)."""

    display_name = "Generate LTX2 Prompt"
    inputs = {**_INPUTS,
              "image": Socket("IMAGE", optional=True, tooltip="the first frame, for an image-to-video prompt (needs "
                              "Gemma 3's vision tower in the text encoder file)"),
              "system_prompt": String("", optional=True, force_input=True, tooltip="replaces LTX-2's system prompt")}

    def execute(self, clip: Clip, prompt: str, max_length: int, sampling_mode: str, image: Any = None,
                video: Any = None, audio: Any = None, thinking: bool = False, use_default_template: bool = True,
                system_prompt: str | None = None, **options: Any) -> tuple[str]:
        if image is not None and not reads_pictures(clip.encoder):
            raise TextGenerationError(IMAGE_REFUSED)
        chat = ltx2_enhancement_prompt(prompt, image is not None, system_prompt or "")
        (text,) = super().execute(clip, chat, max_length, sampling_mode, image, video, audio, thinking,
                                  use_default_template, **options)
        return (text.strip() or prompt,)


NODES = [TextGenerate, TextGenerateLTX2Prompt]
