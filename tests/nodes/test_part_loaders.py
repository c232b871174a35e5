"""UNETLoader, CLIPLoader and DualCLIPLoader: ComfyUI's declarations, and part files that make the very latent
(and image) their checkpoint makes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.load import graph_from_data
from graph.validate import validate
from ldm.checkpoint import load_state_dict, read_metadata
from ldm.presets import make_checkpoint
from ldm.quant import is_fp8
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.ldm.test_parts import clip_l_file, open_clip_file, unet_layouts, write

PRESETS = {"sd1": "tiny-sd1", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}
VAE = "first_stage_model."


class Checkpoint:
    def __init__(self, path: Path) -> None:
        from ldm.checkpoint import load_checkpoint

        self.path, self.sd, self.metadata = path, load_state_dict(path), read_metadata(path)
        self.loaded = load_checkpoint(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Each checkpoint, and its parts in ComfyUI's folders (and their legacy names, models/unet and models/clip)."""
    root = tmp_path_factory.mktemp("parts")
    models = root / "models"
    for folder in ("checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae"):
        (models / folder).mkdir(parents=True)
    ckpts = {family: Checkpoint(make_checkpoint(preset, models / "checkpoints" / f"{family}.safetensors", seed=5))
             for family, preset in PRESETS.items()}
    for family, ckpt in ckpts.items():  # a standalone VAE, as VAELoader reads it, with its latent scale
        vae = {k.removeprefix(VAE): v for k, v in ckpt.sd.items() if k.startswith(VAE)}
        write(models / "vae" / f"{family}-vae.safetensors", vae,
              {"loom.scaling_factor": ckpt.metadata["loom.scaling_factor"]})
    unets = {family: unet_layouts(ckpt) for family, ckpt in ckpts.items()}
    write(models / "diffusion_models" / "sd1-diffusers.safetensors", unets["sd1"]["diffusers"], ckpts["sd1"].metadata)
    write(models / "unet" / "sd2-unet.safetensors", unets["sd2"]["ldm"], ckpts["sd2"].metadata)
    write(models / "diffusion_models" / "sdxl-unet.safetensors", unets["sdxl"]["ldm_unprefixed"],
          ckpts["sdxl"].metadata)
    write(models / "text_encoders" / "sd1-clip_l.safetensors", clip_l_file(ckpts["sd1"]))
    write(models / "clip" / "sd2-clip_h.safetensors", open_clip_file(ckpts["sd2"], "tiny-sd2"),
          {"loom.text_encoder": "clip_h"})
    write(models / "text_encoders" / "sdxl-clip_l.safetensors", clip_l_file(ckpts["sdxl"]))
    write(models / "text_encoders" / "sdxl-clip_g.safetensors", open_clip_file(ckpts["sdxl"], "tiny-sdxl"),
          {"loom.text_encoder": "clip_g"})
    # Files in the wrong folders.
    safetensors.torch.save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32),
                                 "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4)},
                                models / "diffusion_models" / "a-lora.safetensors")
    safetensors.torch.save_file({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(4, 4)},
                                models / "text_encoders" / "t5xxl_fp16.safetensors")
    shutil.copy(ckpts["sd1"].path, models / "text_encoders" / "whole.safetensors")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base))


