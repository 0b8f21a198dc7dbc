"""The index format: round trip, determinism, and refusal of truncated, edited or escaping indexes."""

from __future__ import annotations

import hashlib
import stat
import struct
import zlib

import pytest

from coldstart.imagefs.errors import IndexDigestMismatch, IndexFormatError, IndexTruncated, UnsafePath
from coldstart.imagefs.index import HEADER, ROOT, ImageIndex, Node, _seal, encode, image_digest

CS = 4096


def _file(data: bytes, mode: int = 0o644) -> Node:
    chunks = [hashlib.sha256(data[i : i + CS]).digest() for i in range(0, len(data), CS)]
    return Node(mode=stat.S_IFREG | mode, size=len(data), chunks=chunks, mtime_ns=123)


def _tree() -> Node:
    shared = _file(b"shared")
    sub = Node(mode=stat.S_IFDIR | 0o750, children={b"deep.txt": _file(b"d" * 10000), b"same": shared})
    return Node(
        mode=stat.S_IFDIR | 0o755,
        children={
            b"b.txt": _file(b"bbb"),
            b"a.txt": shared,
            b"sub": sub,
            b"link": Node(mode=stat.S_IFLNK | 0o777, target=b"a.txt", size=5),
            b"x": Node(mode=stat.S_IFREG | 0o600, xattrs={b"user.k": b"v\x00w"}),
        },
    )


def _raw_body(data: bytes) -> bytes:
    return zlib.decompress(data[HEADER.size :])


def test_round_trip_and_lookup() -> None:
    index = ImageIndex.from_bytes(encode(_tree(), CS))
    paths = {path: inode for path, inode in index.walk()}
    assert sorted(paths) == ["", "a.txt", "b.txt", "link", "sub", "sub/deep.txt", "sub/same", "x"]
    assert paths["a.txt"] == paths["sub/same"]  # hard link: one inode
    assert index.nlink[paths["a.txt"]] == 2
    assert index.nlink[ROOT] == 3
    assert index.lookup(ROOT, b"sub") == paths["sub"]
    assert index.lookup(ROOT, b"nope") is None
    assert index.lookup(paths["sub"], b"deep.txt") == paths["sub/deep.txt"]
    assert index.readlink(paths["link"]) == b"a.txt"
    assert index.xattrs(paths["x"]) == {b"user.k": b"v\x00w"}
    deep = paths["sub/deep.txt"]
    assert index.chunk_count(deep) == 3 and index.chunk_length(deep, 2) == 10000 - 2 * CS
    assert index.chunk_digest(deep, 1) == hashlib.sha256(b"d" * CS).digest()
    assert [name for _, name, _ in index.entries(ROOT)] == [b"a.txt", b"b.txt", b"link", b"sub", b"x"]
    assert [name for _, name, _ in index.entries(ROOT, 3)] == [b"sub", b"x"]
    assert index.total_bytes == 6 + 3 + 10000  # hard-linked bytes counted once


def test_same_tree_same_bytes(tmp_path) -> None:
    assert encode(_tree(), CS) == encode(_tree(), CS)
    path = tmp_path / "i.cidx"
    path.write_bytes(encode(_tree(), CS))
    assert image_digest(path) == ImageIndex.open(path).digest
    assert image_digest(path).startswith("sha256:") and len(image_digest(path)) == 71


def test_truncated_index_is_refused() -> None:
    data = encode(_tree(), CS)
    for cut in (10, HEADER.size, len(data) - 1):
        with pytest.raises(IndexTruncated, match="truncated|shorter"):
            ImageIndex.from_bytes(data[:cut])


def test_edited_index_fails_its_digest() -> None:
    data = bytearray(encode(_tree(), CS))
    data[-5] ^= 0xFF
    with pytest.raises(IndexDigestMismatch, match="digest mismatch"):
        ImageIndex.from_bytes(bytes(data))


def test_not_an_index_and_unknown_version() -> None:
    with pytest.raises(IndexFormatError, match="bad magic"):
        ImageIndex.from_bytes(b"x" * 100)
    data = bytearray(encode(_tree(), CS))
    struct.pack_into("<H", data, 8, 99)
    with pytest.raises(IndexFormatError, match="version 99"):
        ImageIndex.from_bytes(bytes(data))


@pytest.mark.parametrize(
    ("placeholder", "bad", "error"),
    [
        (b"aa", b"..", UnsafePath),
        (b"a", b".", UnsafePath),
        (b"aab", b"a/b", UnsafePath),
        (b"a", b"\0", IndexFormatError),
    ],
)
def test_escaping_names_are_refused_on_open(placeholder: bytes, bad: bytes, error: type[Exception]) -> None:
    # Forge an index (the encoder itself refuses such names): rename an entry in place, same length, and
    # seal it with a valid digest. The reader must refuse it on its own.
    root = Node(mode=stat.S_IFDIR | 0o755, children={placeholder: _file(b"x"), b"keep": _file(b"y")})
    raw = _raw_body(encode(root, CS))
    forged = raw.replace(placeholder + b"\0keep\0", bad + b"\0keep\0", 1)
    assert forged != raw
    with pytest.raises(error):
        ImageIndex.from_bytes(_seal(forged))


def test_encoder_refuses_escaping_names() -> None:
    for bad in (b"..", b".", b"a/b", b""):
        root = Node(mode=stat.S_IFDIR | 0o755, children={bad: _file(b"x")})
        with pytest.raises(UnsafePath):
            encode(root, CS)


def test_directory_loop_is_refused_on_access() -> None:
    # A forged dirent pointing a subdirectory back at the root is caught when it is looked up.
    raw = bytearray(_raw_body(encode(_tree(), CS)))
    index = ImageIndex.from_bytes(_seal(bytes(raw)))
    sub = index.lookup(ROOT, b"sub")
    assert sub is not None
    # Find the child column entry that says "sub" and rewrite the deep.txt dirent of sub to point at sub.
    deep = index.lookup(sub, b"deep.txt")
    child_col = index._child.tobytes()
    needle = struct.pack("<I", deep)
    pos = bytes(raw).find(child_col)
    k = child_col.find(needle)
    raw[pos + k : pos + k + 4] = struct.pack("<I", sub)
    forged = ImageIndex.from_bytes(_seal(bytes(raw)))
    with pytest.raises(IndexFormatError, match="loops"):
        forged.lookup(sub, b"deep.txt")
