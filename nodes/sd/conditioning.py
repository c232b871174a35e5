"""Conditioning nodes: text encoding, CLIP layer choice, combining and area prompts."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ldm.sampling.clip_schedule import encode_scheduled
from ldm.sampling.cond_jobs import PROMPT_INPUTS
from ldm.t5 import tokenizer_options
from nodes.folders import get_paths, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.models import Clip, clip_family_facts, family_refusal, file_fingerprint, on_device
from nodes.spec import Combo, Float, Int, Output, Socket, String

log = logging.getLogger(__name__)

MAX_RESOLUTION = 16384


def embedding_vectors(name: str) -> dict[int, torch.Tensor] | None:
    """The vectors of `embedding:NAME` from models/embeddings (NAME with or without its suffix), or None."""
    from ldm.embeddings import SUFFIXES

    for candidate in (name, *(name + suffix for suffix in SUFFIXES)):
        path = get_paths().find_model("embeddings", candidate)
        if path is not None:
            return _load_embedding(str(path), str(file_fingerprint(path)))
    return None


@functools.lru_cache(maxsize=64)
def _load_embedding(path: str, fingerprint: str) -> dict[int, torch.Tensor]:
    from ldm.embeddings import load_embedding

    return load_embedding(path)


def _encoded(node: Node, clip: Clip, text: str, options: Callable[[Any], dict], **kwargs: Any) -> list:
    """The CONDITIONING of a prompt `clip` encodes on the compute device (`embedding:NAME` words read from
    models/embeddings), the encoder's own options (`TextEncoding.extra`, e.g. LTX-Video's attention_mask) and
    `options(encoding)` with each entry, and the hooks SetClipHooks gave the CLIP to pass on, if any. With
    SetClipHooks' schedule_clip, one entry per keyframe range, its range in clip_start_percent and clip_end_percent
    (ComfyUI's encode_from_tokens_scheduled)."""
    def encode(encoder: torch.nn.Module) -> Any:
        with tokenizer_options(*(clip.t5_options or ())):
            return encoder.encode([text], clip_skip=clip.clip_skip, embeddings=embedding_vectors, **kwargs)

    with torch.inference_mode():
        encoder = on_device(node.ctx, clip.encoder)
        if clip.clip_schedule is None:
            encodings = [({}, encode(encoder))]
        else:
            encodings = [({"clip_start_percent": part.start_percent, "clip_end_percent": part.end_percent}, encoding)
                         for part, encoding in encode_scheduled(encoder, clip.clip_schedule, encode)]
    hooks = {} if clip.cond_hooks is None else {"hooks": clip.cond_hooks}
    return [(encoding.cond.float().cpu(), {**{k: v.cpu() for k, v in encoding.extra.items()}, **options(encoding),
                                           **part, **hooks}) for part, encoding in encodings]


class CLIPTextEncode(Node):
    """Encodes a prompt, with (word:1.2) emphasis and prompts longer than 75 tokens."""

    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    text = String("", multiline=True, tooltip="the prompt; (word:1.2) weights a word, \\( is a literal (")
    clip = Socket("CLIP")
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return clip_family_facts(linked)

    def execute(self, text: str, clip: Clip) -> tuple[list]:
        return (_encoded(self, clip, text, lambda encoding: {} if encoding.pooled is None else
                         {"pooled_output": encoding.pooled.float().cpu()}),)


_SDXL_CLIP_NEEDS = "CLIPTextEncodeSDXL needs an SDXL checkpoint's CLIP; {source} is {family} (use CLIP Text Encode)"


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

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return family_refusal(linked.get("clip", {}).get("family"), "sdxl", "the CLIP linked", _SDXL_CLIP_NEEDS)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return clip_family_facts(linked)

    def execute(self, width: int, height: int, crop_w: int, crop_h: int, target_width: int, target_height: int,
                text_g: str, clip: Clip, text_l: str) -> tuple[list]:
        refusal = family_refusal(clip.family_name, "sdxl", clip.source, _SDXL_CLIP_NEEDS)
        if refusal:
            raise ValueError(refusal)
        sizes = {"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h, "target_width": target_width,
                 "target_height": target_height}
        return (_encoded(self, clip, text_g, lambda encoding: {"pooled_output": encoding.pooled.float().cpu(), **sizes},
                         per_encoder={"clip_g": [text_g], "clip_l": [text_l]}),)


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
        return (_encoded(self, clip, text, lambda encoding: {"pooled_output": encoding.pooled.float().cpu(),
                                                             "aesthetic_score": ascore, "width": width,
                                                             "height": height}),)


class CLIPSetLastLayer(Node):
    """Stops the text encoder early ("clip skip"): -1 is the last layer, -2 the one before."""

    display_name = "CLIP Set Last Layer"
    category = "conditioning"
    clip = Socket("CLIP")
    stop_at_clip_layer = Int(-1, min=-24, max=-1)
    outputs = (Output("CLIP"),)

    def execute(self, clip: Clip, stop_at_clip_layer: int) -> tuple[Clip]:
        return (clip.with_clip_skip(stop_at_clip_layer),)


class T5TokenizerOptions(Node):
    """Sets how T5 tokenizes this CLIP's prompts: pad tokens after each prompt (Chroma's workflows add one) and a
    minimum length in tokens, which replaces the model's own (Flux pads to 256, SD3 to 77) when set above 0."""

    category = "_for_testing/conditioning"
    clip = Socket("CLIP")
    min_padding = Int(0, min=0, max=10000, tooltip="pad tokens after each prompt's end token")
    min_length = Int(0, min=0, max=10000, tooltip="pad each prompt to at least this many tokens; 0 pads none")
    outputs = (Output("CLIP"),)

    def execute(self, clip: Clip, min_padding: int, min_length: int) -> tuple[Clip]:
        return (replace(clip, t5_options=(min_padding, min_length)),)


class ConditioningCombine(Node):
    display_name = "Conditioning (Combine)"
    category = "conditioning"
    conditioning_1 = Socket("CONDITIONING")
    conditioning_2 = Socket("CONDITIONING")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning_1: list, conditioning_2: list) -> tuple[list]:
        return (conditioning_1 + conditioning_2,)


