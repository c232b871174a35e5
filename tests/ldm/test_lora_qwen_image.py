"""Qwen-Image LoRAs in ComfyUI's, the Lightning LoRAs', kohya's / musubi-tuner's, DiffSynth's and diffusers' / PEFT's
layouts on Loom's QwenImageModel, against diffusers' QwenImageTransformer2DModel with the same file read by diffusers'
own Qwen-Image loader (`QwenImageLoraLoaderMixin.lora_state_dict`: its converter, alphas folded in) and merged into
its layers by hand (peft is not installed, so the pipeline cannot inject its adapters itself)."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import QwenImageLoraLoaderMixin
from safetensors.torch import save_file

from ldm.lora import (
    LoraError,
    apply_lora,
    check_lora_family,
    load_lora,
    lora_family,
    lora_from_state_dict,
    match_lora,
    peek_lora,
)
from ldm.qwen_image import QwenImageModel
from ldm.qwen_image_files import TINY_QWEN_IMAGE, random_qwen_image
from tests.ldm.test_qwen_image import diffusers_twin, inputs, pipeline_call

BLOCK_LAYERS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2",
                "txt_mlp.net.0.proj", "txt_mlp.net.2")
OUTER_LAYERS = ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out")


@pytest.fixture(scope="module")
def model() -> QwenImageModel:
    return random_qwen_image(TINY_QWEN_IMAGE, seed=3)


def _paths(model: QwenImageModel, outer: bool = True) -> list[str]:
    blocks = [f"transformer_blocks.{i}.{name}" for i in range(model.config.num_layers) for name in BLOCK_LAYERS]
    return blocks + list(OUTER_LAYERS) if outer else blocks


def make_lora(model: QwenImageModel, key: str, pairs: tuple[str, str], alphas: float | None, outer: bool = True,
              seed: int = 5, scale: float = 0.15) -> dict:
    """A LoRA on every linear layer (`outer`: the embedders and head too), each named `key.format(path=...,
    flat=...)`, ranks 2..4, factors of about `scale`, an alpha each of `alphas` times about the rank if given."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for n, path in enumerate(_paths(model, outer)):
        out, inp = model.get_submodule(path).weight.shape
        rank, name = 2 + n % 3, key.format(path=path, flat=path.replace(".", "_"))
        sd[f"{name}.{pairs[0]}.weight"] = torch.randn(rank, inp, generator=g) * scale
        sd[f"{name}.{pairs[1]}.weight"] = torch.randn(out, rank, generator=g) * scale
        if alphas is not None:
            sd[f"{name}.alpha"] = torch.tensor(alphas * (rank + n % 2))
    return sd


LAYOUTS = {
    "comfy": lambda m: make_lora(m, "diffusion_model.{path}", ("lora_down", "lora_up"), alphas=1.0),
    "comfy-peft": lambda m: make_lora(m, "diffusion_model.{path}", ("lora_A", "lora_B"), alphas=1.0),
    # The Lightning files: bare names, lora_down/lora_up, alpha an eighth of the rank (8 for 64), the blocks alone.
    "lightning": lambda m: make_lora(m, "{path}", ("lora_down", "lora_up"), alphas=0.125, outer=False, scale=0.4),
    "musubi": lambda m: make_lora(m, "lora_unet_{flat}", ("lora_down", "lora_up"), alphas=1.0),
    "diffsynth": lambda m: make_lora(m, "{path}", ("lora_A.default", "lora_B.default"), alphas=None),
    "diffusers": lambda m: make_lora(m, "transformer.{path}", ("lora_A", "lora_B"), alphas=None),
}


def diffusers_merged(model: QwenImageModel, sd: dict, strength: float) -> torch.nn.Module:
    """diffusers' transformer twin with the file as diffusers' Qwen-Image loader reads it, W + strength * B @ A
    merged into each of its layers."""
    reference = diffusers_twin(model)
    converted = QwenImageLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    merged = 0
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                reference.get_submodule(name).weight += strength * (
                    converted[f"transformer.{name}.lora_B.weight"] @ down)
                merged += 1
    assert merged == len([k for k in sd if k.endswith(("lora_down.weight", "lora_A.weight", "lora_A.default.weight"))])
    return reference


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_matches_diffusers_qwen_image_loader(model, layout: str, strength: float) -> None:
    sd = LAYOUTS[layout](model)
    lora = lora_from_state_dict(sd)
    assert not lora.unknown_keys and len(match_lora(model, lora)) == len(lora.weights)
    x, sigma, context = inputs(8, 8)
    patched = apply_lora(model, lora, strength)
    with torch.no_grad():
        ours, base = patched(x, sigma, context), model(x, sigma, context)
    reference = diffusers_merged(model, sd, strength)
    expected = pipeline_call(reference, x, sigma, context, None)
    assert (ours - base).abs().max() > 0.05  # the LoRA changes the prediction ...
    # ... as diffusers' loader has it: the patched weights are the merged ones, and diffusers' transformer with ours
    # predicts the same to 1e-5; Loom's own forward is held to test_qwen_image's tolerance against diffusers' (their
    # float32 orders of summation differ by ~1e-5 on these outputs of ~3).
    merged = reference.state_dict()
    for key, weight in patched.state_dict().items():
        torch.testing.assert_close(weight, merged[key], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pipeline_call(diffusers_twin(patched), x, sigma, context, None), expected, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=3e-5)
    unchanged = pipeline_call(diffusers_twin(model), x, sigma, context, None)
    torch.testing.assert_close(base, unchanged, rtol=1e-4, atol=3e-5)  # the loaded model is left as it was


