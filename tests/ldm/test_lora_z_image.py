"""Z-Image LoRAs in diffusers' / PEFT's, ai-toolkit's (ComfyUI's), DiffSynth's and kohya's / musubi-tuner's layouts
on Loom's ZImageModel (fused `attention.qkv`), against diffusers' ZImageTransformer2DModel (split q, k, v) with the
same file read by diffusers' own Z-Image loader (`ZImageLoraLoaderMixin.lora_state_dict`: its converter, alphas
folded in) and merged into its layers by hand (peft is not installed, so `load_lora_adapter` cannot inject the
adapters itself; with peft 0.21 on the path, `load_lora_adapter` + `fuse_lora` gave these merged weights bit for bit
in every layout here); the family checks."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import ZImageLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
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
    unmatched_lora_keys,
)
from ldm.lora_z_image import diffusers_name
from ldm.z_image import ZImageModel
from ldm.z_image_files import TINY_Z_IMAGE, random_z_image
from tests.ldm.test_z_image import diffusers_twin, inputs, pipeline_call


@pytest.fixture(scope="module")
def model() -> ZImageModel:
    return random_z_image(TINY_Z_IMAGE, seed=3).float()


def _linears(model: ZImageModel, fused: bool, outer: bool = True) -> list[str]:
    """Our linear layers' paths (`fused`: `attention.qkv` whole; else diffusers' names, q / k / v apart)."""
    names = []
    for path, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear) or not (outer or path.startswith(("layers.", "noise_refiner.",
                                                                                    "context_refiner."))):
            continue
        if fused:
            names.append(path)
        elif path.endswith(".qkv"):
            names += [path.removesuffix("qkv") + part for part in ("to_q", "to_k", "to_v")]
        else:
            names.append(diffusers_name(path))
    return names


def make_lora(model: ZImageModel, key: str, pairs: tuple[str, str], alphas: float | None, fused: bool = False,
              outer: bool = True, seed: int = 5, scale: float = 0.15) -> dict:
    """A LoRA on every linear layer, each named `key.format(name=..., flat=...)` (diffusers' names, or ours where
    `fused`), ranks 2..4, factors of about `scale`, an alpha each of `alphas` times about the rank if given."""
    g, sd, dim = torch.Generator().manual_seed(seed), {}, model.config.dim
    for n, name in enumerate(_linears(model, fused, outer)):
        if name.endswith(("to_q", "to_k", "to_v")):
            out, inp = dim, dim
        else:
            out, inp = model.get_submodule(name if fused else _our_path(model, name)).weight.shape
        rank, key_name = 2 + n % 3, key.format(name=name, flat=name.replace(".", "_"))
        sd[f"{key_name}.{pairs[0]}.weight"] = torch.randn(rank, inp, generator=g) * scale
        sd[f"{key_name}.{pairs[1]}.weight"] = torch.randn(out, rank, generator=g) * scale
        if alphas is not None:
            sd[f"{key_name}.alpha"] = torch.tensor(alphas * (rank + n % 2))
    return sd


def _our_path(model: ZImageModel, diffusers: str) -> str:
    return next(path for path, _ in model.named_modules() if diffusers_name(path) == diffusers)


LAYOUTS = {
    "diffusers": lambda m: make_lora(m, "transformer.{name}", ("lora_A", "lora_B"), alphas=None),
    # ai-toolkit's files: diffusers' names under ComfyUI's prefix
    "ai-toolkit": lambda m: make_lora(m, "diffusion_model.{name}", ("lora_A", "lora_B"), alphas=None),
    "comfy-kohya-pair": lambda m: make_lora(m, "diffusion_model.{name}", ("lora_down", "lora_up"), alphas=1.0),
    "kohya": lambda m: make_lora(m, "lora_unet_{flat}", ("lora_down", "lora_up"), alphas=1.0),
    "diffsynth": lambda m: make_lora(m, "{name}", ("lora_A.default", "lora_B.default"), alphas=None),
    # kohya-style trainers on the original module tree: the fused qkv and `attention.out` (diffusers' converter
    # reads these in the `.lora.down` spelling only, and the blocks alone)
    "kohya-fused": lambda m: make_lora(m, "lora_unet_{flat}", ("lora.down", "lora.up"), alphas=0.5, fused=True,
                                       outer=False),
}


def twice_written(model: ZImageModel) -> dict:
    """kohya's layout where the trainer writes each attention twice: diffusers' q, k, v and `to_out.0` (alphas), and
    the fused `qkv` and bare `out` (different weights, no alphas) that diffusers' loader takes as repeats."""
    sd = make_lora(model, "lora_unet_{flat}", ("lora_down", "lora_up"), alphas=1.0)
    fused = make_lora(model, "lora_unet_{flat}", ("lora_down", "lora_up"), alphas=None, fused=True, outer=False,
                      seed=9)
    return {**sd, **{k: v for k, v in fused.items() if "_attention_qkv." in k or "_attention_out." in k}}


LAYOUTS["kohya-twice"] = twice_written


