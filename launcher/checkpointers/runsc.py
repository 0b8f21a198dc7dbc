"""runsc (gVisor) checkpointer: the engine runs in a gVisor sandbox with its own network namespace.

Bundle: an OCI ``config.json`` the launcher writes per replica. Root is the host's ``/`` under
``--overlay2=root:memory``: the engine sees the host's files (its venv, the model) read-only through the
gofer and every write lands in sandbox memory (checkpointed with it), never on the host. The network
namespace is the replica's (``launcher/sandboxes/netns.py``); runsc takes its veth into its own network
stack, so the engine listens on 0.0.0.0:8000 there and the launcher reaches it at the replica's address.

Commands (global flags must match between run, checkpoint and restore, so they are recorded):
    run:         runsc <globals> run --bundle B ID                (foreground: the launcher owns it)
    checkpoint:  runsc <globals> checkpoint --image-path D [--leave-running] [--compression=none] ID
    restore:     runsc <globals> create --bundle B' ID2 ; runsc <globals> restore --image-path D ID2
Flags are probed from the installed runsc (``--compression`` and ``restore --direct`` appeared in 2024).
Platform: systrap (ptrace works too; kvm hangs in nested virtualisation here).

gVisor refuses to save open TCP connections (and leaves the container stopped): before checkpointing, we
wait until the sandbox's /proc/net/tcp shows only listeners; where runsc has ``--net-disconnect-ok`` it is
set too, so a straggler is cut instead of failing the snapshot. Host networking cannot be checkpointed.

``--direct`` (O_DIRECT) is off by default: no gain measured here and O_DIRECT fails on tmpfs.
The root-netns check quirk of this kernel is worked around in ``runsc_rootns_quirk.py``.

Image root (``--snapshot runsc --image INDEX`` with an image that holds a root filesystem, i.e. a
top-level ``usr/``): ``root.path`` is the launcher's read-only FUSE mount of the image
(``launcher/image.py``) instead of the host's ``/``, still under ``--overlay2=root:memory``, so a container
starts with only the index on the host and its files are fetched as the engine opens them. Paths under the
mount point in the engine's argv, env and cwd (``{image}/srv/engine.py``) are rewritten to their place in
the container (``/srv/engine.py``); other paths (``python3``) resolve inside the image, with a fixed PATH
and no host environment. The image needs ``cat`` (the drain before a checkpoint runs it inside). The gofer
serves the FUSE mount as is: runsc runs as root, the mount's owner (imagefs adds ``allow_other`` when
root; a mount without it, ``user_id=0,default_permissions``, was tried and works too). A checkpoint
records which root it ran on; a restore needs the same kind (the image digest is in the snapshot identity)
and gets this launcher's mount point as root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.checkpointers import runsc_rootns_quirk
from coldstart.launcher.checkpointers._pipes import (
    OwnedPipe,
    exec_into,
    kill_quietly,
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
    UsageError,
)
from coldstart.launcher.process import OutputTail
from coldstart.launcher.sandboxes.base import NetnsSandbox, Sandbox
from coldstart.launcher.sandboxes.netns import NetNamespace, create_netns

log = logging.getLogger("coldstart.runsc")

ENGINE_PORT = NetnsSandbox.ENGINE_PORT
RUNSC_ROOT = Path("/run/coldstart/runsc")
SIDECAR = "coldstart-runsc.json"  # the OCI spec and global flags the image was taken with
_TCP_LISTEN = "0A"


def _container_id(replica_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", replica_id)[:40]
    return f"cs-{os.getpid()}-{safe}-{secrets.token_hex(3)}"


LAUNCHER_DIRS_IN_ROOT = "/coldstart"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def in_root(value: str, root: Path) -> str:
    """``value`` with the host path of an image root (``/run/x/image/srv/e.py``) as seen inside the
    container (``/srv/e.py``); anything else unchanged."""
    where = str(root).rstrip("/")
    if value == where:
        return "/"
    return value.replace(where + "/", "/")


def launcher_dirs_in(root: Path, spec: LaunchSpec) -> dict[str, str]:
    """Where coldstart's own folders (``spec.launcher_dirs``) are mounted in an image root:
    ``/coldstart/NAME``. runsc's gofer cannot make a mount point in the read-only image, so the image holds
    these empty folders (``bench/vllm_rootfs.py`` makes them); a clear error names the ones it lacks."""
    ours = {d: f"{LAUNCHER_DIRS_IN_ROOT}/{Path(d).name}" for d in spec.launcher_dirs}
    missing = [inside for inside in ours.values() if not (root / inside.lstrip("/")).is_dir()]
    if missing:
        raise UsageError(
            f"the image mounted at {root} is a root filesystem without the empty folder(s) "
            f"{', '.join(missing)} where the launcher mounts its own files for the engine: add them to the "
            "image and rebuild it"
        )
    return ours


def _inside(value: str, root: Path, ours: dict[str, str]) -> str:
    """``value`` as seen in the container: under the image root (``in_root``) or in coldstart's folders."""
    for host, inside in ours.items():
        value = value.replace(host.rstrip("/") + "/", inside + "/")
        value = inside if value == host else value
    return in_root(value, root)


