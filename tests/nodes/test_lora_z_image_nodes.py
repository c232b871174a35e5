"""Z-Image LoRAs through LoraLoaderModelOnly and LoraLoader in the tiny Z-Image-Turbo workflow of test_z_image_nodes:
the sampled latent equals an Euler loop over diffusers' ZImageTransformer2DModel with the same file read by diffusers'
own Z-Image loader and merged in, strength 0 gives the plain result, the text-encoder part is left alone (Qwen3 takes
no LoRA) with a warning, and LoRAs of other families are refused naming both families."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from executor.executor import WorkflowInvalid
from graph.document import parse_api
from graph.validate import validate
from ldm.flux_files import FLUX_VAE, LATENT_SHIFT
from ldm.sampling import prepare_noise
from ldm.z_image_files import load_z_image_unet
from nodes.sd.loaders import LoraLoaderModelOnly
from tests.ldm.test_lora_z_image import diffusers_merged, make_lora
from tests.ldm.test_z_image import pipeline_call
from tests.nodes.test_z_image_nodes import (  # noqa: F401 (the fixture)
    HEIGHT,
    SEED,
    SHIFT,
    STEPS,
    WIDTH,
    base,
    prompt_states,
    run,
    workflow,
)

LORA, STRENGTH = "pixel_art_style_z_image_turbo-tiny.safetensors", 0.8
TEXT_KEY = "lora_te_model_layers_0_self_attn_q_proj"  # a Qwen3 layer under kohya's text-encoder prefix


@pytest.fixture(scope="module")
def lora(base) -> dict[str, torch.Tensor]:  # noqa: F811 (the fixture)
    """An ai-toolkit-layout LoRA (diffusers' names under `diffusion_model.`, lora_A / lora_B) on every linear layer
    of the tiny transformer, and one text-encoder pair, written to models/loras."""
    files = base[1]
    sd = make_lora(load_z_image_unet(files["unet"], dtype=torch.float32).unet, "diffusion_model.{name}",
                   ("lora_A", "lora_B"), alphas=None, scale=0.3)
    sd[f"{TEXT_KEY}.lora_down.weight"], sd[f"{TEXT_KEY}.lora_up.weight"] = torch.randn(2, 32), torch.randn(32, 2)
    loras = files["unet"].parents[1] / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    save_file(sd, loras / LORA)
    return sd


def with_lora(files: dict, node: dict) -> dict:
    """The workflow with `node` (a LoRA loader as node 30) between UNETLoader and ModelSamplingAuraFlow."""
    doc = workflow(files["unet"].name, files["vae"].name)
    doc["30"] = node
    doc["4"]["inputs"]["model"] = ["30", 0]
    return doc


def model_only(files: dict, strength: float, name: str = LORA) -> dict:
    return with_lora(files, {"class_type": "LoraLoaderModelOnly",
                             "inputs": {"model": ["1", 0], "lora_name": name, "strength_model": strength}})


def merged_reference(files: dict, lora: dict, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Euler (ComfyUI's `simple` levels, shift 3) over diffusers' transformer with the LoRA as diffusers' Z-Image
    loader reads it, merged at STRENGTH (the text-encoder pair left out: diffusers' loader takes none)."""
    transformer = {k: v for k, v in lora.items() if not k.startswith("lora_te_")}
    twin = diffusers_merged(load_z_image_unet(files["unet"], dtype=torch.float32).unet, transformer, STRENGTH)
    ts = [1 - int(i * 1000 / STEPS) / 1000 for i in range(STEPS)]
    sigmas = [SHIFT * t / (1 + (SHIFT - 1) * t) for t in ts] + [0.0]
    x = prepare_noise(torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8), SEED)
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:], strict=False):
            x = x + (following - sigma) * pipeline_call(twin, x, torch.tensor([sigma]), states, mask)
    return x / FLUX_VAE.scaling_factor + LATENT_SHIFT


