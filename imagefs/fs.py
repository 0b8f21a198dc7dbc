"""The read-only pyfuse3 filesystem over an image index (pyfuse3's contract, as its passthroughfs example).

- Metadata comes from the index alone; only ``read`` touches chunks.
- Handlers raise nothing but ``pyfuse3.FUSEError``: ``errno_of`` is the one place that maps our errors and
  OSError to an errno (``ChunkUnavailable`` -> EIO, logged with the chunk's digest by the fetcher).
- Lookup counts live in ``LookupCounts`` alone. The image is immutable, so ``forget`` frees nothing but the
  count; there is no deletion anywhere.
- Everything is immutable, so attributes and entries are cached by the kernel for an hour and open files
  keep their page cache (``keep_cache``): a second read of a page never reaches this process.
- Chunk fetches run in worker threads (``trio.to_thread``) behind a capacity limiter; chunks already in
  memory are served on the trio thread.
- Sequential reads fetch ahead, ramping up like the kernel's read-ahead: after a file's reads have been
  contiguous ``RAMP_AFTER`` times in a row, the next 1, 2, 4 ... ``readahead_chunks`` chunks are fetched in
  the background, so fetch latency overlaps the reader. Scattered access (mmap faults in a shared library)
  triggers nothing: fetching ahead on every adjacent pair of faults raised the bytes fetched for
  ``import torch`` from 17% to 24% of the image.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence

import pyfuse3
import trio

from coldstart.imagefs.errors import ImageError, IndexFormatError
from coldstart.imagefs.fetcher import Fetcher
from coldstart.imagefs.index import ImageIndex
from coldstart.imagefs.profile import Recorder

log = logging.getLogger("coldstart.imagefs")

RAMP_AFTER = 2
# pyfuse3's own NewTypes (ints at runtime), so our handlers' signatures are exactly its contract's.
FuseInode = pyfuse3.InodeT
FileHandle = pyfuse3.FileHandleT
CACHE_TIMEOUT_S = 3600.0
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def errno_of(exc: BaseException) -> int:
    """The single OSError/ImageError -> errno mapping used by every handler."""
    if isinstance(exc, ImageError):
        return exc.errno_code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def fuse_errors(fn: Callable) -> Callable:
    """Wrap a handler so only FUSEError leaves it."""

    async def wrapper(self: ImageFS, *args: object, **kwargs: object) -> object:
        self.requests[fn.__name__] += 1
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (ImageError, OSError) as exc:
            if not isinstance(exc, ImageError) or isinstance(exc, IndexFormatError):
                log.error("%s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno_of(exc)) from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class LookupCounts:
    """Kernel lookup counts per inode: +1 per entry handed out (lookup, readdirplus), -n on forget."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def add(self, inode: int) -> None:
        self._counts[inode] = self._counts.get(inode, 0) + 1

    def forget(self, inode: int, n: int) -> None:
        left = self._counts.get(inode, 0) - n
        if left > 0:
            self._counts[inode] = left
        else:
            self._counts.pop(inode, None)

    def __len__(self) -> int:
        return len(self._counts)


