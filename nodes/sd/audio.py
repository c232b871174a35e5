"""Audio nodes under ComfyUI's names: LoadAudio, RecordAudio (the editor's microphone recording), SaveAudio (FLAC),
SaveAudioMP3, SaveAudioOpus, PreviewAudio, and the small AUDIO utilities (trim, split, concatenate, merge, volume,
silence, the three-band equaliser, duration). Files are read and written with PyAV.

AudioEqualizer3Band designs its filters as torchaudio's bass_biquad, equalizer_biquad and treble_biquad do (RBJ's
Audio EQ Cookbook; ComfyUI calls those three) and runs them with scipy.signal.lfilter; tests/nodes/
test_audio_eq_record.py checks them against the cookbook's formulas, a direct-form loop and measured sine gains.

AUDIO is ComfyUI's dict {"waveform": float32 [B, C, T] in -1..1, "sample_rate": int}; custom nodes rely on it.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodes.folders import get_paths, input_file, input_files, input_where, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.sd.imageio import workflow_metadata
from nodes.spec import Combo, Float, InputSpec, Int, Output, Socket, String

# What LoadAudio lists: ComfyUI lists the input files whose type is audio or video (the audio of a video is read).
AUDIO_SUFFIXES = (".wav", ".mp3", ".ogg", ".opus", ".flac", ".m4a", ".aac", ".aif", ".aiff", ".weba", ".wma")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
MP3_QUALITIES = ["V0", "128k", "320k"]
OPUS_QUALITIES = ["64k", "96k", "128k", "192k", "320k"]
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates libopus encodes
# The container format and encoder of each saved format, with the file suffix ComfyUI gives it.
FORMATS = {"flac": ("flac", "flac"), "mp3": ("mp3", "libmp3lame"), "opus": ("opus", "libopus")}


def audio_value(waveform: torch.Tensor, sample_rate: int) -> dict[str, Any]:
    return {"waveform": waveform, "sample_rate": int(sample_rate)}


def list_input_audio() -> list[str]:
    return input_files((*AUDIO_SUFFIXES, *VIDEO_SUFFIXES))


def read_audio(path: Path) -> dict[str, Any]:
    """Decode the first audio stream of a file to AUDIO [1, C, T] float32 at the file's own sample rate; integer
    samples are scaled to -1..1 (s16 by 1/32768) as ComfyUI does. A file without decodable audio is refused."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{path.name} holds no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="fltp")  # planar float, keeping the layout and rate
            chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
    except av.FFmpegError as exc:
        raise ValueError(f"{path.name} is not a readable audio file: {exc}") from exc
    if not chunks:
        raise ValueError(f"{path.name} holds no audio samples")
    return audio_value(torch.from_numpy(np.concatenate(chunks, axis=1))[None], rate)


def _layout(channels: int, what: str) -> str:
    if channels not in (1, 2):
        raise ValueError(f"{what} saves mono or stereo audio, got {channels} channels")
    return "mono" if channels == 1 else "stereo"


def resample(waveform: torch.Tensor, rate: int, new_rate: int) -> torch.Tensor:
    """[..., C, T] from `rate` to `new_rate` with FFmpeg's resampler (PyAV's AudioResampler), flushed to the end."""
    import av

    if rate == new_rate:
        return waveform
    *lead, channels, length = waveform.shape
    planes = waveform.detach().float().cpu().reshape(-1, length).numpy()
    out = []
    for start in range(0, len(planes), channels):  # one resampler per batch item: its [C, T] is one stream
        resampler = av.AudioResampler(format="fltp", layout=_layout(channels, "resample"), rate=new_rate)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[start:start + channels]), format="fltp",
                                           layout=_layout(channels, "resample"))
        frame.sample_rate, frame.pts = rate, 0
        frames = [*resampler.resample(frame), *resampler.resample(None)]
        out.append(np.concatenate([f.to_ndarray() for f in frames], axis=1))
    new_length = min(x.shape[1] for x in out)
    stacked = np.stack([x[:, :new_length] for x in out]).reshape(*lead, channels, new_length)
    return torch.from_numpy(stacked).to(waveform.device)


