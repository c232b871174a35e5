"""ControlNets for SD3 and SD3.5: ControlNetApplySD3 ("Apply Controlnet with VAE"), Apply ControlNet with the VAE
that encodes the hint into the latent space (`ldm.controlnet_sd3`). The ControlNet itself loads with Load ControlNet
Model."""

from __future__ import annotations

from typing import Any

import torch

from nodes.node import Node
from nodes.sd.controlnet import ControlNetModel, attach, conditioning_facts, control_family_problem
from nodes.sd.models import Vae
from nodes.spec import Float, Output, Socket


class ControlNetApplySD3(Node):
    """Guides sampling with a ControlNet on both prompts over part of the schedule; the VAE encodes the hint for
    ControlNets that take latents (SD3's). Other ControlNets act as in Apply ControlNet."""

    display_name = "Apply Controlnet with VAE"
    category = "conditioning/controlnet"
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    control_net = Socket("CONTROL_NET")
    vae = Socket("VAE")
    image = Socket("IMAGE", tooltip="the hint: a preprocessed image (edges, depth map, pose...) in 0..1")
    strength = Float(1.0, min=0.0, max=10.0, step=0.01)
    start_percent = Float(0.0, min=0.0, max=1.0, step=0.001)
    end_percent = Float(1.0, min=0.0, max=1.0, step=0.001)
    outputs = (Output("CONDITIONING", name="positive"), Output("CONDITIONING", name="negative"))

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        return control_family_problem(linked, ("positive", "negative"))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return conditioning_facts(linked, ("positive", "negative"))

    def execute(self, positive: list, negative: list, control_net: ControlNetModel, vae: Vae, image: torch.Tensor,
                strength: float, start_percent: float, end_percent: float) -> tuple[list, list]:
        if strength == 0:
            return positive, negative
        positive, negative = attach([positive, negative], control_net, image, strength, start_percent, end_percent,
                                    vae=vae)
        return positive, negative


NODES: list[Any] = [ControlNetApplySD3]
