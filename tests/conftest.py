import pytest
import torch

from tests.support_nodes import CALLS, test_registry


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; scripts/gpu_check.sh runs "
                                       "`pytest -m cuda` on the GPU machine)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def registry():
    CALLS.clear()
    return test_registry()
