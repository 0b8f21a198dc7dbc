"""The simplest sandbox: the engine as a host process group on a loopback port. No snapshots.

The engine dies with the launcher (``die_with_launcher``), and only root (the launcher) may connect to its
two loopback ports (``firewall.guard_loopback``) when the launcher runs as root."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.process import OutputTail, free_port_pair, spawn, terminate
from coldstart.launcher.sandboxes.base import Sandbox
from coldstart.launcher.sandboxes.firewall import guard_loopback, unguard_loopback


class PlainSandbox(Sandbox):
    def __init__(
        self, name: str, host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None
    ) -> None:
        self._name = name
        self._log_path = log_path  # a bounded copy of the engine's output (``process.EngineLog``)
        self._host = host
        self._port = port or free_port_pair(host)  # engine port, and + 1 for the hooks channel
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: OutputTail | None = None
        self._guarded = False
        self._stopping: asyncio.Future[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def bind_host(self) -> str:
        return self._host

    @property
    def bind_port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def host_pids(self) -> list[int]:
        from coldstart.launcher.process import process_tree

        return process_tree(self.pid) if self.pid else []

    async def start(self, spec: LaunchSpec) -> None:
        env = {**os.environ, **spec.env}
        if self._host in ("127.0.0.1", "localhost"):
            self._guarded = await asyncio.to_thread(guard_loopback, self._port)
        self._proc, self._tail = await spawn(spec.argv, env, spec.cwd, self._name, self._log_path)

    def exit_code(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def log_tail(self, lines: int = 20) -> str:
        return self._tail.tail(lines) if self._tail else ""

    def output(self) -> OutputTail | None:
        return self._tail

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._stopping is None:  # one stop; a concurrent second caller waits for it
            self._stopping = asyncio.ensure_future(self._stop_now(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop_now(self, grace_s: float) -> None:
        if self._proc is not None:
            await terminate(self._proc, grace_s)
        if self._tail is not None:
            await self._tail.close()
        if self._guarded:
            await asyncio.to_thread(unguard_loopback, self._port)
