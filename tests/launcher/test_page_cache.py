"""The weight files' read into the page cache during a restore (launcher/snapshots/page_cache.py)."""

from __future__ import annotations

import threading
from pathlib import Path

from support import until

from coldstart.launcher.snapshots.page_cache import PageCacheWarmer, read_into_page_cache


def test_every_file_is_read_whole_and_a_missing_one_is_skipped(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * (20 << 20))  # more than one block
    b.write_bytes(b"y" * 1000)
    assert read_into_page_cache([a, tmp_path / "gone", b], threading.Event()) == (20 << 20) + 1000


def test_a_set_stop_reads_nothing_more(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100)
    stop = threading.Event()
    stop.set()
    assert read_into_page_cache([tmp_path / "a"], stop) == 0


def test_the_warmer_reads_in_the_background_and_close_joins_it(tmp_path: Path) -> None:
    (tmp_path / "w").write_bytes(b"w" * (9 << 20))
    warmer = PageCacheWarmer()
    warmer.start([tmp_path / "w"], "r1")
    until(lambda: warmer.last is not None, "the read to finish")
    assert warmer.last is not None and warmer.last[0] == 9 << 20
    warmer.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("page-cache")]
    warmer.start([tmp_path / "w"], "r2")  # closed: starts nothing
    assert not [t for t in threading.enumerate() if t.name.startswith("page-cache")]


def test_a_disabled_warmer_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "w").write_bytes(b"w")
    warmer = PageCacheWarmer(enabled=False)
    warmer.start([tmp_path / "w"], "r1")
    assert warmer.last is None and not [t for t in threading.enumerate() if t.name.startswith("page-cache")]
