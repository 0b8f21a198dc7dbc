"""Read a restored replica's weight files into the page cache while the checkpointer restores it.

With the page cache dropped (a host that has not restored this snapshot lately), the canary's forward pass
faulted the weight files in from disk a page at a time: 1.17 s of a 2.66 s restore -> first token with the
Qwen3-0.6B shape (README "What the image holds"). Read here, in one thread, sequentially in large blocks,
from the moment the restore starts, the files are (mostly) cached by the time the engine touches them.
``posix_fadvise(WILLNEED)`` was tried first and gained nothing measurable; a read is what the kernel cannot
put off.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("coldstart.snapshots")

BLOCK = 64 << 20


def read_into_page_cache(paths: list[Path], stop: threading.Event) -> int:
    """Read ``paths`` whole (stopping early when ``stop`` is set); the bytes read. ``sendfile`` to
    /dev/null: the kernel reads the pages into its cache and copies nothing to us, so a warm page cache costs
    next to nothing (256 MiB: 0.007 s against 0.28 s for ``readinto``, measured here). A file that cannot
    be read is skipped: the restore that maps it will say why."""
    done = 0
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for path in paths:
            try:
                with open(path, "rb", buffering=0) as f:
                    offset = 0
                    while not stop.is_set():
                        n = os.sendfile(null, f.fileno(), offset, BLOCK)
                        if not n:
                            break
                        offset += n
                    done += offset
            except OSError as exc:
                log.debug("page cache warm-up skipped %s: %s", path, exc)
            if stop.is_set():
                break
    finally:
        os.close(null)
    return done


class PageCacheWarmer:
    """One background read per restore; ``close`` stops and joins them all (the launcher owns its threads)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # off only to measure what it gains (bench/startup.py --drop-caches)
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.last: tuple[int, float] | None = None  # (bytes, seconds) of the last warm-up that finished

    def start(self, paths: list[Path], name: str) -> None:
        if not paths or not self.enabled or self._stop.is_set():
            return

        def run() -> None:
            started = time.monotonic()
            try:
                self.last = (read_into_page_cache(paths, self._stop), time.monotonic() - started)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"page-cache {name}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s)
