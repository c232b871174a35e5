"""T5-XXL LoRA keys of Flux and SD3 LoRAs (ldm.lora_t5): each trainer's names patch Loom's T5, checked against the
same LoRA merged by hand into transformers' T5EncoderModel."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import T5EncoderModel

from ldm.lora import apply_lora, check_lora_family, lora_family, lora_from_state_dict, unmatched_lora_keys

STRENGTH = 0.7
# (dotted layer name in T5EncoderModel, rank, alpha or None) for the layers a test LoRA patches.
LAYERS = [("encoder.block.0.layer.0.SelfAttention.q", 2, 1.0), ("encoder.block.0.layer.0.SelfAttention.o", 3, None),
          ("encoder.block.1.layer.1.DenseReluDense.wi_0", 2, 4.0),
          ("encoder.block.1.layer.1.DenseReluDense.wo", 2, None)]


def t5_lora(reference: T5EncoderModel, spell, seed: int = 5) -> dict[str, torch.Tensor]:
    """A LoRA of `LAYERS`, each named by `spell(dotted name)` -> (file name, down suffix, up suffix)."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for layer, rank, alpha in LAYERS:
        out_features, in_features = reference.get_submodule(layer).weight.shape
        name, down, up = spell(layer)
        sd[f"{name}{down}"] = torch.randn(rank, in_features, generator=generator) * 0.2
        sd[f"{name}{up}"] = torch.randn(out_features, rank, generator=generator) * 0.2
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def merged_by_hand(reference: T5EncoderModel, sd: dict[str, torch.Tensor], spell) -> T5EncoderModel:
    """`reference` with W + strength * (alpha / rank) * up @ down on each layer (alpha: the rank when absent)."""
    merged = T5EncoderModel(reference.config).eval()
    merged.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for layer, rank, alpha in LAYERS:
            name, down, up = spell(layer)
            scale = (alpha if alpha is not None else rank) / rank
            merged.get_submodule(layer).weight += STRENGTH * scale * sd[f"{name}{up}"] @ sd[f"{name}{down}"]
    return merged


def reference_t5(path) -> T5EncoderModel:
    """transformers' T5 encoder with a T5 file's weights, read by safetensors (not by Loom's loader)."""
    from ldm.t5 import t5_config_from_state_dict

    weights = load_file(str(path))
    model = T5EncoderModel(t5_config_from_state_dict(weights).transformers_config()).eval()
    model.load_state_dict(weights, strict=False)
    return model


def kohya(prefix: str):
    return lambda layer: (prefix + layer.replace(".", "_"), ".lora_down.weight", ".lora_up.weight")


def peft(prefix: str):
    return lambda layer: (prefix + layer, ".lora_A.weight", ".lora_B.weight")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from ldm.flux_presets import make_flux_files
    from ldm.flux_text import load_flux_text_encoders

    files = make_flux_files(tmp_path_factory.mktemp("flux_t5"), "schnell", seed=4, dtype=torch.float32)
    return load_flux_text_encoders([files["clip_l"], files["t5xxl"]]).encoder, reference_t5(files["t5xxl"])


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from ldm.sd3_presets import make_sd3_files
    from ldm.sd3_text import load_sd3_text_encoders

    files = make_sd3_files(tmp_path_factory.mktemp("sd3_t5"), seed=4, dtype=torch.float32)
    loaded = load_sd3_text_encoders([files["clip_l"], files["clip_g"], files["t5xxl"]])
    return loaded.encoder, reference_t5(files["t5xxl"]), files


def assert_matches_reference(encoder, reference: T5EncoderModel, spell) -> None:
    sd = t5_lora(reference, spell)
    lora = lora_from_state_dict(sd)
    assert unmatched_lora_keys(lora, encoder) == []
    patched = apply_lora(encoder, lora, STRENGTH)
    ids = torch.tensor([[37, 1782, 5, 3, 9, 1, 0, 0]])
    with torch.no_grad():
        ours, base = patched.t5xxl(ids), encoder.t5xxl(ids)
        expected = merged_by_hand(reference, sd, spell)(input_ids=ids).last_hidden_state
        unpatched = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(base, unpatched, rtol=0, atol=1e-5)  # the same T5 before the LoRA
    assert (expected - unpatched).abs().max() > 1e-2  # the LoRA moves the encoding
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spell", [kohya("lora_te3_"), kohya("lora_te2_"), peft("text_encoder_2."),
                                   peft("text_encoders.t5xxl.transformer.")],
                         ids=["sd-scripts", "onetrainer", "diffusers", "comfyui"])
def test_flux_t5_keys_match_the_lora_merged_into_transformers_t5(flux, spell):
    encoder, reference = flux
    assert_matches_reference(encoder, reference, spell)


@pytest.mark.parametrize("spell", [kohya("lora_te3_"), peft("text_encoder_3.")], ids=["sd-scripts", "diffusers"])
def test_sd3_t5_keys_match_the_lora_merged_into_transformers_t5(sd3, spell):
    encoder, reference, _ = sd3
    assert_matches_reference(encoder, reference, spell)


def test_sd3_t5_alone_takes_comfyuis_te1_and_sd3s_clip_keys_stay_clip(sd3):
    from ldm.sd3_text import SD3TextEncoder

    encoder, reference, _ = sd3
    alone = SD3TextEncoder(None, None, encoder.t5xxl)
    assert_matches_reference(alone, reference, kohya("lora_te1_"))  # ComfyUI numbers T5 after the CLIPs present
    # With both CLIPs, lora_te2_ is CLIP-G's and a T5-named lora_te2_ key patches nothing.
    stray_sd = t5_lora(reference, kohya("lora_te2_"))
    stray = lora_from_state_dict(stray_sd)
    assert unmatched_lora_keys(stray, encoder) == sorted(stray_sd) and apply_lora(encoder, stray) is encoder


def test_the_t5_patch_leaves_the_base_encoder_and_clip_alone(flux):
    encoder, reference = flux
    lora = lora_from_state_dict(t5_lora(reference, kohya("lora_te3_")))
    weight = encoder.t5xxl.model.encoder.block[0].layer[0].SelfAttention.q.weight.clone()
    patched = apply_lora(encoder, lora, STRENGTH)
    assert torch.equal(encoder.t5xxl.model.encoder.block[0].layer[0].SelfAttention.q.weight, weight)
    before, after = encoder.encode(["a red fox"]), patched.encode(["a red fox"])
    assert torch.equal(before.pooled, after.pooled) and not torch.allclose(before.cond, after.cond)


def test_t5_keys_do_not_read_as_sdxl_and_a_wrong_width_is_refused(flux):
    encoder, reference = flux
    for spell in (kohya("lora_te2_"), peft("text_encoder_2.")):
        lora = lora_from_state_dict(t5_lora(reference, spell))
        assert lora_family(lora) is None
        check_lora_family(lora, "flux")
    wide = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 4096),
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(4096, 2)}
    with pytest.raises(ValueError, match=r"lora_te3_encoder_block_0_layer_0_SelfAttention_q: LoRA \[4096 out, 4096"):
        apply_lora(encoder, lora_from_state_dict(wide))
