"""PhotoMaker under ComfyUI's names: PhotoMakerLoader reads an ID encoder from models/photomaker, PhotoMakerEncode
fuses a person's photos into an SDXL prompt's class word (`ldm.photomaker`).

PHOTOMAKER is a loaded ID encoder; its weights are the model cache's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.conditioning import embedding_vectors
from nodes.sd.loaders import model_file, model_path, shared_file_model
from nodes.sd.models import HANDLE_SIZE, Clip, file_fingerprint, on_device
from nodes.spec import Output, Socket, String


@dataclass(frozen=True, eq=False)
class PhotoMaker:
    """PHOTOMAKER: a loaded ID encoder (ldm.photomaker.PhotoMakerIDEncoder)."""

    model: torch.nn.Module
    source: str

    def cache_size(self) -> int:
        return HANDLE_SIZE


class PhotoMakerLoader(Node):
    """Loads a PhotoMaker v1 ID encoder (photomaker-v1.bin, or a safetensors conversion) from models/photomaker.
    The LoRA inside the file is not applied, as in ComfyUI."""

    category = "_for_testing/photomaker"
    photomaker_model_name = model_file("photomaker")
    outputs = (Output("PHOTOMAKER"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("photomaker", str(inputs.get("photomaker_model_name", ""))))

    def execute(self, photomaker_model_name: str) -> tuple[PhotoMaker]:
        from ldm.photomaker import load_photomaker

        path = model_path("photomaker", photomaker_model_name)
        return (PhotoMaker(shared_file_model(self, "photomaker", path, load_photomaker), photomaker_model_name),)


class PhotoMakerEncode(Node):
    """Encodes an SDXL prompt with the person in the photos fused into the class word before the trigger word
    "photomaker" ("photograph of a man photomaker"), which is dropped. Each photo of a batch stacks one copy of the
    class word. A prompt without the trigger word is encoded as it is."""

    category = "_for_testing/photomaker"
    photomaker = Socket("PHOTOMAKER")
    image = Socket("IMAGE")
    clip = Socket("CLIP")
    text = String("photograph of photomaker", multiline=True,
                  tooltip="the prompt: a class word (man, woman, girl, boy...) then the trigger word photomaker")
    outputs = (Output("CONDITIONING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        """A CLIP from a checkpoint of another family is refused before the run (the server answers 400)."""
        family = linked.get("clip", {}).get("family")
        if family is None or family == "sdxl":
            return None
        return (f"PhotoMaker fuses into SDXL prompts and this CLIP is {family.upper()}'s: load an SDXL checkpoint's "
                "CLIP")

    def execute(self, photomaker: PhotoMaker, image: torch.Tensor, clip: Clip, text: str) -> tuple[list]:
        from ldm.photomaker import encode_with_id

        encoder = on_device(self.ctx, clip.encoder)
        id_encoder = on_device(self.ctx, photomaker.model, keep=(clip.encoder,))
        with torch.inference_mode():
            encoding = encode_with_id(id_encoder, encoder, text, image, clip_skip=clip.clip_skip,
                                      embeddings=embedding_vectors)
        return ([(encoding.cond.float().cpu(), {"pooled_output": encoding.pooled.float().cpu()})],)


NODES: list[Any] = [PhotoMakerLoader, PhotoMakerEncode]
