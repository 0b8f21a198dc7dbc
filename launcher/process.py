"""Owned child processes: output captured through a pipe we hold, a tail kept for error messages, and a
stop that always reaps (SIGTERM to the process group, grace period, SIGKILL).

Why a pipe and not a log file: CRIU refuses to restore a process whose open log file grew after the dump
(this-machine.md), and a pipe also lets the launcher show the last lines when an engine dies during boot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import logging
import os
import random
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

log = logging.getLogger("coldstart.engine")


class OutputTail:
    """Reads a stream line by line into a bounded buffer (and the debug log) until EOF."""

    def __init__(self, stream: asyncio.StreamReader, prefix: str, max_lines: int = 200) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._prefix = prefix
        self._task = asyncio.create_task(self._pump(stream), name=f"tail {prefix}")

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit: take what is buffered
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self._lines.append(line)
            log.debug("%s | %s", self._prefix, line)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._lines)[-lines:])

    async def close(self, drain_s: float = 1.0) -> None:
        """Read what is left until EOF (the process has exited), at most ``drain_s``, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), drain_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> Callable[[], None]:
    """A ``preexec_fn``: the child is SIGKILLed when the launcher dies, even by SIGKILL (``prctl
    PR_SET_PDEATHSIG``, kept across exec). Engines must not outlive the launcher that owns them: nothing
    else would stop them, and they would keep their GPU. Children that re-parent further pass it on
    (``unshare --kill-child``; a CRIU-restored engine gets back the death signal it had at dump time)."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl: nobody would send the signal
            os._exit(1)

    return preexec


async def spawn(
    argv: list[str], env: dict[str, str] | None, cwd: str | None, name: str
) -> tuple[asyncio.subprocess.Process, OutputTail]:
    """Start ``argv`` in a new session (its own process group) with stdout+stderr into one pipe."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=die_with_launcher(),
        limit=1 << 20,
    )
    assert proc.stdout is not None  # guaranteed by stdout=PIPE
    return proc, OutputTail(proc.stdout, name)


async def terminate(proc: asyncio.subprocess.Process, grace_s: float) -> int:
    """SIGTERM the process group, wait ``grace_s``, then SIGKILL it; always reap. Returns the exit status."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    # Children that outlived the leader still belong to the group: make sure none is left.
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode if proc.returncode is not None else -1


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the engine binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_pair(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A free port whose next port is free too: engines using snapshot_hooks listen for the launcher's
    control calls on engine port + 1. Picked below the kernel's ephemeral range, so outgoing connections
    (which take ephemeral ports) cannot grab either port between this pick and the engine's bind."""
    low, _ = _ephemeral_range()
    for _ in range(attempts):
        # Below the ephemeral range where there is room for it, else any free port.
        port = random.randrange(max(1024, low - 12000), low - 1) if low > 2048 else free_port(host)
        if port_is_free(host, port) and port_is_free(host, port + 1):
            return port
    raise OSError(f"no two adjacent free ports found on {host} after {attempts} tries")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (breadth first), from /proc/PID/task/TID/children."""
    seen: list[int] = []
    queue = [root]
    while queue:
        pid = queue.pop(0)
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.append(pid)
        try:
            tids = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for tid in tids:
            try:
                queue += [int(c) for c in (tid / "children").read_text().split()]
            except OSError:
                continue
    return seen


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.asynccontextmanager
async def host_lock(path: Path) -> AsyncIterator[None]:
    """A host-wide exclusive lock (flock on ``path``), waited for in a thread; released on exit (also when
    the process dies: the kernel drops the flock with the fd)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
