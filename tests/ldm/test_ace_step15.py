"""ACE-Step 1.5's diffusion model (ldm.ace_step15) against diffusers' AceStepTransformer1DModel,
AceStepConditionEncoder, AceStepAudioTokenizer and AceStepAudioTokenDetokenizer with the same weights (renamed from
the original layout by the table below), part by part and assembled as ComfyUI's forward assembles them; the tiny
file, the config read from shapes, and the silence latent.

Two of diffusers' choices are set to ComfyUI's, which Loom follows: its encoder stacks (lyric, timbre, pooler,
detokenizer) attend fully (diffusers gives even layers the sliding window), and the FSQ bounds codes with tanh
(diffusers clamps); see ldm/ace_step15.py's docstring."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import safetensors.torch
import torch
from diffusers import AceStepTransformer1DModel
from diffusers.pipelines.ace_step.modeling_ace_step import (
    AceStepAudioTokenDetokenizer,
    AceStepAudioTokenizer,
    AceStepConditionEncoder,
    _AceStepResidualFSQ,
)

from ldm.ace_step15 import (
    PAD_AUDIO_CODE,
    SILENCE_LATENT_FILE,
    TINY_ACE_STEP15,
    AceStep15Config,
    AceStep15Model,
    StackShape,
    band_mask,
    config_from_state_dict,
    is_ace_step15,
    load_ace_step15,
    random_ace_step15,
    silence_latent,
    write_tiny_ace_step15,
)

CONFIG = TINY_ACE_STEP15
# The original layout's part prefixes and diffusers' modules (keys of `diffusers_parts`).
PARTS = {"decoder.": "transformer.", "encoder.": "condition_encoder.", "tokenizer.": "audio_tokenizer.",
         "detokenizer.": "detokenizer."}
RENAMES = (("decoder.proj_in.1.", "decoder.proj_in_conv."), ("decoder.proj_out.1.", "decoder.proj_out_conv."),
           (".q_proj.", ".to_q."), (".k_proj.", ".to_k."), (".v_proj.", ".to_v."), (".o_proj.", ".to_out.0."),
           (".q_norm.", ".norm_q."), (".k_norm.", ".norm_k."))
DIFFUSERS_ONLY = {"condition_encoder.silence_latent"}  # diffusers' converter puts the silence latent there


def diffusers_name(key: str) -> str:
    if key == "null_condition_emb":
        return "condition_encoder.null_condition_emb"
    for old, new in RENAMES:
        key = key.replace(old, new)
    prefix = next(p for p in PARTS if key.startswith(p))
    return PARTS[prefix] + key[len(prefix):]


def diffusers_parts(config=CONFIG) -> dict[str, torch.nn.Module]:
    dec, enc, tok, window = config.decoder, config.encoder, config.tokenizer, config.sliding_window
    full = ["full_attention"]
    condition = AceStepConditionEncoder(
        hidden_size=enc.hidden, intermediate_size=enc.mlp, text_hidden_dim=config.text_hidden_dim,
        timbre_hidden_dim=config.timbre_hidden_dim, num_lyric_encoder_hidden_layers=config.lyric_layers,
        num_timbre_encoder_hidden_layers=config.timbre_layers, num_attention_heads=enc.heads,
        num_key_value_heads=enc.kv_heads, head_dim=enc.head_dim, sliding_window=window,
        layer_types=full * config.lyric_layers)
    condition.timbre_encoder._layer_types = full * config.timbre_layers
    stack = dict(hidden_size=tok.hidden, intermediate_size=tok.mlp, num_attention_heads=tok.heads,
                 num_key_value_heads=tok.kv_heads, head_dim=tok.head_dim, sliding_window=window)
    return {
        "transformer": AceStepTransformer1DModel(
            hidden_size=dec.hidden, intermediate_size=dec.mlp, num_hidden_layers=config.decoder_layers,
            num_attention_heads=dec.heads, num_key_value_heads=dec.kv_heads, head_dim=dec.head_dim,
            in_channels=config.decoder_in_channels, audio_acoustic_hidden_dim=config.audio_channels,
            patch_size=config.patch_size, sliding_window=window, encoder_hidden_size=enc.hidden),
        "condition_encoder": condition,
        "audio_tokenizer": AceStepAudioTokenizer(
            audio_acoustic_hidden_dim=config.audio_channels, pool_window_size=config.pool_window, fsq_dim=tok.hidden,
            fsq_input_levels=list(config.fsq_levels), num_attention_pooler_hidden_layers=config.tokenizer_layers,
            layer_types=full * config.tokenizer_layers, **stack),
        "detokenizer": AceStepAudioTokenDetokenizer(
            audio_acoustic_hidden_dim=config.audio_channels, pool_window_size=config.pool_window,
            num_attention_pooler_hidden_layers=config.detokenizer_layers,
            layer_types=full * config.detokenizer_layers, **stack),
    }


def comfy_bound(self: _AceStepResidualFSQ, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's FSQ bound (vector-quantize-pytorch's symmetry-preserving one): tanh, not a clamp, before rounding."""
    levels = self._levels.to(device=x.device, dtype=x.dtype)
    return torch.floor((levels - 1) * (x.tanh() + 1) / 2 + 0.5) * (2 / (levels - 1)) - 1


