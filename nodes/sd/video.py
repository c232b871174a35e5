"""Video nodes with PyAV: SaveWEBM, and ComfyUI's VIDEO nodes (CreateVideo, SaveVideo, LoadVideo,
GetVideoComponents); the workflow goes into the container's metadata, as ComfyUI puts it."""

from __future__ import annotations

import json
import logging
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
from nodes.spec import Combo, Float, Output, Socket, String

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


NODES = [SaveWEBM, CreateVideo, SaveVideo, LoadVideo, GetVideoComponents]
