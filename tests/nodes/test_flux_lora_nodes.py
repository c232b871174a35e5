"""Flux LoRAs through LoraLoader, LoraLoaderModelOnly and the hook nodes on tiny Flux files: the patched weights
against the delta computed here, hooked prompts against the LoRA-loaded model, and refusals of other families."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.flux_files import load_flux_unet
from ldm.flux_presets import make_flux_files
from ldm.presets import make_checkpoint
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_flux_nodes import workflow

H = 32  # the tiny Flux model's width


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_lora")
    models = root / "models"
    files = make_flux_files(models, "dev", seed=2)
    make_checkpoint("tiny-sd1", models / "checkpoints" / "sd1.safetensors", seed=1)
    (models / "loras").mkdir()
    g = torch.Generator().manual_seed(9)
    diffusers = {}
    for name, out_features in (("transformer_blocks.0.attn.to_k", H), ("single_transformer_blocks.1.proj_mlp", 4 * H)):
        diffusers[f"transformer.{name}.lora_A.weight"] = torch.randn(3, H, generator=g) * 0.5
        diffusers[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, 3, generator=g) * 0.5
    diffusers["transformer.transformer_blocks.0.attn.to_k.alpha"] = torch.tensor(1.5)
    safetensors.torch.save_file(diffusers, models / "loras" / "flux_diffusers.safetensors")
    clip_q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    kohya = {"lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight": torch.randn(2, H, generator=g),
             "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight": torch.randn(3 * H, 2, generator=g),
             "lora_unet_double_blocks_1_txt_attn_qkv.alpha": torch.tensor(1.0),
             f"{clip_q}.lora_down.weight": torch.randn(2, 32, generator=g),
             f"{clip_q}.lora_up.weight": torch.randn(32, 2, generator=g)}
    safetensors.torch.save_file(kohya, models / "loras" / "flux_kohya.safetensors")
    sd1_key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file({f"{sd1_key}.lora_down.weight": torch.zeros(2, 768),
                                 f"{sd1_key}.lora_up.weight": torch.zeros(32, 2)}, models / "loras" / "sd1.safetensors")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, files, diffusers, kohya
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0], force_cpu=True))


def loaded(engine: Executor, doc: dict, node: str) -> tuple:
    result = engine.run(parse_api({**doc, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}),
                        keep=[node])
    assert result.ok, result.error
    return result.values[node]


def test_lora_loader_model_only_patches_the_slots_of_fused_layers(engine, base) -> None:
    _, files, lora, _ = base
    doc = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny-dev.safetensors",
                                                        "weight_dtype": "default"}},
           "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "strength_model": 0.5,
                                                                  "lora_name": "flux_diffusers.safetensors"}}}
    unet = loaded(engine, doc, "11")[0].unet
    original = load_flux_unet(files["unet"]).unet
    k = "transformer.transformer_blocks.0.attn.to_k"
    qkv = original.double_blocks[0].img_attn.qkv.weight.clone()
    qkv[H:2 * H] += 0.5 * 1.5 / 3 * lora[f"{k}.lora_B.weight"] @ lora[f"{k}.lora_A.weight"]
    mlp = "transformer.single_transformer_blocks.1.proj_mlp"
    linear1 = original.single_blocks[1].linear1.weight.clone()
    linear1[3 * H:] += 0.5 * lora[f"{mlp}.lora_B.weight"] @ lora[f"{mlp}.lora_A.weight"]
    torch.testing.assert_close(unet.double_blocks[0].img_attn.qkv.weight, qkv.to(unet.dtype))
    torch.testing.assert_close(unet.single_blocks[1].linear1.weight, linear1.to(unet.dtype))


def test_lora_loader_patches_the_transformer_and_clip_l(engine, base) -> None:
    _, _, _, lora = base
    doc = {**workflow(), "11": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "lora_name": "flux_kohya.safetensors", "strength_model": 1.0,
        "strength_clip": 0.25}}}
    plain_model, plain_clip = loaded(engine, doc, "1")[0], loaded(engine, doc, "2")[0]
    model, clip = loaded(engine, doc, "11")
    qkv = "lora_unet_double_blocks_1_txt_attn_qkv"
    expected = plain_model.unet.double_blocks[1].txt_attn.qkv.weight.float() + 0.5 * (
        lora[f"{qkv}.lora_up.weight"] @ lora[f"{qkv}.lora_down.weight"])
    torch.testing.assert_close(model.unet.double_blocks[1].txt_attn.qkv.weight.float(), expected)
    (name, encoder), = clip.encoder.clip_l.encoders.items()
    before = plain_clip.encoder.clip_l.encoders[name].text_model.encoder.layers[0].self_attn.q_proj.weight.float()
    clip_q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    torch.testing.assert_close(encoder.text_model.encoder.layers[0].self_attn.q_proj.weight.float(),
                               before + 0.25 * lora[f"{clip_q}.lora_up.weight"] @ lora[f"{clip_q}.lora_down.weight"])


def test_a_hook_lora_on_every_prompt_equals_the_lora_loaded_model(engine) -> None:
    hook = {"12": {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": "flux_diffusers.safetensors",
                                                                       "strength_model": 1.0}},
            "13": {"class_type": "SetModelHooksOnCond", "inputs": {"conditioning": ["6", 0], "hooks": ["12", 0]}},
            "14": {"class_type": "SetModelHooksOnCond", "inputs": {"conditioning": ["7", 0], "hooks": ["12", 0]}}}
    hooked = workflow()
    hooked.update(hook)
    hooked["8"]["inputs"].update(positive=["13", 0], negative=["14", 0])
    with_loader = workflow()
    with_loader["11"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "flux_diffusers.safetensors", "strength_model": 1.0}}
    with_loader["4"]["inputs"]["model"] = ["11", 0]
    out, expected = loaded(engine, hooked, "8")[0]["samples"], loaded(engine, with_loader, "8")[0]["samples"]
    plain = loaded(engine, workflow(), "8")[0]["samples"]
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(("lora", "model", "message"), [
    ("flux_diffusers.safetensors", "sd1", "is a FLUX LoRA; it does not fit the SD1 model"),
    ("sd1.safetensors", "flux", "is a SD1 LoRA; it does not fit the FLUX model")])
def test_a_lora_of_the_other_family_is_refused(engine, lora: str, model: str, message: str) -> None:
    doc = workflow(checkpoint="sd1.safetensors") if model == "sd1" else workflow()
    doc["11"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                 "strength_model": 1.0}}
    doc["4"]["inputs"]["model"] = ["11", 0]
    with pytest.raises(WorkflowInvalid, match=message):
        engine.run(parse_api(doc))
