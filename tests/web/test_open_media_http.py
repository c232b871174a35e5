"""POST /workflow/from_file: the editor sends a dropped file that is not a PNG or JSON (a FLAC, MP3 or Opus made by the
real save nodes, or a video) as the request body and gets back the workflow it carries, the editor's own graph first;
a file without one, or of another kind, gets a 400 that says so, and nothing is written anywhere."""

import pytest
import torch

from nodes.context import NodeContext
from nodes.sd.audio import SaveAudio
from tests.graph.test_load_media import PROMPT, WORKFLOW, saved_audio


def files_under(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
async def test_the_workflow_of_a_saved_audio_file_comes_back(client, paths, fmt):
    data = saved_audio(paths.output, fmt).read_bytes()
    before = files_under(paths.base)
    resp = await client.post("/workflow/from_file", data=data, headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == WORKFLOW
    assert files_under(paths.base) == before


async def test_the_prompt_comes_back_when_there_is_no_editor_workflow(client, paths):
    node = SaveAudio()
    node.ctx = NodeContext(extra={"prompt": PROMPT})  # a prompt queued without the editor's workflow
    (entry,) = node.execute(audio={"waveform": torch.zeros(1, 1, 800), "sample_rate": 8000},
                            filename_prefix="api").ui["audio"]
    resp = await client.post("/workflow/from_file", data=(paths.output / entry["filename"]).read_bytes())
    assert resp.status == 200 and await resp.json() == PROMPT


async def test_a_file_without_a_workflow_or_of_another_kind_is_a_clear_400(client, paths):
    data = saved_audio(paths.output, "flac", prefix="bare", workflow=False).read_bytes()
    before = files_under(paths.base)
    resp = await client.post("/workflow/from_file", data=data)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "no_workflow"
    assert error["message"] == "this FLAC carries no workflow (no 'prompt' or 'workflow' entry)"
    resp = await client.post("/workflow/from_file", data=b"RIFF\0\0\0\0WAVEfmt ")
    assert resp.status == 400
    assert (await resp.json())["error"]["message"].startswith("not a file that carries a workflow: PNG, WEBP, MP4")
    resp = await client.post("/workflow/from_file", data=b"fLaC" + bytes(16))
    assert resp.status == 400 and (await resp.json())["error"]["message"].startswith("cannot read this FLAC: ")
    resp = await client.post("/workflow/from_file")
    assert resp.status == 400 and (await resp.json())["error"]["message"] == "send the file as the request body"
    assert files_under(paths.base) == before


async def test_a_file_over_the_upload_limit_is_refused(make_app, aiohttp_client):
    client = await aiohttp_client(make_app(max_upload_bytes=1000))
    resp = await client.post("/workflow/from_file", data=b"fLaC" + bytes(2000))
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "file_too_large"
