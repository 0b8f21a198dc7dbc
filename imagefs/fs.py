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
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Sequence
from typing import NewType

import pyfuse3
import trio

from coldstart.imagefs.errors import ImageError, IndexFormatError
from coldstart.imagefs.fetcher import Fetcher
from coldstart.imagefs.index import ImageIndex
from coldstart.imagefs.profile import Recorder

log = logging.getLogger("coldstart.imagefs")

FuseInode = NewType("FuseInode", int)
FileHandle = NewType("FileHandle", int)
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

    async def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return await fn(*args, **kwargs)
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
        self, index: ImageIndex, fetcher: Fetcher, recorder: Recorder | None = None, fetch_threads: int = 16
    ) -> None:
        super().__init__()
        self.index = index
        self.fetcher = fetcher
        self.recorder = recorder
        self.counts = LookupCounts()
        self._limiter = trio.CapacityLimiter(fetch_threads)
        self.chunk_reads = 0
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
            raise pyfuse3.FUSEError(errno.ENOENT)
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
    async def read(self, fh: FileHandle, off: int, size: int) -> bytes:
        idx = self.index
        self.max_request = max(self.max_request, size)
        end = min(off + size, idx.size[fh])
        if off >= end:
            return b""
        cs = idx.chunk_size
        parts: list[bytes | memoryview] = []
        for k in range(off // cs, (end - 1) // cs + 1):
            data = await self._chunk(idx.chunk_digest(fh, k).hex())
            if len(data) != idx.chunk_length(fh, k):
                raise IndexFormatError(
                    f"chunk {k} of inode {fh} has {len(data)} bytes, the index says otherwise"
                )
            base = k * cs
            lo, hi = max(off - base, 0), min(end - base, len(data))
            parts.append(data if (lo, hi) == (0, len(data)) else memoryview(data)[lo:hi])
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    async def _chunk(self, digest_hex: str) -> bytes:
        self.chunk_reads += 1
        if self.recorder is not None:
            self.recorder.touch(digest_hex)
        data = self.fetcher.peek(digest_hex)
        if data is None:
            data = await trio.to_thread.run_sync(self.fetcher.get, digest_hex, limiter=self._limiter)
        return data

    async def release(self, fh: FileHandle) -> None:
        pass
