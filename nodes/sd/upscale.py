"""Upscale models: UpscaleModelLoader and ImageUpscaleWithModel (ESRGAN family, compact, SPAN, SwinIR, HAT, DAT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.loaders import model_file, model_path, shared_model
from nodes.sd.models import HANDLE_SIZE, device_and_dtype, file_fingerprint, load_device, on_device
from nodes.spec import Output, Socket

TILE, OVERLAP = 512, 32  # ComfyUI's tiling for ImageUpscaleWithModel


@dataclass(frozen=True, eq=False)
class UpscaleModelHandle:
    """UPSCALE_MODEL: a loaded upscale model (its weights belong to the model cache)."""

    model: Any  # ldm.upscale.UpscaleModel

    def cache_size(self) -> int:
        return HANDLE_SIZE


class UpscaleModelLoader(Node):
    """Loads an image upscale model from models/upscale_models: ESRGAN, Real-ESRGAN, BSRGAN and the community
    4x models built on them, Real-ESRGAN's compact models, SPAN, SwinIR, HAT and DAT (.pth or .safetensors)."""

    display_name = "Load Upscale Model"
    category = "loaders"
    model_name = model_file("upscale_models")
    outputs = (Output("UPSCALE_MODEL"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("upscale_models", str(inputs.get("model_name", ""))))

    def execute(self, model_name: str) -> tuple[UpscaleModelHandle]:
        from ldm.upscale import load_upscale_model

        path = model_path("upscale_models", model_name)
        _, dtype, _ = device_and_dtype(self.ctx)
        device = load_device(self.ctx)
        key = ("upscale", str(path), str(file_fingerprint(path)), str(device), str(dtype))

        def load() -> Any:
            loaded = load_upscale_model(path)
            # The transformer upscalers overflow in fp16: those run in fp32 where the engine would use fp16.
            half_unsafe = dtype == torch.float16 and not loaded.supports_half
            loaded.model.to(device=device, dtype=torch.float32 if half_unsafe else dtype)
            return loaded

        return (UpscaleModelHandle(shared_model(self, key, load)),)


class ImageUpscaleWithModel(Node):
    """Upscales images by the model's factor, in overlapping tiles so that any size fits in memory."""

    display_name = "Upscale Image (using Model)"
    category = "image/upscaling"
    upscale_model = Socket("UPSCALE_MODEL")
    image = Socket("IMAGE")
    outputs = (Output("IMAGE"),)

    def execute(self, upscale_model: UpscaleModelHandle, image: torch.Tensor) -> tuple[torch.Tensor]:
        from ldm.upscale import tiled_upscale

        loaded = upscale_model.model
        module = on_device(self.ctx, loaded.model)
        parameter = next(module.parameters())
        pixels = image[..., :3].movedim(-1, 1).to(parameter.device, parameter.dtype)
        total = len(pixels)
        out = []
        with torch.inference_mode():
            for i in range(total):  # one image at a time: an upscaled batch is large
                self.ctx.check_interrupt()
                out.append(tiled_upscale(module, pixels[i:i + 1], loaded.scale, TILE, OVERLAP).float().cpu())
                self.ctx.progress(i + 1, total)
        return (torch.cat(out).clamp(0, 1).movedim(1, -1),)


NODES: list[Any] = [UpscaleModelLoader, ImageUpscaleWithModel]
