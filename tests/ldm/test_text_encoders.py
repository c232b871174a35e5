"""Text encoders against transformers' and open_clip's own models with identical weights, and LDM keys."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.text_encoders import (
    TextEncoder,
    build_text_encoder,
    random_text_encoder_config,
    text_encoder_config_from_state_dict,
)
from ldm.tokenizer import CHUNK_LENGTH, END_TOKEN, START_TOKEN
from tests.ldm.open_clip_ref import open_clip_module

PROMPTS = ["a photo of an astronaut riding a horse, highly detailed", "", "cat"]
SD1_PREFIX = "cond_stage_model.transformer.text_model."
SD2_PREFIX = "cond_stage_model.model."
SDXL_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_G_PREFIX = "conditioner.embedders.1.model."


def relative_error(ours: Tensor, reference: Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def perturbed(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter (LayerNorms included) distinct random values, so no mapping slip hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return module.eval()


def reference_ids(prompts: list[str], pad: int) -> Tensor:
    """77-token ids from open_clip's tokenizer, independent of ours."""
    tokenizer = open_clip_module("tokenizer").SimpleTokenizer()
    rows = []
    for prompt in prompts:
        ids = [START_TOKEN, *tokenizer.encode(prompt), END_TOKEN]
        rows.append(ids + [pad] * (CHUNK_LENGTH - len(ids)))
    return torch.tensor(rows)


def reference_clip_l(
    hidden: int, layers: int, heads: int, intermediate: int, seed: int, perturb: bool = True
) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=END_TOKEN,
    )
    model = CLIPTextModel(config)
    return perturbed(model, seed) if perturb else model.eval()


