"""Attention patches of the UNet: TomePatchModel (token merging) and HypernetworkLoader (A1111 hypernetworks). Each
returns a patched copy of the MODEL; the one it was given (which the cache may hold) is left as it was."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nodes.folders import get_paths
from nodes.node import Node
from nodes.sd.loaders import model_file, model_path, shared_model
from nodes.sd.models import DiffusionModel, file_fingerprint
from nodes.spec import Float, Output, Socket


class TomePatchModel(Node):
    """Token Merging (Bolya & Hoffman 2023): the self-attention of the full-resolution transformers runs the queries
    of `ratio` fewer tokens, each merged into its most similar neighbour: faster on large images, at a small cost
    in detail. Does nothing on SDXL, which has no transformers at full resolution."""

    category = "_for_testing"
    model = Socket("MODEL")
    ratio = Float(0.3, min=0.0, max=1.0, step=0.01)
    outputs = (Output("MODEL"),)

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, ratio: float) -> tuple[DiffusionModel]:
        from ldm.tome import TokenMerging

        unet = TokenMerging(ratio).patch(model.unet)
        return (replace(model, unet=unet, loras=(*model.loras, f"ToMe {ratio:g}")),)


class HypernetworkLoader(Node):
    """Applies an A1111 hypernetwork (a .pt file from models/hypernetworks): small networks that rewrite the key and
    value inputs of the UNet's attention layers, scaled by `strength`."""

    category = "loaders"
    model = Socket("MODEL")
    hypernetwork_name = model_file("hypernetworks")
    strength = Float(1.0, min=-10.0, max=10.0, step=0.01)
    outputs = (Output("MODEL"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        return file_fingerprint(get_paths().find_model("hypernetworks", str(inputs.get("hypernetwork_name", ""))))

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {0: linked.get("model", {})}

    def execute(self, model: DiffusionModel, hypernetwork_name: str, strength: float) -> tuple[DiffusionModel]:
        from ldm.hypernetwork import hypernetwork_copy, load_hypernetwork

        path = model_path("hypernetworks", hypernetwork_name)
        hypernetwork = shared_model(self, ("hypernetwork", str(path), str(file_fingerprint(path))),
                                    lambda: load_hypernetwork(path))
        unet = hypernetwork_copy(model.unet, hypernetwork, strength)  # at strength 0 too: it checks the widths
        return (replace(model, unet=unet, loras=(*model.loras, f"hypernetwork {hypernetwork_name} x{strength:g}")),)


NODES: list[Any] = [TomePatchModel, HypernetworkLoader]
