"""Fixtures for snapshot_hooks tests: engines started through the ``custom`` adapter's launch spec."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import REPO, free_port

from coldstart.engine_adapters.base import EngineConfig
from coldstart.engine_adapters.custom import CustomAdapter

TINY_ENGINE = REPO / "recipes" / "examples" / "tiny_engine.py"
FAULTY_ENGINE = Path(__file__).parent / "faulty_engine.py"


class Engine:
    """One engine process started from ``CustomAdapter.launch_spec`` on the host (no sandbox)."""

    def __init__(self, engine_args: tuple[str, ...], model: str, log_path: Path, env: dict[str, str]) -> None:
        self.adapter = CustomAdapter()
        port = free_port()
        self.config = EngineConfig(model=model, engine_args=engine_args, host="127.0.0.1", port=port)
        self.base_url = f"http://127.0.0.1:{port}"
        spec = self.adapter.launch_spec(self.config)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def healthy(self) -> bool:
        async def probe() -> bool:
            async with httpx.AsyncClient() as client:
                return await self.adapter.is_healthy(client, self.base_url)

        return asyncio.run(probe())

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            if self.healthy():
                return
            time.sleep(0.2)
        raise AssertionError(f"engine not healthy after {timeout} s:\n{self.log_path.read_text()}")

    def call(self, phase: str) -> None:
        """Run ``adapter.before_checkpoint`` or ``adapter.after_restore`` as the launcher does."""

        async def run() -> None:
            async with httpx.AsyncClient() as client:
                await getattr(self.adapter, phase)(client, self.base_url)

        asyncio.run(run())

    def state(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(f"{self.base_url}/coldstart/state", timeout=10).json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def tiny_engine_args(max_cache_len: int = 256) -> tuple[str, ...]:
    return (
        "{python}", str(TINY_ENGINE), "--model", "{model}", "--host", "{host}", "--port", "{port}",
        "--max-cache-len", str(max_cache_len), "--served-model-name", "tiny",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = Engine(tiny_engine_args(), str(tiny_model), tmp_path_factory.mktemp("engine") / "engine.log", {})
    try:
        engine.wait_healthy()
        yield engine
    finally:
        engine.stop()
