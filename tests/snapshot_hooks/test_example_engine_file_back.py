"""The example engine with ``--weights-dir``: its before-checkpoint hook moves the weights into
content-addressed files (``snapshot_hooks.torch_helpers.file_back_module``) that its process then maps, and
it answers the same greedy text after the after-restore hooks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from .conftest import Engine, tiny_engine_args

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Path]]:
    work = tmp_path_factory.mktemp("file-back")
    args = (*tiny_engine_args(), "--dtype", "float32", "--weights-dir", str(work / "weights"))
    running = Engine(args, str(tiny_model), work / "engine.log", {})
    try:
        running.wait_healthy()
        yield running, work / "weights"
    finally:
        running.stop()


def greedy(engine: Engine) -> str:
    client = openai.OpenAI(base_url=f"{engine.base_url}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def test_weights_move_into_files_the_engine_maps(engine: tuple[Engine, Path]) -> None:
    running, weights = engine
    before = greedy(running)
    running.call("before_checkpoint")
    report = running.state()["weights_in_files"]
    assert report["bytes"] > 0 and report["files"]
    assert {p.name: p.stat().st_size for p in weights.iterdir()} == report["files"]
    maps = Path(f"/proc/{running.state()['pid']}/maps").read_text()
    assert all(name in maps for name in report["files"])
    assert report["mergeable_bytes"] > 0  # the rest of its memory marked for KSM
    smaps = Path(f"/proc/{running.state()['pid']}/smaps").read_text()
    heap_flags = smaps.split("[heap]", 1)[1].split("VmFlags:", 1)[1].splitlines()[0].split()
    assert "mg" in heap_flags
    running.call("after_restore")
    assert greedy(running) == before
