"""Build an image: a source tree -> chunks in a content-addressed store + one index.

Sources (``detect_source``): a directory; an OCI image layout (directory with ``oci-layout`` and
``index.json``); a ``docker save`` tar (``manifest.json``, classic or OCI-style). Layers are applied in order
with OCI whiteouts honoured: ``.wh.NAME`` deletes NAME from lower layers, ``.wh..wh..opq`` empties a directory
of what lower layers put there (siblings from the same layer stay, as the spec requires, whatever their order
in the tar). Layer blobs are verified against their descriptors' digests. Member paths that are absolute or
contain ``..`` are refused (``BuildError``), never normalised into the image.

Chunks are written as files are read (``ChunkStore.put`` skips chunks already stored), so a build needs no
scratch space and a second build of the same input writes nothing and produces the same index bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from coldstart.imagefs.errors import BuildError
from coldstart.imagefs.index import S_IFDIR, ImageIndex, Node, encode
from coldstart.imagefs.store import DEFAULT_CHUNK_SIZE, ChunkStore, write_atomic

Progress = Callable[[int], None]  # called with bytes just processed
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
KEEP_XATTR_PREFIXES = (b"user.", b"security.", b"trusted.")


@dataclass(frozen=True)
class BuildResult:
    index_path: Path
    digest: str
    files: int
    bytes: int
    chunks: int
    new_chunks: int


class _Chunker:
    def __init__(self, store: ChunkStore, chunk_size: int, progress: Progress | None) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self.progress = progress
        self.new_chunks = 0

    def chunk(self, f: IO[bytes], size: int) -> list[bytes]:
        digests = []
        left = size
        while left > 0:
            data = f.read(min(self.chunk_size, left))
            if not data:
                raise BuildError(f"file ended {left} bytes early while chunking; is the source changing?")
            # A short read mid-file (pipes, some tar streams) must not shift chunk boundaries.
            while len(data) < min(self.chunk_size, left):
                more = f.read(min(self.chunk_size, left) - len(data))
                if not more:
                    raise BuildError(f"file ended {left - len(data)} bytes early while chunking")
                data += more
            digest, new = self.store.put(data)
            self.new_chunks += new
            digests.append(digest)
            left -= len(data)
            if self.progress:
                self.progress(len(data))
        return digests


def detect_source(src: Path) -> str:
    if src.is_dir():
        return "oci" if (src / "oci-layout").is_file() and (src / "index.json").is_file() else "dir"
    if src.is_file() and tarfile.is_tarfile(src):
        return "docker"
    raise BuildError(f"{src} is neither a directory, an OCI layout nor a docker-save tar")


def source_size(src: Path) -> int:
    """Bytes to process, for a progress bar (file contents for a directory, the archive/blobs otherwise)."""
    if src.is_file():
        return src.stat().st_size
    if (src / "oci-layout").is_file():
        return sum(p.stat().st_size for p in (src / "blobs").rglob("*") if p.is_file())
    total = 0
    for root, _, files in os.walk(src):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


# -- directories ---------------------------------------------------------------------------------------------


def _xattrs(path: str) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        key = name.encode()
        if key.startswith(KEEP_XATTR_PREFIXES):
            try:
                out[key] = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
    return out


def _node_from_stat(st: os.stat_result) -> Node:
    node = Node(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        node.rdev = st.st_rdev
    return node


def tree_from_directory(src: Path, chunker: _Chunker) -> Node:
    root = _node_from_stat(os.lstat(src))
    root.children = {}
    root.xattrs = _xattrs(str(src))
    links: dict[tuple[int, int], Node] = {}
    stack: list[tuple[str, Node]] = [(str(src), root)]
    while stack:
        path, parent = stack.pop()
        assert parent.children is not None
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            key = (st.st_dev, st.st_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in links:
                parent.children[os.fsencode(entry.name)] = links[key]
                continue
            node = _node_from_stat(st)
            node.xattrs = _xattrs(entry.path)
            if stat.S_ISDIR(st.st_mode):
                node.children = {}
                stack.append((entry.path, node))
            elif stat.S_ISLNK(st.st_mode):
                node.target = os.fsencode(os.readlink(entry.path))
                node.size = len(node.target)
            elif stat.S_ISREG(st.st_mode):
                node.size = st.st_size
                with open(entry.path, "rb") as f:
                    node.chunks = chunker.chunk(f, st.st_size)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                links[key] = node
            parent.children[os.fsencode(entry.name)] = node
    return root


# -- layered sources (OCI layout, docker save) ------------------------------------------------------------


def _safe_parts(name: str) -> list[str]:
    if name.startswith("/"):
        raise BuildError(
            f"layer member {name!r} is an absolute path; refusing an image that escapes its root"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BuildError(f"layer member {name!r} contains '..'; refusing an image that escapes its root")
    return parts


class _LayeredTree:
    def __init__(self, chunker: _Chunker) -> None:
        self.root = Node(mode=S_IFDIR | 0o755, children={})
        self.chunker = chunker

    def _dir(self, parts: list[str], create: bool) -> Node | None:
        node = self.root
        for part in parts:
            assert node.children is not None
            key = part.encode()
            child = node.children.get(key)
            if child is None or not child.is_dir:
                if not create:
                    return None
                child = Node(mode=S_IFDIR | 0o755, children={})
                node.children[key] = child
            node = child
        return node

    def _get(self, parts: list[str]) -> Node | None:
        parent = self._dir(parts[:-1], create=False)
        if parent is None or parent.children is None:
            return None
        return parent.children.get(parts[-1].encode())

    def apply_layer(self, layer: IO[bytes], label: str) -> None:
        added: set[tuple[str, ...]] = set()
        try:
            with tarfile.open(fileobj=layer, mode="r|*") as tar:
                for member in tar:
                    self._apply_member(tar, member, added)
        except tarfile.TarError as exc:
            raise BuildError(
                f"layer {label} is not a readable tar ({exc}); only tar and tar+gzip layers"
            ) from exc

    def _apply_member(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, added: set[tuple[str, ...]]
    ) -> None:
        parts = _safe_parts(member.name)
        if not parts:  # the layer's "./" entry: the root's own metadata
            if member.isdir():
                self._set_meta(self.root, member)
            return
        base = parts[-1]
        if base == OPAQUE:
            parent = self._dir(parts[:-1], create=True)
            assert parent is not None and parent.children is not None
            prefix = tuple(parts[:-1])
            for name in list(parent.children):
                if prefix + (name.decode(),) not in added:
                    del parent.children[name]
            return
        if base.startswith(WHITEOUT):
            hidden = parts[:-1] + [base[len(WHITEOUT) :]]
            parent = self._dir(parts[:-1], create=False)
            if parent is not None and parent.children is not None and tuple(hidden) not in added:
                parent.children.pop(hidden[-1].encode(), None)
            return
        parent = self._dir(parts[:-1], create=True)
        assert parent is not None and parent.children is not None
        key = base.encode()
        added.add(tuple(parts))
        existing = parent.children.get(key)
        if member.isdir():
            if existing is not None and existing.is_dir:
                self._set_meta(existing, member)
                return
            node = Node(mode=0, children={})
        elif member.islnk():
            target = self._get(_safe_parts(member.linkname))
            if target is None or target.is_dir:
                raise BuildError(
                    f"hard link {member.name!r} -> {member.linkname!r}: no such file in the image"
                )
            parent.children[key] = target
            return
        else:
            node = Node(mode=0)
        self._set_meta(node, member)
        if member.issym():
            node.target = member.linkname.encode()
            node.size = len(node.target)
        elif member.ischr() or member.isblk():
            node.rdev = os.makedev(member.devmajor, member.devminor)
        elif member.isreg():
            node.size = member.size
            f = tar.extractfile(member)
            assert f is not None
            node.chunks = self.chunker.chunk(f, member.size)
        elif not (member.isfifo() or member.isdir()):
            raise BuildError(f"layer member {member.name!r} has an unsupported type {member.type!r}")
        parent.children[key] = node

    @staticmethod
    def _set_meta(node: Node, member: tarfile.TarInfo) -> None:
        kinds = {
            tarfile.DIRTYPE: stat.S_IFDIR,
            tarfile.SYMTYPE: stat.S_IFLNK,
            tarfile.CHRTYPE: stat.S_IFCHR,
            tarfile.BLKTYPE: stat.S_IFBLK,
            tarfile.FIFOTYPE: stat.S_IFIFO,
        }
        node.mode = kinds.get(member.type, stat.S_IFREG) | (member.mode & 0o7777)
        node.uid, node.gid = member.uid, member.gid
        node.mtime_ns = round(member.mtime * 1_000_000_000)
        node.xattrs = {
            k[len("SCHILY.xattr.") :].encode(): v.encode("utf-8", "surrogateescape")
            for k, v in member.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        }


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _oci_blob(layout: Path, digest: str, verify: bool = True) -> Path:
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not all(c in "0123456789abcdef" for c in hexdigest) or len(hexdigest) != 64:
        raise BuildError(f"OCI descriptor digest {digest!r} is not a sha256 digest")
    path = layout / "blobs" / "sha256" / hexdigest
    if not path.is_file():
        raise BuildError(f"OCI layout {layout} lacks blob {digest}")
    if verify and _sha256_file(path) != hexdigest:
        raise BuildError(f"OCI blob {digest} does not match its digest; the layout is corrupt")
    return path


def _oci_layers(layout: Path) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    manifests = index.get("manifests") or []
    if not manifests:
        raise BuildError(f"{layout}/index.json lists no manifests")
    doc = json.loads(_oci_blob(layout, manifests[0]["digest"]).read_text())
    while "manifests" in doc:  # an image index: take the first manifest (the builder's platform)
        doc = json.loads(_oci_blob(layout, doc["manifests"][0]["digest"]).read_text())
    return [_oci_blob(layout, layer["digest"]) for layer in doc.get("layers", [])]


def _extract_layer(outer: tarfile.TarFile, archive: Path, name: str) -> IO[bytes]:
    member = outer.extractfile(name)
    if member is None:
        raise BuildError(f"{archive}: layer {name} is missing")
    return member


@contextmanager
def _docker_layers(archive: Path) -> Iterator[list[tuple[str, Callable[[], IO[bytes]]]]]:
    with tarfile.open(archive, "r:") as outer:
        try:
            manifest_member = outer.extractfile("manifest.json")
        except KeyError:
            manifest_member = None
        if manifest_member is None:
            raise BuildError(f"{archive} has no manifest.json; pass a 'docker save' archive")
        manifest = json.loads(manifest_member.read())
        if not manifest:
            raise BuildError(f"{archive}: manifest.json lists no images")
        layers: list[tuple[str, Callable[[], IO[bytes]]]] = []
        for name in manifest[0].get("Layers", []):
            _safe_parts(name)

            layers.append((name, functools.partial(_extract_layer, outer, archive, name)))
        yield layers


def tree_from_layers(src: Path, kind: str, chunker: _Chunker, progress: Progress | None) -> Node:
    tree = _LayeredTree(chunker)
    saved = chunker.progress
    chunker.progress = None  # layered sources report progress per layer (compressed bytes)
    try:
        if kind == "oci":
            for blob in _oci_layers(src):
                with open(blob, "rb") as f:
                    tree.apply_layer(f, blob.name)
                if progress:
                    progress(blob.stat().st_size)
        else:
            with _docker_layers(src) as layers:
                for name, opener in layers:
                    tree.apply_layer(opener(), name)
        if kind == "docker" and progress:
            progress(src.stat().st_size)
    finally:
        chunker.progress = saved
    return tree.root


# -- entry point -----------------------------------------------------------------------------------------


def default_index_path(src: Path, store: Path) -> Path:
    name = src.name.removesuffix(".tar") or "image"
    return store / "images" / f"{name}.cidx"


def build(
    src: str | Path,
    store_dir: str | Path,
    index_path: str | Path | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> BuildResult:
    """Build ``src`` into ``store_dir``; the index goes to ``index_path`` (default STORE/images/NAME.cidx)."""
    src = Path(src)
    store_dir = Path(store_dir)
    if chunk_size < 4096:
        raise BuildError(f"chunk size {chunk_size} is too small; use at least 4096 bytes")
    kind = detect_source(src)
    store = ChunkStore(store_dir)
    chunker = _Chunker(store, chunk_size, progress)
    try:
        if kind == "dir":
            root = tree_from_directory(src, chunker)
        else:
            root = tree_from_layers(src, kind, chunker, progress)
    except OSError as exc:  # the one boundary for filesystem errors of a build
        raise BuildError(f"cannot read {exc.filename or src}: {exc.strerror}; check permissions") from exc
    data = encode(root, chunk_size)
    out = Path(index_path) if index_path else default_index_path(src, store_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, data)
    index = ImageIndex.from_bytes(data, str(out))
    files = sum(1 for i in range(1, index.n_inodes + 1) if index.is_reg(i))
    return BuildResult(out, index.digest, files, index.total_bytes, index.n_chunks, chunker.new_chunks)