@pytest.fixture(scope="module")
def models() -> tuple[AceStep15Model, dict[str, torch.nn.Module]]:
    ours = random_ace_step15(CONFIG, seed=3).requires_grad_(False)
    theirs = diffusers_parts()
    weights = {diffusers_name(k): v for k, v in ours.state_dict().items()}
    for name, module in theirs.items():
        own = {f"{name}.{k}": v for k, v in module.state_dict().items()}
        module.load_state_dict({k[len(name) + 1:]: weights.get(k, v) for k, v in own.items()}, strict=True)
        module.eval().requires_grad_(False)
    return ours, theirs


@pytest.fixture
def comfy_fsq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_AceStepResidualFSQ, "_quantize", comfy_bound)


def _inputs(batch: int = 2, length: int = 21, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 64, length, generator=g), "t": torch.rand(batch, generator=g),
            "text": torch.randn(batch, 7, CONFIG.text_hidden_dim, generator=g),
            "lyric": torch.randn(batch, 9, CONFIG.text_hidden_dim, generator=g),
            "refer": torch.randn(batch, 64, 23, generator=g)}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_the_name_table_covers_every_key_both_ways(models):
    ours, theirs = models
    mapped = [diffusers_name(k) for k in ours.state_dict()]
    expected = {f"{n}.{k}" for n, m in theirs.items() for k in m.state_dict()} - DIFFUSERS_ONLY
    assert len(set(mapped)) == len(mapped)
    assert set(mapped) == expected
    for key, value in ours.state_dict().items():
        name = diffusers_name(key)
        part, rest = name.split(".", 1)
        assert torch.equal(theirs[part].state_dict()[rest], value), key


def test_decoder_matches_diffusers_with_the_sliding_window_active(models):
    ours, theirs = models
    g = torch.Generator().manual_seed(1)
    x, context_latents = torch.randn(2, 21, 64, generator=g), torch.randn(2, 21, 128, generator=g)
    states, t = torch.randn(2, 11, CONFIG.encoder.hidden, generator=g), torch.rand(2, generator=g)
    assert band_mask(math.ceil(21 / CONFIG.patch_size), CONFIG.sliding_window, x.device) is not None
    got = ours.decoder(x, t, t, states, context_latents)
    want = theirs["transformer"](x, t, t, states, context_latents, return_dict=False)[0]
    assert _max_diff(got, want) < 1e-5
    wider = dataclasses.replace(CONFIG, sliding_window=64)
    unwindowed = AceStep15Model(wider).decoder.requires_grad_(False)
    unwindowed.load_state_dict(ours.decoder.state_dict())
    assert _max_diff(unwindowed(x, t, t, states, context_latents), want) > 1e-3  # the window changes the output