def opus_rate(rate: int) -> int:
    """The rate ComfyUI's SaveAudioOpus encodes at: the rate itself when libopus takes it, else the next higher one
    it takes (48 kHz at most)."""
    return next((r for r in OPUS_RATES if r >= rate), 48000)


def encode_audio(handle: Any, waveform: torch.Tensor, sample_rate: int, fmt: str, quality: str,
                 tags: dict[str, str]) -> None:
    """Write one [C, T] waveform as FLAC (16-bit), MP3 or Opus into an open binary file, `tags` in its metadata
    (Vorbis comments for FLAC and Opus, ID3 for MP3): ComfyUI's save_audio."""
    import av

    container_format, encoder = FORMATS[fmt]
    layout = _layout(waveform.shape[0], f"saving {fmt}")
    if fmt == "opus" and opus_rate(sample_rate) != sample_rate:
        waveform, sample_rate = resample(waveform, sample_rate, opus_rate(sample_rate)), opus_rate(sample_rate)
    samples = np.ascontiguousarray(waveform.detach().float().cpu().numpy())
    with av.open(handle, mode="w", format=container_format) as container:
        container.metadata.update(tags)
        stream = container.add_stream(encoder, rate=sample_rate, layout=layout)
        if fmt == "mp3" and quality == "V0":
            stream.codec_context.qscale = 1  # VBR, as ComfyUI asks for V0
        elif fmt != "flac":
            stream.bit_rate = int(quality.rstrip("k")) * 1000
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = sample_rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def save_audio(ctx: Any, audio: dict[str, Any], root: Path, prefix: str, kind: str, fmt: str,
               quality: str = "") -> list[dict[str, str]]:
    """Each batch item as PREFIX_NNNNN_.FORMAT under `root` (a `%batch_num%` in the prefix becomes the item's
    index), the prompt and workflow in its metadata; never overwrites. Returns ComfyUI's UI entries."""
    waveform = audio["waveform"]
    if waveform.ndim != 3:
        raise ValueError(f"AUDIO waveform must be [batch, channels, samples], got shape {tuple(waveform.shape)}")
    tags = workflow_metadata(ctx)
    results = []
    for index, item in enumerate(waveform):
        item_prefix = prefix.replace("%batch_num%", str(index))
        with new_output_file(root, item_prefix, f".{fmt}") as (path, handle, subfolder):
            encode_audio(handle, item, int(audio["sample_rate"]), fmt, quality, tags)
        results.append({"filename": path.name, "subfolder": subfolder, "type": kind})
    return results


