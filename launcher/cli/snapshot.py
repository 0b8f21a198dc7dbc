"""``coldstart snapshot ls|inspect|rm|gc``: the snapshot store on this host.

    coldstart snapshot ls                       key, engine, model, checkpointer, size, created, last used
    coldstart snapshot inspect KEY [--verify]   the manifest, and whether it fits this host (the gate)
    coldstart snapshot rm KEY                   remove one snapshot
    coldstart snapshot gc [--older-than DAYS]   remove leftovers (unfinished writes, refused snapshots) and,
                                                with --older-than, snapshots unused for that long
KEY may be abbreviated to any unique prefix. ``--snapshot-dir`` as for ``coldstart-serve``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from coldstart.launcher.config import ServeConfig
from coldstart.launcher.errors import USER_ERRORS, CheckpointerUnavailable, ColdstartError
from coldstart.launcher.snapshots.store import Snapshot, SnapshotStore

DEFAULT_DIR = Path(ServeConfig.__dataclass_fields__["snapshot_dir"].default)  # type: ignore[arg-type]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coldstart snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--snapshot-dir", type=Path, default=DEFAULT_DIR, help=f"store (default {DEFAULT_DIR})"
    )
    # Also accepted after the subcommand (``coldstart snapshot ls --snapshot-dir D``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--snapshot-dir", type=Path, default=argparse.SUPPRESS, help="the store")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list snapshots", parents=[common])
    inspect = sub.add_parser(
        "inspect", help="show a snapshot's manifest and whether it fits this host", parents=[common]
    )
    inspect.add_argument("key")
    inspect.add_argument(
        "--verify", action="store_true", help="re-hash every file (ignores the digest cache)"
    )
    rm = sub.add_parser("rm", help="remove a snapshot", parents=[common])
    rm.add_argument("key")
    gc = sub.add_parser(
        "gc", help="remove leftovers and, with --older-than, unused snapshots", parents=[common]
    )
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="also remove snapshots unused this long")
    return parser


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _ls(store: SnapshotStore) -> int:
    rows = [("KEY", "ENGINE", "MODEL", "CHECKPOINTER", "SIZE", "CREATED", "LAST USED")]
    now = time.time()
    for snap in store.ls():
        ident = snap.manifest["identity"]
        rows.append(
            (
                snap.key[:12],
                f"{ident['engine'].get('engine')} {ident['engine'].get('engine_version', '')}".strip(),
                str(ident["engine"].get("model", "")),
                f"{ident['checkpointer']} {ident['checkpointer_version']}",
                f"{snap.total_bytes / 1e6:.0f} MB",
                str(snap.manifest.get("created_at", "")),
                _age(now - store.last_used(snap)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def host_gate(snap: Snapshot) -> list[str]:
    """Why ``snap`` would be refused on this host (checkpointer version, fingerprint); [] if it fits."""
    import dataclasses

    from coldstart.launcher.checkpointers.registry import get_checkpointer
    from coldstart.launcher.snapshots.fingerprint import host_fingerprint

    recorded = snap.identity
    try:
        version = get_checkpointer(recorded.checkpointer).probe().version
    except (CheckpointerUnavailable, ColdstartError) as exc:
        return [f"{recorded.checkpointer} unavailable here: {exc}"]
    here = dataclasses.replace(recorded, checkpointer_version=version, fingerprint=host_fingerprint())
    return here.gate(recorded)


def _inspect(store: SnapshotStore, key: str, verify: bool) -> int:
    snap = store.find(key)
    manifest = dict(snap.manifest)
    files = manifest.pop("files", {})
    manifest["files"] = {name: meta["size"] for name, meta in files.items()}
    print(json.dumps(manifest, indent=2, sort_keys=True))
    problems = host_gate(snap)
    print("fits this host: " + ("yes" if not problems else "no: " + "; ".join(problems)))
    if verify:
        store.verify(snap, full=True)
        print(f"verified: {len(files)} files, {snap.total_bytes} bytes, every sha256 matches")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    store = SnapshotStore(args.snapshot_dir)
    try:
        if args.command == "ls":
            return _ls(store)
        if args.command == "inspect":
            return _inspect(store, args.key, args.verify)
        if args.command == "rm":
            snap = store.find(args.key)
            store.rm(snap.key)
            print(f"removed {snap.key}")
            return 0
        removed = store.gc(older_than_s=args.older_than * 86400 if args.older_than is not None else None)
        print("\n".join(f"removed {name}" for name in removed) or "nothing to remove")
        return 0
    except USER_ERRORS as exc:
        print(f"coldstart snapshot: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
