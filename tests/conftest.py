import os

import pytest
import torch

import attn_backend


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _debug_checks():
    # Value checks (slots and page ids in range) are host-synchronising, so
    # serving leaves them off; every test runs with them on.
    attn_backend.set_debug_checks(True)
    yield


@pytest.fixture
def seed():
    """A fresh seed per test (printed on failure) so every run draws new inputs."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value