def _with_area(conditioning: list, area: tuple, strength: float) -> list:
    """Every entry limited to `area` (latent pixels, or ("percentage", ...) fractions) with that strength."""
    return [(emb, {**opts, "area": area, "strength": strength, "set_area_to_bounds": False})
            for emb, opts in conditioning]


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
        return (_with_area(conditioning, area, strength),)


class ConditioningSetAreaPercentage(Node):
    """Limits a prompt to a rectangle given as fractions of the image, so it fits any size."""

    display_name = "Conditioning (Set Area with Percentage)"
    category = "conditioning"
    conditioning = Socket("CONDITIONING")
    width = Float(1.0, min=0.0, max=1.0, step=0.01)
    height = Float(1.0, min=0.0, max=1.0, step=0.01)
    x = Float(0.0, min=0.0, max=1.0, step=0.01)
    y = Float(0.0, min=0.0, max=1.0, step=0.01)
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, width: float, height: float, x: float, y: float,
                strength: float) -> tuple[list]:
        area = ("percentage", height, width, y, x)
        return (_with_area(conditioning, area, strength),)


class ConditioningSetAreaPercentageVideo(Node):
    """Limits a prompt to a box of a video latent, as fractions of its width, height and frames (temporal, from
    frame z), so it fits any size and length. On an image latent, a one-frame video, only a box starting at
    frame 0 acts."""

    category = "conditioning"
    conditioning = Socket("CONDITIONING")
    width = Float(1.0, min=0.0, max=1.0, step=0.01)
    height = Float(1.0, min=0.0, max=1.0, step=0.01)
    temporal = Float(1.0, min=0.0, max=1.0, step=0.01)
    x = Float(0.0, min=0.0, max=1.0, step=0.01)
    y = Float(0.0, min=0.0, max=1.0, step=0.01)
    z = Float(0.0, min=0.0, max=1.0, step=0.01)
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, width: float, height: float, temporal: float, x: float, y: float,
                z: float, strength: float) -> tuple[list]:
        # ComfyUI's layout: the sizes along (frames, rows, columns), then the starts (ldm.sampling.cond_jobs).
        area = ("percentage", temporal, height, width, z, y, x)
        return (_with_area(conditioning, area, strength),)


class ConditioningSetAreaStrength(Node):
    """Sets how much a prompt weighs where it overlaps others."""

    category = "conditioning"
    conditioning = Socket("CONDITIONING")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, strength: float) -> tuple[list]:
        return ([(emb, {**opts, "strength": strength}) for emb, opts in conditioning],)


class ConditioningSetMask(Node):
    """Weights a prompt by a mask; "mask bounds" also runs the model only on the mask's bounding box."""

    display_name = "Conditioning (Set Mask)"
    category = "conditioning"
    conditioning = Socket("CONDITIONING")
    mask = Socket("MASK")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    set_cond_area = Combo(["default", "mask bounds"])
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, mask: torch.Tensor, strength: float, set_cond_area: str) -> tuple[list]:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        return ([(emb, {**opts, "mask": mask, "mask_strength": strength,
                        "set_area_to_bounds": set_cond_area != "default"}) for emb, opts in conditioning],)


