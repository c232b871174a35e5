"""AudioDuration (nodes/sd/audio.py): samples over rate, in a workflow (a video's audio, and a silent video's none),
its declaration and bad input."""

import pytest
import torch

from executor.executor import Executor
from executor.services import Services
from graph.document import parse_api
from nodes.folders import FolderPaths, set_paths
from nodes.registry import builtin_registry
from nodes.sd.audio import AudioDuration


@pytest.fixture
def folders(tmp_path):
    paths = FolderPaths(base=tmp_path)
    set_paths(paths)
    yield paths
    set_paths(FolderPaths())


def test_duration_is_samples_over_rate():
    audio = {"waveform": torch.zeros(2, 2, 22050), "sample_rate": 44100}
    assert AudioDuration().execute(audio=audio) == (0.5, 44100)
    assert AudioDuration().execute(audio={"waveform": torch.zeros(1, 1, 7), "sample_rate": 3}) == (7 / 3, 3)
    assert AudioDuration().execute(audio={"waveform": torch.zeros(1, 1, 7), "sample_rate": 0}) == (0.0, 0)
    assert AudioDuration().execute(audio=None) == (0.0, 0)  # no audio, as a silent video gives


def test_duration_in_a_workflow(folders):
    graph = {
        "1": {"class_type": "EmptyAudio", "inputs": {"duration": 1.25, "sample_rate": 16000, "channels": 1}},
        "2": {"class_type": "AudioDuration", "inputs": {"audio": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0}},
        "5": {"class_type": "CreateVideo", "inputs": {"images": ["4", 0], "fps": 10.0}},
        "6": {"class_type": "GetVideoComponents", "inputs": {"video": ["5", 0]}},
        "7": {"class_type": "AudioDuration", "inputs": {"audio": ["6", 1]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 1]}},
    }
    engine = Executor(builtin_registry(), services=Services.create(folders, force_cpu=True))
    result = engine.run(parse_api(graph), keep=["2", "7"])
    assert result.ok, result.error
    assert result.values["2"] == (1.25, 16000)
    assert tuple(result.values["7"]) == (0.0, 0)


def test_declaration_and_bad_input():
    info = builtin_registry().object_info("AudioDuration")["AudioDuration"]
    assert info["input_order"]["required"] == ["audio"] and info["category"] == "audio"
    assert info["output"] == ["FLOAT", "INT"] and info["output_name"] == ["duration", "sample_rate"]
    assert info["display_name"] == "Audio Duration"
    with pytest.raises(ValueError, match="AudioDuration: AUDIO must be"):
        AudioDuration().execute(audio={"samples": torch.zeros(1, 4)})
