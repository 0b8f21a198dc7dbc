"""Helpers the tests import (``from support import ...``): cached local models and a running
``coldstart-serve`` (the real CLI in a subprocess, its log captured for lifecycle assertions)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("COLDSTART_TEST_CACHE", REPO / ".cache"))
SERVE = [sys.executable, "-m", "coldstart.launcher.cli.serve"]


def make_cached_model(size: str) -> Path:
    from coldstart.launcher.tiny_model import make_model

    return make_model(CACHE / "models" / size, size)


def write_token(path: Path) -> str:
    """A random token for a ``coldstart image serve``, written 0600 to ``path``."""
    import secrets

    token = secrets.token_hex(16)
    path.write_text(token)
    path.chmod(0o600)
    return token


def heap_like(size: int) -> bytes:
    """Bytes that compress about as a process heap does (repeated words, pointers, zero runs): ~4x with
    zstd, where ``os.urandom`` (weights) does not compress at all."""
    import random

    rng = random.Random(7)
    words = [rng.randbytes(8) for _ in range(512)] + [b"\0" * 8] * 512
    return b"".join(rng.choice(words) for _ in range(size // 8))


def free_port() -> int:
    """A free port whose + 1 is free too (engines with snapshot_hooks listen there for control calls)."""
    from coldstart.launcher.process import free_port_pair

    return free_port_pair()


def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> float:
    """Wait for ``condition`` (polled every 50 ms): the seconds it took, else an AssertionError naming
    ``what``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


class Served:
    """A ``coldstart-serve`` process: its URL, its log, and a clean stop."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        no_snapshot = (
            [] if any(a.startswith("--snapshot") or a == "--recipe" for a in args) else ["--snapshot", "off"]
        )
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            # Snapshots only where a test asks for them: the others test the proxy and lifecycle.
            [*SERVE, *args[:2], "--port", str(self.port), *no_snapshot, *args[2:]],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(f"{self.url}/health", timeout=5).json()  # type: ignore[no-any-return]

    def wait_for(self, predicate, timeout: float = 120.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"coldstart-serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if predicate(self.health()):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.wait_for(lambda h: h["ready"], timeout, "a ready replica")

    def engine_pids(self) -> list[int]:
        """PIDs of the engine processes (children of coldstart-serve)."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            text = (task / "children").read_text().split()
            pids += [int(p) for p in text]
        return pids

    def lifecycle(self) -> list[tuple[str, str, str]]:
        """(replica, from, to) for every transition in the log."""
        return re.findall(r"replica (r\d+)(?: \([^)]*\))? (\w+) -> (\w+) after", self.log())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class ChunkServer:
    """A ``coldstart image serve`` process (a cache server or origin; SIGTERM, grace, SIGKILL on stop)."""

    def __init__(self, store: Path, upstream: str | None, log: Path, ready_timeout_s: float = 20.0) -> None:
        self.port = free_port()
        self.token = write_token(log.with_suffix(".token"))
        self.public_url = f"http://127.0.0.1:{self.port}"
        self.url = f"http://:{self.token}@127.0.0.1:{self.port}"  # the tier URL carries the server's token
        args = [sys.executable, "-m", "coldstart.imagefs.cli", "serve", "--store", str(store)]
        args += ["--port", str(self.port), "--token-file", str(log.with_suffix(".token"))]
        args += ["--upstream", upstream] if upstream else []
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chunk server exited: {log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.public_url}/healthz", timeout=1, trust_env=False).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"chunk server did not come up in {ready_timeout_s:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def vllm_missing() -> str | None:
    """Why the real vLLM cannot run here (None when it can). In CI its absence is an error, not a skip:
    ``.ci/setup`` installs it there."""
    from coldstart.engine_adapters.errors import EngineNotInstalled
    from coldstart.engine_adapters.registry import get_adapter

    try:
        get_adapter("vllm").check_installed()
    except EngineNotInstalled as exc:
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must run the real vLLM tests, but: {exc}") from exc
        return str(exc)
    return None


def needs_vllm() -> pytest.MarkDecorator:
    """Skip (with the reason) where no vLLM environment exists; never in CI."""
    missing = vllm_missing()
    return pytest.mark.skipif(missing is not None, reason=f"no vLLM environment: {missing}")


def bench_module(name: str) -> ModuleType:
    """``bench/NAME.py`` imported once (in ``sys.modules``: its dataclasses look their module up)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def needs_runsc() -> pytest.MarkDecorator:
    """Skip (with the probe's reason) where runsc does not work here."""
    from coldstart.launcher.checkpointers.runsc import RunscCheckpointer
    from coldstart.launcher.errors import CheckpointerUnavailable

    try:
        RunscCheckpointer().probe()
    except CheckpointerUnavailable as exc:
        return pytest.mark.skip(reason=f"runsc unavailable here: {exc}")
    return pytest.mark.skipif(False, reason="runsc works here")


def vllm_module_marks() -> list[pytest.MarkDecorator]:
    """``pytestmark`` of a module that boots the real vLLM: ``vllm``, ``slow``, and ``needs_vllm``."""
    return [pytest.mark.vllm, pytest.mark.slow, needs_vllm()]


def vllm_greedy_ids(served: Served, model: str, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    """Token ids and text of a greedy chat answer (vLLM's ``return_token_ids``, through the proxy)."""
    from openai import OpenAI

    with OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        answer = c.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
        )  # type: ignore[call-overload]
    choice = answer.model_dump()["choices"][0]
    return list(choice["token_ids"]), choice["message"]["content"] or ""


def ready_lines(served: Served, how: str) -> int:
    """Replicas of ``served`` that became ready by ``how`` (``cold_boot`` or ``restore``), from its log."""
    return len(re.findall(rf"-> ready after [\d.]+s how={how}\b", served.log()))