class ConditioningSetTimestepRange(Node):
    """Lets a prompt act only from `start` to `end` of the run (0 is the first step, 1 the last)."""

    category = "advanced/conditioning"
    conditioning = Socket("CONDITIONING")
    start = Float(0.0, min=0.0, max=1.0, step=0.001)
    end = Float(1.0, min=0.0, max=1.0, step=0.001)
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, start: float, end: float) -> tuple[list]:
        return ([(emb, {**opts, "start_percent": start, "end_percent": end}) for emb, opts in conditioning],)


def _first(conditioning: list, node: str) -> tuple[torch.Tensor, dict]:
    if not conditioning:
        raise ValueError(f"{node}: conditioning_from is empty")
    if len(conditioning) > 1:
        log.warning("%s: conditioning_from has %d entries; only the first is used", node, len(conditioning))
    return conditioning[0]


def _check_fits(node: str, to: torch.Tensor, source: torch.Tensor) -> None:
    """conditioning_from's prompt must be as wide as conditioning_to's, and one prompt or as many."""
    if source.shape[-1] != to.shape[-1]:
        raise ValueError(f"{node}: the prompts are {to.shape[-1]} and {source.shape[-1]} wide; encode both with "
                         "the same CLIP")
    if source.shape[0] not in (1, to.shape[0]):
        raise ValueError(f"{node}: conditioning_from holds {source.shape[0]} prompts and conditioning_to "
                         f"{to.shape[0]}; give one prompt, or as many")


class ConditioningConcat(Node):
    """Appends conditioning_from's tokens to each of conditioning_to's prompts (one longer context)."""

    display_name = "Conditioning (Concat)"
    category = "conditioning"
    conditioning_to = Socket("CONDITIONING")
    conditioning_from = Socket("CONDITIONING")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning_to: list, conditioning_from: list) -> tuple[list]:
        extra, _ = _first(conditioning_from, "ConditioningConcat")
        out = []
        for emb, opts in conditioning_to:
            _check_fits("ConditioningConcat", emb, extra)
            out.append((torch.cat([emb, extra.to(emb.dtype).expand(emb.shape[0], -1, -1)], dim=1), opts))
        return (out,)


class ConditioningAverage(Node):
    """Blends conditioning_to with conditioning_from's first prompt: strength 1 is all `to`, 0 all `from`
    (the shorter embedding padded with zeros), the pooled outputs likewise."""

    category = "conditioning"
    conditioning_to = Socket("CONDITIONING")
    conditioning_from = Socket("CONDITIONING")
    conditioning_to_strength = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning_to: list, conditioning_from: list, conditioning_to_strength: float) -> tuple[list]:
        source, source_opts = _first(conditioning_from, "ConditioningAverage")
        pooled_from = source_opts.get("pooled_output")
        out = []
        for emb, opts in conditioning_to:
            _check_fits("ConditioningAverage", emb, source)
            other = source[:, :emb.shape[1]].to(emb.dtype)
            if other.shape[1] < emb.shape[1]:
                other = torch.nn.functional.pad(other, (0, 0, 0, emb.shape[1] - other.shape[1]))
            opts = dict(opts)
            pooled_to = opts.get("pooled_output", pooled_from)
            if pooled_from is not None and pooled_to is not None:
                opts["pooled_output"] = torch.lerp(pooled_from, pooled_to, conditioning_to_strength)
            out.append((torch.lerp(other, emb, conditioning_to_strength), opts))
        return (out,)


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
            for key in ("pooled_output", *PROMPT_INPUTS):  # and the model's other prompt inputs (HiDream's Llama's)
                if opts.get(key) is not None:
                    opts[key] = torch.zeros_like(opts[key])
            zeroed.append((torch.zeros_like(emb), opts))
        return (zeroed,)


