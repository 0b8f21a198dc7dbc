"""The hot tree: an image with a boot profile is shown as local copies of what the boot read, the rest
linked into the lazy FUSE mount. Real FUSE mounts, real bind mounts, a real Python importing from it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coldstart.imagefs import hot_tree
from coldstart.imagefs.build import build
from coldstart.imagefs.mount import force_unmount, is_mountpoint, lazy_root_for, mounted

pytestmark = pytest.mark.usefixtures("fuse")
CHUNK = 64 * 1024


def make_source(root: Path) -> Path:
    """A package a Python imports (its empty ``__init__.py`` is opened, never read), a large file read in
    part, folders and files the boot never touches, the image's own symlinks."""
    pkg = root / "site" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_bytes(b"")
    (pkg / "mod.py").write_text("VALUE = 42\n")
    (pkg / "big.so").write_bytes(os.urandom(6 * CHUNK))  # over the test's HOT_FILE_MAX: stays lazy
    (pkg / "unread.py").write_text("UNREAD = 1\n")
    (root / "cold" / "deep").mkdir(parents=True)
    (root / "cold" / "deep" / "data").write_bytes(os.urandom(CHUNK + 5))
    os.symlink("pkg/mod.py", root / "site" / "alias.py")
    os.symlink("/etc/hostname", root / "abs-link")
    os.chown(pkg / "mod.py", 1234, 4321)  # an engine may run as another user: owners are kept
    os.utime(pkg / "mod.py", ns=(1_000_000_000, 1_234_567_891_000_000_000))
    return root


def files_of(root: Path) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


IMPORT = "import sys; sys.path.insert(0, sys.argv[1]); import pkg.mod; print(pkg.mod.VALUE, pkg.mod.__file__)"


def test_a_profiled_image_is_shown_as_local_copies_and_links_into_the_lazy_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hot_tree, "HOT_FILE_MAX", 4 * CHUNK)
    src = make_source(tmp_path / "src")
    store = tmp_path / "store"
    index = build(src, store, chunk_size=CHUNK).index_path
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    try:
        # First launch: no profile yet, so the plain lazy mount, which records what the "boot" reads.
        with mounted(index, mnt, cache, [str(store)], hot_tree=True) as m:
            assert m.hot_tree is None and m.lazy_root == m.mountpoint == mnt.resolve()
            run = subprocess.run(
                [sys.executable, "-c", IMPORT, str(mnt / "site")], capture_output=True, text=True
            )
            assert run.stdout.split()[0] == "42", run.stderr
            with open(mnt / "site" / "pkg" / "big.so", "rb") as f:
                f.read(100)  # a library read in part
            m.save_profile()
            deadline = time.monotonic() + 10
            while not Path(f"{index}.profile").exists():
                assert time.monotonic() < deadline, "no profile written"
                time.sleep(0.05)
        # Next launch: the hot tree, bound read-only at the mount point.
        with mounted(index, mnt, cache, [str(store)], hot_tree=True) as m:
            tree, lazy = m.hot_tree, m.lazy_root
            assert tree is not None and tree.built and lazy != mnt.resolve()
            assert is_mountpoint(mnt) and is_mountpoint(lazy)
            site = mnt / "site"
            for rel in ("pkg/mod.py", "pkg/__init__.py"):  # read (or opened, when empty): copied
                assert not (site / rel).is_symlink(), rel
                copied, source = (site / rel).stat(), (src / "site" / rel).stat()
                assert (copied.st_mtime_ns, copied.st_uid, copied.st_gid, copied.st_mode) == (
                    source.st_mtime_ns,
                    source.st_uid,
                    source.st_gid,
                    source.st_mode,
                )
            assert os.readlink(site / "pkg" / "big.so") == str(lazy / "site/pkg/big.so")  # large: lazy
            assert os.readlink(site / "pkg" / "unread.py") == str(lazy / "site/pkg/unread.py")
            assert os.readlink(mnt / "cold") == str(lazy / "cold")  # a folder the boot never entered
            assert os.readlink(site / "alias.py") == "pkg/mod.py"  # the image's own links as they are
            assert os.readlink(mnt / "abs-link") == "/etc/hostname"
            assert files_of(mnt) == files_of(src)  # nothing missing, nothing different
            with pytest.raises(OSError) as err:
                (site / "new.py").write_text("x")
            assert err.value.errno == errno.EROFS
            run = subprocess.run([sys.executable, "-c", IMPORT, str(site)], capture_output=True, text=True)
            assert run.stdout.split() == ["42", str(site / "pkg" / "mod.py")], run.stderr
            assert (tree.files, tree.bytes) == (2, len("VALUE = 42\n"))  # mod.py and the empty __init__.py
        assert not is_mountpoint(mnt) and not is_mountpoint(lazy)
        # A later launch reuses the tree it built (same image, profile and mount point).
        with mounted(index, mnt, cache, [str(store)], hot_tree=True) as m:
            assert m.hot_tree is not None and not m.hot_tree.built and m.hot_tree.path == tree.path
            assert files_of(mnt) == files_of(src)
    finally:
        for point in (mnt, lazy_root_for(mnt)):
            if is_mountpoint(point):
                force_unmount(point)


def test_a_tree_that_cannot_be_built_leaves_the_image_lazy_at_the_mount_point(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hot tree is a shortcut: when its build fails (here a chunk the profile names is gone from the
    origin; a full disk alike) the mount point shows the lazy mount, with a warning, and no half tree
    stays."""
    src = make_source(tmp_path / "src")
    store = tmp_path / "store"
    index = build(src, store, chunk_size=CHUNK).index_path
    from coldstart.imagefs.index import ImageIndex
    from coldstart.imagefs.profile import write_profile

    image = ImageIndex.open(index)
    big = dict(image.walk())["site/pkg/big.so"]
    gone = image.chunk_digest(big, 0).hex()
    mod = dict(image.walk())["site/pkg/mod.py"]
    write_profile(f"{index}.profile", image.digest, [image.chunk_digest(mod, 0).hex(), gone])
    (store / "chunks" / gone[:2] / gone).unlink()
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    try:
        with caplog.at_level("WARNING", logger="coldstart.imagefs"):
            with mounted(index, mnt, cache, [str(store)], hot_tree=True) as m:
                assert m.hot_tree is None and is_mountpoint(mnt)
                assert (
                    mnt / "site" / "pkg" / "mod.py"
                ).read_text() == "VALUE = 42\n"  # lazily, through the mount
                assert not (mnt / "site" / "pkg" / "mod.py").is_symlink()
        assert "not built" in caplog.text and "served lazily" in caplog.text
        assert not is_mountpoint(mnt) and not is_mountpoint(lazy_root_for(mnt))
        assert not list((cache / "hot").glob("*"))  # no tree, no half-built folder
    finally:
        for point in (mnt, lazy_root_for(mnt)):
            if is_mountpoint(point):
                force_unmount(point)
