"""What a launcher that died without cleaning up (``kill -9``, OOM, power) left behind, found and removed by
the next launcher at start and by ``coldstart doctor``, each thing said.

Engines die with their launcher (``process.die_with_launcher``), so normally only namespaces, veths,
firewall rules, runsc container state and dead FUSE mounts remain; but an engine that escaped (started by an
older version, or a tree re-parented before the death signal was set) is found by its network namespace and
killed too. What belongs to a launcher is told by the PID in its names (``cs-<pid>-...``); a PID that still
exists is left alone (its launcher may be alive: never touch another live launcher's replicas).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

from coldstart.launcher.sandboxes.netns import cleanup_stale

log = logging.getLogger("coldstart.serve")


def cleanup_left_by_dead_launchers(work_dir: Path | None = None) -> list[str]:
    """Remove what dead launchers left; returns one line per thing removed. Needs root (else [])."""
    if os.geteuid() != 0:
        return []
    removed: list[str] = []
    runsc = shutil.which("runsc")
    if runsc is not None:  # containers first: their processes hold the namespaces
        from coldstart.launcher.checkpointers.runsc import cleanup_stale_containers

        removed += [f"runsc container {cid}" for cid in cleanup_stale_containers(runsc)]
    removed += cleanup_stale()
    if work_dir is not None:
        removed += _dead_fuse_mounts(Path(work_dir))
    return removed


def _dead_fuse_mounts(work_dir: Path) -> list[str]:
    """FUSE mounts under ``work_dir`` whose daemon is gone ("Transport endpoint is not connected")."""
    removed = []
    root = str(work_dir.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            _, mountpoint, fstype, *_ = line.split()
            mountpoint = mountpoint.replace("\\040", " ")
            if not fstype.startswith("fuse") or not mountpoint.startswith(root):
                continue
            try:
                os.stat(mountpoint)
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=30)
                    removed.append(f"dead FUSE mount {mountpoint}")
    return removed


def log_cleanup(work_dir: Path | None = None) -> list[str]:
    """``cleanup_left_by_dead_launchers`` with one log line per thing removed (launcher start)."""
    removed = cleanup_left_by_dead_launchers(work_dir)
    for line in removed:
        log.warning("removed what a dead launcher left: %s", line, extra={"event": "leftover_removed"})
    return removed
