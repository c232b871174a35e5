"""LTX-Video's files through the loader nodes, on tiny files in the real layouts (ldm.ltxv_presets): the all-in-one
checkpoint (MODEL with the VAE's latent statistics, VAE, a CLIP that says where T5 comes from), CLIPLoader type ltxv
(T5-XXL with the prompt's attention mask in the conditioning), a bare transformer (UNETLoader), a VAE-only file
(VAELoader), their validation facts and the refusals of other families' files."""

from __future__ import annotations

import json
import logging

import pytest
import safetensors.torch
import torch
from PIL import Image

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.flux_presets import make_flux_files
from ldm.ltxv_files import LATENT_MEAN_KEY, LATENT_STD_KEY, TINY_LTXV, load_ltxv_checkpoint, random_ltxv
from ldm.ltxv_presets import CHECKPOINT, T5XXL, make_ltxv_files
from ldm.ltxv_text import load_ltxv_text_encoder
from ldm.ltxv_vae import LTXVVAE, write_tiny_ltxv_vae
from ldm.umt5 import write_tiny_umt5
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.loaders import CheckpointLoaderSimple, header_family
from nodes.sd.part_loaders import CLIPLoader, UNETLoader

BARE, VAE_ONLY, UMT5 = "ltxv-transformer-tiny.safetensors", "ltxv-vae-tiny.safetensors", "umt5_xxl-tiny.safetensors"
FLUX = "flux1-tiny-dev-checkpoint.safetensors"
PROMPT = "a (red:1.5) fox running through fresh snow"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltxv_loaders")
    models = root / "models"
    files = make_ltxv_files(models, seed=4, dtype=torch.float32)
    make_flux_files(models, dtype=torch.float32)
    bare = random_ltxv(TINY_LTXV, seed=4).state_dict()  # Lightricks' keys without model.diffusion_model.
    for folder in ("diffusion_models", "checkpoints"):
        write_safetensors(bare, models / folder / BARE, {})
    write_tiny_ltxv_vae(models / "vae" / VAE_ONLY, "0.9.1", prefix="", seed=6)
    write_tiny_umt5(models / "text_encoders" / UMT5, seed=7)
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(folders):
    return Executor(builtin_registry(), services=Services.create(folders[0]))


def _run(engine, nodes: dict, keep: list[str]):
    sinks = {f"p{i}": {"class_type": "PreviewAny", "inputs": {"source": [k, 0]}} for i, k in enumerate(keep)}
    return engine.run(parse_api({**nodes, **sinks}), keep=keep)


def test_checkpoint_gives_the_transformer_with_the_vaes_statistics_and_the_vae(engine, folders) -> None:
    result = _run(engine, {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}}, ["1"])
    assert result.ok, result.error
    model, clip, vae = result.values["1"]
    stored = safetensors.torch.load_file(folders[1]["checkpoint"])
    mean, std = stored[LATENT_MEAN_KEY], stored[LATENT_STD_KEY]
    assert model.family.name == "ltxv" and model.family.unet_config == TINY_LTXV
    assert torch.equal(torch.tensor(model.family.latent_mean), mean) and torch.equal(torch.tensor(
        model.family.latent_std), std)
    assert not torch.equal(mean, torch.zeros(128)) and not torch.equal(std, torch.ones(128))
    assert isinstance(vae.vae, LTXVVAE) and vae.vae.config.version == "0.9.1"
    torch.testing.assert_close(vae.vae.latent_mean.float(), mean, atol=1e-3, rtol=1e-3)  # in the model dtype
    assert clip.family_name == "ltxv"
    assert CheckpointLoaderSimple.output_facts({"ckpt_name": CHECKPOINT}, {}) == \
        {0: {"family": "ltxv", "source": CHECKPOINT}, 1: {"family": "ltxv"}}


def test_the_checkpoints_clip_says_to_load_t5_with_cliploader_ltxv(engine) -> None:
    result = _run(engine, {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
                           "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}}}, ["2"])
    assert not result.ok
    assert f"{CHECKPOINT} holds no text encoders" in str(result.error)
    assert "CLIPLoader (Load CLIP) type ltxv" in str(result.error)


def test_cliploader_ltxv_encodes_with_the_attention_mask(engine, folders) -> None:
    nodes = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": T5XXL, "type": "ltxv"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": PROMPT}}}
    result = _run(engine, nodes, ["1", "2"])
    assert result.ok, result.error
    [clip], [[(context, options)]] = result.values["1"], result.values["2"]
    expected = load_ltxv_text_encoder([folders[1]["t5xxl"]]).encoder.encode([PROMPT])
    assert clip.family_name == "ltxv" and set(options) == {"attention_mask"}
    assert context.shape == (1, 128, TINY_LTXV.caption_channels) and context.dtype == torch.float32
    torch.testing.assert_close(context, expected.cond, atol=1e-5, rtol=1e-5)
    mask = options["attention_mask"]
    assert mask.shape == (1, 128) and mask.dtype == torch.int64 and torch.equal(mask, expected.extra["attention_mask"])
    assert 0 < int(mask.sum()) < 128 and mask[0, :int(mask.sum())].all()
    assert CLIPLoader.check_inputs(nodes["1"]["inputs"]) is None
    assert CLIPLoader.output_facts(nodes["1"]["inputs"], {}) == {0: {"family": "ltxv"}}


