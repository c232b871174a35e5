import pytest

from tests.support_nodes import CALLS, test_registry


@pytest.fixture
def registry():
    CALLS.clear()
    return test_registry()
