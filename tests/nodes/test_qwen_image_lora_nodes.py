"""Qwen-Image LoRAs through LoraLoaderModelOnly and LoraLoader in the tiny Qwen-Image workflow of
test_qwen_image_nodes: the sampled latent equals the plain workflow's run on a transformer file with the LoRA merged
in by hand, strength 0 gives the plain result, the text-encoder part is left alone (Qwen2.5-VL takes no LoRA), and a
LoRA of another family is refused at validation (and a Qwen-Image LoRA on other families' models)."""

from __future__ import annotations

import logging

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.validate import validate
from nodes.registry import builtin_registry
from nodes.sd.loaders import LoraLoaderModelOnly
from tests.nodes.test_qwen_image_nodes import base, run, workflow  # noqa: F401 (the fixture)

LAYERS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
          "txt_mlp.net.0.proj", "txt_mlp.net.2")
LORA, STRENGTH = "qwen_style-tiny.safetensors", 0.8
TEXT_KEY = "lora_te_model_layers_0_self_attn_q_proj"  # a Qwen2.5-VL layer under kohya's text-encoder prefix


@pytest.fixture(scope="module")
def unet_file(base) -> dict[str, torch.Tensor]:  # noqa: F811 (the fixture)
    return safetensors.torch.load_file(base[1]["unet"])


@pytest.fixture(scope="module")
def lora(base, unet_file) -> dict[str, torch.Tensor]:  # noqa: F811
    """A ComfyUI-layout LoRA on every block layer and the head (alphas, a `diff_b`), and one text-encoder pair,
    written to models/loras."""
    paths, _ = base
    g, sd = torch.Generator().manual_seed(4), {}
    blocks = {int(k.split(".")[1]) for k in unet_file if k.startswith("transformer_blocks.")}
    targets = [f"transformer_blocks.{i}.{name}" for i in sorted(blocks) for name in LAYERS] + ["proj_out"]
    for n, path in enumerate(targets):
        out, inp = unet_file[f"{path}.weight"].shape
        key = f"diffusion_model.{path}"
        sd[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(2.0 + n % 3)
    sd["diffusion_model.proj_out.diff_b"] = torch.randn(unet_file["proj_out.bias"].shape, generator=g) * 0.1
    sd[f"{TEXT_KEY}.lora_down.weight"], sd[f"{TEXT_KEY}.lora_up.weight"] = torch.randn(2, 32), torch.randn(32, 2)
    loras = paths.model_dirs("loras")[0]
    loras.mkdir(parents=True, exist_ok=True)
    save_file(sd, loras / LORA)
    return sd


@pytest.fixture
def engine(base) -> Executor:  # noqa: F811
    return Executor(builtin_registry(), services=Services.create(base[0]))


def with_lora(files: dict, node: dict) -> dict:
    """The workflow with `node` (a LoRA loader as node 30) between UNETLoader and ModelSamplingAuraFlow."""
    doc = workflow(files, cfg=2.0)
    doc["30"] = node
    doc["4"]["inputs"]["model"] = ["30", 0]
    return doc


def model_only(files: dict, strength: float, name: str = LORA) -> dict:
    return with_lora(files, {"class_type": "LoraLoaderModelOnly",
                             "inputs": {"model": ["1", 0], "lora_name": name, "strength_model": strength}})


def test_lora_model_only_equals_the_lora_merged_by_hand(engine, base, lora, unet_file) -> None:  # noqa: F811
    paths, files = base
    plain = run(engine, workflow(files, cfg=2.0), ("8",))[0]["samples"]
    patched = run(engine, model_only(files, STRENGTH), ("8",))[0]["samples"]
    assert (patched - plain).abs().max() > 0.05
    # The same transformer file with W + strength * alpha/rank * up @ down (and the bias change) written in.
    state = {k: v.clone() for k, v in unet_file.items()}
    for key in lora:
        if key.endswith(".lora_down.weight") and key.startswith("diffusion_model."):
            path = key.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
            down, up = lora[key], lora[f"diffusion_model.{path}.lora_up.weight"]
            scale = lora[f"diffusion_model.{path}.alpha"].item() / down.shape[0]
            state[f"{path}.weight"] += STRENGTH * scale * up @ down
    state["proj_out.bias"] += STRENGTH * lora["diffusion_model.proj_out.diff_b"]
    merged = files["unet"].with_name("qwen_image_merged-tiny.safetensors")
    with safetensors.safe_open(files["unet"], "pt") as f:
        metadata = f.metadata()  # the RoPE split of the tiny model's heads
    save_file(state, merged, metadata)
    expected = run(engine, workflow({**files, "unet": merged}, cfg=2.0), ("8",))[0]["samples"]
    # 1e-4: four CFG steps amplify the float32 rounding of merging in another order (as test_qwen_image_nodes')
    torch.testing.assert_close(patched, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(run(engine, model_only(files, 0.0), ("8",))[0]["samples"], plain)
    assert torch.equal(run(engine, workflow(files, cfg=2.0), ("8",))[0]["samples"], plain)  # the cache is untouched


def test_lora_loader_patches_the_transformer_and_leaves_qwen25vl_alone(engine, base, lora, caplog) -> None:  # noqa: F811
    files = base[1]
    both = with_lora(files, {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "lora_name": LORA, "strength_model": STRENGTH, "strength_clip": 1.0}})
    for node in ("5", "6"):
        both[node]["inputs"]["clip"] = ["30", 1]
    with caplog.at_level(logging.WARNING):
        patched = run(engine, both, ("8",))[0]["samples"]
    assert "keys patch nothing in this model (its text encoder takes no LoRA: the diffusion model alone is " \
           "patched), e.g." in caplog.text
    assert f"{TEXT_KEY}.lora_down.weight" in caplog.text  # named as unused
    torch.testing.assert_close(patched, run(engine, model_only(files, STRENGTH), ("8",))[0]["samples"], rtol=0, atol=0)


def test_loras_of_other_families_are_refused_at_validation(engine, base, lora) -> None:  # noqa: F811
    paths, files = base
    loras = paths.model_dirs("loras")[0]
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(96, 4)},
              loras / "flux_style.safetensors")
    doc = model_only(files, 1.0, "flux_style.safetensors")
    [problem] = validate(parse_api(doc), engine.registry).problems
    assert "flux_style.safetensors is a FLUX LoRA; it does not fit the QWEN_IMAGE model" in problem.details
    with pytest.raises(WorkflowInvalid):
        engine.run(parse_api(doc))
    assert validate(parse_api(model_only(files, 1.0)), engine.registry).problems == []
    others = {"wan_style.safetensors": ("diffusion_model.blocks.0.self_attn.q", 5120, "WAN21"),
              "sd15_style.safetensors": ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768,
                                         "SD1")}
    for name, (key, width, family) in others.items():
        save_file({f"{key}.lora_down.weight": torch.zeros(4, width), f"{key}.lora_up.weight": torch.zeros(width, 4)},
                  loras / name)
        [problem] = validate(parse_api(model_only(files, 1.0, name)), engine.registry).problems
        assert f"{name} is a {family} LoRA; it does not fit the QWEN_IMAGE model" in problem.details
    for family in ("flux", "sd1", "sdxl", "sd3", "wan21", "ltxv"):
        message = LoraLoaderModelOnly.check_links({"lora_name": LORA}, {"model": {"family": family}})
        assert message == f"{LORA} is a QWEN_IMAGE LoRA; it does not fit the {family.upper()} model it is applied to"