def test_condition_encoder_matches_diffusers(models):
    ours, theirs = models
    inputs = _inputs()
    text, lyric, refer = inputs["text"], inputs["lyric"], inputs["refer"].transpose(1, 2)
    got = ours.encoder(text, lyric, refer)
    want, mask = theirs["condition_encoder"](text, torch.ones(2, 7), lyric, torch.ones(2, 9), refer, torch.arange(2))
    assert got.shape == (2, 9 + 1 + 7, CONFIG.encoder.hidden) and bool(mask.all())
    assert _max_diff(got, want) < 1e-5


def test_tokenizer_and_detokenizer_match_diffusers(models, comfy_fsq):
    ours, theirs = models
    refer = _inputs()["refer"].transpose(1, 2)  # 23 frames: zero-padded to 25
    got = ours.tokenizer(refer)
    want, indices = theirs["audio_tokenizer"].tokenize(refer)
    assert got.shape == (2, 5, CONFIG.tokenizer.hidden) and len(indices.unique()) > 1
    assert _max_diff(got, want) < 1e-5
    assert _max_diff(ours.detokenizer(got), theirs["detokenizer"](want)) < 1e-5


def test_codes_give_the_quantizers_output(models):
    ours, theirs = models
    codes = torch.tensor([[0, 63999, PAD_AUDIO_CODE, 12345], [1, 512, 40000, 7]])
    got = ours.tokenizer.quantizer.output_from_indices(codes, torch.float32)
    want = theirs["audio_tokenizer"].quantizer.get_output_from_indices(codes)
    assert _max_diff(got, want) < 1e-6


def _reference(theirs, inputs, audio_codes=None, is_covers=None, null_condition=False) -> torch.Tensor:
    """ComfyUI's prepare_condition + decoder, assembled from diffusers' modules."""
    x, t, refer = inputs["x"].transpose(1, 2), inputs["t"], inputs["refer"].transpose(1, 2)
    batch, length = x.shape[:2]
    text, lyric = inputs["text"], inputs["lyric"]
    states, _ = theirs["condition_encoder"](text, torch.ones(text.shape[:2]), lyric, torch.ones(lyric.shape[:2]),
                                            refer, torch.arange(batch))
    if null_condition:
        states = theirs["condition_encoder"].null_condition_emb.expand_as(states)
    if is_covers is False:
        source = refer
    else:
        if audio_codes is not None:
            needed = math.ceil(length / CONFIG.pool_window)
            if audio_codes.shape[1] < needed:
                audio_codes = torch.nn.functional.pad(audio_codes, (0, needed - audio_codes.shape[1]),
                                                      value=PAD_AUDIO_CODE)
            vectors = theirs["audio_tokenizer"].quantizer.get_output_from_indices(audio_codes)
        else:
            vectors, _ = theirs["audio_tokenizer"].tokenize(refer)
        source = theirs["detokenizer"](vectors)[:, :length]
    context_latents = torch.cat([source, torch.ones_like(x)], dim=-1)
    return theirs["transformer"](x, t, t, states, context_latents, return_dict=False)[0].transpose(1, 2)


@pytest.mark.parametrize("codes", [3, 6])  # too few (padded with the silence code), more than needed (cut)
def test_forward_with_audio_codes(models, codes):
    ours, theirs = models
    inputs = _inputs()
    audio_codes = torch.randint(0, 64000, (2, codes), generator=torch.Generator().manual_seed(codes))
    got = ours(inputs["x"], inputs["t"], inputs["text"], inputs["lyric"], inputs["refer"], audio_codes=audio_codes)
    assert got.shape == inputs["x"].shape
    assert _max_diff(got, _reference(theirs, inputs, audio_codes=audio_codes)) < 1e-5


