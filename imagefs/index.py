"""The image index: every path's metadata and chunk digests, in one compact, versioned, deterministic file.

Layout (all integers little-endian)::

    header (64 bytes)  magic "CSIMGIDX" | u16 version | u8 compression (0 none, 1 zlib) | u8 0 | u32 0
                       | u64 stored body length | u64 raw body length | 32-byte SHA-256
    body               zlib(raw) or raw, where raw is
                       u32 meta length | meta JSON (sorted keys) | inode columns | dirent columns
                       | names blob | strings blob | chunk digests (32 bytes each)

The digest covers the header's first 32 bytes and the stored body, so any edit, truncation or bit flip is
refused on open (``IndexDigestMismatch``/``IndexTruncated``); ``image_digest`` is ``sha256:<hex>`` of it.

Why columns and not JSON lines: opening must be fast for 100,000-file images (goal < 100 ms; Modal loads its
index in under 100 ms). A column is one ``array.frombytes`` (a memcpy), names stay in one blob addressed
by offsets, and nothing is parsed per entry at open; per-entry checks happen lazily on access. JSON lines
would build Python objects for every field of every entry at open; msgpack is not in the stdlib.

Inodes are numbered 1..N in pre-order of a walk sorted by name (1 is the root, as FUSE expects), so a
directory's children always have larger numbers than the directory (no cycles: checked on access) and the
same tree always gives the same bytes. Hard links are several dirents naming one inode. Dirents are
grouped per directory in inode order and sorted by name within it, so lookup is a binary search.

Names are path components: a name with ``/``, an empty name, ``.`` or ``..`` is refused at open
(``UnsafePath``), so no entry can escape the image. Symlink targets are kept verbatim (like any filesystem,
they are resolved by the reader, inside the sandbox root when the image is one).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NewType

from coldstart.imagefs.errors import IndexDigestMismatch, IndexFormatError, IndexTruncated, UnsafePath

MAGIC = b"CSIMGIDX"
VERSION = 1
HEADER = struct.Struct("<8sHBBIQQ32s")
DIGEST_LEN = 32
ROOT = 1
# Column name -> array typecode, in file order; every inode column has N + 1 entries (index 0 unused).
INODE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("mode", "I"),
    ("uid", "I"),
    ("gid", "I"),
    ("nlink", "I"),
    ("size", "Q"),
    ("mtime_ns", "q"),
    ("rdev", "Q"),
    ("chunk_first", "I"),  # index of the first chunk digest of a regular file
    ("string_off", "I"),  # symlink target offset in the strings blob (\0-terminated)
    ("xattr_idx", "I"),  # 0 = none, k = meta["xattrs"][k - 1]
    ("dirent_first", "I"),  # directories: first dirent of their children
    ("dirent_count", "I"),
)
DIRENT_COLUMNS: tuple[tuple[str, str], ...] = (("child", "I"), ("name_off", "I"))

Inode = NewType("Inode", int)

S_IFMT = 0o170000
S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000


@dataclass
class Node:
    """One inode of the tree a builder assembles; hard links are one Node under several names."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    size: int = 0
    chunks: list[bytes] = field(default_factory=list)  # raw SHA-256 digests, in file order
    target: bytes = b""  # symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, Node] | None = None  # set for directories

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR


def _column(typecode: str, data: bytes | memoryview) -> array:
    col = array(typecode)
    col.frombytes(data)
    if sys.byteorder != "little":
        col.byteswap()
    return col


def _seal(raw: bytes, compress: bool = True) -> bytes:
    """Header + body for ``raw``; the one place that computes the digest."""
    body = zlib.compress(raw, 6) if compress else raw
    prefix = HEADER.pack(MAGIC, VERSION, 1 if compress else 0, 0, 0, len(body), len(raw), b"\0" * 32)[:32]
    digest = hashlib.sha256(prefix + body).digest()
    return prefix + digest + body


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafePath(f"entry name {name!r} would escape the image; rebuild it from a clean source")


