"""The FUSE daemon: mounts one image, serves it with trio until SIGINT/SIGTERM or an external unmount.

Runs in its own process (``python -m coldstart.imagefs.daemon CONFIG_JSON``, started by ``mount.mounted``)
or in the foreground (``coldstart image mount``), so the launcher's asyncio loop never meets trio.

Lifecycle: verify the index -> ``pyfuse3.init`` (mount) -> serve -> tune the mount once the kernel's INIT
is answered (``stat`` of the root blocks until then; tuning earlier is overwritten by INIT) -> report
ready (one JSON line on ``--ready-fd``) -> prefetch the boot profile in the background -> on SIGINT/SIGTERM
or unmount: stop, ``pyfuse3.close(unmount=True)``, save the boot profile, write stats. SIGUSR1 saves the
profile now, stops recording and writes the stats so far (the launcher sends it when the engine is healthy:
the boot is over, and what it fetched is known).

Tuning (reported in the ready line and ``Mount.settings``):
- requests of up to 1 MiB: libfuse negotiates max_pages from its 1 MiB buffer (``max_pages_limit`` is 256
  pages here); the largest read seen is reported as ``max_request_bytes`` in the stats;
- ``read_ahead_kb`` on the mount's bdi (``/sys/class/bdi/0:N``): kernel default 128, DEFAULT_READ_AHEAD_KB;
- ``max_background`` (and ``congestion_threshold`` = 3/4 of it) via fusectl, mounted at
  ``/sys/fs/fuse/connections`` if it is not (kernel default 12): more read-ahead requests in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyfuse3
import trio

from coldstart.imagefs.errors import ChunkUnavailable, ImageError, MountError
from coldstart.imagefs.fetcher import Fetcher
from coldstart.imagefs.fs import ImageFS
from coldstart.imagefs.index import ImageIndex
from coldstart.imagefs.profile import Recorder, profile_path_for, read_profile, write_profile
from coldstart.imagefs.store import write_atomic

log = logging.getLogger("coldstart.imagefs")

# Measured by bench/imagefs.py (see the issue note). Larger kernel read-ahead speeds sequential reads from
# memory (1 GB/s at 256 KiB, ~1.5-2 GB/s at 1-4 MiB here) but also widens mmap read-around, which fetches
# more of a lazily read shared library: `import torch` fetched 14.9% of the venv image at 256 KiB, 16.6% at
# 1 MiB. Sequential readers get the imagefs read-ahead (fs.py) instead, so the kernel's stays at one chunk.
DEFAULT_READ_AHEAD_KB = 256
DEFAULT_MAX_BACKGROUND = 64
FUSECTL = Path("/sys/fs/fuse/connections")


@dataclass(frozen=True)
class MountConfig:
    """Everything one mount needs; JSON round-trips to the daemon process."""

    index_path: str
    mountpoint: str
    cache_dir: str
    tiers: tuple[str, ...]
    prefetch: bool = True
    record_profile: bool = True
    profile_path: str | None = None  # default: INDEX.profile
    stats_path: str | None = None  # JSON written at exit (bytes per tier, chunks read)
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB
    max_background: int = DEFAULT_MAX_BACKGROUND
    memory_mib: int = 128  # chunks between read-ahead and the kernel; the page cache keeps file data
    fetch_threads: int = 16
    prefetch_threads: int = 2  # on 2 busy cores, more prefetch threads slow the boot they serve
    readahead_chunks: int = 16  # most chunks fetched ahead of a sequential reader (0: none)
    extra_options: tuple[str, ...] = field(default_factory=tuple)

    @property
    def profile(self) -> Path:
        return Path(self.profile_path) if self.profile_path else profile_path_for(self.index_path)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MountConfig:
        data = json.loads(text)
        data["tiers"] = tuple(data["tiers"])
        data["extra_options"] = tuple(data.get("extra_options", ()))
        return cls(**data)


def _is_mounted(path: str, fstype: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [path, fstype] for line in f)


def tune(mountpoint: str, read_ahead_kb: int, max_background: int) -> dict[str, object]:
    """Apply read-ahead and background limits to a live mount; returns what is now in effect."""
    st = os.stat(mountpoint)  # blocks until the kernel's INIT has been answered
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    settings: dict[str, object] = {"bdi": f"{major}:{minor}"}
    ra = Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb")
    try:
        ra.write_text(str(read_ahead_kb))
        settings["read_ahead_kb"] = int(ra.read_text())
    except OSError as exc:
        log.warning("cannot set read_ahead_kb on %s: %s", ra, exc)
        settings["read_ahead_kb"] = None
    try:
        if not _is_mounted(str(FUSECTL), "fusectl") and os.geteuid() == 0:
            subprocess.run(
                ["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], check=True, capture_output=True
            )
            log.info("mounted fusectl at %s to tune max_background", FUSECTL)
        conn = FUSECTL / str((major << 20) | minor)
        (conn / "max_background").write_text(str(max_background))
        (conn / "congestion_threshold").write_text(str(max(1, max_background * 3 // 4)))
        settings["max_background"] = int((conn / "max_background").read_text())
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning("cannot set max_background through fusectl: %s", exc)
        settings["max_background"] = None
    try:
        settings["max_pages_limit"] = int(Path("/proc/sys/fs/fuse/max_pages_limit").read_text())
    except OSError:
        settings["max_pages_limit"] = None
    return settings


@contextlib.contextmanager
def _terminate_raises_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (as SIGINT does) while mounted; the previous handler comes back."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Daemon:
    """One mounted image; ``run`` blocks until it is unmounted."""

    def __init__(self, config: MountConfig) -> None:
        self.config = config
        self.index = ImageIndex.open(config.index_path)
        if not config.tiers:
            raise MountError("no tier given; pass at least the origin (--tier DIR|URL)")
        Path(config.cache_dir).mkdir(parents=True, exist_ok=True)
        self.fetcher = Fetcher.for_mount(config.cache_dir, config.tiers, config.memory_mib << 20)
        self.recorder = Recorder() if config.record_profile else None
        self.profile = read_profile(config.profile, self.index.digest) if config.prefetch else []
        self.ops = ImageFS(
            self.index, self.fetcher, self.recorder, config.fetch_threads, config.readahead_chunks
        )
        self.settings: dict[str, object] = {}
        self.prefetched = 0
        self.profile_saved = False

    def run(self, ready_fd: int | None = None) -> None:
        cfg = self.config
        # No max_read option: libfuse 3.14 refuses one its init() did not also request; requests are
        # bounded by max_pages (negotiated from libfuse's 1 MiB buffer) instead, seen as max_request_bytes.
        options = {"fsname=coldstart-image", "subtype=coldstart", "ro", "default_permissions"}
        if os.geteuid() == 0:
            options.add("allow_other")  # the engine may run as another user inside its sandbox
        options.update(cfg.extra_options)
        # SIGUSR1 (save the profile) kills by default: one that arrives outside trio's receiver (before it
        # listens, re-raised by trio after it took a SIGTERM first, or during the exit) is ignored for the
        # rest of this process; the exit saves the profile anyway.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        with _terminate_raises_interrupt():  # a SIGTERM before trio listens must still unmount
            try:
                pyfuse3.init(self.ops, cfg.mountpoint, options)
            except (RuntimeError, OSError) as exc:
                raise MountError(
                    f"cannot mount {cfg.mountpoint}: {exc}; is it an empty directory and /dev/fuse there?"
                ) from exc
            try:
                trio.run(self._serve, ready_fd)
            except KeyboardInterrupt:
                log.info("interrupted before serving: unmounting %s", cfg.mountpoint)
            finally:
                pyfuse3.close(unmount=True)
                self.save_profile()
                self._write_stats()
                self.fetcher.close()

    async def _serve(self, ready_fd: int | None) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                self.ops.nursery = nursery
                nursery.start_soon(self._fuse_main, nursery.cancel_scope)
                cfg = self.config
                self.settings = await trio.to_thread.run_sync(
                    tune, cfg.mountpoint, cfg.read_ahead_kb, cfg.max_background
                )
                log.info("mounted %s at %s (%s)", self.index.digest, cfg.mountpoint, self.settings)
                if ready_fd is not None:
                    line = {"pid": os.getpid(), "settings": self.settings, "digest": self.index.digest}
                    line["prefetch_chunks"] = len(self.profile)
                    os.write(ready_fd, (json.dumps(line) + "\n").encode())
                    os.close(ready_fd)
                if self.profile:
                    nursery.start_soon(self._prefetch)
                async for signum in signals:
                    if signum == signal.SIGUSR1:  # the boot is over: its profile, and what it fetched
                        await trio.to_thread.run_sync(self.save_profile)
                        await trio.to_thread.run_sync(self._write_stats)
                    else:
                        log.info("signal %d: unmounting %s", signum, cfg.mountpoint)
                        nursery.cancel_scope.cancel()
                        return

    async def _fuse_main(self, scope: trio.CancelScope) -> None:
        await pyfuse3.main(max_tasks=64)
        log.info("unmounted from outside: stopping")
        scope.cancel()

    async def _prefetch(self) -> None:
        """Fetch the boot profile's chunks in boot order with a few threads (demand reads have their own)."""
        todo = iter(self.profile)
        started = trio.current_time()

        async def worker() -> None:
            for digest in todo:
                if self.fetcher.memory.get(digest) is not None:
                    continue
                try:
                    await trio.to_thread.run_sync(self.fetcher.get, digest, True, abandon_on_cancel=True)
                    self.prefetched += 1
                except ChunkUnavailable:
                    pass  # logged by the fetcher; a demand read will report it again

        async with trio.open_nursery() as nursery:
            for _ in range(self.config.prefetch_threads):
                nursery.start_soon(worker)
        log.info(
            "prefetched %d of %d profile chunks in %.2f s",
            self.prefetched,
            len(self.profile),
            trio.current_time() - started,
        )

    def save_profile(self) -> None:
        """Write what the boot read so far (once); later reads are not part of the boot."""
        if self.recorder is None or self.profile_saved:
            return
        order = self.recorder.stop()
        self.profile_saved = True
        if not order:
            return
        try:
            write_profile(self.config.profile, self.index.digest, order)
            log.info("boot profile: %d chunks -> %s", len(order), self.config.profile)
        except OSError as exc:
            log.warning("cannot write boot profile %s: %s", self.config.profile, exc)

    def stats(self) -> dict[str, object]:
        return {
            "digest": self.index.digest,
            "image_bytes": self.index.total_bytes,
            "remote_bytes": self.fetcher.remote_bytes(),
            "tiers": self.fetcher.stats(),
            "chunk_reads": self.ops.chunk_reads,
            "requests": dict(self.ops.requests),
            "readahead_chunks": self.ops.readahead_started,
            "max_request_bytes": self.ops.max_request,
            "profile_chunks": len(self.profile),
            "prefetched": self.prefetched,
            "settings": self.settings,
        }

    def _write_stats(self) -> None:
        if self.config.stats_path:
            write_atomic(self.config.stats_path, json.dumps(self.stats(), indent=1))


def main(argv: list[str]) -> int:
    """``python -m coldstart.imagefs.daemon CONFIG_JSON [READY_FD]``: the child process of ``mounted``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s imagefs[%(process)d] %(levelname)s %(message)s"
    )
    config = MountConfig.from_json(argv[0])
    ready_fd = int(argv[1]) if len(argv) > 1 else None
    try:
        Daemon(config).run(ready_fd)
    except ImageError as exc:
        log.error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
