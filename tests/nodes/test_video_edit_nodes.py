"""Video editing nodes (Video Slice, VideoTrim, VideoCrop, ConcatenateVideo in nodes/sd/video.py): the frames a trim
keeps checked against the timestamps of a real H.264 MP4 encoded as ComfyUI encodes a VIDEO, the audio cut by hand,
the crop rectangles of ComfyUI's normalize_crop_rect, concatenation with and without audio, workflows through the
executor with the video edit widget's values, the declarations and bad input."""

import io
import math
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from executor.executor import Executor, WorkflowInvalid
from executor.services import Services
from graph.document import parse_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.video import (
    ConcatenateVideo,
    Video,
    VideoCrop,
    VideoSlice,
    VideoTrim,
    concatenate_videos,
    crop_rect,
    trim_video,
)


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def numbered(frames: int, h: int = 4, w: int = 6) -> torch.Tensor:
    """Frame i is filled with i / 100, so the frames a node keeps can be read back from their values."""
    return torch.arange(frames, dtype=torch.float32).div(100).view(frames, 1, 1, 1).expand(frames, h, w, 3).clone()


def kept(video: Video) -> list[int]:
    return [round(float(frame[0, 0, 0]) * 100) for frame in video.images]


def comfy_window(fps: float, frames: int, start: float, duration: float) -> list[int]:
    """The frames ComfyUI's trim keeps, found the way it finds them: encode the frames as its save_to does (H.264
    in MP4 at the rate rounded to 1/1000), decode, keep pts >= int(start / time_base) and, with a duration,
    pts < int((start + duration) / time_base)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"movflags": "use_metadata_tags"}) as out:
        stream = out.add_stream("h264", rate=Fraction(round(fps * 1000), 1000))
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer) as container:
        video = container.streams.video[0]
        if start < 0:
            start = max(container.duration / av.time_base + start, 0.0)
        start_pts = int(start / video.time_base)
        end_pts = int((start + duration) / video.time_base)
        pts = sorted(frame.pts for frame in container.decode(video))
    return [i for i, p in enumerate(pts) if p >= start_pts and (not duration or p < end_pts)]


# --- Trimming -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fps", "frames", "start", "duration"), [
    (10.0, 12, 0.1, 0.3),       # starts exactly on a frame, given as an inexact float
    (24.0, 30, 0.5, 0.25),
    (29.97, 20, 0.2, 0.2),      # a rate ComfyUI rounds to 29.97 = 2997/100
    (12.5, 15, 0.0, 0.0),       # the whole video
    (30.0, 30, 0.55, 0.0),      # to the end
    (25.0, 25, -0.3, 0.1),      # counted back from the end
])
def test_slice_keeps_the_frames_comfyui_decodes_from_its_encoded_file(fps, frames, start, duration):
    video = Video(numbered(frames), Fraction(fps))
    (out,) = VideoSlice().execute(video=video, start_time=start, duration=duration, strict_duration=False)
    assert kept(out) == comfy_window(fps, frames, start, duration)
    assert out.fps == video.fps


def test_slice_by_hand():
    video = Video(numbered(10), Fraction(10))  # 1 s; frame i at i / 10 s
    assert kept(trim_video(video, 0.1, 0.3, False, "t")) == [1, 2, 3]
    assert kept(trim_video(video, -0.25, 0.0, False, "t")) == [8, 9]  # from 0.75 s
    assert kept(trim_video(video, 0.5, 2.0, False, "t")) == [5, 6, 7, 8, 9]  # past the end: what there is
    with pytest.raises(ValueError, match="runs past its end"):
        trim_video(video, 0.5, 2.0, True, "Video Slice")
    assert kept(trim_video(video, 0.5, 0.5, True, "t")) == [5, 6, 7, 8, 9]  # exactly to the end is possible
    with pytest.raises(ValueError, match="Video Slice: no frame"):
        VideoSlice().execute(video=video, start_time=1.5, duration=0.0, strict_duration=False)


def test_trim_cuts_the_audio_to_the_window():
    waveform = torch.arange(1200, dtype=torch.float32).view(1, 1, -1).repeat(1, 2, 1)
    video = Video(numbered(10), Fraction(10), {"waveform": waveform, "sample_rate": 1000})
    out = trim_video(video, 0.25, 0.5, False, "t")
    assert kept(out) == [3, 4, 5, 6, 7]
    torch.testing.assert_close(out.audio["waveform"], waveform[..., 250:750])
    assert out.audio["sample_rate"] == 1000
    # To the end: the audio the frames span (1 s of the 1.2 s), from the start on.
    rest = trim_video(video, 0.25, 0.0, False, "t")
    torch.testing.assert_close(rest.audio["waveform"], waveform[..., 250:1000])


# --- Cropping -------------------------------------------------------------------------------------------------


def test_crop_rect_is_even_aligned_and_clamped():
    assert crop_rect(3, 5, 10, 7, 64, 48) == (2, 4, 10, 6)  # odd corner down, odd size down
    assert crop_rect(60, 40, 100, 100, 64, 48) == (60, 40, 4, 8)  # clamped to the frame
    assert crop_rect(70, 50, 8, 8, 64, 48) == (62, 46, 2, 2)  # a corner outside is pulled in
    assert crop_rect(0, 0, 64, 48, 64, 48) is None  # the whole frame: no crop
    assert crop_rect(0, 0, 0, 10, 64, 48) is None  # zero width: no crop
    assert crop_rect(0, 0, 1, 10, 64, 48) is None  # shrinks to nothing


def test_crop_node_crops_every_frame_and_keeps_rate_and_audio(folders):
    audio = {"waveform": torch.zeros(1, 1, 3000), "sample_rate": 8000}
    images = torch.rand(3, 10, 12, 3)
    video = Video(images, Fraction(8), audio)
    result = VideoCrop().execute(video=video, crop={"crop": {"x": 3, "y": 1, "width": 5, "height": 9}})
    (out,) = result.outputs
    torch.testing.assert_close(out.images, images[:, 0:8, 2:6])
    assert out.fps == 8 and out.audio is audio
    (preview,) = result.ui["images"]
    assert preview["type"] == "temp" and (folders.temp / preview["subfolder"] / preview["filename"]).is_file()
    with av.open(str(folders.temp / preview["subfolder"] / preview["filename"])) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (4, 8)
    same = VideoCrop().execute(video=video, crop={"crop": {"x": 0, "y": 0, "width": 0, "height": 0}}).outputs[0]
    assert same is video


# --- Concatenation --------------------------------------------------------------------------------------------


def test_concatenate_joins_frames_and_each_videos_audio():
    first = Video(numbered(4), Fraction(8), {"waveform": torch.ones(1, 2, 600), "sample_rate": 1000})
    second = Video(numbered(2) + 0.5, Fraction(8), {"waveform": torch.full((1, 2, 250), 2.0), "sample_rate": 1000})
    out = concatenate_videos([first, second])
    assert kept(out) == [0, 1, 2, 3, 50, 51]
    # Each video keeps the audio its frames span (4 / 8 s = 500 samples, then 2 / 8 s = 250), cut to 6 / 8 s.
    wave = out.audio["waveform"]
    assert wave.shape == (1, 2, 750)
    assert (wave[..., :500] == 1).all() and (wave[..., 500:] == 2).all()
    soundtrack = {"waveform": torch.rand(1, 1, 5000), "sample_rate": 2000}
    scored = concatenate_videos([first, second], soundtrack)
    torch.testing.assert_close(scored.audio["waveform"], soundtrack["waveform"][..., :1500])
    assert concatenate_videos([Video(numbered(2), Fraction(8))] * 2).audio is None


def test_concatenate_refuses_mismatched_videos():
    a = Video(numbered(2), Fraction(8))
    with pytest.raises(ValueError, match="ConcatenateVideo: the videos have different frame rates"):
        concatenate_videos([a, Video(numbered(2), Fraction(10))])
    with pytest.raises(ValueError, match="ConcatenateVideo: the videos have different frame sizes"):
        concatenate_videos([a, Video(numbered(2, h=6), Fraction(8))])
    with_audio = Video(numbered(2), Fraction(8), {"waveform": torch.zeros(1, 1, 10), "sample_rate": 40})
    with pytest.raises(ValueError, match="some videos have audio and some do not"):
        concatenate_videos([a, with_audio])


def test_concatenate_node_takes_its_sockets_in_slot_order_and_lists_in_turn():
    v = [Video(numbered(1) + k, Fraction(8)) for k in range(4)]
    (out,) = ConcatenateVideo().execute(codec=["auto"], **{"videos.video10": [v[3]], "videos.video2": [v[1], v[2]],
                                                           "videos.video0": [v[0]]})
    assert kept(out) == [0, 100, 200, 300]


# --- Workflows ------------------------------------------------------------------------------------------------


def engine(folders):
    return Executor(builtin_registry(), services=Services.create(folders, force_cpu=True))


def test_trim_crop_concatenate_workflow(folders):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 12, "batch_size": 10, "color": 0xFF0000}},
        "2": {"class_type": "EmptyAudio", "inputs": {"duration": 2.0, "sample_rate": 8000, "channels": 1}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 10.0, "audio": ["2", 0]}},
        "4": {"class_type": "VideoTrim", "inputs": {"video": ["3", 0], "strict_duration": False,
                                                    "trim": {"trim": {"start_time": 0.2, "duration": 0.5}}}},
        "5": {"class_type": "VideoCrop", "inputs": {"video": ["4", 0],
                                                    "crop": {"crop": {"x": 1, "y": 2, "width": 9, "height": 8}}}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 3, "color": 0x0000FF}},
        "7": {"class_type": "EmptyAudio", "inputs": {"duration": 1.0, "sample_rate": 8000, "channels": 1}},
        "8": {"class_type": "CreateVideo", "inputs": {"images": ["6", 0], "fps": 10.0, "audio": ["7", 0]}},
        "9": {"class_type": "ConcatenateVideo", "inputs": {"videos.video0": ["5", 0], "videos.video1": ["8", 0],
                                                           "codec": "auto"}},
        "10": {"class_type": "Video Slice", "inputs": {"video": ["9", 0], "start_time": -0.3, "duration": 0.0,
                                                       "strict_duration": False}},
        "11": {"class_type": "GetVideoComponents", "inputs": {"video": ["9", 0]}},
        "12": {"class_type": "GetVideoComponents", "inputs": {"video": ["10", 0]}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }
    result = engine(folders).run(parse_api(graph), keep=["11", "12"])
    assert result.ok, result.error
    images, audio, fps = result.values["11"]
    assert fps == 10.0 and images.shape == (8, 8, 8, 3)  # 5 trimmed red frames cropped to 8 x 8, 3 blue ones
    assert (images[:5, ..., 0] == 1).all() and (images[5:, ..., 2] == 1).all()
    assert audio["waveform"].shape == (1, 1, 6400)  # 0.5 s + 0.3 s at 8 kHz
    tail, _, _ = result.values["12"]
    assert tail.shape == (3, 8, 8, 3) and (tail[..., 2] == 1).all()  # the last 0.3 s: the blue frames
    assert result.outputs["4"]["images"][0]["type"] == "temp"  # VideoTrim's preview


def test_bad_video_edit_values_are_refused_before_the_run(folders):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 12, "batch_size": 4, "color": 0}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 10.0}},
        "3": {"class_type": "VideoTrim", "inputs": {"video": ["2", 0], "strict_duration": False,
                                                    "trim": {"trim": {"start_time": "soon", "duration": 0.0}}}},
        "4": {"class_type": "GetVideoComponents", "inputs": {"video": ["3", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    with pytest.raises(WorkflowInvalid, match="trim: start_time must be numbers"):
        engine(folders).run(parse_api(graph))
    graph["3"]["inputs"]["trim"] = {"trim": {"start_time": 0.0, "duration": -1.0}}
    result = engine(folders).run(parse_api(graph))
    assert not result.ok and "trim duration must be >= 0" in str(result.error)
    graph["3"] = {"class_type": "VideoCrop", "inputs": {"video": ["2", 0], "crop": [1, 2, 3, 4]}}
    with pytest.raises(WorkflowInvalid):
        engine(folders).run(parse_api(graph))


def test_untouched_trim_passes_the_video_through(folders):
    video = Video(numbered(4, h=4, w=6), Fraction(10))
    result = VideoTrim().execute(video=video, trim={"trim": {"start_time": 0.0, "duration": 0.0}},
                                 strict_duration=True)
    assert result.outputs[0] is video


# --- Declarations ---------------------------------------------------------------------------------------------


def test_declarations_match_comfyui():
    info = builtin_registry().object_info()
    sliced = info["Video Slice"]
    assert sliced["display_name"] == "Trim Video" and sliced["category"] == "video"
    assert sliced["input_order"]["required"] == ["video", "start_time", "duration", "strict_duration"]
    start = sliced["input"]["required"]["start_time"][1]
    assert {"default": 0.0, "min": -1e5, "max": 1e5, "step": 0.001}.items() <= start.items()
    assert sliced["input"]["required"]["strict_duration"][1]["default"] is False
    trim = info["VideoTrim"]
    assert trim["display_name"] == "Trim Video (Advanced)" and trim["output_node"] is True
    assert trim["input_order"]["required"] == ["video", "trim", "strict_duration"]
    assert trim["input"]["required"]["trim"] == ["VIDEO_EDIT", {
        "default": {"trim": {"start_time": 0.0, "duration": 0.0}}, "socketless": True, "features": ["trim"],
        "tooltip": "Trim window in seconds. Duration 0 keeps the video until the end."}]
    crop = info["VideoCrop"]
    assert crop["display_name"] == "Crop Video" and crop["input_order"]["required"] == ["video", "crop"]
    assert crop["input"]["required"]["crop"][1]["default"] == {"crop": {"x": 0, "y": 0, "width": 0, "height": 0}}
    concat = info["ConcatenateVideo"]
    assert concat["input_order"]["required"] == ["videos.video0", "codec"]
    assert concat["input_order"]["optional"] == [f"videos.video{i}" for i in range(1, 100)] + ["complete_audio"]
    assert concat["input"]["required"]["codec"][0] == ["auto", "h264", "av1"]
    assert concat["output"] == ["VIDEO"] and math.isclose(len(concat["input_order"]["optional"]), 100)


def test_ui_files_store_the_edit_widget_first():
    assert VideoTrim.widgets_from_ui([{"trim": {"start_time": 1.0, "duration": 2.0}}, True]) == {
        "trim": {"trim": {"start_time": 1.0, "duration": 2.0}}, "strict_duration": True}
    assert VideoCrop.widgets_from_ui([{"crop": {"x": 2, "y": 2, "width": 4, "height": 4}}]) == {
        "crop": {"crop": {"x": 2, "y": 2, "width": 4, "height": 4}}}


def test_the_edit_as_json_text_as_loom_s_editor_holds_it() -> None:
    """Loom's editor holds a VIDEO_EDIT value as JSON text (a text widget in the edit's place): read as the dict."""
    from nodes.sd.video import VideoCrop, VideoTrim, _edit_problem, _edit_section

    assert VideoTrim.widgets_from_ui(['{"trim": {"start_time": 0.5, "duration": 1}}', True]) == {
        "trim": '{"trim": {"start_time": 0.5, "duration": 1}}', "strict_duration": True}
    assert VideoCrop.widgets_from_ui(['{"crop": {"x": 2}}']) == {"crop": '{"crop": {"x": 2}}'}
    assert _edit_section('{"trim": {"start_time": 0.5, "duration": 1}}', "trim", ("start_time", "duration"),
                         "VideoTrim") == {"start_time": 0.5, "duration": 1}
    assert _edit_section("", "trim", ("start_time", "duration"), "VideoTrim") == {}
    assert "must be a video edit value" in _edit_problem("{not json", "trim", ("start_time", "duration"))
