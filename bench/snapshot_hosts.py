"""Snapshots across hosts: restore -> first token on host B, which never took the snapshot.

Two hosts on one machine (``tests/two_hosts.py``: two network namespaces on a bridge, each its own
directories and its own ``coldstart-serve``); host A cold-boots ``transformers serve``, snapshots, publishes
into its origin store and serves it with ``coldstart image serve``. Every row is a fresh launcher started
with no replica (``--initial-replicas 0``); the clock runs from sending one greedy request (max_tokens 1)
to its answer, so it covers lookup, pull, gate, restore, canary and the first token, not Python start-up.

    local restore on A           the baseline: A's own snapshot, on A's disk
    B, A's cache server, empty   B has nothing: pull through http://A (8 fetch workers), then restore
    B, pulled at launch          the same, but the request comes after the launcher's pull-ahead at start
                                 (a buffer host is up before its traffic)
    B, local copy                B's second restore: the snapshot it pulled before (no network)
    B, chunk cache only          B's snapshot folder removed, its chunk cache kept (no network)

Then the pull alone (in this process, through the cache server, into an empty store) with 1 and 8 fetch
workers: what fetching ahead in parallel buys. A recorded restore profile would add nothing here: CRIU
and runsc read every byte of the image before the process runs, so the profile is the whole image; the
pull fetches all of it ahead, in parallel, before the checkpointer starts. Then: bytes pulled vs the
snapshot's bytes, the time to find and load the snapshot's index through the
cache server, and the chunk dedup share between two snapshots (a re-snapshot of the same model on a fresh
host; a snapshot of another model), at 256 KiB chunks (what we publish) and 4 KiB pages (an upper bound
for any finer or content-defined chunking).

    sudo .venv/bin/python bench/snapshot_hosts.py [--size tiny|qwen3-0.6b] [--checkpointer criu|runsc]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the two-host harness the tests use

import httpx  # noqa: E402
from two_hosts import CacheServer, Launcher, TwoHosts  # noqa: E402

from coldstart.imagefs.fetcher import Fetcher  # noqa: E402
from coldstart.imagefs.index import ImageIndex  # noqa: E402
from coldstart.imagefs.refs import find_ref  # noqa: E402
from coldstart.imagefs.tiers import HttpTier, MemoryTier  # noqa: E402
from coldstart.launcher.snapshots.remote import SnapshotTiers, ref_name  # noqa: E402
from coldstart.launcher.snapshots.store import SnapshotStore  # noqa: E402
from coldstart.launcher.tiny_model import make_model  # noqa: E402

PAGE = 4096


def first_token_s(launcher: Launcher) -> float:
    """Seconds from sending one greedy request to a launcher with no replica to its answer."""
    deadline = time.monotonic() + 60
    while True:  # the proxy is up (no replica yet)
        try:
            httpx.get(f"{launcher.url}/health", timeout=1, trust_env=False)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or launcher.proc.poll() is not None:
                raise RuntimeError(f"launcher did not come up:\n{launcher.log()[-3000:]}") from None
            time.sleep(0.05)
    body = {
        "model": launcher.model_name,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 1,
        "temperature": 0,
    }
    started = time.monotonic()
    response = httpx.post(f"{launcher.url}/v1/chat/completions", json=body, timeout=600, trust_env=False)
    response.raise_for_status()
    return time.monotonic() - started


def how(log: str, ahead: bool = False) -> str:
    if "how=cold_boot" in log:
        return "COLD BOOT"
    pulled = re.search(r"pulled from \S+: [\d.]+ MB \(([\d.]+) MB over the network\) in ([\d.]+)s", log)
    restored = re.search(r"restored from \w+ in ([\d.]+)s", log)
    parts = []
    if pulled:
        parts.append(f"pull {float(pulled.group(2)):.2f}s ({pulled.group(1)} MB net)")
    if restored:
        pull_s = float(pulled.group(2)) if pulled and not ahead else 0.0  # ahead: not in the restore
        parts.append(f"restore+canary {float(restored.group(1)) - pull_s:.2f}s")
    return ", ".join(parts) or "?"


def run_row(
    host, model: Path, name: str, *extra: str, checkpointer: str, ahead: bool = False
) -> tuple[float, str, str]:  # type: ignore[no-untyped-def]
    launcher = Launcher(host, model, name, *extra, initial=0, checkpointer=checkpointer)
    try:
        if ahead:  # the launcher pulls at start; the request comes once that is done
            launcher.wait_log(r"pulled from", 300)
        seconds = first_token_s(launcher)
    finally:
        launcher.stop()
    log = launcher.log()
    return seconds, how(log, ahead), log


def chunk_set(paths: list[Path], size: int) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(size):
                out[hashlib.sha256(block).digest()] = len(block)
    return out


def shared(a: list[Path], b: list[Path], size: int) -> float:
    """Share of b's bytes (by unique chunk) already in a."""
    ca, cb = chunk_set(a, size), chunk_set(b, size)
    return sum(n for d, n in cb.items() if d in ca) / max(1, sum(cb.values()))


