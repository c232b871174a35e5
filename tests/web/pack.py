"""Test-only node types for the server tests: saving a PNG, a slow node with latent previews, a crash marker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nodes.folders import get_paths
from nodes.node import Node, NodeResult
from nodes.registry import NodeRegistry, builtin_registry
from nodes.spec import Combo, Float, Int, Output, Socket, String
from tests.support_nodes import TEST_NODES


class SaveTestImage(Node):
    """Writes a small solid PNG to output/ and shows it, like SaveImage."""

    category = "testing"
    output_node = True
    value = Int(0, min=0, max=255)
    filename_prefix = String("test")

    def execute(self, value: int, filename_prefix: str) -> NodeResult:
        folder = self.ctx.services.paths.output
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{filename_prefix}_{value:03d}_{time.time_ns()}.png"
        Image.new("RGB", (8, 8), (value, 255 - value, 128)).save(folder / name)
        return NodeResult(ui={"images": [{"filename": name, "subfolder": "", "type": "output"}]})


class SlowPreview(Node):
    """Counts `steps` steps of `delay` seconds, reporting a latent-shaped preview on each."""

    category = "testing"
    value = Socket("INT")
    steps = Int(5, min=1, max=100000)
    delay = Float(0.01, min=0.0, max=10.0)
    outputs = (Output("INT"),)

    def execute(self, value: int, steps: int, delay: float) -> tuple[int]:
        rng = np.random.default_rng(value)
        for i in range(steps):
            time.sleep(delay)
            self.ctx.progress(i + 1, steps, rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
        return (value,)


class Marker(Node):
    """Appends a line to `path` when it starts, then waits `seconds` (interruptible): counts runs across kills."""

    category = "testing"
    output_node = True
    cacheable = False
    path = String("")
    seconds = Float(0.0, min=0.0, max=600.0)
    started = threading.Event()

    def execute(self, path: str, seconds: float) -> NodeResult:
        with open(path, "a") as handle:
            handle.write("start\n")
        Marker.started.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.ctx.check_interrupt()
            time.sleep(0.01)
        return NodeResult(ui={"text": [Path(path).read_text().count("start")]})


def _input_images() -> list[str]:
    folder = get_paths().input
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png") if folder.is_dir() else []


class LoadTestImage(Node):
    """Like LoadImage: a combo of the images in input/, with an upload button in the editor."""

    category = "testing"
    image = Combo(_input_images, image_upload=True)
    outputs = (Output("INT", "width"),)

    def execute(self, image: str) -> tuple[int]:
        with Image.open(self.ctx.services.paths.input / image) as picture:
            return (picture.width,)


WEB_TEST_NODES = [SaveTestImage, SlowPreview, Marker, LoadTestImage]


def add_test_nodes(registry: NodeRegistry) -> NodeRegistry:
    """The engine tests' nodes and these."""
    registry.register_all(TEST_NODES, "tests")
    registry.register_all(WEB_TEST_NODES, "tests.web")
    return registry


def web_registry() -> NodeRegistry:
    return add_test_nodes(builtin_registry())
