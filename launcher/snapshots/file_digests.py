"""SHA-256 of files, remembered per (device, inode, size, mtime, ctime) so a file is hashed once.

Used for the snapshot's own files (verified before every restore) and for the model files an engine maps
(mmap'd safetensors are not inside the CPU image: a weights file changed in place would be served silently
after restore). Hashing a 1.2 GB model or a 0.5 GB image on every restore would cost about a second; like
git's index, we trust a file whose stat is unchanged since we hashed it. Any write changes its ctime (which
user space cannot set back), so a flipped byte, a truncation or a replaced file is always re-hashed.
Bit rot below the file system is not caught by this cache: ``coldstart snapshot inspect --verify`` re-hashes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from coldstart.launcher.atomic import write_text_atomic


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestCache:
    """A JSON file mapping absolute path -> [stat key..., sha256]; written atomically on ``save``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list[object]] = {}
        self._dirty = False
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                self._entries = json.loads(path.read_text())

    def digest(self, file: Path, *, trust_cache: bool = True) -> str:
        file = Path(file).resolve()
        st = file.stat()
        key = _stat_key(st)
        cached = self._entries.get(str(file))
        if trust_cache and cached and cached[:-1] == key:
            return str(cached[-1])
        digest = sha256_file(file)
        if _stat_key(file.stat()) == key:  # unchanged while we read it: safe to remember
            self._entries[str(file)] = [*key, digest]
            self._dirty = True
        return digest

    def remember(self, file: Path, digest: str) -> None:
        file = Path(file).resolve()
        self._entries[str(file)] = [*_stat_key(file.stat()), digest]
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self._entries), durable=False)  # a cache: rebuildable
        self._dirty = False
