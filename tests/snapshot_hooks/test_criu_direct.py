"""The example engine through a bare ``criu dump`` / ``criu restore`` (no launcher code in between).

Independent of the launcher's checkpointers (``test_snapshot_restore.py`` covers those once they exist):
this pins down what the hooks library and the example engine promise to any CRIU user. Replicas are
restored one after the other (same PID, same host network namespace), each from the same image:
- the restored process, before its after-restore hooks, reports weights off the device and no KV cache;
- after the hooks it answers the greedy canary recorded before the checkpoint, identically;
- two restored replicas, identical in memory, sample differently at temperature 1 (fresh RNG seeds).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import free_port

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.custom import CustomAdapter

from .conftest import tiny_engine_args

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("criu") is None, reason="criu not installed (.ci/setup builds CRIU 4.2)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="criu dump/restore needs root"),
]
PR_SET_CHILD_SUBREAPER = 36
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture
def subreaper() -> Iterator[None]:
    """``criu restore -d`` orphans the restored engine; as subreaper this process can reap it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) refused")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _criu(*args: str, cwd: Path) -> None:
    done = subprocess.run(["criu", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        log = next(iter(a for a in args if a.endswith(".log")), "")
        text = (cwd / log).read_text() if log and (cwd / log).exists() else done.stderr
        raise AssertionError(
            f"criu {args[0]} failed ({done.returncode}):\n" + "\n".join(text.splitlines()[-25:])
        )


def _reap(pid: int, timeout: float = 30.0) -> None:
    with_signal = signal.SIGTERM
    deadline = time.monotonic() + timeout
    os.kill(pid, with_signal)
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_criu_restored_engine_greedy_identical_and_sampling_differs(
    tiny_model: Path, tmp_path: Path, subreaper: None
) -> None:
    adapter = CustomAdapter()
    port = free_port()
    config = EngineConfig(model=str(tiny_model), engine_args=tiny_engine_args(), host="127.0.0.1", port=port)
    base_url = f"http://127.0.0.1:{port}"
    spec = adapter.launch_spec(config)

    async def healthy(timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"engine exited {proc.returncode} during boot")
                if await adapter.is_healthy(client, base_url):
                    return
                await asyncio.sleep(0.1)
        raise AssertionError("engine did not become healthy")

    async def chat(temperature: float, max_tokens: int = 12) -> str:
        async with httpx.AsyncClient() as client:  # closed at once: the client, not the engine, closes
            body = {**CHAT, "temperature": temperature, "max_tokens": max_tokens}
            response = await client.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])

    async def report() -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{base_url}/coldstart/state", timeout=30)).json()  # type: ignore[no-any-return]

    async def hooks(phase: str) -> None:
        async with httpx.AsyncClient() as client:
            await getattr(adapter, phase)(client, base_url)

    # Output to /dev/null, not a log file: CRIU refuses to restore a file that grew after the dump.
    engine = subprocess.Popen(
        spec.argv,
        env={**os.environ, **spec.env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    image = tmp_path / "image"
    image.mkdir()
    try:
        asyncio.run(healthy(120, engine))
        canary = asyncio.run(chat(0))
        serving = asyncio.run(report())
        asyncio.run(hooks("before_checkpoint"))
        _criu("dump", "-t", str(engine.pid), "-D", str(image), "-o", "dump.log", cwd=image)
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
        engine.wait()

    samples: list[list[str]] = []
    seeds: list[int] = []
    for i in range(2):
        _criu("restore", "-D", str(image), "-d", "-o", f"restore-{i}.log", cwd=image)
        try:
            asyncio.run(healthy(60))
            live = asyncio.run(report())  # the image's state, measured by the restored process itself
            assert live["hooks_state"] == "checkpoint_ready"
            assert live["weights"]["location"] == "host" and live["weights"]["module_bytes"] == 0
            assert live["kv_cache"]["allocated"] is False and live["kv_cache"]["bytes_allocated"] == 0
            recorded = live["at_last_checkpoint"]
            assert recorded["weights"]["module_bytes"] == 0 and not recorded["kv_cache"]["allocated"]

            asyncio.run(hooks("after_restore"))
            back = asyncio.run(report())
            assert back["weights"] == serving["weights"] and back["kv_cache"] == serving["kv_cache"]
            assert asyncio.run(chat(0)) == canary
            seeds.append(back["identity"]["rng_seed"])
            samples.append([asyncio.run(chat(1.0, max_tokens=16)) for _ in range(2)])
        finally:
            _reap(engine.pid)
    assert seeds[0] != seeds[1]
    assert samples[0] != samples[1]
