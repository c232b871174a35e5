"""The Oobleck audio VAE against diffusers' AutoencoderOobleck with the same weights, in float32.

diffusers ships no single-file converter for it: `_sat_to_diffusers` follows the rules of its
scripts/convert_stable_audio.py (stable-audio-tools' keys to diffusers'), written here independently of Loom's
reader, and strict loading checks every key lands somewhere.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderOobleck

from ldm.checkpoint import CheckpointError, write_safetensors
from ldm.oobleck import (
    ACE_STEP_OOBLECK,
    SAO_PREFIX,
    STABLE_AUDIO_OOBLECK,
    TINY_OOBLECK,
    OobleckConfig,
    OobleckVAE,
    is_oobleck,
    load_oobleck,
    oobleck_config_from_state_dict,
    random_oobleck,
    to_stable_audio_layout,
    write_tiny_oobleck,
)

# Small enough for a few seconds of audio on one thread, yet loadable by diffusers, whose encoder ends in
# encoder_hidden_size channels (2 * the latent channels in every released model).
TWIN = OobleckConfig(encoder_hidden_size=16, channel_multiples=(1, 1, 2, 2, 4), decoder_channels=8,
                     decoder_input_channels=8)
TOLERANCE = 1e-4  # relative to the largest output; float32 convolutions summed in a different order


def _diffusers(c: OobleckConfig) -> AutoencoderOobleck:
    with warnings.catch_warnings():  # diffusers' torch.nn.utils.weight_norm is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return AutoencoderOobleck(encoder_hidden_size=c.encoder_hidden_size,
                                  downsampling_ratios=list(c.downsampling_ratios),
                                  channel_multiples=list(c.channel_multiples), decoder_channels=c.decoder_channels,
                                  decoder_input_channels=c.decoder_input_channels, audio_channels=c.audio_channels,
                                  sampling_rate=c.sampling_rate).eval()


def _random_diffusers(c: OobleckConfig, seed: int = 0) -> AutoencoderOobleck:
    """diffusers' model with seeded random weights of a sensible size, drawn in its own parametrisation."""
    model = _diffusers(c)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("alpha", "beta")):
                param.copy_(0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif name.endswith("weight_g"):
                quiet = ".conv2." in name and ".res_unit" in name
                param.copy_((0.3 if quiet else 1.0) * (1 + 0.1 * noise.abs()))
            else:
                param.copy_(noise)
    return model


def _sat_to_diffusers(sd: dict[str, torch.Tensor], levels: int = 5) -> dict[str, torch.Tensor]:
    """scripts/convert_stable_audio.py's renaming of the VAE keys, unprefixed."""
    out = {}
    for key, value in sd.items():
        new = key.replace("coder.layers.0.", "coder.conv1.")
        m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.", new)
        if m:
            idx = int(m[2])
            new = new.replace(f"coder.layers.{idx}.", f"coder.block.{idx - 1}.")
            block = f"block.{idx - 1}."
            if m[1] == "encoder":
                for i in range(3):
                    new = new.replace(f"{block}layers.{i}.", f"{block}res_unit{i + 1}.")
                new = new.replace(f"{block}layers.3.", f"{block}snake1.").replace(f"{block}layers.4.", f"{block}conv1.")
            else:
                for i in range(2, 5):
                    new = new.replace(f"{block}layers.{i}.", f"{block}res_unit{i - 1}.")
                new = new.replace(f"{block}layers.0.", f"{block}snake1.")
                new = new.replace(f"{block}layers.1.", f"{block}conv_t1.")
            for old, part in (("layers.0.", "snake1."), ("layers.2.", "snake2."), ("layers.1.", "conv1."),
                              ("layers.3.", "conv2.")):
                new = new.replace(old, part)
            if idx == levels + 1:
                new = new.replace(block, "snake1.")
            elif idx == levels + 2:
                new = new.replace(block, "conv2.")
        assert new not in out, new
        out[new] = value[None, :, None] if "snake" in new else value
    return out


def _audio(seconds: float, seed: int = 0, rate: int = 44100) -> torch.Tensor:
    """Stereo noise in -1..1 with some low-frequency structure, [2, 2, samples]."""
    generator = torch.Generator().manual_seed(seed)
    n = round(seconds * rate)
    t = torch.arange(n) / rate
    tone = torch.sin(2 * torch.pi * torch.tensor([[220.0], [330.0]]) * t)
    return (0.5 * tone + 0.3 * torch.rand(2, 2, n, generator=generator) * 2 - 0.3).clamp(-1, 1)


def _close(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> tuple[AutoencoderOobleck, OobleckVAE]:
    """diffusers' model and Loom's read from its saved diffusers-layout file."""
    reference = _random_diffusers(TWIN)
    path = tmp_path_factory.mktemp("twin") / "diffusion_pytorch_model.safetensors"
    write_safetensors(reference.state_dict(), path, {})
    return reference, load_oobleck(path)


@torch.no_grad()
def test_encode_matches_diffusers(twin):
    reference, ours = twin
    audio = _audio(3.0)[..., :64 * 2048]
    expected = reference.encode(audio).latent_dist.mode()
    latents = ours.encode(audio)
    assert latents.shape == (2, 8, 64)
    assert _close(latents, expected) < TOLERANCE


@torch.no_grad()
def test_decode_matches_diffusers(twin):
    reference, ours = twin
    latents = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(1))
    expected = reference.decode(latents).sample
    audio = ours.decode(latents)
    assert audio.shape == (2, 2, 48 * 2048)
    assert _close(audio, expected) < TOLERANCE


@torch.no_grad()
def test_posterior_sample_matches_diffusers(twin):
    reference, ours = twin
    audio = _audio(1.0, seed=2)[..., :20 * 2048]
    expected = reference.encode(audio).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert _close(ours.encode(audio, generator=torch.Generator().manual_seed(7)), expected) < TOLERANCE


@torch.no_grad()
def test_odd_lengths_are_zero_padded_to_whole_latent_frames(twin):
    reference, ours = twin
    audio = _audio(1.3, seed=3)  # 57330 samples: 27.99 latent frames
    latents = ours.encode(audio)
    assert latents.shape[-1] == -(-audio.shape[-1] // 2048) == 28
    padded = torch.nn.functional.pad(audio, (0, 28 * 2048 - audio.shape[-1]))
    assert _close(latents, reference.encode(padded).latent_dist.mode()) < TOLERANCE
    assert ours.encode(audio[..., :100]).shape[-1] == 1
    assert ours.decode(latents[..., :5]).shape == (2, 2, 5 * 2048)


@torch.no_grad()
def test_chunked_encode_and_decode_equal_whole(twin):
    _, ours = twin
    audio = _audio(0.8, seed=4)[:1]  # 17.2 latent frames
    latents = ours.encode(audio)
    for chunk in (3, 10):
        assert _close(ours.encode(audio, chunk=chunk), latents) < 1e-5
    latents = torch.randn(1, 8, 30, generator=torch.Generator().manual_seed(5))
    whole = ours.decode(latents)
    for chunk in (2, 13):
        assert _close(ours.decode(latents, chunk=chunk), whole) < 1e-5


@torch.no_grad()
def test_stable_audio_layout_matches_diffusers_through_the_conversion_script(tmp_path):
    """A file in stable-audio-tools' names, weight-normed and under Stable Audio Open's prefix beside other weights,
    read by Loom and, renamed as diffusers' conversion script does, by diffusers."""
    path = write_tiny_oobleck(tmp_path / "sao.safetensors", prefix=SAO_PREFIX, seed=5, config=TWIN)
    sd = safetensors.torch.load_file(path)
    assert any(k.endswith("weight_g") for k in sd)
    write_safetensors({**sd, "model.model.transformer.layers.0.ff.weight": torch.ones(2)}, path, {})
    reference = _diffusers(TWIN)
    reference.load_state_dict(_sat_to_diffusers({k[len(SAO_PREFIX):]: v for k, v in sd.items()}), strict=True)
    ours = load_oobleck(path)
    audio = _audio(1.5, seed=6)[..., :32 * 2048]
    assert _close(ours.encode(audio), reference.encode(audio).latent_dist.mode()) < TOLERANCE
    latents = torch.randn(1, 8, 24, generator=torch.Generator().manual_seed(8))
    assert _close(ours.decode(latents), reference.decode(latents).sample) < TOLERANCE


@torch.no_grad()
def test_every_layout_reads_the_same_model(tmp_path):
    """stable-audio-tools' names under SAO's prefix and unprefixed (ComfyUI's VAE files), with weight norm as
    weight_g / weight_v or as torch's parametrizations, diffusers' names in a folder: one model, one output."""
    sao = write_tiny_oobleck(tmp_path / "sao.safetensors", prefix=SAO_PREFIX)
    comfy = write_tiny_oobleck(tmp_path / "vae.safetensors")
    diffusers = write_tiny_oobleck(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", layout="diffusers")
    parametrized = tmp_path / "parametrized.safetensors"
    renamed = {k.replace("weight_g", "parametrizations.weight.original0")
               .replace("weight_v", "parametrizations.weight.original1"): v
               for k, v in safetensors.torch.load_file(comfy).items()}
    write_safetensors(renamed, parametrized, {})
    expected = random_oobleck(TINY_OOBLECK)
    latents = torch.randn(1, 64, 6, generator=torch.Generator().manual_seed(9))
    audio = _audio(0.5, seed=10)[:1]
    want_audio, want_latents = expected.decode(latents), expected.encode(audio)
    for source in (sao, comfy, diffusers.parent, parametrized, expected.state_dict()):
        vae = load_oobleck(source)
        assert vae.config == TINY_OOBLECK
        assert _close(vae.decode(latents), want_audio) < 1e-5
        assert _close(vae.encode(audio), want_latents) < 1e-5
    assert is_oobleck(safetensors.torch.load_file(sao), SAO_PREFIX)
    assert is_oobleck(safetensors.torch.load_file(diffusers)) and not is_oobleck(renamed, SAO_PREFIX)


def test_released_configs_match_diffusers_on_the_meta_device():
    for config in (STABLE_AUDIO_OOBLECK, ACE_STEP_OOBLECK):
        with torch.device("meta"):
            ours, reference = OobleckVAE(config), _diffusers(config)
        theirs = to_stable_audio_layout(dict(reference.state_dict()))
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.state_dict().items()}
        assert oobleck_config_from_state_dict(theirs) == config
        magnitudes = sum(p.numel() for n, p in reference.named_parameters() if n.endswith("weight_g"))
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters()) - magnitudes
    assert sum(p.numel() for p in OobleckVAE(TINY_OOBLECK).parameters()) < 200_000
    assert (ours.sample_rate, ours.hop_length, ours.latent_channels, ours.audio_channels) == (48000, 1920, 64, 2)


def test_ace_step_hop_and_sample_rate(tmp_path):
    ace = replace(TINY_OOBLECK, downsampling_ratios=ACE_STEP_OOBLECK.downsampling_ratios, sampling_rate=48000)
    path = write_tiny_oobleck(tmp_path / "ace.safetensors", config=ace)
    shapes = safetensors.torch.load_file(path)
    assert shapes["decoder.layers.2.layers.1.weight_v"].shape[-1] == 12  # ComfyUI's test for ACE-Step 1.5's VAE
    vae = load_oobleck(path)
    assert (vae.hop_length, vae.sample_rate) == (1920, 48000)
    assert vae.decode(torch.zeros(1, 64, 3)).shape == (1, 2, 3 * 1920)
    folder = tmp_path / "vae"
    write_tiny_oobleck(folder / "diffusion_pytorch_model.safetensors", layout="diffusers",
                       config=replace(TINY_OOBLECK, sampling_rate=32000))
    assert json.loads((folder / "config.json").read_text())["sampling_rate"] == 32000
    assert load_oobleck(folder).sample_rate == 32000
    assert load_oobleck(path, sampling_rate=44100).sample_rate == 44100


def test_refuses_what_is_not_a_whole_oobleck_vae(tmp_path):
    path = write_tiny_oobleck(tmp_path / "vae.safetensors")
    sd = safetensors.torch.load_file(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_oobleck(truncated)
    other = tmp_path / "other.safetensors"
    write_safetensors({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, other, {})
    with pytest.raises(CheckpointError, match="other.safetensors: not an Oobleck"):
        load_oobleck(other)
    missing = {k: v for k, v in sd.items() if not k.startswith("decoder.layers.3.layers.2.")}
    with pytest.raises(CheckpointError, match="missing"):
        load_oobleck(missing)
    with pytest.raises(CheckpointError, match="no place"):
        load_oobleck({**sd, "decoder.layers.9.weight": torch.zeros(1)})
    no_blocks = {k: v for k, v in sd.items() if not k.startswith("encoder.layers.4.")}
    with pytest.raises(CheckpointError, match="not a whole Oobleck VAE"):
        load_oobleck(no_blocks)
    vae = load_oobleck(sd)
    with pytest.raises(ValueError, match="waveform"):
        vae.encode(torch.zeros(1, 1, 4096))
    with pytest.raises(ValueError, match="empty"):
        vae.encode(torch.zeros(1, 2, 0))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 8, 4))
    with pytest.raises(ValueError, match="layout"):
        write_tiny_oobleck(tmp_path / "x.safetensors", layout="onnx")


@torch.no_grad()
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 0.02), (torch.bfloat16, 0.1)])
def test_half_precision_file_and_model(tmp_path, dtype, tolerance):
    """Half-precision weights and compute: float16 keeps within a percent, bfloat16's 8-bit mantissa through 40
    layers some 5% (of the largest sample)."""
    path = write_tiny_oobleck(tmp_path / "vae.safetensors", dtype=dtype)
    vae, exact = load_oobleck(path, dtype=dtype), load_oobleck(path)
    latents = vae.encode(_audio(0.2)[:1])
    assert latents.dtype == dtype and latents.shape == (1, 64, 5)
    audio = vae.decode(latents)
    assert audio.dtype == dtype and audio.shape == (1, 2, 5 * 2048)
    assert _close(audio.float(), exact.decode(latents.float())) < tolerance
