"""What a snapshot costs in a store and on the wire: published raw vs zstd-compressed, side by side.

For a snapshot already in a local store (any engine, CRIU or runsc), one run publishes it twice into fresh
chunk stores (raw; page images zstd-compressed, ``imagefs.compressed``, the default) and pulls each into an
empty snapshot store through a directory tier (no network: the pull's own cost, expansion included; over a
network add published bytes / bandwidth). Prints, per way: the bytes the store holds (what a pulling host
fetches), how they split between the page images and the weight files the snapshot pins, publish and pull
seconds, and that the pulled files re-hash to the manifest's digests.

    .venv/bin/python bench/snapshot_publish.py [--snapshot-dir DIR] [KEY ...]   (default: every snapshot)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from coldstart.launcher.config import ServeConfig
from coldstart.launcher.snapshots.remote import SnapshotTiers
from coldstart.launcher.snapshots.store import Snapshot, SnapshotStore


def weight_bytes(snapshot: Snapshot) -> int:
    """Bytes of the weight files the snapshot pins (content-addressed files mapped by every replica)."""
    return int((snapshot.manifest.get("weights") or {}).get("bytes", 0))


def done_files(snapshot: Snapshot) -> list[str]:
    return [rel for rel in snapshot.manifest["files"] if rel.startswith("image/")]


def one_way(snapshot: Snapshot, work: Path, compress: bool) -> dict[str, float | str]:
    origin = work / ("zstd" if compress else "raw")
    t = time.monotonic()
    done = SnapshotTiers([], publish_to=origin, compress=compress).publish(snapshot)
    publish_s = time.monotonic() - t
    store = SnapshotStore(work / f"pulled-{origin.name}")
    t = time.monotonic()
    pulled, report = SnapshotTiers([str(origin)], workers=8).pull(snapshot.key, store)
    pull_s = time.monotonic() - t
    store.verify(pulled, full=True)  # raises unless every file has the manifest's digest
    compressed = set(done.ref.compressed)
    shutil.rmtree(store.root, ignore_errors=True)
    return {
        "way": "zstd (files that shrink 10%+)" if compress else "raw",
        "stored_mb": done.ref.size / 1e6,
        "compressed": f"{len(compressed)} of {len(done_files(snapshot))}",
        "publish_s": publish_s,
        "pull_s": pull_s,
        "expanded_mb": report.bytes / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("keys", nargs="*", help="snapshot keys or prefixes (default: every snapshot)")
    parser.add_argument("--snapshot-dir", type=Path, default=None, help="the local snapshot store")
    args = parser.parse_args()
    store = SnapshotStore(args.snapshot_dir or ServeConfig().snapshot_dir)
    snapshots = [store.find(k) for k in args.keys] if args.keys else store.ls()
    if not snapshots:
        print(f"no snapshot in {store.root}: take one first (coldstart-serve ...)", file=sys.stderr)
        return 2
    print(
        "| snapshot | engine, model | checkpointer | image (MB) | of which weight files | way "
        "| store holds (MB) | files published compressed | publish (s) | pull into an empty store (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for snapshot in snapshots:
        ident = snapshot.manifest.get("identity", {})
        engine = ident.get("engine", {})
        with tempfile.TemporaryDirectory(prefix="coldstart-publish-bench-", dir=store.root) as work:
            for compress in (False, True):
                row = one_way(snapshot, Path(work), compress)
                print(
                    f"| {snapshot.key[:12]} | {engine.get('engine')}, {Path(str(engine.get('model'))).name} "
                    f"| {ident.get('checkpointer')} | {snapshot.total_bytes / 1e6:,.1f} "
                    f"| {weight_bytes(snapshot) / 1e6:,.1f} | {row['way']} | {row['stored_mb']:,.1f} "
                    f"| {row['compressed']} | {row['publish_s']:.2f} "
                    f"| {row['pull_s']:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
