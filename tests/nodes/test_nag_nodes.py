"""NAGuidance through the executor on tiny random Flux files: ComfyUI's declaration, a negative prompt that acts at
cfg 1, the plain run at scale 1, and the refusal of models Loom does not apply it to."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from ldm.flux_presets import make_flux_files
from ldm.lumina2_presets import make_lumina2_files
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT, SEED, STEPS = 32, 32, 3, 2


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("nag")
    make_flux_files(root / "models", "schnell", seed=2)
    make_checkpoint("tiny-sd1", root / "models" / "checkpoints" / "sd1.safetensors", seed=1)
    make_lumina2_files(root / "models", seed=3, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths))
    set_paths(FolderPaths())


def workflow(nag: tuple[float, float, float] | None, negative: str = "a green square") -> dict:
    doc = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-schnell.safetensors",
                                                     "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                         "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a red circle"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": negative}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
    }
    if nag is not None:
        doc["6"] = {"class_type": "NAGuidance", "inputs": {"model": ["1", 0], "nag_scale": nag[0],
                                                           "nag_alpha": nag[1], "nag_tau": nag[2]}}
        doc["8"]["inputs"]["model"] = ["6", 0]
    return doc


def sample(engine: Executor, doc: dict) -> torch.Tensor:
    result = engine.run(parse_api(doc), outputs=["8"], keep=["8"])
    assert result.ok, result.error
    return result.values["8"][0]["samples"]


def test_declaration_is_comfyuis(engine) -> None:
    info = engine.registry.get("NAGuidance").object_info()
    assert info["display_name"] == "Normalized Attention Guidance" and info["category"] == ""
    assert info["input_order"]["required"] == ["model", "nag_scale", "nag_alpha", "nag_tau"]
    required = info["input"]["required"]
    assert [(required[k][1]["default"], required[k][1]["min"], required[k][1]["max"], required[k][1]["step"])
            for k in ("nag_scale", "nag_alpha", "nag_tau")] == [(5.0, 0.0, 50.0, 0.1), (0.5, 0.0, 1.0, 0.01),
                                                                (1.5, 1.0, 10.0, 0.01)]
    assert info["output"] == ["MODEL"]
    assert info["description"] == ("Applies Normalized Attention Guidance to models, enabling negative prompts on "
                                   "distilled/schnell models.")


def test_negative_prompt_acts_at_cfg_1_with_nag(engine) -> None:
    plain = sample(engine, workflow(None))
    # Without NAG, cfg 1 ignores the negative prompt.
    assert torch.equal(sample(engine, workflow(None, negative="a blue triangle")), plain)
    guided = sample(engine, workflow((5.0, 0.5, 1.5)))
    other = sample(engine, workflow((5.0, 0.5, 1.5), negative="a blue triangle"))
    assert guided.shape == plain.shape and torch.isfinite(guided).all()
    assert float((guided - plain).abs().max()) > 1e-3
    assert float((guided - other).abs().max()) > 1e-3  # the negative prompt's words matter
    # At scale 1 (alpha 0.5) the mix is the positive attention itself: the plain run (batched with the negative,
    # so equal up to the batch's rounding).
    torch.testing.assert_close(sample(engine, workflow((1.0, 0.5, 1.5))), plain, rtol=0, atol=1e-5)


def sd1_workflow(nag: tuple[float, float, float] | None, negative: str) -> dict:
    doc = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
           "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
           "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": negative}},
           "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
           "8": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
                                                      "sampler_name": "euler", "scheduler": "normal",
                                                      "positive": ["3", 0], "negative": ["4", 0],
                                                      "latent_image": ["5", 0], "denoise": 1.0}}}
    if nag is not None:
        doc["6"] = {"class_type": "NAGuidance", "inputs": {"model": ["1", 0], "nag_scale": nag[0],
                                                           "nag_alpha": nag[1], "nag_tau": nag[2]}}
        doc["8"]["inputs"]["model"] = ["6", 0]
    return doc


def test_sd_unets_are_accepted(engine) -> None:
    # The tiny checkpoint's random UNet barely reads its self-attention; tests/ldm/test_nag.py checks the numbers.
    guided = sample(engine, sd1_workflow((5.0, 0.5, 1.5), "a green square"))
    assert guided.shape == (1, 4, 8, 8) and torch.isfinite(guided).all()


def test_models_loom_does_not_guide_are_refused(engine) -> None:
    doc = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "lumina_2_model-tiny.safetensors",
                                                        "weight_dtype": "default"}},
           "6": {"class_type": "NAGuidance", "inputs": {"model": ["1", 0], "nag_scale": 5.0, "nag_alpha": 0.5,
                                                        "nag_tau": 1.5}}}
    result = engine.run(parse_api(doc), outputs=["6"], keep=["6"])
    assert not result.ok
    assert "NAGuidance" in str(result.error) and "Lumina" in str(result.error) and "Flux.1" in str(result.error)
