"""LTX-Video LoRAs in ComfyUI's (Lightricks' names) and diffusers' / PEFT's layouts on Loom's LTXVModel, against
diffusers' LTXVideoTransformer3DModel with the same file read by diffusers' own loader
(`LTXVideoLoraLoaderMixin.lora_state_dict`) and merged into its layers by hand (peft is not installed)."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import LTXVideoLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers

from ldm.checkpoint import UNET_PREFIX
from ldm.lora import LoraError, apply_lora, check_lora_family, lora_family, lora_from_state_dict, match_lora
from ldm.lora_ltxv import diffusers_name
from ldm.ltxv_files import TINY_LTXV, random_ltxv
from tests.ldm.test_ltxv import _diffusers, _inputs, _twin

BLOCK_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
SHARED = ("caption_projection.linear_1", "caption_projection.linear_2", "proj_out")  # named alike by both
RENAMED = ("patchify_proj", "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1")


@pytest.fixture(scope="module")
def model():
    return random_ltxv(TINY_LTXV, seed=3)


def lora(model, layout: str, seed: int = 5) -> dict:
    """Pairs on every block layer and the caption projection and output (ComfyUI: Lightricks' names under
    `diffusion_model.`, which diffusers' loader reads for those alone) or, in diffusers' layout, on the renamed outer
    layers too."""
    g, sd = torch.Generator().manual_seed(seed), {}
    paths = [f"transformer_blocks.{i}.{name}" for i in range(model.config.depth) for name in BLOCK_LAYERS]
    paths += list(SHARED) + (list(RENAMED) if layout == "diffusers" else [])
    for n, path in enumerate(paths):
        out, inp = model.get_submodule(path).weight.shape
        key = f"diffusion_model.{path}" if layout == "comfy" else f"transformer.{diffusers_name(path)}"
        sd[f"{key}.lora_A.weight"] = torch.randn(2 + n % 3, inp, generator=g) * 0.3
        sd[f"{key}.lora_B.weight"] = torch.randn(out, 2 + n % 3, generator=g) * 0.3
    return sd


def diffusers_merged(model, sd: dict, strength: float) -> torch.nn.Module:
    reference = _twin(model)
    converted = LTXVideoLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    with torch.no_grad():
        for key, down in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                reference.get_submodule(name).weight += strength * (converted[f"transformer.{name}.lora_B.weight"]
                                                                    @ down)
    return reference


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("layout", ["comfy", "diffusers"])
def test_lora_matches_diffusers_ltxv_loader(model, layout: str, strength: float) -> None:
    sd = lora(model, layout)
    loaded = lora_from_state_dict(sd)
    assert not loaded.unknown_keys and len(match_lora(model, loaded)) == len(loaded.weights)
    x, sigma, context = _inputs()
    patched = apply_lora(model, loaded, strength)
    with torch.no_grad():
        ours, base = patched(x, sigma, context), model(x, sigma, context)
    assert (ours - base).abs().max() > 0.05
    torch.testing.assert_close(ours, _diffusers(diffusers_merged(model, sd, strength), x, sigma, context),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base, _diffusers(_twin(model), x, sigma, context), atol=1e-5, rtol=1e-5)


def test_diffusers_names_are_diffusers_converters(model) -> None:
    converted = convert_ltx_transformer_checkpoint_to_diffusers(
        {UNET_PREFIX + k: v.clone() for k, v in model.state_dict().items()})
    for key, tensor in model.state_dict().items():
        path, suffix = (key[:-7], ".weight") if key.endswith(".weight") else (key, "")
        if not key.endswith(".bias"):
            assert torch.equal(converted[diffusers_name(path) + suffix], tensor), key


def test_modulation_tables_take_full_weight_differences(model) -> None:
    diff = torch.randn(model.transformer_blocks[1].scale_shift_table.shape)
    patched = apply_lora(model, lora_from_state_dict({"diffusion_model.transformer_blocks.1.scale_shift_table.diff":
                                                      diff, "scale_shift_table.diff": torch.ones(2, 64)}), 0.5)
    torch.testing.assert_close(patched.transformer_blocks[1].scale_shift_table,
                               model.transformer_blocks[1].scale_shift_table + 0.5 * diff)
    torch.testing.assert_close(patched.scale_shift_table, model.scale_shift_table + 0.5)


def test_family_is_told_by_markers_and_released_widths() -> None:
    def of(*names: str, width: int = 8) -> object:
        return lora_from_state_dict({k: v for name in names for k, v in (
            (f"{name}.lora_A.weight", torch.zeros(2, width)), (f"{name}.lora_B.weight", torch.zeros(width, 2)))})

    assert lora_family(of("diffusion_model.patchify_proj")) == "ltxv"
    assert lora_family(of("transformer_blocks.0.attn1.q_norm")) == "ltxv"
    assert lora_family(of("diffusion_model.transformer_blocks.0.attn1.to_q", width=2048)) == "ltxv"
    # attn2.to_k 2048 wide alone would read as SDXL's cross-attention: the output width tells LTX-Video first
    assert lora_family(of("transformer.transformer_blocks.3.attn2.to_k", "transformer.transformer_blocks.3.attn2.to_q",
                          width=2048)) == "ltxv"
    assert lora_family(of("transformer.transformer_blocks.0.attn1.to_q", width=1152)) is None  # PixArt's too
    assert lora_family(of("transformer.transformer_blocks.0.attn.to_q", width=3072)) == "flux"
    check_lora_family(of("diffusion_model.patchify_proj"), "ltxv")
    with pytest.raises(LoraError, match="is a LTXV LoRA; it does not fit a WAN21 model"):
        check_lora_family(of("diffusion_model.patchify_proj"), "wan21")
    with pytest.raises(LoraError, match="is a WAN LoRA; it does not fit a LTXV model"):
        check_lora_family(of("diffusion_model.blocks.0.self_attn.q"), "ltxv")
