"""Owned child processes: output captured through a pipe we hold, a tail kept for error messages, and a
stop that always reaps (SIGTERM to the process group, grace period, SIGKILL).

Why a pipe and not a log file the engine writes: CRIU refuses to restore a process whose open log file grew
after the dump (this-machine.md), and a pipe also lets the launcher show the last lines when an engine dies
during boot. The launcher (not the engine) copies every line into a bounded log file in the replica's work
folder (``EngineLog``: ``engine.log``, rotated once to ``engine.log.1``), whose path boot errors print.

Why root-cause lines and not only the tail: vLLM's engine core dies with the reason ("ValueError: Available
memory on node 0 ... is less than desired CPU memory utilization") and the API server then prints a
traceback of 30-60 lines ending "Engine core initialization failed. See root cause above"; the last 20 lines
held only that. ``OutputTail`` keeps the first lines that look like a cause (``ROOT_CAUSE``: an exception
line, memory or allocation failures, argparse's "error:") from the whole output, ranked by ``root_cause``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import resource
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

log = logging.getLogger("coldstart.engine")

# Lines that name why an engine failed, most telling first: (rank, pattern). Rank 0 = memory and
# allocation (what a user must change on the host or in the flags), 1 = an exception line
# ("ValueError: ..."), 2 = argparse's usage error and other lines that say "error". Secondary lines
# ("See root cause above", the traceback header) are left out.
ROOT_CAUSE: tuple[tuple[int, re.Pattern[str]], ...] = (
    (
        0,
        re.compile(
            r"out of memory|OutOfMemory|MemoryError|Cannot allocate memory|less than desired|"
            r"not enough memory|insufficient memory|failed to allocate|allocation failed|oom-kill",
            re.IGNORECASE,
        ),
    ),
    (1, re.compile(r"\b[A-Z]\w*(?:Error|Exception|Exit)\b(?::|$)")),
    (2, re.compile(r"\berror:|\bFatal\b|No such file or directory|unrecognized arguments")),
)
SECONDARY = re.compile(
    r"See root cause above|Traceback \(most recent call last\)|\bFile \"[^\"]*\", line \d+"
    # a warning is not why an engine failed (vLLM warns "... like `OSError: [Errno 24] Too many open
    # files`" about a low ulimit on every start): its log levels below ERROR, vLLM's format and Python's
    r"|^(?:\(\S+ pid=\d+\)\s+)?(?:DEBUG|INFO|WARNING)\s+\d\d-\d\d |^(?:DEBUG|INFO|WARNING):"
)
# vLLM's log prefix: "(EngineCore pid=42) ERROR 11-27 10:00:09 [core.py:700] "
LOG_PREFIX = re.compile(
    r"^(?:\(\S+ pid=\d+\)\s+)?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+"
    r"\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+\[[^\]]*\]\s*"
)
MAX_CAUSE_LINES = 40


def root_cause_rank(line: str) -> int | None:
    """The rank of ``line`` as a root-cause line (lower is more telling), None when it is not one."""
    if SECONDARY.search(line):
        return None
    for rank, pattern in ROOT_CAUSE:
        if pattern.search(line):
            return rank
    return None


def one_line_cause(lines: Iterable[str], max_chars: int = 400) -> str:
    """The single most telling line (the first of the best rank), without a log prefix; "" if none."""
    best = root_cause(lines, limit=1)
    return LOG_PREFIX.sub("", best[0])[:max_chars] if best else ""


def root_cause(lines: Iterable[str], limit: int = 6) -> list[str]:
    """The most telling lines of an engine's output, in output order: every line of the best rank seen,
    then the next ranks, at most ``limit`` lines."""
    ranked = [(r, i, ln.strip()) for i, ln in enumerate(lines) if (r := root_cause_rank(ln)) is not None]
    picked = sorted(sorted(ranked)[:limit], key=lambda t: t[1])
    return [ln for _, _, ln in picked]


class EngineLog:
    """A bounded copy of an engine's output in a file the launcher owns (0600): ``max_bytes`` in
    ``path``, the previous ``max_bytes`` in ``path.1``."""

    def __init__(self, path: Path, max_bytes: int = 8 << 20) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")  # noqa: SIM115
        self._size = self._file.tell()

    def write(self, line: bytes) -> None:
        if self._size + len(line) > self.max_bytes:
            self._file.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._file = open(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "ab")  # noqa: SIM115
            self._size = 0
        self._file.write(line)
        self._file.flush()
        self._size += len(line)

    def close(self) -> None:
        self._file.close()


class OutputTail:
    """Reads a stream line by line until EOF into a bounded buffer, the debug log, the root-cause lines
    (``root_cause``) and, given ``log_path``, a bounded log file (``EngineLog``)."""

    def __init__(
        self,
        stream: asyncio.StreamReader,
        prefix: str,
        max_lines: int = 200,
        log_path: Path | None = None,
    ) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._causes: list[str] = []  # the first MAX_CAUSE_LINES root-cause lines of the whole output
        self._prefix = prefix
        self.log_path = log_path
        self._log: EngineLog | None = None
        if log_path is not None:
            try:
                self._log = EngineLog(log_path)
            except OSError as exc:  # a log we cannot write must not stop the engine
                log.warning("engine output of %s not kept in %s: %s", prefix, log_path, exc)
                self.log_path = None
        self._task = asyncio.create_task(self._pump(stream), name=f"tail {prefix}")

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit: take what is buffered
                raw = await stream.read(65536)
            if not raw:
                if self._log is not None:
                    self._log.close()
                    self._log = None
                return
            if self._log is not None:
                try:
                    self._log.write(raw)
                except OSError as exc:
                    log.warning(
                        "engine output of %s no longer kept in %s: %s", self._prefix, self.log_path, exc
                    )
                    self._log.close()
                    self._log = None
            line = raw.decode(errors="replace").rstrip()
            self._lines.append(line)
            if len(self._causes) < MAX_CAUSE_LINES and root_cause_rank(line) is not None:
                self._causes.append(line)
            log.debug("%s | %s", self._prefix, line)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._lines)[-lines:])

    def root_cause(self, limit: int = 6) -> list[str]:
        """The most telling lines of the whole output so far (``root_cause``), in output order."""
        return root_cause(self._causes, limit)

    async def wait_eof(self, timeout_s: float) -> bool:
        """Wait until the stream ended (every line read), at most ``timeout_s``; True if it did."""
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self, drain_s: float = 1.0) -> None:
        """Read what is left until EOF (the process has exited), at most ``drain_s``, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), drain_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._log is not None:
            self._log.close()
            self._log = None


