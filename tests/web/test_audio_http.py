"""Audio over HTTP: a WAV uploaded through /upload/image (as ComfyUI's editor posts it), listed in LoadAudio's combo,
run through LoadAudio -> SaveAudio / PreviewAudio by the server, and the saved files fetched from /view and decoded."""

import io
import math

import av
import numpy as np
from aiohttp import FormData

from tests.web.live import history_of, queue

RATE = 32000


def wav_bytes(seconds: float = 0.25) -> tuple[bytes, np.ndarray]:
    """A stereo 16-bit WAV of two sines, written with PyAV, and its samples as int16 [2, T]."""
    t = np.arange(round(seconds * RATE)) / RATE
    pcm = np.round(np.stack([0.4 * np.sin(2 * math.pi * 300 * t), 0.3 * np.sin(2 * math.pi * 500 * t)])
                   * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=RATE, layout="stereo")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16p", layout="stereo")
        frame.sample_rate, frame.pts = RATE, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue(), pcm


def upload_form(data: bytes, filename: str) -> FormData:
    body = FormData()
    body.add_field("image", data, filename=filename, content_type="audio/wav")
    return body


def decode(data: bytes) -> tuple[np.ndarray, int, dict[str, str]]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        planar = av.AudioResampler(format="s16p")  # FLAC decodes to interleaved s16: one row per channel
        samples = np.concatenate([o.to_ndarray() for f in container.decode(stream) for o in planar.resample(f)], 1)
        return samples, stream.codec_context.sample_rate, dict(container.metadata)


async def test_upload_list_run_and_view_audio(client, paths):
    data, pcm = wav_bytes()
    resp = await client.post("/upload/image", data=upload_form(data, "tone.wav"))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"name": "tone.wav", "subfolder": "", "type": "input"}
    assert (paths.input / "tone.wav").read_bytes() == data

    info = await (await client.get("/object_info/LoadAudio")).json()
    assert info["LoadAudio"]["input"]["required"]["audio"] == [["tone.wav"], {"audio_upload": True}]

    prompt = {"1": {"class_type": "LoadAudio", "inputs": {"audio": "tone.wav"}},
              "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/loom"}},
              "3": {"class_type": "PreviewAudio", "inputs": {"audio": ["1", 0]}}}
    prompt_id = await queue(client, prompt, extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}})
    entry = (await history_of(client, [prompt_id]))[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    (saved,) = entry["outputs"]["2"]["audio"]
    assert saved == {"filename": "loom_00001_.flac", "subfolder": "audio", "type": "output"}
    (preview,) = entry["outputs"]["3"]["audio"]
    assert preview["type"] == "temp"

    for item in (saved, preview):
        view = await client.get("/view", params=item)
        assert view.status == 200
        assert view.headers["Content-Type"] == "audio/flac"
        assert view.headers["Content-Disposition"].startswith("inline")
        samples, rate, tags = decode(await view.read())
        assert rate == RATE
        assert np.array_equal(samples, pcm)  # WAV s16 -> float -> FLAC s16 is lossless
    assert '"LoadAudio"' in tags["prompt"] and tags["workflow"] == '{"nodes": []}'


async def test_an_undecodable_audio_upload_is_refused(client, paths):
    resp = await client.post("/upload/image", data=upload_form(b"RIFF....WAVEfmt not really" * 20, "fake.wav"))
    assert resp.status == 415
    body = await resp.json()
    assert body["error"]["type"] == "not_media" and "fake.wav" in body["error"]["message"]
    assert not (paths.input / "fake.wav").exists()


async def test_view_serves_audio_inline_with_its_type(client, paths):
    paths.output.mkdir(parents=True, exist_ok=True)
    for name in ("a.opus", "a.ogg", "a.mp3", "a.flac", "a.wav", "a.m4a"):
        (paths.output / name).write_bytes(b"x")
    expected = {"a.opus": "audio/ogg", "a.ogg": "audio/ogg", "a.mp3": "audio/mpeg", "a.flac": "audio/flac",
                "a.wav": "audio/wav", "a.m4a": "audio/mp4"}
    for name, content_type in expected.items():
        view = await client.get("/view", params={"filename": name})
        assert view.status == 200 and view.headers["Content-Type"] == content_type, name
        assert view.headers["Content-Disposition"].startswith("inline")
