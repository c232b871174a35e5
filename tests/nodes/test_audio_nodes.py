"""Audio nodes (LoadAudio, SaveAudio, SaveAudioMP3, SaveAudioOpus, PreviewAudio and the AUDIO utilities): a sine
written with PyAV, loaded, saved in each format, decoded back and compared (FLAC to 16-bit quantisation, MP3 and
Opus by correlation and SNR after aligning for the codec's delay), the workflow read back from the metadata."""

import json
import math

import av
import numpy as np
import pytest
import torch

from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.audio import (
    AudioAdjustVolume,
    AudioConcat,
    AudioMerge,
    EmptyAudio,
    LoadAudio,
    PreviewAudio,
    SaveAudio,
    SaveAudioMP3,
    SaveAudioOpus,
    SplitAudioChannels,
    TrimAudioDuration,
    opus_rate,
    read_audio,
    resample,
)

PROMPT = {"1": {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}}}
WORKFLOW = {"nodes": [{"id": 1, "type": "LoadAudio"}], "links": []}
RATE = 44100


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    paths.input.mkdir(parents=True, exist_ok=True)
    yield paths
    set_paths(FolderPaths())


def run(cls, **inputs):
    node = cls()
    node.ctx = NodeContext(extra={"prompt": PROMPT, "extra_pnginfo": {"workflow": WORKFLOW}})
    return node.execute(**inputs)


def sine(seconds: float = 0.5, rate: int = RATE, freqs=(440.0, 660.0)) -> torch.Tensor:
    """[C, T] float32: one sine per channel at 0.5 amplitude."""
    t = np.arange(round(seconds * rate)) / rate
    return torch.from_numpy(np.stack([0.5 * np.sin(2 * math.pi * f * t) for f in freqs]).astype(np.float32))


def write_wav(path, waveform: torch.Tensor, rate: int = RATE) -> None:
    """A 16-bit PCM WAV of `waveform` [C, T], written with PyAV (what a user's file would hold)."""
    layout = "mono" if waveform.shape[0] == 1 else "stereo"
    pcm = np.round(waveform.numpy() * 32767).astype(np.int16)
    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16p", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def decode(path):
    """Every sample of a file as float [C, T], its rate and metadata (container's and the audio stream's)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")
        chunks = [o.to_ndarray() for f in container.decode(stream) for o in resampler.resample(f)]
        tags = {**dict(stream.metadata), **dict(container.metadata)}
        return np.concatenate(chunks, axis=1), stream.codec_context.sample_rate, stream.codec_context.name, tags


def inner(samples: np.ndarray) -> np.ndarray:
    """The samples less 100 at each end (where a lossy codec's filters ring against the cut)."""
    return samples[:, 100:-100]


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).sum() / ((reference - other) ** 2).sum()))


def test_the_nodes_declare_comfyuis_inputs():
    info = builtin_registry().object_info()
    assert info["LoadAudio"]["input"]["required"]["audio"][1] == {"audio_upload": True}
    assert info["LoadAudio"]["output"] == ["AUDIO"]
    for name in ("SaveAudio", "SaveAudioMP3", "SaveAudioOpus"):
        assert info[name]["output_node"] and info[name]["category"] == "audio"
        assert info[name]["input"]["required"]["filename_prefix"][1]["default"] == "audio/ComfyUI"
    assert info["SaveAudioMP3"]["input"]["required"]["quality"] == [["V0", "128k", "320k"], {"default": "V0"}]
    assert info["SaveAudioOpus"]["input"]["required"]["quality"] == [
        ["64k", "96k", "128k", "192k", "320k"], {"default": "128k"}]
    assert list(info["PreviewAudio"]["input"]["required"]) == ["audio"]
    assert info["SplitAudioChannels"]["output_name"] == ["left", "right"]


