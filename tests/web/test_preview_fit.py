"""Step previews of 16-channel latents in colour through the real server path: a tiny Flux model sampled by
KSampler, its previews coloured by the map fitted to its VAE (ldm.latent_preview) and sent over the websocket."""

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.flux_presets import TINY_FLUX_VAE, make_flux_files
from ldm.latent_preview import LatentPreview, fit_for
from nodes.folders import FolderPaths, set_paths
from tests.web.test_websocket import collect_until_done
from web.previews import encode_preview, preview_rgb

DEMO = Path(__file__).parents[2] / "assets" / "models" / "checkpoints" / "loom-demo.safetensors"
FLUX_PROMPT = {
    "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-dev.safetensors", "weight_dtype": "default"}},
    "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                     "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
    "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-tiny.safetensors"}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red circle"}},
    "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 3, "cfg": 1.0,
                                               "sampler_name": "euler", "scheduler": "simple",
                                               "positive": ["4", 0], "negative": ["4", 0],
                                               "latent_image": ["5", 0], "denoise": 1.0}},
    "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
    "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
}


def colour_spread(frame: bytes) -> float:
    """The mean over pixels of max(R, G, B) - min(R, G, B) of a preview frame's JPEG: about 0 for grey."""
    assert struct.unpack(">II", frame[:8]) == (1, 1)  # REFERENCE.md section 5: preview image, JPEG
    rgb = np.asarray(Image.open(io.BytesIO(frame[8:])).convert("RGB"), dtype=np.float32)
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())


async def test_a_flux_latent_previews_in_colour_over_the_websocket(paths, client):
    make_flux_files(paths.base / "models", "dev", seed=2)
    async with client.ws_connect("/ws?clientId=flux") as ws:
        await ws.receive_json()
        reply = await client.post("/prompt", json={"prompt": FLUX_PROMPT, "client_id": "flux"})
        body = await reply.json()
        messages, frames = await collect_until_done(ws, body["prompt_id"], timeout=60.0)
    assert not [m for m in messages if m["type"] == "execution_error"], messages
    assert len(frames) == 3  # one per step
    assert all(colour_spread(frame) > 4.0 for frame in frames)
    # The VAE loader fitted its VAE, and previews of Flux latents use that map (without it: grey).
    fit = fit_for(TINY_FLUX_VAE)
    assert fit is not None and fit.matrix.shape == (17, 3)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert colour_spread(encode_preview(latent)) < 1.0
    coloured = preview_rgb(LatentPreview(latent, fit.matrix))
    assert coloured.shape == (8, 8, 3) and np.ptp(coloured.astype(int), axis=-1).mean() > 4.0


def checkpoint_prompt(checkpoint: str, latent: str) -> dict:
    """Load Checkpoint, one prompt, two KSampler steps on a 64-px latent of `latent`'s node type."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
            "3": {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "simple",
                                                       "positive": ["2", 0], "negative": ["2", 0],
                                                       "latent_image": ["3", 0], "denoise": 1.0}}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine over the bundled SD1-style demo model and tiny SD3 and Flux checkpoints (names by family)."""
    from executor.executor import Executor
    from executor.services import Services
    from ldm.sd3_presets import make_sd3_files
    from nodes.registry import builtin_registry

    root = tmp_path_factory.mktemp("preview_families")
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "demo.safetensors").symlink_to(DEMO)
    names = {"sd1": "demo.safetensors", "sd3": make_sd3_files(models, seed=1)["checkpoint"].name,
             "flux": make_flux_files(models, "schnell", seed=1)["checkpoint"].name}
    folders = FolderPaths(base=root, bundled_models=None)
    set_paths(folders)
    yield Executor(builtin_registry(), services=Services.create(folders)), names
    set_paths(FolderPaths())


def run_with_previews(engine, doc: dict, output: str, keep: list[str]) -> tuple[dict, list[LatentPreview]]:
    from graph.document import parse_api

    shown: list = []
    result = engine.run(parse_api(doc), outputs=[output], keep=keep,
                        on_event=lambda e: shown.append(getattr(e, "preview", None)))
    assert result.ok, result.error
    return result.values, [p for p in shown if p is not None]


@pytest.mark.parametrize("family, latent, channels", [("sd1", "EmptyLatentImage", 4),
                                                      ("sd3", "EmptySD3LatentImage", 16),
                                                      ("flux", "EmptySD3LatentImage", 16)])
def test_each_family_samples_with_the_map_of_its_own_vae(engine, family, latent, channels):
    """The sampler's previews carry the map fitted to the checkpoint's VAE, turned into the model's latent space:
    applied to the model's latents it gives the VAE-space fit's colours of the same latents."""
    from ldm.latent_preview import apply_rgb_map

    executor, names = engine
    values, shown = run_with_previews(executor, checkpoint_prompt(names[family], latent), "4", ["1"])
    model, _, vae = values["1"]
    assert len(shown) == 2 and all(isinstance(p, LatentPreview) for p in shown)
    fit = fit_for(vae.vae.config)
    assert fit is not None and shown[0].rgb_map.shape == (channels + 1, 3)
    x = shown[-1].latent[0]
    z = model.latent_out(shown[-1].latent)[0]  # the same latent as the VAE sees it
    np.testing.assert_allclose(apply_rgb_map(x.numpy(), shown[-1].rgb_map), apply_rgb_map(z.numpy(), fit.matrix),
                               atol=1e-4)


def test_the_bundled_models_previews_resemble_its_final_image(engine):
    """The demo model's last step preview, through its VAE's fitted map, against its decoded image pooled to latent
    size: closer than SD1's table or grey (RMS 0.16 against 0.39 and 0.40 over 20 steps)."""
    from ldm.latent_preview import SD1_RGB_MAP, apply_rgb_map, pooled

    executor, names = engine
    doc = {**checkpoint_prompt(names["sd1"], "EmptyLatentImage"),
           "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}}}
    doc["2"]["inputs"]["text"] = "a red circle on a blue background"
    doc["4"]["inputs"].update(steps=10, cfg=2.0, scheduler="normal")
    values, shown = run_with_previews(executor, doc, "5", ["5"])
    final = pooled(values["5"][0].movedim(-1, 1), 8)[0].permute(1, 2, 0).numpy()
    x = shown[-1].latent[0].numpy()
    grey = np.repeat(((x.mean(0) - x.mean(0).min()) / np.ptp(x.mean(0)))[..., None], 3, axis=-1)
    fitted, table, grey = (float(np.sqrt(((rgb - final) ** 2).mean()))
                           for rgb in (apply_rgb_map(x, shown[-1].rgb_map), apply_rgb_map(x, SD1_RGB_MAP), grey))
    assert fitted < 0.6 * table and fitted < 0.6 * grey and fitted < 0.25