def test_a_umt5_file_with_type_ltxv_is_refused(engine, folders) -> None:
    nodes = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": UMT5, "type": "ltxv"}}}
    assert CLIPLoader.check_inputs(nodes["1"]["inputs"]) == \
        f"{UMT5} holds umt5xxl; type ltxv takes one T5-XXL (t5xxl: t5xxl_fp16.safetensors or an fp8 copy)"
    [problem] = validate(parse_api({**nodes, "p": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}),
                         engine.registry).problems
    assert "type ltxv takes one T5-XXL" in problem.details
    with pytest.raises(WorkflowInvalid):
        _run(engine, nodes, ["1"])
    with pytest.raises(CheckpointError, match="not T5-XXL, LTX-Video's text encoder: it holds UMT5-XXL"):
        load_ltxv_text_encoder([folders[0].find_model("text_encoders", UMT5)])  # past validation, the loader too


def test_a_flux_checkpoint_is_not_ltxv_and_a_bare_transformer_is_no_checkpoint(engine, folders) -> None:
    assert header_family("checkpoints", FLUX) == "flux" and header_family("checkpoints", CHECKPOINT) == "ltxv"
    with pytest.raises(CheckpointError, match=f"{FLUX}: not an LTX-Video checkpoint"):
        load_ltxv_checkpoint(folders[0].find_model("checkpoints", FLUX))
    result = _run(engine, {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": BARE}}}, ["1"])
    assert not result.ok and "an LTX-Video transformer alone, not an all-in-one checkpoint" in str(result.error)
    assert "UNETLoader" in str(result.error)


def test_unet_loader_takes_a_bare_transformer_without_statistics(engine, caplog) -> None:
    inputs = {"unet_name": BARE, "weight_dtype": "default"}
    assert UNETLoader.check_inputs(inputs) is None
    assert UNETLoader.output_facts(inputs, {}) == {0: {"family": "ltxv"}}
    with caplog.at_level(logging.WARNING, logger="nodes.sd.part_loaders"):
        result = _run(engine, {"1": {"class_type": "UNETLoader", "inputs": inputs}}, ["1"])
    assert result.ok, result.error
    [model] = result.values["1"]
    assert model.family.name == "ltxv" and model.family.unet_config == TINY_LTXV
    assert model.family.latent_mean is None and model.family.latent_std is None
    assert any("without its VAE's latent statistics" in r.getMessage() for r in caplog.records)


def test_vae_loader_takes_an_ltxv_vae_file(engine) -> None:
    result = _run(engine, {"1": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_ONLY}}}, ["1"])
    assert result.ok, result.error
    [vae] = result.values["1"]
    assert isinstance(vae.vae, LTXVVAE) and vae.vae.config.version == "0.9.1" and vae.source == VAE_ONLY
    assert not torch.equal(vae.vae.latent_std.float(), torch.ones(128))


def test_make_ltxv_then_the_cli_runs_text_to_video_twice_alike(tmp_path, capsys) -> None:
    """`main.py make-ltxv`, then ComfyUI's text-to-video workflow from the CLI, twice: the same video (the decoder's
    noise is seeded when no generator is given)."""
    import main

    assert main.main(["make-ltxv", str(tmp_path / "models")]) == 0
    nodes = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": T5XXL, "type": "ltxv"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": PROMPT}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry"}},
        "5": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                               "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["7", 0], "filename_prefix": "ltxv", "fps": 24.0,
                                                           "lossless": True, "quality": 80, "method": "default"}}}
    (tmp_path / "ltxv.json").write_text(json.dumps(nodes))
    for _ in range(2):
        code = main.main(["run", str(tmp_path / "ltxv.json"), "--base-dir", str(tmp_path), "--no-bundled-models",
                          "--no-custom-nodes", "--cpu", "--quiet"])
        assert code == 0, capsys.readouterr()
    first, second = sorted((tmp_path / "output").glob("ltxv_*.webp"))
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as webp:
        assert getattr(webp, "n_frames", 1) == 9 and webp.size == (64, 64)