def encode(root: Node, chunk_size: int, compress: bool = True) -> bytes:
    """Serialize a tree to index bytes; the same tree always gives the same bytes."""
    if not root.is_dir:
        raise IndexFormatError("the root of an image must be a directory")
    order: list[Node] = [root]
    numbers: dict[int, int] = {id(root): ROOT}
    dirs: list[Node] = []
    stack = [root]
    # Pre-order numbering, children sorted by name; a hard-linked node keeps its first number.
    while stack:
        node = stack.pop()
        dirs.append(node)
        assert node.children is not None
        subdirs = []
        for name in sorted(node.children):
            _check_name(name)
            child = node.children[name]
            if id(child) not in numbers:
                numbers[id(child)] = len(order) + 1
                order.append(child)
                if child.is_dir:
                    subdirs.append(child)
            elif child.is_dir:
                raise IndexFormatError(
                    f"directory {name!r} is linked twice; directories cannot be hard links"
                )
        stack.extend(reversed(subdirs))
    dirs.sort(key=lambda d: numbers[id(d)])
    refs: dict[int, int] = {}
    for d in dirs:
        assert d.children is not None
        for child in d.children.values():
            refs[id(child)] = refs.get(id(child), 0) + 1

    cols = {name: array(tc, [0]) for name, tc in INODE_COLUMNS}
    dchild, dname = array("I"), array("I")
    names, strings, digests = bytearray(), bytearray(b"\0"), bytearray()
    xattr_list: list[list[list[str]]] = []
    first_dirent: dict[int, tuple[int, int]] = {}
    for d in dirs:
        assert d.children is not None
        first_dirent[id(d)] = (len(dchild), len(d.children))
        for name in sorted(d.children):
            dchild.append(numbers[id(d.children[name])])
            dname.append(len(names))
            names += name + b"\0"
    total = 0
    for node in order:
        is_dir = node.is_dir
        assert node.children is not None or not is_dir
        cols["mode"].append(node.mode)
        cols["uid"].append(node.uid)
        cols["gid"].append(node.gid)
        if is_dir:
            assert node.children is not None
            cols["nlink"].append(2 + sum(1 for c in node.children.values() if c.is_dir))
        else:
            cols["nlink"].append(refs.get(id(node), 1))
        cols["size"].append(node.size)
        cols["mtime_ns"].append(node.mtime_ns)
        cols["rdev"].append(node.rdev)
        is_reg = node.mode & S_IFMT == S_IFREG
        if is_reg:
            want = -(-node.size // chunk_size)
            if len(node.chunks) != want:
                raise IndexFormatError(
                    f"file of {node.size} bytes has {len(node.chunks)} chunks, want {want}"
                )
            total += node.size
        cols["chunk_first"].append(len(digests) // DIGEST_LEN)
        for dg in node.chunks if is_reg else ():
            digests += dg
        if node.mode & S_IFMT == S_IFLNK:
            cols["string_off"].append(len(strings))
            strings += node.target + b"\0"
        else:
            cols["string_off"].append(0)
        if node.xattrs:
            xattr_list.append([[k.hex(), v.hex()] for k, v in sorted(node.xattrs.items())])
            cols["xattr_idx"].append(len(xattr_list))
        else:
            cols["xattr_idx"].append(0)
        first, count = first_dirent.get(id(node), (0, 0))
        cols["dirent_first"].append(first)
        cols["dirent_count"].append(count)
    meta = {
        "format": "coldstart-image-index",
        "version": VERSION,
        "chunk_size": chunk_size,
        "inodes": len(order),
        "dirents": len(dchild),
        "chunks": len(digests) // DIGEST_LEN,
        "names_bytes": len(names),
        "strings_bytes": len(strings),
        "total_bytes": total,
        "xattrs": xattr_list,
    }
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    parts = [struct.pack("<I", len(meta_bytes)), meta_bytes]
    for column, _ in INODE_COLUMNS:
        parts.append(_le(cols[column]))
    parts += [_le(dchild), _le(dname), bytes(names), bytes(strings), bytes(digests)]
    return _seal(b"".join(parts), compress)


def _le(col: array) -> bytes:
    if sys.byteorder != "little":
        col = array(col.typecode, col)
        col.byteswap()
    return col.tobytes()


def _read_header(data: bytes, source: str) -> tuple[int, bytes, bytes]:
    if len(data) < HEADER.size:
        raise IndexTruncated(f"{source}: {len(data)} bytes is shorter than an index header; copy it again")
    magic, version, compression, _, _, body_len, raw_len, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IndexFormatError(f"{source} is not a coldstart image index (bad magic); pass an index file")
    if version != VERSION:
        raise IndexFormatError(
            f"{source}: index version {version} is not supported (this build reads {VERSION})"
        )
    body = data[HEADER.size : HEADER.size + body_len]
    if len(body) < body_len:
        raise IndexTruncated(f"{source}: body has {len(body)} of {body_len} bytes; the index was truncated")
    if len(data) != HEADER.size + body_len:
        raise IndexFormatError(
            f"{source}: {len(data) - HEADER.size - body_len} trailing bytes after the index"
        )
    if hashlib.sha256(data[:32] + body).digest() != digest:
        raise IndexDigestMismatch(
            f"{source}: index digest mismatch (corrupt or edited); rebuild or copy it again"
        )
    if compression == 1:
        try:
            raw = zlib.decompress(body)
        except zlib.error as exc:
            raise IndexFormatError(f"{source}: body does not decompress ({exc})") from exc
    elif compression == 0:
        raw = body
    else:
        raise IndexFormatError(f"{source}: unknown compression {compression}")
    if len(raw) != raw_len:
        raise IndexFormatError(f"{source}: body is {len(raw)} bytes, header says {raw_len}")
    return compression, digest, raw


def image_digest(index_path: str | Path) -> str:
    """``sha256:<hex>`` identity of an index, verified (use it in snapshot identities)."""
    return ImageIndex.open(index_path).digest


class ImageIndex:
    """An opened, verified index; read-only, safe to share between threads."""

    def __init__(self, raw: bytes, digest: bytes, source: str) -> None:
        self.source = source
        self.digest = "sha256:" + digest.hex()
        try:
            (meta_len,) = struct.unpack_from("<I", raw)
            self.meta = json.loads(raw[4 : 4 + meta_len])
            self.chunk_size = int(self.meta["chunk_size"])
            n = int(self.meta["inodes"])
            m = int(self.meta["dirents"])
            n_chunks = int(self.meta["chunks"])
            names_len = int(self.meta["names_bytes"])
            strings_len = int(self.meta["strings_bytes"])
            self.xattr_table: list[list[list[str]]] = list(self.meta["xattrs"])
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise IndexFormatError(f"{source}: unreadable index metadata ({exc})") from exc
        if self.chunk_size <= 0 or n < 1:
            raise IndexFormatError(
                f"{source}: chunk size {self.chunk_size} / {n} inodes is not a valid image"
            )
        view = memoryview(raw)
        pos = 4 + meta_len
        cols: dict[str, array] = {}

        def take(count: int, typecode: str) -> array:
            nonlocal pos
            width = array(typecode).itemsize
            end = pos + count * width
            if end > len(raw):
                raise IndexFormatError(f"{source}: tables are shorter than the metadata says")
            col = _column(typecode, view[pos:end])
            pos = end
            return col

        for name, tc in INODE_COLUMNS:
            cols[name] = take(n + 1, tc)
        self.mode = cols["mode"]
        self.uid = cols["uid"]
        self.gid = cols["gid"]
        self.nlink = cols["nlink"]
        self.size = cols["size"]
        self.mtime_ns = cols["mtime_ns"]
        self.rdev = cols["rdev"]
        self._chunk_first = cols["chunk_first"]
        self._string_off = cols["string_off"]
        self._xattr_idx = cols["xattr_idx"]
        self._dirent_first = cols["dirent_first"]
        self._dirent_count = cols["dirent_count"]
        self._child = take(m, "I")
        self._name_off = take(m, "I")
        end = pos + names_len + strings_len + n_chunks * DIGEST_LEN
        if end != len(raw):
            raise IndexFormatError(f"{source}: blob sizes do not add up to the body ({end} != {len(raw)})")
        self._names = bytes(view[pos : pos + names_len])
        pos += names_len
        self._strings = bytes(view[pos : pos + strings_len])
        pos += strings_len
        self._digests = bytes(view[pos:end])
        self.n_inodes = n
        self.n_dirents = m
        self.n_chunks = n_chunks
        self.total_bytes = int(self.meta.get("total_bytes", 0))
        self._validate()

    @classmethod
    def open(cls, path: str | Path) -> ImageIndex:
        source = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise IndexFormatError(f"cannot read index {source}: {exc.strerror}") from exc
        return cls.from_bytes(data, source)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<index>") -> ImageIndex:
        _, digest, raw = _read_header(data, source)
        return cls(raw, digest, source)

    def _validate(self) -> None:
        """Whole-table checks that run at C speed; per-entry checks happen on access."""
        src = self.source
        names = b"\0" + self._names
        if self._names and not self._names.endswith(b"\0"):
            raise IndexFormatError(f"{src}: names blob is not terminated")
        if self._names.count(b"\0") != self.n_dirents:
            raise IndexFormatError(f"{src}: names blob holds a different number of names than dirents")
        if b"/" in self._names:
            raise UnsafePath(f"{src}: an entry name contains '/', which would escape the image; refusing it")
        for bad, what in ((b"\0..\0", "'..'"), (b"\0.\0", "'.'"), (b"\0\0", "an empty name")):
            if bad in names:
                raise UnsafePath(
                    f"{src}: an entry is named {what}, which would escape the image; refusing it"
                )
        if self.m_nonempty and (min(self._child) < 2 or max(self._child) > self.n_inodes):
            raise IndexFormatError(f"{src}: a directory entry points outside the inode table")
        if self.m_nonempty and max(self._name_off) >= len(self._names):
            raise IndexFormatError(f"{src}: a name offset points outside the names blob")
        if max(self._string_off) >= max(len(self._strings), 1):
            raise IndexFormatError(f"{src}: a symlink target offset points outside the strings blob")
        if max(self._xattr_idx) > len(self.xattr_table):
            raise IndexFormatError(f"{src}: an xattr index points outside the xattr table")
        if max(self._chunk_first) > self.n_chunks or max(self._dirent_first) > self.n_dirents:
            raise IndexFormatError(f"{src}: a chunk or dirent range starts outside its table")
        if not self.is_dir(ROOT):
            raise IndexFormatError(f"{src}: the root entry is not a directory")

    @property
    def m_nonempty(self) -> bool:
        return self.n_dirents > 0

    # -- per-inode access (inode numbers come from the kernel: check them) --------------------------------

    def check_inode(self, inode: int) -> Inode:
        if not 1 <= inode <= self.n_inodes:
            raise IndexFormatError(f"{self.source}: inode {inode} is not in the image")
        return Inode(inode)

    def is_dir(self, inode: int) -> bool:
        return self.mode[inode] & S_IFMT == S_IFDIR

    def is_reg(self, inode: int) -> bool:
        return self.mode[inode] & S_IFMT == S_IFREG

    def _dir_range(self, inode: int) -> tuple[int, int]:
        first, count = self._dirent_first[inode], self._dirent_count[inode]
        if first + count > self.n_dirents:
            raise IndexFormatError(f"{self.source}: directory inode {inode} lists entries past the table")
        return first, first + count

    def _name(self, k: int) -> bytes:
        off = self._name_off[k]
        return self._names[off : self._names.index(b"\0", off)]

    def _checked_child(self, parent: int, k: int) -> Inode:
        child = self._child[k]
        if self.is_dir(child) and child <= parent:
            raise IndexFormatError(f"{self.source}: directory inode {child} loops back above inode {parent}")
        return Inode(child)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        """Child inode of directory ``parent`` called ``name``, or None (binary search; names are sorted)."""
        lo, hi = self._dir_range(parent)
        while lo < hi:
            mid = (lo + hi) // 2
            here = self._name(mid)
            if here == name:
                return self._checked_child(parent, mid)
            if here < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def entries(self, parent: int, start: int = 0) -> Iterator[tuple[int, bytes, Inode]]:
        """(position, name, inode) of a directory's children from ``start``; position + 1 resumes after."""
        lo, hi = self._dir_range(parent)
        for k in range(lo + start, hi):
            yield k - lo, self._name(k), self._checked_child(parent, k)

    def chunk_count(self, inode: int) -> int:
        return -(-self.size[inode] // self.chunk_size)

    def chunk_digest(self, inode: int, k: int) -> bytes:
        """Raw digest of chunk ``k`` of a regular file."""
        idx = self._chunk_first[inode] + k
        if not 0 <= k < self.chunk_count(inode) or idx >= self.n_chunks:
            raise IndexFormatError(f"{self.source}: inode {inode} has no chunk {k}")
        return self._digests[idx * DIGEST_LEN : (idx + 1) * DIGEST_LEN]

    def chunk_length(self, inode: int, k: int) -> int:
        return min(self.chunk_size, self.size[inode] - k * self.chunk_size)

    def file_chunks(self, inode: int) -> list[bytes]:
        return [self.chunk_digest(inode, k) for k in range(self.chunk_count(inode))]

    def readlink(self, inode: int) -> bytes:
        if self.mode[inode] & S_IFMT != S_IFLNK:
            raise IndexFormatError(f"{self.source}: inode {inode} is not a symlink")
        off = self._string_off[inode]
        return self._strings[off : self._strings.index(b"\0", off)]

    def xattrs(self, inode: int) -> dict[bytes, bytes]:
        k = self._xattr_idx[inode]
        if not k:
            return {}
        return {bytes.fromhex(name): bytes.fromhex(value) for name, value in self.xattr_table[k - 1]}

    def walk(self) -> Iterator[tuple[str, Inode]]:
        """(relative path, inode) of every entry, root first as ``""``; for tests, inspect and builds."""
        yield "", Inode(ROOT)
        stack: list[tuple[str, int]] = [("", ROOT)]
        while stack:
            prefix, inode = stack.pop()
            for _, name, child in self.entries(inode):
                path = prefix + name.decode("utf-8", "surrogateescape")
                yield path, child
                if self.is_dir(child):
                    stack.append((path + "/", child))

    def all_digests(self) -> set[bytes]:
        return {self._digests[i : i + DIGEST_LEN] for i in range(0, len(self._digests), DIGEST_LEN)}