def oci_spec(spec: LaunchSpec, netns_path: str, root: Path | None = None) -> dict[str, Any]:
    binds: list[dict[str, Any]] = []
    if root is None:  # the host's files: its environment makes sense inside
        env = {**os.environ, **spec.env}
        argv, cwd = list(spec.argv), spec.cwd or "/"
    else:  # the image's files only: host variables (venvs, PATH entries) would point at nothing
        ours = launcher_dirs_in(root, spec)
        env = {
            "PATH": IMAGE_PATH,
            "LANG": "C.UTF-8",
            **{k: _inside(v, root, ours) for k, v in spec.env.items()},
        }
        argv, cwd = [_inside(a, root, ours) for a in spec.argv], in_root(spec.cwd or str(root), root)
        binds = [
            {"destination": d, "type": "bind", "source": h, "options": ["rbind", "ro"]}
            for h, d in ours.items()
        ]
    env.setdefault("HOME", "/root")
    return {
        "ociVersion": "1.0.0",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": argv,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 65536, "soft": 65536}],
        },
        # The host root or the image's mount, writable only through the in-memory overlay
        # (--overlay2=root:memory).
        "root": {"path": str(root or "/"), "readonly": False},
        "hostname": "coldstart",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            *binds,
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": netns_path},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ]
        },
    }


