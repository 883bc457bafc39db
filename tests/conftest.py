import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.environ.get("MEGATRON_MOE_DATA", os.path.join(ROOT, "..", "shared", "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path(*parts):
    return os.path.join(SHARED_DATA, *parts)


def require_shared(*parts):
    path = shared_path(*parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found: the shared data folder (../shared/data, or $MEGATRON_MOE_DATA) is absent")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (deselect with -m 'not slow')")