def test_load_audio_lists_and_decodes_a_wav_exactly(folders):
    wave = sine()
    write_wav(folders.input / "tone.wav", wave)
    (folders.input / "notes.txt").write_text("not audio")
    assert LoadAudio.inputs["audio"].choices_fn() == ["tone.wav"]
    (audio,) = run(LoadAudio, audio="tone.wav")
    assert audio["sample_rate"] == RATE and audio["waveform"].dtype == torch.float32
    assert audio["waveform"].shape == (1, 2, wave.shape[1])
    expected = torch.from_numpy(np.round(wave.numpy() * 32767) / 32768)  # s16 read back as ComfyUI scales it
    assert torch.equal(audio["waveform"][0], expected.float())


def test_load_audio_refuses_a_missing_or_undecodable_file(folders):
    with pytest.raises(FileNotFoundError, match="'gone.wav'"):
        run(LoadAudio, audio="gone.wav")
    (folders.input / "broken.flac").write_bytes(b"fLaC this is not a flac stream at all" * 10)
    with pytest.raises(ValueError, match="broken.flac is not a readable audio file"):
        run(LoadAudio, audio="broken.flac")
    assert "broken.flac is not a readable audio file" in LoadAudio.check_inputs({"audio": "broken.flac"})
    with av.open(str(folders.input / "silent.mkv"), mode="w") as container:  # a video without sound
        stream = container.add_stream("ffv1", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode(None))
    assert "silent.mkv" in LoadAudio.inputs["audio"].choices_fn()  # ComfyUI lists videos too: their sound is read
    assert LoadAudio.check_inputs({"audio": "silent.mkv"}) == "Invalid audio file: silent.mkv holds no audio stream"
    with pytest.raises(ValueError, match="silent.mkv holds no audio stream"):
        run(LoadAudio, audio="silent.mkv")


def test_save_flac_round_trips_to_16_bit_with_the_workflow(folders):
    wave = sine()
    result = run(SaveAudio, audio={"waveform": wave[None], "sample_rate": RATE}, filename_prefix="audio/ComfyUI")
    (entry,) = result.ui["audio"]
    assert entry == {"filename": "ComfyUI_00001_.flac", "subfolder": "audio", "type": "output"}
    samples, rate, codec, tags = decode(folders.output / "audio" / entry["filename"])
    assert (rate, codec, samples.shape) == (RATE, "flac", tuple(wave.shape))
    assert np.abs(samples - wave.numpy()).max() <= 0.5 / 32768 + 1e-7  # 16-bit: within half a step
    assert json.loads(tags["prompt"]) == PROMPT and json.loads(tags["workflow"]) == WORKFLOW
    again = read_audio(folders.output / "audio" / entry["filename"])  # what LoadAudio gives for the saved file
    assert again["sample_rate"] == RATE and torch.equal(again["waveform"][0], torch.from_numpy(samples))


def test_a_batch_of_two_saves_two_files(folders):
    batch = torch.stack([sine(0.1), -sine(0.1)])
    result = run(SaveAudio, audio={"waveform": batch, "sample_rate": RATE}, filename_prefix="pair_%batch_num%")
    assert [e["filename"] for e in result.ui["audio"]] == ["pair_0_00001_.flac", "pair_1_00001_.flac"]
    first, second = (decode(folders.output / e["filename"])[0] for e in result.ui["audio"])
    assert np.abs(first + second).max() <= 1 / 32768 + 1e-7
    result = run(SaveAudio, audio={"waveform": batch, "sample_rate": RATE}, filename_prefix="pair")
    assert [e["filename"] for e in result.ui["audio"]] == ["pair_00001_.flac", "pair_00002_.flac"]


@pytest.mark.parametrize(("quality", "min_snr"), [("V0", 55), ("128k", 22), ("320k", 70)])
def test_save_mp3_decodes_back_close_to_the_input(folders, quality, min_snr):
    wave = sine()
    result = run(SaveAudioMP3, audio={"waveform": wave[None], "sample_rate": RATE}, filename_prefix="tone",
                 quality=quality)
    (entry,) = result.ui["audio"]
    assert entry["filename"] == "tone_00001_.mp3"
    samples, rate, codec, tags = decode(folders.output / entry["filename"])
    assert (rate, codec) == (RATE, "mp3float")
    # LAME's gapless header lets FFmpeg drop the encoder delay and the last frame's padding: the length comes back.
    assert samples.shape == wave.shape
    assert snr_db(inner(wave.numpy()), inner(samples)) > min_snr
    assert np.corrcoef(inner(wave.numpy()).ravel(), inner(samples).ravel())[0, 1] > 0.998
    assert json.loads(tags["prompt"]) == PROMPT and json.loads(tags["workflow"]) == WORKFLOW