def image_files(store: Path) -> list[Path]:
    """The image files of the one snapshot in ``store`` ([] when none was taken)."""
    snaps = SnapshotStore(store).ls()
    return sorted(p for p in snaps[0].image_dir.rglob("*") if p.is_file()) if snaps else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "qwen3-0.6b"))
    parser.add_argument("--checkpointer", default="criu", choices=("criu", "runsc"))
    parser.add_argument("--repeat", type=int, default=2, help="runs of each timed row (median reported)")
    args = parser.parse_args()
    ck = args.checkpointer
    model = make_model(REPO / ".cache" / "models" / args.size, args.size)
    # Another model of the same architecture: for tiny the same seed in float32 (another seed may give a
    # tiny model whose greedy ids decode to nothing, which the canary refuses); else another seed.
    if args.size == "tiny":
        other_model = make_model(REPO / ".cache" / "models" / "tiny-f32", "tiny", dtype="float32")
    else:
        other_model = make_model(REPO / ".cache" / "models" / f"{args.size}-seed1", args.size, seed=1)
    base = Path(tempfile.mkdtemp(prefix="coldstart-bench-hosts-", dir="/var/tmp"))
    rows: list[tuple[str, float, str]] = []
    logs: dict[str, str] = {}
    try:
        with TwoHosts(base) as hosts:
            a, b = hosts.a, hosts.b
            origin = a.root / "origin"
            t = time.monotonic()
            first = Launcher(a, model, "a1", "--snapshot-publish", str(origin), checkpointer=ck)
            try:
                first.wait_ready(900)
                key = first.wait_log(r"snapshot (\w+) published", 300).group(1)
            finally:
                first.stop()
            print(
                f"host A: cold boot + snapshot + publish {time.monotonic() - t:.1f}s (key {key})", flush=True
            )
            snap_store = a.root / "a1" / "snapshots"
            snap_bytes = SnapshotStore(snap_store).lookup(key).total_bytes  # type: ignore[union-attr]
            server = CacheServer(a, origin, a.root / "cache.log")
            try:
                tiers = f"{server.url},{origin}"
                cache = str(b.root / "b2-chunks")
                shutil.rmtree(cache, ignore_errors=True)
                # Fill B's chunk cache once (b2's pulls keep their chunks there).
                cached = ("--snapshot-tiers", tiers, "--snapshot-cache", cache)
                run_row(b, model, "b2", *cached, checkpointer=ck)

                def reset_b1() -> None:
                    shutil.rmtree(b.root / "b1", ignore_errors=True)

                def reset_b3() -> None:
                    shutil.rmtree(b.root / "b3", ignore_errors=True)

                def drop_b2_copy() -> None:
                    shutil.rmtree(b.root / "b2" / "snapshots", ignore_errors=True)

                # (label, run, reset before it); rows take turns, so load swings hit every row alike.
                plan = [
                    ("local restore on A (baseline)", lambda: run_row(a, model, "a1", checkpointer=ck), None),
                    (
                        "B, A's cache server, empty cache",
                        lambda: run_row(b, model, "b1", "--snapshot-tiers", tiers, checkpointer=ck),
                        reset_b1,
                    ),
                    (
                        "B, empty cache, pulled at launch",
                        lambda: run_row(
                            b, model, "b3", "--snapshot-tiers", tiers, checkpointer=ck, ahead=True
                        ),
                        reset_b3,
                    ),
                    (
                        "B, local copy (second restore)",
                        lambda: run_row(b, model, "b1", "--snapshot-tiers", tiers, checkpointer=ck),
                        None,
                    ),
                    (
                        "B, chunk cache only (no network)",
                        lambda: run_row(b, model, "b2", *cached, checkpointer=ck),
                        drop_b2_copy,
                    ),
                ]
                results: dict[str, list[tuple[float, str, str]]] = {label: [] for label, _, _ in plan}
                for i in range(args.repeat):
                    for label, run, reset in plan:
                        if reset is not None:
                            reset()
                        results[label].append(run())
                        print(f"run {i + 1}: {label:34s} {results[label][-1][0]:6.2f}s", flush=True)
                for label, _, _ in plan:
                    runs = sorted(results[label], key=lambda r: r[0])
                    middle = runs[(len(runs) - 1) // 2]  # its detail column is the median run's
                    rows.append((label, statistics.median(r[0] for r in runs), middle[1]))
                    logs[label] = middle[2]
                # Index load through the cache server: ref -> manifest -> index, then parse.
                loads, parses = [], []
                for _ in range(5):
                    t = time.monotonic()
                    tier = HttpTier(server.url)
                    fetcher = Fetcher(MemoryTier(1 << 20), None, [tier])
                    ref, _ = find_ref([tier], ref_name(key))  # type: ignore[misc]
                    json.loads(fetcher.get(ref.blobs["manifest"]))
                    data = fetcher.get(ref.index)
                    t_parse = time.monotonic()
                    index = ImageIndex.from_bytes(data)
                    parses.append(time.monotonic() - t_parse)
                    loads.append(time.monotonic() - t)
                    fetcher.close()
                index_chunks = index.n_chunks
                pulls = {}
                for workers in (1, 8):
                    times = []
                    for _ in range(args.repeat):
                        dest = base / f"pull-{workers}"
                        shutil.rmtree(dest, ignore_errors=True)
                        t = time.monotonic()
                        SnapshotTiers([server.url], workers=workers).pull(key, SnapshotStore(dest))
                        times.append(time.monotonic() - t)
                        shutil.rmtree(dest, ignore_errors=True)
                    pulls[workers] = statistics.median(times)
            finally:
                server.stop()
            pulled_log = logs["B, A's cache server, empty cache"]
            # Dedup: a re-snapshot of the same model (a fresh store on A) and a snapshot of another model.
            print("dedup: re-snapshot and another model ...", flush=True)
            again = Launcher(a, model, "a2", checkpointer=ck)
            try:
                again.wait_ready(900)
                again.wait_log(r"snapshot \w+ taken", 300)
            finally:
                again.stop()
            other = Launcher(a, other_model, "a3", checkpointer=ck)
            try:
                other.wait_ready(900)
                other.wait_log(r"snapshot \w+ (taken|failed)", 300)
            finally:
                other.stop()
            s1, s2, s3 = (image_files(a.root / n / "snapshots") for n in ("a1", "a2", "a3"))
            other_label = "another model (" + ("float32 weights)" if args.size == "tiny" else "seed 1)")
            dedup = {
                "re-snapshot, same model": (shared(s1, s2, 256 * 1024), shared(s1, s2, PAGE)),
                other_label: (shared(s1, s3, 256 * 1024), shared(s1, s3, PAGE)) if s3 else (None, None),
            }
    finally:
        shutil.rmtree(base, ignore_errors=True)

    baseline = rows[0][1]
    net = re.search(r"\(([\d.]+) MB over the network\)", pulled_log)
    pulled_mb = float(net.group(1)) if net else float("nan")
    ratio = pulled_mb * 1e6 / snap_bytes
    index_ms = statistics.median(loads) * 1000
    print()
    print(
        f"Snapshots across hosts: {args.size}, transformers serve, {ck}; snapshot {snap_bytes / 1e6:.0f} MB"
    )
    print(f"{'restore -> first token':34s} {'seconds':>8s} {'vs local':>9s}  how")
    for label, secs, detail in rows:
        print(f"{label:34s} {secs:8.2f} {secs / baseline:8.2f}x  {detail}")
    print()
    print(f"bytes pulled (empty cache)         {pulled_mb:8.1f} MB {ratio:8.2f}x of the snapshot")
    print(
        f"index: ref+manifest+index via HTTP {statistics.median(loads) * 1000:8.1f} ms "
        f"(parse {statistics.median(parses) * 1000:.2f} ms, {index_chunks} chunks)"
    )
    mb = snap_bytes / 1e6
    for workers, secs in pulls.items():
        print(f"pull only, {workers} fetch worker(s)        {secs:8.2f} s  {mb / secs:6.0f} MB/s")
    print(f"{'dedup share vs first snapshot':34s} {'256 KiB':>8s} {'4 KiB':>9s}")
    for label, (big, page) in dedup.items():
        if big is None or page is None:
            print(f"{label:34s} {'n/a: no snapshot (see its log)':>18s}")
        else:
            print(f"{label:34s} {big:8.1%} {page:9.1%}")
    empty = next(s for label, s, _ in rows if "empty" in label)
    warm = next(s for label, s, _ in rows if "local copy" in label)
    print()
    print(
        f"goals: empty cache {empty / baseline:.2f}x (<= 2x), warm {warm / baseline:.2f}x (<= 1.1x), "
        f"bytes {ratio:.2f}x (<= 1.0x), index {index_ms:.0f} ms (< 100 ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
