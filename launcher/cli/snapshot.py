"""``coldstart snapshot ls|inspect|rm|gc|push|pull``: the snapshot store on this host, and remote ones.

    coldstart snapshot ls                       key, engine, model, checkpointer, size, created, last used
                                                (and where: local, or the tier that has it)
    coldstart snapshot inspect KEY [--verify]   the manifest, and whether it fits this host (the gate)
    coldstart snapshot rm KEY [--remote]        remove one snapshot (--remote: its ref in --snapshot-publish)
    coldstart snapshot gc [--older-than DAYS]   remove leftovers (unfinished writes, refused snapshots) and,
                                                with --older-than, snapshots unused for that long; then the
                                                weight files no snapshot uses (rm removes those too)
    coldstart snapshot gc --remote              delete chunks no ref or image names in --snapshot-publish
    coldstart snapshot push KEY                 publish a local snapshot into --snapshot-publish DIR
    coldstart snapshot pull KEY                 gate, then fetch a snapshot through --snapshot-tiers
KEY may be abbreviated to any unique prefix. ``--snapshot-dir``, ``--snapshot-tiers``, ``--snapshot-cache``
and ``--snapshot-publish`` as for ``coldstart-serve``; with tiers, ls/inspect see remote snapshots too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coldstart.launcher.config import ServeConfig
from coldstart.launcher.errors import (
    USER_ERRORS,
    CheckpointerUnavailable,
    ColdstartError,
    SnapshotError,
    UsageError,
)
from coldstart.launcher.snapshots.store import Snapshot, SnapshotStore

if TYPE_CHECKING:
    from coldstart.launcher.snapshots.remote import RemoteSnapshot, SnapshotTiers


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coldstart snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--snapshot-dir",
        type=Path,
        default=None,
        help="store (default: $XDG_CACHE_HOME/coldstart/snapshots, as coldstart-serve)",
    )
    # Also accepted after the subcommand (``coldstart snapshot ls --snapshot-dir D``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--snapshot-dir", type=Path, default=argparse.SUPPRESS, help="the store")
    for p in (parser, common):
        default = None if p is parser else argparse.SUPPRESS
        p.add_argument(
            "--snapshot-tiers",
            default=default,
            metavar="URLS",
            help="comma-separated tiers to find snapshots on, nearest first: cache server URLs, store dirs",
        )
        p.add_argument("--snapshot-cache", type=Path, default=default, help="local chunk cache for pulls")
        p.add_argument(
            "--snapshot-publish", type=Path, default=default, metavar="DIR", help="chunk store to push into"
        )
        p.add_argument(
            "--snapshot-trust-key",
            type=Path,
            default=default,
            metavar="FILE",
            help="secret shared by a deployment's hosts: pushed refs are signed, pulled ones checked",
        )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list snapshots (local, and on --snapshot-tiers)", parents=[common])
    inspect = sub.add_parser(
        "inspect", help="show a snapshot's manifest and whether it fits this host", parents=[common]
    )
    inspect.add_argument("key")
    inspect.add_argument(
        "--verify", action="store_true", help="re-hash every file (ignores the digest cache)"
    )
    rm = sub.add_parser("rm", help="remove a snapshot", parents=[common])
    rm.add_argument("key")
    rm.add_argument("--remote", action="store_true", help="remove its ref from --snapshot-publish instead")
    gc = sub.add_parser(
        "gc", help="remove leftovers and, with --older-than, unused snapshots", parents=[common]
    )
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="also remove snapshots unused this long")
    gc.add_argument("--remote", action="store_true", help="delete unnamed chunks in --snapshot-publish")
    gc.add_argument(
        "--min-age", type=float, default=3600.0, metavar="S", help="keep chunks younger than this (remote gc)"
    )
    push = sub.add_parser("push", help="publish a local snapshot into --snapshot-publish", parents=[common])
    push.add_argument("key")
    pull = sub.add_parser(
        "pull", help="gate, then fetch a snapshot through --snapshot-tiers into the store", parents=[common]
    )
    pull.add_argument("key", help="the full key (as 'coldstart snapshot ls' shows it with tiers)")
    pull.add_argument("--force", action="store_true", help="pull even if it does not fit this host")
    return parser


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _row(key: str, manifest: dict[str, Any], size: int, used: str, where: str) -> tuple[str, ...]:
    ident = manifest["identity"]
    return (
        key[:12],
        f"{ident['engine'].get('engine')} {ident['engine'].get('engine_version', '')}".strip(),
        str(ident["engine"].get("model", "")),
        f"{ident['checkpointer']} {ident['checkpointer_version']}",
        f"{size / 1e6:.0f} MB",
        str(manifest.get("created_at", "")),
        used,
        where,
    )


def _ls(store: SnapshotStore, remote: SnapshotTiers | None) -> int:
    rows: list[tuple[str, ...]] = [
        ("KEY", "ENGINE", "MODEL", "CHECKPOINTER", "SIZE", "CREATED", "LAST USED", "WHERE")
    ]
    now = time.time()
    local = store.ls()
    for snap in local:
        rows.append(
            _row(snap.key, snap.manifest, snap.total_bytes, _age(now - store.last_used(snap)), "local")
        )
    if remote is not None and remote.tiers:
        have = {snap.key for snap in local}
        for found in remote.ls():
            if found.key not in have:
                rows.append(_row(found.key, found.manifest, found.total_bytes, "-", found.tier))
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


def _find_remote(remote: SnapshotTiers | None, key: str) -> RemoteSnapshot:

    if remote is None or not remote.tiers:
        raise SnapshotError(f"no snapshot {key!r} here; pass --snapshot-tiers to look on other hosts")
    matches = [found for found in remote.ls() if found.key.startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise SnapshotError(f"{key!r} matches {len(matches)} remote snapshots: give more of the key")
    found = remote.find(key)  # a tier that cannot list (a plain origin behind a cache) may still have it
    if found is None:
        raise SnapshotError(f"no snapshot {key!r} here or on {', '.join(remote.tiers)}")
    return found


def _inspect(store: SnapshotStore, key: str, verify: bool, remote: SnapshotTiers | None) -> int:

    try:
        snap = store.find(key)
    except SnapshotError:
        if remote is None:
            raise
        found = _find_remote(remote, key)
        manifest = dict(found.manifest)
        manifest["files"] = {name: meta["size"] for name, meta in manifest.pop("files", {}).items()}
        manifest["remote"] = {"tier": found.tier, "index": found.ref.index, "chunks": found.ref.chunks}
        print(json.dumps(manifest, indent=2, sort_keys=True))
        problems = host_gate(Snapshot(Path(found.tier), found.manifest))
        print("fits this host: " + ("yes" if not problems else "no: " + "; ".join(problems)))
        return 0 if not problems else 1
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


def _pull(store: SnapshotStore, remote: SnapshotTiers | None, key: str, force: bool) -> int:
    if remote is None:
        raise SnapshotError(f"no snapshot {key!r} here; pass --snapshot-tiers to look on other hosts")
    found = _find_remote(remote, key)

    def gate(manifest: dict[str, Any]) -> list[str]:
        problems = host_gate(Snapshot(Path(found.tier), manifest))
        if problems and force:
            print("pulling although it does not fit this host: " + "; ".join(problems), file=sys.stderr)
            return []
        return problems

    snap, report = remote.pull(found.key, store, gate)
    if report.already_local:
        print(f"{snap.key} is already in {store.root}")
        return 0
    print(
        f"pulled {snap.key} from {found.tier}: {report.bytes / 1e6:.1f} MB "
        f"({report.remote_bytes / 1e6:.1f} MB over the network) in {report.seconds:.2f}s"
    )
    return 0


def _remote_of(args: argparse.Namespace) -> SnapshotTiers | None:
    from coldstart.launcher.snapshots.remote import remote_for

    return remote_for(
        args.snapshot_tiers, args.snapshot_cache, args.snapshot_publish, args.snapshot_trust_key
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    store = SnapshotStore(args.snapshot_dir or ServeConfig().snapshot_dir)
    try:
        remote = _remote_of(args)
        if args.command == "ls":
            return _ls(store, remote)
        if args.command == "inspect":
            return _inspect(store, args.key, args.verify, remote)
        if args.command == "push":
            if remote is None or remote.publish_to is None:
                raise UsageError("push needs --snapshot-publish DIR (the chunk store to publish into)")
            snap = store.find(args.key)
            done = remote.publish(snap)
            print(f"pushed {snap.key} to {remote.publish_to}: {done.ref.size / 1e6:.1f} MB, "
                  f"{done.new_chunks} new chunks")  # fmt: skip
            return 0
        if args.command == "pull":
            return _pull(store, remote, args.key, args.force)
        if args.command == "rm" and args.remote:
            if remote is None or remote.publish_to is None:
                raise UsageError("rm --remote needs --snapshot-publish DIR (the store that holds the ref)")
            from coldstart.launcher.snapshots.remote import SnapshotTiers

            found = _find_remote(SnapshotTiers([str(remote.publish_to)]), args.key)
            remote.rm(found.key)
            print(f"removed {found.key} from {remote.publish_to} (its chunks go at 'gc --remote')")
            return 0
        if args.command == "gc" and args.remote:
            from coldstart.imagefs.refs import gc

            if remote is None or remote.publish_to is None:
                raise UsageError("gc --remote needs --snapshot-publish DIR (the store to collect)")
            result = gc(remote.publish_to, min_age_s=args.min_age)
            print(f"removed {result.removed_chunks} chunks ({result.removed_bytes / 1e6:.1f} MB), "
                  f"kept {result.kept_chunks}")  # fmt: skip
            return 0
        if args.command == "rm":
            snap = store.find(args.key)
            store.rm(snap.key)
            print(f"removed {snap.key}")
            return 0
        removed = store.gc(older_than_s=args.older_than * 86400 if args.older_than is not None else None)
        print("\n".join(f"removed {name}" for name in removed) or "nothing to remove")
        return 0
    except (*USER_ERRORS, OSError) as exc:  # type: ignore[misc]  # mypy cannot unpack a tuple here
        print(f"coldstart snapshot: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
