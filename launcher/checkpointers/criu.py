"""CRIU checkpointer: the engine as a host process tree in its own PID, mount and network namespaces.

Start:    nsenter --net=<replica netns> unshare --pid --mount --propagation private --fork --kill-child --
              python -m ...criu_init -- ENGINE...
          ``criu_init`` (see that module) gives the replica a private /dev/shm and TMPDIR (tmpfs: they travel
          in the image, restored replicas never share a file, nothing is left on the host), its own /proc,
          unmounts what CRIU cannot dump, leads its own session (CRIU refuses a tree whose session leader
          lives outside its PID namespace), denies io_uring and AMX (``no_io_uring``: neither can be
          restored) and execs the engine, which is PID 1 of the new PID namespace. The network namespace is
          entered, not created by unshare: the launcher made it (``sandboxes/netns.py``).
Dump:     nsenter --net=<same netns> criu dump -t <engine host pid> DUMP_FLAGS [--leave-running]
          CRIU runs inside the engine's network namespace, so the namespace itself is not dumped (only
          the sockets); the PID and mount namespaces are (the target is their init).
Restore:  nsenter --net=<new replica netns> criu restore RESTORE_FLAGS --inherit-fd fd[N]:pipe:[INO]
          CRIU gives the restored tree a new PID and mount namespace (no "File exists" PID clash with the
          original or with other restored replicas) and our new netns; it stays in the foreground as the
          restored tree's parent, so the launcher owns it like any child and learns the exit status.

Output: the engine's stdout/stderr is a pipe the launcher owns. At restore the old pipe cannot come back,
so ``--inherit-fd`` hands CRIU a fresh pipe whose read end the launcher holds (a log file would break
restore as soon as it grew after the dump). Why each CRIU flag: next to DUMP_FLAGS below.

Upstream issues that decide the version: CRIU 3.17 fails on recent kernels (vDSO, checkpoint-restore/criu
#2532), 4.1 fails at dump on Linux >= 6.16 (socket options, #2705); 4.2 works (.ci/install-checkpointers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.checkpointers import criu_init
from coldstart.launcher.checkpointers._pipes import (
    OwnedPipe,
    exec_into,
    first_child,
    kill_quietly,
    log_errors,
    run_quiet,
    wait_exit,
)
from coldstart.launcher.checkpointers.base import Checkpointer, CheckpointerInfo
from coldstart.launcher.errors import (
    CheckpointerUnavailable,
    ReplicaStateError,
    RestoreFailed,
    RestoreReason,
    SnapshotError,
)
from coldstart.launcher.process import OutputTail, PidHandle, host_lock, process_tree
from coldstart.launcher.sandboxes.base import NetnsSandbox, Sandbox
from coldstart.launcher.sandboxes.netns import NetNamespace, create_netns

MIN_VERSION = (4, 2)
ENGINE_PORT = NetnsSandbox.ENGINE_PORT  # fixed inside every replica's own network namespace
RESTORE_LOCK = Path("/run/coldstart/criu-restore.lock")
SIDECAR = "coldstart-criu.json"  # which pipes the engine's fds 1/2 were, for --inherit-fd at restore
CRIU_CANDIDATES = ("/usr/local/sbin/criu", "/opt/coldstart/bin/criu")
# --tcp-established: loopback connections inside the replica's netns come back connected. vLLM's engine
# core holds torch.distributed (gloo) connections to itself; closed (--tcp-close) it dies at the first
# request ("EngineCore encountered an issue"). Connections to the launcher cannot come back (the restored
# netns has another address): the launcher keeps none open across a checkpoint (no keep-alive on its
# control and boot clients, as runsc requires too). --link-remap: files the engine holds open but has
# unlinked are linked back for the dump. --ext-unix-sk / --file-locks: multi-process engines hold unix
# sockets and flocks. --root /: the dumped mount namespace is a private copy of the host's, restored on
# the host's root (without it CRIU 4.2 hits "BUG at criu/mount.c:48").
DUMP_FLAGS = ("--tcp-established", "--link-remap", "--ext-unix-sk", "--file-locks")
RESTORE_FLAGS = ("--tcp-established", "--ext-unix-sk", "--file-locks", "--root", "/")


def libdir_args(plugin_dir: Path | None) -> list[str]:
    """CRIU's plugin folder on its command line (never through ``CRIU_LIBS_DIR`` in our environment)."""
    return ["--libdir", str(plugin_dir)] if plugin_dir is not None else []


