"""Fetch a chunk through the tiers, verify it, keep it in the nearer caches.

Invariants:
- a chunk handed out has the SHA-256 it was asked for, whatever tier it came from;
- a corrupt copy on a cache tier is discarded and fetched from the next tier (counted as ``corrupt``);
- an unreachable tier is skipped for ``cooldown_s`` (never the last tier, the origin), so a dead cache server
  costs one connection attempt, not one per read;
- when no tier has it, ``ChunkUnavailable`` names the chunk and why each tier failed (the FS maps it to EIO);
- concurrent requests for one chunk share one fetch (single flight), so read-ahead and prefetch never
  download the same bytes twice;
- the local disk cache is written off the read path by one writer thread (writing a file costs more than
  reading and hashing it here: ext4 write+rename 0.3-1.7 GB/s depending on the host's dirty-page backlog,
  against ~1.3 GB/s read+verify); at most ``max_pending_writes`` chunks wait (256 MiB of 256 KiB chunks),
  beyond that a chunk is not cached (counted as ``cache_skipped``) rather than slowing the read; prefetch
  waits for a slot instead. The writer runs under ``SCHED_IDLE``: writing at normal priority took the CPU
  from the reads it caches for (a cold fetch loop fell from 0.6-0.8 to 0.3 GB/s with the writer at nice 0,
  0.5 at nice 19, 0.75 at SCHED_IDLE, measured side by side). ``close`` puts it back to normal priority
  and flushes what is pending, so an unmount never waits on idle time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from coldstart.imagefs.errors import ChunkUnavailable, TierError
from coldstart.imagefs.tiers import DirectoryTier, MemoryTier, Tier, open_tier

log = logging.getLogger("coldstart.imagefs")


@dataclass
class TierStats:
    hits: int = 0
    bytes: int = 0
    misses: int = 0
    errors: int = 0
    corrupt: int = 0
    cache_skipped: int = 0


class Fetcher:
    """Memory -> disk cache -> remote tiers (the last one is the origin); thread-safe."""

    def __init__(
        self,
        memory: MemoryTier,
        disk: DirectoryTier | None,
        remotes: list[Tier],
        cooldown_s: float = 2.0,
        max_pending_writes: int = 1024,
    ) -> None:
        self.tiers: list[Tier] = [memory] + ([disk] if disk is not None else []) + list(remotes)
        self.memory = memory
        self._local = {memory.name} | ({disk.name} if disk is not None else set())
        self.cooldown_s = cooldown_s
        self._stats = {t.name: TierStats() for t in self.tiers}
        self._down_until: dict[str, float] = {}
        self._inflight: dict[str, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._writer_tid: int | None = None
        self._writer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="imagefs-cache-writer", initializer=self._writer_started
        )
        self._write_slots = threading.BoundedSemaphore(max_pending_writes)

    @property
    def cache_writer_tid(self) -> int | None:
        """Native thread id of the cache writer (None until the first write starts it)."""
        return self._writer_tid

    def _writer_started(self) -> None:
        self._writer_tid = threading.get_native_id()
        self._set_writer_policy(os.SCHED_IDLE)

    def _set_writer_policy(self, policy: int) -> None:
        if self._writer_tid is None:
            return
        try:
            os.sched_setscheduler(self._writer_tid, policy, os.sched_param(0))
        except OSError as exc:  # not permitted (unprivileged, RLIMIT_NICE): the writer keeps its priority
            log.debug("cache writer scheduling policy unchanged: %s", exc)

    @property
    def all_local(self) -> bool:
        """Every tier is memory or a directory: fetching costs CPU, not waiting."""
        return all(t.local for t in self.tiers)

    def peek(self, digest_hex: str) -> bytes | None:
        """The chunk if it is in memory (cheap enough for the trio thread)."""
        data = self.memory.get(digest_hex)
        if data is not None:
            with self._lock:
                st = self._stats[self.memory.name]
                st.hits += 1
                st.bytes += len(data)
        return data

    @classmethod
    def for_mount(cls, cache_dir: str | Path, tier_urls: Sequence[str], memory_bytes: int) -> Fetcher:
        """Memory -> the mount's disk cache (``cache_dir``, named "disk" in the stats) -> ``tier_urls``: what
        a mount's daemon reads through, and what a hot tree is built with (the same cache)."""
        return cls(
            MemoryTier(memory_bytes),
            DirectoryTier(cache_dir, "disk", writable=True),
            [open_tier(url) for url in tier_urls],
        )

    def get(self, digest_hex: str, must_cache: bool = False) -> bytes:
        """The verified chunk, from the nearest tier that has it; blocks (call it from a worker thread).

        ``must_cache`` (prefetch) waits for a cache-write slot instead of skipping the disk cache."""
        with self._lock:
            pending = self._inflight.get(digest_hex)
            leader = pending is None
            if leader:
                pending = self._inflight[digest_hex] = Future()
        assert pending is not None
        if not leader:
            return pending.result()
        try:
            data = self._fetch(digest_hex, must_cache)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(data)
            return data
        finally:
            with self._lock:
                del self._inflight[digest_hex]

    def get_many(self, digests: list[str], must_cache: bool = False) -> list[bytes]:
        """``get`` for several chunks in one call (one thread hop for a whole FUSE request)."""
        return [self.get(digest_hex, must_cache) for digest_hex in digests]

    def _fetch(self, digest_hex: str, must_cache: bool = False) -> bytes:
        want = bytes.fromhex(digest_hex)
        reasons: list[str] = []
        last = len(self.tiers) - 1
        for i, tier in enumerate(self.tiers):
            st = self._stats[tier.name]
            if i != last and self._down_until.get(tier.name, 0.0) > time.monotonic():
                reasons.append(f"{tier.name}: skipped, unreachable recently")
                continue
            try:
                data = tier.get(digest_hex)
            except TierError as exc:
                with self._lock:
                    st.errors += 1
                    self._down_until[tier.name] = time.monotonic() + self.cooldown_s
                log.warning("tier unreachable, trying the next one: %s", exc)
                reasons.append(str(exc))
                continue
            if data is None:
                with self._lock:
                    st.misses += 1
                reasons.append(f"{tier.name}: absent")
                continue
            if hashlib.sha256(data).digest() != want:
                with self._lock:
                    st.corrupt += 1
                log.warning(
                    "chunk %s from %s fails its digest; discarding it, trying the next tier",
                    digest_hex,
                    tier.name,
                )
                tier.discard(digest_hex)
                reasons.append(f"{tier.name}: digest mismatch")
                continue
            with self._lock:
                st.hits += 1
                st.bytes += len(data)
            for nearer in self.tiers[:i]:
                if nearer is self.memory:
                    nearer.put(digest_hex, data)
                elif nearer.writable:
                    self._keep_later(nearer, digest_hex, data, must_cache)
            return data
        log.error("chunk %s is unavailable on every tier: %s", digest_hex, "; ".join(reasons))
        raise ChunkUnavailable(digest_hex, reasons)

    def _keep_later(self, tier: Tier, digest_hex: str, data: bytes, wait: bool = False) -> None:
        if not self._write_slots.acquire(blocking=wait):
            with self._lock:
                self._stats[tier.name].cache_skipped += 1
            return

        def write() -> None:
            try:
                tier.put(digest_hex, data)
            except TierError as exc:
                log.warning("cannot keep chunk in a cache: %s", exc)
            finally:
                self._write_slots.release()

        self._writer.submit(write)

    def flush(self) -> None:
        """Wait for pending cache writes (at normal priority meanwhile)."""
        self._set_writer_policy(os.SCHED_OTHER)
        try:
            self._writer.submit(lambda: None).result()
        finally:
            self._set_writer_policy(os.SCHED_IDLE)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: asdict(st) for name, st in self._stats.items()}

    def remote_bytes(self) -> int:
        """Bytes that came from beyond the local caches (HTTP cache servers and origin)."""
        with self._lock:
            return sum(st.bytes for name, st in self._stats.items() if name not in self._local)

    def close(self) -> None:
        self._set_writer_policy(os.SCHED_OTHER)
        self._writer.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()
