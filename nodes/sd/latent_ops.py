"""Latent arithmetic (add, subtract, multiply, interpolate), seed behaviour of batches, and .latent files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from nodes.folders import get_paths, input_file, input_files, input_where, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.latent import repeat_to_batch, upscale_latent
from nodes.spec import Combo, Float, Output, Socket, String

# ComfyUI's .latent file: a safetensors file with these tensors. Files without the version marker
# predate it and hold latents multiplied by SD1's VAE scale factor.
LATENT_KEY = "latent_tensor"
VERSION_MARKER = "latent_format_version_0"
OLD_FORMAT_SCALE = 0.18215


def match_latent(target: torch.Tensor, other: torch.Tensor, what: str) -> torch.Tensor:
    """`other` made the shape of `target`, as ComfyUI does: resized (bilinear, centre crop) to its height and
    width, then its batch cut or cycled to the target's size. Latents of different model families refuse."""
    if other.ndim != target.ndim or other.shape[1] != target.shape[1]:
        raise ValueError(f"{what}: the latents have shapes {tuple(target.shape)} and {tuple(other.shape)}; "
                         "their channels differ, so they come from different model families and cannot be combined")
    if other.shape[2:] != target.shape[2:]:
        if target.ndim != 4:
            raise ValueError(f"{what}: the latents have shapes {tuple(target.shape)} and {tuple(other.shape)}; "
                             "only image latents of different sizes are resized to match")
        other = upscale_latent(other, target.shape[-1], target.shape[-2], "bilinear", "center")
    return repeat_to_batch(other.to(target), target.shape[0])


class LatentAdd(Node):
    """samples1 + samples2 (samples2 resized to samples1's size and batch)."""

    category = "latent/advanced"
    samples1 = Socket("LATENT")
    samples2 = Socket("LATENT")
    outputs = (Output("LATENT"),)

    def execute(self, samples1: dict, samples2: dict) -> tuple[dict]:
        s1 = samples1["samples"]
        return (dict(samples1, samples=s1 + match_latent(s1, samples2["samples"], "LatentAdd")),)


class LatentSubtract(Node):
    """samples1 - samples2 (samples2 resized to samples1's size and batch)."""

    category = "latent/advanced"
    samples1 = Socket("LATENT")
    samples2 = Socket("LATENT")
    outputs = (Output("LATENT"),)

    def execute(self, samples1: dict, samples2: dict) -> tuple[dict]:
        s1 = samples1["samples"]
        return (dict(samples1, samples=s1 - match_latent(s1, samples2["samples"], "LatentSubtract")),)


class LatentMultiply(Node):
    """samples * multiplier."""

    category = "latent/advanced"
    samples = Socket("LATENT")
    multiplier = Float(1.0, min=-10.0, max=10.0, step=0.01)
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, multiplier: float) -> tuple[dict]:
        return (dict(samples, samples=samples["samples"] * multiplier),)


def _unit(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """x / norm with 0 where the norm is 0 (a zero vector stays zero)."""
    return torch.nan_to_num(x / norm)


def interpolate_latents(s1: torch.Tensor, s2: torch.Tensor, ratio: float) -> torch.Tensor:
    """Interpolate each pixel's channel vector: the directions linearly (then renormalised) and the lengths
    linearly, so a blend of two latents keeps their magnitude instead of shrinking towards zero.
    ratio 1 gives s1, 0 gives s2."""
    norm1 = torch.linalg.vector_norm(s1, dim=1, keepdim=True)
    norm2 = torch.linalg.vector_norm(s2, dim=1, keepdim=True)
    direction = _unit(s1, norm1) * ratio + _unit(s2, norm2) * (1.0 - ratio)
    direction = _unit(direction, torch.linalg.vector_norm(direction, dim=1, keepdim=True))
    return direction * (norm1 * ratio + norm2 * (1.0 - ratio))


class LatentInterpolate(Node):
    """Blends samples1 (ratio 1) into samples2 (ratio 0), interpolating directions and magnitudes separately."""

    category = "latent/advanced"
    samples1 = Socket("LATENT")
    samples2 = Socket("LATENT")
    ratio = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("LATENT"),)

    def execute(self, samples1: dict, samples2: dict, ratio: float) -> tuple[dict]:
        s1 = samples1["samples"]
        s2 = match_latent(s1, samples2["samples"], "LatentInterpolate")
        return (dict(samples1, samples=interpolate_latents(s1, s2, ratio)),)


