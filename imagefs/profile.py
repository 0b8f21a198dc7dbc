"""Boot profiles: which chunks a boot read, in the order it first read them.

Stored beside the index as ``INDEX.profile`` (text, atomic write)::

    coldstart-imagefs-profile 1 sha256:<index digest>
    <chunk sha256 hex>
    ...

A profile names its index: one recorded against another image is ignored with a log line, never used to
prefetch the wrong bytes. Recording happens at the FS read layer (every chunk a read touched, whichever
tier served it), so a second boot that was prefetched still records the same order.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from coldstart.imagefs.store import is_hex_digest, write_atomic

log = logging.getLogger("coldstart.imagefs")
HEADER = "coldstart-imagefs-profile 1"


def profile_path_for(index_path: str | Path) -> Path:
    return Path(str(index_path) + ".profile")


def write_profile(path: str | Path, index_digest: str, digests: list[str]) -> None:
    write_atomic(path, "\n".join([f"{HEADER} {index_digest}", *digests]) + "\n")


def read_profile(path: str | Path, index_digest: str) -> list[str]:
    """Chunk digests in boot order; [] (with a log line) when absent, foreign or malformed."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring unreadable boot profile %s: %s", path, exc)
        return []
    if not lines or lines[0] != f"{HEADER} {index_digest}":
        log.warning("ignoring boot profile %s: recorded for another image or version", path)
        return []
    digests = [line for line in lines[1:] if line]
    if not all(is_hex_digest(d) for d in digests):
        log.warning("ignoring malformed boot profile %s", path)
        return []
    return digests


class Recorder:
    """First-touch order of chunks; stops when saved, so a profile covers the boot and not what follows."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._order: list[str] = []
        self._lock = threading.Lock()
        self.active = True

    def touch(self, digest_hex: str) -> None:
        if not self.active or digest_hex in self._seen:
            return
        with self._lock:
            if digest_hex not in self._seen:
                self._seen.add(digest_hex)
                self._order.append(digest_hex)

    def stop(self) -> list[str]:
        with self._lock:
            self.active = False
            return list(self._order)
