"""`Pipeline`: txt2img, img2img and inpainting as graphs run by the same executor as the CLI and server.

    from loom import Pipeline
    pipe = Pipeline.from_checkpoint("models/checkpoints/x.safetensors")
    image = pipe.generate("a beautiful sunset over mountains", num_steps=50)

The command line's device options are `options=EngineOptions(...)` here, e.g.
`Pipeline(path, options=EngineOptions(weights_dtype="fp8", compile=True))`.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.devices import EngineOptions
from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import NATIVE_RESOLUTION
from nodes.folders import FolderPaths, get_paths, set_paths
from nodes.registry import builtin_registry

DEFAULT_SIZES = NATIVE_RESOLUTION
# LoRA files, each alone (strength 1) or as (file, strength); one file alone is a LoRA too.
Loras = str | Path | Sequence[str | Path | tuple[str | Path, float]]


@dataclass
class Result:
    images: list[Any]  # PIL images
    workflow: dict[str, Any]  # the API-format graph that made them, to save or open in the editor


class Pipeline:
    """One checkpoint, one engine. Calls share the engine's caches: a second call with a new seed
    re-runs only the sampler and what follows it."""

    def __init__(self, checkpoint: str | Path, *, paths: FolderPaths | None = None, cpu: bool = False,
                 options: EngineOptions | None = None) -> None:
        self.checkpoint = Path(checkpoint).resolve()
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        self.paths = paths or get_paths()
        self.paths.first_model_paths.setdefault("checkpoints", []).insert(0, self.checkpoint.parent)
        set_paths(self.paths)
        services = Services.create(self.paths, force_cpu=cpu, options=options)
        self.executor = Executor(builtin_registry(), services=services)
        self.default_size = _default_size(self.checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs: Any) -> Pipeline:
        return cls(path, **kwargs)

    # --- the calls -------------------------------------------------------------------------------------

    def generate(self, prompt: str, **kwargs: Any) -> Any:
        """One image for a prompt."""
        return self.sample(prompt, **kwargs)[0]

    def sample(self, prompt: str, *, negative_prompt: str = "", num_steps: int = 50, guidance_scale: float = 7.5,
               seed: int | None = None, sampler: str = "euler", scheduler: str = "normal",
               width: int | None = None, height: int | None = None, batch_size: int = 1,
               controlnet: str | Path | None = None, control_image: Any = None, control_strength: float = 1.0,
               loras: Loras = (), return_workflow: bool = False) -> list[Any] | Result:
        """txt2img: `batch_size` images for a prompt; with `controlnet` (a ControlNet file) and
        `control_image` (its hint: an edge map, depth map... as a PIL image), guided by the hint; with
        `loras` (LoRA files, or (file, strength) pairs), through them, in order."""
        graph = self._base(prompt, negative_prompt, num_steps, guidance_scale, seed, sampler, scheduler, 1.0, loras)
        self._control(graph, controlnet, control_image, control_strength)
        graph["5"] = _node("EmptyLatentImage", width=width or self.default_size,
                           height=height or self.default_size, batch_size=batch_size)
        return self._run(graph, return_workflow)

    def img2img(self, init_image: Any, prompt: str, *, strength: float = 0.75, num_steps: int = 30,
                negative_prompt: str = "", guidance_scale: float = 7.5, seed: int | None = None,
                sampler: str = "euler", scheduler: str = "normal", loras: Loras = (),
                return_workflow: bool = False) -> Any:
        """Repaint an image towards a prompt; `strength` 0 keeps it, 1 ignores it."""
        graph = self._base(prompt, negative_prompt, num_steps, guidance_scale, seed, sampler, scheduler, strength,
                           loras)
        graph["10"] = _node("LoadImage", image=self._store_input(init_image))
        graph["5"] = _node("VAEEncode", pixels=["10", 0], vae=["4", 2])
        result = self._run(graph, return_workflow)
        return result if return_workflow else result[0]

    def inpaint(self, init_image: Any, mask: Any, prompt: str, *, num_steps: int = 30, negative_prompt: str = "",
                guidance_scale: float = 7.5, seed: int | None = None, sampler: str = "euler",
                scheduler: str = "normal", grow_mask_by: int = 6, loras: Loras = (),
                return_workflow: bool = False) -> Any:
        """Repaint where `mask` is white (a PIL image, same size as `init_image`), keep the rest."""
        from PIL import Image

        rgba = init_image.convert("RGB").convert("RGBA")
        rgba.putalpha(Image.eval(mask.convert("L").resize(rgba.size), lambda v: 255 - v))
        graph = self._base(prompt, negative_prompt, num_steps, guidance_scale, seed, sampler, scheduler, 1.0, loras)
        graph["10"] = _node("LoadImage", image=self._store_input(rgba))
        graph["5"] = _node("VAEEncodeForInpaint", pixels=["10", 0], vae=["4", 2], mask=["10", 1],
                           grow_mask_by=grow_mask_by)
        result = self._run(graph, return_workflow)
        return result if return_workflow else result[0]

    # --- graph building ---------------------------------------------------------------------------------

    def _control(self, graph: dict[str, Any], controlnet: str | Path | None, image: Any, strength: float) -> None:
        """Put Load ControlNet Model and Apply ControlNet between the prompts and the sampler."""
        if controlnet is None and image is None:
            return
        if controlnet is None or image is None:
            raise ValueError("a ControlNet needs both `controlnet` (its file) and `control_image` (the hint)")
        name = self._model_name("controlnet", controlnet, "ControlNet")
        graph["11"] = _node("ControlNetLoader", control_net_name=name)
        graph["12"] = _node("LoadImage", image=self._store_input(image))
        graph["13"] = _node("ControlNetApplyAdvanced", positive=["6", 0], negative=["7", 0], control_net=["11", 0],
                            image=["12", 0], strength=strength, start_percent=0.0, end_percent=1.0)
        graph["3"]["inputs"].update(positive=["13", 0], negative=["13", 1])

    def _model_name(self, kind: str, file: str | Path, what: str) -> str:
        """The name a loader node knows `file` by: its folder goes first among the `kind` folders searched
        (before ./models, so a file of the same name there cannot stand in for it)."""
        path = Path(file).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{what} {file} not found")
        folders = self.paths.first_model_paths.setdefault(kind, [])
        if path.parent in folders:
            folders.remove(path.parent)
        folders.insert(0, path.parent)
        return path.name

    def _base(self, prompt: str, negative: str, steps: int, cfg: float, seed: int | None, sampler: str,
              scheduler: str, denoise: float, loras: Loras = ()) -> dict[str, Any]:
        model, clip = ["4", 0], ["4", 1]
        graph = {"4": _node("CheckpointLoaderSimple", ckpt_name=self.checkpoint.name)}
        one = isinstance(loras, (str, Path)) or (isinstance(loras, tuple) and len(loras) == 2
                                                 and isinstance(loras[1], (int, float)))
        files = [lora if isinstance(lora, (tuple, list)) else (lora, 1.0) for lora in ([loras] if one else loras)]
        names = [Path(file).name for file, _ in files]
        if len({Path(file).resolve() for file, _ in files}) != len(set(names)):
            raise ValueError(f"LoRAs of the same file name from different folders in one call ({names}): the "
                             "loader knows them by name, so rename one")
        for i, (file, strength) in enumerate(files):
            node = f"2{i}"  # Load LoRA nodes "20", "21", ... chained between the checkpoint and its users
            graph[node] = _node("LoraLoader", model=model, clip=clip, lora_name=self._model_name("loras", file, "LoRA"),
                                strength_model=strength, strength_clip=strength)
            model, clip = [node, 0], [node, 1]
        return {
            **graph,
            "6": _node("CLIPTextEncode", text=prompt, clip=clip),
            "7": _node("CLIPTextEncode", text=negative, clip=clip),
            "3": _node("KSampler", model=model, seed=random.getrandbits(48) if seed is None else seed,
                       steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, positive=["6", 0],
                       negative=["7", 0], latent_image=["5", 0], denoise=denoise),
            "8": _node("VAEDecode", samples=["3", 0], vae=["4", 2]),
            "9": _node("PreviewImage", images=["8", 0]),
        }

    def _store_input(self, image: Any) -> str:
        """Put a PIL image into input/ under a content-addressed name, so LoadImage can read it."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        name = f"api/{hashlib.sha256(data).hexdigest()[:16]}.png"
        path = self.paths.input / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return name

    def _run(self, graph: dict[str, Any], return_workflow: bool) -> list[Any] | Result:
        from nodes.sd.imageio import to_pil

        result = self.executor.run(parse_api(graph), keep=["8"])
        if not result.ok:
            err = result.error
            raise RuntimeError(f"node {err.node_id} ({err.node_type}) failed: "
                               f"{getattr(err, 'exception_message', 'interrupted')}")
        images = [to_pil(image) for image in result.values["8"][0]]
        return Result(images, graph) if return_workflow else images


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def _default_size(checkpoint: Path) -> int:
    """The resolution the model was trained at: file metadata if it says, else by family."""
    from ldm.checkpoint import detect_family, load_state_dict, peek_family, read_metadata

    metadata = read_metadata(checkpoint)
    if "loom.resolution" in metadata:
        return int(metadata["loom.resolution"])
    # A .safetensors header says the family without reading gigabytes; a .ckpt must be loaded.
    family = peek_family(checkpoint) or detect_family(load_state_dict(checkpoint), metadata)
    return DEFAULT_SIZES.get(family.name, 512)
