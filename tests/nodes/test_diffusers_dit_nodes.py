"""UNETLoader on Flux and SD3 transformers in diffusers' layout (one file, or shards): the same latent as the
original layout's file (or checkpoint) bit for bit, the family told at validation, other diffusers models refused
by name."""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.checkpoint import UNET_PREFIX, VAE_PREFIX, load_state_dict
from ldm.flux_presets import make_flux_files
from ldm.sd3_presets import make_sd3_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.part_loaders import DIFFUSION_MODELS, header
from tests.ldm.flux_reference import _diffusers_conversion
from tests.nodes import test_sd3_parts as sd3_parts
from tests.nodes.test_flux_nodes import run, workflow

SHARDS = [f"tiny-flux-diffusers/diffusion_pytorch_model-{k:05}-of-00002.safetensors" for k in (1, 2)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers_dit")
    models = root / "models"
    unet = make_flux_files(models, "dev", seed=2)["unet"]
    with safetensors.safe_open(unet, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    converted = _diffusers_conversion(tensors["img_in.weight"].shape[0])(tensors)
    folder = models / "diffusion_models"
    safetensors.torch.save_file(converted, folder / "flux1-tiny-dev-diffusers.safetensors", metadata=metadata)
    (folder / "tiny-flux-diffusers").mkdir()
    names = sorted(converted)
    weight_map = {name: SHARDS[i * 2 // len(names)].split("/")[1] for i, name in enumerate(names)}
    for path in SHARDS:
        shard = {k: converted[k] for k in names if weight_map[k] == path.split("/")[1]}
        safetensors.torch.save_file(shard, folder / path, metadata=metadata)
    (folder / "tiny-flux-diffusers" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    sd3 = load_state_dict(make_sd3_files(models, "sd3.5-medium", seed=2, dtype=torch.float32)["checkpoint"])
    safetensors.torch.save_file(convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in sd3.items() if k.startswith(UNET_PREFIX)}), folder / "sd35-medium-diffusers.safetensors")
    sd3_parts.save({k[len(VAE_PREFIX):]: v for k, v in sd3.items() if k.startswith(VAE_PREFIX)},
                   models / "vae" / "sd3-vae.safetensors")
    safetensors.torch.save_file({"condition_embedder.time_proj.weight": torch.zeros(2, 2),
                                 "blocks.0.attn1.to_q.weight": torch.zeros(2, 2)}, folder / "wan-diffusers.safetensors")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield Executor(builtin_registry(), services=Services.create(paths))
    set_paths(FolderPaths())


def test_diffusers_layout_flux_gives_the_bfl_files_latent_bit_for_bit(engine) -> None:
    bfl = run(engine, workflow())[0]["samples"]
    for name in ("flux1-tiny-dev-diffusers.safetensors", SHARDS[0], SHARDS[1]):
        latent = run(engine, workflow(unet=name))[0]["samples"]
        assert latent.abs().mean() > 0.1 and torch.equal(latent, bfl), name


def test_diffusers_layout_sd3_gives_the_checkpoints_latent_bit_for_bit(engine) -> None:
    checkpoint = "sd3.5-medium-tiny-incl-clips-t5.safetensors"
    latent, image = sd3_parts.run(engine, sd3_parts.checkpoint_workflow(checkpoint))
    parts_latent, parts_image = sd3_parts.run(engine, sd3_parts.parts_workflow("sd35-medium-diffusers.safetensors",
                                                                               checkpoint))
    assert latent.std() > 0.1 and torch.equal(parts_latent, latent) and torch.equal(parts_image, image)


def test_the_family_is_told_from_the_headers(engine) -> None:
    assert header("unet", DIFFUSION_MODELS, "flux1-tiny-dev-diffusers.safetensors") == ("flux", None)
    assert header("unet", DIFFUSION_MODELS, SHARDS[1]) == ("flux", None)
    assert header("unet", DIFFUSION_MODELS, "sd35-medium-diffusers.safetensors") == ("sd3", None)


def test_other_diffusers_models_are_refused_at_validation_by_name(engine) -> None:
    doc = workflow(unet="wan-diffusers.safetensors")
    with pytest.raises(WorkflowInvalid, match="wan-diffusers.safetensors: it holds a Wan video transformer "
                                              r"\(WanTransformer3DModel\) in diffusers' layout"):
        engine.run(parse_api(doc))