def clip_l_ldm_keys(model: CLIPTextModel, prefix: str) -> dict[str, Tensor]:
    state = {key.removeprefix("text_model."): value for key, value in model.state_dict().items()}
    sd = {prefix + key: value for key, value in state.items()}
    sd[prefix + "embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None]  # tolerated
    return sd


def clip_l_run(model: CLIPTextModel, ids: Tensor) -> tuple[list[Tensor], Tensor, nn.Module]:
    inner = getattr(model, "text_model", model)
    with torch.no_grad():
        out = inner(input_ids=ids, output_hidden_states=True)
    return list(out.hidden_states), out.pooler_output, inner.final_layer_norm


def reference_open_clip(hidden: int, layers: int, heads: int, intermediate: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = open_clip_module("transformer").TextTransformer(
        context_length=77,
        vocab_size=49408,
        width=hidden,
        heads=heads,
        layers=layers,
        mlp_ratio=intermediate / hidden,
        output_dim=hidden,
        act_layer=nn.GELU,
    )
    return perturbed(model, seed)


def open_clip_ldm_keys(model: nn.Module, prefix: str) -> dict[str, Tensor]:
    sd = {prefix + key: value for key, value in model.state_dict().items()}
    sd[prefix + "logit_scale"] = torch.tensor(4.6052)  # real files carry it; nothing reads it
    return sd


def open_clip_run(model: nn.Module, ids: Tensor) -> tuple[list[Tensor], Tensor, nn.Module]:
    with torch.no_grad():
        out = model.forward_intermediates(ids, output_fmt="NLC")
    return out["text_intermediates"], out["text_features"], model.ln_final


def loaded(sd: dict[str, Tensor], device: str | None = None) -> TextEncoder:
    config = text_encoder_config_from_state_dict(sd)
    assert config is not None
    encoder = build_text_encoder(config, device=device)
    assert encoder.load_ldm_state_dict(sd) == set(sd)
    return encoder


@pytest.fixture(scope="module")
def sd1_reference() -> CLIPTextModel:
    return reference_clip_l(32, 3, 2, 64, seed=1)


def test_sd1_matches_transformers_clip_text_model(sd1_reference) -> None:
    encoder = loaded(clip_l_ldm_keys(sd1_reference, SD1_PREFIX))
    assert encoder.config.family == "sd1" and encoder.config.encoders[0].num_layers == 3
    hidden, pooled, final_norm = clip_l_run(sd1_reference, reference_ids(PROMPTS, END_TOKEN))
    with torch.no_grad():
        out = encoder.encode(PROMPTS)
        assert relative_error(out.cond, final_norm(hidden[-1])) < 1e-4
        assert relative_error(out.pooled, pooled) < 1e-4
        skipped = encoder.encode(PROMPTS, clip_skip=-2)
        assert relative_error(skipped.cond, final_norm(hidden[-2])) < 1e-4
        assert relative_error(encoder.encode(PROMPTS, clip_skip=-1).cond, out.cond) == 0


def test_full_size_sd15_matches_transformers() -> None:
    config = random_text_encoder_config("sd15").encoders[0]
    reference = reference_clip_l(
        config.hidden_size, config.num_layers, config.num_heads, 3072, seed=7, perturb=False
    )
    encoder = loaded(clip_l_ldm_keys(reference, SD1_PREFIX), device="meta")
    assert encoder.config == random_text_encoder_config("sd15")
    with torch.no_grad():
        hidden, pooled, final_norm = clip_l_run(reference, reference_ids(PROMPTS[:1], END_TOKEN))
        out = encoder.encode(PROMPTS[:1])
        assert relative_error(out.cond, final_norm(hidden[-1])) < 1e-4
        assert relative_error(out.pooled, pooled) < 1e-4


def test_sd2_matches_open_clip_text_transformer() -> None:
    reference = reference_open_clip(32, 3, 2, 64, seed=2)
    encoder = loaded(open_clip_ldm_keys(reference, SD2_PREFIX))
    assert encoder.config.family == "sd2" and encoder.config.default_clip_skip == -2
    blocks, pooled, ln_final = open_clip_run(reference, reference_ids(PROMPTS, 0))
    with torch.no_grad():
        out = encoder.encode(PROMPTS)
        # LDM's FrozenOpenCLIPEmbedder: ln_final on the penultimate block's output.
        assert relative_error(out.cond, ln_final(blocks[-2])) < 1e-4
        assert relative_error(out.pooled, pooled) < 1e-4
        assert relative_error(encoder.encode(PROMPTS, clip_skip=-1).cond, ln_final(blocks[-1])) < 1e-4


def test_sdxl_matches_clip_l_and_open_clip_bigg() -> None:
    clip_l = reference_clip_l(32, 2, 2, 64, seed=3)
    clip_g = reference_open_clip(48, 3, 3, 96, seed=4)
    encoder = loaded(clip_l_ldm_keys(clip_l, SDXL_L_PREFIX) | open_clip_ldm_keys(clip_g, SDXL_G_PREFIX))
    assert encoder.config.family == "sdxl" and encoder.config.context_dim == 80
    l_hidden, _, _ = clip_l_run(clip_l, reference_ids(PROMPTS, END_TOKEN))
    g_blocks, g_pooled, _ = open_clip_run(clip_g, reference_ids(PROMPTS, 0))
    with torch.no_grad():
        out = encoder.encode(PROMPTS)
        # generative-models: both penultimate hidden states without the final norm, L first.
        assert relative_error(out.cond, torch.cat([l_hidden[-2], g_blocks[-2]], dim=-1)) < 1e-4
        assert relative_error(out.pooled, g_pooled) < 1e-4
        last = encoder.encode(PROMPTS, clip_skip=-1).cond
        assert relative_error(last, torch.cat([l_hidden[-1], g_blocks[-1]], dim=-1)) < 1e-4


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_ldm_keys_round_trip_and_config_detection(preset: str) -> None:
    config = random_text_encoder_config(preset)
    encoder = build_text_encoder(config)
    encoder.init_random_weights(seed=5)
    sd = encoder.ldm_state_dict()
    assert text_encoder_config_from_state_dict(sd) == config
    prefixes = {c.ldm_prefix for c in config.encoders}
    assert all(any(key.startswith(p) for p in prefixes) for key in sd)
    again = loaded(sd, device="meta")
    assert again.device == torch.device("cpu")
    sd_again = again.ldm_state_dict()
    assert sd_again.keys() == sd.keys()
    assert all(torch.equal(sd[key], sd_again[key]) for key in sd)
    with torch.no_grad():
        assert torch.equal(encoder.encode(PROMPTS).cond, again.encode(PROMPTS).cond)


def test_sd2_keys_are_open_clip_layout() -> None:
    encoder = build_text_encoder(random_text_encoder_config("tiny-sd2"))
    sd = encoder.ldm_state_dict()
    assert sd[SD2_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert sd[SD2_PREFIX + "text_projection"].shape == (32, 32)
    assert sd[SD2_PREFIX + "positional_embedding"].shape == (77, 32)


def test_missing_and_misshapen_keys_are_reported() -> None:
    config = random_text_encoder_config("tiny-sd2")
    sd = build_text_encoder(config).ldm_state_dict()
    del sd[SD2_PREFIX + "ln_final.bias"]
    with pytest.raises(ValueError, match="ln_final.bias"):
        build_text_encoder(config).load_ldm_state_dict(sd)
    sd = build_text_encoder(config).ldm_state_dict()
    sd[SD2_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(65, 32)
    with pytest.raises(ValueError, match="c_fc.weight"):
        build_text_encoder(config).load_ldm_state_dict(sd)


def test_sd1_files_without_the_text_model_level_load(sd1_reference) -> None:
    sd = clip_l_ldm_keys(sd1_reference, "cond_stage_model.transformer.")
    encoder = loaded(sd)
    assert encoder.config.family == "sd1" and encoder.ldm_state_dict().keys() == sd.keys() - {
        "cond_stage_model.transformer.embeddings.position_ids"
    }
    expected = loaded(clip_l_ldm_keys(sd1_reference, SD1_PREFIX))
    with torch.no_grad():
        assert torch.equal(encoder.encode(PROMPTS).cond, expected.encode(PROMPTS).cond)


def test_state_dict_without_text_encoder_gives_none() -> None:
    assert text_encoder_config_from_state_dict({"model.diffusion_model.out.2.bias": torch.zeros(4)}) is None


def test_presets() -> None:
    sd15 = random_text_encoder_config("sd15").encoders[0]
    assert (sd15.hidden_size, sd15.num_layers, sd15.num_heads, sd15.intermediate_size) == (768, 12, 12, 3072)
    assert sd15.activation == "quick_gelu" and sd15.pad_token == END_TOKEN
    sdxl = random_text_encoder_config("tiny-sdxl")
    assert [c.pad_token for c in sdxl.encoders] == [END_TOKEN, 0]
    assert sdxl.pooled_dim == 48
    with pytest.raises(ValueError, match="tiny-sd1"):
        random_text_encoder_config("sd9")


@pytest.fixture(scope="module")
def tiny_sd1() -> TextEncoder:
    encoder = build_text_encoder(random_text_encoder_config("tiny-sd1"))
    encoder.init_random_weights(seed=6)
    return encoder


def test_clip_skip_changes_output_and_is_validated(tiny_sd1) -> None:
    with torch.no_grad():
        assert not torch.allclose(
            tiny_sd1.encode(["cat"], clip_skip=-1).cond, tiny_sd1.encode(["cat"], -2).cond
        )
    for bad in (0, 1, -3, 1.5):
        with pytest.raises(ValueError, match="clip_skip"):
            tiny_sd1.encode(["cat"], clip_skip=bad)


def test_weight_one_equals_no_emphasis(tiny_sd1) -> None:
    with torch.no_grad():
        assert torch.equal(tiny_sd1.encode(["a (cat:1.0) sits"]).cond, tiny_sd1.encode(["a cat sits"]).cond)


def test_weights_interpolate_from_the_empty_prompt(tiny_sd1) -> None:
    with torch.no_grad():
        plain = tiny_sd1.encode(["a cat sits"]).cond[0]
        empty = tiny_sd1.encode([""]).cond[0]
        weighted = tiny_sd1.encode(["a (cat:1.5) sits"]).cond[0]
    cat = 2  # start, "a", "cat"
    expected = plain.clone()
    expected[cat] = empty[cat] + 1.5 * (plain[cat] - empty[cat])
    assert torch.allclose(weighted, expected, atol=1e-6)
    assert not torch.allclose(weighted[cat], plain[cat])


def test_long_prompts_concatenate_chunks_and_batches_pad(tiny_sd1) -> None:
    long_prompt = "a photo of a cat " * 20
    with torch.no_grad():
        out = tiny_sd1.encode([long_prompt, "cat"])
        alone = tiny_sd1.encode([long_prompt])
        short = tiny_sd1.encode(["cat"])
        empty = tiny_sd1.encode([""])
    assert out.cond.shape == (2, 154, 32) and out.pooled.shape == (2, 32)
    assert torch.allclose(out.cond[0], alone.cond[0], atol=1e-6)
    assert torch.allclose(out.cond[1, :77], short.cond[0], atol=1e-6)
    assert torch.allclose(out.cond[1, 77:], empty.cond[0], atol=1e-6)
    assert torch.allclose(out.pooled[1], short.pooled[0], atol=1e-6)


def test_dtype_and_device_follow_to(tiny_sd1) -> None:
    encoder = build_text_encoder(random_text_encoder_config("tiny-sd1"), dtype=torch.float64)
    encoder.load_ldm_state_dict({key: value.half() for key, value in tiny_sd1.ldm_state_dict().items()})
    assert encoder.dtype == torch.float64 and encoder.device == torch.device("cpu")
    with torch.no_grad():
        out = encoder.encode(["a (red:1.2) cat"])
        reference = tiny_sd1.encode(["a (red:1.2) cat"])
        assert out.cond.dtype == torch.float64
        assert relative_error(out.cond.float(), reference.cond) < 1e-3  # fp16-stored weights
        assert encoder.to(torch.float32).encode(["cat"]).cond.dtype == torch.float32


def test_bfloat16_model_stays_close_to_float32(tiny_sd1) -> None:
    encoder = build_text_encoder(random_text_encoder_config("tiny-sd1"), dtype=torch.bfloat16)
    encoder.load_ldm_state_dict(tiny_sd1.ldm_state_dict())
    with torch.no_grad():
        out = encoder.encode(["a (red:1.2) cat"])
        reference = tiny_sd1.encode(["a (red:1.2) cat"])
    assert out.cond.dtype == torch.bfloat16
    assert relative_error(out.cond.float(), reference.cond) < 3e-2
