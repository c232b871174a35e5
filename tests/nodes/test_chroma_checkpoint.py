"""All-in-one Chroma checkpoints (ComfyUI's layout) through CheckpointLoaderSimple: the same MODEL, CLIP and VAE as
the separate part files, bit for bit, through the engine and the CLI; the loaders' facts; the fp8 and bf16 files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.checkpoint import CheckpointError
from ldm.chroma import Chroma
from ldm.chroma_files import (
    ChromaTextEncoder,
    load_chroma_checkpoint,
    make_chroma_checkpoint,
    make_chroma_files,
    tiny_chroma_parts,
)
from ldm.flux_presets import make_flux_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry

WIDTH, HEIGHT, SEED, STEPS, CFG = 64, 48, 5, 3, 4.0
CHECKPOINT = "chroma-tiny-aio.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("chroma_aio")
    models = root / "models"
    make_chroma_files(models, seed=4)
    make_chroma_checkpoint(models / "checkpoints" / CHECKPOINT, seed=4)
    make_chroma_checkpoint(models / "checkpoints" / "chroma-tiny-no-t5.safetensors", seed=4, text_encoder=False)
    make_flux_files(models, "dev", seed=2)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield root
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(FolderPaths(base=base)))


def workflow(checkpoint: str | None = CHECKPOINT, save: bool = False) -> dict:
    if checkpoint is None:
        loaders = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "chroma-tiny.safetensors",
                                                                "weight_dtype": "default"}},
                   "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl-chroma-tiny.safetensors",
                                                                "type": "chroma"}},
                   "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-chroma-tiny.safetensors"}}}
        model, text, vae = ["1", 0], ["2", 0], ["3", 0]
    else:
        loaders = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
        model, text, vae = ["1", 0], ["1", 1], ["1", 2]
    return {
        **loaders,
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": text, "text": "a red fox sitting in fresh snow"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": text, "text": "blurry"}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": model, "seed": SEED, "steps": STEPS, "cfg": CFG,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": vae}},
        "10": ({"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": checkpoint or "parts"}}
               if save else {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}),
    }


def run(engine: Executor, doc: dict) -> tuple[dict, torch.Tensor, list]:
    result = engine.run(parse_api(doc), keep=["1", "6", "8", "9"])
    assert result.ok, result.error
    return result.values["8"][0], result.values["9"][0], result.values["6"][0]


def test_checkpoint_gives_the_parts_latent_and_image(engine) -> None:
    parts_latent, parts_image, parts_prompt = run(engine, workflow(None))
    latent, image, prompt = run(engine, workflow())
    [(context, options)], [(parts_context, _)] = prompt, parts_prompt
    assert torch.equal(context, parts_context) and options.get("pooled_output") is None  # Chroma's T5, no CLIP-L
    assert torch.equal(latent["samples"], parts_latent["samples"]) and torch.equal(image, parts_image)
    assert image.std() > 0.01
    model, clip, vae = engine.run(parse_api(workflow()), keep=["1"]).values["1"]
    assert model.family.name == "chroma" and isinstance(model.unet, Chroma)
    assert clip.family_name == "chroma" and isinstance(clip.encoder, ChromaTextEncoder)
    assert vae.vae.config.z_channels == 16


def test_loaders_say_chroma_at_validation(engine) -> None:
    from nodes.sd.loaders import CheckpointLoaderSimple

    facts = CheckpointLoaderSimple.output_facts({"ckpt_name": CHECKPOINT}, {})
    assert facts == {0: {"family": "chroma", "source": CHECKPOINT}, 1: {"family": "chroma"}}
    # A Flux model sampling the checkpoint's prompts is refused before the run, as with CLIPLoader type chroma.
    doc = workflow()
    doc["12"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-dev.safetensors",
                                                        "weight_dtype": "default"}}
    doc["8"]["inputs"]["model"] = ["12", 0]
    [problem] = validate(parse_api(doc), engine.registry).problems
    assert "the positive prompt was encoded by Chroma's text encoder (CLIPLoader type chroma); the FLUX model " \
           "takes its own family's CLIP" in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(doc))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_fp8_and_bf16_checkpoints_hold_the_parts_weights(tmp_path, dtype) -> None:
    """ComfyUI saves Chroma checkpoints in fp8 or bf16: every part's weights are the parts' tensors in that dtype."""
    path = make_chroma_checkpoint(tmp_path / "chroma.safetensors", seed=4, dtype=dtype)
    loaded = load_chroma_checkpoint(path)
    assert loaded.unused_keys == [] and loaded.family.name == "chroma"
    parts = tiny_chroma_parts(4)
    for module, weights in ((loaded.unet, parts["unet"]), (loaded.vae, parts["vae"]),
                            (loaded.text_encoder.t5xxl.model, parts["t5xxl"])):
        state = module.state_dict()
        for key, tensor in weights.items():
            torch.testing.assert_close(state[key], tensor.to(dtype).float(), rtol=0, atol=0)


def test_a_checkpoint_without_t5_and_a_bare_transformer_are_refused_clearly(engine, base) -> None:
    result = engine.run(parse_api(workflow("chroma-tiny-no-t5.safetensors")))
    assert not result.ok and "chroma-tiny-no-t5.safetensors has no text encoder weights" in str(result.error)
    with pytest.raises(CheckpointError, match="a Chroma transformer alone, not an all-in-one checkpoint; load it "
                                              "with UNETLoader"):
        load_chroma_checkpoint(base / "models" / "diffusion_models" / "chroma-tiny.safetensors")


def test_the_cli_runs_the_checkpoint_workflow_to_the_parts_image(base, capsys) -> None:
    import main

    pngs = []
    for checkpoint in (None, CHECKPOINT):
        path = base / f"{checkpoint or 'parts'}.json"
        path.write_text(json.dumps(workflow(checkpoint, save=True)))
        code = main.main(["run", str(path), "--base-dir", str(base), "--no-bundled-models", "--no-custom-nodes",
                          "--cpu", "--quiet"])
        assert code == 0, capsys.readouterr()
        (saved,) = (base / "output").glob(f"{checkpoint or 'parts'}_*.png")
        pngs.append(np.asarray(Image.open(saved)))
    assert pngs[0].shape == (HEIGHT, WIDTH, 3) and pngs[0].std() > 2
    assert np.array_equal(pngs[0], pngs[1])
