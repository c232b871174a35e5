"""GLIGEN nodes, under ComfyUI's names and inputs: load a GLIGEN text-box model, ground phrases in boxes.

A GLIGEN value is the loaded model (`ldm.gligen.Gligen`). GLIGENTextBoxApply adds, to each conditioning entry, the
phrase's pooled text embedding and its box in latent pixels under the entry's `gligen` option,
`("position", model, phrases)` (after the phrases already there); the guider runs such entries with a copy of
the UNet whose transformer blocks take the phrases' grounding tokens (`ldm.gligen.grounded_unet`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.conditioning import embedding_vectors
from nodes.sd.loaders import model_file, model_path, shared_model
from nodes.sd.models import HANDLE_SIZE, Clip, device_and_dtype, file_fingerprint, on_device
from nodes.spec import Int, Output, Socket, String

MAX_RESOLUTION = 16384


@dataclass(frozen=True, eq=False)
class GligenModel:
    """GLIGEN: a loaded GLIGEN text-box model and the file it came from."""

    model: torch.nn.Module  # ldm.gligen.Gligen
    source: str

    def cache_size(self) -> int:
        return HANDLE_SIZE  # the weights are the model cache's


class GLIGENLoader(Node):
    """Loads a GLIGEN text-box model from models/gligen (gligen_sd14_textbox_pruned.safetensors for SD1.x)."""

    display_name = "GLIGENLoader"
    category = "loaders"
    gligen_name = model_file("gligen")
    outputs = (Output("GLIGEN"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("gligen", str(inputs.get("gligen_name", ""))))

    def execute(self, gligen_name: str) -> tuple[GligenModel]:
        from ldm.gligen import GligenError, load_gligen_file

        path = model_path("gligen", gligen_name)
        _, dtype, _ = device_and_dtype(self.ctx)  # the UNet's compute dtype: no converted copy when sampling

        def load() -> Any:
            try:
                return load_gligen_file(path).to(dtype=dtype)
            except GligenError as e:
                raise GligenError(f"{gligen_name}: {e}") from None

        key = ("gligen", str(path), str(file_fingerprint(path)), str(dtype))
        return (GligenModel(shared_model(self, key, load), gligen_name),)


class GLIGENTextBoxApply(Node):
    """Grounds a phrase in a box of the image: the model is told to draw `text` there. Works best when the phrase
    names an object of the prompt. Several boxes: chain several of these nodes (up to 30)."""

    display_name = "GLIGENTextBoxApply"
    category = "conditioning/gligen"
    conditioning_to = Socket("CONDITIONING")
    clip = Socket("CLIP")
    gligen_textbox_model = Socket("GLIGEN")
    text = String("", multiline=True, tooltip="the phrase to draw in the box")
    width = Int(64, min=8, max=MAX_RESOLUTION, step=8, tooltip="the box's width in image pixels")
    height = Int(64, min=8, max=MAX_RESOLUTION, step=8)
    x = Int(0, min=0, max=MAX_RESOLUTION, step=8, tooltip="the box's left edge in image pixels")
    y = Int(0, min=0, max=MAX_RESOLUTION, step=8, tooltip="the box's top edge in image pixels")
    outputs = (Output("CONDITIONING"),)

    def execute(self, conditioning_to: list, clip: Clip, gligen_textbox_model: GligenModel, text: str,
                width: int, height: int, x: int, y: int) -> tuple[list]:
        from ldm.gligen import GligenError

        with torch.inference_mode():
            encoding = on_device(self.ctx, clip.encoder).encode([text], clip_skip=clip.clip_skip,
                                                                 embeddings=embedding_vectors)
        if encoding.pooled is None:
            raise GligenError("this CLIP gives no pooled text embedding, which GLIGEN grounds phrases with")
        pooled = encoding.pooled.float().cpu()
        model = gligen_textbox_model.model
        if pooled.shape[-1] != model.phrase_dim:
            raise GligenError(f"{gligen_textbox_model.source} takes {model.phrase_dim}-wide phrase embeddings and "
                              f"this CLIP gives {pooled.shape[-1]}: it is for another model family")
        phrase = (pooled, height // 8, width // 8, y // 8, x // 8)  # in latent pixels, as ComfyUI stores it
        out = []
        for embedding, options in conditioning_to:
            before = options.get("gligen")
            phrases = list(before[2]) if before is not None else []
            out.append((embedding, {**options, "gligen": ("position", model, [*phrases, phrase])}))
        return (out,)


NODES: list[Any] = [GLIGENLoader, GLIGENTextBoxApply]
