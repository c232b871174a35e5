"""SD3 LoRAs through LoraLoader, LoraLoaderModelOnly and the hook nodes on tiny SD3.5-medium files: the patched
weights against the delta computed here, hooked prompts against the LoRA-loaded model, refusals of other families."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from ldm.presets import make_checkpoint
from ldm.sd3_presets import make_sd3_files
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from tests.nodes.test_sd3_nodes import workflow

H, G = 32, 48  # the tiny SD3 model's width, its CLIP-G's
CLIP_G_Q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_lora")
    models = root / "models"
    make_sd3_files(models, "sd3.5-medium", seed=2, dtype=torch.float32)
    make_checkpoint("tiny-sd1", models / "checkpoints" / "sd1.safetensors", seed=1)
    (models / "loras").mkdir()
    g = torch.Generator().manual_seed(9)
    diffusers = {}  # SD3.5 medium's second attention and the last block's swapped context modulation
    for name, out_features in (("transformer_blocks.0.attn2.to_k", H), ("transformer_blocks.2.norm1_context.linear",
                                                                        2 * H)):
        diffusers[f"transformer.{name}.lora_A.weight"] = torch.randn(3, H, generator=g) * 0.5
        diffusers[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, 3, generator=g) * 0.5
    diffusers["transformer.transformer_blocks.0.attn2.to_k.alpha"] = torch.tensor(1.5)
    safetensors.torch.save_file(diffusers, models / "loras" / "sd3_diffusers.safetensors")
    kohya = {"lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight": torch.randn(2, H, generator=g),
             "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_up.weight": torch.randn(3 * H, 2, generator=g),
             "lora_unet_joint_blocks_1_context_block_attn_qkv.alpha": torch.tensor(1.0),
             f"{CLIP_G_Q}.lora_down.weight": torch.randn(2, G, generator=g),
             f"{CLIP_G_Q}.lora_up.weight": torch.randn(G, 2, generator=g)}
    safetensors.torch.save_file(kohya, models / "loras" / "sd3_kohya.safetensors")
    sd1_key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file({f"{sd1_key}.lora_down.weight": torch.zeros(2, 768),
                                 f"{sd1_key}.lora_up.weight": torch.zeros(32, 2)}, models / "loras" / "sd1.safetensors")
    paths = FolderPaths(base=root)
    set_paths(paths)
    yield paths, diffusers, kohya
    set_paths(FolderPaths())


@pytest.fixture(scope="module")
def engine(base):
    return Executor(builtin_registry(), services=Services.create(base[0], force_cpu=True))


def loaded(engine: Executor, doc: dict, node: str) -> tuple:
    result = engine.run(parse_api({**doc, "99": {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}}),
                        keep=[node])
    assert result.ok, result.error
    return result.values[node]


def test_lora_loader_model_only_patches_slots_and_the_swapped_modulation(engine, base) -> None:
    _, lora, _ = base
    doc = {**workflow(), "11": {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "strength_model": 0.5, "lora_name": "sd3_diffusers.safetensors"}}}
    original, unet = loaded(engine, doc, "1")[0].unet, loaded(engine, doc, "11")[0].unet
    k = "transformer.transformer_blocks.0.attn2.to_k"
    qkv = original.joint_blocks[0].x_block.attn2.qkv.weight.float().clone()
    qkv[H:2 * H] += 0.5 * 1.5 / 3 * lora[f"{k}.lora_B.weight"] @ lora[f"{k}.lora_A.weight"]
    torch.testing.assert_close(unet.joint_blocks[0].x_block.attn2.qkv.weight.float(), qkv)
    mod = "transformer.transformer_blocks.2.norm1_context.linear"
    delta = lora[f"{mod}.lora_B.weight"] @ lora[f"{mod}.lora_A.weight"]  # diffusers' scale, shift
    expected = original.joint_blocks[2].context_block.adaLN_modulation[1].weight.float() + 0.5 * torch.cat(
        [delta[H:], delta[:H]])
    torch.testing.assert_close(unet.joint_blocks[2].context_block.adaLN_modulation[1].weight.float(), expected)


def test_lora_loader_patches_the_mmdit_and_clip_g(engine, base) -> None:
    _, _, lora = base
    doc = {**workflow(), "11": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "sd3_kohya.safetensors", "strength_model": 1.0,
        "strength_clip": 0.25}}}
    plain_model, plain_clip = loaded(engine, doc, "1")[:2]
    model, clip = loaded(engine, doc, "11")
    qkv = "lora_unet_joint_blocks_1_context_block_attn_qkv"
    expected = plain_model.unet.joint_blocks[1].context_block.attn.qkv.weight.float() + 0.5 * (
        lora[f"{qkv}.lora_up.weight"] @ lora[f"{qkv}.lora_down.weight"])
    torch.testing.assert_close(model.unet.joint_blocks[1].context_block.attn.qkv.weight.float(), expected)
    (name, encoder), = clip.encoder.clip_g.encoders.items()
    before = plain_clip.encoder.clip_g.encoders[name].text_model.encoder.layers[0].self_attn.q_proj.weight.float()
    delta = lora[f"{CLIP_G_Q}.lora_up.weight"] @ lora[f"{CLIP_G_Q}.lora_down.weight"]
    torch.testing.assert_close(encoder.text_model.encoder.layers[0].self_attn.q_proj.weight.float(),
                               before + 0.25 * delta)


def test_a_hook_lora_on_every_prompt_equals_the_lora_loaded_model(engine) -> None:
    hooked = workflow()
    hooked.update({
        "12": {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": "sd3_diffusers.safetensors",
                                                                   "strength_model": 1.0}},
        "13": {"class_type": "SetModelHooksOnCond", "inputs": {"conditioning": ["4", 0], "hooks": ["12", 0]}},
        "14": {"class_type": "SetModelHooksOnCond", "inputs": {"conditioning": ["5", 0], "hooks": ["12", 0]}}})
    hooked["7"]["inputs"].update(positive=["13", 0], negative=["14", 0])
    with_loader = workflow()
    with_loader["11"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "sd3_diffusers.safetensors", "strength_model": 1.0}}
    with_loader["3"]["inputs"]["model"] = ["11", 0]
    out, expected = loaded(engine, hooked, "7")[0]["samples"], loaded(engine, with_loader, "7")[0]["samples"]
    plain = loaded(engine, workflow(), "7")[0]["samples"]
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(("lora", "checkpoint", "message"), [
    ("sd3_kohya.safetensors", "sd1.safetensors", "is a SD3 LoRA; it does not fit (the|a) SD1 model"),
    ("sd3_diffusers.safetensors", "sd1.safetensors", "is a SD3 LoRA; it does not fit (the|a) SD1 model"),
    ("sd1.safetensors", "sd3.5-medium-tiny-incl-clips-t5.safetensors",
     "is a SD1 LoRA; it does not fit (the|a) SD3 model")])
def test_a_lora_of_the_other_family_is_refused(engine, lora: str, checkpoint: str, message: str) -> None:
    doc = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
           "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                  "strength_model": 1.0}},
           "99": {"class_type": "PreviewAny", "inputs": {"source": ["11", 0]}}}
    # Refused at validation: both checkpoints' headers give their family.
    with pytest.raises(WorkflowInvalid, match=message):
        engine.run(parse_api(doc))


def test_a_clip_hook_lora_patches_clip_g_as_lora_loader_does(engine) -> None:
    doc = {**workflow(),
           "12": {"class_type": "CreateHookLora", "inputs": {"lora_name": "sd3_kohya.safetensors",
                                                             "strength_model": 1.0, "strength_clip": 0.25}},
           "13": {"class_type": "SetClipHooks", "inputs": {"clip": ["1", 1], "apply_to_conds": False,
                                                           "schedule_clip": False, "hooks": ["12", 0]}},
           "11": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 1.0,
                                                         "lora_name": "sd3_kohya.safetensors", "strength_clip": 0.25}}}
    hooked, loaded_clip, plain = loaded(engine, doc, "13")[0], loaded(engine, doc, "11")[1], loaded(engine, doc, "1")[1]
    (name, _), = plain.encoder.clip_g.encoders.items()

    def q(clip) -> torch.Tensor:
        return clip.encoder.clip_g.encoders[name].text_model.encoder.layers[0].self_attn.q_proj.weight

    assert not torch.equal(q(hooked), q(plain))
    torch.testing.assert_close(q(hooked), q(loaded_clip), rtol=0, atol=0)
