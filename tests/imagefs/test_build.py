"""Builders: directories, OCI layouts and docker-save tars, with whiteouts, hard links and bad paths."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from coldstart.imagefs.build import build
from coldstart.imagefs.errors import BuildError
from coldstart.imagefs.index import ROOT, ImageIndex
from coldstart.imagefs.store import ChunkStore

CS = 4096


def _layer(entries: list[tuple[str, str, bytes | str]]) -> bytes:
    """A layer tar: (name, kind, payload) with kind file|dir|symlink|hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(payload)
                tar.addfile(info)
            else:
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size, info.mode = len(data), 0o644
                if name.endswith("xattr"):
                    info.pax_headers = {"SCHILY.xattr.user.k": "v"}
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LAYERS = [
    _layer(
        [
            ("etc/", "dir", ""),
            ("etc/os-release", "file", "base\n"),
            ("etc/gone", "file", "deleted above\n"),
            ("opt/", "dir", ""),
            ("opt/old1", "file", "old"),
            ("opt/old2", "file", "old"),
            ("usr/bin/tool", "file", b"T" * (3 * CS + 5)),
            ("usr/bin/tool-link", "hardlink", "usr/bin/tool"),
            ("usr/bin/sh", "symlink", "/bin/dash"),
        ]
    ),
    _layer(
        [
            ("etc/.wh.gone", "file", ""),
            ("opt/new", "file", "new"),  # before the opaque marker: same layer, must survive it
            ("opt/.wh..wh..opq", "file", ""),
            ("etc/os-release", "file", "top\n"),
            ("etc/with-xattr", "file", "x"),
        ]
    ),
]
EXPECTED = {
    "etc/os-release": b"top\n",
    "opt/new": b"new",
    "usr/bin/tool": b"T" * (3 * CS + 5),
    "etc/with-xattr": b"x",
}


def _read(index: ImageIndex, store: Path, path: str) -> bytes:
    inode = ROOT
    for part in path.split("/"):
        found = index.lookup(inode, part.encode())
        assert found is not None, path
        inode = found
    return b"".join(ChunkStore(store).read(d.hex()) or b"" for d in index.file_chunks(inode))


def _check_layered(index: ImageIndex, store: Path) -> None:
    paths = dict(index.walk())
    assert "etc/gone" not in paths
    assert "opt/old1" not in paths and "opt/old2" not in paths
    for path, data in EXPECTED.items():
        assert _read(index, store, path) == data
    assert paths["usr/bin/tool"] == paths["usr/bin/tool-link"]
    assert index.nlink[paths["usr/bin/tool"]] == 2
    assert index.readlink(paths["usr/bin/sh"]) == b"/bin/dash"
    assert index.xattrs(paths["etc/with-xattr"]) == {b"user.k": b"v"}
    assert index.mtime_ns[paths["etc/os-release"]] == 1_700_000_000 * 10**9


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_oci_layout(layout: Path, layers: list[bytes]) -> Path:
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descs = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            **_blob(layout, gzip.compress(layer, mtime=0)),
        }
        for layer in layers
    ]
    config = _blob(layout, b"{}")
    manifest = {"schemaVersion": 2, "config": config, "layers": descs}
    mdesc = _blob(layout, json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    return layout


def make_docker_save(path: Path, layers: list[bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        names = []
        for i, layer in enumerate(layers):
            info = tarfile.TarInfo(f"layer{i}/layer.tar")
            info.size = len(layer)
            tar.addfile(info, io.BytesIO(layer))
            names.append(info.name)
        manifest = json.dumps([{"Config": "config.json", "RepoTags": ["t:1"], "Layers": names}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return path


def test_oci_layout_applies_layers_and_whiteouts(tmp_path: Path) -> None:
    layout = make_oci_layout(tmp_path / "oci", LAYERS)
    result = build(layout, tmp_path / "store", chunk_size=CS)
    _check_layered(ImageIndex.open(result.index_path), tmp_path / "store")


def test_docker_save_tar(tmp_path: Path) -> None:
    archive = make_docker_save(tmp_path / "img.tar", LAYERS)
    result = build(archive, tmp_path / "store", chunk_size=CS)
    assert result.index_path == tmp_path / "store" / "images" / "img.cidx"
    _check_layered(ImageIndex.open(result.index_path), tmp_path / "store")
    # The same layers through the OCI path give the very same image.
    oci = build(make_oci_layout(tmp_path / "oci", LAYERS), tmp_path / "store", chunk_size=CS)
    assert oci.digest == result.digest
    assert oci.new_chunks == 0


def test_corrupt_oci_blob_is_refused(tmp_path: Path) -> None:
    layout = make_oci_layout(tmp_path / "oci", LAYERS)
    blob = next(p for p in (layout / "blobs" / "sha256").iterdir() if p.stat().st_size > 200)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    with pytest.raises(BuildError, match="does not match its digest|corrupt"):
        build(layout, tmp_path / "store", chunk_size=CS)


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc/passwd"])
def test_escaping_members_are_refused(tmp_path: Path, name: str) -> None:
    archive = make_docker_save(tmp_path / "bad.tar", [_layer([(name, "file", "x")])])
    with pytest.raises(BuildError, match="escapes its root"):
        build(archive, tmp_path / "store", chunk_size=CS)


def test_directory_build_is_deterministic_and_dedupes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(b"A" * (2 * CS))
    (src / "b").write_bytes(b"A" * CS + b"tail")
    first = build(src, tmp_path / "store", chunk_size=CS)
    assert first.new_chunks == 2  # "A"*CS stored once for three uses
    second = build(src, tmp_path / "store", tmp_path / "again.cidx", chunk_size=CS)
    assert second.new_chunks == 0
    assert first.index_path.read_bytes() == second.index_path.read_bytes()
    (src / "d" / "a").write_bytes(b"B" * (2 * CS))
    third = build(src, tmp_path / "store", tmp_path / "changed.cidx", chunk_size=CS)
    assert third.digest != first.digest and third.new_chunks == 1


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain.txt").write_text("not an image")
    with pytest.raises(BuildError, match="neither"):
        build(tmp_path / "plain.txt", tmp_path / "store")
