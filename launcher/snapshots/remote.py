"""Snapshots across hosts: publish a committed snapshot into an imagefs chunk store; find, gate and pull
it on another host through that host's tiers (local chunk cache -> cache servers -> origin).

Layout in the chunk store (``coldstart.imagefs.refs``)::

    refs/snapshot.<key>   the ref: index digest, manifest digest, bytes, a summary for ``ls``
    chunks/..             the manifest (one small blob), the index, the image files' 256 KiB chunks:
                          files that shrink (page images: a heap compresses ~4.5x) as NAME.zst
                          (``imagefs.compressed``), expanded as they are written on the pulling host

Pull, in the order that keeps a refused snapshot cheap (``pull``):
    ref (nearest tier that has it) -> manifest blob (verified; a few KB) -> **gate** (checkpointer version,
    host fingerprint, model files: the caller's) -> index blob (verified) -> chunks, fetched ahead by
    ``workers`` threads, small files first, page images last, each chunk verified, each file's size
    checked against the manifest -> committed into the local ``SnapshotStore`` (atomic rename). CRIU or
    runsc then restores from plain local files, exactly as a snapshot taken here.

Integrity: the ref is the root of trust (as a tag is); it names the manifest and the index by digest. Refs
come over plain HTTP from stores others can write, so with a trust key (``trust_key``, a secret file shared
by the deployment's hosts: ``remote_for(trust_key_file=...)``) every ref published here is signed
(HMAC-SHA256, ``imagefs.refs.Ref.mac``) and a ref without a valid signature is refused before its manifest is
read (``RemoteSnapshotError(DIGEST)``). The
publisher re-hashes the snapshot in full before it writes the ref, so the index's files have exactly the
manifest's digests, and a puller that verifies every chunk has every file right without hashing the files
again (that second SHA-256 pass cost 0.3 s of CPU per 335 MB on the restore's path;
``SnapshotTiers(verify_files=True)`` does it anyway).

Why local files and not CRIU reading through the FUSE mount: CRIU reads every byte of every page image
before the restored process runs (no lazy pages here), so a "restore profile" would list the whole image;
what is left to win is fetching in parallel, and a file filled ahead is also what the second restore on
this host reads at local-disk speed (the warm path is a local restore, ratio 1.0), with every chunk
verified before CRIU opens a file instead of an EIO in the middle of a restore.

Bounds: a pull ends within ``pull_deadline_s`` (600 s), each tier answer within its own deadline and size
cap (``imagefs.tiers.REQUEST_DEADLINE_S``, ``MAX_REF_BYTES``...: a ref dripping one byte per 5 s kept a
replica restoring for 150 s, a 1.5 GB ref took the launcher to 1.55 GB), and ``close()`` (the launcher
stopping) fails every pull in progress at once, its sockets shut down under it.

Faults: an unreachable tier is skipped (the fetcher's cooldown) and the next one answers; a chunk failing
its digest is discarded and fetched from the next tier; when no tier has a chunk the pull fails with
``RemoteSnapshotError(FETCH)`` and leaves nothing behind (the pending folder is removed; the chunk cache
only ever holds verified chunks). Two launchers on one host pulling one snapshot: a file lock per key, the
second waits and finds the first one's committed copy (fetched once).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coldstart.imagefs.errors import ImageError
from coldstart.imagefs.fetcher import Fetcher
from coldstart.imagefs.index import ImageIndex
from coldstart.imagefs.refs import Published, Ref, RefError, find_ref, materialize, publish, remove_ref
from coldstart.imagefs.tiers import DirectoryTier, MemoryTier, Tier, open_tier, split_token
from coldstart.launcher.errors import RemoteSnapshotError, RestoreReason, SnapshotError, UsageError
from coldstart.launcher.process import file_lock
from coldstart.launcher.snapshots.store import MANIFEST, Snapshot, SnapshotStore, private_dir

log = logging.getLogger("coldstart.snapshots")

REF_PREFIX = "snapshot."
DEFAULT_WORKERS = 8
MEMORY_BYTES = 32 << 20  # the fetcher's memory tier: the manifest and index; pages go straight to files
# A 1 GB CRIU image pulled here in 3-5 s from a cache server; 600 s is a tier that has stopped delivering.
DEFAULT_PULL_DEADLINE_S = 600.0

Gate = Callable[[dict[str, Any]], list[str]]  # manifest -> why it cannot restore here ([] = it can)


def ref_name(key: str) -> str:
    return REF_PREFIX + key


@dataclass
class RemoteSnapshot:
    key: str
    ref: Ref
    tier: str  # where the ref was found
    manifest: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return int(self.manifest.get("bytes", self.ref.size))


@dataclass
class PullReport:
    key: str
    bytes: int  # the snapshot's image bytes
    published_bytes: int = 0  # what the store holds of it (page images compressed)
    remote_bytes: int = 0  # bytes that came from cache servers or the origin
    local_bytes: int = 0  # bytes from the local chunk cache
    already_local: bool = False  # another puller on this host got it first
    phases: dict[str, float] = field(default_factory=dict)
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


def parse_tiers(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


class SnapshotTiers:
    """Where this host finds (``tiers``, nearest first, origin last) and publishes (``publish_to``, a chunk
    store directory, normally the origin or the store a ``coldstart image serve`` serves) snapshots."""

    def __init__(
        self,
        tiers: list[str],
        cache_dir: Path | None = None,
        publish_to: Path | None = None,
        *,
        workers: int = DEFAULT_WORKERS,
        verify_files: bool = False,
        pull_deadline_s: float = DEFAULT_PULL_DEADLINE_S,
        trust_key: bytes | None = None,
        compress: bool = True,
    ) -> None:
        if not tiers and publish_to is None:
            raise UsageError("remote snapshots need --snapshot-tiers or --snapshot-publish")
        self.tiers = list(tiers)
        for url in self.tiers:  # a typo is a usage error at launch, not a failed restore later
            try:
                open_tier(url).close()
            except ImageError as exc:
                raise UsageError(f"--snapshot-tiers: {exc}") from exc
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.publish_to = Path(publish_to) if publish_to else None
        self.workers = workers
        self.verify_files = verify_files
        self.pull_deadline_s = pull_deadline_s
        self.trust_key = trust_key  # refs published here are signed with it; pulled ones must be
        self.compress = compress  # page images published zstd-compressed (imagefs.compressed)
        self._closing = threading.Event()
        self._open: set[Fetcher] = set()  # fetchers of pulls in progress: close() shuts their tiers
        self._open_lock = threading.Lock()

    def close(self) -> None:
        """Fail every pull in progress now and refuse new ones (the launcher is stopping): their tiers'
        connections are shut down under them, and the threads they run in end."""
        self._closing.set()
        with self._open_lock:
            fetchers = list(self._open)
        for fetcher in fetchers:
            self._shut(fetcher)

    def _shut(self, fetcher: Fetcher) -> None:
        for tier in self._remotes(fetcher):
            tier.close()

    def _check(self, key: str, deadline: float) -> None:
        if self._closing.is_set():
            raise RemoteSnapshotError(RestoreReason.FETCH, f"snapshot {key}: pull cancelled (stopping)")
        if time.monotonic() > deadline:
            raise RemoteSnapshotError(
                RestoreReason.FETCH,
                f"snapshot {key}: not pulled within {self.pull_deadline_s:g} s: a tier stopped delivering "
                "(check --snapshot-tiers)",
            )

    # -- publishing -------------------------------------------------------------------------------
    def publish(self, snapshot: Snapshot, store: SnapshotStore | None = None) -> Published:
        """Publish a committed local snapshot into ``publish_to`` (chunks, index, manifest, then the ref).

        The snapshot is re-hashed in full first (``store.verify(full=True)``): the ref then binds a
        manifest to an index whose files have exactly the manifest's digests, so a host that pulls it
        verifies every chunk but need not hash every file again (0.3 s of CPU for 335 MB, on its restore
        path); ``verify_files=True`` on the puller does anyway."""
        if self.publish_to is None:
            raise UsageError("no store to publish into: pass --snapshot-publish DIR")
        (store or SnapshotStore(snapshot.path.parent)).verify(snapshot, full=True)
        private_dir(self.publish_to)  # chunks of page images: the engine's memory and environment
        manifest_bytes = (snapshot.path / MANIFEST).read_bytes()
        ident = snapshot.manifest.get("identity", {})
        summary = {
            "engine": ident.get("engine", {}).get("engine"),
            "engine_version": ident.get("engine", {}).get("engine_version"),
            "model": ident.get("engine", {}).get("model"),
            "checkpointer": f"{ident.get('checkpointer')} {ident.get('checkpointer_version')}",
            "created_at": snapshot.manifest.get("created_at"),
        }
        try:
            done = publish(
                snapshot.image_dir,
                self.publish_to,
                ref_name(snapshot.key),
                {"manifest": manifest_bytes},
                extra=summary,
                key=self.trust_key,
                compress=self.compress,
            )
        except (ImageError, OSError) as exc:
            raise SnapshotError(
                f"publishing snapshot {snapshot.key} to {self.publish_to} failed: {exc}"
            ) from exc
        log.info(
            "snapshot %s published to %s: %.1f MB (%.1f MB expanded), %d new chunks, %.2fs",
            snapshot.key, self.publish_to, done.ref.size / 1e6, snapshot.total_bytes / 1e6, done.new_chunks,
            done.seconds,
            extra={"event": "snapshot_published", "key": snapshot.key},
        )  # fmt: skip
        return done

    # -- finding ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _fetcher(self) -> Iterator[Fetcher]:
        remotes: list[Tier] = []
        try:
            for url in self.tiers:
                remotes.append(open_tier(url))
        except ImageError as exc:
            for tier in remotes:
                tier.close()
            raise UsageError(f"--snapshot-tiers: {exc}") from exc
        disk = (
            DirectoryTier(private_dir(self.cache_dir), name=f"cache:{self.cache_dir}", writable=True)
            if self.cache_dir
            else None
        )
        fetcher = Fetcher(MemoryTier(MEMORY_BYTES), disk, remotes)
        with self._open_lock:
            self._open.add(fetcher)
        try:
            # After close(): a pull that waited for another's lock (the pull ahead) must not start one
            # more request that nothing will shut.
            if self._closing.is_set():
                raise RemoteSnapshotError(RestoreReason.FETCH, "pull cancelled (stopping)")
            yield fetcher
        finally:
            with self._open_lock:
                self._open.discard(fetcher)
            fetcher.close()

    def _remotes(self, fetcher: Fetcher) -> list[Tier]:
        return fetcher.tiers[len(fetcher.tiers) - len(self.tiers) :]

    def _find(self, fetcher: Fetcher, key: str) -> RemoteSnapshot | None:
        try:
            found = find_ref(self._remotes(fetcher), ref_name(key))
        except ImageError as exc:
            raise RemoteSnapshotError(RestoreReason.FETCH, f"snapshot {key}: {exc}") from exc
        if found is None:
            return None
        ref, tier = found
        if self.trust_key is not None:
            try:
                ref.verify(self.trust_key, f"snapshot {key} on {tier}")
            except RefError as exc:
                raise RemoteSnapshotError(
                    RestoreReason.DIGEST,
                    f"{exc}: refused (publish with the same trust key, or check who writes that store)",
                ) from exc
        if "manifest" not in ref.blobs:
            raise RemoteSnapshotError(
                RestoreReason.DIGEST, f"snapshot {key} on {tier}: its ref names no manifest"
            )
        try:
            manifest = json.loads(fetcher.get(ref.blobs["manifest"]))
        except ImageError as exc:
            raise RemoteSnapshotError(
                RestoreReason.FETCH, f"snapshot {key}: manifest unavailable: {exc}"
            ) from exc
        except ValueError as exc:
            raise RemoteSnapshotError(
                RestoreReason.DIGEST, f"snapshot {key} on {tier}: manifest is not JSON"
            ) from exc
        if manifest.get("key") != key:
            raise RemoteSnapshotError(
                RestoreReason.DIGEST, f"snapshot {key} on {tier}: manifest is for {manifest.get('key')}"
            )
        return RemoteSnapshot(key, ref, tier, manifest)

    def find(self, key: str) -> RemoteSnapshot | None:
        """The snapshot's ref and verified manifest from the nearest tier; None when no tier has it."""
        with self._fetcher() as fetcher:
            return self._find(fetcher, key)

    def ls(self) -> list[RemoteSnapshot]:
        """Every snapshot the nearest answering tier lists (manifests fetched: they are small)."""
        with self._fetcher() as fetcher:
            names: list[str] = []
            for tier in self._remotes(fetcher):
                try:
                    names = tier.list_refs(REF_PREFIX)
                except ImageError as exc:
                    log.warning("cannot list snapshots on %s: %s", tier.name, exc)
                    continue
                break
            out = []
            for name in names:
                with contextlib.suppress(RemoteSnapshotError):
                    found = self._find(fetcher, name.removeprefix(REF_PREFIX))
                    if found is not None:
                        out.append(found)
            return out

    def rm(self, key: str) -> bool:
        """Remove a snapshot's ref from ``publish_to`` (its chunks go at the next ``gc``)."""
        if self.publish_to is None:
            raise UsageError("removing a remote snapshot needs the store directory: --snapshot-publish DIR")
        return remove_ref(self.publish_to, ref_name(key))

    # -- pulling ----------------------------------------------------------------------------------
    def pull(
        self,
        key: str,
        store: SnapshotStore,
        gate: Gate | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[Snapshot, PullReport]:
        """Find, gate and fetch snapshot ``key`` into ``store``; one puller per key per host at a time.
        Fails with ``RemoteSnapshotError(FETCH)`` past ``pull_deadline_s`` or once ``close()`` was called."""
        t0 = time.monotonic()
        self._check(key, t0 + self.pull_deadline_s)
        with _pull_lock(store, key):
            waited = time.monotonic() - t0
            try:
                local = store.lookup(key)
            except SnapshotError as exc:
                raise RemoteSnapshotError(RestoreReason.DIGEST, str(exc)) from exc
            if local is not None:  # another puller (or a snapshot taken here) got there first
                report = PullReport(key, local.total_bytes, already_local=True, phases={"lock": waited})
                return local, report
            try:
                with self._fetcher() as fetcher:
                    # At the deadline the tiers are shut under a read that still waits (a dripping tier).
                    timer = threading.Timer(
                        max(0.0, t0 + self.pull_deadline_s - time.monotonic()), self._shut, (fetcher,)
                    )
                    timer.daemon = True
                    timer.start()
                    try:
                        snapshot, report = self._pull(fetcher, key, store, gate, progress, t0)
                    finally:
                        timer.cancel()
                    report.phases["lock"] = waited
                    t = time.monotonic()
            except RemoteSnapshotError:
                self._check(key, t0 + self.pull_deadline_s)  # tiers shut by close() or the deadline: say so
                raise
            except OSError as exc:  # this host's disk (full, read-only): the replica cold-boots
                raise RemoteSnapshotError(
                    RestoreReason.FETCH, f"snapshot {key}: cannot write it here: {exc}"
                ) from exc
            report.phases["cache_flush"] = time.monotonic() - t  # close() writes what the cache still lacks
            return snapshot, report

    def _pull(
        self,
        fetcher: Fetcher,
        key: str,
        store: SnapshotStore,
        gate: Gate | None,
        progress: Callable[[int], None] | None,
        started: float,
    ) -> tuple[Snapshot, PullReport]:
        phases: dict[str, float] = {}
        deadline = started + self.pull_deadline_s

        def get(digest_hex: str) -> bytes:
            self._check(key, deadline)
            try:
                return fetcher.get(digest_hex)
            except ImageError:
                self._check(key, deadline)  # a tier shut by close(): say so, not "unavailable"
                raise

        t = time.monotonic()
        found = self._find(fetcher, key)
        self._check(key, deadline)
        if found is None:
            raise RemoteSnapshotError(
                RestoreReason.MISSING,
                f"no snapshot {key} locally or on tiers {', '.join(split_token(t)[0] for t in self.tiers)}",
            )
        phases["manifest"] = time.monotonic() - t
        t = time.monotonic()
        problems = gate(found.manifest) if gate is not None else []
        phases["gate"] = time.monotonic() - t
        if problems:  # refused before a byte of the image is fetched
            raise RemoteSnapshotError(
                RestoreReason.GATE,
                f"snapshot {key} on {found.tier} does not fit this host: " + "; ".join(problems),
            )
        t = time.monotonic()
        try:
            index = ImageIndex.from_bytes(get(found.ref.index), f"snapshot {key} index")
        except ImageError as exc:
            raise RemoteSnapshotError(
                RestoreReason.FETCH, f"snapshot {key}: index unavailable: {exc}"
            ) from exc
        phases["index"] = time.monotonic() - t
        files: dict[str, Any] = found.manifest.get("files") or {}
        report = PullReport(key, int(found.manifest.get("bytes", 0)), found.ref.size, phases=phases)
        with store.begin(key) as pending:
            t = time.monotonic()
            try:
                written = materialize(
                    index,
                    get,
                    pending.image_dir,
                    workers=self.workers,
                    progress=progress,
                    hash_files=self.verify_files,
                    compressed=found.ref.compressed,
                )
            except ImageError as exc:
                raise RemoteSnapshotError(RestoreReason.FETCH, f"snapshot {key}: {exc}") from exc
            phases["fetch"] = time.monotonic() - t
            got = {f"image/{rel}": meta for rel, meta in written.items()}
            if set(got) != set(files):
                raise RemoteSnapshotError(
                    RestoreReason.DIGEST,
                    f"snapshot {key}: published files differ from its manifest's; publish it again",
                )
            for rel, meta in got.items():
                if meta.size != files[rel]["size"] or meta.sha256 not in (None, files[rel]["sha256"]):
                    raise RemoteSnapshotError(
                        RestoreReason.DIGEST,
                        f"snapshot {key}: {rel} does not match its manifest; publish it again",
                    )
            t = time.monotonic()
            snapshot = store.commit_verified(pending, found.manifest)
            phases["commit"] = time.monotonic() - t
        stats = fetcher.stats()
        report.tiers = stats
        report.remote_bytes = fetcher.remote_bytes()
        report.local_bytes = sum(s["bytes"] for name, s in stats.items() if name.startswith("cache:"))
        log.info(
            "snapshot %s pulled from %s: %.1f MB (%.1f MB published, %.1f MB over the network) in %.2fs",
            key, found.tier, report.bytes / 1e6, report.published_bytes / 1e6, report.remote_bytes / 1e6,
            sum(phases.values()),
            extra={"event": "snapshot_pulled", "key": key, "remote_bytes": report.remote_bytes},
        )  # fmt: skip
        return snapshot, report


def _pull_lock(store: SnapshotStore, key: str) -> contextlib.AbstractContextManager[None]:
    return file_lock(store.state_dir / f"{key}.pull.lock")


def read_trust_key(path: Path) -> bytes:
    """The deployment's trust key from ``path`` (any secret of 16 bytes or more; keep the file 0600)."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise UsageError(f"trust key {path}: {exc.strerror or exc}") from exc
    if len(key) < 16:
        raise UsageError(f"trust key {path} has {len(key)} bytes: write 16 or more random bytes into it")
    return key


def remote_for(
    tiers: str | list[str] | tuple[str, ...] | None,
    cache: Path | None,
    publish_to: Path | None,
    trust_key_file: Path | None = None,
) -> SnapshotTiers | None:
    """``SnapshotTiers`` for ``--snapshot-tiers`` (comma-separated or a list), ``--snapshot-cache``,
    ``--snapshot-publish`` and the trust key that signs and checks refs; None when neither tiers nor a
    store to publish into is given."""
    urls = parse_tiers(tiers) if isinstance(tiers, str) or tiers is None else list(tiers)
    if not urls and publish_to is None:
        return None
    key = read_trust_key(trust_key_file) if trust_key_file is not None else None
    return SnapshotTiers(urls, cache, publish_to, trust_key=key)