def external_args(mounts: tuple[Path, ...], *, restore: bool) -> list[str]:
    """Host mounts the engine keeps (a FUSE image, which CRIU cannot dump): external at the dump
    (``mnt[PATH]:KEY``), the host's same mount bound back at restore (``mnt[KEY]:PATH``)."""
    out = []
    for i, path in enumerate(mounts):
        key = f"coldstart-mount-{i}"
        out += ["--external", f"mnt[{key}]:{path}" if restore else f"mnt[{path}]:{key}"]
    return out


def find_criu() -> str | None:
    explicit = os.environ.get("COLDSTART_CRIU")
    if explicit:
        return explicit
    for path in CRIU_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("criu")


def criu_version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CheckpointerUnavailable(
            f"criu at {binary} does not run ({exc}): run .ci/install-checkpointers"
        ) from exc
    match = re.search(r"Version:\s*(\d+(?:\.\d+)*)", out)
    if not match:
        raise CheckpointerUnavailable(f"criu at {binary} printed no version: run .ci/install-checkpointers")
    return tuple(int(p) for p in match.group(1).split("."))


@contextlib.asynccontextmanager
async def _restore_lock() -> AsyncIterator[None]:
    """One CRIU restore at a time on this host, until its tree is restored.

    Why: files the engine holds open but deleted (a POSIX semaphore ``/dev/shm/sem.*`` from Python's
    multiprocessing, for one) are "ghost files": CRIU re-creates each at its old path during restore and
    unlinks it again, so two restores of one image at the same moment fail with "Can't create ghost
    regfile: File exists". Holding the lock costs the second replica the first one's restore time (~0.3 s).
    """
    async with host_lock(RESTORE_LOCK):
        yield


