"""Wan LoRAs through LoraLoaderModelOnly and LoraLoader in the Wan 2.1 text-to-video workflow of test_wan_nodes: the
sampled latent equals the plain workflow's run on a transformer file with the LoRA merged in by hand, strength 0 gives
the plain result, the text-encoder part is left alone (Wan's UMT5 takes no LoRA), and a LoRA of another family is
refused at validation."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from executor.executor import WorkflowInvalid
from graph.document import parse_api
from graph.validate import validate
from ldm.checkpoint import UNET_PREFIX, write_safetensors
from ldm.wan_files import HEADS_KEY, load_wan_unet
from nodes.sd.loaders import LoraLoaderModelOnly
from tests.nodes.test_wan_nodes import base, engine, run, workflow  # noqa: F401 (the fixtures)

LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
          "cross_attn.o", "ffn.0", "ffn.2")
LORA, STRENGTH = "wan_style-tiny.safetensors", 0.8


@pytest.fixture(scope="module")
def lora(base) -> dict[str, torch.Tensor]:  # noqa: F811 (the fixture)
    """A ComfyUI-layout LoRA on every block layer and the head (alphas, a `diff_b`), and one UMT5 layer's pair under
    kohya's text-encoder name, written to models/loras."""
    paths, files = base
    unet = load_wan_unet(files["t2v"]).unet
    g, sd = torch.Generator().manual_seed(4), {}
    targets = [f"blocks.{i}.{name}" for i in range(unet.config.num_layers) for name in LAYERS] + ["head.head"]
    for n, path in enumerate(targets):
        out, inp = unet.get_submodule(path).weight.shape
        key = f"diffusion_model.{path}"
        sd[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.5
        sd[f"{key}.alpha"] = torch.tensor(2.0 + n % 3)
    sd["diffusion_model.head.head.diff_b"] = torch.randn(unet.head.head.bias.shape, generator=g) * 0.1
    text = "lora_te_encoder_block_0_layer_0_SelfAttention_q"
    sd[f"{text}.lora_down.weight"], sd[f"{text}.lora_up.weight"] = torch.randn(2, 32), torch.randn(32, 2)
    loras = paths.model_dirs("loras")[0]
    loras.mkdir(parents=True, exist_ok=True)
    save_file(sd, loras / LORA)
    return sd


def with_lora(node: dict) -> dict:
    """The text-to-video workflow with `node` (a LoRA loader as node 30) between UNETLoader and ModelSamplingSD3."""
    doc = workflow()
    doc["30"] = node
    doc["4"]["inputs"]["model"] = ["30", 0]
    return doc


def model_only(strength: float, name: str = LORA) -> dict:
    return with_lora({"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": ["1", 0], "lora_name": name, "strength_model": strength}})


def test_lora_model_only_equals_the_lora_merged_by_hand(engine, base, lora) -> None:  # noqa: F811
    paths, files = base
    plain = run(engine, workflow(), keep=("8",))[0]["samples"]
    patched = run(engine, model_only(STRENGTH), keep=("8",))[0]["samples"]
    assert (patched - plain).abs().max() > 0.05
    # The same transformer file with W + strength * alpha/rank * up @ down (and the bias change) written in.
    state = {k: v.clone() for k, v in load_wan_unet(files["t2v"]).unet.state_dict().items()}
    for key in lora:
        if key.endswith(".lora_down.weight") and key.startswith("diffusion_model."):
            path = key.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
            down, up = lora[key], lora[f"diffusion_model.{path}.lora_up.weight"]
            scale = lora[f"diffusion_model.{path}.alpha"].item() / down.shape[0]
            state[f"{path}.weight"] += STRENGTH * scale * up @ down
    state["head.head.bias"] += STRENGTH * lora["diffusion_model.head.head.diff_b"]
    merged = "wan2.1_t2v_merged-tiny.safetensors"
    write_safetensors({UNET_PREFIX + k: v for k, v in state.items()},
                      paths.model_dirs("diffusion_models")[0] / merged, {HEADS_KEY: "2"})
    expected = run(engine, workflow(merged), keep=("8",))[0]["samples"]
    # 1e-4: four CFG steps amplify the float32 rounding of merging in another order (as test_wan_nodes' tolerances)
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(run(engine, model_only(0.0), keep=("8",))[0]["samples"], plain)
    assert torch.equal(run(engine, workflow(), keep=("8",))[0]["samples"], plain)  # the cached model is untouched


def test_lora_loader_patches_the_transformer_and_leaves_umt5_alone(engine, lora, caplog) -> None:  # noqa: F811
    both = with_lora({"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "lora_name": LORA, "strength_model": STRENGTH, "strength_clip": 1.0}})
    for node in ("5", "6"):
        both[node]["inputs"]["clip"] = ["30", 1]
    with caplog.at_level(logging.WARNING):
        patched = run(engine, both, keep=("8",))[0]["samples"]
    assert "keys patch nothing in this model (its text encoder takes no LoRA: the diffusion model alone is " \
           "patched), e.g." in caplog.text
    assert "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in caplog.text  # named as unused
    torch.testing.assert_close(patched, run(engine, model_only(STRENGTH), keep=("8",))[0]["samples"], rtol=0, atol=0)


def test_loras_of_other_families_are_refused_at_validation(engine, base) -> None:  # noqa: F811
    loras = base[0].model_dirs("loras")[0]
    loras.mkdir(parents=True, exist_ok=True)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(96, 4)},
              loras / "flux_style.safetensors")
    doc = model_only(1.0, "flux_style.safetensors")
    [problem] = validate(parse_api(doc), engine.registry).problems
    assert "flux_style.safetensors is a FLUX LoRA; it does not fit the WAN21 model" in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(doc))
    key = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 4)},
              loras / "wan_only.safetensors")
    for family in ("flux", "sd1", "sdxl", "ltxv"):
        message = LoraLoaderModelOnly.check_links({"lora_name": "wan_only.safetensors"}, {"model": {"family": family}})
        assert message == f"wan_only.safetensors is a WAN LoRA; it does not fit the {family.upper()} model it is " \
                          "applied to"
    for family in ("wan21", "wan22"):  # a LoRA of a width no release has fits either Wan family
        assert LoraLoaderModelOnly.check_links({"lora_name": "wan_only.safetensors"}, {"model": {"family": family}}) \
            is None
