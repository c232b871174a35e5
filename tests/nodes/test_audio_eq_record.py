"""AudioEqualizer3Band and RecordAudio. The equaliser's coefficients against the Audio EQ Cookbook's formulas restated
here (as torchaudio's bass_biquad, equalizer_biquad and treble_biquad write them), its filter against a direct-form
difference equation, and the gain it gives sines at each band against the dB set; RecordAudio loads the recording
the editor uploaded, by the plain name Loom's editor writes or ComfyUI's "audio/NAME.wav [temp]"."""

import math

import numpy as np
import pytest
import torch
from scipy.signal import freqz

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from graph.ui_format import ui_to_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.audio import (
    AudioEqualizer3Band,
    biquad_filter,
    peak_coefficients,
    read_audio,
    shelf_coefficients,
)
from tests.nodes.test_audio_nodes import sine, write_wav

RATE = 48000
FLAT = {"low_gain_dB": 0.0, "low_freq": 100, "mid_gain_dB": 0.0, "mid_freq": 1000, "mid_q": 0.707,
        "high_gain_dB": 0.0, "high_freq": 5000}


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    paths.input.mkdir(parents=True, exist_ok=True)
    yield paths
    set_paths(FolderPaths())


def cookbook(kind: str, rate: int, f0: float, gain_db: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """RBJ's Audio EQ Cookbook, term by term: lowShelf, highShelf and peakingEQ, normalised by a0."""
    A = 10 ** (gain_db / 40)
    w0 = 2 * math.pi * f0 / rate
    alpha = math.sin(w0) / (2 * q)
    c = math.cos(w0)
    if kind == "low":
        b = [A * ((A + 1) - (A - 1) * c + 2 * math.sqrt(A) * alpha), 2 * A * ((A - 1) - (A + 1) * c),
             A * ((A + 1) - (A - 1) * c - 2 * math.sqrt(A) * alpha)]
        a = [(A + 1) + (A - 1) * c + 2 * math.sqrt(A) * alpha, -2 * ((A - 1) + (A + 1) * c),
             (A + 1) + (A - 1) * c - 2 * math.sqrt(A) * alpha]
    elif kind == "high":
        b = [A * ((A + 1) + (A - 1) * c + 2 * math.sqrt(A) * alpha), -2 * A * ((A - 1) + (A + 1) * c),
             A * ((A + 1) + (A - 1) * c - 2 * math.sqrt(A) * alpha)]
        a = [(A + 1) - (A - 1) * c + 2 * math.sqrt(A) * alpha, 2 * ((A - 1) - (A + 1) * c),
             (A + 1) - (A - 1) * c - 2 * math.sqrt(A) * alpha]
    else:
        b = [1 + alpha * A, -2 * c, 1 - alpha * A]
        a = [1 + alpha / A, -2 * c, 1 - alpha / A]
    return np.array(b) / a[0], np.array(a) / a[0]


def difference_equation(x: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """y[n] = b0 x[n] + b1 x[n-1] + b2 x[n-2] - a1 y[n-1] - a2 y[n-2], from rest (a0 = 1)."""
    y = np.zeros_like(x)
    for n in range(len(x)):
        y[n] = sum(b[k] * x[n - k] for k in range(3) if n >= k) - sum(a[k] * y[n - k] for k in (1, 2) if n >= k)
    return y


def gain_db(before: torch.Tensor, after: torch.Tensor) -> float:
    """The level change in dB, measured on the second half (the filter's transient has died out)."""
    half = before.shape[-1] // 2
    return float(20 * torch.log10(after[..., half:].pow(2).mean().sqrt() / before[..., half:].pow(2).mean().sqrt()))


def tone(freq: float, seconds: float = 0.25, amplitude: float = 0.25) -> torch.Tensor:
    t = torch.arange(round(seconds * RATE), dtype=torch.float64) / RATE
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()[None, None]


def equalize(waveform: torch.Tensor, **settings) -> torch.Tensor:
    (out,) = AudioEqualizer3Band().execute({"waveform": waveform, "sample_rate": RATE}, **{**FLAT, **settings})
    assert out["sample_rate"] == RATE
    return out["waveform"]


def test_the_equaliser_declares_comfyuis_inputs():
    info = builtin_registry().object_info()["AudioEqualizer3Band"]
    assert info["display_name"] == "Audio Equalizer (3-Band)" and info["category"] == "audio"
    assert info["output"] == ["AUDIO"]
    required = info["input"]["required"]
    assert list(required) == ["audio", *FLAT]
    assert {k: (v[1]["default"], v[1]["min"], v[1]["max"]) for k, v in required.items() if k != "audio"} == {
        "low_gain_dB": (0.0, -24.0, 24.0), "low_freq": (100, 20, 500), "mid_gain_dB": (0.0, -24.0, 24.0),
        "mid_freq": (1000, 200, 4000), "mid_q": (0.707, 0.1, 10.0), "high_gain_dB": (0.0, -24.0, 24.0),
        "high_freq": (5000, 1000, 15000)}


@pytest.mark.parametrize(("rate", "f0", "gain", "q"), [(48000, 100, 6.0, 0.707), (44100, 2500, -12.5, 3.0),
                                                       (16000, 5000, 24.0, 0.1)])
def test_the_coefficients_are_the_cookbooks(rate, f0, gain, q):
    for kind, ours in (("low", shelf_coefficients("low", rate, f0, gain, q)),
                       ("high", shelf_coefficients("high", rate, f0, gain, q)),
                       ("peak", peak_coefficients(rate, f0, gain, q))):
        b, a = cookbook(kind, rate, f0, gain, q)
        np.testing.assert_allclose(ours[0], b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours[1], a, rtol=1e-12, atol=1e-12)
    # The responses the designs promise: the full gain at DC (low shelf), Nyquist (high shelf) and f0 (peak); half
    # of it, in dB, at a shelf's f0.
    response = {kind: 20 * np.log10(np.abs(freqz(*coefficients, worN=[0.0, f0, rate / 2], fs=rate)[1]))
                for kind, coefficients in (("low", shelf_coefficients("low", rate, f0, gain, q)),
                                           ("high", shelf_coefficients("high", rate, f0, gain, q)),
                                           ("peak", peak_coefficients(rate, f0, gain, q)))}
    np.testing.assert_allclose([response["low"][0], response["high"][2], response["peak"][1]], gain, atol=1e-9)
    np.testing.assert_allclose([response["low"][1], response["high"][1]], gain / 2, atol=1e-9)


def test_the_filter_is_the_difference_equation_clamped_to_one():
    x = np.random.default_rng(0).uniform(-0.3, 0.3, 300)
    b, a = peak_coefficients(RATE, 1000, 9.0, 2.0)
    assert np.abs(biquad_filter(x, b, a) - difference_equation(x, b, a)).max() < 1e-6
    loud = 3 * x  # boosted past 1: torchaudio's lfilter clamps its output, and so does this
    expected = difference_equation(loud, *shelf_coefficients("low", RATE, 300, 12.0, 0.707))
    assert np.abs(expected).max() > 1.0
    filtered = biquad_filter(loud, *shelf_coefficients("low", RATE, 300, 12.0, 0.707))
    assert np.abs(filtered - np.clip(expected, -1, 1)).max() < 1e-6


@pytest.mark.parametrize(("settings", "freq", "expected"), [
    ({"mid_gain_dB": 6.0, "mid_freq": 1000}, 1000, 6.0),
    ({"mid_gain_dB": -9.0, "mid_freq": 2500, "mid_q": 4.0}, 2500, -9.0),
    ({"low_gain_dB": 6.0, "low_freq": 500}, 30, 6.0),  # well inside the shelf
    ({"low_gain_dB": 6.0, "low_freq": 500}, 500, 3.0),  # at the shelf frequency: half the dB
    ({"high_gain_dB": -8.0, "high_freq": 3000}, 20000, -8.0),
    ({"high_gain_dB": -8.0, "high_freq": 3000}, 3000, -4.0),
    ({"low_gain_dB": 6.0, "low_freq": 100}, 8000, 0.0),  # a band leaves the others' frequencies alone
])
def test_a_sine_is_changed_by_the_gain_set(settings, freq, expected):
    before = tone(freq)
    assert abs(gain_db(before, equalize(before, **settings)) - expected) < 0.5


def test_zero_db_everywhere_leaves_the_audio_unchanged():
    waveform = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (2, 2, 500)).astype(np.float32))
    out = equalize(waveform)
    assert out.dtype == torch.float32 and torch.abs(out - waveform).max() < 1e-6


