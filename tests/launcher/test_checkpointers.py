"""Real CRIU and runsc with ``transformers serve`` (tiny model): snapshot, then two replicas restored side by
side from the one snapshot, each answering the openai client with the greedy answer of the original."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.registry import get_adapter
from coldstart.launcher.checkpointers.registry import CHECKPOINTERS, SPECIAL, get_checkpointer
from coldstart.launcher.errors import UsageError
from coldstart.launcher.snapshots.manager import SnapshotManager
from coldstart.launcher.snapshots.store import SnapshotStore

PROMPT = [{"role": "user", "content": "Name a colour."}]


def greedy(base_url: str, model: str) -> str:
    with OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        answer = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    return answer.choices[0].message.content or ""


def netns_names() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


async def scenario(checkpointer, model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    adapter = get_adapter("transformers")
    config = EngineConfig(model=str(model))
    manager = SnapshotManager(checkpointer, SnapshotStore(tmp_path / "store"), adapter, config)
    upstream = adapter.upstream_model_name(config)
    sandboxes = []
    async with httpx.AsyncClient(trust_env=False, timeout=300) as http:
        try:
            original = await manager.boot_and_snapshot(adapter, config, http, tmp_path / "r1", "r1")
            sandboxes.append(original)
            assert manager.has_snapshot()
            before = await asyncio.to_thread(greedy, original.base_url, upstream)
            assert before, "the original answered nothing"

            results = await asyncio.gather(
                *(manager.restore(adapter, config, http, tmp_path / rid, rid) for rid in ("r2", "r3")),
                return_exceptions=True,
            )
            restored = [r for r in results if not isinstance(r, BaseException)]
            sandboxes += restored
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            urls = {s.base_url for s in sandboxes}
            assert len(urls) == 3, f"replicas share an address: {urls}"
            answers = await asyncio.gather(
                *(asyncio.to_thread(greedy, s.base_url, upstream) for s in restored)
            )
            assert answers == [before, before]
            # the original still serves after the snapshot (leave running)
            assert await asyncio.to_thread(greedy, original.base_url, upstream) == before
            assert {s.netns.name for s in sandboxes} <= netns_names()  # type: ignore[attr-defined]
        finally:
            ours = {s.netns.name for s in sandboxes if s.netns}  # type: ignore[attr-defined]
            for sandbox in sandboxes:
                await sandbox.stop(5.0)
    assert all(s.exit_code() is not None for s in sandboxes)
    assert not (ours & netns_names()), "network namespaces left behind"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["criu", "runsc"])
def test_snapshot_and_two_restores_answer_like_the_original(
    name: str, tiny_model: Path, tmp_path: Path, working_checkpointer
) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(scenario(working_checkpointer(name), tiny_model, tmp_path))


def test_registry_names_valid_checkpointers() -> None:
    with pytest.raises(UsageError) as info:
        get_checkpointer("docker")
    for valid in (*CHECKPOINTERS, *SPECIAL):
        assert valid in str(info.value)


def test_no_io_uring_wrapper_denies_io_uring() -> None:
    import sys

    from coldstart.launcher.checkpointers import no_io_uring

    probe = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); p = ctypes.create_string_buffer(120);"
        "r = libc.syscall(425, 4, p); sys.exit(0 if r == -1 and ctypes.get_errno() == 38 else 1)"
    )
    done = subprocess.run([*no_io_uring.argv_prefix(), sys.executable, "-c", probe], timeout=60)
    assert done.returncode == 0, "io_uring_setup did not fail with ENOSYS under the wrapper"


async def sampled_answers(checkpointer, model: Path, tmp_path: Path) -> list[str]:  # type: ignore[no-untyped-def]
    adapter = get_adapter("transformers")
    config = EngineConfig(model=str(model))
    manager = SnapshotManager(checkpointer, SnapshotStore(tmp_path / "store"), adapter, config)
    body = {
        "model": adapter.upstream_model_name(config),
        "messages": PROMPT,
        "max_tokens": 12,
        # `transformers serve` samples only when the generation config says so; it samples with torch's
        # global RNG, which is part of the image.
        "generation_config": json.dumps({"do_sample": True, "temperature": 1.0}),
    }
    sandboxes = []
    async with httpx.AsyncClient(trust_env=False, timeout=300) as http:
        try:
            sandboxes.append(await manager.boot_and_snapshot(adapter, config, http, tmp_path / "r1", "r1"))
            for rid in ("r2", "r3"):
                sandboxes.append(await manager.restore(adapter, config, http, tmp_path / rid, rid))
            answers = []
            for sandbox in sandboxes[1:]:
                response = await http.post(f"{sandbox.base_url}/v1/chat/completions", json=body)
                answers.append(response.json()["choices"][0]["message"]["content"])
            return answers
        finally:
            for sandbox in sandboxes:
                await sandbox.stop(5.0)


@pytest.mark.slow
def test_restored_replicas_sample_differently(tiny_model: Path, tmp_path: Path, working_checkpointer) -> None:  # type: ignore[no-untyped-def]
    # transformers serve runs under snapshot_hooks (transformers_entry): after_restore reseeds its RNGs.
    first, second = asyncio.run(sampled_answers(working_checkpointer("criu"), tiny_model, tmp_path))
    assert first != second