@pytest.mark.parametrize("rate", [48000, 44100, 22050])
def test_save_opus_resamples_to_a_rate_libopus_takes(folders, rate):
    wave = sine(rate=rate)
    result = run(SaveAudioOpus, audio={"waveform": wave[None], "sample_rate": rate}, filename_prefix="tone",
                 quality="128k")
    (entry,) = result.ui["audio"]
    assert entry["filename"] == "tone_00001_.opus"
    samples, decoded_rate, codec, tags = decode(folders.output / entry["filename"])
    assert codec in ("opus", "libopus") and decoded_rate == 48000  # FFmpeg's decoder always gives 48 kHz
    reference = resample(wave, rate, decoded_rate).numpy()
    assert samples.shape == reference.shape  # Ogg's pre-skip and end trim give back the length
    assert snr_db(inner(reference), inner(samples)) > 35
    assert np.corrcoef(inner(reference).ravel(), inner(samples).ravel())[0, 1] > 0.9999
    assert json.loads(tags["prompt"]) == PROMPT and json.loads(tags["workflow"]) == WORKFLOW


def test_opus_rates_follow_comfyui():
    assert [opus_rate(r) for r in (8000, 11025, 16000, 22050, 44100, 48000, 96000)] == [
        8000, 12000, 16000, 24000, 48000, 48000, 48000]


def test_preview_audio_writes_a_flac_to_temp(folders):
    result = run(PreviewAudio, audio={"waveform": sine(0.1)[None], "sample_rate": RATE})
    (entry,) = result.ui["audio"]
    assert entry["type"] == "temp" and entry["subfolder"] == "" and entry["filename"].endswith("_00001_.flac")
    assert entry["filename"].startswith("ComfyUI_temp_")
    assert decode(folders.temp / entry["filename"])[0].shape == (2, 4410)


def test_save_refuses_more_than_two_channels_and_a_prefix_outside_output(folders):
    with pytest.raises(ValueError, match="3 channels"):
        run(SaveAudio, audio={"waveform": torch.zeros(1, 3, 100), "sample_rate": RATE}, filename_prefix="x")
    assert not list(folders.output.glob("x_*"))  # no half-written file stays
    assert "must be a relative name" in SaveAudio.check_inputs({"filename_prefix": "../escape"})


def test_the_utility_nodes():
    stereo = {"waveform": torch.stack([sine(1.0)]), "sample_rate": RATE}
    (trimmed,) = TrimAudioDuration().execute(stereo, start_index=-0.25, duration=0.1)
    assert torch.equal(trimmed["waveform"], stereo["waveform"][..., RATE - 11025:RATE - 11025 + 4410])
    with pytest.raises(ValueError, match="must lie within"):
        TrimAudioDuration().execute(stereo, start_index=0.5, duration=0.0)
    left, right = SplitAudioChannels().execute(stereo)
    assert torch.equal(torch.cat([left["waveform"], right["waveform"]], 1), stereo["waveform"])
    with pytest.raises(ValueError, match="needs stereo"):
        SplitAudioChannels().execute(left)
    (louder,) = AudioAdjustVolume().execute(stereo, volume=6)
    assert torch.allclose(louder["waveform"], stereo["waveform"] * 10 ** 0.3)
    (silence,) = EmptyAudio().execute(duration=0.5, sample_rate=16000, channels=1)
    assert silence["waveform"].shape == (1, 1, 8000) and silence["sample_rate"] == 16000

    (joined,) = AudioConcat().execute(left, stereo, direction="before")  # mono made stereo, audio2 first
    assert joined["waveform"].shape == (1, 2, 2 * RATE)
    assert torch.equal(joined["waveform"][..., RATE:], left["waveform"].repeat(1, 2, 1))
    half_rate = {"waveform": sine(0.5, 22050)[None], "sample_rate": 22050}
    (mixed,) = AudioConcat().execute(stereo, half_rate, direction="after")  # the lower rate resampled up
    assert mixed["sample_rate"] == RATE and abs(mixed["waveform"].shape[-1] - int(1.5 * RATE)) <= 2

    (summed,) = AudioMerge().execute(stereo, {"waveform": -stereo["waveform"][..., :100], "sample_rate": RATE}, "add")
    assert summed["waveform"][..., :100].abs().max() == 0 and torch.equal(summed["waveform"][..., 100:],
                                                                           stereo["waveform"][..., 100:])
    (loud,) = AudioMerge().execute(stereo, stereo, "add")  # peaks of 1.0 after scaling back into -1..1
    assert torch.allclose(loud["waveform"].abs().max(), torch.tensor(1.0))


