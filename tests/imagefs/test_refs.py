"""Refs: named, published trees in a chunk store, found through tiers and the cache server, materialized,
collected. Real files, real ``coldstart image serve`` processes."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from support import heap_like

from coldstart.imagefs.build import build
from coldstart.imagefs.errors import IndexFormatError, UsageError
from coldstart.imagefs.fetcher import Fetcher
from coldstart.imagefs.index import ImageIndex
from coldstart.imagefs.refs import (
    Ref,
    find_ref,
    gc,
    list_local_refs,
    materialize,
    publish,
    read_local_ref,
    remove_ref,
)
from coldstart.imagefs.tiers import DirectoryTier, HttpTier, MemoryTier

CHUNK = 64 * 1024


def tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "small.img").write_bytes(b"inventory")
    (root / "sub" / "pages.img").write_bytes(os.urandom(7 * CHUNK + 11))
    (root / "empty.img").write_bytes(b"")
    return root


def test_publish_writes_chunks_then_the_ref(tmp_path: Path) -> None:
    store = tmp_path / "store"
    done = publish(
        tree(tmp_path / "src"), store, "snapshot.k1", {"manifest": b'{"key": "k1"}'}, chunk_size=CHUNK
    )
    ref = read_local_ref(store, "snapshot.k1")
    assert ref == done.ref and ref.size == 7 * CHUNK + 11 + len(b"inventory")
    for digest in (ref.index, ref.blobs["manifest"]):
        assert hashlib.sha256((store / "chunks" / digest[:2] / digest).read_bytes()).hexdigest() == digest
    assert list_local_refs(store, "snapshot.") == ["snapshot.k1"] and list_local_refs(store, "image.") == []
    assert not list(store.glob(".publish-*"))  # the temporary index is gone
    with pytest.raises(UsageError):
        publish(tmp_path / "src", store, "../escape")


def test_find_materialize_through_a_cache_server(tmp_path: Path, chunk_server) -> None:  # type: ignore[no-untyped-def]
    src = tree(tmp_path / "src")
    origin = tmp_path / "origin"
    publish(src, origin, "snapshot.k1", {"manifest": b"m"}, chunk_size=CHUNK)
    upstream = chunk_server(origin)
    cache = chunk_server(tmp_path / "az", upstream=upstream.url)
    http = HttpTier(cache.url)
    assert http.list_refs("snapshot.") == ["snapshot.k1"]
    found = find_ref([http], "snapshot.k1")
    assert found is not None and found[1] == cache.public_url
    ref = found[0]
    fetcher = Fetcher(MemoryTier(1 << 20), None, [http, DirectoryTier(origin)])
    index = ImageIndex.from_bytes(fetcher.get(ref.index))
    out = tmp_path / "out"
    out.mkdir()
    files = materialize(index, fetcher.get, out, workers=4, window=3)
    fetcher.close()
    for rel in ("small.img", "sub/pages.img", "empty.img"):
        data = (src / rel).read_bytes()
        assert (out / rel).read_bytes() == data
        assert files[rel].sha256 == hashlib.sha256(data).hexdigest() and files[rel].size == len(data)
    # The cache server keeps a copy of the ref and answers from it while its upstream is down.
    upstream.stop()
    assert Ref.parse(HttpTier(cache.url).get_ref("snapshot.k1") or b"", "t") == ref
    assert HttpTier(cache.url).list_refs() == ["snapshot.k1"]
    assert find_ref([HttpTier(cache.url)], "snapshot.nope") is None


def test_gc_keeps_what_refs_and_images_name(tmp_path: Path) -> None:
    store = tmp_path / "store"
    image = build(tree(tmp_path / "img"), store, chunk_size=CHUNK)  # STORE/images/img.cidx
    publish(tree(tmp_path / "snap"), store, "snapshot.k1", {"manifest": b"m"}, chunk_size=CHUNK)
    before = {p.name for p in (store / "chunks").rglob("*") if p.is_file()}
    assert gc(store, min_age_s=0).removed_chunks == 0
    assert remove_ref(store, "snapshot.k1") and not remove_ref(store, "snapshot.k1")
    young = gc(store, min_age_s=3600)  # a publish in flight writes chunks before its ref: kept
    assert young.removed_chunks == 0
    result = gc(store, min_age_s=0, now=time.time() + 1)
    after = {p.name for p in (store / "chunks").rglob("*") if p.is_file()}
    image_chunks = {d.hex() for d in ImageIndex.open(image.index_path).all_digests()}
    assert image_chunks <= after and result.removed_chunks == len(before - after) > 0


def test_http_tier_errors_are_tier_errors(tmp_path: Path, chunk_server) -> None:  # type: ignore[no-untyped-def]
    from coldstart.imagefs.errors import TierError

    server = chunk_server(tmp_path / "store")
    tier = HttpTier(server.url)
    assert tier.get("0" * 64) is None  # a kept-alive connection now exists
    server.stop()
    for _ in range(2):  # the dead keep-alive connection, then a refused connect: TierError both times
        with pytest.raises(TierError):
            tier.get("0" * 64)
    with pytest.raises(TierError):
        HttpTier("http://127.0.0.1:9").get_ref("snapshot.x")


def test_materialize_strips_setuid_setgid_sticky_and_group_other_write(tmp_path: Path) -> None:
    """A published tree's mode bits are the publisher's word: a crafted one put a mode-04755 root-owned
    file on the pulling host. Materialized files keep at most rwxr-xr-x."""
    src = tmp_path / "src"
    src.mkdir()
    modes = {"suid": 0o4755, "sgid": 0o2755, "sticky": 0o1644, "world-writable": 0o666, "plain": 0o640}
    for name, mode in modes.items():
        (src / name).write_bytes(name.encode())
        os.chmod(src / name, mode)
    store = tmp_path / "store"
    done = publish(src, store, "snapshot.modes", chunk_size=CHUNK)
    tier = DirectoryTier(store)
    index = ImageIndex.from_bytes(tier.get(done.ref.index) or b"")
    out = tmp_path / "out"
    out.mkdir()
    materialize(index, lambda d: tier.get(d) or b"", out)
    got = {name: (out / name).stat().st_mode & 0o7777 for name in modes}
    assert got == {"suid": 0o755, "sgid": 0o755, "sticky": 0o644, "world-writable": 0o644, "plain": 0o640}


def published_tree(src: Path, store: Path, **kwargs: object) -> tuple[Ref, ImageIndex, DirectoryTier]:
    done = publish(src, store, "snapshot.z", {"manifest": b"m"}, chunk_size=CHUNK, **kwargs)  # type: ignore[arg-type]
    tier = DirectoryTier(store)
    return done.ref, ImageIndex.from_bytes(tier.get(done.ref.index) or b""), tier


def test_compressed_publish_stores_less_and_materializes_the_same_bytes(tmp_path: Path) -> None:
    src = tmp_path / "snaps" / "src"
    (src / "sub").mkdir(parents=True)
    heap, noise = heap_like(3 << 20), os.urandom(2 << 20)
    (src / "sub" / "pages-1.img").write_bytes(heap)  # a heap: published as pages-1.img.zst
    (src / "weights").write_bytes(noise)  # incompressible (bf16 weights): published as it is
    (src / "inventory.img").write_bytes(b"small")  # under MIN_BYTES: as it is
    os.chmod(src / "sub" / "pages-1.img", 0o600)
    ref, index, tier = published_tree(src, tmp_path / "store", compress=True)
    assert ref.compressed == ["sub/pages-1.img"]
    assert ref.size < len(heap) / 2 + len(noise) + 5  # what the store holds and a puller fetches
    assert sorted(p for p, _ in index.walk() if p) == [
        "inventory.img",
        "sub",
        "sub/pages-1.img.zst",
        "weights",
    ]
    assert not list((tmp_path / "snaps").glob(".publish-*"))  # the staging folder is gone
    out = tmp_path / "out"
    out.mkdir()
    fetched: list[int] = []
    files = materialize(
        index, lambda d: tier.get(d) or b"", out, progress=fetched.append, compressed=ref.compressed
    )
    assert (out / "sub" / "pages-1.img").read_bytes() == heap and not (
        out / "sub" / "pages-1.img.zst"
    ).exists()
    assert (out / "weights").read_bytes() == noise and (out / "inventory.img").read_bytes() == b"small"
    assert files["sub/pages-1.img"].size == len(heap)
    assert files["sub/pages-1.img"].sha256 == hashlib.sha256(heap).hexdigest()
    assert (out / "sub" / "pages-1.img").stat().st_mode & 0o777 == 0o600
    assert sum(fetched) == ref.size  # progress counts bytes fetched, not bytes written
    # Published twice, the same bytes: every chunk is shared (two snapshots of one model share weights).
    again = publish(src, tmp_path / "store", "snapshot.z2", chunk_size=CHUNK, compress=True)
    assert again.new_chunks == 1  # the index alone is new (it records the staged files' times)


def test_a_damaged_compressed_stream_fails_the_materialize(tmp_path: Path) -> None:
    """Chunks are verified as published, so damage here means a publisher that wrote a bad stream: the
    materialize fails with a one-line error naming the file (the caller removes the folder)."""
    src = tmp_path / "snaps" / "src"
    src.mkdir(parents=True)
    (src / "pages-1.img").write_bytes(heap_like(1 << 20))
    ref, index, tier = published_tree(src, tmp_path / "store", compress=True)
    out = tmp_path / "out"
    out.mkdir()
    last = index.chunk_digest(
        dict(index.walk())["pages-1.img.zst"], index.chunk_count(dict(index.walk())["pages-1.img.zst"]) - 1
    ).hex()

    def truncated(digest: str) -> bytes:
        data = tier.get(digest) or b""
        return data[:-10] if digest == last else data

    with pytest.raises(IndexFormatError, match=r"pages-1.img.zst: got \d+ bytes, index says"):
        materialize(index, truncated, out, compressed=ref.compressed)
    with pytest.raises(IndexFormatError, match="pages-1.img.zst: not a zstd stream"):
        materialize(index, lambda d: b"\0" * len(tier.get(d) or b""), out, compressed=ref.compressed)