def diffusers_merged(model: ZImageModel, sd: dict, strength: float) -> torch.nn.Module:
    """diffusers' transformer twin with the file as diffusers' Z-Image loader reads it, W + strength * B @ A merged
    into each of its layers."""
    reference = diffusers_twin(model)
    converted = ZImageLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                reference.get_submodule(name).weight += strength * (
                    converted[f"transformer.{name}.lora_B.weight"] @ down)
    return reference


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_matches_diffusers_z_image_loader(model, layout: str, strength: float) -> None:
    sd = LAYOUTS[layout](model)
    lora = lora_from_state_dict(sd)
    assert not lora.unknown_keys and not unmatched_lora_keys(lora, model)
    assert lora_family(lora) == "z_image"
    outer = layout != "kohya-fused"
    assert set(match_lora(model, lora)) == set(_linears(model, fused=True, outer=outer))  # q, k, v on the fused qkv
    # diffusers' loader reads a patch for each of its layers (the fused ones split, the repeats left out)
    converted = ZImageLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    assert sorted(k for k in converted if k.endswith(".lora_A.weight")) == sorted(
        f"transformer.{name}.lora_A.weight" for name in _linears(model, fused=False, outer=outer))
    x, sigma, context = inputs(8, 8)
    patched = apply_lora(model, lora, strength)
    with torch.no_grad():
        ours, base = patched(x, sigma, context), model(x, sigma, context)
    reference = diffusers_merged(model, sd, strength)
    assert (ours - base).abs().max() > 0.05  # the LoRA changes the prediction ...
    # ... as diffusers' loader has it: our patched weights, split as diffusers' converter splits them, are diffusers'
    # merged ones layer by layer, and the predictions agree to test_z_image's tolerance
    merged = reference.state_dict()
    ours_as_diffusers = convert_z_image_transformer_checkpoint_to_diffusers(dict(patched.state_dict()))
    assert ours_as_diffusers.keys() == merged.keys()
    for key, weight in ours_as_diffusers.items():
        torch.testing.assert_close(weight, merged[key], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, pipeline_call(reference, x, sigma, context), rtol=1e-5, atol=1e-5)


def test_full_weight_differences_patch_norms(model) -> None:
    """LyCORIS full-weight differences on the RMS norms by our names and diffusers' (`norm_q`)."""
    g = torch.Generator().manual_seed(11)
    sd = {"diffusion_model.layers.1.attention.norm_q.diff": torch.randn(TINY_Z_IMAGE.head_dim, generator=g),
          "diffusion_model.cap_embedder.0.diff": torch.randn(TINY_Z_IMAGE.cap_feat_dim, generator=g)}
    patched = apply_lora(model, lora_from_state_dict(sd), 0.5)
    torch.testing.assert_close(patched.layers[1].attention.q_norm.weight, model.layers[1].attention.q_norm.weight
                               + 0.5 * sd["diffusion_model.layers.1.attention.norm_q.diff"])
    torch.testing.assert_close(patched.cap_embedder[0].weight, model.cap_embedder[0].weight
                               + 0.5 * sd["diffusion_model.cap_embedder.0.diff"])


def _lora(*names: str, out: int = 8, inp: int = 8) -> object:
    sd = {}
    for name in names:
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = torch.zeros(2, inp), torch.zeros(out, 2)
    return lora_from_state_dict(sd)


def test_family_is_told_by_names() -> None:
    z_image = ("diffusion_model.layers.0.attention.to_q", "transformer.layers.29.feed_forward.w2",
               "lora_unet_layers_3_attention_qkv", "lora_unet_noise_refiner_0_adaLN_modulation_0",
               "diffusion_model.all_x_embedder.2-1", "transformer.cap_embedder.1", "layers.4.attention.to_out.0",
               "lycoris_context_refiner_1_attention_out", "base_model.model.layers.0.attention.to_v")
    for name in z_image:
        assert lora_family(_lora(name)) == "z_image", name
    others = {"lora_unet_double_blocks_0_img_attn_qkv": "flux", "transformer.single_transformer_blocks.3.attn.to_q":
              "flux", "diffusion_model.transformer_blocks.0.img_mod.1": "qwen_image",
              "diffusion_model.blocks.0.self_attn.q": "wan", "lora_unet_joint_blocks_0_x_block_attn_qkv": "sd3",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": None,  # CLIP's layers: not Z-Image's
              "lora_te_model_layers_0_self_attn_q_proj": None}  # a Qwen3 text-encoder LoRA: no family
    assert {name: lora_family(_lora(name)) for name in others} == others
    check_lora_family(_lora(*z_image), "z_image")
    for family in ("flux", "sdxl", "sd3", "wan21", "qwen_image", "chroma"):
        with pytest.raises(LoraError, match=f"is a Z_IMAGE LoRA; it does not fit a {family.upper()} model"):
            check_lora_family(_lora(*z_image), family)
    for name, found in (("lora_unet_double_blocks_0_img_attn_qkv", "FLUX"),
                        ("diffusion_model.transformer_blocks.0.img_mod.1", "QWEN_IMAGE"),
                        ("diffusion_model.blocks.0.self_attn.q", "WAN")):
        with pytest.raises(LoraError, match=f"is a {found} LoRA; it does not fit a Z_IMAGE model"):
            check_lora_family(_lora(name), "z_image")


def test_header_alone_tells_the_family_and_a_wider_lora_is_refused(model, tmp_path) -> None:
    """A LoRA for the released 6B model (3840 wide) on the tiny one: the header names it Z-Image's, and its shapes
    are refused by layer name."""
    g = torch.Generator().manual_seed(2)
    key = "diffusion_model.layers.0.attention.to_q"
    path = tmp_path / "pixel_art_style_z_image_turbo.safetensors"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 3840, generator=g),
               f"{key}.lora_B.weight": torch.randn(3840, 4, generator=g)}, path)
    assert lora_family(peek_lora(path)) == "z_image"
    with pytest.raises(LoraError, match=r"pixel_art_style_z_image_turbo.safetensors does not fit this model "
                                        r".*attention.to_q"):
        apply_lora(model, load_lora(path))
