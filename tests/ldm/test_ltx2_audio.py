"""LTX-2's audio VAE and vocoder (ldm/ltx2_audio.py) against diffusers' AutoencoderKLLTX2Audio, LTX2Vocoder and
LTX2VocoderWithBWE with the same random weights, in float32; the mel front end against transformers' audio_utils
(torchaudio's MelSpectrogram settings that ComfyUI uses); the resampler against a sampled sine.

Weights travel diffusers -> Loom through `convert_diffusers_*` and strict loading, so every key lands somewhere.
Latent normalisation is compared with LTX2Pipeline's own pack / normalise / unpack helpers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKLLTX2Audio
from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder as DiffusersVocoder
from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from ldm.checkpoint import CheckpointError
from ldm.ltx2_audio import (
    LTX23_VOCODER,
    AudioVAEConfig,
    LTX2AudioVAE,
    LTX2Vocoder,
    audio_vae_config_from_state_dict,
    convert_diffusers_audio_vae,
    convert_diffusers_vocoder,
    load_ltx2_audio,
    log_mel,
    resample,
    vocoder_config_from_state_dict,
)

TOLERANCE = 1e-4
MEL_BINS = 32  # the tiny VAE's; 4 channels * 32 / 4 bins = 32 latent features = diffusers' base_channels-long stats


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith(("alpha", "beta")) else scale))


def _diffusers_vae(variant: str) -> AutoencoderKLLTX2Audio:
    extra = ({} if variant == "causal" else
             dict(norm_type="group", causality_axis="none", mid_block_add_attention=True, attn_resolutions=(128,)))
    vae = AutoencoderKLLTX2Audio(base_channels=32, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=1,
                                 in_channels=2, latent_channels=4, mel_bins=MEL_BINS, **extra).eval()
    _randomize(vae, 0)
    g = torch.Generator().manual_seed(1)
    vae.latents_mean.copy_(torch.randn(32, generator=g) * 0.5)
    vae.latents_std.copy_(torch.rand(32, generator=g) + 0.5)
    return vae


def _loom_vae(reference: AutoencoderKLLTX2Audio, **overrides) -> LTX2AudioVAE:
    sd = convert_diffusers_audio_vae(reference.state_dict())
    config = audio_vae_config_from_state_dict(sd)
    assert config.mel_bins == MEL_BINS  # from the statistics' length
    config = AudioVAEConfig(**{**config.__dict__, "n_fft": 256,
                               "causality_axis": reference.config.causality_axis, **overrides})
    vae = LTX2AudioVAE(config).eval()
    vae.load_state_dict(sd, strict=True)
    return vae


def _pipeline_normalize(latents: torch.Tensor, vae: AutoencoderKLLTX2Audio) -> torch.Tensor:
    packed = LTX2Pipeline._normalize_audio_latents(LTX2Pipeline._pack_audio_latents(latents), vae.latents_mean,
                                                   vae.latents_std)
    return LTX2Pipeline._unpack_audio_latents(packed, latents.shape[2], latents.shape[3])


@pytest.mark.parametrize("variant", ["causal", "attention"])
def test_encode_decode_match_diffusers(variant: str):
    reference = _diffusers_vae(variant)
    vae = _loom_vae(reference)
    assert vae.config.attn_levels == (() if variant == "causal" else (1,))
    mel = torch.randn(2, 2, 37, MEL_BINS, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = vae.encode_mel(mel)
        theirs = _pipeline_normalize(reference.encode(mel).latent_dist.mode(), reference)
        assert ours.shape == theirs.shape == (2, 4, 10 if variant == "causal" else 9, MEL_BINS // 4)
        encode_diff = (ours - theirs).abs().max().item()
        assert encode_diff < TOLERANCE, encode_diff

        z = torch.randn(2, 4, 7, MEL_BINS // 4, generator=torch.Generator().manual_seed(3))
        packed = LTX2Pipeline._denormalize_audio_latents(LTX2Pipeline._pack_audio_latents(z), reference.latents_mean,
                                                         reference.latents_std)
        theirs = reference.decode(LTX2Pipeline._unpack_audio_latents(packed, 7, MEL_BINS // 4)).sample
        ours = vae.decode(z)
    # 4 T - 3 mel frames when causal, 4 T when not (ComfyUI's rule; diffusers crops to 4 T - 3 either way)
    assert ours.shape == (2, 2, 25 if variant == "causal" else 28, MEL_BINS)
    assert theirs.shape == (2, 2, 25, MEL_BINS)
    decode_diff = (ours[:, :, :25] - theirs).abs().max().item()
    assert decode_diff < TOLERANCE, decode_diff


def test_log_mel_matches_transformers_slaney_spectrogram():
    n_fft, hop, rate = 256, 160, 16000
    wave = torch.randn(1, 2, 4000, generator=torch.Generator().manual_seed(4)) * 0.3
    ours = log_mel(wave, rate, n_fft, hop, MEL_BINS)
    filters = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=MEL_BINS, min_frequency=0.0,
                              max_frequency=rate / 2, sampling_rate=rate, norm="slaney", mel_scale="slaney")
    for ch in range(2):
        ref = spectrogram(wave[0, ch].double().numpy(), window_function(n_fft, "hann"), frame_length=n_fft,
                          hop_length=hop, fft_length=n_fft, power=1.0, center=True, pad_mode="reflect",
                          mel_filters=filters, mel_floor=1e-5, log_mel="log")
        assert ours.shape[2] == ref.shape[1] == 4000 // hop + 1
        diff = np.abs(ours[0, ch].numpy().T - ref).max()
        assert diff < TOLERANCE, diff


def test_resample_is_a_faithful_sinc_interpolation():
    t = torch.arange(8000, dtype=torch.float64) / 8000
    wave = torch.sin(2 * math.pi * 440 * t)[None, None].repeat(1, 2, 1).float()
    up = resample(wave, 8000, 16000)
    assert up.shape == (1, 2, 16000)
    exact = torch.sin(2 * math.pi * 440 * torch.arange(16000, dtype=torch.float64) / 16000).float()
    diff = (up[0, :, 200:-200] - exact[200:-200]).abs().max().item()
    assert diff < 5e-3, diff
    assert resample(wave, 8000, 8000) is wave
    assert resample(torch.zeros(1, 44100), 44100, 16000).shape == (1, 16000)


def test_encode_waveform_runs_the_front_end():
    vae = _loom_vae(_diffusers_vae("causal"))
    wave = torch.randn(1, 1, 8820, generator=torch.Generator().manual_seed(5)) * 0.3  # mono at 44.1 kHz
    with torch.no_grad():
        latents = vae.encode(wave, 44100)
        expected = vae.encode_mel(log_mel(resample(wave.expand(-1, 2, -1), 44100, 16000), 16000, 256, 160, MEL_BINS))
    assert latents.shape == (1, 4, math.ceil(math.ceil(21 / 2) / 2), MEL_BINS // 4)  # 3200 samples -> 21 frames
    assert torch.equal(latents, expected)


def _hifigan() -> DiffusersVocoder:
    vocoder = DiffusersVocoder(in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[8, 4],
                               upsample_factors=[4, 2], resnet_kernel_sizes=[3, 5],
                               resnet_dilations=[[1, 3], [1, 3]], output_sampling_rate=800).eval()
    _randomize(vocoder, 6, scale=0.1)
    return vocoder


def _bigvgan_bwe() -> LTX2VocoderWithBWE:
    vocoder = LTX2VocoderWithBWE(
        in_channels=2 * 8, hidden_channels=32, upsample_kernel_sizes=[8, 4], upsample_factors=[4, 2],
        resnet_kernel_sizes=[3, 5], resnet_dilations=[[1, 3, 5], [1, 3, 5]], final_act_fn="clamp",
        bwe_in_channels=2 * 8, bwe_hidden_channels=32, bwe_upsample_kernel_sizes=[7, 4, 4, 4],
        bwe_upsample_factors=[3, 2, 2, 2], bwe_resnet_kernel_sizes=[3], bwe_resnet_dilations=[[1, 3, 5]],
        filter_length=32, hop_length=8, window_length=32, num_mel_channels=8, input_sampling_rate=16000,
        output_sampling_rate=48000).eval()
    _randomize(vocoder, 7, scale=0.1)
    g = torch.Generator().manual_seed(8)
    vocoder.mel_stft.stft_fn.forward_basis.copy_(torch.randn(34, 1, 32, generator=g) * 0.3)
    vocoder.mel_stft.stft_fn.inverse_basis.copy_(torch.randn(34, 1, 32, generator=g))
    vocoder.mel_stft.mel_basis.copy_(torch.rand(8, 17, generator=g))
    return vocoder


_HEADERS = {
    "hifigan": {"vocoder": {"upsample_rates": [4, 2], "resblock_dilation_sizes": [[1, 3], [1, 3]]}},
    "bwe": {"vocoder": {"vocoder": {"upsample_rates": [4, 2], "use_tanh_at_final": False},
                        "bwe": {"upsample_rates": [3, 2, 2, 2], "hop_length": 8, "input_sampling_rate": 16000,
                                "output_sampling_rate": 48000}}},
}


@pytest.mark.parametrize("kind", ["hifigan", "bwe"])
def test_vocoder_matches_diffusers(kind: str):
    reference = _hifigan() if kind == "hifigan" else _bigvgan_bwe()
    sd = convert_diffusers_vocoder(reference.state_dict())
    config = vocoder_config_from_state_dict(sd, {"config": json.dumps(_HEADERS[kind])})
    vocoder = LTX2Vocoder(config).eval()
    vocoder.load_state_dict(sd if kind == "bwe" else {f"vocoder.{k}": v for k, v in sd.items()}, strict=True)
    assert vocoder.sample_rate == (800 if kind == "hifigan" else 48000)
    mel = torch.randn(2, 2, 13, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours, theirs = vocoder(mel), reference(mel)
    assert ours.shape == theirs.shape == (2, 2, 13 * 8 * (1 if kind == "hifigan" else 3))
    diff = (ours - theirs).abs().max().item()
    assert diff < TOLERANCE, diff
    assert theirs.abs().max() > 0.05 and (theirs.abs() < 1).float().mean() > 0.9  # neither silent nor saturated


def _combined(tmp_path, vae: AutoencoderKLLTX2Audio, vocoder: torch.nn.Module, layout: str, kind: str):
    vae_sd, voc_sd = vae.state_dict(), vocoder.state_dict()
    if layout == "original":
        vae_sd, voc_sd = convert_diffusers_audio_vae(vae_sd), convert_diffusers_vocoder(voc_sd)
    tensors = {**{f"audio_vae.{k}": v for k, v in vae_sd.items()}, **{f"vocoder.{k}": v for k, v in voc_sd.items()}}
    header = {"audio_vae": {"model": {"params": {"ddconfig": {"mel_bins": MEL_BINS, "causality_axis": "height"},
                                                 "preprocessing": {"stft": {"hop_length": 160, "filter_length": 256}}}},
                            "sampling_rate": 16000}, **_HEADERS[kind]}
    path = tmp_path / f"ltx2_audio_{layout}_{kind}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                                metadata={"config": json.dumps(header)})
    return path, tensors, {"config": json.dumps(header)}


@pytest.mark.parametrize("layout,kind", [("original", "hifigan"), ("diffusers", "bwe")])
def test_load_round_trip(tmp_path, layout: str, kind: str):
    reference_vae = _diffusers_vae("causal")
    reference_vocoder = _hifigan() if kind == "hifigan" else _bigvgan_bwe()
    path, tensors, header = _combined(tmp_path, reference_vae, reference_vocoder, layout, kind)
    vae, vocoder = load_ltx2_audio(path)
    assert vae.config.mel_bins == MEL_BINS and vae.config.n_fft == 256 and vae.config.causality_axis == "height"
    assert vae.latent_shape(97, 25) == (1, 4, 97, MEL_BINS // 4)  # 25 latent frames a second
    wave = torch.randn(1, 2, 16000, generator=torch.Generator().manual_seed(10)) * 0.3
    with torch.no_grad():
        latents = vae.encode(wave, 16000)
        assert latents.shape == (1, 4, 26, MEL_BINS // 4)  # 101 mel frames -> 51 -> 26
        mel = vae.decode(latents)
        assert mel.shape == (1, 2, 4 * 26 - 3, MEL_BINS)
        audio = vocoder(mel[..., :8])  # the tiny vocoders take 8 bins
    hop = 8 if kind == "hifigan" else 24
    assert audio.shape == (1, 2, (4 * 26 - 3) * hop)
    with torch.no_grad():
        assert torch.allclose(audio, reference_vocoder(mel[..., :8]), atol=TOLERANCE)

    with pytest.raises(CheckpointError, match="no place"):
        load_ltx2_audio({**tensors, "vocoder.stray.weight": torch.zeros(1)}, metadata=header)
    missing = dict(tensors)
    missing.pop(next(k for k in tensors if k.startswith("audio_vae.") and k.endswith("conv2.conv.weight")))
    with pytest.raises(CheckpointError, match="missing"):
        load_ltx2_audio(missing, metadata=header)


def test_released_shapes():
    with torch.device("meta"):
        vae = LTX2AudioVAE()
        vocoder = LTX2Vocoder()
    assert vae.latents_per_second == 25.0 and vae.sample_rate == 16000
    assert vae.num_latent_frames(121, 24) == 127  # ceil(121 / 24 * 25)
    assert vae.latent_shape(97, 25, batch_size=2) == (2, 8, 97, 16)
    assert vae.per_channel_statistics.get_buffer("mean-of-means").shape == (128,)
    assert vocoder.sample_rate == 24000 and vocoder.config.vocoder.hop == 240
    assert vocoder_config_from_state_dict(vocoder.vocoder.state_dict()) == vocoder.config  # strides from kernels
    with torch.device("meta"):
        ltx23 = LTX2Vocoder(LTX23_VOCODER)
    assert vocoder_config_from_state_dict(ltx23.state_dict()) == LTX23_VOCODER
    assert ltx23.sample_rate == 48000 and ltx23.config.vocoder.hop == 160 and ltx23.config.bwe.hop == 240