def _with_netns(config: dict[str, Any], netns_path: str, root: Path | None = None) -> dict[str, Any]:
    """The recorded spec with this replica's namespace and this launcher's root (the image's mount
    point may differ from the one the checkpoint was taken on; its contents may not)."""
    config = json.loads(json.dumps(config))
    for ns in config["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = netns_path
    config["root"]["path"] = str(root or "/")
    return config


def root_kind(root: Path | None) -> str:
    return "host" if root is None else "image"


def tcp_states(proc_net_tcp: str) -> list[str]:
    """The state column of /proc/net/tcp{,6} lines (hex, ``0A`` = LISTEN)."""
    states = []
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[0].rstrip(":").isdigit():
            states.append(fields[3])
    return states


class RunscSandbox(NetnsSandbox):
    def __init__(
        self, workdir: Path, replica_id: str, runsc: str, global_flags: list[str], root: Path | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.root = root  # the image's mount point, or None for the host's /
        self.replica_id = replica_id
        self.runsc = runsc
        self.global_flags = list(global_flags)
        self.container_id = _container_id(replica_id)
        self.netns: NetNamespace | None = None
        self.config: dict[str, Any] | None = None
        self._proc: asyncio.subprocess.Process | None = None  # runsc run, or runsc restore
        self._pipe: OwnedPipe | None = None
        self._created = False
        self._stopping: asyncio.Future[None] | None = None

    def runsc_argv(self, *args: str) -> list[str]:
        return runsc_rootns_quirk.wrap([self.runsc, *self.global_flags, *args])

    def _write_bundle(self, config: dict[str, Any]) -> Path:
        bundle = self.workdir / "bundle"
        bundle.mkdir(parents=True, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        self.config = config
        return bundle

    async def start(self, spec: LaunchSpec) -> None:
        if self._proc is not None:
            raise ReplicaStateError(f"replica {self.replica_id}: sandbox already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        RUNSC_ROOT.mkdir(parents=True, exist_ok=True)
        self.netns = await create_netns()
        bundle = self._write_bundle(oci_spec(spec, self.netns.path, self.root))
        self._pipe = OwnedPipe(f"engine {self.replica_id}", self.workdir / "engine.log")
        self._created = True
        self._proc = await exec_into(
            self.runsc_argv("run", "--bundle", str(bundle), self.container_id), self._pipe, cwd=str(bundle)
        )
        await self._pipe.start_reading()

    async def restore_from(self, image_dir: Path, sidecar: dict[str, Any], direct: bool) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        RUNSC_ROOT.mkdir(parents=True, exist_ok=True)
        self.netns = await create_netns()
        bundle = self._write_bundle(_with_netns(sidecar["config"], self.netns.path, self.root))
        self._pipe = OwnedPipe(f"engine {self.replica_id}", self.workdir / "engine.log")
        # `create` hands the container its stdio (our pipe) and exits; `restore` then stays in the
        # foreground until the container exits.
        self._created = True
        create = await exec_into(
            self.runsc_argv("create", "--bundle", str(bundle), self.container_id), self._pipe, cwd=str(bundle)
        )
        if await create.wait() != 0:
            self._pipe.close_write_end()
            raise RestoreFailed(
                RestoreReason.CHECKPOINTER,
                f"runsc create for replica {self.replica_id} failed ({create.returncode})",
            )
        restore = [
            "restore",
            "--image-path",
            str(image_dir),
            *(["--direct"] if direct else []),
            self.container_id,
        ]
        self._proc = await exec_into(self.runsc_argv(*restore), self._pipe, cwd=str(bundle))
        await self._pipe.start_reading()

    def exit_code(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def output(self) -> OutputTail | None:
        return self._pipe.tail if self._pipe else None

    def log_tail(self, lines: int = 20) -> str:
        return self._pipe.text(lines) if self._pipe else ""

    async def tcp_connections(self) -> list[str]:
        """States of every non-listening TCP socket inside the sandbox (via ``runsc exec``)."""
        status, out = await run_quiet(
            [
                self.runsc,
                *self.global_flags,
                "exec",
                self.container_id,
                "cat",
                "/proc/net/tcp",
                "/proc/net/tcp6",
            ],
            30.0,
        )
        if status != 0:
            raise SnapshotError(
                f"runsc exec in replica {self.replica_id} failed ({status}): {out.strip()[-300:]}"
            )
        return [s for s in tcp_states(out) if s != _TCP_LISTEN]

    async def stop(self, grace_s: float = 10.0) -> None:
        # One stop; a concurrent second caller waits for it (returning early while the first was still
        # tearing down left callers believing the namespace was gone).
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_now(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop_now(self, grace_s: float) -> None:
        proc = self._proc
        if self._created:
            if proc is not None and proc.returncode is None:
                await run_quiet([self.runsc, *self.global_flags, "kill", self.container_id, "TERM"], 30.0)
                if not await wait_exit(proc, grace_s):
                    await run_quiet([self.runsc, *self.global_flags, "kill", self.container_id, "KILL"], 30.0)
                    if not await wait_exit(proc, 10.0):
                        kill_quietly(proc.pid, signal.SIGKILL)
                        await wait_exit(proc, 10.0)
            await run_quiet([self.runsc, *self.global_flags, "delete", "-force", self.container_id], 60.0)
        if self._pipe is not None:
            await self._pipe.close()
        if self.netns is not None:
            await self.netns.adelete()


def cleanup_stale_containers(runsc: str = "runsc") -> list[str]:
    """Delete our containers (``cs-<launcher pid>-...``) whose launcher is gone; returns their IDs."""
    if not RUNSC_ROOT.is_dir():
        return []
    try:
        out = subprocess.run(
            [runsc, "--root", str(RUNSC_ROOT), "list", "-quiet"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    removed = []
    for cid in out.split():
        match = re.match(r"^cs-(\d+)-", cid)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(
                [runsc, "--root", str(RUNSC_ROOT), "delete", "-force", cid], capture_output=True, timeout=60
            )
            removed.append(cid)
    return removed


class RunscCheckpointer(Checkpointer):
    name: ClassVar[str] = "runsc"

    def __init__(
        self,
        binary: str | None = None,
        platform: str = "systrap",
        direct: bool = False,
        root: Path | None = None,
    ) -> None:
        self._binary = binary
        self.platform = platform
        self.direct = direct
        self._root = root
        self._info: CheckpointerInfo | None = None

    def root(self) -> Path | None:
        """The container root given at construction (a mounted root-filesystem image), else None (the
        host's /)."""
        return self._root

    @property
    def binary(self) -> str:
        found = self._binary or os.environ.get("COLDSTART_RUNSC") or shutil.which("runsc")
        if not found:
            raise CheckpointerUnavailable(
                "runsc is not installed: run .ci/install-checkpointers (bookworm-backports)"
            )
        return found

    def _help(self, *args: str) -> str:
        try:
            done = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CheckpointerUnavailable(f"runsc at {self.binary} does not run ({exc})") from exc
        return done.stdout + done.stderr

    def probe(self) -> CheckpointerInfo:
        if self._info is not None:
            return self._info
        if os.geteuid() != 0:
            raise CheckpointerUnavailable(
                "runsc checkpoint/restore needs root (rootless runsc cannot restore)"
            )
        for tool in ("unshare", "ip"):
            if shutil.which(tool) is None:
                raise CheckpointerUnavailable(f"{tool} is missing: apt-get install util-linux iproute2")
        match = re.search(r"runsc version (\S+)", self._help("--version"))
        if not match:
            raise CheckpointerUnavailable(f"runsc at {self.binary} printed no version")
        version = match.group(1).removeprefix("0.0~")
        caps = set()
        if "-compression" in self._help("checkpoint", "--help"):
            caps.add("compression")
        if "-direct" in self._help("restore", "--help"):
            caps.add("restore-direct")
        if "-net-disconnect-ok" in self._help("flags"):
            caps.add("net-disconnect-ok")
        caps.add(f"platform-{self.platform}")
        self._info = CheckpointerInfo(name=self.name, version=version, capabilities=frozenset(caps))
        return self._info

    def global_flags(self) -> list[str]:
        info = self.probe()
        flags = [
            "--root", str(RUNSC_ROOT), "--network", "sandbox", "--platform", self.platform,
            "--overlay2", "root:memory",
        ]  # fmt: skip
        if "net-disconnect-ok" in info.capabilities:
            flags.append("--net-disconnect-ok=true")
        return flags

    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox:
        return RunscSandbox(workdir, replica_id, self.binary, self.global_flags(), self.root())

    async def checkpoint(self, sandbox: Sandbox, image_dir: Path, *, leave_running: bool) -> None:
        if not isinstance(sandbox, RunscSandbox) or sandbox.config is None:
            raise SnapshotError(
                f"runsc can only checkpoint a started runsc sandbox, not {type(sandbox).__name__}"
            )
        await self._drain(sandbox)
        args = ["checkpoint", "--image-path", str(image_dir)]
        if leave_running:
            args.append("--leave-running")
        if "compression" in self.probe().capabilities:
            args.append("--compression=none")  # 5x larger, but restore reads it without inflating
        status, out = await run_quiet(sandbox.runsc_argv(*args, sandbox.container_id), 600.0)
        if status != 0:
            raise SnapshotError(
                f"runsc checkpoint of replica {sandbox.replica_id} failed ({status}): {out.strip()[-400:]}"
            )
        sidecar = {
            "config": sandbox.config,
            "global_flags": sandbox.global_flags,
            "root": root_kind(sandbox.root),
        }
        (image_dir / SIDECAR).write_text(json.dumps(sidecar))

    async def _drain(self, sandbox: RunscSandbox) -> None:
        """Wait until the engine holds no open or TIME_WAIT TCP connection (gVisor cannot save them).

        Idle keep-alive connections close by themselves within uvicorn's 5 s keep-alive timeout. Only
        after that, with ``--net-disconnect-ok``, runsc may cut what is left (a restored engine then
        holds a dead connection, which uvicorn drops on its first read).
        """
        cut_ok = "net-disconnect-ok" in self.probe().capabilities
        timeout_s = 15.0
        deadline = time.monotonic() + timeout_s
        while True:
            open_states = await sandbox.tcp_connections()
            if not open_states:
                return
            if time.monotonic() > deadline:
                if cut_ok:
                    log.warning("replica %s: %d TCP connections still open; runsc will cut them",
                                sandbox.replica_id, len(open_states))  # fmt: skip
                    return
                raise SnapshotError(
                    f"replica {sandbox.replica_id} still holds {len(open_states)} TCP connections after "
                    f"{timeout_s:.0f} s (states {sorted(set(open_states))}): gVisor cannot checkpoint them"
                )
            await asyncio.sleep(0.5)

    async def restore(self, image_dir: Path, workdir: Path, replica_id: str) -> Sandbox:
        image_dir = Path(image_dir)
        try:
            sidecar = json.loads((image_dir / SIDECAR).read_text())
        except (OSError, ValueError) as exc:
            raise RestoreFailed(
                RestoreReason.CHECKPOINTER, f"runsc image {image_dir} has no readable {SIDECAR}: {exc}"
            ) from exc
        flags = self.global_flags()
        if sidecar.get("global_flags") != flags:
            raise RestoreFailed(
                RestoreReason.GATE,
                f"runsc flags differ: image taken with {sidecar.get('global_flags')}, this host uses {flags}",
            )
        root = self.root()
        if sidecar.get("root", "host") != root_kind(root):
            raise RestoreFailed(
                RestoreReason.GATE,
                f"runsc image was taken on the {sidecar.get('root', 'host')} root, this launcher runs "
                f"containers on the {root_kind(root)} root",
            )
        sandbox = RunscSandbox(workdir, replica_id, self.binary, flags, root)
        direct = self.direct and "restore-direct" in self.probe().capabilities
        async with contextlib.AsyncExitStack() as undo:
            undo.push_async_callback(sandbox.stop, 1.0)
            await sandbox.restore_from(image_dir, sidecar, direct)
            undo.pop_all()  # restored: the caller owns the sandbox now
        return sandbox
