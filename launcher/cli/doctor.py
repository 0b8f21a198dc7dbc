"""``coldstart doctor``: what works on this host -- checkpointers (with versions), network namespaces,
FUSE, and (from ``gpu_doctor``) the NVIDIA driver, GPUs and the CUDA checkpoint API.

Each row is ``name  status  detail`` with status ok, warn, fail or skip. ``--deep`` also checkpoints and
restores a ``sleep`` process with each working CPU checkpointer (a few seconds; what "works" really means).
Exit code 0 when at least one CPU checkpointer works (``--snapshot auto`` has something to pick), else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coldstart.engine_adapters.base import LaunchSpec
from coldstart.launcher.checkpointers.base import Checkpointer
from coldstart.launcher.errors import CheckpointerUnavailable, ColdstartError


@dataclass(frozen=True)
class Row:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str


def checkpointer_rows(deep: bool) -> tuple[list[Row], list[str]]:
    from coldstart.launcher.checkpointers.registry import AUTO_ORDER, CHECKPOINTERS

    rows, working = [], []
    for name in AUTO_ORDER:
        checkpointer = CHECKPOINTERS[name]()
        try:
            info = checkpointer.probe()
        except CheckpointerUnavailable as exc:
            rows.append(Row(name, "skip" if name == "cuda" else "fail", str(exc)))
            continue
        detail = f"{info.version} ({', '.join(sorted(info.capabilities))})"
        if deep and name != "cuda":
            try:
                seconds = asyncio.run(_round_trip(checkpointer))
            except (ColdstartError, OSError) as exc:
                rows.append(
                    Row(name, "fail", f"{info.version}: checkpoint/restore of a test process failed: {exc}")
                )
                continue
            detail += f"; checkpoint + restore of a test process in {seconds:.2f}s"
        working.append(str(name))
        rows.append(Row(name, "ok", detail))
    auto = next((n for n in AUTO_ORDER if n in working), None)
    rows.append(
        Row("--snapshot auto", "ok" if auto else "fail", auto or "no checkpointer works: --snapshot off")
    )
    return rows, working


async def _round_trip(checkpointer: Checkpointer) -> float:
    import time

    with tempfile.TemporaryDirectory(prefix="coldstart-doctor-") as tmp:
        work = Path(tmp)
        original = checkpointer.new_sandbox(work / "a", "doctor-a")
        restored = None
        try:
            await original.start(LaunchSpec(argv=["sleep", "600"]))
            await asyncio.sleep(0.3)
            (work / "image").mkdir()
            started = time.monotonic()
            await checkpointer.checkpoint(original, work / "image", leave_running=False)
            restored = await checkpointer.restore(work / "image", work / "b", "doctor-b")
            await asyncio.sleep(0.3)
            if restored.exit_code() is not None:
                raise ColdstartError(
                    f"restored process exited ({restored.exit_code()}): {restored.log_tail(5)}"
                )
            return time.monotonic() - started
        finally:
            for sandbox in (original, restored):
                if sandbox is not None:
                    await sandbox.stop(2.0)


def system_rows() -> list[Row]:
    rows = [
        Row("root", "ok" if os.geteuid() == 0 else "fail", "uid 0" if os.geteuid() == 0 else "run as root")
    ]
    try:
        from coldstart.launcher.sandboxes.leftovers import cleanup_left_by_dead_launchers
        from coldstart.launcher.sandboxes.netns import NetNamespace

        stale = cleanup_left_by_dead_launchers()
        ns = NetNamespace.create()
        ns.delete()
        detail = "veth pair + /30 in 10.88.0.0/16, only root may connect"
        rows.append(Row("network namespaces", "ok", detail))
        # Say what was removed: engines killed, namespaces, veths, firewall rules, containers.
        rows += [Row("removed (dead launcher)", "warn", line) for line in stale]
    except (ColdstartError, OSError) as exc:
        rows.append(Row("network namespaces", "fail", str(exc)))
    fuse_ok = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
    pyfuse = importlib.util.find_spec("pyfuse3") is not None
    detail = ", ".join(
        [
            "/dev/fuse" + ("" if os.path.exists("/dev/fuse") else " missing"),
            "fusermount3" + ("" if shutil.which("fusermount3") else " missing (apt-get install fuse3)"),
            "pyfuse3" + ("" if pyfuse else " missing (pip install 'coldstart[imagefs]')"),
        ]
    )
    rows.append(Row("fuse", "ok" if fuse_ok and pyfuse else "fail", detail))
    return rows


def gpu_rows() -> list[Row]:
    try:
        from coldstart.launcher.gpu.doctor import gpu_checks
    except ImportError:
        return []
    return [Row(c.name, c.status, c.detail) for c in gpu_checks()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coldstart doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deep", action="store_true", help="checkpoint and restore a test process too")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cpu, working = checkpointer_rows(args.deep)
    rows = [*system_rows(), *cpu, *gpu_rows()]
    width = max(len(r.name) for r in rows)
    for row in rows:
        print(f"{row.name:<{width}}  {row.status:<4}  {row.detail}")
    return 0 if working and any(n != "cuda" for n in working) else 1


if __name__ == "__main__":
    sys.exit(main())
