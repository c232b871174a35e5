"""Workflows read back from audio files: the FLAC, MP3 and Opus that SaveAudio, SaveAudioMP3 and SaveAudioOpus write
(run for real, so the metadata is exactly Loom's) load through `load_workflow_data` as `main.py run` and `convert`
read them, the editor's choice of entry works, and a file without a workflow (or not readable) says so."""

import json
from pathlib import Path

import pytest
import torch

import main
from graph.document import DocumentError
from graph.load import PROMPT_FIRST, WORKFLOW_FIRST, file_kind, load_workflow_data, read_file_workflow
from nodes.context import NodeContext
from nodes.folders import FolderPaths, set_paths
from nodes.sd.audio import SaveAudio, SaveAudioMP3, SaveAudioOpus

PROMPT = {"1": {"class_type": "EmptyAudio", "inputs": {"duration": 0.05, "sample_rate": 8000, "channels": 1}},
          "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "again/loom"}}}
# The editor's graph of the same two nodes, as its serialize() writes it.
WORKFLOW = {"last_node_id": 2, "last_link_id": 1, "version": 0.4, "groups": [],
            "nodes": [{"id": 1, "type": "EmptyAudio", "pos": [40, 60], "size": [300, 130], "mode": 0, "inputs": [],
                       "outputs": [{"name": "AUDIO", "type": "AUDIO", "links": [1]}],
                       "widgets_values": [0.05, 8000, 1]},
                      {"id": 2, "type": "SaveAudio", "pos": [400, 60], "size": [300, 100], "mode": 0,
                       "inputs": [{"name": "audio", "type": "AUDIO", "link": 1}], "outputs": [],
                       "widgets_values": ["again/loom"]}],
            "links": [[1, 1, 0, 2, 0, "AUDIO"]]}
SAVERS = {"flac": (SaveAudio, {}), "mp3": (SaveAudioMP3, {"quality": "128k"}),
          "opus": (SaveAudioOpus, {"quality": "64k"})}


def saved_audio(output: Path, fmt: str, prefix: str = "song", workflow: bool = True) -> Path:
    """The file the real save node for `fmt` writes under `output` (the current FolderPaths' output folder), with the
    prompt and the editor workflow in its metadata as a run through the server puts them; `workflow=False`: a run
    without them (the Python API's)."""
    cls, options = SAVERS[fmt]
    node = cls()
    node.ctx = NodeContext(extra={"prompt": PROMPT, "extra_pnginfo": {"workflow": WORKFLOW}} if workflow else {})
    audio = {"waveform": torch.linspace(-0.5, 0.5, 1600).reshape(1, 1, 1600), "sample_rate": 16000}
    (entry,) = node.execute(audio=audio, filename_prefix=prefix, **options).ui["audio"]
    return output / entry["subfolder"] / entry["filename"]


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path, bundled_models=None)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


@pytest.mark.parametrize(("fmt", "kind"), [("flac", "FLAC"), ("mp3", "MP3"), ("opus", "Opus")])
def test_the_workflow_in_saved_audio_loads_back(folders, fmt, kind):
    path = saved_audio(folders.output, fmt)
    raw = path.read_bytes()
    assert file_kind(raw) == kind
    assert load_workflow_data(path) == PROMPT  # the CLI runs the API-format prompt
    assert read_file_workflow(raw, keys=WORKFLOW_FIRST) == WORKFLOW  # the editor draws its own graph
    assert read_file_workflow(raw, keys=PROMPT_FIRST) == PROMPT


def test_an_mp3_without_an_id3_tag_is_still_recognised_by_its_frame_sync(folders):
    raw = saved_audio(folders.output, "mp3", workflow=False).read_bytes()
    assert raw.startswith(b"ID3")
    size = 10 + sum(b << (7 * (3 - i)) for i, b in enumerate(raw[6:10]))  # the tag's syncsafe length
    bare = folders.output / "bare.mp3"
    bare.write_bytes(raw[size:])
    assert file_kind(raw[size:]) == "MP3" and raw[size] == 0xFF
    with pytest.raises(DocumentError, match=r"bare.mp3: this MP3 carries no workflow \(no 'prompt' or 'workflow'"):
        load_workflow_data(bare)


@pytest.mark.parametrize(("fmt", "kind"), [("flac", "FLAC"), ("mp3", "MP3"), ("opus", "Opus")])
def test_audio_without_a_workflow_says_so(folders, fmt, kind):
    path = saved_audio(folders.output, fmt, prefix="bare", workflow=False)
    with pytest.raises(DocumentError, match=f"{path.name}: this {kind} carries no workflow"):
        load_workflow_data(path)
    with pytest.raises(DocumentError, match=f"^this {kind} carries no workflow"):  # no name: the route's message
        read_file_workflow(path.read_bytes(), keys=WORKFLOW_FIRST)


@pytest.mark.parametrize(("head", "kind"), [(b"fLaC", "FLAC"), (b"ID3\x04\0\0\0\0\0\x7f", "MP3"),
                                            (b"OggS" + bytes(24) + b"OpusHead", "Opus")])
def test_a_truncated_audio_file_cannot_be_read_and_says_so(tmp_path, head, kind):
    broken = tmp_path / "broken.bin"
    broken.write_bytes(head + b"\0" * 16)
    with pytest.raises(DocumentError, match=f"broken.bin: cannot read this {kind}: "):
        load_workflow_data(broken)


def test_a_png_still_loads_with_either_entry_first(tmp_path):
    """The PNG reader moved from paths to bytes with the audio ones: SaveImage's tEXt chunks still load."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", json.dumps(PROMPT))
    info.add_text("workflow", json.dumps(WORKFLOW))
    Image.new("RGB", (4, 4)).save(tmp_path / "image.png", pnginfo=info)
    assert load_workflow_data(tmp_path / "image.png") == PROMPT
    assert read_file_workflow((tmp_path / "image.png").read_bytes(), keys=WORKFLOW_FIRST) == WORKFLOW


def test_a_file_of_another_kind_or_a_broken_png_says_so(tmp_path):
    with pytest.raises(DocumentError, match="^not a file that carries a workflow: PNG, WEBP, MP4, WebM, FLAC"):
        read_file_workflow(b"RIFF\0\0\0\0WAVEfmt ")
    assert file_kind(b'{"1": {}}') is None and file_kind(b"\xff\xf1") is None  # JSON; AAC's ADTS sync (layer 0)
    with pytest.raises(DocumentError, match="broken.png: cannot read this PNG"):
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 8)
        load_workflow_data(tmp_path / "broken.png")


def test_main_convert_and_run_take_a_flac(folders, tmp_path, capsys):
    """`main.py convert song.flac` prints the API workflow it carries and `main.py run song.flac` runs it (the run
    saves a FLAC again, under the prefix the workflow names)."""
    path = saved_audio(folders.output, "flac")
    base = tmp_path / "cli"
    assert main.main(["convert", str(path), "--base-dir", str(base), "--no-custom-nodes", "--no-bundled-models"]) == 0
    assert json.loads(capsys.readouterr().out) == PROMPT
    assert main.main(["run", str(path), "--base-dir", str(base), "--no-custom-nodes", "--no-bundled-models"]) == 0
    assert [p.name for p in (base / "output" / "again").iterdir()] == ["loom_00001_.flac"]