class CLIPTextEncodeControlnet(Node):
    """Encodes a prompt for the ControlNets that read their own text (ComfyUI's cross_attn_controlnet and
    pooled_output_controlnet options), added to every entry of the conditioning; the entries' own prompts stay."""

    display_name = "CLIP Text Encode (Controlnet)"
    category = "model/conditioning"
    clip = Socket("CLIP")
    conditioning = Socket("CONDITIONING")
    text = String("", multiline=True)
    outputs = (Output("CONDITIONING"),)

    def execute(self, clip: Clip, conditioning: list, text: str) -> tuple[list]:
        with torch.inference_mode():
            encoder = on_device(self.ctx, clip.encoder)
            with tokenizer_options(*(clip.t5_options or ())):
                encoding = encoder.encode([text], clip_skip=clip.clip_skip, embeddings=embedding_vectors)
        cond = encoding.cond.float().cpu()
        pooled = None if encoding.pooled is None else encoding.pooled.float().cpu()
        return ([(emb, {**opts, "cross_attn_controlnet": cond, "pooled_output_controlnet": pooled})
                 for emb, opts in conditioning],)


# What SaveConditioning stores beside the tensors: plain values, as JSON under this metadata key.
CONDITIONING_OPTIONS_KEY = "conditioning_options"


class SaveConditioning(Node):
    """Saves one conditioning entry as PREFIX_00001_.safetensors in the output folder, as ComfyUI does: the
    embedding as `conditioning`, each tensor option under its name (a list of tensors as NAME.0, NAME.1, ...), the
    plain options (numbers, text, booleans) as JSON in the metadata. Move it to models/embeddings to load it with
    Load Conditioning, e.g. to skip the text encoder."""

    display_name = "Save Conditioning"
    category = "model/conditioning"
    output_node = True
    conditioning = Socket("CONDITIONING")
    filename_prefix = String("conditioning/ComfyUI", tooltip="file name prefix, in the output folder")

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, conditioning: list, filename_prefix: str) -> NodeResult:
        from ldm.checkpoint import write_safetensors

        if len(conditioning) != 1:
            raise ValueError(f"SaveConditioning saves a single conditioning entry and got {len(conditioning)}: save "
                             "each before combining them")
        cond, options = conditioning[0]
        tensors, values = {"conditioning": cond}, {}
        for key, value in options.items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, list | tuple) and all(isinstance(t, torch.Tensor) for t in value):
                tensors.update({f"{key}.{i}": t for i, t in enumerate(value)})
            elif isinstance(value, bool | int | float | str):
                values[key] = value
            elif value is not None:
                raise ValueError(f"SaveConditioning: the conditioning option {key!r} ({type(value).__name__}) cannot "
                                 "be saved; save the conditioning before the node that adds it")
        with new_output_file(get_paths().output, filename_prefix, ".safetensors") as (path, handle, subfolder):
            handle.close()  # safetensors writes by path
            write_safetensors(tensors, path, {CONDITIONING_OPTIONS_KEY: json.dumps(values)})
        return NodeResult(ui={"files": [{"filename": path.name, "subfolder": subfolder, "type": "output"}]})


class ConditioningLoader(Node):
    """Loads a conditioning Save Conditioning wrote (or any file of models/embeddings with a `conditioning`
    tensor): its options back from the other tensors (NAME.0, NAME.1, ... as a list) and the metadata."""

    display_name = "Load Conditioning"
    category = "model/loaders"
    conditioning_name = Combo(lambda: get_paths().list_models("embeddings"))
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("embeddings", str(inputs.get("conditioning_name", ""))))

    def execute(self, conditioning_name: str) -> tuple[list]:
        from ldm.checkpoint import load_state_dict, read_metadata

        path = get_paths().find_model("embeddings", conditioning_name)
        if path is None:
            raise ValueError(f"ConditioningLoader: {conditioning_name!r} is not in models/embeddings")
        tensors = dict(load_state_dict(path))
        cond = tensors.pop("conditioning", None)
        if cond is None:
            raise ValueError(f"ConditioningLoader: {conditioning_name} holds no 'conditioning' tensor (save one with "
                             "Save Conditioning; a textual inversion embedding goes in a prompt as embedding:NAME)")
        options = json.loads(read_metadata(path).get(CONDITIONING_OPTIONS_KEY, "{}"))
        lists: dict[str, dict[int, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, _, index = key.rpartition(".")
            if index.isdigit():
                lists.setdefault(name, {})[int(index)] = value
            else:
                options[key] = value
        options.update({name: [items[i] for i in sorted(items)] for name, items in lists.items()})
        return ([(cond, options)],)


NODES = [CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner, CLIPSetLastLayer, T5TokenizerOptions,
         ConditioningCombine,
         ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetAreaPercentageVideo,
         ConditioningSetAreaStrength, ConditioningSetMask,
         ConditioningSetTimestepRange, ConditioningConcat, ConditioningAverage, ConditioningZeroOut,
         CLIPTextEncodeControlnet, SaveConditioning, ConditioningLoader]