def test_full_weight_differences_patch_norms(model, tmp_path) -> None:
    """LyCORIS full-weight differences (`.diff`) on the RMS norms, which diffusers' loader does not patch, and a
    `diff_b` bias change."""
    g = torch.Generator().manual_seed(11)
    targets = {"txt_norm": model.txt_norm.weight,
               "transformer_blocks.1.attn.norm_added_k": model.transformer_blocks[1].attn.norm_added_k.weight,
               "proj_out": model.proj_out.weight}
    sd = {f"diffusion_model.{path}.diff": torch.randn(weight.shape, generator=g) * 0.1
          for path, weight in targets.items()}
    sd["diffusion_model.proj_out.diff_b"] = torch.randn(model.proj_out.bias.shape, generator=g) * 0.1
    path = tmp_path / "full.safetensors"
    save_file(sd, path)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    patched = apply_lora(model, load_lora(path), 0.5)
    state = patched.state_dict()
    for target, weight in targets.items():
        torch.testing.assert_close(state[f"{target}.weight"], weight + 0.5 * sd[f"diffusion_model.{target}.diff"])
    torch.testing.assert_close(state["proj_out.bias"], before["proj_out.bias"] + 0.5 * sd[
        "diffusion_model.proj_out.diff_b"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    x, sigma, context = inputs(8, 8)
    with torch.no_grad():
        assert (patched(x, sigma, context) - model(x, sigma, context)).abs().max() > 0.01


def _lora(*names: str, out: int = 8, inp: int = 8) -> object:
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.zeros(2, inp), torch.zeros(out, 2)
    return lora_from_state_dict(sd)


def test_family_is_told_by_names_and_width() -> None:
    qwen = ("diffusion_model.transformer_blocks.0.attn.to_q", "transformer_blocks.3.img_mod.1",
            "transformer.transformer_blocks.0.txt_mlp.net.2", "lora_unet_transformer_blocks_5_attn_to_add_out",
            "lora_unet_transformer_blocks_0_img_mlp_net_0_proj", "lycoris_transformer_blocks_1_txt_mod_1",
            "transformer.txt_norm", "diffusion_model.transformer_blocks.2.attn.add_k_proj")
    for name in qwen:
        assert lora_family(_lora(name)) == "qwen_image", name
    # diffusers' attention names alone: Qwen-Image's past Flux.1's 19 double blocks at 3072, else Flux's (as before)
    assert lora_family(_lora("transformer.transformer_blocks.40.attn.to_q", out=3072)) == "qwen_image"
    assert lora_family(_lora("transformer.transformer_blocks.4.attn.to_q", out=3072)) == "flux"
    assert lora_family(_lora("transformer.transformer_blocks.40.attn.to_q", out=2432)) == "sd3"
    others = {"lora_unet_double_blocks_0_img_attn_qkv": "flux", "diffusion_model.double_blocks.0.img_mod.lin": "flux",
              "transformer.single_transformer_blocks.3.attn.to_q": "flux",
              "diffusion_model.blocks.0.self_attn.q": "wan",
              "diffusion_model.transformer_blocks.0.attn1.to_q": None,  # LTX-Video's names: attn1, not Qwen's attn
              "lora_unet_joint_blocks_0_x_block_attn_qkv": "sd3",
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": None}
    assert {name: lora_family(_lora(name)) for name in others} == others
    check_lora_family(_lora(*qwen), "qwen_image")
    for family in ("flux", "sd1", "sdxl", "sd3", "wan21", "ltxv", "chroma"):
        with pytest.raises(LoraError, match=f"is a QWEN_IMAGE LoRA; it does not fit a {family.upper()} model"):
            check_lora_family(_lora(*qwen), family)
    for name, found in (("lora_unet_double_blocks_0_img_attn_qkv", "FLUX"), ("diffusion_model.blocks.0.self_attn.q",
                                                                             "WAN")):
        with pytest.raises(LoraError, match=f"is a {found} LoRA; it does not fit a QWEN_IMAGE model"):
            check_lora_family(_lora(name), "qwen_image")


def test_header_alone_tells_the_family_and_a_wider_lora_is_refused(model, tmp_path) -> None:
    """A LoRA for the released 20B model (3072 wide) on the tiny one: the header names it Qwen-Image's, and its
    shapes are refused by layer name."""
    g = torch.Generator().manual_seed(2)
    key = "diffusion_model.transformer_blocks.0.attn.to_q"
    path = tmp_path / "qwen_style.safetensors"
    save_file({f"{key}.lora_down.weight": torch.randn(4, 3072, generator=g),
               f"{key}.lora_up.weight": torch.randn(3072, 4, generator=g), f"{key}.alpha": torch.tensor(4.0)}, path)
    assert lora_family(peek_lora(path)) == "qwen_image"
    with pytest.raises(LoraError, match=r"qwen_style.safetensors does not fit this model .*attn.to_q"):
        apply_lora(model, load_lora(path))
