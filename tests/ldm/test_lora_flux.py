"""Flux LoRAs in diffusers'/PEFT's, kohya's and BFL's layouts on Loom's BFL-layout transformer: diffusers' split
q/k/v/mlp parts against diffusers' own FluxTransformer2DModel with the pairs merged into its unfused layers by hand,
kohya's and BFL's against the delta computed here on the fused weights; family checks both ways."""

from __future__ import annotations

import copy

import pytest
import torch

from ldm.lora import (
    LoraError,
    apply_lora,
    check_lora_family,
    lora_family,
    lora_from_state_dict,
    match_lora,
    unmatched_lora_keys,
)
from tests.ldm.flux_reference import TINY, diffusers_call, diffusers_twin, random_flux
from tests.ldm.test_flux import inputs

# diffusers layers (of the tiny model) patched by the test LoRA: every kind of name, the split parts with
# different ranks, some with an alpha (alpha/rank scaling), some without (scale 1, PEFT's default file).
DIFFUSERS_LAYERS = {
    "transformer_blocks.0.attn.to_q": (2, 3.0), "transformer_blocks.0.attn.to_k": (3, None),
    "transformer_blocks.0.attn.to_v": (4, 1.0), "transformer_blocks.1.attn.add_q_proj": (2, 4.0),
    "transformer_blocks.1.attn.add_k_proj": (1, None), "transformer_blocks.1.attn.add_v_proj": (3, 2.0),
    "transformer_blocks.0.attn.to_out.0": (2, None), "transformer_blocks.0.attn.to_add_out": (2, 1.0),
    "transformer_blocks.1.ff.net.0.proj": (3, None), "transformer_blocks.1.ff.net.2": (2, 2.0),
    "transformer_blocks.0.ff_context.net.0.proj": (2, None), "transformer_blocks.0.ff_context.net.2": (4, 8.0),
    "transformer_blocks.1.norm1.linear": (2, None), "transformer_blocks.0.norm1_context.linear": (3, 1.5),
    "single_transformer_blocks.0.attn.to_q": (2, None), "single_transformer_blocks.0.attn.to_k": (4, 2.0),
    "single_transformer_blocks.1.attn.to_v": (3, None), "single_transformer_blocks.1.proj_mlp": (2, 5.0),
    "single_transformer_blocks.0.proj_out": (2, None), "single_transformer_blocks.1.norm.linear": (2, 1.0),
    "x_embedder": (2, None), "context_embedder": (2, 1.0), "time_text_embed.timestep_embedder.linear_1": (2, None),
    "time_text_embed.guidance_embedder.linear_2": (2, None), "time_text_embed.text_embedder.linear_1": (3, 2.0),
    "proj_out": (2, None), "norm_out.linear": (3, 1.5),
}


