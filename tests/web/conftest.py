import pytest

from nodes.folders import FolderPaths, set_paths
from tests.support_nodes import CALLS
from tests.web.pack import web_registry
from web.app import create_app
from web.state import ServerConfig

ADD = {"1": {"class_type": "PrimitiveInt", "inputs": {"value": 6}},
       "2": {"class_type": "IntMath", "inputs": {"a": ["1", 0], "b": 7, "operation": "multiply"}},
       "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def image_prompt(value=1):
    return {"1": {"class_type": "SaveTestImage", "inputs": {"value": value, "filename_prefix": "t"}}}


def slow_prompt(steps=5, delay=0.01, value=1):
    return {"1": {"class_type": "PrimitiveInt", "inputs": {"value": value}},
            "2": {"class_type": "SlowPreview", "inputs": {"value": ["1", 0], "steps": steps, "delay": delay}},
            "3": {"class_type": "Sink", "inputs": {"value": ["2", 0]}}}


@pytest.fixture
def paths(tmp_path):
    folders = FolderPaths(base=tmp_path, bundled_models=None)
    set_paths(folders)
    yield folders
    set_paths(FolderPaths())


@pytest.fixture
def make_app(tmp_path, paths):
    CALLS.clear()

    def factory(**options):
        options.setdefault("data_dir", tmp_path / "user")
        options.setdefault("preview_interval_s", 0.0)
        return create_app(ServerConfig(**options), web_registry(), paths)

    return factory


@pytest.fixture
async def client(make_app, aiohttp_client):
    return await aiohttp_client(make_app())
