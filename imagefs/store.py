"""Content-addressed chunk store on a local directory: ``DIR/chunks/<2 hex>/<64 hex>``.

Chunking is fixed-size (default 1 MiB), not content-defined. Why: a read at offset ``off`` maps to chunk
``off // size`` with no lookup table, a FUSE request (at most 1 MiB: ``max_pages_limit`` is 256 pages here)
touches one or two chunks, and the files that dominate images (shared libraries, wheels' contents, model
weights) are either byte-identical across images, which fixed chunks dedupe as well as CDC does, or rebuilt
wholesale, where CDC finds little to share. CDC in pure Python would also cost ~10x the build time on
2 cores. Revisit if layered images with shifted-but-similar large files matter.

Chunks are stored raw (not compressed) so a local cache hit is one ``read`` plus one SHA-256.
Writes are atomic (temp file + rename); identical bytes are stored once across all images.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

DEFAULT_CHUNK_SIZE = 1 << 20


def chunk_relpath(digest_hex: str) -> str:
    return f"chunks/{digest_hex[:2]}/{digest_hex}"


def is_hex_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class ChunkStore:
    """A directory of chunks named by their SHA-256; thread-safe (every write is a rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, digest_hex: str) -> Path:
        return self.root / chunk_relpath(digest_hex)

    def has(self, digest_hex: str) -> bool:
        return self.path(digest_hex).exists()

    def read(self, digest_hex: str) -> bytes | None:
        """Raw bytes stored under ``digest_hex`` (unverified), or None when absent."""
        try:
            with open(self.path(digest_hex), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, digest_hex: str, data: bytes) -> bool:
        """Store ``data`` under its digest; False when it was already there."""
        target = self.path(digest_hex)
        if target.exists():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def put(self, data: bytes) -> tuple[bytes, bool]:
        """Hash and store ``data``; returns (raw digest, newly written)."""
        digest = hashlib.sha256(data).digest()
        return digest, self.write(digest.hex(), data)

    def remove(self, digest_hex: str) -> None:
        self.path(digest_hex).unlink(missing_ok=True)
