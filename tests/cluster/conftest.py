"""The two-node Ray cluster (``ray_nodes.py``), started once per module and torn down completely."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # ray_nodes beside this file

from ray_nodes import RayNodes  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayNodes]:
    pytest.importorskip("ray")
    nodes = RayNodes(tmp_path_factory.mktemp("ray"))
    with nodes:
        yield nodes
    assert nodes.leftovers() == []