def diffusers_lora(reference: torch.nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (rank, alpha) in DIFFUSERS_LAYERS.items():
        out_features, in_features = reference.get_submodule(name).weight.shape
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
        if alpha is not None:
            sd[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    return sd


def merged_by_hand(reference: torch.nn.Module, sd: dict[str, torch.Tensor], strength: float) -> torch.nn.Module:
    """diffusers' model with W + strength * alpha/rank * B @ A on each of its own (unfused) layers."""
    merged = copy.deepcopy(reference)
    for name, (rank, alpha) in DIFFUSERS_LAYERS.items():
        a, b = sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"]
        scale = alpha / rank if alpha is not None else 1.0
        merged.get_submodule(name).weight.data += strength * scale * (b @ a)
    return merged


@pytest.fixture(scope="module")
def twins():
    model = random_flux(TINY)
    return model, diffusers_twin(model)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_diffusers_lora_matches_diffusers(twins, strength: float) -> None:
    model, reference = twins
    sd = diffusers_lora(reference)
    lora = lora_from_state_dict(sd)
    assert lora_family(lora) == "flux" and not lora.unknown_keys
    patched = apply_lora(model, lora, strength)
    x, sigma, context, pooled = inputs(2)
    guidance = torch.tensor([3.5, 2.0])
    with torch.no_grad():
        ours = patched(x, sigma, context, torch.cat([pooled, guidance[:, None]], dim=1))
        base = model(x, sigma, context, torch.cat([pooled, guidance[:, None]], dim=1))
    expected = diffusers_call(merged_by_hand(reference, sd, strength), x, sigma, context, pooled, guidance)
    assert (expected - base).abs().mean() > 0.05  # the LoRA changes the output well beyond the tolerance
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # the base model is untouched, and fused layers patched only in part keep their other rows
    qkv = patched.single_blocks[1].linear1.weight
    h = TINY.hidden_size
    torch.testing.assert_close(qkv[: 2 * h], model.single_blocks[1].linear1.weight[: 2 * h], rtol=0, atol=0)
    assert not torch.equal(qkv[2 * h: 3 * h], model.single_blocks[1].linear1.weight[2 * h: 3 * h])


def _pair(generator: torch.Generator, out_features: int, in_features: int, rank: int) -> tuple:
    return (torch.randn(rank, in_features, generator=generator) * 0.3,
            torch.randn(out_features, rank, generator=generator) * 0.3)


@pytest.mark.parametrize("layout", ["kohya", "bfl-peft", "bfl-kohya"])
def test_fused_layer_layouts_patch_bfl_weights(twins, layout: str) -> None:
    model, _ = twins
    generator = torch.Generator().manual_seed(5)
    layers = {"double_blocks.0.img_attn.qkv": (4, 2.0), "double_blocks.1.txt_mlp.0": (2, None),
              "single_blocks.0.linear1": (3, 1.0), "single_blocks.1.linear2": (2, 4.0),
              "final_layer.adaLN_modulation.1": (2, None), "img_in": (2, 1.0)}
    sd, expected = {}, {}
    for path, (rank, alpha) in layers.items():
        weight = model.get_submodule(path).weight
        down, up = _pair(generator, *weight.shape, rank)
        if layout == "kohya":
            name, suffixes = "lora_unet_" + path.replace(".", "_"), (".lora_down.weight", ".lora_up.weight")
        else:
            name = "diffusion_model." + path
            suffixes = (".lora_A.weight", ".lora_B.weight") if layout == "bfl-peft" else (
                ".lora_down.weight", ".lora_up.weight")
        sd[name + suffixes[0]], sd[name + suffixes[1]] = down, up
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(alpha)
        expected[path] = weight + 0.5 * (up @ down) * (alpha / rank if alpha is not None else 1.0)
    lora = lora_from_state_dict(sd)
    assert lora_family(lora) == "flux"
    patched = apply_lora(model, lora, 0.5)
    for path, weight in expected.items():
        torch.testing.assert_close(patched.get_submodule(path).weight, weight, rtol=1e-6, atol=1e-6)
    assert patched.get_submodule("double_blocks.0.img_attn.proj").weight is model.double_blocks[0].img_attn.proj.weight


def test_whole_and_split_patches_of_one_layer_both_apply(twins) -> None:
    model, _ = twins
    generator = torch.Generator().manual_seed(6)
    h = TINY.hidden_size
    down, up = _pair(generator, 3 * h, h, 2)
    q_down, q_up = _pair(generator, h, h, 3)
    lora = lora_from_state_dict({
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": q_down,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": q_up})
    expected = model.double_blocks[0].img_attn.qkv.weight + up @ down
    expected[:h] += q_up @ q_down
    patched = apply_lora(model, lora)
    torch.testing.assert_close(patched.double_blocks[0].img_attn.qkv.weight, expected, rtol=1e-6, atol=1e-6)


def test_wrong_shapes_and_families_are_refused(twins) -> None:
    model, reference = twins
    flux = lora_from_state_dict(diffusers_lora(reference))
    with pytest.raises(LoraError, match="is a FLUX LoRA; it does not fit a SD1 model"):
        check_lora_family(flux, "sd1")
    sd1 = lora_from_state_dict({
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 768),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 2)})
    with pytest.raises(LoraError, match="is a SD1 LoRA; it does not fit a FLUX model"):
        check_lora_family(sd1, "flux")
    check_lora_family(flux, "flux")
    # a Flux LoRA of another width (a full-size file's to_k on the tiny model) names the misfit slot
    wide = lora_from_state_dict({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(2, 3072),
                                 "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(3072, 2)})
    with pytest.raises(LoraError, match=r"attn\.to_k: LoRA \[3072 out, 3072 in\], model \(32, 32\)"):
        match_lora(model, wide)


def test_kohya_and_diffusers_clip_l_keys_patch_flux_clip_l(tmp_path) -> None:
    from ldm.flux_presets import make_flux_files
    from ldm.flux_text import load_flux_text_encoders

    files = make_flux_files(tmp_path, "schnell", seed=1)
    encoder = load_flux_text_encoders([files["clip_l"], files["t5xxl"]]).encoder
    (name, clip), = encoder.clip_l.encoders.items()
    q = clip.text_model.encoder.layers[0].self_attn.q_proj.weight
    v = clip.text_model.encoder.layers[1].self_attn.v_proj.weight
    generator = torch.Generator().manual_seed(7)
    (q_down, q_up), (v_down, v_up) = _pair(generator, *q.shape, 2), _pair(generator, *v.shape, 3)
    lora = lora_from_state_dict({
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": q_down,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": q_up,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_A.weight": v_down,
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_B.weight": v_up})
    patched = apply_lora(encoder, lora, 0.5)
    layers = patched.clip_l.encoders[name].text_model.encoder.layers
    torch.testing.assert_close(layers[0].self_attn.q_proj.weight, q + 0.5 * 0.5 * q_up @ q_down)
    torch.testing.assert_close(layers[1].self_attn.v_proj.weight, v + 0.5 * v_up @ v_down)
    before = encoder.encode(["a red fox"])
    after = patched.encode(["a red fox"])
    assert torch.equal(before.cond, after.cond) and not torch.allclose(before.pooled, after.pooled)


@pytest.mark.parametrize("name", ["transformer.single_transformer_blocks.1.attn.to_v",
                                  "single_transformer_blocks.1.attn.to_v",
                                  "lora_transformer_single_transformer_blocks_1_attn_to_v",
                                  "lycoris_single_transformer_blocks_1_attn_to_v"])
def test_every_diffusers_spelling_comfyui_reads_lands_on_the_same_rows(twins, name: str) -> None:
    model, _ = twins
    h = TINY.hidden_size
    down, up = _pair(torch.Generator().manual_seed(8), h, h, 2)
    patched = apply_lora(model, lora_from_state_dict({f"{name}.lora_down.weight": down,
                                                      f"{name}.lora_up.weight": up}))
    expected = model.single_blocks[1].linear1.weight.clone()
    expected[2 * h: 3 * h] += up @ down
    torch.testing.assert_close(patched.single_blocks[1].linear1.weight, expected, rtol=1e-6, atol=1e-6)


def test_linear1_qkv_patches_the_attention_rows_of_linear1(twins) -> None:
    model, _ = twins
    h = TINY.hidden_size
    down, up = _pair(torch.Generator().manual_seed(9), 3 * h, h, 2)
    name = "diffusion_model.single_blocks.0.linear1_qkv"
    patched = apply_lora(model, lora_from_state_dict({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}))
    expected = model.single_blocks[0].linear1.weight.clone()
    expected[: 3 * h] += up @ down
    torch.testing.assert_close(patched.single_blocks[0].linear1.weight, expected, rtol=1e-6, atol=1e-6)


def test_a_lora_extracted_from_a_flux_difference_loads_back(twins) -> None:
    from ldm.lora_extract import extract_lora

    model, reference = twins
    patched = apply_lora(model, lora_from_state_dict(diffusers_lora(reference)))
    difference = copy.deepcopy(model)
    for name, parameter in difference.named_parameters():
        parameter.data = patched.get_parameter(name) - model.get_parameter(name)
    qkv = "double_blocks.0.img_attn.qkv"
    full = extract_lora(difference, rank=8, lora_type="full_diff")
    assert f"diffusion_model.{qkv}.diff" in full
    exact = apply_lora(model, lora_from_state_dict({k: v.float() for k, v in full.items()}))
    for name, parameter in patched.named_parameters():
        torch.testing.assert_close(exact.get_parameter(name), parameter, rtol=0, atol=2e-3)  # fp16 differences
    # low-rank pairs (their accuracy is test_lora_extract's): under BFL's names, every one matching a layer
    standard = lora_from_state_dict(extract_lora(difference, rank=12))
    assert f"diffusion_model.{qkv}" in standard.weights and not unmatched_lora_keys(standard, model)
    assert set(match_lora(model, standard)) == set(match_lora(model, lora_from_state_dict(full)))