def txt2img(loaders: dict[str, dict], model: list, clip: list, vae: list) -> dict:
    return {
        **loaders,
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red (circle:1.2)", "clip": clip}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": model, "seed": 11, "steps": 3, "cfg": 6.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": vae}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


def parts_workflow(unet: str, clip: dict, vae: str, weight_dtype: str = "default") -> dict:
    return txt2img({"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}},
                    "2": clip, "4": {"class_type": "VAELoader", "inputs": {"vae_name": vae}}},
                   ["1", 0], ["2", 0], ["4", 0])


def clip_loader(name: str, type: str = "stable_diffusion", **extra: str) -> dict:
    return {"class_type": "CLIPLoader", "inputs": {"clip_name": name, "type": type, **extra}}


def dual_clip_loader(first: str, second: str, type: str = "sdxl") -> dict:
    return {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": first, "clip_name2": second, "type": type}}


def run(engine: Executor, workflow: dict) -> tuple[torch.Tensor, torch.Tensor]:
    result = engine.run(parse_api(workflow), keep=["3", "8"])
    assert result.ok, result.error
    return result.values["3"][0]["samples"], result.values["8"][0]


CASES = {
    "sd1": ("sd1-diffusers.safetensors", clip_loader("sd1-clip_l.safetensors")),
    "sd2": ("sd2-unet.safetensors", clip_loader("sd2-clip_h.safetensors")),  # both in the legacy folders
    "sdxl": ("sdxl-unet.safetensors", dual_clip_loader("sdxl-clip_g.safetensors", "sdxl-clip_l.safetensors")),
}


@pytest.mark.parametrize("family", list(CASES))
def test_parts_make_the_checkpoints_latent_and_image_bit_for_bit(engine, family):
    unet, clip = CASES[family]
    whole = txt2img({"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{family}.safetensors"}}},
                    ["4", 0], ["4", 1], ["4", 2])
    latent, image = run(engine, whole)
    part_latent, part_image = run(engine, parts_workflow(unet, clip, f"{family}-vae.safetensors"))
    assert torch.equal(part_latent, latent)
    assert torch.equal(part_image, image)


def test_declarations_are_comfyuis(engine):
    info = {name: engine.registry.get(name).object_info() for name in ("UNETLoader", "CLIPLoader", "DualCLIPLoader")}
    assert {name: i["input_order"] for name, i in info.items()} == {
        "UNETLoader": {"required": ["unet_name", "weight_dtype"], "optional": []},
        "CLIPLoader": {"required": ["clip_name", "type"], "optional": ["device"]},
        "DualCLIPLoader": {"required": ["clip_name1", "clip_name2", "type"], "optional": ["device"]}}
    assert {i["category"] for i in info.values()} == {"advanced/loaders"}
    assert [i["output"] for i in info.values()] == [["MODEL"], ["CLIP"], ["CLIP"]]
    unet, clip, dual = (i["input"] for i in info.values())
    assert unet["required"]["weight_dtype"][0] == ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    assert clip["required"]["type"][0][:4] == ["stable_diffusion", "stable_cascade", "sd3", "stable_audio"]
    assert dual["required"]["type"][0][:3] == ["sdxl", "sd3", "flux"]
    assert clip["optional"]["device"][0] == dual["optional"]["device"][0] == ["default", "cpu"]
    # Both folders are listed, each file once.
    assert "sd2-unet.safetensors" in unet["required"]["unet_name"][0]
    assert "sd1-diffusers.safetensors" in unet["required"]["unet_name"][0]
    assert "sd2-clip_h.safetensors" in clip["required"]["clip_name"][0]
    assert dual["required"]["clip_name1"][0] == dual["required"]["clip_name2"][0] == clip["required"]["clip_name"][0]


def test_a_comfyui_editor_workflow_fills_the_widgets_in_comfyuis_order(engine):
    nodes = [{"id": 1, "type": "UNETLoader", "widgets_values": ["sdxl-unet.safetensors", "fp8_e4m3fn"]},
             {"id": 2, "type": "CLIPLoader", "widgets_values": ["sd1-clip_l.safetensors", "stable_diffusion", "cpu"]},
             {"id": 3, "type": "DualCLIPLoader",
              "widgets_values": ["sdxl-clip_l.safetensors", "sdxl-clip_g.safetensors", "sdxl", "default"]}]
    graph = graph_from_data({"nodes": nodes, "links": []}, engine.registry)
    assert graph.nodes["1"].inputs == {"unet_name": "sdxl-unet.safetensors", "weight_dtype": "fp8_e4m3fn"}
    assert graph.nodes["2"].inputs == {"clip_name": "sd1-clip_l.safetensors", "type": "stable_diffusion",
                                       "device": "cpu"}
    assert graph.nodes["3"].inputs == {"clip_name1": "sdxl-clip_l.safetensors", "clip_name2": "sdxl-clip_g.safetensors",
                                       "type": "sdxl", "device": "default"}


