from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fake_nvml, importable by the tests of this folder

from fake_nvml import FakeNvml, gpus  # noqa: E402


@pytest.fixture
def fake_nvml() -> FakeNvml:
    return FakeNvml(gpus(2))
