"""Mount an image from any Python program: a FUSE daemon in a child process, owned by a context manager.

    with mounted(index, "/mnt/img", cache_dir, tiers=["/srv/store"]) as m:
        ...  # m.mountpoint is live; m.settings holds the tuning in effect
        m.save_profile()  # optional: the boot is over, write the profile now (m.boot_stats(): and stats)
    m.stats  # bytes per tier, chunks read (read at unmount)

The daemon runs trio in its own process, so an asyncio caller (the launcher) is untouched; call
``mounted`` from a worker thread there (``asyncio.to_thread``) if the ~0.3 s mount must not block the loop.
Unmount on exit, including on exceptions: SIGTERM the daemon (it unmounts and saves its profile), wait
``grace_s``, SIGKILL, reap; then, if the mount is somehow still there, ``fusermount3 -u -z``. Every step is
registered before it is taken (``ExitStack``), so a failure half-way through undoes what was done.

With ``hot_tree=True`` and a boot profile, the FUSE mount goes to ``lazy_root_for(mountpoint)`` and the
mount point shows the image's hot tree (``imagefs.hot_tree``), bound read-only; ``stop`` unbinds it first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from coldstart.imagefs.daemon import DEFAULT_MAX_BACKGROUND, DEFAULT_READ_AHEAD_KB, MountConfig
from coldstart.imagefs.errors import ImageError, MountError, UsageError
from coldstart.imagefs.fetcher import Fetcher
from coldstart.imagefs.hot_tree import HotTree, tree_path
from coldstart.imagefs.hot_tree import build as build_hot_tree
from coldstart.imagefs.index import ImageIndex
from coldstart.imagefs.profile import profile_path_for, read_profile

log = logging.getLogger("coldstart.imagefs")
LAZY_ROOTS = Path("/run/coldstart/imagefs-lazy")  # lazy mounts under a hot tree (tmpfs: gone at reboot)


class MountState(enum.Enum):
    STARTING = "starting"
    MOUNTED = "mounted"
    UNMOUNTED = "unmounted"
    FAILED = "failed"


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def is_mountpoint(path: str | Path) -> bool:
    """True when ``path`` is a mount point in this mount namespace (reads /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def force_unmount(path: str | Path) -> None:
    """Lazy-unmount ``path`` if it is mounted (a dead daemon's mount answers ENOTCONN to everything)."""
    if is_mountpoint(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
    if is_mountpoint(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
    if is_mountpoint(path):
        raise MountError(f"{path} is still mounted after fusermount3 -u -z; unmount it by hand")


class Mount:
    """A live mount owned by this process; use ``mounted`` rather than constructing it."""

    def __init__(
        self, config: MountConfig, log_path: Path, grace_s: float, mountpoint: Path | None = None
    ) -> None:
        self.config = config
        # Where the image is seen; the FUSE mount is at ``lazy_root``: the same place, or with a hot tree
        # (bound read-only at ``mountpoint``) a folder of its own the tree's symlinks point into.
        self.lazy_root = Path(config.mountpoint)
        self.mountpoint = mountpoint or self.lazy_root
        self.hot_tree: HotTree | None = None
        self.log_path = log_path
        self.grace_s = grace_s
        self.state = MountState.STARTING
        self.settings: dict[str, object] = {}
        self.digest = ""
        self.stats: dict[str, object] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _require(self, *states: MountState) -> None:
        if self.state not in states:
            raise MountError(f"cannot do that with the mount at {self.mountpoint} in state {self.state.name}")

    def start(self, timeout_s: float) -> None:
        self._require(MountState.STARTING)
        read_fd, write_fd = os.pipe()
        try:
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "coldstart.imagefs.daemon", self.config.to_json(), str(write_fd)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it in order
                )
        finally:
            os.close(write_fd)
        try:
            line = self._wait_ready(read_fd, timeout_s)
        finally:
            os.close(read_fd)
        ready = json.loads(line)
        self.settings = ready["settings"]
        self.digest = ready["digest"]
        self.state = MountState.MOUNTED

    def _wait_ready(self, read_fd: int, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                self.state = MountState.FAILED
                raise MountError(
                    f"mount of {self.mountpoint} not ready after {timeout_s:.0f} s; {self._tail()}"
                )
            ready, _, _ = select.select([read_fd], [], [], left)
            if ready:
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    self.state = MountState.FAILED
                    assert self._proc is not None
                    self._proc.wait(timeout=10)
                    raise MountError(f"image daemon exited before mounting {self.mountpoint}: {self._tail()}")
                buf += chunk
        return buf.decode()

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if " ERROR " in line or "Error:" in line or "error:" in line]
        return (errors or lines or ["empty log"])[-1].strip()

    def save_profile(self) -> None:
        """Write the boot profile now (the boot is over) and stop recording; the daemon also writes its
        stats so far (``boot_stats``)."""
        self._require(MountState.MOUNTED)
        assert self._proc is not None
        self._proc.send_signal(signal.SIGUSR1)

    def boot_stats(self, timeout_s: float = 10.0) -> dict[str, object]:
        """``save_profile``, then the daemon's stats as it wrote them (``remote_bytes``: what the boot
        fetched from beyond the local caches); {} when they did not come within ``timeout_s``."""
        stats_path = Path(self.config.stats_path) if self.config.stats_path else None
        if stats_path is None:
            return {}
        stats_path.unlink(missing_ok=True)
        self.save_profile()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.state is MountState.MOUNTED:
            with contextlib.suppress(OSError, ValueError):
                stats: dict[str, object] = json.loads(stats_path.read_text())  # written atomically
                return stats
            time.sleep(0.02)
        return {}

    def show(self, tree: HotTree | None) -> None:
        """Show ``tree`` (or, None, the lazy mount itself) at the mount point, read-only: a bind mount that
        ``stop`` unmounts first."""
        source = tree.path if tree is not None else self.lazy_root
        for argv in (
            ["mount", "--bind", str(source), str(self.mountpoint)],
            ["mount", "-o", "remount,bind,ro", str(self.mountpoint)],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                force_unmount(self.mountpoint)
                raise MountError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.returncode}")
        self.hot_tree = tree

    def stop(self) -> None:
        """Unbind what the mount point shows; SIGTERM, grace, SIGKILL, reap; then make sure nothing is left
        mounted. Idempotent."""
        if self.mountpoint != self.lazy_root:
            force_unmount(self.mountpoint)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        force_unmount(self.lazy_root)
        if self.config.stats_path:
            with contextlib.suppress(OSError, ValueError):
                self.stats = json.loads(Path(self.config.stats_path).read_text())
        if self.state is not MountState.FAILED:
            self.state = MountState.UNMOUNTED


@contextlib.contextmanager
def mounted(
    index_path: str | Path,
    mountpoint: str | Path,
    cache_dir: str | Path,
    tiers: Sequence[str],
    *,
    prefetch: bool = True,
    record_profile: bool = True,
    profile_path: str | Path | None = None,
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB,
    max_background: int = DEFAULT_MAX_BACKGROUND,
    memory_mib: int = 128,
    readahead_chunks: int = 16,
    timeout_s: float = 30.0,
    grace_s: float = 10.0,
    hot_tree: bool = False,
) -> Iterator[Mount]:
    """Mount ``index_path`` read-only at ``mountpoint`` until the block exits (see the module docstring).

    ``tiers`` are remote tiers nearest first, the origin last: store directories or ``http(s)://`` cache
    servers. ``cache_dir`` is the local disk cache (created if missing; daemon log and stats go there too).
    ``hot_tree`` (root only): once the image has a boot profile, what the boot reads is copied to local disk
    and shown at ``mountpoint`` with the rest linked into the lazy mount (``imagefs.hot_tree``); without a
    profile the mount records one as usual, for the next launch.
    """
    if not tiers:
        raise UsageError("mounted() needs at least one tier: the origin store (a directory or http URL)")
    mountpoint = Path(mountpoint)
    if not mountpoint.is_dir():
        raise UsageError(f"mount point {mountpoint} is not a directory; create it first")
    if is_mountpoint(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point; unmount it or pick another directory")
    index = ImageIndex.open(index_path)  # refuse a bad index here, with its own error, before any process
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    profile = (
        read_profile(profile_path or profile_path_for(index_path), index.digest)
        if hot_tree and prefetch and os.geteuid() == 0
        else []
    )
    lazy_root = lazy_root_for(mountpoint) if profile else mountpoint.resolve()
    if profile:
        force_unmount(lazy_root)  # a crashed launcher's mount of this mount point: ours, and dead
        lazy_root.mkdir(parents=True, exist_ok=True)
    config = MountConfig(
        index_path=str(Path(index_path).resolve()),
        mountpoint=str(lazy_root),
        cache_dir=str(cache.resolve()),
        tiers=tuple(str(t) for t in tiers),
        prefetch=prefetch and not profile,  # the hot tree's build fetches the profile
        record_profile=record_profile and not profile,  # it would see only what the tree does not hold
        profile_path=str(profile_path) if profile_path else None,
        read_ahead_kb=read_ahead_kb,
        max_background=max_background,
        memory_mib=memory_mib,
        readahead_chunks=readahead_chunks,
    )
    stats_path = cache / f"mount-{os.getpid()}-{id(config):x}.stats.json"
    config = replace(config, stats_path=str(stats_path))
    mount = Mount(config, cache / "daemon.log", grace_s, mountpoint.resolve())
    with contextlib.ExitStack() as undo:
        undo.callback(stats_path.unlink, missing_ok=True)
        undo.callback(mount.stop)
        mount.start(timeout_s)
        if profile:
            try:
                tree: HotTree | None = _build_hot_tree(index, profile, cache, tiers, lazy_root)
            except (ImageError, OSError) as exc:  # a full disk, an origin gone: the image stays lazy
                log.warning("hot tree of %s not built (%s): the image is served lazily", index_path, exc)
                tree = None
            mount.show(tree)
        yield mount


def lazy_root_for(mountpoint: str | Path) -> Path:
    """Where the FUSE mount goes when a hot tree is shown at ``mountpoint``: a folder named after the mount
    point alone, so a tree built by an earlier launch (its symlinks point here) and a CRIU snapshot (which
    maps files by path) find the same files at the next launch."""
    key = hashlib.sha256(str(Path(mountpoint).resolve()).encode()).hexdigest()[:16]
    return LAZY_ROOTS / key


def _build_hot_tree(
    index: ImageIndex, profile: list[str], cache: Path, tiers: Sequence[str], lazy_root: Path
) -> HotTree:
    fetcher = Fetcher.for_mount(cache, tiers, 64 << 20)
    try:
        tree = build_hot_tree(index, profile, fetcher, lazy_root, tree_path(cache, index, profile, lazy_root))
        tree = dataclasses.replace(tree, fetched=fetcher.remote_bytes())
    finally:
        fetcher.close()
    log.debug(  # the launcher logs it (launcher/image.py), with the image's name
        "hot tree %s: %d files (%.1f MB) local, %d links into %s, %s in %.2fs",
        tree.path, tree.files, tree.bytes / 1e6, tree.links, lazy_root, "built" if tree.built else "reused",
        tree.seconds,
    )  # fmt: skip
    return tree