class ImageFS(pyfuse3.Operations):
    def __init__(
        self,
        index: ImageIndex,
        fetcher: Fetcher,
        recorder: Recorder | None = None,
        fetch_threads: int = 16,
        readahead_chunks: int = 16,
    ) -> None:
        super().__init__()
        self.index = index
        self.fetcher = fetcher
        self.recorder = recorder
        self.counts = LookupCounts()
        self._limiter = trio.CapacityLimiter(fetch_threads)
        self.chunk_reads = 0
        self.requests: Counter[str] = Counter()  # handled requests by kind (the stats file shows them)
        self.readahead_chunks = readahead_chunks
        self.readahead_started = 0
        self._streaks: dict[int, tuple[int, int]] = {}  # inode -> (last chunk read, contiguous reads)
        self._ahead: set[str] = set()  # digests being fetched ahead
        self._ahead_limiter = trio.CapacityLimiter(2)  # one fetching while one waits to reply: 2 cores
        self.nursery: trio.Nursery | None = None  # set by the daemon: owns the read-ahead tasks
        # All tiers local: fetch on the trio thread. A local fetch is ~0.2 ms of CPU (read + SHA-256 of
        # 256 KiB); a hop to a worker thread and back cost more than that on this busy 2-core machine,
        # and read-ahead threads only fought the reader for the same cores.
        self.inline = fetcher.all_local
        self.max_request = 0

    # -- metadata ----------------------------------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        idx = self.index
        idx.check_inode(inode)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = CACHE_TIMEOUT_S
        attr.attr_timeout = CACHE_TIMEOUT_S
        attr.st_mode = idx.mode[inode]
        attr.st_nlink = idx.nlink[inode]
        attr.st_uid = idx.uid[inode]
        attr.st_gid = idx.gid[inode]
        attr.st_rdev = idx.rdev[inode]
        attr.st_size = idx.size[inode]
        attr.st_blksize = 4096
        attr.st_blocks = -(-idx.size[inode] // 512)
        mtime = idx.mtime_ns[inode]
        attr.st_atime_ns = mtime
        attr.st_mtime_ns = mtime
        attr.st_ctime_ns = mtime
        return attr

    @fuse_errors
    async def lookup(
        self, parent_inode: FuseInode, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if not self.index.is_dir(self.index.check_inode(parent_inode)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = self.index.lookup(parent_inode, name)
        if child is None:
            # Inode 0 is a negative entry the kernel keeps for entry_timeout (ENOENT would not be kept):
            # an interpreter or the dynamic loader probes the same missing names many times.
            self.requests["lookup_missing"] += 1
            missing = pyfuse3.EntryAttributes()
            missing.st_ino = FuseInode(0)
            missing.entry_timeout = CACHE_TIMEOUT_S
            return missing
        attr = self._attr(child)
        self.counts.add(child)
        return attr

    async def forget(self, inode_list: Sequence[tuple[FuseInode, int]]) -> None:
        for inode, n in inode_list:
            self.counts.forget(inode, n)

    @fuse_errors
    async def getattr(self, inode: FuseInode, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @fuse_errors
    async def readlink(self, inode: FuseInode, ctx: pyfuse3.RequestContext) -> bytes:
        self.index.check_inode(inode)
        try:
            return self.index.readlink(inode)
        except IndexFormatError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    @fuse_errors
    async def opendir(self, inode: FuseInode, ctx: pyfuse3.RequestContext) -> FileHandle:
        if not self.index.is_dir(self.index.check_inode(inode)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return FileHandle(inode)

    @fuse_errors
    async def readdir(self, fh: FileHandle, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # start_id is the position after the last entry the kernel got (0 = from the beginning).
        for pos, name, child in self.index.entries(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(child), pos + 1):
                return
            self.counts.add(child)

    async def releasedir(self, fh: FileHandle) -> None:
        pass

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = 4096
        st.f_frsize = 4096
        st.f_blocks = -(-self.index.total_bytes // 4096)
        st.f_bfree = st.f_bavail = 0
        st.f_files = self.index.n_inodes
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    @fuse_errors
    async def getxattr(self, inode: FuseInode, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.index.xattrs(self.index.check_inode(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_errors
    async def listxattr(self, inode: FuseInode, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self.index.xattrs(self.index.check_inode(inode)))

    # -- data --------------------------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: FuseInode, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.index.check_inode(inode)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not self.index.is_reg(inode):
            raise pyfuse3.FUSEError(errno.EISDIR if self.index.is_dir(inode) else errno.EINVAL)
        return pyfuse3.FileInfo(fh=FileHandle(inode), keep_cache=True)

    @fuse_errors
    async def read(self, fh: FileHandle, off: int, size: int) -> bytes | memoryview:
        idx = self.index
        self.max_request = max(self.max_request, size)
        end = min(off + size, idx.size[fh])
        if off >= end:
            return b""
        cs = idx.chunk_size
        first, last = off // cs, (end - 1) // cs
        previous, streak = self._streaks.get(fh, (-2, 0))
        streak = streak + 1 if first in (previous, previous + 1) else 0
        self._streaks[fh] = (last, streak)
        if streak >= RAMP_AFTER and self.nursery is not None and not self.inline:
            window = min(self.readahead_chunks, 2 ** (streak - RAMP_AFTER))
            self._read_ahead(fh, last + 1, min(last + 1 + window, idx.chunk_count(fh)))
        chunks = await self._chunks(fh, first, last + 1)
        parts: list[bytes | memoryview] = []
        for k, data in zip(range(first, last + 1), chunks, strict=True):
            if len(data) != idx.chunk_length(fh, k):
                raise IndexFormatError(
                    f"chunk {k} of inode {fh} has {len(data)} bytes, the index says otherwise"
                )
            base = k * cs
            lo, hi = max(off - base, 0), min(end - base, len(data))
            parts.append(data if (lo, hi) == (0, len(data)) else memoryview(data)[lo:hi])
        # pyfuse3 replies from any contiguous buffer: a slice of one chunk goes out without a copy.
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _chunks(self, inode: int, start: int, stop: int) -> list[bytes]:
        """Chunks start..stop-1 of a file: from memory on this thread, the rest in ONE worker-thread hop
        (a hop costs more than fetching a 256 KiB chunk from a local tier on a busy machine)."""
        digests = [self.index.chunk_digest(inode, k).hex() for k in range(start, stop)]
        self.chunk_reads += len(digests)
        found: list[bytes | None] = []
        for digest_hex in digests:
            if self.recorder is not None:
                self.recorder.touch(digest_hex)
            found.append(self.fetcher.peek(digest_hex))
        missing = [d for d, data in zip(digests, found, strict=True) if data is None]
        if missing and self.inline:
            got = self.fetcher.get_many(missing)
            fetched = iter(got)
            found = [data if data is not None else next(fetched) for data in found]
        elif missing:
            fetched = iter(
                await trio.to_thread.run_sync(self.fetcher.get_many, missing, limiter=self._limiter)
            )
            found = [data if data is not None else next(fetched) for data in found]
        return found  # type: ignore[return-value]

    def _read_ahead(self, inode: int, start: int, stop: int) -> None:
        assert self.nursery is not None
        batch = []
        for k in range(start, stop):
            digest_hex = self.index.chunk_digest(inode, k).hex()
            if digest_hex in self._ahead or self.fetcher.memory.get(digest_hex) is not None:
                continue
            self._ahead.add(digest_hex)
            batch.append(digest_hex)
        if batch:
            self.readahead_started += len(batch)
            self.nursery.start_soon(self._fetch_ahead, batch)

    async def _fetch_ahead(self, batch: list[str]) -> None:
        try:
            await trio.to_thread.run_sync(
                self.fetcher.get_many, batch, limiter=self._ahead_limiter, abandon_on_cancel=True
            )
        except ImageError:
            pass  # logged by the fetcher; the demand read will fail with EIO if it comes
        finally:
            self._ahead.difference_update(batch)

    async def release(self, fh: FileHandle) -> None:
        self._streaks.pop(fh, None)
