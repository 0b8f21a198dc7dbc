"""Weights in files, not in the checkpoint: move memory into private mappings of content-addressed files.

Why: a CPU checkpoint (CRIU, runsc) writes every anonymous page of the process into its image, and every
replica restored from it gets its own private copy. A private *file* mapping whose pages were never written
is not in the image at all (measured with CRIU 4.2.1 here: a 100 MiB ``MAP_PRIVATE`` file mapping read end
to end dumps 0 bytes of it; only pages written after mapping, copied on write, are dumped): CRIU records the
file's path and size and maps it again at restore, and every replica restored on a host shares those pages
through the page cache. ``transformers serve`` gets this for free (safetensors are mmap'd); engines that copy
weights into their own allocations (vLLM on CPU: loaded into torch tensors, then re-packed for oneDNN) do not.

``file_back(ranges, directory)`` does it after the fact, in place: for each range, the whole pages inside it
are written to ``directory/<sha256 of the bytes>`` (once per content: replicas and snapshots share files) and
mapped over the same addresses (``MAP_PRIVATE | MAP_FIXED``): the bytes, the addresses and every pointer into
them stay the same, so nothing in the process notices. Later writes copy the page (private mapping), so a
file is never changed by the process and a range that turns out to be written (a cache) only costs what it
did before. The partial pages at either end of a range stay anonymous (< 8 KiB per range).

Invariants the caller keeps: nothing writes the ranges while they are moved (the engine is paused). A range
found changed between its copy and a second hash right before the remap is left anonymous (seen with vLLM's
engine core and the tiny model: the one 7.7 MB mapping moved was written by another thread while paused,
and its file did not hash to its name). The files stay at their path, unchanged, for as long as a snapshot
refers to them (the launcher pins them by digest in the snapshot's manifest).
``drop(ranges)`` is for memory whose content does not matter after a restore (a KV cache the engine
resets): its pages are released (``MADV_DONTNEED``: zero on next touch) and so are not dumped either.

``anonymous_regions(min_bytes)`` lists the process's own large anonymous mappings (from
``/proc/self/smaps``) for engines whose weights live in allocations no tensor names (oneDNN's packed
weights in vLLM): mostly resident private read-write mappings, without thread stacks (a guard page below)
and glibc arena heaps (64 MiB-aligned, with their reserve above; glibc's ``calloc`` trusts memory it
released there to read as zero, which a file mapping would not).

Standard library only (``ctypes`` for ``mmap``/``madvise`` at fixed addresses): vLLM's worker extension loads
this file by path inside vLLM's own environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import mmap
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10
_MADV_DONTNEED = 4
_MADV_MERGEABLE = 12
_RANGE_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


@dataclass
class FileBackReport:
    """What ``file_back`` did: bytes now file-backed, files it wrote and every file the ranges map."""

    ranges: int = 0
    skipped: int = 0  # ranges written to while being copied: left anonymous
    bytes: int = 0
    bytes_written: int = 0
    files: dict[str, int] = field(default_factory=dict)  # name (sha256) -> size

    def to_json(self) -> dict[str, object]:
        return {
            "ranges": self.ranges,
            "skipped": self.skipped,
            "bytes": self.bytes,
            "bytes_written": self.bytes_written,
            "files": dict(self.files),
        }


def whole_pages(start: int, length: int) -> tuple[int, int]:
    """The page-aligned part of ``[start, start + length)``: (first page, bytes), bytes 0 if none."""
    lo = -(-start // PAGE) * PAGE
    hi = (start + length) // PAGE * PAGE
    return lo, max(0, hi - lo)


_CHUNK = 64 << 20


def _store(view: memoryview, directory: Path) -> tuple[str, bool]:
    """Write ``view`` as ``directory/<sha256 of what was written>`` unless a file of that name and size is
    there. Each chunk is copied before it is hashed and written, so the name is the file's content even if
    the memory changed meanwhile (``file_back`` then sees that and leaves the range alone)."""
    fd, tmp = tempfile.mkstemp(prefix=".writing.", dir=directory)
    digest = hashlib.sha256()
    try:
        for start in range(0, len(view), _CHUNK):
            chunk = bytes(view[start : start + _CHUNK])
            digest.update(chunk)
            done = 0
            while done < len(chunk):
                done += os.write(fd, chunk[done:])
        # 0600, as the launcher's snapshot files are: it links these into the snapshot and CRIU refuses a
        # mapped file whose mode changed since the dump ("has bad mode 0100600 (expect 0100444)").
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    name = digest.hexdigest()
    path = directory / name
    if path.exists() and path.stat().st_size == len(view):
        os.unlink(tmp)
        return name, False
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    return name, True


def file_back(ranges: list[tuple[int, int]], directory: str | os.PathLike[str]) -> FileBackReport:
    """Move the whole pages of each ``(address, length)`` range into a private mapping of a
    content-addressed file under ``directory`` (created if missing); see the module docstring."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    report = FileBackReport()
    for start, length in ranges:
        lo, size = whole_pages(start, length)
        if size == 0:
            continue
        view = memoryview((ctypes.c_char * size).from_address(lo)).cast("B")
        name, written = _store(view, folder)
        # Memory that changed while it was copied is being written by the process (a buffer, not
        # weights): mapping the copy over it would lose those writes. Hashed again right before the
        # remap; such a range stays anonymous (dumped as before).
        unchanged = hashlib.sha256(view).hexdigest() == name
        view.release()
        if not unchanged:
            if written:
                (folder / name).unlink(missing_ok=True)
            report.skipped += 1
            continue
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            got = _libc.mmap(lo, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        finally:
            os.close(fd)
        if got != lo:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {name} over {lo:#x}+{size}: {os.strerror(err)}")
        report.ranges += 1
        report.bytes += size
        report.bytes_written += size if written else 0
        report.files[name] = size
    return report


def drop(ranges: list[tuple[int, int]]) -> int:
    """Release the whole pages of each range (they read as zero afterwards); the bytes released."""
    released = 0
    for start, length in ranges:
        lo, size = whole_pages(start, length)
        if size and _libc.madvise(lo, size, _MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise(DONTNEED) {lo:#x}+{size}: {os.strerror(err)}")
        released += size
    return released


def mergeable() -> int:
    """Mark every private anonymous mapping of this process mergeable (``MADV_MERGEABLE``); the bytes
    marked (0 where the kernel has no KSM). Nothing changes until the host runs KSM
    (``/sys/kernel/mm/ksm/run`` = 1): then ``ksmd`` merges pages with the same content, across processes,
    into one copy-on-write page. CRIU keeps the mark (``VmFlags: mg`` -> ``madv`` in its image) and sets it
    again at restore, so replicas restored from one image, whose heaps start out as the same bytes, come to
    share them: their PSS, not their image. Marks only; the caller decides when."""
    marked = 0
    for m in mappings():
        if (m.anonymous or m.path in ("[heap]", "[stack]")) and m.perms == "rw-p":
            if _libc.madvise(m.start, m.end - m.start, _MADV_MERGEABLE) == 0:
                marked += m.end - m.start
    return marked


def release_free_heap() -> None:
    """Give memory glibc holds for future allocations back to the kernel (``malloc_trim(0)``): freed
    buffers (a model's load-time copies) would otherwise be dumped as if they were in use."""
    _libc.malloc_trim(0)


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str
    rss: int

    @property
    def anonymous(self) -> bool:
        return self.path == "" or self.path.startswith("[anon:")


def mappings(pid: str = "self") -> list[Mapping]:
    """The process's mappings with their resident bytes, from ``/proc/PID/smaps``."""
    found: list[Mapping] = []
    current: list[object] | None = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = _RANGE_LINE.match(line)
            if head:
                if current is not None:
                    found.append(Mapping(*current))  # type: ignore[arg-type]
                current = [int(head[1], 16), int(head[2], 16), head[3], head[4].strip(), 0]
            elif line.startswith("Rss:") and current is not None:
                current[4] = int(line.split()[1]) * 1024
    if current is not None:
        found.append(Mapping(*current))  # type: ignore[arg-type]
    return found


def anonymous_regions(min_bytes: int = 4 << 20, min_resident: float = 0.5) -> list[tuple[int, int]]:
    """Large, mostly resident, private read-write anonymous mappings of this process, without thread
    stacks and glibc arena heaps (see the module docstring): ``(address, length)`` each."""
    maps = mappings()
    out = []
    for i, m in enumerate(maps):
        size = m.end - m.start
        if not m.anonymous or m.perms != "rw-p" or size < min_bytes or m.rss < min_resident * size:
            continue
        before = maps[i - 1] if i > 0 else None
        after = maps[i + 1] if i + 1 < len(maps) else None
        if before and before.end == m.start and before.perms == "---p" and before.anonymous:
            continue  # a thread stack above its guard page
        if _arena_heap(m, after):
            continue  # a glibc arena heap and the reserve it grows into
        out.append((m.start, size))
    return out


# glibc's per-thread arena heaps (``malloc/arena.c``): each is one HEAP_MAX_SIZE reservation (64 MiB on
# 64-bit: 2 * DEFAULT_MMAP_THRESHOLD_MAX), aligned to that size, its used part read-write and the rest
# ``---p``. Told apart by that shape, not by a ``---p`` neighbour alone: a weight mapping just below a thread
# stack's guard page has one too (seen with vLLM and the Qwen3-0.6B shape: 311 MiB of weights stayed
# anonymous, and were dumped, because the next mapping up was a guard page).
_ARENA_HEAP_MAX = 64 << 20


def _arena_heap(m: Mapping, after: Mapping | None) -> bool:
    if m.start % _ARENA_HEAP_MAX:
        return False
    if after and after.start == m.end and after.perms == "---p" and after.anonymous:
        return after.end - m.start >= _ARENA_HEAP_MAX  # the reserve (a guard above may have merged into it)
    return m.end - m.start == _ARENA_HEAP_MAX  # a full arena heap: no reserve left
