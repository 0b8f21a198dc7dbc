"""One way to replace a small file atomically: a uniquely named temporary file beside it, then a rename.

Readers see the old file or the new one, never half of either, also with several launchers on one host
(unique temporary names). ``durable`` adds an fsync before the rename (manifests, cuda.json); caches that
can be rebuilt skip it to stay off the restore path's latency.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