def test_stereo_and_batch_keep_their_shape_and_each_channel_is_filtered_alone():
    waveform = torch.stack([sine(0.05, RATE, (440.0, 3000.0)), sine(0.05, RATE, (90.0, 7000.0))]) * 0.4
    settings = {"low_gain_dB": 4.0, "mid_gain_dB": -3.0, "mid_freq": 2000, "high_gain_dB": 5.0}
    out = equalize(waveform, **settings)
    assert out.shape == waveform.shape == (2, 2, 2400) and out.dtype == torch.float32
    for item in range(2):
        for channel in range(2):
            alone = equalize(waveform[item:item + 1, channel:channel + 1], **settings)
            assert torch.equal(out[item, channel], alone[0, 0])
    assert torch.abs(out - waveform).max() > 0.05


def test_a_band_at_or_above_half_the_rate_is_refused():
    with pytest.raises(ValueError, match="8000 Hz is not below half the sample rate"):
        AudioEqualizer3Band().execute({"waveform": tone(100), "sample_rate": 16000},
                                      **{**FLAT, "high_gain_dB": 3.0, "high_freq": 8000})
    (out,) = AudioEqualizer3Band().execute({"waveform": tone(100), "sample_rate": 16000},
                                           **{**FLAT, "high_freq": 8000})  # at 0 dB the band is skipped
    assert torch.equal(out["waveform"], tone(100))


