"""Named, published trees (snapshots, images) in a chunk store: ``refs/<name>`` -> index + small blobs.

A ref is the one mutable thing in a store; everything it points at is content-addressed::

    STORE/refs/<name>        {"format": 1, "name": ..., "index": <sha256 hex>, "blobs": {"manifest": <hex>},
                              "bytes": <tree bytes>, "chunks": <chunk count>, "chunk_size": ...}
    STORE/chunks/..          the tree's chunks, its index and its blobs (an index or a manifest is one
                             "chunk" of any size: the fetcher verifies it by its SHA-256 like any other)

``publish`` writes chunks, then the index and blobs, then the ref last (atomic rename), so a reader that
sees a ref finds everything it names. A reader fetches the ref, then the small blobs (a snapshot's manifest,
to decide whether it wants the rest), then the index, then chunks -- all through the same verified tiers.

``materialize`` writes a published tree into a local directory: chunks fetched ahead and in parallel
(``workers`` threads, a bounded window so memory stays ~``window`` chunks), each file written and hashed in
order, so a file's SHA-256 is known the moment its last byte lands (no second pass over the bytes). The
index's mode bits are not trusted (a crafted published tree put a mode-04755 root-owned file on a pulling
host): setuid, setgid, sticky and group/other write are stripped (``SAFE_MODE_BITS``).

Integrity root: a ref names everything else by digest, so whoever can write a ref (a cache server, the
network over plain HTTP) decides what a puller restores. Refs published with a key carry ``mac``, an
HMAC-SHA256 over the ref's other fields; ``Ref.verify(key)`` refuses a ref whose mac is missing or wrong, so a
puller holding the deployment's key trusts only refs its publishers signed (and, through the digests, their
manifests, indexes and chunks).

``gc`` deletes chunks no ref and no ``images/*.cidx`` names; chunks younger than ``min_age_s`` survive (a
publish in progress writes its chunks before its ref).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coldstart.imagefs.build import build
from coldstart.imagefs.compressed import SUFFIX, Expander, stage
from coldstart.imagefs.errors import ImageError, IndexFormatError, UsageError
from coldstart.imagefs.index import ImageIndex
from coldstart.imagefs.store import DEFAULT_CHUNK_SIZE, ChunkStore, is_hex_digest, write_atomic

REF_FORMAT = 1
# The mode bits materialize keeps from an index: rwx for the owner, r-x for group and others. No setuid,
# setgid or sticky bit and no group/other write, whatever the publisher wrote.
SAFE_MODE_BITS = 0o755
REF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class RefError(ImageError):
    """A ref is malformed, or names a tree this store cannot describe."""


def check_ref_name(name: str) -> str:
    if not REF_NAME.match(name):
        raise UsageError(f"ref name {name!r} is not valid; use letters, digits, '.', '_' and '-'")
    return name


def ref_path(store_root: str | Path, name: str) -> Path:
    return Path(store_root) / "refs" / check_ref_name(name)


@dataclass(frozen=True)
class Ref:
    name: str
    index: str  # sha256 hex of the index bytes
    blobs: dict[str, str]  # small named blobs (a snapshot's manifest), sha256 hex each
    size: int  # bytes of the tree's files ("bytes" in the JSON)
    chunks: int
    chunk_size: int
    extra: dict[str, Any] = field(default_factory=dict)
    # Files published zstd-compressed as NAME.zst (``imagefs.compressed``); materialize expands them.
    compressed: list[str] = field(default_factory=list)
    mac: str | None = None  # HMAC-SHA256 hex of ``signed_bytes()`` with the publisher's key; None: unsigned

    def signed_bytes(self) -> bytes:
        """What ``mac`` covers: every field but ``mac``, canonical JSON."""
        return json.dumps(self._body(), sort_keys=True, separators=(",", ":")).encode()

    def signed(self, key: bytes) -> Ref:
        return dataclasses.replace(self, mac=hmac.new(key, self.signed_bytes(), hashlib.sha256).hexdigest())

    def verify(self, key: bytes, source: str) -> None:
        """Raise ``RefError`` unless this ref carries a mac made with ``key``."""
        if self.mac is None:
            raise RefError(f"{source}: the ref is not signed, and this host trusts only signed refs")
        want = hmac.new(key, self.signed_bytes(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, self.mac):
            raise RefError(f"{source}: the ref's signature does not match this host's trust key")

    def _body(self) -> dict[str, Any]:
        body = {
            "format": REF_FORMAT,
            "name": self.name,
            "index": self.index,
            "blobs": self.blobs,
            "bytes": self.size,
            "chunks": self.chunks,
            "chunk_size": self.chunk_size,
            "extra": self.extra,
        }
        if self.compressed:  # absent when empty: refs published before compression sign the same bytes
            body["compressed"] = self.compressed
        return body

    def to_json(self) -> bytes:
        body = self._body()
        if self.mac is not None:
            body["mac"] = self.mac
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes, source: str) -> Ref:
        try:
            body = json.loads(data)
            ref = cls(
                name=str(body["name"]),
                index=str(body["index"]),
                blobs={str(k): str(v) for k, v in dict(body.get("blobs") or {}).items()},
                size=int(body["bytes"]),
                chunks=int(body["chunks"]),
                chunk_size=int(body["chunk_size"]),
                extra=dict(body.get("extra") or {}),
                compressed=[str(name) for name in body.get("compressed") or []],
                mac=str(body["mac"]) if body.get("mac") is not None else None,
            )
            fmt = body.get("format")
        except (ValueError, KeyError, TypeError) as exc:
            raise RefError(f"{source}: unreadable ref ({exc}); publish it again") from exc
        if fmt != REF_FORMAT:
            raise RefError(f"{source}: ref format {fmt} is not supported (this build reads {REF_FORMAT})")
        if not all(is_hex_digest(d) for d in (ref.index, *ref.blobs.values())):
            raise RefError(f"{source}: ref names a digest that is not sha256 hex; publish it again")
        return ref


@dataclass(frozen=True)
class Published:
    ref: Ref
    new_chunks: int
    seconds: float


def publish(
    src: str | Path,
    store_root: str | Path,
    name: str,
    blobs: dict[str, bytes] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra: dict[str, Any] | None = None,
    key: bytes | None = None,
    compress: bool = False,
) -> Published:
    """Publish directory ``src`` into the store as ``refs/<name>`` (replacing an older ref of that name),
    signed with ``key`` when given (``Ref.mac``). With ``compress``, files that shrink are published
    zstd-compressed (``imagefs.compressed``; staged in a folder beside ``src``, removed after)."""
    started = time.monotonic()
    check_ref_name(name)
    store_root = Path(store_root)
    store = ChunkStore(store_root)
    (store_root / "refs").mkdir(parents=True, exist_ok=True)
    fd, tmp_index = tempfile.mkstemp(prefix=".publish-", suffix=".cidx", dir=store_root)
    os.close(fd)
    staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=Path(src).parent)) if compress else None
    try:
        compressed = stage(Path(src), staging) if staging is not None else []
        result = build(staging or src, store_root, tmp_index, chunk_size)
        index_bytes = Path(tmp_index).read_bytes()
    finally:
        Path(tmp_index).unlink(missing_ok=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    index_digest, new_index = store.put(index_bytes)
    blob_digests = {}
    new_blobs = 0
    for blob_name, data in sorted((blobs or {}).items()):
        digest, new = store.put(data)
        blob_digests[blob_name] = digest.hex()
        new_blobs += new
    ref = Ref(
        name=name,
        index=index_digest.hex(),
        blobs=blob_digests,
        size=result.bytes,
        chunks=result.chunks,
        chunk_size=chunk_size,
        extra=extra or {},
        compressed=compressed,
    )
    if key is not None:
        ref = ref.signed(key)
    write_atomic(ref_path(store_root, name), ref.to_json())  # last: a visible ref names only stored bytes
    return Published(ref, result.new_chunks + new_index + new_blobs, time.monotonic() - started)


def read_local_ref(store_root: str | Path, name: str) -> Ref | None:
    path = ref_path(store_root, name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return Ref.parse(data, str(path))


def list_local_refs(store_root: str | Path, prefix: str = "") -> list[str]:
    refs = Path(store_root) / "refs"
    if not refs.is_dir():
        return []
    return sorted(
        p.name for p in refs.iterdir() if p.is_file() and REF_NAME.match(p.name) and p.name.startswith(prefix)
    )


def remove_ref(store_root: str | Path, name: str) -> bool:
    """Remove a ref (its chunks stay until ``gc``); False when there was none."""
    try:
        ref_path(store_root, name).unlink()
    except FileNotFoundError:
        return False
    return True


def _live_digests(store_root: Path) -> set[str]:
    """Every chunk a ref or an ``images/*.cidx`` index names (the roots of gc)."""
    store = ChunkStore(store_root)
    live: set[str] = set()
    for name in list_local_refs(store_root):
        ref = read_local_ref(store_root, name)
        assert ref is not None
        live.add(ref.index)
        live.update(ref.blobs.values())
        data = store.read(ref.index)
        if data is None or hashlib.sha256(data).hexdigest() != ref.index:
            raise RefError(f"ref {name}: its index {ref.index[:12]} is missing or corrupt; gc refuses to run")
        live.update(d.hex() for d in ImageIndex.from_bytes(data, f"ref {name}").all_digests())
    images = store_root / "images"
    for index in images.rglob("*.cidx") if images.is_dir() else ():
        live.update(d.hex() for d in ImageIndex.open(index).all_digests())
    return live


@dataclass(frozen=True)
class GcResult:
    removed_chunks: int
    removed_bytes: int
    kept_chunks: int


def gc(store_root: str | Path, *, min_age_s: float = 3600.0, now: float | None = None) -> GcResult:
    """Delete chunks nothing names; those written in the last ``min_age_s`` stay (publishes in flight)."""
    store_root = Path(store_root)
    live = _live_digests(store_root)
    now = time.time() if now is None else now
    removed = removed_bytes = kept = 0
    chunks = store_root / "chunks"
    for path in chunks.glob("??/*") if chunks.is_dir() else ():
        name = path.name
        if not is_hex_digest(name):
            continue
        st = path.stat()
        if name in live or now - st.st_mtime < min_age_s:
            kept += 1
            continue
        path.unlink(missing_ok=True)
        removed += 1
        removed_bytes += st.st_size
    return GcResult(removed, removed_bytes, kept)


# -- reading a published tree into a local directory -----------------------------------------------------


@dataclass
class FileDigest:
    size: int
    sha256: str | None  # None when materialize was asked not to hash


Getter = Callable[[str], bytes]  # verified chunk by sha256 hex (a Fetcher's get)


def regular_files(index: ImageIndex) -> list[tuple[str, int]]:
    """(relative path, inode) of every regular file; small files first (manifests of the tree, metadata
    a consumer opens first), the big page images last, in order of size."""
    files: list[tuple[str, int]] = [(path, inode) for path, inode in index.walk() if index.is_reg(inode)]
    return sorted(files, key=lambda item: (index.size[item[1]], item[0]))


def materialize(
    index: ImageIndex,
    get: Getter,
    dest: str | Path,
    *,
    order: Iterable[tuple[str, int]] | None = None,
    workers: int = 8,
    window: int = 64,
    progress: Callable[[int], None] | None = None,
    hash_files: bool = True,
    compressed: Iterable[str] = (),
) -> dict[str, FileDigest]:
    """Write every directory and regular file of ``index`` under ``dest`` (which must exist).

    Chunks are fetched by ``workers`` threads up to ``window`` chunks ahead of the writer, in file order;
    returns each file's size and SHA-256 (computed as it is written; skipped with ``hash_files=False``
    when the caller trusts the publisher's binding of index and file digests: every chunk is still
    verified by the getter). Symlinks and special files are not
    materialized (a snapshot holds none); on any error the caller removes ``dest``. Each name in
    ``compressed`` (``Ref.compressed``), published as ``NAME.zst``, is written expanded as ``NAME``; its
    size and digest are the expanded bytes' (``progress`` counts the bytes fetched)."""
    dest = Path(dest)
    expand = set(compressed)
    files: list[tuple[str, int]] = list(order) if order is not None else regular_files(index)
    for rel, node in index.walk():
        if rel and index.is_dir(node):
            (dest / rel).mkdir(parents=True, exist_ok=True)
    plan = [(path, inode, k) for path, inode in files for k in range(index.chunk_count(inode))]
    out: dict[str, FileDigest] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagefs-pull") as pool:
        pending: deque[Future[bytes]] = deque()
        queued = 0

        def top_up() -> None:
            nonlocal queued
            while queued < len(plan) and len(pending) < window:
                _, inode, k = plan[queued]
                pending.append(pool.submit(get, index.chunk_digest(inode, k).hex()))
                queued += 1

        try:
            for path, inode in files:
                size = index.size[inode]
                hasher = hashlib.sha256() if hash_files else None
                raw_name = path.removesuffix(SUFFIX)
                expander = Expander(path) if path.endswith(SUFFIX) and raw_name in expand else None
                target = dest / (raw_name if expander is not None else path)
                target.parent.mkdir(parents=True, exist_ok=True)
                fetched = 0
                with open(target, "wb", buffering=0) as f:
                    for _ in range(index.chunk_count(inode)):
                        top_up()
                        data = pending.popleft().result()
                        fetched += len(data)
                        if progress is not None:
                            progress(len(data))
                        if expander is not None:
                            data = expander.feed(data)
                        if hasher is not None:
                            hasher.update(data)
                        view = memoryview(data)
                        while view:
                            view = view[f.write(view) :]
                    if fetched != size:
                        raise IndexFormatError(f"{path}: got {fetched} bytes, index says {size}")
                    if expander is not None:
                        expander.finish()
                    written = f.tell()
                os.chmod(target, index.mode[inode] & SAFE_MODE_BITS)
                out[target.relative_to(dest).as_posix()] = FileDigest(
                    written, hasher.hexdigest() if hasher is not None else None
                )
        finally:
            for fut in pending:
                fut.cancel()
    return out


def find_ref(tiers: Iterable[Any], name: str) -> tuple[Ref, str] | None:
    """The ref called ``name`` from the nearest tier that has it, and that tier's name; None when every
    reachable tier lacks it. Raises ``TierError`` only when no tier could be asked at all."""
    from coldstart.imagefs.errors import TierError

    check_ref_name(name)
    errors: list[str] = []
    asked = 0
    for tier in tiers:
        try:
            data = tier.get_ref(name)
        except TierError as exc:
            errors.append(str(exc))
            continue
        asked += 1
        if data is not None:
            return Ref.parse(data, f"{tier.name} ref {name}"), tier.name
    if asked == 0 and errors:
        raise TierError(f"ref {name}: no tier answered ({'; '.join(errors)}); check the tier URLs")
    return None
