"""LTX-Video LoRAs through LoraLoaderModelOnly and LoraLoader in the text-to-video workflow of test_ltxv_nodes: the
sampled latent equals the plain workflow's run on a checkpoint with the LoRA merged in by hand, strength 0 gives the
plain result, the T5 is left alone, and a Wan LoRA is refused at validation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from graph.document import parse_api
from graph.validate import validate
from ldm.checkpoint import UNET_PREFIX, load_state_dict, read_metadata, write_safetensors
from tests.nodes.test_ltxv_nodes import base, engine, run, workflow  # noqa: F401 (the fixtures)

LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_v", "ff.net.0.proj",
          "ff.net.2")
LORA, STRENGTH = "ltxv_style-tiny.safetensors", 0.7


@pytest.fixture(scope="module")
def lora(base) -> dict[str, torch.Tensor]:  # noqa: F811 (the fixture)
    """A ComfyUI-layout (LTX-Video-Trainer) LoRA on the blocks' attention and MLP layers, written to models/loras."""
    paths, files = base
    checkpoint = load_state_dict(files["checkpoint"])
    g, sd = torch.Generator().manual_seed(4), {}
    for i in range(2):
        for name in LAYERS:
            out, inp = checkpoint[f"{UNET_PREFIX}transformer_blocks.{i}.{name}.weight"].shape
            key = f"diffusion_model.transformer_blocks.{i}.{name}"
            sd[f"{key}.lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.4
            sd[f"{key}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.4
    loras = paths.model_dirs("loras")[0]
    loras.mkdir(parents=True, exist_ok=True)
    save_file(sd, loras / LORA)
    return sd


def with_lora(node: dict) -> dict:
    doc = workflow()
    doc["30"] = node
    doc["9"]["inputs"]["model"] = ["30", 0]
    return doc


def model_only(strength: float, name: str = LORA) -> dict:
    return with_lora({"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": ["1", 0], "lora_name": name, "strength_model": strength}})


def test_lora_model_only_equals_the_lora_merged_by_hand(engine, base, lora) -> None:  # noqa: F811
    paths, files = base
    [plain] = run(engine, workflow(), keep=("9",))
    [patched] = run(engine, model_only(STRENGTH), keep=("9",))
    assert (patched[0]["samples"] - plain[0]["samples"]).abs().max() > 0.05
    state = {k: v.clone() for k, v in load_state_dict(files["checkpoint"]).items()}
    for key, down in lora.items():
        if key.endswith(".lora_A.weight"):
            path = key.removeprefix("diffusion_model.").removesuffix(".lora_A.weight")
            weight = f"{UNET_PREFIX}{path}.weight"
            state[weight] = state[weight].float() + STRENGTH * (lora[key.replace("lora_A", "lora_B")] @ down)
    merged = "ltxv-merged-tiny.safetensors"
    write_safetensors(state, paths.model_dirs("checkpoints")[0] / merged, read_metadata(files["checkpoint"]))
    doc = workflow()
    doc["1"]["inputs"]["ckpt_name"] = merged
    [expected] = run(engine, doc, keep=("9",))
    # 1e-4: the sampling steps amplify the float32 rounding of merging in another order (test_ltxv_nodes' tolerance)
    torch.testing.assert_close(patched[0]["samples"], expected[0]["samples"], rtol=1e-4, atol=1e-4)
    assert torch.equal(run(engine, model_only(0.0), keep=("9",))[0][0]["samples"], plain[0]["samples"])


def test_lora_loader_patches_the_transformer_and_leaves_t5_alone(engine, lora) -> None:  # noqa: F811
    both = with_lora({"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "lora_name": LORA, "strength_model": STRENGTH, "strength_clip": 1.0}})
    for node in ("3", "4"):
        both[node]["inputs"]["clip"] = ["30", 1]
    [patched] = run(engine, both, keep=("9",))
    [model_only_result] = run(engine, model_only(STRENGTH), keep=("9",))
    assert torch.equal(patched[0]["samples"], model_only_result[0]["samples"])


def test_a_wan_lora_is_refused_at_validation(engine, base) -> None:  # noqa: F811
    loras = base[0].model_dirs("loras")[0]
    loras.mkdir(parents=True, exist_ok=True)
    key = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 64), f"{key}.lora_up.weight": torch.zeros(64, 4)},
              loras / "wan_style.safetensors")
    [problem] = validate(parse_api(model_only(1.0, "wan_style.safetensors")), engine.registry).problems
    assert "wan_style.safetensors is a WAN LoRA; it does not fit the LTXV model" in problem.details