def test_the_equaliser_runs_in_a_workflow(folders):
    write_wav(folders.input / "tone.wav", sine(0.2, RATE, (50.0, 12000.0)), RATE)
    settings = {"low_gain_dB": 6.0, "low_freq": 400, "mid_gain_dB": 3.0, "mid_freq": 1000, "mid_q": 4.0,
                "high_gain_dB": -6.0, "high_freq": 2000}
    doc = {"1": {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}},
           "2": {"class_type": "AudioEqualizer3Band", "inputs": {"audio": ["1", 0], **FLAT, **settings}},
           "3": {"class_type": "PreviewAudio", "inputs": {"audio": ["2", 0]}}}
    result = Executor(builtin_registry(), services=Services.create(folders)).run(parse_api(doc), keep=["1", "2"])
    assert result.ok, result.error
    loaded, eq = result.values["1"][0], result.values["2"][0]
    assert eq["sample_rate"] == RATE and eq["waveform"].shape == loaded["waveform"].shape == (1, 2, 9600)
    assert torch.equal(eq["waveform"], equalize(loaded["waveform"], **settings))
    assert abs(gain_db(loaded["waveform"][:, :1], eq["waveform"][:, :1]) - 6.0) < 0.5  # 50 Hz: the bass shelf
    assert abs(gain_db(loaded["waveform"][:, 1:], eq["waveform"][:, 1:]) + 6.0) < 0.5  # 12 kHz: the treble shelf
    assert result.outputs["3"]["audio"][0]["type"] == "temp"


def test_record_audio_declares_comfyuis_record_widget():
    info = builtin_registry().object_info()["RecordAudio"]
    assert info["display_name"] == "Record Audio" and info["category"] == "audio"
    assert info["input"]["required"] == {"audio": ["AUDIO_RECORD", {}]} and info["output"] == ["AUDIO"]


def run_recording(folders, name):
    engine = Executor(builtin_registry(), services=Services.create(folders))
    return engine.run(parse_api({"1": {"class_type": "RecordAudio", "inputs": {"audio": name}},
                                 "2": {"class_type": "PreviewAudio", "inputs": {"audio": ["1", 0]}}}), keep=["1"])


def test_record_audio_loads_the_uploaded_recording_as_load_audio_does(folders):
    (folders.input / "audio").mkdir()
    write_wav(folders.input / "audio" / "recording-1.wav", sine(0.1, RATE, (440.0,)), RATE)
    result = run_recording(folders, "audio/recording-1.wav")  # what Loom's editor writes
    assert result.ok, result.error
    (audio,) = result.values["1"]
    expected = read_audio(folders.input / "audio" / "recording-1.wav")
    assert audio["sample_rate"] == RATE and audio["waveform"].shape == (1, 1, 4800)
    assert torch.equal(audio["waveform"], expected["waveform"])
    assert result.outputs["2"]["audio"][0]["type"] == "temp"
    # ComfyUI's editor uploads to temp/audio/ and sends "audio/NAME.wav [temp]"
    (folders.temp / "audio").mkdir(parents=True)
    write_wav(folders.temp / "audio" / "recording-2.wav", sine(0.1, RATE, (440.0, 880.0)), RATE)
    result = run_recording(folders, "audio/recording-2.wav [temp]")
    assert result.ok, result.error
    assert result.values["1"][0]["waveform"].shape == (1, 2, 4800)


@pytest.mark.parametrize(("name", "problem"), [
    ("", "no recording: press record"),
    ("audio/gone.wav", "'audio/gone.wav' is not a recording in the input folder"),
    ("../outside.wav", "'../outside.wav' is not a recording in the input folder"),
    ("notes.wav", "notes.wav is not a readable audio file"),
])
def test_record_audio_refuses_a_missing_or_unreadable_recording(folders, name, problem):
    (folders.input / "notes.wav").write_text("not audio")
    write_wav(folders.base / "outside.wav", sine(0.05, RATE, (440.0,)), RATE)
    with pytest.raises(WorkflowInvalid, match=problem):
        run_recording(folders, name)


def test_a_ui_workflow_keeps_the_recordings_name_as_its_widget_value(folders):
    doc = {"nodes": [{"id": 1, "type": "RecordAudio", "widgets_values": ["audio/recording-3.webm"], "inputs": [],
                      "outputs": [{"name": "AUDIO", "type": "AUDIO", "links": [1]}]},
                     {"id": 2, "type": "PreviewAudio", "widgets_values": [],
                      "inputs": [{"name": "audio", "type": "AUDIO", "link": 1}]}],
           "links": [[1, 1, 0, 2, 0, "AUDIO"]]}
    api = ui_to_api(doc, builtin_registry())
    assert api["1"]["class_type"] == "RecordAudio" and api["1"]["inputs"] == {"audio": "audio/recording-3.webm"}
