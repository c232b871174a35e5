"""ACE-Step 1.5 as a Loom family (`ldm.ace_step15_files`): the files UNETLoader reads (bare and under ComfyUI's prefix,
refused by name otherwise), and the denoiser's call turning the prompt's encodings into the model's inputs as
ComfyUI's ACEStep15.extra_conds does (silence as the timbre reference, codes or silence as the context, a reference
covered, zeroed prompts unconditional), each against the model called with those inputs by hand."""

from __future__ import annotations

import pytest
import torch

from ldm.ace_step15 import TINY_ACE_STEP15, random_ace_step15, silence_latent, write_tiny_ace_step15
from ldm.ace_step15_files import (
    AceStep15Denoiser,
    is_ace_step15_file,
    latent_length,
    load_ace_step15_unet,
    peek_ace_step15,
)
from ldm.checkpoint import CheckpointError, load_state_dict, read_metadata, write_safetensors

LENGTH = 23  # latent frames: not a multiple of the 5-frame code window
WIDTH = TINY_ACE_STEP15.text_hidden_dim


@pytest.fixture(scope="module")
def model():
    return random_ace_step15(TINY_ACE_STEP15, seed=3).eval()


def _inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 64, LENGTH, generator=generator)
    t = torch.tensor([0.7] * batch)
    context = torch.randn(batch, 9, WIDTH, generator=generator)
    lyrics = torch.randn(batch, 6, WIDTH, generator=generator)
    codes = torch.randint(0, 64000, (1, 4), generator=generator)  # fewer than ceil(23 / 5): padded
    return x, t, context, lyrics, codes


def test_codes_lead_with_silence_as_the_timbre(model) -> None:
    x, t, context, lyrics, codes = _inputs()
    with torch.no_grad():
        got = AceStep15Denoiser(model)(x, t, context, lyric_embed=lyrics, audio_codes=codes.expand(2, -1))
        expected = model(x, t, context, lyrics, silence_latent(LENGTH), audio_codes=codes)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_without_codes_the_silence_is_the_context(model) -> None:
    x, t, context, lyrics, _ = _inputs()
    with torch.no_grad():
        got = AceStep15Denoiser(model)(x, t, context, lyric_embed=lyrics)
        expected = model(x, t, context, lyrics, silence_latent(LENGTH), is_covers=False)
        led = model(x, t, context, lyrics, silence_latent(LENGTH))  # what the hints of silence would give instead
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - led).abs().max() > 1e-3


def test_a_reference_is_covered_and_the_codes_unused(model) -> None:
    x, t, context, lyrics, codes = _inputs()
    reference = torch.randn(1, 64, 12, generator=torch.Generator().manual_seed(1))  # shorter than the latent
    padded = torch.cat([reference, silence_latent(LENGTH)[..., 12:]], dim=-1)
    with torch.no_grad():
        got = AceStep15Denoiser(model)(x, t, context, lyric_embed=lyrics, audio_codes=codes, refer_audio=reference)
        expected = model(x, t, context, lyrics, padded, is_covers=True)
        longer = AceStep15Denoiser(model)(x, t, context, lyric_embed=lyrics,
                                          refer_audio=torch.cat([padded, reference], dim=-1))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(longer, expected, rtol=0, atol=0)  # a longer reference is cut to the latent


def test_a_zeroed_prompt_is_the_unconditional_branch_per_item(model) -> None:
    x, t, context, lyrics, codes = _inputs()
    context[1] = 0  # ConditioningZeroOut's negative, batched with the positive
    lyrics[1] = 0
    with torch.no_grad():
        got = AceStep15Denoiser(model)(x, t, context, lyric_embed=lyrics, audio_codes=codes)
        cond = model(x[:1], t[:1], context[:1], lyrics[:1], silence_latent(LENGTH), audio_codes=codes)
        uncond = model(x[1:], t[1:], context[1:], lyrics[1:], silence_latent(LENGTH), audio_codes=codes,
                       null_condition=True)
    torch.testing.assert_close(got, torch.cat([cond, uncond]), rtol=1e-5, atol=1e-6)


def test_files_bare_and_prefixed_load_and_others_are_refused(tmp_path, model) -> None:
    bare = write_tiny_ace_step15(tmp_path / "acestep_v1.5_turbo.safetensors", seed=4)
    prefixed = tmp_path / "prefixed.safetensors"
    write_safetensors({"model.diffusion_model." + k: v for k, v in load_state_dict(bare).items()}, prefixed,
                      read_metadata(bare))
    for path in (bare, prefixed):
        assert is_ace_step15_file(path)
        assert peek_ace_step15(path).unet_config == TINY_ACE_STEP15
        loaded = load_ace_step15_unet(path, dtype=torch.float32)
        assert loaded.family.name == "ace_step15" and loaded.family.shift == 3.0 and loaded.unused_keys == []
        assert loaded.family.latent_channels == 64 and loaded.family.unet_config.in_channels == 64
    other = tmp_path / "other.safetensors"
    write_safetensors({"decoder.proj_in.1.weight": torch.zeros(4, 192, 2)}, other, {})
    assert not is_ace_step15_file(other) and peek_ace_step15(other) is None
    with pytest.raises(CheckpointError, match="other.safetensors: not an ACE-Step 1.5 diffusion model"):
        load_ace_step15_unet(other)


def test_latent_length_is_comfyuis() -> None:
    assert latent_length(120.0) == 3000 and latent_length(10.0) == 250 and latent_length(0.05) == 1


def test_a_half_precision_model_takes_the_samplers_float32_latents(model) -> None:
    """On a GPU the model runs in bf16 while the sampler keeps its latents in float32: the denoiser casts its inputs
    to the model's dtype and the velocity back, close to float32's."""
    x, t, context, lyrics, codes = _inputs()
    half = AceStep15Denoiser(random_ace_step15(TINY_ACE_STEP15, seed=3).to(torch.bfloat16).eval())
    with torch.no_grad():
        got = half(x, t, context, lyric_embed=lyrics, audio_codes=codes)
        full = AceStep15Denoiser(model)(x, t, context, lyric_embed=lyrics, audio_codes=codes)
    assert got.dtype == torch.float32 and (got - full).abs().max() < 0.05 * full.abs().max()


def test_fp8_weights_keep_the_timestep_embeddings_in_full_precision(model) -> None:
    """UNETLoader's fp8 weight_dtype: the decoder's two timestep embeddings (time_embed and time_embed_r) stay in
    full precision like every model's, and the model runs."""
    from ldm.quant import quantize_

    x, t, context, lyrics, codes = _inputs()
    stored = quantize_(random_ace_step15(TINY_ACE_STEP15, seed=3).to(torch.bfloat16).eval(), "fp8")
    assert stored.decoder.time_embed_r.linear_1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = AceStep15Denoiser(stored)(x, t, context, lyric_embed=lyrics, audio_codes=codes)
        full = AceStep15Denoiser(model)(x, t, context, lyric_embed=lyrics, audio_codes=codes)
    assert torch.isfinite(got).all() and (got - full).abs().max() < 0.2 * full.abs().max()