def test_lora_model_only_matches_diffusers_loader(base, lora) -> None:  # noqa: F811
    engine, files = base
    plain = run(engine, workflow(files["unet"].name, files["vae"].name), ("8",))[0]["samples"]
    patched, image = run(engine, model_only(files, STRENGTH), ("8", "9"))
    assert (patched["samples"] - plain).abs().max() > 0.05 and image.std() > 0.01
    expected = merged_reference(files, lora, *prompt_states())
    torch.testing.assert_close(patched["samples"], expected, rtol=1e-4, atol=1e-4)  # test_z_image_nodes' tolerance
    assert torch.equal(run(engine, model_only(files, 0.0), ("8",))[0]["samples"], plain)
    unchanged = run(engine, workflow(files["unet"].name, files["vae"].name), ("8",))[0]["samples"]
    assert torch.equal(unchanged, plain)  # the cached transformer is untouched


def test_lora_loader_patches_the_transformer_and_leaves_qwen3_alone(base, lora, caplog) -> None:  # noqa: F811
    """CLIPLoader type lumina2 -> LoraLoader -> CLIPTextEncode: the prompt is the plain CLIP's, the model patched as
    LoraLoaderModelOnly patches it, and the text-encoder keys are named as patching nothing."""
    engine, files = base
    plain = workflow(files["unet"].name, files["vae"].name)
    plain["2"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": files["qwen3"].name, "type": "lumina2"}}
    plain["5"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "pixel art, a red fox"}}
    both = {**plain, "30": {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "lora_name": LORA, "strength_model": STRENGTH, "strength_clip": 1.0}}}
    both["4"] = {**plain["4"], "inputs": {**plain["4"]["inputs"], "model": ["30", 0]}}
    both["5"] = {**plain["5"], "inputs": {**plain["5"]["inputs"], "clip": ["30", 1]}}
    with caplog.at_level(logging.WARNING):
        latent, positive = run(engine, both, ("8", "5"))
    assert "keys patch nothing in this model (its text encoder takes no LoRA: the diffusion model alone is " \
           "patched), e.g." in caplog.text
    assert f"{TEXT_KEY}.lora_down.weight" in caplog.text
    unpatched = run(engine, plain, ("5",))[0]
    assert torch.equal(positive[0][0], unpatched[0][0])
    states, options = positive[0]
    expected = merged_reference(files, lora, states.float(), options.get("attention_mask",
                                                                         torch.ones(states.shape[:2])))
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-4, atol=1e-4)


def test_loras_of_other_families_are_refused(base, lora) -> None:  # noqa: F811
    engine, files = base
    loras = files["unet"].parents[1] / "loras"
    others = {"flux_style.safetensors": ("lora_unet_double_blocks_0_img_attn_qkv", 3072, "FLUX"),
              "qwen_style.safetensors": ("diffusion_model.transformer_blocks.0.img_mod.1", 3072, "QWEN_IMAGE"),
              "wan_style.safetensors": ("diffusion_model.blocks.0.self_attn.q", 5120, "WAN21")}
    for name, (key, width, family) in others.items():
        save_file({f"{key}.lora_down.weight": torch.zeros(4, width), f"{key}.lora_up.weight": torch.zeros(width, 4)},
                  loras / name)
        doc = model_only(files, 1.0, name)
        [problem] = validate(parse_api(doc), engine.registry).problems
        assert f"{name} is a {family} LoRA; it does not fit the Z_IMAGE model" in problem.details
        with pytest.raises(WorkflowInvalid):
            engine.run(parse_api(doc))
    assert validate(parse_api(model_only(files, 1.0)), engine.registry).problems == []
    for family in ("flux", "sdxl", "qwen_image", "wan21"):
        message = LoraLoaderModelOnly.check_links({"lora_name": LORA}, {"model": {"family": family}})
        assert message == f"{LORA} is a Z_IMAGE LoRA; it does not fit the {family.upper()} model it is applied to"
