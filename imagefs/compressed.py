"""Files published zstd-compressed: what a snapshot's memory image costs in a store and on the wire.

A CRIU or runsc image is mostly the engine's heap (Python objects, import-time state), which compresses
about 4.5x with zstd level 3 (measured here: a vLLM API server's 452 MB page image -> 101 MB in 2.2 s on one
core); weights in bf16 hardly compress. So ``stage`` writes each file that shrinks by at least
``MIN_SAVING`` as ``NAME.zst`` into a staging tree and links the rest as they are; the ref lists the
compressed names (``Ref.compressed``). ``Expander`` undoes it while ``materialize`` writes the file: chunks
are verified as published (compressed), the expanded bytes are what lands on disk, so a host restores from
plain files at local-disk speed and never pays for decompression on a restore, only on its first pull.

Why the whole file, not each chunk: a chunk store shares chunks between trees and the FUSE daemon serves
engine images chunk by chunk from the raw chunks (a local hit is one read); only published trees meant to be
materialized whole (snapshots) are compressed, so nothing on the lazy read path changes. The output of a
given level is the same bytes for the same input (zstd's multi-threaded mode included), so a file published
twice (the weights of two snapshots of one model) still shares its chunks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zstandard

from coldstart.imagefs.errors import IndexFormatError, UsageError

SUFFIX = ".zst"
LEVEL = 3
MIN_SAVING = 0.10  # keep a compressed copy only if it is at least 10% smaller
MIN_BYTES = 64 << 10  # smaller files are linked as they are: not worth a frame
_MAX_WINDOW = 1 << 27  # decompression window cap (128 MiB); our frames use far less


def stage(src: Path, staging: Path, *, level: int = LEVEL) -> list[str]:
    """Mirror the regular files and folders of ``src`` into ``staging`` (which must exist, on the same
    filesystem for links to work; else files are copied): compressible files as ``NAME.zst``, the others
    hard-linked. Returns the relative names (without the suffix) that were compressed, sorted."""
    compressor = zstandard.ZstdCompressor(level=level, threads=-1)
    compressed: list[str] = []
    for folder, dirs, files in os.walk(src):
        rel_dir = Path(folder).relative_to(src)
        for name in dirs:
            (staging / rel_dir / name).mkdir(exist_ok=True)
        for name in files:
            source = Path(folder) / name
            if source.is_symlink() or not source.is_file():
                continue  # materialize writes regular files only
            rel = rel_dir / name
            if name.endswith(SUFFIX):
                raise UsageError(f"{source}: a published tree cannot hold a file ending in {SUFFIX}")
            if source.stat().st_size >= MIN_BYTES and _compress(
                compressor, source, staging / f"{rel}{SUFFIX}"
            ):
                compressed.append(rel.as_posix())
            else:
                _link(source, staging / rel)
    return sorted(compressed)


def _compress(compressor: zstandard.ZstdCompressor, source: Path, target: Path) -> bool:
    with open(source, "rb") as src, open(target, "wb") as dst:
        read, written = compressor.copy_stream(src, dst, size=os.fstat(src.fileno()).st_size)
    if written > read * (1 - MIN_SAVING):
        target.unlink()
        return False
    os.chmod(target, source.stat().st_mode & 0o777)
    return True


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class Expander:
    """One compressed file's bytes as ``materialize`` receives them, in order -> the expanded bytes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._decoder = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW).decompressobj()

    def feed(self, data: bytes) -> bytes:
        try:
            return self._decoder.decompress(data)
        except zstandard.ZstdError as exc:
            raise IndexFormatError(f"{self.name}: not a zstd stream ({exc}); publish it again") from exc

    def finish(self) -> None:
        if not self._decoder.eof:
            raise IndexFormatError(f"{self.name}: the compressed stream ends early; publish it again")