def audio_file_problem(path: Path, name: str) -> str | None:
    """Why the file a loader names cannot be loaded (no audio stream, not a media file), from its header; or None."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return f"Invalid audio file: {name} holds no audio stream"
    except av.FFmpegError as exc:
        return f"Invalid audio file: {name} is not a readable audio file: {exc}"
    return None


class LoadAudio(Node):
    """Loads the audio of a file in the input folder (an audio file, or a video's sound) at its own sample rate."""

    display_name = "Load Audio"
    category = "audio"
    audio = Combo(list_input_audio, extra={"audio_upload": True}, choices_where=input_where)
    outputs = (Output("AUDIO"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        path = input_file(str(inputs.get("audio", "")))
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        """Refuse a file without an audio stream before anything heavy runs (reads the header only)."""
        path = input_file(str(inputs.get("audio", "")))
        if path is None:
            return None  # the combo check has reported it
        return audio_file_problem(path, inputs["audio"])

    def execute(self, audio: str) -> tuple[dict[str, Any]]:
        path = input_file(audio)
        if path is None:
            raise FileNotFoundError(f"Invalid audio file: {audio!r} is not in the input folder {get_paths().input}")
        return (read_audio(path),)


# ComfyUI's annotated names: "sub/name.wav [temp]" names a file of temp/ ("[input]", "[output]" the other folders).
_ANNOTATED = re.compile(r"^(?P<name>.*?)\s*\[(?P<folder>input|output|temp)\]$")


def find_recording(name: str) -> Path | None:
    """The file RecordAudio's value names: a path in input/ (where Loom's editor uploads a recording), or in the
    folder a " [temp]" / " [output]" / " [input]" suffix names (ComfyUI's editor writes "audio/NAME.wav [temp]");
    None when there is none, or when the name leads out of its folder."""
    match = _ANNOTATED.match(name.strip())
    kind, relative = (match["folder"], match["name"]) if match else ("input", name)
    paths = get_paths()
    root = {"input": paths.input, "output": paths.output, "temp": paths.temp}[kind].resolve()
    path = (root / relative).resolve()
    return path if path.is_file() and path.is_relative_to(root) else None


class RecordAudio(Node):
    """Loads the recording the editor's record button made (uploaded to input/audio/), as LoadAudio loads a file.
    The value is the file's name; ComfyUI's API workflows name it "audio/NAME.wav [temp]", which is read too."""

    display_name = "Record Audio"
    category = "audio"
    # ComfyUI's AUDIO_RECORD widget: its editor records from the microphone and sends the uploaded file's name.
    audio = InputSpec(type="AUDIO_RECORD", checked_by_node=True)
    outputs = (Output("AUDIO"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """The record widget's value (the uploaded file's name) is the node's one widget value in a UI file."""
        return {"audio": values[0]} if values and isinstance(values[0], str) else None

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        path = find_recording(str(inputs.get("audio") or ""))
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        name = inputs.get("audio")
        if not isinstance(name, str) or not name.strip():
            return "no recording: press record on the node, then stop, before queueing"
        path = find_recording(name)
        if path is None:
            return f"Invalid audio file: {name!r} is not a recording in the input folder {get_paths().input}"
        return audio_file_problem(path, name)

    def execute(self, audio: str) -> tuple[dict[str, Any]]:
        path = find_recording(audio)
        if path is None:
            raise FileNotFoundError(f"Invalid audio file: {audio!r} is not a recording in {get_paths().input}")
        return (read_audio(path),)


class _SaveAudioNode(Node):
    """What the three save nodes share: the audio, the file name prefix and its check."""

    category = "audio"
    output_node = True
    audio = Socket("AUDIO")
    filename_prefix = String("audio/ComfyUI", tooltip="file name prefix; may include a sub-folder, e.g. 'audio/x'")
    outputs = (Output("AUDIO", "audio"),)  # the audio passed on, as ComfyUI's save nodes give it

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))


class SaveAudio(_SaveAudioNode):
    """Saves audio as FLAC (16-bit) in the output folder, the workflow in its Vorbis comments."""

    display_name = "Save Audio (FLAC)"

    def execute(self, audio: dict[str, Any], filename_prefix: str) -> NodeResult:
        return NodeResult(ui={"audio": save_audio(self.ctx, audio, get_paths().output, filename_prefix, "output",
                                                  "flac")}, outputs=(audio,))


class SaveAudioMP3(_SaveAudioNode):
    """Saves audio as MP3 (LAME) in the output folder, the workflow in its ID3 tags."""

    display_name = "Save Audio (MP3)"
    quality = Combo(MP3_QUALITIES, default="V0")

    def execute(self, audio: dict[str, Any], filename_prefix: str, quality: str) -> NodeResult:
        return NodeResult(ui={"audio": save_audio(self.ctx, audio, get_paths().output, filename_prefix, "output",
                                                  "mp3", quality)}, outputs=(audio,))


class SaveAudioOpus(_SaveAudioNode):
    """Saves audio as Opus in Ogg in the output folder (resampled to a rate libopus takes), the workflow in its
    Vorbis comments."""

    display_name = "Save Audio (Opus)"
    quality = Combo(OPUS_QUALITIES, default="128k")

    def execute(self, audio: dict[str, Any], filename_prefix: str, quality: str) -> NodeResult:
        return NodeResult(ui={"audio": save_audio(self.ctx, audio, get_paths().output, filename_prefix, "output",
                                                  "opus", quality)}, outputs=(audio,))


# SaveAudioAdvanced's formats and the qualities each brings (ComfyUI's dynamic combo: "format.quality").
ADVANCED_QUALITIES = {"flac": [], "mp3": MP3_QUALITIES, "opus": OPUS_QUALITIES}
_ADVANCED_DEFAULTS = {"mp3": "V0", "opus": "128k"}


class SaveAudioAdvanced(Node):
    """Saves audio as FLAC, MP3 or Opus (the format's quality with it, as ComfyUI's dynamic combo brings it), the
    workflow in the file's metadata; passes the audio on."""

    display_name = "Save Audio"
    category = "audio"
    output_node = True
    inputs = {
        "audio": Socket("AUDIO"),
        "filename_prefix": String("audio/ComfyUI", tooltip="file name prefix; may include a sub-folder"),
        "format": Combo(list(ADVANCED_QUALITIES), default="flac",
                        tooltip="flac: lossless; mp3 and opus: at the quality format.quality",
                        extra={"dynamic_inputs": {fmt: ["format.quality"] if qualities else []
                                                  for fmt, qualities in ADVANCED_QUALITIES.items()}}),
        "format.quality": Combo(["V0", "64k", "96k", "128k", "192k", "320k"], default="V0", optional=True,
                                tooltip="mp3: V0 (variable), 128k or 320k; opus: 64k to 320k"),
    }
    outputs = (Output("AUDIO", "audio"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [filename_prefix, format, the format's quality if it has one]."""
        if len(values) < 2 or values[1] not in ADVANCED_QUALITIES:
            return None
        out = {"filename_prefix": values[0], "format": values[1]}
        if ADVANCED_QUALITIES[values[1]] and len(values) > 2:
            out["format.quality"] = values[2]
        return out

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        fmt, quality = inputs.get("format"), inputs.get("format.quality")
        qualities = ADVANCED_QUALITIES.get(fmt)
        if qualities and quality is not None and quality not in qualities:  # FLAC's is ignored
            return f"format {fmt} takes the quality {', '.join(qualities)}, not {quality}"
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, audio: dict[str, Any], filename_prefix: str, format: str, **options: Any) -> NodeResult:
        quality = options.get("format.quality") or _ADVANCED_DEFAULTS.get(format, "")
        saved = save_audio(self.ctx, audio, get_paths().output, filename_prefix, "output", format,
                           quality if ADVANCED_QUALITIES[format] else "")
        return NodeResult(outputs=(audio,), ui={"audio": saved})


class PreviewAudio(Node):
    """Plays audio in the editor without keeping it (a FLAC in the temp folder)."""

    display_name = "Preview Audio"
    category = "audio"
    output_node = True
    audio = Socket("AUDIO")
    outputs = (Output("AUDIO", "audio"),)

    def execute(self, audio: dict[str, Any]) -> NodeResult:
        prefix = f"ComfyUI_temp_{uuid.uuid4().hex[:5]}"
        return NodeResult(outputs=(audio,),
                          ui={"audio": save_audio(self.ctx, audio, get_paths().temp, prefix, "temp", "flac")})


class TrimAudioDuration(Node):
    """Trim audio tensor into chosen time range."""

    display_name = "Trim Audio Duration"
    category = "audio"
    audio = Socket("AUDIO")
    start_index = Float(0.0, min=-0xFFFFFFFFFFFFFFFF, max=0xFFFFFFFFFFFFFFFF, step=0.01,
                        tooltip="Start time in seconds, can be negative to count from the end (supports sub-seconds).")
    duration = Float(60.0, min=0.0, step=0.01, tooltip="Duration in seconds")
    outputs = (Output("AUDIO"),)

    def execute(self, audio: dict[str, Any], start_index: float, duration: float) -> tuple[dict[str, Any]]:
        waveform, rate = audio["waveform"], audio["sample_rate"]
        length = waveform.shape[-1]
        start = round(start_index * rate) + (length if start_index < 0 else 0)
        start = max(0, min(start, length - 1))
        end = max(0, min(start + round(duration * rate), length))
        if start >= end:
            raise ValueError(f"TrimAudioDuration: the start ({start_index} s) must lie within the audio "
                             f"({length / rate:.3f} s) and the duration ({duration} s) must be positive")
        return (audio_value(waveform[..., start:end], rate),)


class SplitAudioChannels(Node):
    """Separates the audio into left and right channels."""

    display_name = "Split Audio Channels"
    category = "audio"
    audio = Socket("AUDIO")
    outputs = (Output("AUDIO", "left"), Output("AUDIO", "right"))

    def execute(self, audio: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        waveform, rate = audio["waveform"], audio["sample_rate"]
        if waveform.shape[1] != 2:
            raise ValueError(f"SplitAudioChannels needs stereo audio, got {waveform.shape[1]} channel(s)")
        return audio_value(waveform[:, 0:1], rate), audio_value(waveform[:, 1:2], rate)


class JoinAudioChannels(Node):
    """Joins a left and a right mono audio into stereo: at the higher of their rates, cut to the shorter."""

    display_name = "Join Audio Channels"
    category = "audio"
    audio_left = Socket("AUDIO")
    audio_right = Socket("AUDIO")
    outputs = (Output("AUDIO", "audio"),)

    def execute(self, audio_left: dict[str, Any], audio_right: dict[str, Any]) -> tuple[dict[str, Any]]:
        if audio_left["waveform"].shape[1] != 1 or audio_right["waveform"].shape[1] != 1:
            raise ValueError("JoinAudioChannels joins two mono audios; got "
                             f"{audio_left['waveform'].shape[1]} and {audio_right['waveform'].shape[1]} channels")
        left, right, rate = _same_rate(audio_left, audio_right)
        length = min(left.shape[-1], right.shape[-1])
        return (audio_value(torch.cat([left[..., :length], right[..., :length]], dim=1), rate),)


def _same_rate(audio1: dict[str, Any], audio2: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both waveforms at the higher of their two rates (ComfyUI resamples the lower one up)."""
    rate = max(audio1["sample_rate"], audio2["sample_rate"])
    return (resample(audio1["waveform"], audio1["sample_rate"], rate),
            resample(audio2["waveform"], audio2["sample_rate"], rate), rate)


class AudioConcat(Node):
    """Concatenates the audio1 to audio2 in the specified direction (mono is made stereo first)."""

    display_name = "Audio Concat"
    category = "audio"
    audio1 = Socket("AUDIO")
    audio2 = Socket("AUDIO")
    direction = Combo(["after", "before"], tooltip="Whether to append audio2 after or before audio1.")
    outputs = (Output("AUDIO"),)

    def execute(self, audio1: dict[str, Any], audio2: dict[str, Any], direction: str) -> tuple[dict[str, Any]]:
        first, second, rate = _same_rate(audio1, audio2)
        first, second = (w.repeat(1, 2, 1) if w.shape[1] == 1 else w for w in (first, second))
        parts = (first, second) if direction == "after" else (second, first)
        return (audio_value(torch.cat(parts, dim=2), rate),)


class AudioMerge(Node):
    """Combine two audio tracks by overlaying their waveforms (audio2 cut or padded to audio1's length; the result
    is scaled down when it would leave -1..1)."""

    display_name = "Audio Merge"
    category = "audio"
    audio1 = Socket("AUDIO")
    audio2 = Socket("AUDIO")
    merge_method = Combo(["add", "mean", "subtract", "multiply"],
                         tooltip="The method used to combine the audio waveforms.")
    outputs = (Output("AUDIO"),)

    def execute(self, audio1: dict[str, Any], audio2: dict[str, Any], merge_method: str) -> tuple[dict[str, Any]]:
        first, second, rate = _same_rate(audio1, audio2)
        length = first.shape[-1]
        second = torch.nn.functional.pad(second[..., :length], (0, max(0, length - second.shape[-1])))
        merged = {"add": lambda: first + second, "mean": lambda: (first + second) / 2,
                  "subtract": lambda: first - second, "multiply": lambda: first * second}[merge_method]()
        peak = merged.abs().max()
        return (audio_value(merged / peak if peak > 1.0 else merged, rate),)


class AudioAdjustVolume(Node):
    """Changes the volume by a gain in decibels."""

    display_name = "Audio Adjust Volume"
    category = "audio"
    audio = Socket("AUDIO")
    volume = Int(1, min=-100, max=100,
                 tooltip="Volume adjustment in decibels (dB). 0 = no change, +6 = double, -6 = half, etc")
    outputs = (Output("AUDIO"),)

    def execute(self, audio: dict[str, Any], volume: int) -> tuple[dict[str, Any]]:
        if volume == 0:
            return (audio,)
        return (audio_value(audio["waveform"] * 10 ** (volume / 20), audio["sample_rate"]),)


class EmptyAudio(Node):
    """Silence of a given duration, rate and channel count."""

    display_name = "Empty Audio"
    category = "audio"
    duration = Float(60.0, min=0.0, max=0xFFFFFFFFFFFFFFFF, step=0.01,
                     tooltip="Duration of the empty audio clip in seconds")
    sample_rate = Int(44100, min=1, max=768000, tooltip="Sample rate of the empty audio clip.")
    channels = Int(2, min=1, max=2, tooltip="Number of audio channels (1 for mono, 2 for stereo).")
    outputs = (Output("AUDIO"),)

    def execute(self, duration: float, sample_rate: int, channels: int) -> tuple[dict[str, Any]]:
        return (audio_value(torch.zeros((1, channels, round(duration * sample_rate))), sample_rate),)


def shelf_coefficients(kind: str, rate: int, freq: float, gain_db: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(b, a), a[0] = 1, of the cookbook's low ("low": torchaudio's bass_biquad) or high ("high": treble_biquad)
    shelf: `gain_db` beyond the shelf, half of it at `freq`. The high shelf is the low one with the sign of each
    cos(w0) term turned, which `turn` does."""
    w0 = 2 * math.pi * freq / rate
    amp = 10 ** (gain_db / 40)
    turn = 1 if kind == "high" else -1
    cos_lo, cos_hi = turn * (amp - 1) * math.cos(w0), turn * (amp + 1) * math.cos(w0)
    root = math.sqrt(amp) * math.sin(w0) / q  # 2 sqrt(A) alpha
    b = amp * np.array([(amp + 1) + cos_lo + root, -2 * turn * ((amp - 1) + cos_hi), (amp + 1) + cos_lo - root])
    a = np.array([(amp + 1) - cos_lo + root, 2 * turn * ((amp - 1) - cos_hi), (amp + 1) - cos_lo - root])
    return b / a[0], a / a[0]


def peak_coefficients(rate: int, freq: float, gain_db: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(b, a), a[0] = 1, of the cookbook's peaking EQ (torchaudio's equalizer_biquad): `gain_db` at `freq`, over a
    bandwidth set by `q`."""
    w0 = 2 * math.pi * freq / rate
    amp = 10 ** (gain_db / 40)
    alpha = math.sin(w0) / (2 * q)
    b = np.array([1 + alpha * amp, -2 * math.cos(w0), 1 - alpha * amp])
    a = np.array([1 + alpha / amp, -2 * math.cos(w0), 1 - alpha / amp])
    return b / a[0], a / a[0]


def biquad_filter(samples: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """torchaudio's biquad: the filter along the last axis from rest, the output clamped to -1..1 as its lfilter does
    by default (ComfyUI's node leaves that default)."""
    from scipy.signal import lfilter

    return np.clip(lfilter(b, a, samples, axis=-1), -1.0, 1.0)


# AudioEqualizer3Band's shelves take torchaudio's default Q, as ComfyUI passes it.
SHELF_Q = 0.707


class AudioEqualizer3Band(Node):
    """A bass shelf, a mid peak and a treble shelf, applied in that order (a band at 0 dB is skipped), each band's
    output clamped to -1..1 as torchaudio's filters clamp it."""

    display_name = "Audio Equalizer (3-Band)"
    category = "audio"
    audio = Socket("AUDIO")
    low_gain_dB = Float(0.0, min=-24.0, max=24.0, step=0.1, tooltip="Gain for Low frequencies (Bass)")
    low_freq = Int(100, min=20, max=500, tooltip="Cutoff frequency for Low shelf")
    mid_gain_dB = Float(0.0, min=-24.0, max=24.0, step=0.1, tooltip="Gain for Mid frequencies")
    mid_freq = Int(1000, min=200, max=4000, tooltip="Center frequency for Mids")
    mid_q = Float(0.707, min=0.1, max=10.0, step=0.1, tooltip="Q factor (bandwidth) for Mids")
    high_gain_dB = Float(0.0, min=-24.0, max=24.0, step=0.1, tooltip="Gain for High frequencies (Treble)")
    high_freq = Int(5000, min=1000, max=15000, tooltip="Cutoff frequency for High shelf")
    outputs = (Output("AUDIO"),)

    def execute(self, audio: dict[str, Any], low_gain_dB: float, low_freq: int, mid_gain_dB: float, mid_freq: int,
                mid_q: float, high_gain_dB: float, high_freq: int) -> tuple[dict[str, Any]]:
        waveform, rate = audio["waveform"], int(audio["sample_rate"])
        bands = [(low_gain_dB, low_freq, shelf_coefficients("low", rate, low_freq, low_gain_dB, SHELF_Q)),
                 (mid_gain_dB, mid_freq, peak_coefficients(rate, mid_freq, mid_gain_dB, mid_q)),
                 (high_gain_dB, high_freq, shelf_coefficients("high", rate, high_freq, high_gain_dB, SHELF_Q))]
        samples = waveform.detach().cpu().double().numpy()
        for gain, freq, (b, a) in bands:
            if gain == 0:
                continue
            if freq >= rate / 2:  # the cookbook's design folds back there: it would not be the filter asked for
                raise ValueError(f"AudioEqualizer3Band: {freq} Hz is not below half the sample rate ({rate} Hz)")
            samples = biquad_filter(samples, b, a)
        return (audio_value(torch.from_numpy(samples).to(waveform.device, waveform.dtype), rate),)


class AudioDuration(Node):
    """Returns the length of the audio in seconds and its sample rate (0 and 0 for no audio, such as a silent
    video's)."""

    display_name = "Audio Duration"
    category = "audio"
    audio = Socket("AUDIO")
    outputs = (Output("FLOAT", "duration", tooltip="Length of the audio in seconds."),
               Output("INT", "sample_rate", tooltip="Sample rate of the audio in Hz."))

    def execute(self, audio: dict[str, Any] | None) -> tuple[float, int]:
        if audio is None:
            return 0.0, 0
        if not isinstance(audio, dict) or not {"waveform", "sample_rate"} <= audio.keys():
            raise ValueError("AudioDuration: AUDIO must be {'waveform': [batch, channels, samples], 'sample_rate': "
                             f"int}}; got {type(audio).__name__}")
        rate = audio["sample_rate"]
        return (audio["waveform"].shape[-1] / float(rate) if rate > 0 else 0.0), rate


NODES = [LoadAudio, RecordAudio, SaveAudio, SaveAudioMP3, SaveAudioOpus, SaveAudioAdvanced, PreviewAudio,
         TrimAudioDuration, SplitAudioChannels, JoinAudioChannels, AudioConcat, AudioMerge, AudioAdjustVolume,
         EmptyAudio, AudioEqualizer3Band, AudioDuration]
