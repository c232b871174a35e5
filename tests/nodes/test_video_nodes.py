"""Video nodes (SaveWEBM, CreateVideo, SaveVideo, LoadVideo, GetVideoComponents): clips of known frames written,
read back with PyAV and compared (frame count, size, rate, PSNR, the workflow metadata), and bad input refused."""

import json
import math
import os
from fractions import Fraction

import av
import pytest
import torch

from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.video import CreateVideo, GetVideoComponents, LoadVideo, SaveVideo, SaveWEBM

PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64}}}
WORKFLOW = {"nodes": [{"id": 1, "type": "EmptyImage"}], "links": []}


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def run(cls, **inputs):
    node = cls()
    node.ctx = NodeContext(extra={"prompt": PROMPT, "extra_pnginfo": {"workflow": WORKFLOW}})
    return node.execute(**inputs)


def clip(frames: int = 5, h: int = 48, w: int = 64) -> torch.Tensor:
    """Smooth moving colour gradients (what lossy codecs keep well), distinct in every frame."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = [torch.stack([0.5 + 0.3 * torch.sin(math.pi * (x + t / frames)), y * 0.6 + 0.2,
                        0.5 + 0.3 * torch.cos(math.pi * (x - y + t / frames))], dim=-1) for t in range(frames)]
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def read_back(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).float() / 255 for f in container.decode(stream)]
        return torch.stack(frames), stream.average_rate, stream.codec_context.name, dict(container.metadata)


def test_the_nodes_declare_comfyuis_inputs_and_outputs():
    info = builtin_registry().object_info()
    webm = info["SaveWEBM"]
    assert webm["input_order"]["required"] == ["images", "filename_prefix", "codec", "fps", "crf"]
    assert webm["input"]["required"]["codec"][0] == ["vp9", "av1"]
    assert webm["input"]["required"]["crf"][1].items() >= {"default": 32.0, "min": 0.0, "max": 63.0}.items()
    assert webm["output_node"] and webm["category"] == "image/video"
    assert info["CreateVideo"]["input_order"] == {"required": ["images", "fps"], "optional": ["audio"]}
    assert info["CreateVideo"]["output"] == ["VIDEO"]
    assert info["SaveVideo"]["input_order"]["required"] == ["video", "filename_prefix", "format", "codec"]
    assert info["SaveVideo"]["input"]["required"]["filename_prefix"][1]["default"] == "video/ComfyUI"
    assert info["LoadVideo"]["input_order"]["required"] == ["file"] and info["LoadVideo"]["output"] == ["VIDEO"]
    assert info["GetVideoComponents"]["output"] == ["IMAGE", "AUDIO", "FLOAT"]
    assert info["GetVideoComponents"]["output_name"] == ["images", "audio", "fps"]


@pytest.mark.parametrize("codec, decoder", [("vp9", {"vp9", "libvpx-vp9"}), ("av1", {"av1", "libdav1d", "libaom-av1"})])
def test_save_webm_writes_the_frames_rate_and_workflow(folders, codec, decoder):
    images = clip()
    result = run(SaveWEBM, images=images, filename_prefix="vid/clip", codec=codec, fps=12.5, crf=4.0)
    assert result.ui == {"images": [{"filename": "clip_00001_.webm", "subfolder": "vid", "type": "output"}],
                         "animated": [True]}
    frames, rate, name, metadata = read_back(folders.output / "vid" / "clip_00001_.webm")
    assert frames.shape == images.shape
    assert rate == Fraction(25, 2)
    assert name in decoder
    for got, want in zip(frames, images, strict=True):
        assert psnr(got, want) > 30
    tags = {key.lower(): value for key, value in metadata.items()}  # Matroska stores tag names upper-case
    assert json.loads(tags["prompt"]) == PROMPT and json.loads(tags["workflow"]) == WORKFLOW


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="thread scheduling policies are Linux's")
def test_an_av1_save_leaves_the_threads_scheduling_policy_as_it_was(folders):
    """SVT-AV1 switches the thread that opens it to real-time SCHED_FIFO 99 when run as root, and leaves it so: every
    process the test run started after (the Ray pool's workers) inherited it, and their sampling threads kept the
    cores from the threads that send progress until each run ended."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    run(SaveWEBM, images=clip(frames=2), filename_prefix="rt", codec="av1", fps=8.0, crf=30.0)
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == before


def test_save_webm_crf_trades_quality_for_size(folders):
    images = clip(frames=4)
    run(SaveWEBM, images=images, filename_prefix="q", codec="vp9", fps=24.0, crf=2.0)
    run(SaveWEBM, images=images, filename_prefix="q", codec="vp9", fps=24.0, crf=60.0)
    fine, coarse = folders.output / "q_00001_.webm", folders.output / "q_00002_.webm"
    assert fine.stat().st_size > coarse.stat().st_size
    assert psnr(read_back(fine)[0][1], images[1]) > psnr(read_back(coarse)[0][1], images[1])


def test_save_webm_takes_odd_sizes_and_refuses_a_non_batch(folders):
    run(SaveWEBM, images=clip(frames=2, h=25, w=33), filename_prefix="odd", codec="vp9", fps=8.0, crf=10.0)
    assert read_back(folders.output / "odd_00001_.webm")[0].shape == (2, 25, 33, 3)
    with pytest.raises(ValueError, match="SaveWEBM needs a batch"):
        run(SaveWEBM, images=torch.zeros(4, 4, 3), filename_prefix="bad", codec="vp9", fps=8.0, crf=10.0)
    assert not list(folders.output.glob("bad*"))


def test_save_video_then_load_video_gives_back_the_frames(folders):
    images = clip(frames=6)
    (video,) = run(CreateVideo, images=images, fps=15.0)
    result = run(SaveVideo, video=video, filename_prefix="video/ComfyUI", format="auto", codec="auto")
    saved = result.ui["images"][0]
    assert saved == {"filename": "ComfyUI_00001_.mp4", "subfolder": "video", "type": "output"}
    path = folders.output / "video" / "ComfyUI_00001_.mp4"
    frames, rate, name, metadata = read_back(path)
    assert (frames.shape, rate, name) == (images.shape, 15, "h264")
    assert json.loads(metadata["prompt"]) == PROMPT and json.loads(metadata["workflow"]) == WORKFLOW
    folders.input.mkdir(parents=True, exist_ok=True)
    (folders.input / "clip.mp4").write_bytes(path.read_bytes())
    (loaded,) = run(LoadVideo, file="clip.mp4")
    out_images, audio, fps = run(GetVideoComponents, video=loaded)
    assert out_images.shape == images.shape and fps == 15.0 and audio is None
    assert min(psnr(a, b) for a, b in zip(out_images, images, strict=True)) > 30


def test_create_video_carries_audio_through_save_and_load(folders):
    rate = 16000
    t = torch.arange(rate // 2) / rate
    waveform = torch.stack([torch.sin(2 * math.pi * 440 * t), 0.5 * torch.sin(2 * math.pi * 220 * t)])[None]
    (video,) = run(CreateVideo, images=clip(frames=5), fps=10.0, audio={"waveform": waveform, "sample_rate": rate})
    assert run(GetVideoComponents, video=video)[1]["waveform"] is waveform
    run(SaveVideo, video=video, filename_prefix="sound", format="mp4", codec="h264")
    folders.input.mkdir(parents=True, exist_ok=True)
    (folders.input / "sound.mp4").write_bytes((folders.output / "sound_00001_.mp4").read_bytes())
    _, audio, _ = run(GetVideoComponents, video=run(LoadVideo, file="sound.mp4")[0])
    assert audio["sample_rate"] == rate and audio["waveform"].shape[1] == 2
    # AAC adds a priming delay and pads to whole frames: compare the level, not sample by sample.
    got = audio["waveform"][0]
    assert got.shape[1] >= waveform.shape[2]
    rms = got.pow(2).mean(dim=1).sqrt()
    assert rms[0] == pytest.approx(math.sqrt(0.5), rel=0.1) and rms[1] == pytest.approx(0.5 * math.sqrt(0.5), rel=0.1)


def test_save_video_refuses_odd_sizes_clearly(folders):
    (video,) = run(CreateVideo, images=clip(frames=2, h=25, w=32), fps=10.0)
    with pytest.raises(ValueError, match="H.264 needs an even width and height, the video is 32x25"):
        run(SaveVideo, video=video, filename_prefix="odd", format="auto", codec="auto")
    assert not list(folders.output.glob("odd*"))


def test_load_video_refuses_a_file_that_is_not_a_video(folders):
    folders.input.mkdir(parents=True, exist_ok=True)
    (folders.input / "fake.mp4").write_bytes(b"this is not a video at all" * 20)
    with pytest.raises(ValueError, match="fake.mp4 is not a readable video"):
        run(LoadVideo, file="fake.mp4")
    with pytest.raises(ValueError, match="Invalid video file: missing.mp4"):
        run(LoadVideo, file="missing.mp4")
