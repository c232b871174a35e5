"""Hint preprocessors for ControlNet workflows that ComfyUI ships in its core: Canny edges."""

from __future__ import annotations

import torch

from nodes.node import Node
from nodes.sd.models import device_and_dtype
from nodes.spec import Float, Output, Socket


class Canny(Node):
    """Canny edge detection (kornia's, which ComfyUI's node runs too): white edges on black, the hint a canny
    ControlNet expects. Thresholds are on gradient magnitudes of the 0..1 image."""

    display_name = "Canny"
    category = "image/preprocessors"
    image = Socket("IMAGE")
    low_threshold = Float(0.4, min=0.01, max=0.99, step=0.01, tooltip="weaker edges are dropped")
    high_threshold = Float(0.8, min=0.01, max=0.99, step=0.01,
                           tooltip="edges at least this strong are kept, with the weaker ones they connect to")
    outputs = (Output("IMAGE"),)

    @classmethod
    def check_inputs(cls, inputs: dict) -> str | None:
        low, high = inputs.get("low_threshold"), inputs.get("high_threshold")
        if isinstance(low, float) and isinstance(high, float) and low > high:
            return f"low_threshold ({low}) must not be above high_threshold ({high})"
        return None

    def execute(self, image: torch.Tensor, low_threshold: float, high_threshold: float) -> tuple[torch.Tensor]:
        try:
            from kornia.filters import canny
        except ImportError:
            raise RuntimeError("the Canny node needs kornia: pip install kornia") from None
        device, _, _ = device_and_dtype(self.ctx)
        with torch.inference_mode():
            _, edges = canny(image[..., :3].to(device, torch.float32).movedim(-1, 1), low_threshold, high_threshold)
        return (edges.cpu().repeat(1, 3, 1, 1).movedim(1, -1),)


NODES = [Canny]
