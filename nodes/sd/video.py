"""Video nodes with PyAV: SaveWEBM, and ComfyUI's VIDEO nodes (CreateVideo, SaveVideo, LoadVideo,
GetVideoComponents, and the editing ones: Video Slice, VideoTrim, VideoCrop, ConcatenateVideo); the workflow goes into
the container's metadata, as ComfyUI puts it."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodes.folders import get_paths, input_file, input_files, input_where, new_output_file, output_prefix_problem
from nodes.node import Node, NodeResult
from nodes.spec import Boolean, Combo, Float, InputSpec, Output, Socket, String

log = logging.getLogger("loom.video")

VIDEO_SUFFIXES = {".webm", ".mp4", ".mkv", ".mov", ".avi", ".m4v", ".gif"}
# SaveWEBM's codecs, by the encoder ComfyUI names (both are in PyAV's wheels).
WEBM_ENCODERS = {"vp9": "libvpx-vp9", "av1": "libsvtav1"}


@dataclass(frozen=True)
class Video:
    """VIDEO: frames [T, H, W, 3] in 0..1, the frame rate, and the AUDIO ({"waveform": [1, C, S],
    "sample_rate": int}) or None."""

    images: torch.Tensor
    fps: Fraction
    audio: dict | None = None


def _encoder(name: str) -> Any:
    """PyAV's encoder `name`, or a clear error when this PyAV build lacks it."""
    import av

    try:
        return av.codec.Codec(name, "w")
    except Exception as exc:  # PyAV raises UnknownCodecError (a ValueError) or its own FFmpeg errors
        raise ValueError(f"the video encoder {name} is not in this PyAV build ({av.__version__}): {exc}") from exc


def _check_frames(images: torch.Tensor, what: str) -> None:
    if images.ndim != 4 or len(images) == 0 or images.shape[-1] not in (3, 4):
        raise ValueError(f"{what} needs a batch of at least one RGB image [frames, height, width, 3], got shape "
                         f"{tuple(images.shape)}")


def _metadata(extra: dict) -> dict[str, str]:
    """The workflow as ComfyUI stores it in a video: each extra_pnginfo entry and the prompt, as JSON text."""
    tags = {key: json.dumps(value) for key, value in (extra.get("extra_pnginfo") or {}).items()}
    if extra.get("prompt") is not None:
        tags["prompt"] = json.dumps(extra["prompt"])
    return tags


@contextmanager
def _same_scheduling() -> Iterator[None]:
    """Give the calling thread back its CPU scheduling policy after an encode.

    SVT-AV1 (libsvtav1, SaveWEBM's av1 encoder), when the process runs as root (as in many containers), switches
    the thread that opens it to real-time SCHED_FIFO at priority 99 and leaves it so. That thread (the server's
    worker thread, the main thread of a CLI run or of the tests) would then run every later prompt ahead of all
    normal threads on its core, the event loop's and other programs' included, and each process it starts after
    (a Ray cluster and its workers, a worker process) would inherit the policy. The encoder's own threads, made
    while it is open, end with it.
    """
    if not hasattr(os, "sched_getscheduler"):  # not Linux: no such switch
        yield
        return
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if (os.sched_getscheduler(0), os.sched_getparam(0)) != (policy, param):
            try:
                os.sched_setscheduler(0, policy, param)
            except OSError as exc:
                log.warning("could not give this thread back its scheduling policy after encoding: %s", exc)


