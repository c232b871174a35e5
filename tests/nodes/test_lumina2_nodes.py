"""Lumina Image 2.0 end to end on tiny random files in the real layouts (`ldm.lumina2_presets`): ComfyUI's Lumina 2
graph (CheckpointLoaderSimple with the all-in-one file, ModelSamplingAuraFlow at 6, CLIPTextEncodeLumina2, KSampler
with euler / simple) against an Euler flow loop over diffusers' Lumina2Transformer2DModel with the same weights,
prompt states, noise and levels; and the split files through UNETLoader and CLIPLoader type lumina2."""

from __future__ import annotations

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.flux_files import FLUX_VAE, LATENT_SHIFT
from ldm.gemma_text import lumina2_prompt
from ldm.lumina2_files import load_lumina2_checkpoint
from ldm.lumina2_presets import make_lumina2_files
from ldm.sampling import prepare_noise
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT, SEED, STEPS, SHIFT, CFG = 64, 48, 6, 3, 6.0, 3.0
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lumina2")
    files = make_lumina2_files(root / "models", seed=2, dtype=torch.float32)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths)), files
    set_paths(FolderPaths())


def workflow(checkpoint: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": SHIFT}},
        "3": {"class_type": "CLIPTextEncodeLumina2", "inputs": {"system_prompt": "superior", "user_prompt": PROMPT,
                                                                "clip": ["1", 1]}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }


def run(engine: Executor, doc: dict, keep: tuple[str, ...]) -> list:
    result = engine.run(parse_api(doc), keep=list(keep))
    assert result.ok, result.error
    return [result.values[k][0] for k in keep]


def test_checkpoint_workflow_matches_an_euler_loop_over_diffusers(base) -> None:
    """The prompt's states (Gemma's second-to-last layer behind the "superior" system prompt) and mask as the node
    gives them; the loop's velocity as Lumina2Pipeline takes it, CFG against the zeroed negative."""
    from tests.ldm.test_lumina2 import diffusers_twin, pipeline_call

    engine, files = base
    latent, positive, image = run(engine, workflow(files["checkpoint"].name), ("6", "3", "7"))
    [(states, options)] = positive
    loaded = load_lumina2_checkpoint(files["checkpoint"], dtype=torch.float32)
    expected_states = loaded.text_encoder.encode([lumina2_prompt(PROMPT)])
    torch.testing.assert_close(states.float(), expected_states.cond.float(), rtol=1e-5, atol=1e-5)
    mask = options.get("attention_mask", torch.ones(states.shape[:2], dtype=torch.long))
    twin = diffusers_twin(loaded.unet.float())
    ts = [1 - int(i * 1000 / STEPS) / 1000 for i in range(STEPS)]
    sigmas = [SHIFT * t / (1 + (SHIFT - 1) * t) for t in ts] + [0.0]
    x = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:], strict=False):
            t = torch.tensor([sigma])
            cond = pipeline_call(twin, x, t, states.float(), mask)
            uncond = pipeline_call(twin, x, t, torch.zeros_like(states.float()), mask)
            x = x + (following - sigma) * (uncond + CFG * (cond - uncond))
    expected = x / FLUX_VAE.scaling_factor + LATENT_SHIFT
    assert latent["samples"].shape == (1, 16, HEIGHT // 8, WIDTH // 8) and expected.std() > 0.1
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and image.std() > 0.01


def test_split_files_load_through_unet_and_clip_loaders(base) -> None:
    engine, files = base
    doc = workflow(files["checkpoint"].name)
    doc["9"] = {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"].name, "weight_dtype": "default"}}
    doc["10"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": files["gemma"].name, "type": "lumina2"}}
    doc["2"]["inputs"]["model"] = ["9", 0]
    doc["3"]["inputs"]["clip"] = ["10", 0]
    latent, clip = run(engine, doc, ("6", "10"))
    assert clip.family_name == "lumina2" and torch.isfinite(latent["samples"]).all()
    from nodes.sd.loaders import CheckpointLoaderSimple
    from nodes.sd.part_loaders import UNETLoader

    assert UNETLoader.output_facts({"unet_name": files["unet"].name, "weight_dtype": "default"}, {}) == \
        {0: {"family": "lumina2"}}
    assert CheckpointLoaderSimple.output_facts({"ckpt_name": files["checkpoint"].name}, {})[1] == \
        {"family": "lumina2"}


def test_clip_text_encode_lumina2_refuses_another_familys_clip(base) -> None:
    engine, files = base
    doc = workflow(files["checkpoint"].name)
    doc["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "loom-demo.safetensors"}}
    doc["3"]["inputs"]["clip"] = ["10", 1]
    problems = validate(parse_api(doc), engine.registry).problems
    assert any("CLIPTextEncodeLumina2 needs Lumina Image 2.0's Gemma-2-2B" in p.details for p in problems)