def test_forward_text_to_music_takes_the_silence_as_reference(models):
    ours, theirs = models
    inputs = _inputs() | {"refer": silence_latent(21).expand(2, -1, -1)}
    got = ours(inputs["x"], inputs["t"], inputs["text"], inputs["lyric"], silence_latent(21), is_covers=False)
    assert _max_diff(got, _reference(theirs, inputs, is_covers=False)) < 1e-5
    with pytest.raises(ValueError, match="frames"):
        ours(inputs["x"], inputs["t"], inputs["text"], inputs["lyric"], silence_latent(20), is_covers=False)


def test_forward_covers_a_reference(models, comfy_fsq):
    ours, theirs = models
    inputs = _inputs()
    got = ours(inputs["x"], inputs["t"], inputs["text"], inputs["lyric"], inputs["refer"], is_covers=True)
    assert _max_diff(got, _reference(theirs, inputs, is_covers=True)) < 1e-5
    default = ours(inputs["x"], inputs["t"], inputs["text"], inputs["lyric"], inputs["refer"])
    assert torch.equal(got, default)


def test_null_condition_replaces_every_state(models):
    ours, theirs = models
    inputs = _inputs() | {"refer": silence_latent(21).expand(2, -1, -1)}
    got = ours(inputs["x"], inputs["t"], inputs["text"], inputs["lyric"], inputs["refer"], is_covers=False,
               null_condition=True)
    assert _max_diff(got, _reference(theirs, inputs, is_covers=False, null_condition=True)) < 1e-5
    other = ours(inputs["x"], inputs["t"], torch.zeros_like(inputs["text"]), inputs["lyric"], inputs["refer"],
                 is_covers=False, null_condition=True)
    assert torch.equal(got, other)
    conditioned = _reference(theirs, inputs, is_covers=False)
    per_item = ours(inputs["x"], inputs["t"], inputs["text"], inputs["lyric"], inputs["refer"], is_covers=False,
                    null_condition=torch.tensor([False, True]))
    assert _max_diff(per_item[0], conditioned[0]) < 1e-5 and _max_diff(per_item[1], got[1]) < 1e-5


def test_tiny_file_loads_strictly_and_its_config_round_trips(tmp_path):
    path = write_tiny_ace_step15(tmp_path / "acestep_tiny.safetensors", seed=5, text_hidden=24)
    sd = safetensors.torch.load_file(path)
    assert is_ace_step15(sd) and not is_ace_step15({k: v for k, v in sd.items() if k.startswith("decoder.")})
    config = config_from_state_dict(sd, sliding_window=CONFIG.sliding_window)
    assert config == dataclasses.replace(CONFIG, text_hidden_dim=24)
    model = AceStep15Model(config)
    model.load_state_dict(sd, strict=True)
    loaded = load_ace_step15(sd, sliding_window=CONFIG.sliding_window)
    assert loaded.config == config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("config", [
    AceStep15Config(),  # the 2B turbo / base / sft
    AceStep15Config(decoder=StackShape(hidden=2560, heads=32, kv_heads=8, head_dim=128, mlp=9728),
                    decoder_layers=32),  # XL-shaped: a wider decoder over the 2048-wide encoder
])
def test_config_is_read_from_full_size_shapes(config):
    with torch.device("meta"):
        sd = AceStep15Model(config).state_dict()
    assert config_from_state_dict(sd) == config
    assert tuple(sd["decoder.condition_embedder.weight"].shape) == (config.decoder.hidden, config.encoder.hidden)


def test_silence_latent_is_the_json_head_then_its_frame():
    data = json.loads(SILENCE_LATENT_FILE.read_text())
    latent = silence_latent(10, dtype=torch.float64)
    assert latent.shape == (1, 64, 10) and latent.dtype == torch.float64
    assert torch.allclose(latent[0, :, :4].T, torch.tensor(data["head"], dtype=torch.float64))
    assert torch.allclose(latent[0, :, 4:], torch.tensor(data["frame"], dtype=torch.float64)[:, None].expand(64, 6))
    assert torch.equal(silence_latent(2), silence_latent(10)[:, :, :2])
