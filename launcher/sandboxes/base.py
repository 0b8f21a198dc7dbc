"""Where an engine process tree runs: the interface the replica lifecycle drives.

A sandbox owns one engine process tree from start (or restore) to reap. Kinds:
- ``PlainSandbox`` (``launcher/sandboxes/plain.py``): a host process group, loopback port; no snapshots.
- the CRIU sandbox: a process tree in its own PID and network namespace (``checkpointers/criu.py``);
- the runsc sandbox: a gVisor container with its own network namespace (``checkpointers/runsc.py``).

The engine's stdout/stderr always go to a pipe the launcher owns (never a file the engine holds open:
CRIU refuses to restore a file that grew since the dump), and the launcher keeps the tail for errors, the
root-cause lines and a bounded copy in the replica's ``engine.log`` (``process.OutputTail``).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.errors import ReplicaStateError
from coldstart.launcher.process import cpu_seconds

if TYPE_CHECKING:
    import httpx

    from coldstart.engine_adapters.base import EngineAdapter
    from coldstart.launcher.process import OutputTail
    from coldstart.launcher.sandboxes.netns import NetNamespace


class Sandbox(abc.ABC):
    """One engine process tree. Created by a ``Checkpointer`` (or directly, for ``PlainSandbox``)."""

    @property
    @abc.abstractmethod
    def base_url(self) -> str:
        """How the launcher reaches the engine's HTTP server, e.g. ``http://10.88.0.2:8000``."""

    @property
    @abc.abstractmethod
    def bind_host(self) -> str:
        """The address the engine must bind inside this sandbox (``127.0.0.1`` or ``0.0.0.0``)."""

    @property
    @abc.abstractmethod
    def bind_port(self) -> int:
        """The port the engine must bind inside this sandbox."""

    @abc.abstractmethod
    async def start(self, spec: LaunchSpec) -> None:
        """Start the engine cold. Returns once the process exists (not when it is healthy)."""

    @abc.abstractmethod
    def exit_code(self) -> int | None:
        """The engine's exit status once it has exited, else None (used to detect a crash during boot)."""

    @abc.abstractmethod
    def log_tail(self, lines: int = 20) -> str:
        """The last lines the engine printed (stdout and stderr together)."""

    def output(self) -> OutputTail | None:
        """The engine's captured output (root-cause lines, the path of its log file), None when this
        sandbox does not capture it or has not started."""
        return None

    @abc.abstractmethod
    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, wait ``grace_s``, SIGKILL, reap; release namespaces and mounts. Idempotent."""

    def host_pids(self) -> list[int]:
        """Host PIDs of the engine's process tree, root first (what the CUDA driver checkpoints); [] when
        not running or when the engine's processes are not host processes (gVisor)."""
        return []

    async def cpu_seconds(self) -> float | None:
        """CPU time the engine's process tree used so far; None when its processes are not host ones."""
        return cpu_seconds(self.host_pids())

    async def is_healthy(self, adapter: EngineAdapter, http: httpx.AsyncClient) -> bool:
        """``adapter``'s health probe of this engine: its /health, and its control channel if it has one."""
        return await adapter.is_healthy(http, self.base_url)


class NetnsSandbox(Sandbox):
    """A sandbox with its own network namespace (CRIU, runsc): the engine binds 0.0.0.0 on a fixed port
    inside it (several replicas restored from one snapshot never collide) and the launcher reaches it at
    the namespace's guest address. Subclasses set ``self.netns`` when they start or restore."""

    ENGINE_PORT = 8000

    replica_id: str
    netns: NetNamespace | None

    @property
    def base_url(self) -> str:
        if self.netns is None:
            raise ReplicaStateError(f"replica {self.replica_id}: sandbox not started, no address yet")
        return f"http://{self.netns.guest_ip}:{self.ENGINE_PORT}"

    @property
    def bind_host(self) -> str:
        return "0.0.0.0"  # 127.0.0.1 inside the namespace (or gVisor) is not reachable from the host

    @property
    def bind_port(self) -> int:
        return self.ENGINE_PORT
