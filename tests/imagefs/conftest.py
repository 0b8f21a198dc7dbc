"""imagefs fixtures: sample trees, built images, real FUSE mounts (always unmounted), a torch venv image."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coldstart.imagefs.build import BuildResult, build
from coldstart.imagefs.mount import force_unmount, is_mountpoint, mounted

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "imagefs"
SMALL_CHUNK = 64 * 1024


def fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    if os.geteuid() != 0:
        return "FUSE tests need root (allow_other, fusectl tuning)"
    return None


@pytest.fixture(scope="session")
def fuse() -> None:
    """Skips the test, with the reason, where FUSE mounts cannot be made (use via ``usefixtures``)."""
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)


def make_tree(root: Path) -> Path:
    """A tree with every kind of entry a builder must keep."""
    root.mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_text("hello image\n")
    (root / "multi.bin").write_bytes(os.urandom(5 * SMALL_CHUNK + 123))
    (root / "exact.bin").write_bytes(os.urandom(2 * SMALL_CHUNK))
    (root / "dup1.bin").write_bytes(b"x" * (3 * SMALL_CHUNK))  # identical chunks: stored once
    (root / "dup2.bin").write_bytes(b"x" * (3 * SMALL_CHUNK))
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "dir" / "sub" / "deeper" / "leaf").write_text("leaf\n")
    (root / "dir" / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "dir" / "script.sh").chmod(0o755)
    (root / "dir" / "setuid").write_text("s")
    (root / "dir" / "setuid").chmod(0o4711)
    (root / "private").mkdir(mode=0o700)
    (root / "private").chmod(0o700)
    os.link(root / "small.txt", root / "dir" / "hardlink.txt")
    os.symlink("small.txt", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("sub", root / "dir" / "dirlink")
    os.mkfifo(root / "fifo")
    (root / "with space é").write_text("unicode name\n")
    (root / os.fsdecode(b"bad-\xff-utf8")).write_text("raw bytes name\n")
    many = root / "many"
    many.mkdir()
    for i in range(700):  # more entries than one readdir buffer
        (many / f"f{i:04d}").write_text(str(i))
    os.setxattr(root / "small.txt", "user.origin", b"coldstart-test")
    os.chown(root / "dir" / "script.sh", 1234, 4321)
    os.utime(root / "small.txt", ns=(1_000_000_000, 1_234_567_891_011_121_314))
    return root


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, BuildResult]:
    """(source tree, store, build result) of ``make_tree``, chunked at 64 KiB."""
    base = tmp_path_factory.mktemp("sample")
    src = make_tree(base / "src")
    store = base / "store"
    result = build(src, store, chunk_size=SMALL_CHUNK)
    return src, store, result


@pytest.fixture
def mount_image(tmp_path: Path) -> Iterator[Callable[..., contextlib.AbstractContextManager]]:
    """Factory ``mount_image(index, tiers, **kw)`` -> ``mounted(...)`` on a fresh mount point and cache;
    whatever happens, nothing stays mounted after the test."""
    points: list[Path] = []

    def factory(index: Path, tiers: list[str], cache: Path | None = None, **kw: object):
        mnt = tmp_path / f"mnt{len(points)}"
        mnt.mkdir()
        points.append(mnt)
        return mounted(index, mnt, cache or tmp_path / f"cache{len(points)}", tiers, **kw)

    yield factory
    for mnt in points:
        if is_mountpoint(mnt):
            force_unmount(mnt)


# -- the torch venv image (slow to make: cached on disk under .cache/imagefs) --------------------------------


def torch_venv() -> Path:
    """A minimal venv with torch==2.13.0 (local wheel), made once and kept in .cache/imagefs."""
    venv = CACHE / "torch-venv"
    if (venv / ".complete").exists():
        return venv
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "torch-venv.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(tmp)], check=True)
    constraints = CACHE / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    pip = [
        str(tmp / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--no-cache-dir",
        "-c",
        str(constraints),
    ]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    shutil.rmtree(venv, ignore_errors=True)
    tmp.rename(venv)  # pip's script shebangs keep the .tmp path; only bin/python is used
    (venv / ".complete").write_text("torch==2.13.0\n")
    return venv


def torch_image() -> BuildResult:
    """The torch venv built as an image into .cache/imagefs/torch-store (rebuilt only when missing)."""
    venv = torch_venv()
    store = CACHE / "torch-store"
    index = store / "images" / "torch-venv.cidx"
    marker = store / ".complete"
    if marker.exists() and index.exists():
        from coldstart.imagefs.index import ImageIndex

        idx = ImageIndex.open(index)
        files = sum(1 for i in range(1, idx.n_inodes + 1) if idx.is_reg(i))
        return BuildResult(index, idx.digest, files, idx.total_bytes, idx.n_chunks, 0)
    result = build(venv, store, index)
    marker.write_text(result.digest + "\n")
    return result


@pytest.fixture(scope="session")
def torch_image_fixture() -> tuple[Path, BuildResult]:
    if not (Path("/opt/wheels").is_dir() or (CACHE / "torch-venv" / ".complete").exists()):
        pytest.skip("no local torch wheel (/opt/wheels) to make the venv image from")
    return CACHE / "torch-venv", torch_image()
