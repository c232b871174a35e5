"""The example pack's nodes: invert an image, make a colour swatch, paint an image from a swatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nodes.node import Node
from nodes.spec import Float, Int, Output, Socket, String


@dataclass(frozen=True)
class Swatch:
    """What flows along a SWATCH link: one RGB colour, channels in 0..1."""

    red: float
    green: float
    blue: float


class ExampleInvert(Node):
    """Inverts an image: 1 - pixel, blended with the original by `strength`."""

    display_name = "Invert Image (example)"
    category = "examples/image"
    image = Socket("IMAGE", tooltip="float32 [batch, height, width, channels] in 0..1")
    strength = Float(1.0, min=0.0, max=1.0, step=0.05)
    outputs = (Output("IMAGE"),)

    def execute(self, image: torch.Tensor, strength: float) -> tuple[torch.Tensor]:
        out = torch.empty_like(image)
        for i in range(image.shape[0]):
            out[i] = image[i] + strength * (1.0 - 2.0 * image[i])
            # One step per picture: the editor shows progress, and a stop request ends the batch here.
            self.ctx.progress(i + 1, image.shape[0])
        return (out,)


class ExampleSwatch(Node):
    """A colour from a hex code such as #ff8800."""

    display_name = "Colour Swatch (example)"
    category = "examples/colour"
    hex_colour = String("#ff8800")
    outputs = (Output("SWATCH", "swatch"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        code = str(inputs.get("hex_colour", "")).lstrip("#")
        if len(code) != 6 or any(c not in "0123456789abcdefABCDEF" for c in code):
            return f"hex_colour must look like #rrggbb, not {inputs.get('hex_colour')!r}"
        return None

    def execute(self, hex_colour: str) -> tuple[Swatch]:
        code = hex_colour.lstrip("#")
        red, green, blue = (int(code[i:i + 2], 16) / 255 for i in (0, 2, 4))
        return (Swatch(red, green, blue),)


class ExampleSwatchImage(Node):
    """An image filled with a swatch's colour."""

    display_name = "Swatch to Image (example)"
    category = "examples/colour"
    swatch = Socket("SWATCH")
    width = Int(64, min=1, max=4096, step=8)
    height = Int(64, min=1, max=4096, step=8)
    batch_size = Int(1, min=1, max=64)
    outputs = (Output("IMAGE"),)

    def execute(self, swatch: Swatch, width: int, height: int, batch_size: int) -> tuple[torch.Tensor]:
        colour = torch.tensor([swatch.red, swatch.green, swatch.blue], dtype=torch.float32)
        return (colour.expand(batch_size, height, width, 3).clone(),)


NODES = [ExampleInvert, ExampleSwatch, ExampleSwatchImage]
