"""The hot tree: the files a boot reads, on local disk; every other file and folder a symlink into the lazy
mount. What the engine sees at the mount point once an image has a boot profile.

Why: on a FUSE mount every ``open``, ``opendir`` and ``readdir`` is a round trip to the daemon, cached or
not; Python's imports make tens of thousands of them (``import vllm``: ~15k opens and ~12k readdirs per
process). Measured here (``python -c 'import torch; import vllm.entrypoints.openai.api_server'``, the vLLM
venv as an image, chunks cached, page cache warm): 9.6 s from local disk, 16.0 s through the mount (5.4 s of
daemon CPU on the same 2 cores), 10.4-11.4 s through a tree like this one (daemon CPU ~0). An overlayfs of
the copied files over the mount gained less (15.1-18.1 s in a run where local took 10.8-11.5 s and the mount
17.2-20.7 s): its merged folders still read the mount's on every ``readdir``. pyfuse3 cannot use the
kernel's no-open / cached-readdir modes (its ``read`` and ``readdir`` get the file handle only, not the
inode), so the way around the round trips is not to make them.

The tree (``build``), from the index and the profile alone:
- a regular file of at most ``HOT_FILE_MAX`` bytes the profile touched (any of its chunks), and every empty
  file in a folder that holds one (``__init__.py``: opened, never read, so never in a profile), is copied
  with its owner, mode bits (``SAFE_MODE_BITS``) and modification time (Python checks a ``.pyc`` against
  its source's); its chunks are verified as every chunk is (extended attributes are not copied);
- a folder on the way to such a file is a real folder; any other folder, and any other file (the large
  libraries, read in part, stay lazy and share the page cache through the mount), is a symlink to its path
  under the lazy mount, so nothing is copied that the boot did not read, and nothing is missing;
- the image's own symlinks are copied as they are.
Every chunk the profile names is also fetched into the disk cache (the prefetch the daemon would do), so
the lazy files the boot reads are local too. The tree is built beside the chunk cache under a name that
holds the index digest, the profile, ``HOT_FILE_MAX`` and the lazy mount's path (its symlinks point
there), in a temporary folder renamed into place when whole, so a later launch reuses it and a crash
leaves no half tree. It is what the boot profile says, so it is only used with a profile; the first boot
of an image on any host records one (``mount.mounted``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from coldstart.imagefs.fetcher import Fetcher
from coldstart.imagefs.index import ROOT, ImageIndex
from coldstart.imagefs.refs import SAFE_MODE_BITS

HOT_FILE_MAX = 8 << 20  # larger files stay lazy: libraries read in part (libtorch_cpu.so: 434 MB)
_FORMAT = "1"


@dataclass(frozen=True)
class HotTree:
    path: Path
    files: int  # copied to local disk
    bytes: int
    links: int  # symlinks into the lazy mount
    seconds: float
    built: bool  # False: a tree built by an earlier launch was reused
    fetched: int = 0  # bytes the build fetched from beyond the local chunk cache (set by the mount)


def tree_path(cache_dir: Path, index: ImageIndex, profile: list[str], lazy_root: Path) -> Path:
    """Where the hot tree for this index, profile and lazy mount lives (under ``cache_dir/hot``)."""
    key = hashlib.sha256(
        "\n".join([_FORMAT, index.digest, str(HOT_FILE_MAX), str(lazy_root), *profile]).encode()
    ).hexdigest()
    return cache_dir / "hot" / f"{index.digest.removeprefix('sha256:')[:16]}-{key[:16]}"


def hot_files(index: ImageIndex, profile: list[str]) -> tuple[dict[str, int], set[str]]:
    """(path -> inode of every file to copy, every folder on the way to one, "" the root)."""
    touched = set(profile)
    hot: dict[str, int] = {}
    empty: list[tuple[str, int]] = []
    for path, inode in index.walk():
        if not index.is_reg(inode) or index.size[inode] > HOT_FILE_MAX:
            continue
        if index.size[inode] == 0:
            empty.append((path, inode))
        elif any(d.hex() in touched for d in index.file_chunks(inode)):
            hot[path] = inode
    folders = {""}
    for path in hot:
        parent = os.path.dirname(path)
        while parent not in folders:
            folders.add(parent)
            parent = os.path.dirname(parent)
    hot.update((path, inode) for path, inode in empty if os.path.dirname(path) in folders)
    return hot, folders


def build(
    index: ImageIndex, profile: list[str], fetcher: Fetcher, lazy_root: Path, dest: Path, workers: int = 8
) -> HotTree:
    """The hot tree at ``dest`` (see the module docstring), built unless it is there already."""
    started = time.monotonic()
    hot, folders = hot_files(index, profile)
    if dest.is_dir():
        return HotTree(dest, len(hot), 0, 0, time.monotonic() - started, built=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    links = 0
    folder_inodes = {"": ROOT}
    try:
        tmp.mkdir()
        for path, inode in index.walk():  # parents come before their children
            if path == "" or os.path.dirname(path) not in folders:
                continue
            target = tmp / path
            if index.is_dir(inode) and path in folders:
                target.mkdir()
                folder_inodes[path] = inode
            elif stat.S_ISLNK(index.mode[inode]):
                os.symlink(index.readlink(inode), target)
            elif path not in hot:
                os.symlink(lazy_root / path, target)
                links += 1
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagefs-hot") as pool:
            copies = pool.map(lambda item: _copy(index, fetcher, tmp, *item), hot.items())
            hot_chunks = {d.hex() for inode in hot.values() for d in index.file_chunks(inode)}
            # The lazy files' chunks the boot read go to the disk cache meanwhile (the daemon's prefetch).
            lazy = [d for d in profile if d not in hot_chunks]
            prefetch = pool.map(lambda d: len(fetcher.get(d, must_cache=True)), lazy)
            copied = sum(copies)
            sum(prefetch)  # raises what a fetch raised
        for path in sorted(folders, key=len, reverse=True):  # children first: a folder's mtime is final
            folder = folder_inodes[path]
            os.chown(tmp / path, index.uid[folder], index.gid[folder])
            os.chmod(tmp / path, index.mode[folder] & SAFE_MODE_BITS)
            os.utime(tmp / path, ns=(index.mtime_ns[folder], index.mtime_ns[folder]))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return HotTree(dest, len(hot), copied, links, time.monotonic() - started, built=True)


def _copy(index: ImageIndex, fetcher: Fetcher, root: Path, path: str, inode: int) -> int:
    target = root / path
    with open(target, "wb", buffering=0) as f:
        for digest in index.file_chunks(inode):
            view = memoryview(fetcher.get(digest.hex()))
            while view:
                view = view[f.write(view) :]
    os.chown(target, index.uid[inode], index.gid[inode])  # as the mount shows them (the build runs as root)
    os.chmod(target, index.mode[inode] & SAFE_MODE_BITS)
    os.utime(target, ns=(index.mtime_ns[inode], index.mtime_ns[inode]))
    return index.size[inode]