# The exec shim that makes a child die with the launcher. ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` must run in
# the child between fork and exec; ``subprocess``'s ``preexec_fn`` would do it there, but CPython documents
# ``preexec_fn`` as unsafe in a process with threads (the launcher has them: ``asyncio.to_thread``, the
# GPU helper), since the forked child may deadlock on a lock another thread held. So the child execs this
# small interpreter instead (``-I -S``: no site, no user paths; ~10 ms), which sets the death signal, checks
# the launcher is still its parent (else nobody would send it), and execs the real program in place (same
# PID). The death signal survives exec (not set-uid programs). Rejected: util-linux ``setpriv --pdeathsig``
# (no parent check: a launcher dying before the prctl leaves an orphan).
DEATHSIG_SHIM = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1,9,0,0,0)\n"  # PR_SET_PDEATHSIG, SIGKILL
    "if os.getppid()!=int(sys.argv[1]):os._exit(1)\n"
    "os.execv(sys.argv[2],sys.argv[3:])"
)


def die_with_launcher(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` wrapped in the exec shim (``DEATHSIG_SHIM``): the child is SIGKILLed when the launcher
    dies, even by SIGKILL. Engines must not outlive the launcher that owns them: nothing else would stop
    them, and they would keep their GPU. Children that re-parent further pass it on (``unshare
    --kill-child``; a CRIU-restored engine gets back the death signal it had at dump time).

    The program is looked up here, on ``env``'s PATH as ``subprocess`` would: a missing one raises
    ``FileNotFoundError`` in the launcher, not an exit status from the shim."""
    program = argv[0]
    if os.sep not in program:
        found = shutil.which(program, path=(env if env is not None else os.environ).get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, f"No such file or directory: {program!r}", program)
        program = found
    elif not os.access(program, os.X_OK):
        raise FileNotFoundError(errno.ENOENT, f"No such file or directory: {program!r}", program)
    return [sys.executable, "-I", "-S", "-c", DEATHSIG_SHIM, str(os.getpid()), program, *argv]


async def spawn(
    argv: list[str], env: dict[str, str] | None, cwd: str | None, name: str, log_path: Path | None = None
) -> tuple[asyncio.subprocess.Process, OutputTail]:
    """Start ``argv`` in a new session (its own process group) with stdout+stderr into one pipe, kept in
    ``log_path`` too when given (``OutputTail``)."""
    proc = await asyncio.create_subprocess_exec(
        *die_with_launcher(argv, env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        limit=1 << 20,
    )
    assert proc.stdout is not None  # guaranteed by stdout=PIPE
    return proc, OutputTail(proc.stdout, name, log_path=log_path)


class PidHandle:
    """A process the launcher did not fork (a CRIU-restored engine, PID 1 of its namespace), held by a
    pidfd taken the moment its PID was learned: a signal sent through it reaches that process or nobody,
    never a later process that reused the number (``kill(pid)`` could). Our own children need none: an
    unreaped child's PID cannot be reused."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.pidfd_open(pid)
        except OSError:  # already gone: every signal is a no-op
            self._fd = -1

    def send(self, sig: signal.Signals) -> bool:
        """Signal the process; False when it has exited (or was gone when the handle was taken)."""
        if self._fd < 0:
            return False
        try:
            signal.pidfd_send_signal(self._fd, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def signal_listed(listing: Callable[[], Iterable[int]], sig: signal.Signals) -> list[int]:
    """Signal the processes ``listing`` names (those of a namespace, of a Ray node) that the launcher did not
    fork: a pidfd is taken for each, the listing is read again, and only a process in both is signalled,
    through its pidfd. One that exited and whose PID was reused in between is never hit. Returns the PIDs
    signalled."""
    handles = [PidHandle(pid) for pid in dict.fromkeys(listing())]
    try:
        still = set(listing())
        return [h.pid for h in handles if h.pid in still and h.send(sig)]
    finally:
        for handle in handles:
            handle.close()


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


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (capped by the kernel's ``nr_open``), once
    at start: with a soft limit of 1024, 2,000 idle client connections to the proxy made the launcher's
    health probes fail with EMFILE and healthy replicas were replaced. Returns (old soft, new soft);
    children (engines) inherit the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


LOCAL_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def is_local_exhaustion(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is this process running out of file
    descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the launcher's own failure, never evidence
    that an engine is unhealthy (a probe that fails so must not count as a miss)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in LOCAL_EXHAUSTION:
            return True
        current = current.__cause__ or current.__context__
    return False


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


def cpu_seconds(pids: Iterable[int]) -> float | None:
    """User + system CPU time the processes used so far (``/proc/PID/stat``); None when none is readable.
    A busy engine's total grows; a stopped or deadlocked one's does not."""
    ticks = 0
    found = False
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
            found = True
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _lock_fd(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """The one host-wide exclusive lock (flock on ``path``, created 0600), held while the block runs and
    released on exit (also when the process dies: the kernel drops the flock with the fd). Blocking: from
    async code use ``host_lock``."""
    fd = _lock_fd(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def host_lock(path: Path) -> AsyncIterator[None]:
    """``file_lock`` for async code: the flock is waited for in a thread."""
    fd = _lock_fd(path)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def resident_bytes(pids: Iterable[int]) -> int:
    """Resident memory of these processes (RSS summed; 0 when unreadable): what a replica needs on a host."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total