REFUSED = {
    "stable_cascade type": (clip_loader("sd1-clip_l.safetensors", "stable_cascade"),
                            "type 'stable_cascade' is for a model family"),
    "flux type with SDXL's files": (dual_clip_loader("sdxl-clip_l.safetensors", "sdxl-clip_g.safetensors", "flux"),
                                    "hold clip_l + clip_g; type flux needs one CLIP-L (clip_l) and one T5-XXL"),
    "fp8_e5m2": (None, "Loom stores fp8 weights as e4m3 only"),
    "a LoRA as a UNet": (None, "a-lora.safetensors is not a UNet-only file: it looks like a LoRA"),
    "T5": (clip_loader("t5xxl_fp16.safetensors"), "it looks like a T5 text encoder"),
    "a checkpoint as a text encoder": (clip_loader("whole.safetensors"), "it looks like a full checkpoint"),
    "two CLIP-L": (dual_clip_loader("sd1-clip_l.safetensors", "sdxl-clip_l.safetensors"),
                   "hold clip_l + clip_l; type sdxl needs one CLIP-L"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_loom_cannot_load_is_refused_at_validation_by_name(engine, case):
    clip, message = REFUSED[case]
    unet = "a-lora.safetensors" if case == "a LoRA as a UNet" else "sd1-diffusers.safetensors"
    workflow = parts_workflow(unet, clip or clip_loader("sd1-clip_l.safetensors"), "sd1-vae.safetensors",
                              "fp8_e5m2" if case == "fp8_e5m2" else "default")
    [problem] = validate(parse_api(workflow), engine.registry).problems
    assert problem.type == "custom_validation_failed" and message in problem.details, problem.details
    loads = engine.services.models.loads
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(workflow))
    assert engine.services.models.loads == loads  # refused before any file was loaded


def test_a_lora_for_another_family_is_refused_after_part_loaders(engine, base):
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    loras = base.model_dirs("loras")[0]
    loras.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({f"{key}.lora_down.weight": torch.zeros(4, 2048),
                                 f"{key}.lora_up.weight": torch.zeros(32, 4)}, loras / "xl.safetensors")
    workflow = parts_workflow("sd1-diffusers.safetensors", clip_loader("sd1-clip_l.safetensors"), "sd1-vae.safetensors")
    workflow["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["2", 0],
                                                             "lora_name": "xl.safetensors", "strength_model": 1.0,
                                                             "strength_clip": 1.0}}
    workflow["3"]["inputs"]["model"] = ["10", 0]
    [problem] = validate(parse_api(workflow), engine.registry).problems
    assert "xl.safetensors is a SDXL LoRA; it does not fit the SD1 model" in problem.details


def test_fp8_weight_dtypes_store_the_unet_in_fp8_and_cpu_pins_the_text_encoder(engine):
    workflow = parts_workflow("sd1-diffusers.safetensors", clip_loader("sd1-clip_l.safetensors", device="cpu"),
                              "sd1-vae.safetensors", "fp8_e4m3fn_fast")
    result = engine.run(parse_api(workflow), keep=["1", "2", "3"])
    assert result.ok, result.error
    unet = result.values["1"][0].unet
    assert any(is_fp8(layer) for layer in unet.modules())
    encoder = result.values["2"][0].encoder
    assert encoder.pinned_to_cpu
    assert {(p.device.type, p.dtype) for p in encoder.parameters()} == {("cpu", torch.float32)}
    assert torch.isfinite(result.values["3"][0]["samples"]).all()
