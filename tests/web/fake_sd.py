"""Stand-ins for the Stable Diffusion nodes (REFERENCE.md section 6 signatures), for the editor's txt2img test.

They are registered only where the real nodes are not, and make a small image from the prompt's
text without any model, so that the browser test runs the default graph end to end.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
from PIL import Image, PngImagePlugin

from nodes.folders import get_paths
from nodes.node import Node, NodeResult
from nodes.registry import NodeRegistry
from nodes.spec import INT_MAX, Combo, Float, Int, Output, Socket, String


def _checkpoints() -> list[str]:
    return get_paths().list_models("checkpoints")


class CheckpointLoaderSimple(Node):
    category = "loaders"
    ckpt_name = Combo(_checkpoints)
    outputs = (Output("MODEL"), Output("CLIP"), Output("VAE"))

    def execute(self, ckpt_name: str) -> tuple[str, str, str]:
        return (ckpt_name, ckpt_name, ckpt_name)


class CLIPTextEncode(Node):
    category = "conditioning"
    text = String("", multiline=True)
    clip = Socket("CLIP")
    outputs = (Output("CONDITIONING"),)

    def execute(self, text: str, clip: str) -> tuple[str]:
        return (text,)


class EmptyLatentImage(Node):
    category = "latent"
    width = Int(512, min=16, max=16384, step=8)
    height = Int(512, min=16, max=16384, step=8)
    batch_size = Int(1, min=1, max=4096)
    outputs = (Output("LATENT"),)

    def execute(self, width: int, height: int, batch_size: int) -> tuple[dict]:
        return ({"samples": np.zeros((batch_size, 4, height // 8, width // 8), dtype=np.float32)},)


class KSampler(Node):
    category = "sampling"
    model = Socket("MODEL")
    seed = Int(0, min=0, max=INT_MAX, control_after_generate=True)
    steps = Int(20, min=1, max=10000)
    cfg = Float(8.0, min=0.0, max=100.0, step=0.1)
    sampler_name = Combo(["euler", "dpmpp_2m"])
    scheduler = Combo(["normal", "karras"])
    positive = Socket("CONDITIONING")
    negative = Socket("CONDITIONING")
    latent_image = Socket("LATENT")
    denoise = Float(1.0, min=0.0, max=1.0, step=0.01)
    outputs = (Output("LATENT"),)

    def execute(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise):
        rng = np.random.default_rng(int(hashlib.sha256(f"{positive}{seed}".encode()).hexdigest()[:8], 16))
        samples = latent_image["samples"]
        for step in range(steps):
            samples = samples * 0.8 + rng.standard_normal(samples.shape).astype(np.float32) * 0.2
            time.sleep(0.02)
            self.ctx.progress(step + 1, steps, samples)
        return ({"samples": samples},)


class VAEDecode(Node):
    category = "latent"
    samples = Socket("LATENT")
    vae = Socket("VAE")
    outputs = (Output("IMAGE"),)

    def execute(self, samples: dict, vae: str) -> tuple[np.ndarray]:
        latent = samples["samples"]
        rgb = np.clip(latent[:, :3].transpose(0, 2, 3, 1) * 0.5 + 0.5, 0, 1)
        return (np.repeat(np.repeat(rgb, 8, axis=1), 8, axis=2),)


class SaveImage(Node):
    category = "image"
    output_node = True
    images = Socket("IMAGE")
    filename_prefix = String("ComfyUI")

    def execute(self, images: np.ndarray, filename_prefix: str) -> NodeResult:
        folder = self.ctx.services.paths.output
        folder.mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        workflow = (self.ctx.extra.get("extra_pnginfo") or {}).get("workflow")
        if workflow is not None:
            info.add_text("workflow", json.dumps(workflow))
        saved = []
        for i, image in enumerate(images):
            name = f"{filename_prefix}_{time.time_ns()}_{i}.png"
            Image.fromarray((image * 255).astype(np.uint8)).save(folder / name, pnginfo=info)
            saved.append({"filename": name, "subfolder": "", "type": "output"})
        return NodeResult(ui={"images": saved})


FAKE_SD_NODES = [CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage]


def register_missing(registry: NodeRegistry) -> None:
    registry.register_all([cls for cls in FAKE_SD_NODES if cls.name not in registry], "tests.web.fake_sd")
