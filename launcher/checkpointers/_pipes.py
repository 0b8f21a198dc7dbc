"""Helpers shared by the CRIU and runsc sandboxes: owned child processes whose output goes to a pipe we
create (so the write end can also be handed to a restored engine), and waiting with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from coldstart.launcher.process import OutputTail, die_with_launcher


class OwnedPipe:
    """A pipe whose read end feeds an ``OutputTail``; the write end goes to one or more children."""

    def __init__(self, name: str, log_path: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path  # a bounded copy of the output (``OutputTail``), path shown in boot errors
        self.read_fd, self.write_fd = os.pipe()
        self.tail: OutputTail | None = None
        self._transport: asyncio.BaseTransport | None = None

    async def start_reading(self) -> None:
        """Close our copy of the write end (children hold theirs) and start the tail."""
        self.close_write_end()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self.read_fd, "rb", 0)
        )
        self.tail = OutputTail(reader, self.name, log_path=self.log_path)

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def text(self, lines: int = 20) -> str:
        return self.tail.tail(lines) if self.tail else ""

    async def close(self) -> None:
        self.close_write_end()
        if self.tail is not None:
            await self.tail.close()
        if self._transport is not None:
            self._transport.close()
        elif self.read_fd >= 0 and self.tail is None:
            with contextlib.suppress(OSError):
                os.close(self.read_fd)
        self.read_fd = -1


async def exec_into(
    argv: Sequence[str],
    pipe: OwnedPipe,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    extra_fds: Sequence[int] = (),
) -> asyncio.subprocess.Process:
    """Start ``argv`` in its own session with stdout+stderr into ``pipe``."""
    return await asyncio.create_subprocess_exec(
        *die_with_launcher(argv, env),  # engines (and criu restore parents) die with the launcher
        stdin=asyncio.subprocess.DEVNULL,
        stdout=pipe.write_fd,
        stderr=pipe.write_fd,
        pass_fds=tuple(extra_fds),
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


async def run_quiet(argv: Sequence[str], timeout_s: float = 120.0, cwd: str | None = None) -> tuple[int, str]:
    """Run a short command, return (status, stdout+stderr). Kills it (and reaps) on timeout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode(errors="replace")


async def wait_exit(proc: asyncio.subprocess.Process, timeout_s: float) -> bool:
    """True if ``proc`` exited (and was reaped) within ``timeout_s``."""
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        return False
    return True


def kill_quietly(pid: int | None, sig: signal.Signals) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def first_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def log_errors(path: Path, limit: int = 8) -> str:
    """The last ``Error`` lines of a CRIU log (what a user needs to see), or its last lines."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    return "\n".join((errors or lines)[-limit:])
