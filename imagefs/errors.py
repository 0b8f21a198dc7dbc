"""Errors of imagefs: each message is one line naming what failed and what to do.

    ImageError                    base; ``str(exc)`` is the line the CLI prints
    ├── UsageError                bad command line or option (exit code 2)
    ├── IndexError_               the index cannot be used
    │   ├── IndexTruncated        shorter than its header says (copy interrupted?)
    │   ├── IndexDigestMismatch   body does not hash to the digest in its header (corrupt or edited)
    │   ├── IndexFormatError      not an index, unknown version, or inconsistent tables
    │   └── UnsafePath            an entry escapes the image (``..``, ``/`` in a name, absolute path)
    ├── BuildError                a source (directory, OCI layout, docker-save tar) cannot be built
    ├── TierError                 a tier URL is unknown or a tier cannot be reached
    ├── ChunkUnavailable          no tier holds a chunk with the right digest (names the chunk)
    └── MountError                the FUSE mount could not be made, tuned or removed

FUSE handlers never let these escape: ``fs.errno_of`` is the single boundary that maps ImageError and
OSError to a ``pyfuse3.FUSEError`` errno (the test ``test_errors.py`` checks every class has a mapping).
"""

from __future__ import annotations

import errno


class ImageError(Exception):
    """Base of imagefs errors; the message is one actionable line."""

    exit_code = 1
    errno_code = errno.EIO


class UsageError(ImageError):
    exit_code = 2
    errno_code = errno.EINVAL


class IndexError_(ImageError):  # noqa: N801 - trailing underscore: do not shadow the builtin IndexError
    pass


class IndexTruncated(IndexError_):
    pass


class IndexDigestMismatch(IndexError_):
    pass


class IndexFormatError(IndexError_):
    pass


class UnsafePath(IndexError_):
    pass


class BuildError(ImageError):
    pass


class TierError(ImageError):
    pass


class ChunkUnavailable(ImageError):
    def __init__(self, digest: str, reasons: list[str]) -> None:
        detail = "; ".join(reasons) if reasons else "no tiers configured"
        super().__init__(f"chunk {digest} is on no tier ({detail}); check the origin store holds the image")
        self.digest = digest
        self.reasons = reasons


class MountError(ImageError):
    pass


ALL_ERRORS: tuple[type[ImageError], ...] = (
    ImageError,
    UsageError,
    IndexError_,
    IndexTruncated,
    IndexDigestMismatch,
    IndexFormatError,
    UnsafePath,
    BuildError,
    TierError,
    ChunkUnavailable,
    MountError,
)
