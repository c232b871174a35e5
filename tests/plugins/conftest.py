import sys

import pytest


@pytest.fixture(autouse=True)
def forget_plugin_modules(tmp_path_factory):
    """Plugins a test imported from its temporary folders are dropped, so each test imports its own."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    for name, module in list(sys.modules.items()):
        if (getattr(module, "__file__", None) or "").startswith(base):
            del sys.modules[name]


@pytest.fixture
def custom_nodes(tmp_path):
    folder = tmp_path / "custom_nodes"
    folder.mkdir()
    return folder
