"""Flux and SD3 families known at validation from the files' headers: LoRAs, prompt encoders and model sampling of
another family are refused before anything runs, and the right pairings validate."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from graph.document import parse_api
from graph.validate import validate
from ldm.flux_presets import make_flux_files
from ldm.presets import make_checkpoint
from ldm.sd3_presets import make_sd3_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_flux_nodes import workflow as flux_workflow
from tests.nodes.test_sd3_nodes import workflow as sd3_workflow

FLUX_CKPT, FLUX_UNET = "flux1-tiny-dev-checkpoint.safetensors", "flux1-tiny-dev.safetensors"
SD3_CKPT = "sd3.5-medium-tiny-incl-clips-t5.safetensors"
FLUX_CLIP = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "t5xxl-tiny.safetensors",
                                                          "clip_name2": "clip_l-tiny.safetensors", "type": "flux"}}
SD3_TRIPLE = {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "sd3-t5xxl-tiny.safetensors",
                                                           "clip_name2": "sd3-clip_l-tiny.safetensors",
                                                           "clip_name3": "sd3-clip_g-tiny.safetensors"}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    models = tmp_path_factory.mktemp("flow_families") / "models"
    make_flux_files(models, "dev", seed=2)
    make_sd3_files(models, "sd3.5-medium", seed=2, dtype=torch.float32)
    make_checkpoint("tiny-sd1", models / "checkpoints" / "sd1.safetensors", seed=1)
    (models / "loras").mkdir()
    for family, key, width, out in (("sd1", "input_blocks_1_1_transformer_blocks_0_attn2_to_k", 768, 32),
                                    ("sd3", "joint_blocks_1_context_block_attn_qkv", 32, 96),
                                    ("flux", "double_blocks_1_txt_attn_qkv", 32, 96)):
        safetensors.torch.save_file({f"lora_unet_{key}.lora_down.weight": torch.zeros(2, width),
                                     f"lora_unet_{key}.lora_up.weight": torch.zeros(out, 2)},
                                    models / "loras" / f"{family}.safetensors")
    set_paths(FolderPaths(base=models.parent))
    yield builtin_registry()
    set_paths(FolderPaths())


def refusals(registry, doc: dict) -> list[tuple[str, str]]:
    """(node id, message) of each check refusing the workflow; nothing is run."""
    checked = validate(parse_api({**doc, "99": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}),
                       registry)
    return [(p.node_id, p.details) for p in checked.problems]


def checkpoint(name: str) -> dict:
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}


def unet(name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def lora_only(lora: str) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                            "strength_model": 1.0}}


@pytest.mark.parametrize(("loader", "lora", "message"), [
    (checkpoint(FLUX_CKPT), "sd1.safetensors", "sd1.safetensors is a SD1 LoRA; it does not fit the FLUX model"),
    (checkpoint(SD3_CKPT), "sd1.safetensors", "sd1.safetensors is a SD1 LoRA; it does not fit the SD3 model"),
    (unet(FLUX_UNET), "sd3.safetensors", "sd3.safetensors is a SD3 LoRA; it does not fit the FLUX model"),
    (checkpoint(FLUX_CKPT), "sd3.safetensors", "sd3.safetensors is a SD3 LoRA; it does not fit the FLUX model"),
    (checkpoint(SD3_CKPT), "flux.safetensors", "flux.safetensors is a FLUX LoRA; it does not fit the SD3 model"),
    (checkpoint("sd1.safetensors"), "flux.safetensors", "flux.safetensors is a FLUX LoRA; it does not fit the SD1 "
                                                        "model")])
def test_a_lora_of_another_family_is_refused_at_validation(registry, loader: dict, lora: str, message: str) -> None:
    assert refusals(registry, {"1": loader, "9": lora_only(lora)}) == [("9", f"{message} it is applied to")]


def test_lora_loader_on_an_sd3_checkpoint_refuses_an_sd1_lora_at_validation(registry) -> None:
    doc = {"1": checkpoint(SD3_CKPT), "9": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "sd1.safetensors", "strength_model": 1.0,
        "strength_clip": 1.0}}}
    assert refusals(registry, doc) == [("9", "sd1.safetensors is a SD1 LoRA; it does not fit the SD3 model it is "
                                             "applied to")]


@pytest.mark.parametrize(("loader", "lora"), [(checkpoint(FLUX_CKPT), "flux.safetensors"),
                                              (unet(FLUX_UNET), "flux.safetensors"),
                                              (checkpoint(SD3_CKPT), "sd3.safetensors")])
def test_a_lora_of_the_same_family_validates(registry, loader: dict, lora: str) -> None:
    assert refusals(registry, {"1": loader, "9": lora_only(lora)}) == []


def encode(node: str, clip: list) -> dict:
    texts = {"CLIPTextEncodeFlux": {"clip_l": "a", "t5xxl": "a", "guidance": 3.5},
             "CLIPTextEncodeSD3": {"clip_l": "a", "clip_g": "a", "t5xxl": "a", "empty_padding": "none"},
             "CLIPTextEncodeSDXL": {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
                                    "target_height": 1024, "text_g": "a", "text_l": "a"}}[node]
    return {"class_type": node, "inputs": {"clip": clip, **texts}}


@pytest.mark.parametrize(("loaders", "clip", "node", "message"), [
    ({"2": SD3_TRIPLE}, ["2", 0], "CLIPTextEncodeFlux", "CLIPTextEncodeFlux needs Flux's text encoders (DualCLIPLoader "
     "with type flux, or a Flux checkpoint); the CLIP linked is SD3 (use CLIP Text Encode)"),
    ({"1": checkpoint(SD3_CKPT)}, ["1", 1], "CLIPTextEncodeFlux", "the CLIP linked is SD3"),
    ({"2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "sd3-clip_g-tiny.safetensors", "type": "sd3"}}},
     ["2", 0], "CLIPTextEncodeFlux", "the CLIP linked is SD3"),
    ({"2": FLUX_CLIP}, ["2", 0], "CLIPTextEncodeSD3", "CLIPTextEncodeSD3 needs SD3's text encoders (TripleCLIPLoader, "
     "or an SD3 checkpoint with them); the CLIP linked is FLUX (use CLIP Text Encode)"),
    ({"1": checkpoint(FLUX_CKPT)}, ["1", 1], "CLIPTextEncodeSD3", "the CLIP linked is FLUX"),
    ({"1": checkpoint("sd1.safetensors")}, ["1", 1], "CLIPTextEncodeSD3", "the CLIP linked is SD1"),
    ({"2": FLUX_CLIP}, ["2", 0], "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXL needs an SDXL checkpoint's CLIP; the CLIP "
     "linked is FLUX (use CLIP Text Encode)"),
    ({"2": SD3_TRIPLE}, ["2", 0], "CLIPTextEncodeSDXL", "the CLIP linked is SD3")])
def test_a_prompt_encoder_of_another_family_is_refused_at_validation(registry, loaders: dict, clip: list, node: str,
                                                                     message: str) -> None:
    [(node_id, details)] = refusals(registry, {**loaders, "9": encode(node, clip)})
    assert node_id == "9" and message in details


def test_a_lora_between_keeps_the_family_for_the_prompt_encoder(registry) -> None:
    doc = {"1": checkpoint(SD3_CKPT), "2": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "sd3.safetensors", "strength_model": 1.0,
        "strength_clip": 1.0}}, "9": encode("CLIPTextEncodeFlux", ["2", 1])}
    assert refusals(registry, doc) == [("9", "CLIPTextEncodeFlux needs Flux's text encoders (DualCLIPLoader with type "
                                             "flux, or a Flux checkpoint); the CLIP linked is SD3 (use CLIP Text "
                                             "Encode)")]


@pytest.mark.parametrize(("loader", "node", "message"), [
    (unet(FLUX_UNET), {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
     "ModelSamplingSD3 is for SD3, Wan, Qwen-Image and HiDream models; the MODEL linked is FLUX"),
    (checkpoint(FLUX_CKPT), {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
     "ModelSamplingSD3 is for SD3, Wan, Qwen-Image and HiDream models; the MODEL linked is FLUX"),
    (checkpoint(SD3_CKPT), {"class_type": "ModelSamplingFlux", "inputs": {
        "model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": 64, "height": 64}},
     "ModelSamplingFlux is for Flux models; the MODEL linked is SD3"),
    (checkpoint("sd1.safetensors"), {"class_type": "ModelSamplingFlux", "inputs": {
        "model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": 64, "height": 64}},
     "ModelSamplingFlux is for Flux models; the MODEL linked is SD1")])
def test_model_sampling_of_another_family_is_refused_at_validation(registry, loader: dict, node: dict,
                                                                   message: str) -> None:
    assert refusals(registry, {"1": loader, "9": node}) == [("9", message)]


def test_model_sampling_passes_the_family_on(registry) -> None:
    doc = {"1": checkpoint(SD3_CKPT), "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0],
                                                                                         "shift": 3.0}},
           "9": lora_only("flux.safetensors")}
    doc["9"]["inputs"]["model"] = ["2", 0]
    assert refusals(registry, doc) == [("9", "flux.safetensors is a FLUX LoRA; it does not fit the SD3 model it is "
                                             "applied to")]


@pytest.mark.parametrize("doc", [flux_workflow(), flux_workflow(checkpoint=FLUX_CKPT),
                                 sd3_workflow(checkpoint=SD3_CKPT), sd3_workflow(checkpoint=SD3_CKPT, triple=True)])
def test_the_right_pairings_validate(registry, doc: dict) -> None:
    checked = validate(parse_api(doc), registry)
    assert checked.ok, checked.problems