def test_resample_keeps_a_tone_and_its_length():
    wave = sine(0.5, 22050, freqs=(440.0,))
    up = resample(wave[None], 22050, 44100)[0]
    assert abs(up.shape[-1] - 22050) <= 2
    reference = sine(0.5, 44100, freqs=(440.0,))[:, :up.shape[-1]]
    assert snr_db(reference[:, 200:-200].numpy(), up[:, 200:-200].numpy()) > 40


def test_load_audio_reads_the_sound_of_a_video(folders):
    wave = sine(0.2)
    pcm = np.round(wave.numpy() * 32767).astype(np.int16)
    with av.open(str(folders.input / "clip.mkv"), mode="w") as container:
        video = container.add_stream("ffv1", rate=10)
        video.width, video.height, video.pix_fmt = 16, 16, "yuv420p"
        sound = container.add_stream("flac", rate=RATE, layout="stereo")
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        samples = av.AudioFrame.from_ndarray(pcm, format="s16p", layout="stereo")
        samples.sample_rate, samples.pts = RATE, 0
        container.mux(sound.encode(samples))
        container.mux(sound.encode(None))
    assert LoadAudio.check_inputs({"audio": "clip.mkv"}) is None
    (audio,) = run(LoadAudio, audio="clip.mkv")
    assert audio["sample_rate"] == RATE
    assert torch.equal(audio["waveform"][0], torch.from_numpy(pcm.astype(np.float32) / 32768))


def test_save_audio_advanced_takes_the_formats_quality_and_passes_the_audio_on(folders):
    """ComfyUI's SaveAudioAdvanced: format flac, mp3 or opus, the quality a dynamic-combo input (format.quality)."""
    from nodes.sd.audio import SaveAudioAdvanced

    audio = {"waveform": sine()[None], "sample_rate": RATE}
    for fmt, quality, codec in (("flac", None, "flac"), ("mp3", "320k", "mp3float"), ("opus", "192k", "opus")):
        options = {} if quality is None else {"format.quality": quality}
        result = run(SaveAudioAdvanced, audio=audio, filename_prefix=f"adv/{fmt}", format=fmt, **options)
        assert result.outputs == (audio,)
        (entry,) = result.ui["audio"]
        assert entry["subfolder"] == "adv" and entry["filename"] == f"{fmt}_00001_.{fmt}"
        samples, _, decoded_codec, tags = decode(folders.output / "adv" / entry["filename"])
        assert decoded_codec in (codec, "libopus") and json.loads(tags["prompt"]) == PROMPT
    mp3 = decode(folders.output / "adv" / "mp3_00001_.mp3")[0]
    assert snr_db(inner(sine().numpy()), inner(mp3)) > 70  # 320k, not the default V0's ~63 dB
    check = SaveAudioAdvanced.check_inputs
    assert check({"format": "opus", "format.quality": "V0", "filename_prefix": "a"}) == (
        "format opus takes the quality 64k, 96k, 128k, 192k, 320k, not V0")
    assert check({"format": "flac", "format.quality": "V0", "filename_prefix": "a"}) is None  # FLAC has none
    assert SaveAudioAdvanced.widgets_from_ui(["audio/ComfyUI", "mp3", "128k"]) == {
        "filename_prefix": "audio/ComfyUI", "format": "mp3", "format.quality": "128k"}
