"""Conditioning nodes: text encoding, CLIP layer choice, combining and area prompts."""

from __future__ import annotations

import torch

from nodes.node import Node
from nodes.sd.models import Clip, on_device
from nodes.spec import Float, Int, Output, Socket, String

MAX_RESOLUTION = 16384


class CLIPTextEncode(Node):
    """Encodes a prompt, with (word:1.2) emphasis and prompts longer than 75 tokens."""

    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    text = String("", multiline=True, tooltip="the prompt; (word:1.2) weights a word, \\( is a literal (")
    clip = Socket("CLIP")
    outputs = (Output("CONDITIONING"),)

    def execute(self, text: str, clip: Clip) -> tuple[list]:
        with torch.inference_mode():
            encoding = on_device(self.ctx, clip.encoder).encode([text], clip_skip=clip.clip_skip)
        options = {}
        if encoding.pooled is not None:
            options["pooled_output"] = encoding.pooled.float().cpu()
        return ([(encoding.cond.float().cpu(), options)],)


class CLIPTextEncodeSDXL(Node):
    """SDXL's two text encoders with a prompt each (text_g for OpenCLIP bigG, text_l for CLIP-L), and the
    size and crop numbers SDXL was trained to condition on."""

    display_name = "CLIPTextEncodeSDXL"
    category = "advanced/conditioning"
    width = Int(1024, min=0, max=MAX_RESOLUTION, tooltip="the original image width SDXL is told of")
    height = Int(1024, min=0, max=MAX_RESOLUTION)
    crop_w = Int(0, min=0, max=MAX_RESOLUTION)
    crop_h = Int(0, min=0, max=MAX_RESOLUTION)
    target_width = Int(1024, min=0, max=MAX_RESOLUTION)
    target_height = Int(1024, min=0, max=MAX_RESOLUTION)
    text_g = String("", multiline=True, tooltip="the prompt for OpenCLIP bigG")
    clip = Socket("CLIP")
    text_l = String("", multiline=True, tooltip="the prompt for CLIP-L")
    outputs = (Output("CONDITIONING"),)

    def execute(self, width: int, height: int, crop_w: int, crop_h: int, target_width: int, target_height: int,
                text_g: str, clip: Clip, text_l: str) -> tuple[list]:
        if clip.family_name != "sdxl":
            raise ValueError(f"CLIPTextEncodeSDXL needs an SDXL checkpoint's CLIP; {clip.source} is "
                             f"{clip.family_name.upper()} (use CLIP Text Encode)")
        with torch.inference_mode():
            encoding = on_device(self.ctx, clip.encoder).encode(
                [text_g], clip_skip=clip.clip_skip, per_encoder={"clip_g": [text_g], "clip_l": [text_l]})
        options = {"pooled_output": encoding.pooled.float().cpu(), "width": width, "height": height,
                   "crop_w": crop_w, "crop_h": crop_h, "target_width": target_width, "target_height": target_height}
        return ([(encoding.cond.float().cpu(), options)],)


class CLIPTextEncodeSDXLRefiner(Node):
    """A prompt for the SDXL refiner, with the aesthetic score and image size it conditions on."""

    display_name = "CLIPTextEncodeSDXLRefiner"
    category = "advanced/conditioning"
    ascore = Float(6.0, min=0.0, max=1000.0, step=0.01, tooltip="the aesthetic score asked for (6: good; "
                                                                  "negative prompts usually get 2.5)")
    width = Int(1024, min=0, max=MAX_RESOLUTION)
    height = Int(1024, min=0, max=MAX_RESOLUTION)
    text = String("", multiline=True)
    clip = Socket("CLIP")
    outputs = (Output("CONDITIONING"),)

    def execute(self, ascore: float, width: int, height: int, text: str, clip: Clip) -> tuple[list]:
        with torch.inference_mode():
            encoding = on_device(self.ctx, clip.encoder).encode([text], clip_skip=clip.clip_skip)
        options = {"pooled_output": encoding.pooled.float().cpu(), "aesthetic_score": ascore,
                   "width": width, "height": height}
        return ([(encoding.cond.float().cpu(), options)],)


class CLIPSetLastLayer(Node):
    """Stops the text encoder early ("clip skip"): -1 is the last layer, -2 the one before."""

    display_name = "CLIP Set Last Layer"
    category = "conditioning"
    clip = Socket("CLIP")
    stop_at_clip_layer = Int(-1, min=-24, max=-1)
    outputs = (Output("CLIP"),)

    def execute(self, clip: Clip, stop_at_clip_layer: int) -> tuple[Clip]:
        return (clip.with_clip_skip(stop_at_clip_layer),)


class ConditioningCombine(Node):
    display_name = "Conditioning (Combine)"
    category = "conditioning"
    conditioning_1 = Socket("CONDITIONING")
    conditioning_2 = Socket("CONDITIONING")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning_1: list, conditioning_2: list) -> tuple[list]:
        return (conditioning_1 + conditioning_2,)


class ConditioningSetArea(Node):
    """Limits a prompt to a rectangle of the image (pixels; stored in latent units as (h, w, y, x))."""

    display_name = "Conditioning (Set Area)"
    category = "conditioning"
    conditioning = Socket("CONDITIONING")
    width = Int(64, min=64, max=MAX_RESOLUTION, step=8)
    height = Int(64, min=64, max=MAX_RESOLUTION, step=8)
    x = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    y = Int(0, min=0, max=MAX_RESOLUTION, step=8)
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, width: int, height: int, x: int, y: int, strength: float) -> tuple[list]:
        area = (height // 8, width // 8, y // 8, x // 8)
        return ([(emb, {**opts, "area": area, "strength": strength, "set_area_to_bounds": False})
                 for emb, opts in conditioning],)


class ConditioningZeroOut(Node):
    """The same conditioning with every embedding, and the pooled output, set to zero (SDXL workflows use it
    for an empty negative prompt, as ComfyUI's node of this name does)."""

    display_name = "ConditioningZeroOut"
    category = "advanced/conditioning"
    conditioning = Socket("CONDITIONING")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list) -> tuple[list]:
        zeroed = []
        for emb, opts in conditioning:
            opts = dict(opts)
            if opts.get("pooled_output") is not None:
                opts["pooled_output"] = torch.zeros_like(opts["pooled_output"])
            zeroed.append((torch.zeros_like(emb), opts))
        return (zeroed,)


NODES = [CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner, CLIPSetLastLayer, ConditioningCombine,
         ConditioningSetArea, ConditioningZeroOut]