def _encode(handle: Any, container_format: str, encoder: str, pix_fmt: str, options: dict[str, str],
            video: Video, tags: dict[str, str]) -> None:
    """Encode the frames (and audio, as AAC) into an open file; the frames are cut to 8 bits as ComfyUI does."""
    import av

    container_options = {"movflags": "use_metadata_tags"} if container_format == "mp4" else {}
    with _same_scheduling(), av.open(handle, mode="w", format=container_format, options=container_options) as container:
        container.metadata.update(tags)
        stream = container.add_stream(encoder, rate=Fraction(round(video.fps * 1000), 1000))
        stream.width, stream.height = video.images.shape[2], video.images.shape[1]
        stream.pix_fmt = pix_fmt
        stream.bit_rate = 0
        stream.options = options
        audio_stream = None
        if video.audio is not None:
            audio_stream = container.add_stream("aac", rate=int(video.audio["sample_rate"]))
        frames = (video.images[..., :3].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
        if audio_stream is not None:
            waveform = video.audio["waveform"][0].float().cpu().numpy()  # [C, S]
            layout = "mono" if waveform.shape[0] == 1 else "stereo"
            samples = av.AudioFrame.from_ndarray(np.ascontiguousarray(waveform[:2]), format="fltp", layout=layout)
            samples.sample_rate = audio_stream.rate
            container.mux(audio_stream.encode(samples))
            container.mux(audio_stream.encode())


def _save(prefix: str, suffix: str, **encode: Any) -> dict[str, str]:
    with new_output_file(get_paths().output, prefix, suffix) as (path, handle, subfolder):
        _encode(handle, **encode)
    return {"filename": path.name, "subfolder": subfolder, "type": "output"}


def read_video(path: Path) -> Video:
    """Decode every frame (and the first audio stream) of a video file; a file that is not one is refused."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path.name} holds no video stream")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate or Fraction(24)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            audio = None
            if container.streams.audio:
                container.seek(0)
                audio_stream = container.streams.audio[0]
                resampler = av.AudioResampler(format="fltp")
                chunks = [out.to_ndarray() for frame in container.decode(audio_stream)
                          for out in resampler.resample(frame)]
                if chunks:
                    waveform = torch.from_numpy(np.concatenate(chunks, axis=1))[None]
                    audio = {"waveform": waveform, "sample_rate": audio_stream.rate}
    except av.FFmpegError as exc:
        raise ValueError(f"{path.name} is not a readable video: {exc}") from exc
    if not frames:
        raise ValueError(f"{path.name} holds no video frames")
    images = torch.from_numpy(np.stack(frames)).float() / 255.0
    return Video(images, Fraction(fps), audio)


class SaveWEBM(Node):
    """Saves the batch as a WebM video (VP9 or AV1) in the output folder, the workflow in its metadata."""

    category = "image/video"
    output_node = True
    images = Socket("IMAGE")
    filename_prefix = String("ComfyUI")
    codec = Combo(list(WEBM_ENCODERS))
    fps = Float(24.0, min=0.01, max=1000.0, step=0.01)
    crf = Float(32.0, min=0.0, max=63.0, step=1.0, tooltip="Higher crf means lower quality with a smaller file "
                "size, lower crf means higher quality higher filesize.")
    outputs = ()

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, images: torch.Tensor, filename_prefix: str, codec: str, fps: float, crf: float) -> NodeResult:
        _check_frames(images, "SaveWEBM")
        encoder = _encoder(WEBM_ENCODERS[codec]).name
        options = {"crf": str(crf)}
        if codec == "av1":
            options["preset"] = "6"
        saved = _save(filename_prefix, ".webm", container_format="webm", encoder=encoder,
                      pix_fmt="yuv420p10le" if codec == "av1" else "yuv420p", options=options,
                      video=Video(images, Fraction(fps)), tags=_metadata(self.ctx.extra))
        return NodeResult(ui={"images": [saved], "animated": [True]})


class CreateVideo(Node):
    """Create a video from images."""

    display_name = "Create Video"
    category = "image/video"
    images = Socket("IMAGE", tooltip="The images to create a video from.")
    fps = Float(30.0, min=1.0, max=120.0, step=1.0)
    audio = Socket("AUDIO", optional=True, tooltip="The audio to add to the video.")
    outputs = (Output("VIDEO"),)

    def execute(self, images: torch.Tensor, fps: float, audio: dict | None = None) -> tuple[Video]:
        _check_frames(images, "CreateVideo")
        return (Video(images, Fraction(fps), audio),)


class SaveVideo(Node):
    """Saves the input images to your ComfyUI output directory."""

    display_name = "Save Video"
    category = "image/video"
    output_node = True
    video = Socket("VIDEO", tooltip="The video to save.")
    filename_prefix = String("video/ComfyUI", tooltip="The prefix for the file to save.")
    format = Combo(["auto", "mp4"], default="auto", tooltip="The format to save the video as.")
    codec = Combo(["auto", "h264"], default="auto", tooltip="The codec to use for the video.")
    outputs = ()

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return output_prefix_problem(inputs.get("filename_prefix"))

    def execute(self, video: Video, filename_prefix: str, format: str, codec: str) -> NodeResult:
        height, width = video.images.shape[1:3]
        if width % 2 or height % 2:  # H.264 in 4:2:0 halves both chroma dimensions
            raise ValueError(f"SaveVideo: H.264 needs an even width and height, the video is {width}x{height}; "
                             "crop or scale it to even dimensions first")
        encoder = _encoder("libx264").name
        saved = _save(filename_prefix, ".mp4", container_format="mp4", encoder=encoder, pix_fmt="yuv420p",
                      options={}, video=video, tags=_metadata(self.ctx.extra))
        return NodeResult(ui={"images": [saved], "animated": [True]})


def list_input_videos() -> list[str]:
    return input_files(VIDEO_SUFFIXES)


class LoadVideo(Node):
    """Loads a video from the input folder: its frames, frame rate and audio."""

    display_name = "Load Video"
    category = "image/video"
    file = Combo(list_input_videos, extra={"video_upload": True}, choices_where=input_where)
    outputs = (Output("VIDEO"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        path = input_file(str(inputs.get("file", "")))
        return (path.stat().st_mtime_ns, path.stat().st_size) if path else None  # no hashing of large files

    def execute(self, file: str) -> tuple[Video]:
        path = input_file(file)
        if path is None:
            raise ValueError(f"Invalid video file: {file} is not in the input folder")
        return (read_video(path),)


class GetVideoComponents(Node):
    """Extracts all components from a video: frames, audio, and framerate."""

    display_name = "Get Video Components"
    category = "image/video"
    video = Socket("VIDEO", tooltip="The video to extract components from.")
    outputs = (Output("IMAGE", "images"), Output("AUDIO", "audio"), Output("FLOAT", "fps"))

    def execute(self, video: Video) -> tuple[torch.Tensor, dict | None, float]:
        return video.images, video.audio, float(video.fps)


# --- Editing: ComfyUI's newer nodes_video.py (Video Slice, VideoTrim, VideoCrop, ConcatenateVideo) ------------
#
# ComfyUI trims a VIDEO by encoding it (H.264 in MP4 at the frame rate rounded to 1/1000) and decoding the frames
# whose timestamps fall in the window, in the MP4 track's ticks; Loom keeps the frames and picks the same ones by
# the same tick arithmetic, without the lossy round trip. Crops are ComfyUI's even-aligned rectangles.

# The VIDEO_EDIT widget's values when untouched (ComfyUI's VideoEdit.Input defaults, by feature).
TRIM_DEFAULT = {"trim": {"start_time": 0.0, "duration": 0.0}}
CROP_DEFAULT = {"crop": {"x": 0, "y": 0, "width": 0, "height": 0}}
TRIM_FIELDS, CROP_FIELDS = tuple(TRIM_DEFAULT["trim"]), tuple(CROP_DEFAULT["crop"])
VIDEO_CODECS = ["auto", "h264", "av1"]
CONCAT_SLOTS = 100  # ConcatenateVideo's autogrow takes videos.video0 .. videos.video99, at least the first


def encoded_rate(fps: Fraction) -> Fraction:
    """The frame rate ComfyUI encodes a VIDEO at: rounded to 1/1000."""
    return Fraction(round(fps * 1000), 1000)


def track_timescale(rate: Fraction) -> int:
    """The ticks per second of the MP4 track FFmpeg writes at `rate`: its time base's denominator (the rate's
    numerator), doubled until it reaches 10000 (movenc's rule)."""
    ticks = rate.numerator
    while ticks < 10000:
        ticks *= 2
    return ticks


def trim_video(video: Video, start_time: float, duration: float, strict_duration: bool, node: str) -> Video:
    """The frames (and audio) from `start_time` (negative: counted back from the end) for `duration` seconds (0:
    to the end), as ComfyUI's trim of an encoded video gives them: frame i is kept when its tick i * T / rate lies
    at or after int(start / time base) and before int((start + duration) / time base), T = 1 / time base the
    track's timescale. With
    `strict_duration`, a window running past the end is refused."""
    rate = encoded_rate(video.fps)
    frames = len(video.images)
    length = frames / rate  # the encoded file's duration
    start = max(float(length) + start_time, 0.0) if start_time < 0 else start_time
    available = min(float(length), -start_time) if start_time < 0 else float(length) - start_time
    if strict_duration and duration and min(duration, available) < duration:
        raise ValueError(f"{node}: the video lasts {float(length):.3f} s; {duration} s from {start_time} s runs past "
                         "its end (turn strict_duration off to keep what there is)")
    ticks = track_timescale(rate)
    tick = float(Fraction(1, ticks))  # ComfyUI divides the float seconds by the time base, as floats
    first_tick, end_tick = int(start / tick), int((start + duration) / tick)
    keep = [i for i in range(frames)
            if i * ticks / rate >= first_tick and (not duration or i * ticks / rate < end_tick)]
    if not keep:
        raise ValueError(f"{node}: no frame of the video ({frames} frames, {float(length):.3f} s) lies in the window "
                         f"from {start_time} s for {duration or 'all remaining'} s")
    audio = None
    if video.audio is not None:
        rate_hz = int(video.audio["sample_rate"])
        # The encode keeps the audio that the frames span, then the decode skips to the start and cuts the duration.
        waveform = video.audio["waveform"][..., :math.ceil(rate_hz / rate * frames)][..., int(start * rate_hz):]
        if duration:
            waveform = waveform[..., :int(duration * rate_hz)]
        audio = {"waveform": waveform, "sample_rate": rate_hz}
    return Video(video.images[keep[0]:keep[-1] + 1], video.fps, audio)


def crop_rect(x: int, y: int, width: int, height: int, source_width: int,
              source_height: int) -> tuple[int, int, int, int] | None:
    """ComfyUI's normalize_crop_rect: the corner clamped into the frame and moved to even coordinates, the size
    clamped to the frame and made even; None (no crop) for an empty size or the whole frame."""
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        return None
    x = max(0, min(int(x), source_width - 1))
    y = max(0, min(int(y), source_height - 1))
    x, y = x - x % 2, y - y % 2
    width, height = min(width, source_width - x), min(height, source_height - y)
    if (x, y, width, height) == (0, 0, source_width, source_height):
        return None
    width, height = width - width % 2, height - height % 2
    if width <= 0 or height <= 0:
        return None
    return x, y, width, height


def crop_video(video: Video, x: int, y: int, width: int, height: int) -> Video:
    rect = crop_rect(x, y, width, height, video.images.shape[2], video.images.shape[1])
    if rect is None:
        return video
    x, y, width, height = rect
    return Video(video.images[:, y:y + height, x:x + width].clone(), video.fps, video.audio)


def _as_edit(edit: Any) -> Any:
    """A VIDEO_EDIT value as a dict: Loom's editor holds it as JSON text (ComfyUI's draws a video editor)."""
    if isinstance(edit, str):
        try:
            return json.loads(edit) if edit.strip() else None
        except json.JSONDecodeError:
            return edit
    return edit


def _edit_problem(edit: Any, feature: str, fields: tuple[str, ...]) -> str | None:
    """Why a VIDEO_EDIT value cannot be used for `feature` ("trim" or "crop"), or None."""
    edit = _as_edit(edit)
    example = json.dumps(TRIM_DEFAULT if feature == "trim" else CROP_DEFAULT)
    section = (edit or {}).get(feature) or {} if isinstance(edit, dict | None) else None  # empty: no edit
    if not isinstance(section, dict):
        return f"{feature} must be a video edit value such as {example}, got {edit!r}"
    bad = [name for name in fields if name in section
           and (isinstance(section[name], bool) or not isinstance(section[name], int | float))]
    return f"{feature}: {', '.join(bad)} must be numbers, got {section!r}" if bad else None


def _edit_section(edit: Any, feature: str, fields: tuple[str, ...], node: str) -> dict:
    """The `feature` part of a VIDEO_EDIT value ({} when absent: no edit)."""
    problem = _edit_problem(edit, feature, fields)
    if problem:
        raise ValueError(f"{node}: {problem}")
    return (_as_edit(edit) or {}).get(feature) or {}


def _preview(video: Video) -> dict[str, Any] | None:
    """ComfyUI's preview of an edited video: an H.264 MP4 in the temp folder (none for odd sizes, which H.264 in
    4:2:0 cannot hold)."""
    height, width = video.images.shape[1:3]
    if width % 2 or height % 2:
        return None
    with new_output_file(get_paths().temp, "ComfyUI_temp_video", ".mp4") as (path, handle, subfolder):
        _encode(handle, container_format="mp4", encoder=_encoder("libx264").name, pix_fmt="yuv420p",
                options={"preset": "ultrafast"}, video=video, tags={})
    return {"images": [{"filename": path.name, "subfolder": subfolder, "type": "temp"}], "animated": [True]}


class VideoSlice(Node):
    """Keeps the part of a video from `start_time` for `duration` seconds (0: to the end); a negative start counts
    back from the end."""

    name = "Video Slice"
    display_name = "Trim Video"
    category = "video"
    video = Socket("VIDEO")
    start_time = Float(0.0, min=-1e5, max=1e5, step=0.001, tooltip="Start time in seconds")
    duration = Float(0.0, min=0.0, step=0.001, tooltip="Duration in seconds, or 0 for unlimited duration")
    strict_duration = Boolean(False, tooltip="If True, when the specified duration is not possible, an error will "
                              "be raised.")
    outputs = (Output("VIDEO"),)

    def execute(self, video: Video, start_time: float, duration: float, strict_duration: bool) -> tuple[Video]:
        return (trim_video(video, start_time, duration, strict_duration, "Video Slice"),)


class VideoTrim(Node):
    """Trims a video to the window its video edit widget holds ({"trim": {"start_time", "duration"}}, seconds;
    duration 0 keeps the video to its end) and previews the result."""

    display_name = "Trim Video (Advanced)"
    category = "video"
    output_node = True
    video = Socket("VIDEO")
    trim = InputSpec(type="VIDEO_EDIT", default=TRIM_DEFAULT, checked_by_node=True,
                     tooltip="Trim window in seconds. Duration 0 keeps the video until the end.",
                     extra={"socketless": True, "features": ["trim"]})
    strict_duration = Boolean(False, tooltip="If True, when the specified duration is not possible, an error will "
                              "be raised.", extra={"advanced": True})
    outputs = (Output("VIDEO"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [the video edit value, strict_duration]; Loom's, the value as JSON text."""
        if values and isinstance(values[0], dict | str):
            return {"trim": values[0], **({"strict_duration": values[1]} if len(values) > 1 else {})}
        return None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return _edit_problem(inputs.get("trim"), "trim", TRIM_FIELDS)

    def execute(self, video: Video, trim: dict, strict_duration: bool) -> NodeResult:
        window = _edit_section(trim, "trim", TRIM_FIELDS, "VideoTrim")
        start_time, duration = float(window.get("start_time", 0.0)), float(window.get("duration", 0.0))
        if duration < 0:
            raise ValueError(f"VideoTrim: the trim duration must be >= 0, got {duration}")
        trimmed = video if start_time == 0.0 and duration == 0.0 else trim_video(
            video, start_time, duration, strict_duration, "VideoTrim")
        return NodeResult(outputs=(trimmed,), ui=_preview(trimmed))


class VideoCrop(Node):
    """Crops every frame to the rectangle its video edit widget holds ({"crop": {"x", "y", "width", "height"}},
    pixels; moved and shrunk to even numbers, a zero width or height keeps the whole frame) and previews it."""

    display_name = "Crop Video"
    category = "video"
    output_node = True
    video = Socket("VIDEO")
    crop = InputSpec(type="VIDEO_EDIT", default=CROP_DEFAULT, checked_by_node=True,
                     tooltip="Crop region in pixels. Zero width/height keeps the full frame.",
                     extra={"socketless": True, "features": ["crop"]})
    outputs = (Output("VIDEO"),)

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """ComfyUI's editor stores [the video edit value]; Loom's, the value as JSON text."""
        return {"crop": values[0]} if values and isinstance(values[0], dict | str) else None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        return _edit_problem(inputs.get("crop"), "crop", CROP_FIELDS)

    def execute(self, video: Video, crop: dict) -> NodeResult:
        rect = _edit_section(crop, "crop", CROP_FIELDS, "VideoCrop")
        cropped = crop_video(video, *(int(rect.get(key, 0)) for key in CROP_FIELDS))
        return NodeResult(outputs=(cropped,), ui=_preview(cropped))


def _concat_slot(name: str) -> int:
    return int(name.removeprefix("videos.video"))


def concatenate_videos(videos: list[Video], complete_audio: dict | None = None) -> Video:
    """The videos one after another (one frame rate and frame size); the audio is `complete_audio` when given,
    else each video's audio (as much as its frames span) joined, cut to the frames' length."""
    rate = videos[0].fps
    if any(video.fps != rate for video in videos[1:]):
        raise ValueError("ConcatenateVideo: the videos have different frame rates ("
                         + ", ".join(f"{float(video.fps):g}" for video in videos) + " fps); give them one rate")
    sizes = [tuple(video.images.shape[1:]) for video in videos]
    if len(set(sizes)) > 1:
        raise ValueError("ConcatenateVideo: the videos have different frame sizes (height, width, channels): "
                         + ", ".join(map(str, sizes)) + "; scale or crop them to one size first")
    images = torch.cat([video.images for video in videos])
    seconds = len(images) / rate
    if complete_audio is not None:
        rate_hz = int(complete_audio["sample_rate"])
        waveform = complete_audio["waveform"][..., :round(seconds * rate_hz)]
        return Video(images, rate, {"waveform": waveform, "sample_rate": rate_hz})
    audios = [video.audio for video in videos]
    if all(audio is None for audio in audios):
        return Video(images, rate, None)
    if any(audio is None for audio in audios):
        raise ValueError("ConcatenateVideo: some videos have audio and some do not; give each one audio (e.g. "
                         "EmptyAudio) or pass complete_audio")
    rate_hz, channels = int(audios[0]["sample_rate"]), audios[0]["waveform"].shape[1]
    if any(int(a["sample_rate"]) != rate_hz or a["waveform"].shape[1] != channels for a in audios[1:]):
        raise ValueError("ConcatenateVideo: the videos' audio differ in sample rate or channels ("
                         + ", ".join(f"{a['sample_rate']} Hz x {a['waveform'].shape[1]}" for a in audios) + ")")
    # Each video is encoded first in ComfyUI, which keeps the audio its frames span.
    parts = [a["waveform"][..., :math.ceil(rate_hz / encoded_rate(v.fps) * len(v.images))]
             for v, a in zip(videos, audios, strict=True)]
    waveform = torch.cat(parts, dim=-1)[..., :round(seconds * rate_hz)]
    return Video(images, rate, {"waveform": waveform, "sample_rate": rate_hz})


class ConcatenateVideo(Node):
    """Concatenates videos in order (the sockets video0, video1, ...; a list into one socket adds each of its videos
    in turn). The codec is the one ComfyUI would encode with; Loom keeps the frames and encodes when saving."""

    display_name = "Concatenate Video"
    category = "video"
    input_is_list = True
    # The editor shows the optional sockets one at a time, as BatchImagesNode's (nodes/sd/utility_nodes.py).
    inputs = {
        **{f"videos.video{slot}": Socket("VIDEO", optional=slot >= 1, tooltip="A video segment to append.",
                                         extra={"autogrow": True} if slot >= 1 else {})
           for slot in range(CONCAT_SLOTS)},
        "codec": Combo(VIDEO_CODECS, default="auto", extra={"advanced": True},
                       tooltip="Codec used to encode videos tensors. Auto uses H.264; already encoded videos remain "
                       "unchanged."),
        "complete_audio": Socket("AUDIO", optional=True, extra={"advanced": True},
                                 tooltip="Optional complete soundtrack for the concatenated video. Overrides audio "
                                 "carried by the input videos."),
    }
    outputs = (Output("VIDEO", tooltip="The concatenated video."),)

    def execute(self, codec: list[str], complete_audio: list[dict] | None = None,
                **videos: list[Video]) -> tuple[Video]:
        ordered = [video for name in sorted(videos, key=_concat_slot) for video in videos[name]]
        if not ordered:
            raise ValueError("ConcatenateVideo: no video to concatenate; link at least videos.video0")
        return (concatenate_videos(ordered, complete_audio[0] if complete_audio else None),)


NODES = [SaveWEBM, CreateVideo, SaveVideo, LoadVideo, GetVideoComponents, VideoSlice, VideoTrim, VideoCrop,
         ConcatenateVideo]
