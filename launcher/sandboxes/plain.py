"""The simplest sandbox: the engine as a host process group on a loopback port. No snapshots."""

from __future__ import annotations

import asyncio
import os

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.process import OutputTail, free_port_pair, spawn, terminate
from coldstart.launcher.sandboxes.base import Sandbox


class PlainSandbox(Sandbox):
    def __init__(self, name: str, host: str = "127.0.0.1", port: int | None = None) -> None:
        self._name = name
        self._host = host
        self._port = port or free_port_pair(host)  # engine port, and + 1 for the hooks channel
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: OutputTail | None = None

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

    async def start(self, spec: LaunchSpec) -> None:
        env = {**os.environ, **spec.env}
        self._proc, self._tail = await spawn(spec.argv, env, spec.cwd, self._name)

    def exit_code(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def log_tail(self, lines: int = 20) -> str:
        return self._tail.tail(lines) if self._tail else ""

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._proc is not None:
            await terminate(self._proc, grace_s)
        if self._tail is not None:
            await self._tail.close()
