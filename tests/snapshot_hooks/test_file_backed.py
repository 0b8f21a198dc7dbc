"""Weights moved into private mappings of content-addressed files: same values, same addresses, no
anonymous memory left for a checkpoint to dump, one file per content."""

from __future__ import annotations

import ctypes
import mmap
import re
from pathlib import Path

import torch

from coldstart.snapshot_hooks.file_backed import PAGE, anonymous_regions, mappings, mergeable, whole_pages
from coldstart.snapshot_hooks.torch_helpers import file_back_module


def mapped_from(directory: Path) -> int:
    """Bytes of this process mapped from files under ``directory``."""
    return sum(m.end - m.start for m in mappings() if m.path.startswith(str(directory)))


def test_module_weights_move_into_shared_files_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)).eval()
    x = torch.randn(4, 1024)
    with torch.no_grad():
        before = model(x)
    pointers = [p.data_ptr() for p in model.parameters()]
    report = file_back_module(model, tmp_path / "weights")
    assert report.ranges == 2 and len(report.files) == 2  # the two 4 MiB weights; biases are small
    assert [p.data_ptr() for p in model.parameters()] == pointers
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert mapped_from(tmp_path / "weights") == report.bytes >= 2 * (4 << 20) - 4 * 4096
    for name, size in report.files.items():
        assert (tmp_path / "weights" / name).stat().st_size == size
    again = file_back_module(model, tmp_path / "weights")  # same content: the same files, none written
    assert again.bytes_written == 0 and again.files == report.files


def test_a_write_after_file_back_stays_private(tmp_path: Path) -> None:
    weight = torch.nn.Parameter(torch.ones(1 << 20), requires_grad=False)  # 4 MiB
    module = torch.nn.Module()
    module.register_parameter("w", weight)
    report = file_back_module(module, tmp_path)
    (name,) = report.files
    with torch.no_grad():
        weight[: 1 << 19] = 2.0  # copy-on-write: the process sees it, the file does not
    assert float(weight.sum()) == (1 << 19) * 3.0
    data = torch.frombuffer(bytearray((tmp_path / name).read_bytes()), dtype=torch.float32)
    assert bool((data == 1.0).all())


def test_anonymous_regions_finds_a_large_buffer_but_not_thread_stacks() -> None:
    # 64 MiB, resident: above glibc's largest dynamic mmap threshold (32 MiB), so it is a mapping of its
    # own even in a long-lived process whose threshold grew (a 16 MiB buffer came from [heap] in the suite).
    buffer = torch.zeros(64 << 20, dtype=torch.uint8) + 1
    lo, size = whole_pages(buffer.data_ptr(), buffer.numel())
    regions = anonymous_regions(min_bytes=32 << 20)
    assert any(start <= lo and lo + size <= start + n for start, n in regions)
    stacks = [m for m in mappings() if m.path.startswith("[stack")]
    assert not any(start == m.start for m in stacks for start, _ in regions)


def test_anonymous_regions_tells_an_arena_heap_from_a_buffer_below_a_guard_page() -> None:
    """glibc's arena heaps (64 MiB-aligned, their ``---p`` reserve above) stay out; a buffer whose upper
    neighbour is a ``---p`` mapping that is not its reserve is found (vLLM's tied embedding table, 311 MiB,
    sat below a thread stack's guard page and was dumped while an older rule took it for an arena)."""
    mib = 1 << 20
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    size = 192 * mib
    reserve = libc.mmap(None, size, 0, anon | 0x4000, -1, 0)  # PROT_NONE, MAP_NORESERVE
    assert reserve not in (None, ctypes.c_void_p(-1).value)
    try:
        # [arena: 8 MiB rw][its reserve: 56 MiB ---p][4 KiB r--p][buffer: 8 MiB rw][---p ...]
        arena = -(-reserve // (64 * mib)) * (64 * mib)
        buffer = arena + 64 * mib + PAGE
        for address, length, prot in (
            (arena, 8 * mib, rw),
            (arena + 64 * mib, PAGE, mmap.PROT_READ),
            (buffer, 8 * mib, rw),
        ):
            assert libc.mmap(address, length, prot, anon | 0x10, -1, 0) == address  # MAP_FIXED
        ctypes.memset(arena, 1, 8 * mib)
        ctypes.memset(buffer, 1, 8 * mib)
        starts = {start for start, _ in anonymous_regions(min_bytes=4 * mib)}
        assert buffer in starts
        assert arena not in starts
    finally:
        libc.munmap(reserve, size)


def vm_flags() -> dict[int, list[str]]:
    """Start address -> ``VmFlags`` of each mapping of this process."""
    flags: dict[int, list[str]] = {}
    start = 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line.startswith("VmFlags:"):
            flags[start] = line.split()[1:]
        elif re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            start = int(line.split("-", 1)[0], 16)
    return flags


def test_mergeable_marks_the_heap_and_large_buffers_for_ksm() -> None:
    """``mergeable`` sets ``MADV_MERGEABLE`` on the process's anonymous memory (``VmFlags: mg``, which CRIU
    records and sets again at restore), so KSM may merge what restored replicas still hold alike."""
    buffer = torch.zeros(64 << 20, dtype=torch.uint8) + 1
    lo, _ = whole_pages(buffer.data_ptr(), buffer.numel())
    heap = min(m.start for m in mappings() if m.path == "[heap]")
    assert mergeable() >= 64 << 20
    flags = vm_flags()
    (holding,) = [m for m in mappings() if m.start <= lo < m.end]
    assert "mg" in flags[holding.start]
    assert "mg" in flags[heap]  # (the heap grown since is a mapping of its own, not marked)
