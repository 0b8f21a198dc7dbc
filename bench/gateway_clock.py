"""The end-to-end clock through the real gateway: ``coldstart-serve`` started as a user starts it, a request
sent while it has no replica, and the split of that request's time read back from its ``/metrics``
(``coldstart_phase_seconds``: image_mount, pull, verify, checkpointer_restore, wake, canary, first_token;
``coldstart_image_fetched_bytes``). Used by ``bench/startup.py --gateway`` and ``bench/lazy_root.py
--engine vllm``; nothing here is timed by the benchmark except the client's own request -> first token.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

# The order of the clock: the mount happens once, when the launcher starts; the rest per request at zero.
PHASES = ("image_mount", "pull", "verify", "checkpointer_restore", "wake", "canary", "first_token")
PROMPT = [{"role": "user", "content": "Tell me about snapshots."}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Launcher:
    """A ``coldstart-serve ENGINE MODEL ...`` process on a free port; ``stop`` sends SIGTERM and waits."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coldstart.launcher.cli.serve",
                *args[:2],
                "--port",
                str(self.port),
                *args[2:],
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/health", timeout=5).json())

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> float:
        """Seconds since the launcher started when ``predicate(/health)`` first held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coldstart-serve exited {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if predicate(self.health()):
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"timed out waiting for {what}: {self.log()[-3000:]}")

    def wait_ready(self, timeout: float = 900.0) -> float:
        return self.wait_for(lambda h: bool(h["ready"]), timeout, "a ready replica")

    def wait_zero(self, timeout: float = 300.0) -> None:
        self.wait_for(lambda h: h["replicas"] == [], timeout, "scale to zero")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def first_token(self, model: str, timeout: float = 900.0) -> float:
        """Seconds from sending a streamed greedy 1-token chat to its first token (content or finish)."""
        body = {"model": model, "messages": PROMPT, "max_tokens": 1, "temperature": 0, "stream": True}
        started = time.monotonic()
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=timeout) as answer:
            answer.raise_for_status()
            for line in answer.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                if choice.get("delta", {}).get("content") or choice.get("finish_reason"):
                    return time.monotonic() - started
        raise RuntimeError("the stream ended without a token")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


def phase_totals(text: str, model: str) -> dict[str, tuple[float, float]]:
    """phase -> (count, sum of seconds) of ``coldstart_phase_seconds`` for ``model``."""
    out: dict[str, tuple[float, float]] = {}
    for phase in PHASES:
        values = []
        for kind in ("count", "sum"):
            found = re.search(
                rf'^coldstart_phase_seconds_{kind}{{model="{re.escape(model)}",phase="{phase}"}} (\S+)$',
                text,
                re.MULTILINE,
            )
            values.append(float(found.group(1)) if found else 0.0)
        out[phase] = (values[0], values[1])
    return out


def gauge(text: str, name: str, model: str) -> float | None:
    found = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def split(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The seconds each phase took between two reads of /metrics (phases not observed in between left out)."""
    return {
        phase: after[phase][1] - before[phase][1] for phase in PHASES if after[phase][0] > before[phase][0]
    }


def request_at_zero(launcher: Launcher, model: str) -> dict[str, float]:
    """One streamed request sent while the launcher has no replica: its phases from /metrics, plus
    ``client`` (the client's request -> first token). Waits for the scale to zero afterwards."""
    before = phase_totals(launcher.metrics(), model)
    client = launcher.first_token(model)
    after = phase_totals(launcher.metrics(), model)
    timing = split(before, after)
    timing["client"] = client
    launcher.wait_zero()
    return timing