class LatentBatchSeedBehavior(Node):
    """`fixed`: every latent of the batch gets the first one's noise; `random`: each its own (batch_index dropped)."""

    category = "latent/advanced"
    samples = Socket("LATENT")
    seed_behavior = Combo(["random", "fixed"], default="fixed")
    outputs = (Output("LATENT"),)

    def execute(self, samples: dict, seed_behavior: str) -> tuple[dict]:
        out = dict(samples)
        if seed_behavior == "random":
            out.pop("batch_index", None)
        else:
            first = list(samples.get("batch_index") or [0])[0]
            out["batch_index"] = [first] * samples["samples"].shape[0]
        return (out,)


class SaveLatent(Node):
    """Saves latents to the output folder as a ComfyUI .latent file (safetensors) carrying the workflow."""

    category = "_for_testing"
    output_node = True
    samples = Socket("LATENT")
    filename_prefix = String("latents/ComfyUI")
    outputs = ()

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, samples: dict, filename_prefix: str) -> NodeResult:
        from safetensors.torch import save

        extra = self.ctx.extra
        prompt = extra.get("prompt")
        metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
        metadata.update({key: json.dumps(value) for key, value in (extra.get("extra_pnginfo") or {}).items()})
        tensors = {LATENT_KEY: samples["samples"].detach().cpu().contiguous(), VERSION_MARKER: torch.tensor([])}
        data = save(tensors, metadata=metadata)
        with new_output_file(get_paths().output, filename_prefix, ".latent") as (path, handle, subfolder):
            handle.write(data)
        saved = {"filename": path.name, "subfolder": subfolder, "type": "output"}
        return NodeResult(ui={"latents": [saved]})


def list_input_latents() -> list[str]:
    return input_files((".latent",))


def _latent_file_problem(path: Path) -> str | None:
    """Why the file is not a .latent file, from its header alone; None when it is one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as exc:  # safetensors raises its own error types (and OSError) for a bad header
        return f"{path.name} is not a readable .latent file (a safetensors file): {exc}"
    if LATENT_KEY not in keys:
        return f"{path.name} holds no '{LATENT_KEY}' tensor, so it is not a ComfyUI .latent file"
    return None


def load_latent_file(path: Path) -> dict[str, torch.Tensor]:
    """A .latent file as a LATENT; files from before the version marker are divided by SD1's scale factor."""
    from safetensors.torch import load_file

    problem = _latent_file_problem(path)
    if problem:
        raise ValueError(problem)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # a header that reads but data that does not (a cut-off file)
        raise ValueError(f"{path.name} is not a readable .latent file: {exc}") from None
    scale = 1.0 if VERSION_MARKER in tensors else 1.0 / OLD_FORMAT_SCALE
    return {"samples": tensors[LATENT_KEY].float() * scale}


class LoadLatent(Node):
    """Loads a .latent file from the input folder (ComfyUI's current and older format)."""

    category = "_for_testing"
    latent = Combo(list_input_latents, choices_where=input_where)
    outputs = (Output("LATENT"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        path = input_file(str(inputs.get("latent", "")))
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        """Refuse a file that is not a .latent file before anything runs (reads the header only)."""
        path = input_file(str(inputs.get("latent", "")))
        return _latent_file_problem(path) if path is not None else None  # a missing file: the combo check

    def execute(self, latent: str) -> tuple[dict]:
        path = input_file(latent)
        if path is None:
            raise FileNotFoundError(f"latent file {latent!r} not found in {get_paths().input}")
        return (load_latent_file(path),)


NODES = [LatentAdd, LatentSubtract, LatentMultiply, LatentInterpolate, LatentBatchSeedBehavior, SaveLatent,
         LoadLatent]
