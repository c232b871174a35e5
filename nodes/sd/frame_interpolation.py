"""Frame interpolation: FrameInterpolationModelLoader and FrameInterpolate (RIFE 4.x and FILM), as ComfyUI's
nodes_frame_interpolation.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.loaders import model_file, model_path, shared_model
from nodes.sd.models import HANDLE_SIZE, device_and_dtype, file_fingerprint, load_device, on_device
from nodes.spec import Boolean, Int, Output, Socket

MODEL_TYPE = "FRAME_INTERPOLATION_MODEL"


@dataclass(frozen=True, eq=False)
class FrameInterpolationModelHandle:
    """FRAME_INTERPOLATION_MODEL: a loaded RIFE or FILM network (its weights belong to the model cache)."""

    model: Any  # ldm.frame_interpolation.FrameInterpolationModel

    def cache_size(self) -> int:
        return HANDLE_SIZE


class FrameInterpolationModelLoader(Node):
    """Loads a frame interpolation model from models/frame_interpolation: RIFE 4.x (five IFBlocks; ComfyUI's
    safetensors or the raw flownet.pkl) or FILM, told apart by their weights."""

    display_name = "Load Frame Interpolation Model"
    category = "loaders"
    model_name = model_file("frame_interpolation")
    outputs = (Output(MODEL_TYPE),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("frame_interpolation", str(inputs.get("model_name", ""))))

    def execute(self, model_name: str) -> tuple[FrameInterpolationModelHandle]:
        from ldm.frame_interpolation import load_frame_interpolation_model

        path = model_path("frame_interpolation", model_name)
        _, engine_dtype, _ = device_and_dtype(self.ctx)
        # As ComfyUI: fp16 where the engine runs fp16, else fp32 (never bf16).
        dtype = torch.float16 if engine_dtype == torch.float16 else torch.float32
        device = load_device(self.ctx)
        key = ("frame_interpolation", str(path), str(file_fingerprint(path)), str(device), str(dtype))

        def load() -> Any:
            loaded = load_frame_interpolation_model(path)
            loaded.model.to(device=device, dtype=dtype)
            return loaded

        return (FrameInterpolationModelHandle(shared_model(self, key, load)),)


class FrameInterpolate(Node):
    """Puts `multiplier - 1` frames between each pair of frames: N frames become (N - 1) * multiplier + 1, the
    originals kept at every multiplier-th place. A single frame is returned as it is."""

    display_name = "Frame Interpolate"
    category = "image/video"
    model = Socket(MODEL_TYPE)
    images = Socket("IMAGE")
    multiplier = Int(2, min=2, max=16)
    torch_compile = Boolean(False, optional=True, extra={"advanced": True},
                            tooltip="Requires triton. Compile model submodules for potential speed increase. Adds "
                                    "warmup on first run, recompiles on resolution change.")
    outputs = (Output("IMAGE"),)

    def execute(self, model: FrameInterpolationModelHandle, images: torch.Tensor, multiplier: int,
                torch_compile: bool = False) -> tuple[torch.Tensor]:
        from ldm.frame_interpolation import FILMNet, interpolate_frames

        if images.shape[0] < 2 or multiplier < 2:
            return (images,)
        if images.shape[-1] != 3:
            raise ValueError(f"FrameInterpolate: the images have {images.shape[-1]} channels; RIFE and FILM take RGB "
                             "(3 channels): drop the alpha channel first")
        net = model.model.model
        levels = 2 ** (FILMNet.pyramid_levels - 1)
        if isinstance(net, FILMNet) and min(images.shape[1:3]) < levels:
            raise ValueError(f"FrameInterpolate: FILM needs frames at least {levels} pixels on each side (its "
                             f"{FILMNet.pyramid_levels}-level pyramid); these are {images.shape[2]}x{images.shape[1]}"
                             ": scale them up first")
        # torch_compile is accepted for ComfyUI's workflows; the networks run eagerly here.
        module = on_device(self.ctx, net)
        parameter = next(module.parameters())
        frames = images.movedim(-1, 1).to(dtype=parameter.dtype)
        total = (images.shape[0] - 1) * (multiplier - 1)

        def step(done: int) -> None:
            self.ctx.check_interrupt()
            self.ctx.progress(done, total)

        with torch.inference_mode():
            out = interpolate_frames(module, frames, multiplier, parameter.device, step)
        return (out.movedim(1, -1).float().clamp(0.0, 1.0),)


NODES: list[Any] = [FrameInterpolationModelLoader, FrameInterpolate]
