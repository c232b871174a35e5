"""SD3/SD3.5 LoRAs in diffusers'/PEFT's, kohya's and Stability's layouts on Loom's Stability-layout MMDiT: diffusers'
split q/k/v parts against diffusers' own SD3Transformer2DModel with the pairs merged into its unfused layers by hand,
kohya's and Stability's against the delta computed here on the fused weights; CLIP-L/G keys; family checks."""

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
from tests.ldm.mmdit_reference import TINY_SD3, VARIANTS, diffusers_call, diffusers_twin, random_mmdit
from tests.ldm.test_mmdit import inputs

# diffusers layers patched by the test LoRA (-1: the last, pre-only block): every kind, several ranks, some with an
# alpha (alpha/rank scaling), some without (scale 1).
BLOCK_LAYERS = {
    "attn.to_q": (2, 3.0), "attn.to_k": (3, None), "attn.to_v": (4, 1.0), "attn.add_q_proj": (2, 4.0),
    "attn.add_k_proj": (1, None), "attn.add_v_proj": (3, 2.0), "attn.to_out.0": (2, None),
    "ff.net.0.proj": (3, None), "ff.net.2": (2, 2.0), "norm1.linear": (2, None), "norm1_context.linear": (3, 1.5),
}
FULL_BLOCK = {"attn.to_add_out": (2, 1.0), "ff_context.net.0.proj": (2, None), "ff_context.net.2": (4, 8.0)}
DUAL = {"attn2.to_q": (2, None), "attn2.to_k": (3, 1.0), "attn2.to_v": (2, 4.0), "attn2.to_out.0": (3, None)}
OUTER = {"pos_embed.proj": (2, 1.0), "context_embedder": (2, None),
         "time_text_embed.timestep_embedder.linear_1": (2, None), "time_text_embed.text_embedder.linear_2": (3, 2.0),
         "proj_out": (2, None), "norm_out.linear": (3, 1.5)}


def layers(reference: torch.nn.Module) -> dict[str, tuple[int, float | None]]:
    found = dict(OUTER)
    blocks = reference.transformer_blocks
    for i, block in enumerate(blocks):
        found.update({f"transformer_blocks.{i}.{k}": v for k, v in BLOCK_LAYERS.items()})
        if i < len(blocks) - 1:
            found.update({f"transformer_blocks.{i}.{k}": v for k, v in FULL_BLOCK.items()})
        if getattr(block, "attn2", None) is not None:  # SD3.5 medium's MMDiT-X blocks
            found.update({f"transformer_blocks.{i}.{k}": v for k, v in DUAL.items()})
    return found


