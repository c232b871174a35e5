"""Flux.1 nodes: its text encoding, guidance, latent and model sampling, and the loading of its text encoders."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any

import torch

from nodes.node import Node
from nodes.sd.conditioning import MAX_RESOLUTION, _encoded
from nodes.sd.models import Clip, DiffusionModel, device_and_dtype, file_fingerprint, load_device
from nodes.spec import Float, Int, Output, Socket, String

log = logging.getLogger(__name__)

# The guidance a dev model is given where the prompt names none (ComfyUI's default, and FluxGuidance's).
DEFAULT_GUIDANCE = 3.5


def flux_y(conditioning: list, model: DiffusionModel) -> list:
    """Each entry with the `y` a Flux transformer takes (``ldm.flux``): its pooled CLIP-L prompt (zeros without
    one) and, for a model with a guidance embedding, the entry's guidance (3.5 unless said; None: unguided)."""
    config = model.family.unet_config
    out = []
    for embedding, options in conditioning:
        pooled = options.get("pooled_output")
        y = torch.zeros(embedding.shape[0], config.vec_in_dim) if pooled is None else pooled.float()
        guidance = options.get("guidance", DEFAULT_GUIDANCE)
        if config.guidance_embed and guidance is not None:
            y = torch.cat([y, torch.full((y.shape[0], 1), float(guidance))], dim=1)
        out.append((embedding, {**options, "y": y}))
    return out


def _with_guidance(conditioning: list, guidance: float | None) -> list:
    return [(embedding, {**options, "guidance": guidance}) for embedding, options in conditioning]


class CLIPTextEncodeFlux(Node):
    """Encodes a prompt for Flux: `clip_l` for CLIP-L (its pooled vector), `t5xxl` for T5 (the text the
    transformer attends to), and the guidance strength a dev model is distilled to follow."""

    display_name = "CLIPTextEncodeFlux"
    category = "advanced/conditioning/flux"
    clip = Socket("CLIP")
    clip_l = String("", multiline=True, tooltip="the prompt for CLIP-L")
    t5xxl = String("", multiline=True, tooltip="the prompt for T5-XXL")
    guidance = Float(3.5, min=0.0, max=100.0, step=0.1, tooltip="Flux dev's distilled guidance (schnell ignores it)")
    outputs = (Output("CONDITIONING"),)

    def execute(self, clip: Clip, clip_l: str, t5xxl: str, guidance: float) -> tuple[list]:
        if clip.family_name != "flux":
            raise ValueError(f"CLIPTextEncodeFlux needs Flux's text encoders (DualCLIPLoader with type flux, or a "
                             f"Flux checkpoint); {clip.source} is {clip.family_name.upper()} (use CLIP Text Encode)")
        return (_encoded(self, clip, t5xxl, lambda encoding: {"pooled_output": encoding.pooled.float().cpu(),
                                                              "guidance": guidance},
                         per_encoder={"clip_l": [clip_l]}),)


class FluxGuidance(Node):
    """Sets the guidance strength a Flux dev model is given with these prompts."""

    category = "advanced/conditioning/flux"
    conditioning = Socket("CONDITIONING")
    guidance = Float(3.5, min=0.0, max=100.0, step=0.1)
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list, guidance: float) -> tuple[list]:
        return (_with_guidance(conditioning, guidance),)


class FluxDisableGuidance(Node):
    """Removes the guidance strength from these prompts: a dev model then runs without its guidance embedding."""

    category = "advanced/conditioning/flux"
    conditioning = Socket("CONDITIONING")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning: list) -> tuple[list]:
        return (_with_guidance(conditioning, None),)


