"""The fetcher and tiers without FUSE: order, verification, failure reporting, single flight."""

from __future__ import annotations

import os
import threading
import time

import pytest

from coldstart.imagefs.errors import ChunkUnavailable, UsageError
from coldstart.imagefs.fetcher import Fetcher
from coldstart.imagefs.store import ChunkStore
from coldstart.imagefs.tiers import DirectoryTier, HttpTier, MemoryTier, Tier, open_tier


def _setup(tmp_path, remotes: list[Tier] | None = None) -> tuple[Fetcher, ChunkStore, ChunkStore]:
    origin = ChunkStore(tmp_path / "origin")
    disk = ChunkStore(tmp_path / "disk")
    tiers = remotes if remotes is not None else [DirectoryTier(origin.root, "origin")]
    fetcher = Fetcher(MemoryTier(1 << 20), DirectoryTier(disk.root, "disk", writable=True), tiers)
    return fetcher, origin, disk


def test_fetch_fills_nearer_tiers(tmp_path) -> None:
    fetcher, origin, disk = _setup(tmp_path)
    digest, _ = origin.put(b"chunk")
    assert fetcher.get(digest.hex()) == b"chunk"
    fetcher.flush()
    assert disk.read(digest.hex()) == b"chunk"
    assert fetcher.peek(digest.hex()) == b"chunk"
    stats = fetcher.stats()
    assert stats["origin"]["hits"] == 1 and stats["memory"]["hits"] == 1
    assert fetcher.remote_bytes() == 5


def test_corrupt_disk_copy_is_replaced(tmp_path) -> None:
    fetcher, origin, disk = _setup(tmp_path)
    digest, _ = origin.put(b"right")
    disk.write(digest.hex(), b"wrong")
    assert fetcher.get(digest.hex()) == b"right"
    fetcher.flush()
    assert disk.read(digest.hex()) == b"right"
    assert fetcher.stats()["disk"]["corrupt"] == 1


def test_cache_writer_runs_idle_and_still_writes(tmp_path) -> None:
    fetcher, origin, disk = _setup(tmp_path)
    digests = [origin.put(bytes([i]) * 1000)[0].hex() for i in range(20)]
    for digest_hex in digests:
        fetcher.get(digest_hex)
    fetcher.flush()
    tid = fetcher.cache_writer_tid
    assert tid is not None
    if os.geteuid() == 0:  # an unprivileged writer may keep its policy (logged, not an error)
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE  # back to idle after the flush
    fetcher.close()
    assert all(disk.has(d) for d in digests)


def test_corrupt_origin_chunk_is_refused_and_never_cached(tmp_path) -> None:
    fetcher, origin, disk = _setup(tmp_path)
    digest_hex = ChunkStore(tmp_path / "elsewhere").put(b"right")[0].hex()
    origin.write(digest_hex, b"wrong")  # the only copy anywhere fails its digest
    for _ in range(2):  # refused every time: nothing unverified was kept in memory or on disk
        with pytest.raises(ChunkUnavailable, match="digest mismatch"):
            fetcher.get(digest_hex)
    fetcher.flush()
    assert fetcher.peek(digest_hex) is None and not disk.has(digest_hex)
    assert fetcher.stats()["origin"]["corrupt"] == 2


def test_missing_everywhere_names_the_chunk(tmp_path) -> None:
    fetcher, _, _ = _setup(tmp_path)
    with pytest.raises(ChunkUnavailable, match="ab" * 32) as info:
        fetcher.get("ab" * 32)
    assert any("absent" in reason for reason in info.value.reasons)


def test_unreachable_tier_is_skipped(tmp_path) -> None:
    origin = ChunkStore(tmp_path / "origin")
    digest, _ = origin.put(b"data")
    dead = HttpTier("http://127.0.0.1:9")  # discard port: connection refused
    fetcher, _, _ = _setup(tmp_path, [dead, DirectoryTier(origin.root, "origin")])
    assert fetcher.get(digest.hex()) == b"data"
    digest2, _ = origin.put(b"more")
    assert fetcher.get(digest2.hex()) == b"more"
    stats = fetcher.stats()
    assert stats[dead.name]["errors"] == 1  # the second fetch skipped it (cooldown)
    fetcher.close()


class SlowTier(Tier):
    def __init__(self, data: dict[str, bytes]) -> None:
        self.name = "slow"
        self.data = data
        self.calls = 0

    def get(self, digest_hex: str) -> bytes | None:
        self.calls += 1
        time.sleep(0.2)
        return self.data.get(digest_hex)


def test_concurrent_requests_share_one_fetch(tmp_path) -> None:
    store = ChunkStore(tmp_path / "x")
    digest, _ = store.put(b"once")
    slow = SlowTier({digest.hex(): b"once"})
    fetcher = Fetcher(MemoryTier(0), None, [slow])
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(fetcher.get(digest.hex()))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"once"] * 5
    assert slow.calls == 1


def test_memory_tier_is_bounded() -> None:
    mem = MemoryTier(10)
    mem.put("a", b"12345")
    mem.put("b", b"12345")
    mem.put("c", b"12345")
    assert mem.get("a") is None and mem.get("c") == b"12345"


def test_open_tier_registry(tmp_path) -> None:
    assert isinstance(open_tier(str(tmp_path)), DirectoryTier)
    assert isinstance(open_tier(f"file://{tmp_path}"), DirectoryTier)
    assert isinstance(open_tier("http://127.0.0.1:1"), HttpTier)
    with pytest.raises(UsageError, match="valid: http, https, file"):
        open_tier("s3://bucket")
    with pytest.raises(UsageError, match="not a directory"):
        open_tier(str(tmp_path / "missing"))