def diffusers_lora(reference: torch.nn.Module, seed: int = 3, pairs: tuple = ("lora_A", "lora_B")) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (rank, alpha) in layers(reference).items():
        weight = reference.get_submodule(name).weight
        sd[f"transformer.{name}.{pairs[0]}.weight"] = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.3
        sd[f"transformer.{name}.{pairs[1]}.weight"] = torch.randn(
            weight.shape[0], rank, *[1] * (weight.dim() - 2), generator=generator) * 0.3
        if alpha is not None:
            sd[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    return sd


def merged_by_hand(reference: torch.nn.Module, sd: dict, strength: float, pairs: tuple) -> torch.nn.Module:
    """diffusers' model with W + strength * alpha/rank * B @ A on each of its own (unfused) layers."""
    merged = copy.deepcopy(reference)
    for name, (rank, alpha) in layers(reference).items():
        a, b = sd[f"transformer.{name}.{pairs[0]}.weight"], sd[f"transformer.{name}.{pairs[1]}.weight"]
        weight = merged.get_submodule(name).weight
        scale = alpha / rank if alpha is not None else 1.0
        weight.data += strength * scale * (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)
    return merged


@pytest.fixture(scope="module", params=list(VARIANTS))
def twins(request):
    model = random_mmdit(VARIANTS[request.param])
    return model, diffusers_twin(model)


@pytest.mark.parametrize(("strength", "pairs"), [(1.0, ("lora_A", "lora_B")), (0.5, ("lora_down", "lora_up"))])
def test_diffusers_lora_matches_diffusers(twins, strength: float, pairs: tuple) -> None:
    model, reference = twins
    sd = diffusers_lora(reference, pairs=pairs)
    lora = lora_from_state_dict(sd)
    assert lora_family(lora) == "sd3" and not lora.unknown_keys and not unmatched_lora_keys(lora, model)
    patched = apply_lora(model, lora, strength)
    x, sigma, context, pooled = inputs(model.config, 2)
    with torch.no_grad():
        ours, base = patched(x, sigma, context, pooled), model(x, sigma, context, pooled)
    expected = diffusers_call(merged_by_hand(reference, sd, strength, pairs), x, sigma, context, pooled)
    assert (expected - base).abs().mean() > 0.05  # the LoRA changes the output well beyond the tolerance
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # the base model is untouched
    qkv = "joint_blocks.0.x_block.attn.qkv.weight"
    assert not torch.equal(patched.get_parameter(qkv), model.get_parameter(qkv))
    torch.testing.assert_close(diffusers_call(reference, x, sigma, context, pooled), base, rtol=1e-5, atol=1e-5)


def _pair(generator: torch.Generator, out_features: int, in_features: int, rank: int) -> tuple:
    return (torch.randn(rank, in_features, generator=generator) * 0.3,
            torch.randn(out_features, rank, generator=generator) * 0.3)


@pytest.mark.parametrize("layout", ["kohya", "stability-peft"])
def test_fused_layer_layouts_patch_stability_weights(layout: str) -> None:
    model = random_mmdit(VARIANTS["sd3.5-medium"])
    generator = torch.Generator().manual_seed(5)
    patched_layers = {"joint_blocks.0.x_block.attn.qkv": (4, 2.0), "joint_blocks.1.context_block.mlp.fc1": (2, None),
                      "joint_blocks.0.x_block.attn2.qkv": (3, 1.0), "joint_blocks.2.context_block.attn.qkv": (2, 4.0),
                      "joint_blocks.2.context_block.adaLN_modulation.1": (2, None), "final_layer.linear": (2, 1.0),
                      "y_embedder.mlp.0": (3, None)}
    sd, expected = {}, {}
    for path, (rank, alpha) in patched_layers.items():
        weight = model.get_submodule(path).weight
        down, up = _pair(generator, *weight.shape, rank)
        if layout == "kohya":
            name, suffixes = "lora_unet_" + path.replace(".", "_"), (".lora_down.weight", ".lora_up.weight")
        else:
            name, suffixes = "diffusion_model." + path, (".lora_A.weight", ".lora_B.weight")
        sd[name + suffixes[0]], sd[name + suffixes[1]] = down, up
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(alpha)
        expected[path] = weight + 0.5 * (up @ down) * (alpha / rank if alpha is not None else 1.0)
    lora = lora_from_state_dict(sd)
    assert lora_family(lora) == "sd3"
    patched = apply_lora(model, lora, 0.5)
    for path, weight in expected.items():
        torch.testing.assert_close(patched.get_submodule(path).weight, weight, rtol=1e-6, atol=1e-6)
    assert patched.joint_blocks[1].x_block.attn.proj.weight is model.joint_blocks[1].x_block.attn.proj.weight


def test_families_are_told_apart_and_misfits_named() -> None:
    model = random_mmdit(TINY_SD3)
    h = TINY_SD3.hidden_size
    sd3 = lora_from_state_dict({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, h),
                                "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(3 * h, 2)})
    for family in ("sd1", "sdxl", "flux"):
        with pytest.raises(LoraError, match=f"is a SD3 LoRA; it does not fit a {family.upper()} model"):
            check_lora_family(sd3, family)
    sd1 = lora_from_state_dict({
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 768),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 2)})
    with pytest.raises(LoraError, match="is a SD1 LoRA; it does not fit a SD3 model"):
        check_lora_family(sd1, "sd3")
    mlp = "transformer.single_transformer_blocks.0.proj_mlp"
    flux = lora_from_state_dict({f"{mlp}.lora_A.weight": torch.zeros(2, h),
                                 f"{mlp}.lora_B.weight": torch.zeros(4 * h, 2)})
    with pytest.raises(LoraError, match="is a FLUX LoRA; it does not fit a SD3 model"):
        check_lora_family(flux, "sd3")
    assert not match_lora(model, flux)  # no SD3 name: it would patch nothing

    def top(name: str, out_features: int, in_features: int) -> dict:
        return lora_from_state_dict({f"transformer.{name}.lora_A.weight": torch.zeros(2, in_features),
                                     f"transformer.{name}.lora_B.weight": torch.zeros(out_features, 2)})

    # diffusers' double-stream blocks alone: by released widths, else undecided
    assert lora_family(top("transformer_blocks.0.attn.to_q", 1536, 1536)) == "sd3"
    assert lora_family(top("transformer_blocks.0.attn.add_k_proj", 2432, 2432)) == "sd3"
    assert lora_family(top("transformer_blocks.0.attn.to_q", 3072, 3072)) == "flux"
    assert lora_family(top("time_text_embed.text_embedder.linear_1", 1536, 2048)) == "sd3"
    assert lora_family(top("transformer_blocks.0.attn.to_q", 32, 32)) is None
    assert lora_family(top("transformer_blocks.1.attn2.to_q", 32, 32)) == "sd3"
    # a full-size SD3 file on the tiny model names the misfit slot
    with pytest.raises(LoraError, match=r"attn\.to_k: LoRA \[1536 out, 1536 in\], model \(32, 32\)"):
        match_lora(model, top("transformer_blocks.0.attn.to_k", 1536, 1536))


