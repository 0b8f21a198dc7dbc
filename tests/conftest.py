"""Fixtures shared by the whole suite (helpers live in ``support.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import ChunkServer, Served, make_cached_model


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny random Qwen3-architecture model with a local tokenizer (made once, cached in .cache/)."""
    return make_cached_model("tiny")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """Factory: ``serve(["transformers", str(model), "--idle-timeout", "1"])`` -> a started ``Served``."""
    started: list[Served] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> Served:
        served = Served(args, tmp_path / f"serve-{len(started)}.log", env)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fast tests first, engine-booting (``slow``) ones after, so a broken unit shows in seconds. The sort
    is stable: within each group, files keep their order (module fixtures boot once)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture
def chunk_server(tmp_path: Path) -> Iterator[Callable[..., ChunkServer]]:
    """Factory: ``chunk_server(store, upstream=None)`` -> a running ``coldstart image serve``."""
    servers: list[ChunkServer] = []

    def start(store: Path, upstream: str | None = None, ready_timeout_s: float = 20.0) -> ChunkServer:
        server = ChunkServer(store, upstream, tmp_path / f"server{len(servers)}.log", ready_timeout_s)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