class EmptySD3LatentImage(Node):
    """A batch of empty (zero) 16-channel latents, the latent space of Flux (and SD3)."""

    display_name = "EmptySD3LatentImage"
    category = "latent/sd3"
    width = Int(1024, min=16, max=MAX_RESOLUTION, step=16)
    height = Int(1024, min=16, max=MAX_RESOLUTION, step=16)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        return ({"samples": torch.zeros(batch_size, 16, height // 8, width // 8)},)


class ModelSamplingFlux(Node):
    """Samples a Flux model with the time shift for an image of width x height: base_shift at 256x256 pixels,
    max_shift at 1024x1024, linear in the pixel count between and beyond (more noise steps for larger images)."""

    category = "advanced/model"
    model = Socket("MODEL")
    max_shift = Float(1.15, min=0.0, max=100.0, step=0.01)
    base_shift = Float(0.5, min=0.0, max=100.0, step=0.01)
    width = Int(1024, min=16, max=MAX_RESOLUTION, step=8)
    height = Int(1024, min=16, max=MAX_RESOLUTION, step=8)
    outputs = (Output("MODEL"),)

    def execute(self, model: DiffusionModel, max_shift: float, base_shift: float, width: int,
                height: int) -> tuple[DiffusionModel]:
        from ldm.sampling.flow import FlowSchedule, resolution_shift

        if model.family.name != "flux":
            raise ValueError(f"ModelSamplingFlux is for Flux models; {model.source} is {model.family.name.upper()}")
        shift = resolution_shift(width, height, max_shift, base_shift)
        return (replace(model, schedule=FlowSchedule(shift), prediction_type="flow"),)


# --- DualCLIPLoader's type "flux" (nodes.sd.part_loaders calls these) -------------------------------------

@functools.lru_cache(maxsize=64)
def text_kind(path: str, fingerprint: str) -> tuple[str | None, str | None]:
    """("t5xxl" or a CLIP kind, refusal) of a text-encoder file from its header; (None, None) if it cannot tell."""
    from safetensors import SafetensorError

    from ldm.checkpoint import CheckpointError, read_shapes
    from ldm.parts import peek_text_encoder
    from ldm.t5 import is_t5

    try:
        shapes = read_shapes(path)
        if shapes is not None and is_t5(shapes):
            return "t5xxl", None
        return peek_text_encoder(path), None
    except CheckpointError as e:
        return None, str(e)
    except (SafetensorError, OSError, ValueError):
        return None, None


def flux_clip_problem(names: tuple[Any, Any]) -> str | None:
    """Why two text-encoder files are not Flux's pair (CLIP-L and T5-XXL), or None where they are or the headers
    cannot tell."""
    from nodes.sd.part_loaders import TEXT_ENCODERS, part_path

    found = []
    for name in names:
        path = part_path(TEXT_ENCODERS, str(name))
        found.append((None, None) if path is None else text_kind(str(path), str(file_fingerprint(path))))
    problems = [problem for _, problem in found if problem]
    if problems:
        return problems[0]
    kinds = [kind for kind, _ in found]
    if None in kinds or sorted(kinds) == ["clip_l", "t5xxl"]:
        return None
    return (f"{names[0]} and {names[1]} hold {' + '.join(kinds)}; type flux needs one CLIP-L (clip_l) and one "
            "T5-XXL (t5xxl)")


def load_flux_clip(node: Node, names: tuple[str, str], device: str) -> Clip:
    """Load (or share) Flux's two text-encoder files as one CLIP: on the offload device in the model dtype, or with
    device "cpu" in float32 on the CPU, pinned there; the engine's --te-weights-dtype applies."""
    from ldm.flux_text import load_flux_text_encoders
    from ldm.quant import quantize_
    from nodes.sd.loaders import engine_weight_dtypes, shared_model
    from nodes.sd.part_loaders import TEXT_ENCODERS, _required_path

    paths = [_required_path(TEXT_ENCODERS, name) for name in names]
    weights = engine_weight_dtypes(node)[1]
    pinned = device == "cpu"
    target, dtype = (torch.device("cpu"), torch.float32) if pinned else (load_device(node.ctx),
                                                                          device_and_dtype(node.ctx)[1])

    def load() -> Any:
        loaded = load_flux_text_encoders(paths, device=target, dtype=dtype)
        quantize_(loaded.encoder, weights)
        loaded.encoder.pinned_to_cpu = pinned
        if loaded.unused_keys:
            log.warning("%d unused keys, e.g. %s", len(loaded.unused_keys), loaded.unused_keys[:3])
        return loaded.encoder

    key = ("flux_text_encoders", tuple((str(p), str(file_fingerprint(p))) for p in paths), str(target), str(dtype),
           weights, pinned)
    return Clip(shared_model(node, key, load), "flux", " + ".join(names))


NODES: list[Any] = [CLIPTextEncodeFlux, FluxGuidance, FluxDisableGuidance, EmptySD3LatentImage, ModelSamplingFlux]