def test_kohya_and_diffusers_clip_keys_patch_sd3_clips(tmp_path) -> None:
    from ldm.sd3_presets import make_sd3_files
    from ldm.sd3_text import load_sd3_text_encoders

    files = make_sd3_files(tmp_path, seed=1, dtype=torch.float32)
    encoder = load_sd3_text_encoders([files["clip_l"], files["clip_g"], files["t5xxl"]]).encoder
    (l_name, clip_l), = encoder.clip_l.encoders.items()
    (g_name, clip_g), = encoder.clip_g.encoders.items()
    q = clip_l.text_model.encoder.layers[0].self_attn.q_proj.weight
    v = clip_g.text_model.encoder.layers[1].self_attn.v_proj.weight
    fc = clip_g.text_model.encoder.layers[0].mlp.fc1.weight
    generator = torch.Generator().manual_seed(7)
    (q_down, q_up), (v_down, v_up), (f_down, f_up) = (_pair(generator, *q.shape, 2), _pair(generator, *v.shape, 3),
                                                      _pair(generator, *fc.shape, 2))
    lora = lora_from_state_dict({
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": q_down,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": q_up,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
        "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight": v_down,
        "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight": v_up,
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": f_down,
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": f_up})
    assert unmatched_lora_keys(lora, encoder) == []  # T5's keys (lora_te3_): tests/ldm/test_lora_t5.py
    patched = apply_lora(encoder, lora, 0.5)
    l_layers = patched.clip_l.encoders[l_name].text_model.encoder.layers
    g_layers = patched.clip_g.encoders[g_name].text_model.encoder.layers
    torch.testing.assert_close(l_layers[0].self_attn.q_proj.weight, q + 0.5 * 0.5 * q_up @ q_down)
    torch.testing.assert_close(g_layers[1].self_attn.v_proj.weight, v + 0.5 * v_up @ v_down)
    torch.testing.assert_close(g_layers[0].mlp.fc1.weight, fc + 0.5 * f_up @ f_down)
    before, after = encoder.encode(["a red fox"]), patched.encode(["a red fox"])
    assert not torch.allclose(before.cond, after.cond) and not torch.allclose(before.pooled, after.pooled)
