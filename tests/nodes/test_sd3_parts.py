"""SD3's separately distributed parts as ComfyUI users load them: UNETLoader with a transformer-only file (with or
without `model.diffusion_model.`, scaled fp8 too) + TripleCLIPLoader + VAELoader against the all-in-one checkpoint,
DualCLIPLoader and CLIPLoader with type sd3 (the absent encoders' parts zeros), and refusals of wrong files."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from ldm.checkpoint import UNET_PREFIX, VAE_PREFIX, load_state_dict
from ldm.presets import make_checkpoint
from ldm.sd3_files import load_sd3_checkpoint
from ldm.sd3_presets import make_sd3_files
from ldm.sd3_text import SD3TextEncoder, load_sd3_text_encoders
from ldm.sd3_unet import load_sd3_unet
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_sd3_nodes import workflow as checkpoint_workflow

CLIPS = {kind: f"sd3-{kind}-tiny.safetensors" for kind in ("clip_l", "clip_g", "t5xxl")}
PROMPT = "a red circle on a blue square"


def save(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8 layout: each matrix as e4m3 over a per-tensor scale, with a `scaled_fp8` marker."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max().float() / 448
            out[k], out[k[: -len(".weight")] + ".scale_weight"] = (v / scale).to(torch.float8_e4m3fn), scale
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3parts")
    models = root / "models"
    files = make_sd3_files(models, "sd3.5-medium", seed=2, dtype=torch.float32)
    sd = load_state_dict(files["checkpoint"])
    unet = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    save(unet, models / "diffusion_models" / "sd3-transformer.safetensors")
    save({k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}, models / "unet" / "sd3-prefixed.safetensors")
    save(scaled_fp8(unet), models / "diffusion_models" / "sd3-transformer-fp8-scaled.safetensors")
    save({**{UNET_PREFIX + k: v for k, v in scaled_fp8(unet).items()},
          **{k: v for k, v in sd.items() if not k.startswith(UNET_PREFIX)}},
         models / "checkpoints" / "sd3-fp8-scaled.safetensors")
    vae = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    save(vae, models / "vae" / "sd3-vae.safetensors")
    sd2 = load_state_dict(make_checkpoint("tiny-sd2", models / "checkpoints" / "sd2.safetensors", seed=1))
    save({k[len("cond_stage_model.model."):]: v for k, v in sd2.items() if k.startswith("cond_stage_model.model.")},
         models / "text_encoders" / "sd2-clip_h.safetensors", {"loom.text_encoder": "clip_h"})  # tiny: not 1024 wide
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0]))


def parts_workflow(unet: str, checkpoint: str) -> dict:
    """The checkpoint workflow of test_sd3_nodes with its model from UNETLoader and its VAE from VAELoader."""
    doc = checkpoint_workflow(checkpoint, triple=True)
    doc["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
    doc["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": "sd3-vae.safetensors"}}
    doc["3"]["inputs"]["model"] = ["10", 0]
    doc["8"]["inputs"]["vae"] = ["11", 0]
    del doc["1"]
    return doc


def run(engine: Executor, doc: dict) -> tuple[torch.Tensor, torch.Tensor]:
    result = engine.run(parse_api(doc), keep=["7", "8"])
    assert result.ok, result.error
    return result.values["7"][0]["samples"], result.values["8"][0]


@pytest.mark.parametrize(("unet", "checkpoint"), [
    ("sd3-transformer.safetensors", "sd3.5-medium-tiny-incl-clips-t5.safetensors"),
    ("sd3-prefixed.safetensors", "sd3.5-medium-tiny-incl-clips-t5.safetensors"),
    ("sd3-transformer-fp8-scaled.safetensors", "sd3-fp8-scaled.safetensors")])
def test_parts_workflow_equals_the_checkpoint(engine, unet, checkpoint) -> None:
    """UNETLoader + TripleCLIPLoader + VAELoader: the latents and the decoded image bit for bit the checkpoint's
    (the VAE file's latent scale plays no part: SD3's shift and scale come with the model, as in ComfyUI)."""
    latent, image = run(engine, checkpoint_workflow(checkpoint))
    parts_latent, parts_image = run(engine, parts_workflow(unet, checkpoint))
    assert latent.std() > 0.1 and image.std() > 0.01
    assert torch.equal(parts_latent, latent) and torch.equal(parts_image, image)


def test_scaled_fp8_transformer_is_descaled(base) -> None:
    models = base[0].base / "models"
    plain = load_sd3_checkpoint(base[1]["checkpoint"], text_encoder=False).unet.state_dict()
    loaded = load_sd3_unet(models / "diffusion_models" / "sd3-transformer-fp8-scaled.safetensors")
    assert loaded.family.name == "sd3" and loaded.unused_keys == []
    weights = loaded.unet.state_dict()
    assert weights.keys() == plain.keys()
    name = "joint_blocks.0.x_block.attn.qkv.weight"
    torch.testing.assert_close(weights[name], plain[name], rtol=0.07, atol=1e-3)  # e4m3: 3 mantissa bits
    assert not torch.equal(weights[name], plain[name])


def encode(engine: Executor, loader: dict) -> tuple[torch.Tensor, torch.Tensor]:
    doc = {"1": loader, "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": PROMPT}},
           "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    result = engine.run(parse_api(doc), keep=["2"])
    assert result.ok, result.error
    [(cond, options)] = result.values["2"][0]
    return cond, options["pooled_output"]


@pytest.fixture(scope="module")
def full(base):
    return load_sd3_text_encoders([base[1][kind] for kind in CLIPS]).encoder


def test_dual_clip_loader_sd3_is_two_encoders_and_zeros(engine, full) -> None:
    cond, pooled = encode(engine, {"class_type": "DualCLIPLoader", "inputs": {
        "clip_name1": CLIPS["clip_g"], "clip_name2": CLIPS["clip_l"], "type": "sd3"}})
    expected = SD3TextEncoder(full.clip_l, full.clip_g, None, dict(full.projections)).encode([PROMPT])
    assert cond.shape == (1, 77, 4096) and cond.abs().max() > 0  # no T5: its part is absent, the width T5-XXL's
    assert torch.equal(cond, expected.cond.cpu()) and torch.equal(pooled, expected.pooled.float().cpu())
    with_t5 = full.encode([PROMPT])
    torch.testing.assert_close(cond[..., :80], with_t5.cond[:, :77, :80])  # the CLIP part as with all three


def test_clip_loader_sd3_takes_one_file(engine, full) -> None:
    cond, pooled = encode(engine, {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIPS["t5xxl"], "type": "sd3"}})
    expected = SD3TextEncoder(None, None, full.t5xxl).encode([PROMPT])
    assert torch.equal(cond, expected.cond.cpu()) and pooled.shape == (1, 2048) and pooled.abs().max() == 0
    torch.testing.assert_close(cond, full.encode([PROMPT]).cond[:, 77:])  # T5's part of the three's
    cond, pooled = encode(engine, {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIPS["clip_g"], "type": "sd3"}})
    expected = SD3TextEncoder(None, full.clip_g, None, {"clip_g": full.projections["clip_g"]}).encode([PROMPT])
    assert torch.equal(cond, expected.cond.cpu()) and torch.equal(pooled, expected.pooled.float().cpu())
    assert cond[..., :768].abs().max() == 0 and pooled[:, :768].abs().max() == 0  # CLIP-L's zeros
    assert cond[..., 768:768 + 48].abs().max() > 0


@pytest.mark.parametrize(("node", "message"), [
    ({"class_type": "DualCLIPLoader", "inputs": {"clip_name1": CLIPS["clip_l"], "clip_name2": CLIPS["clip_l"],
                                                 "type": "sd3"}},
     "sd3-clip_l-tiny.safetensors and sd3-clip_l-tiny.safetensors hold clip_l + clip_l; type sd3 takes two of "
     "SD3's CLIP-L (clip_l), CLIP-G (clip_g) and T5-XXL (t5xxl)"),
    ({"class_type": "CLIPLoader", "inputs": {"clip_name": "sd2-clip_h.safetensors", "type": "sd3"}},
     "sd2-clip_h.safetensors holds clip_h; type sd3 takes one of SD3's CLIP-L"),
    ({"class_type": "UNETLoader", "inputs": {"unet_name": "sd3-vae.safetensors", "weight_dtype": "default"}},
     "sd3-vae.safetensors is not a UNet-only file: it looks like a VAE"),
])
def test_wrong_files_are_refused_before_running(engine, base, node, message) -> None:
    if node["class_type"] == "UNETLoader":  # a VAE put among the diffusion models
        vae = base[0].base / "models" / "vae" / "sd3-vae.safetensors"
        (base[0].base / "models" / "diffusion_models" / vae.name).write_bytes(vae.read_bytes())
    doc = {"1": node, "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    [problem] = validate(parse_api(doc), engine.registry).problems
    assert problem.type == "custom_validation_failed" and message in problem.details, problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(doc))