class CriuSandbox(NetnsSandbox):
    """One engine tree in its own PID + network namespace; cold-started or restored by CRIU."""

    def __init__(
        self,
        workdir: Path,
        replica_id: str,
        criu: str,
        plugin_dir: Path | None = None,
        external_mounts: tuple[Path, ...] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.replica_id = replica_id
        self.criu = criu
        self.plugin_dir = plugin_dir  # CRIU --libdir (see Checkpointer.plugin_dir)
        self.external_mounts = external_mounts  # host mounts the engine keeps (an imagefs image)
        self.netns: NetNamespace | None = None
        self._proc: asyncio.subprocess.Process | None = None  # unshare (cold) or criu restore
        self._pipe: OwnedPipe | None = None
        self._engine_pid: int | None = None  # host PID of the engine (PID 1 of its namespace)
        self._engine: PidHandle | None = None  # the same, by pidfd: how it is signalled
        self._pidfile = self.workdir / "criu-restore.pid"
        self._restore_log: Path | None = None
        self._stopping: asyncio.Future[None] | None = None

    # -- addresses --------------------------------------------------------------------------------
    # -- processes --------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """Host PID of the engine (root of the tree), once known."""
        if self._engine_pid is None and self._restore_log is not None:
            try:
                self._engine_pid = int(self._pidfile.read_text().strip())
            except (OSError, ValueError):
                return None
            self._engine = PidHandle(self._engine_pid)
        return self._engine_pid

    def host_pids(self) -> list[int]:
        return process_tree(self.pid) if self.pid else []

    async def start(self, spec: LaunchSpec) -> None:
        if self._proc is not None:
            raise ReplicaStateError(f"replica {self.replica_id}: sandbox already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path(criu_init.PRIVATE_TMPDIR).mkdir(parents=True, exist_ok=True)
        self.netns = await create_netns()
        self._pipe = OwnedPipe(f"engine {self.replica_id}", self.workdir / "engine.log")
        argv = [
            *self.netns.enter_argv(),
            "unshare", "--pid", "--mount", "--propagation", "private", "--fork", "--kill-child", "--",
            *criu_init.argv_prefix(tuple(map(str, self.external_mounts))), *spec.argv,
        ]  # fmt: skip
        self._proc = await exec_into(argv, self._pipe, env={**os.environ, **spec.env}, cwd=spec.cwd)
        await self._pipe.start_reading()
        for _ in range(200):  # unshare forks the engine at once; wait until it is there (<< 1 s)
            self._engine_pid = first_child(self._proc.pid)
            if self._engine_pid:
                self._engine = PidHandle(self._engine_pid)
            if self._engine_pid or self._proc.returncode is not None:
                break
            await asyncio.sleep(0.005)

    async def restore_from(self, image_dir: Path) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path(criu_init.PRIVATE_TMPDIR).mkdir(parents=True, exist_ok=True)  # the restored tmpfs mounts here
        sidecar = json.loads((image_dir / SIDECAR).read_text())
        self.netns = await create_netns()
        self._pipe = OwnedPipe(f"engine {self.replica_id}", self.workdir / "engine.log")
        self._pidfile.unlink(missing_ok=True)
        self._restore_log = self.workdir / "criu-restore.log"
        # Every pipe the engine wrote to comes back as our fresh pipe.
        inherit = [
            arg
            for pipe_id in sidecar["pipes"]
            for arg in ("--inherit-fd", f"fd[{self._pipe.write_fd}]:{pipe_id}")
        ]
        # CRIU writes stats-restore into its images directory: give it a private directory of links so
        # the snapshot stays untouched (and several replicas can restore from it at once).
        images = self.workdir / "criu-images"
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir()
        for item in image_dir.iterdir():
            (images / item.name).symlink_to(item.resolve())
        argv = [
            *self.netns.enter_argv(), self.criu, "restore", "-D", str(images),
            "-o", str(self._restore_log), "-v2", *RESTORE_FLAGS, "--pidfile", str(self._pidfile), *inherit,
            *libdir_args(self.plugin_dir), *external_args(self.external_mounts, restore=True),
        ]  # fmt: skip
        async with _restore_lock():
            self._proc = await exec_into(argv, self._pipe, extra_fds=[self._pipe.write_fd])
            await self._pipe.start_reading()
            # CRIU writes the pidfile once the tree is restored (ghost files created and unlinked again).
            while self._proc.returncode is None and not self._pidfile.exists():
                await asyncio.sleep(0.005)

    def exit_code(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def output(self) -> OutputTail | None:
        return self._pipe.tail if self._pipe else None

    def log_tail(self, lines: int = 20) -> str:
        text = self._pipe.text(lines) if self._pipe else ""
        if self._restore_log is not None and self.exit_code() not in (None, 0):
            text = "\n".join(filter(None, [text, "criu restore: " + log_errors(self._restore_log)]))
        return text

    async def stop(self, grace_s: float = 10.0) -> None:
        # One stop; a concurrent second caller waits for it (returning early while the first was still
        # tearing down left callers believing the namespace was gone).
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_now(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop_now(self, grace_s: float) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            # The engine, not unshare/criu, gets SIGTERM; they exit when it does. PID 1 of a namespace
            # only sees signals it handles (uvicorn does); SIGKILL of PID 1 kills the whole namespace.
            self.pid  # noqa: B018 - learns the restored engine's PID (and pidfd) if not yet known
            engine = self._engine
            engine.send(signal.SIGTERM) if engine else kill_quietly(proc.pid, signal.SIGTERM)
            if not await wait_exit(proc, grace_s):
                if engine is not None:
                    engine.send(signal.SIGKILL)
                kill_quietly(proc.pid, signal.SIGKILL)  # our child, not reaped: its PID is still its own
                await wait_exit(proc, 10.0)
        if self._engine is not None:
            self._engine.close()
        if self._pipe is not None:
            await self._pipe.close()
        if self.netns is not None:
            await self.netns.adelete()


class CriuCheckpointer(Checkpointer):
    name: ClassVar[str] = "criu"

    def __init__(self, binary: str | None = None, external_mounts: tuple[Path, ...] = ()) -> None:
        self._binary = binary
        self._info: CheckpointerInfo | None = None
        # Host mounts the engine runs from (the deployment's imagefs image), given by snapshots_for:
        # kept in the replica's mount namespace, external to the dump, bound back at restore.
        self.external_mounts = external_mounts

    @property
    def binary(self) -> str:
        found = self._binary or find_criu()
        if not found:
            raise CheckpointerUnavailable(
                "criu is not installed: run .ci/install-checkpointers (CRIU >= 4.2)"
            )
        return found

    def probe(self) -> CheckpointerInfo:
        if self._info is not None:
            return self._info
        if os.geteuid() != 0:
            raise CheckpointerUnavailable(
                "criu needs root: run coldstart-serve as root or use --snapshot off"
            )
        for tool in ("nsenter", "unshare", "ip"):
            if shutil.which(tool) is None:
                raise CheckpointerUnavailable(f"{tool} is missing: apt-get install util-linux iproute2")
        version = criu_version(self.binary)
        if version < MIN_VERSION:
            raise CheckpointerUnavailable(
                f"criu {'.'.join(map(str, version))} at {self.binary} fails on this kernel (needs >= 4.2): "
                "run .ci/install-checkpointers"
            )
        self._info = CheckpointerInfo(
            name=self.name,
            version=".".join(map(str, version)),
            capabilities=frozenset({"leave-running", "pid-namespace", "net-namespace", "tcp-established"}),
        )
        return self._info

    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox:
        return CriuSandbox(workdir, replica_id, self.binary, self.plugin_dir, self.external_mounts)

    async def checkpoint(self, sandbox: Sandbox, image_dir: Path, *, leave_running: bool) -> None:
        if not isinstance(sandbox, CriuSandbox) or sandbox.netns is None or not sandbox.pid:
            raise SnapshotError(
                f"criu can only checkpoint a started CRIU sandbox, not {type(sandbox).__name__}"
            )
        if sandbox.exit_code() is not None:
            raise SnapshotError(
                f"replica {sandbox.replica_id}: engine exited ({sandbox.exit_code()}), nothing to dump"
            )
        pid = sandbox.pid
        pipes = sorted({os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)} - {"/dev/null"})
        if any(not p.startswith("pipe:") for p in pipes):
            raise SnapshotError(f"engine stdout/stderr must be pipes the launcher owns, found {pipes}")
        dump_log = sandbox.workdir / "criu-dump.log"
        argv = [
            *sandbox.netns.enter_argv(), sandbox.criu, "dump", "-t", str(pid), "-D", str(image_dir),
            "-o", str(dump_log), "-v2", *DUMP_FLAGS, *libdir_args(self.plugin_dir),
            *external_args(sandbox.external_mounts, restore=False),
        ]  # fmt: skip
        if leave_running:
            argv.append("--leave-running")
        status, out = await run_quiet(argv)
        if status != 0:
            detail = log_errors(dump_log) or out.strip()
            raise SnapshotError(f"criu dump of replica {sandbox.replica_id} failed ({status}): {detail}")
        (image_dir / SIDECAR).write_text(json.dumps({"pipes": pipes, "port": ENGINE_PORT}))

    async def restore(self, image_dir: Path, workdir: Path, replica_id: str) -> Sandbox:
        sandbox = CriuSandbox(workdir, replica_id, self.binary, self.plugin_dir, self.external_mounts)
        async with contextlib.AsyncExitStack() as undo:
            undo.push_async_callback(sandbox.stop, 1.0)
            try:
                await sandbox.restore_from(Path(image_dir))
            except (OSError, ValueError, KeyError) as exc:
                raise RestoreFailed(
                    RestoreReason.CHECKPOINTER, f"criu restore of {image_dir} could not start: {exc}"
                ) from exc
            undo.pop_all()  # restored: the caller owns the sandbox now
        return sandbox
