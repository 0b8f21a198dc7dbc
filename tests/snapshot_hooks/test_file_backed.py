"""Weights moved into private mappings of content-addressed files: same values, same addresses, no
anonymous memory left for a checkpoint to dump, one file per content."""

from __future__ import annotations

from pathlib import Path

import torch

from coldstart.snapshot_hooks.file_backed import anonymous_regions, mappings, whole_pages
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
