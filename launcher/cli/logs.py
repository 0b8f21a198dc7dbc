"""``coldstart logs REPLICA``: the engine output of a replica, from the bounded log the launcher keeps.

Every replica's engine output (stdout and stderr) is copied by its launcher into
``WORK/launcher-PID/REPLICA/engine.log`` (at most 8 MiB, the 8 MiB before in ``engine.log.1``;
``process.EngineLog``); a boot failure's error names that file. This prints its last lines, from the newest
launcher that had a replica of that name (``--all`` lists every match instead).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import deque
from pathlib import Path

from coldstart.launcher.config import coldstart_cache
from coldstart.launcher.errors import USER_ERRORS, UsageError

LOG = "engine.log"


def find_logs(work_dir: Path, replica: str) -> list[Path]:
    """Every ``engine.log`` of replica ``replica`` under ``work_dir``, newest first."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", replica):
        raise UsageError(f"{replica!r} is not a replica id (like r1; see GET /health)")
    found = [p for p in work_dir.glob(f"*/{replica}/{LOG}") if p.is_file()]
    found += [p for p in [work_dir / replica / LOG] if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def tail(path: Path, lines: int) -> list[str]:
    with open(path, errors="replace") as f:
        return list(deque(f, maxlen=lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="coldstart logs", description=__doc__.split("\n\n")[1])
    parser.add_argument("replica", help="replica id, as GET /health and the launcher's log name it (r1, ...)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="coldstart-serve's --work-dir ($XDG_CACHE_HOME/coldstart/run)",
    )
    parser.add_argument("-n", "--lines", type=int, default=50, help="how many of the last lines (default 50)")
    parser.add_argument("--all", action="store_true", help="list every launcher's log of that replica")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    work_dir = args.work_dir or coldstart_cache() / "run"
    try:
        logs = find_logs(work_dir, args.replica)
        if not logs:
            raise UsageError(f"no {LOG} of replica {args.replica} under {work_dir} (pass --work-dir?)")
    except USER_ERRORS as exc:
        print(f"coldstart logs: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))
    if args.all:
        for path in logs:
            print(path)
        return 0
    print(f"==> {logs[0]} <==")
    print("".join(tail(logs[0], args.lines)), end="")
    return 0
