"""Real FUSE mounts of a built image: contents, metadata, failures and clean unmounts."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coldstart.imagefs.errors import IndexTruncated, MountError, UsageError
from coldstart.imagefs.index import ImageIndex
from coldstart.imagefs.mount import is_mountpoint
from coldstart.imagefs.profile import read_profile
from coldstart.imagefs.store import ChunkStore

pytestmark = pytest.mark.usefixtures("fuse")


def stat_diff(a: os.stat_result, b: os.stat_result) -> list[str]:
    """Fields that differ between a source entry and its mounted copy (directories' nlink and size are
    the filesystem's own business)."""
    fields = ["st_mode", "st_uid", "st_gid", "st_mtime_ns"]
    if not stat.S_ISDIR(a.st_mode):
        fields += ["st_size", "st_nlink"]
    return [f"{f}: {getattr(a, f)} != {getattr(b, f)}" for f in fields if getattr(a, f) != getattr(b, f)]


def _walk(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def test_mount_matches_source(sample_image, mount_image) -> None:
    src, store, result = sample_image
    with mount_image(result.index_path, [str(store)]) as m:
        mnt = m.mountpoint
        diff = subprocess.run(
            ["diff", "-r", "--no-dereference", "-x", "fifo", str(src), str(mnt)],
            capture_output=True,
            text=True,
        )
        assert diff.returncode == 0, diff.stdout + diff.stderr
        assert _walk(src) == _walk(mnt)
        for rel in _walk(src):
            a, b = os.lstat(src / rel), os.lstat(mnt / rel)
            assert not stat_diff(a, b), (rel, stat_diff(a, b))
            if os.path.islink(src / rel):
                assert os.readlink(src / rel) == os.readlink(mnt / rel)
        root_src, root_mnt = os.stat(src), os.stat(mnt)
        assert (root_src.st_mode, root_src.st_mtime_ns) == (root_mnt.st_mode, root_mnt.st_mtime_ns)
        # Hard links are one inode; xattrs survive; a FIFO stays a FIFO.
        assert os.stat(mnt / "small.txt").st_ino == os.stat(mnt / "dir" / "hardlink.txt").st_ino
        assert os.stat(mnt / "small.txt").st_nlink == 2
        assert os.getxattr(mnt / "small.txt", "user.origin") == b"coldstart-test"
        assert "user.origin" in os.listxattr(mnt / "small.txt")
        assert os.lstat(mnt / "fifo").st_mode == os.lstat(src / "fifo").st_mode
        assert (mnt / "dir" / "dirlink" / "deeper" / "leaf").read_text() == "leaf\n"
        assert m.settings["read_ahead_kb"] == 256


def test_mount_is_read_only(sample_image, mount_image) -> None:
    _, store, result = sample_image
    with mount_image(result.index_path, [str(store)]) as m:
        for action in (
            lambda: open(m.mountpoint / "small.txt", "w"),  # noqa: SIM115
            lambda: (m.mountpoint / "new").write_text("x"),
            lambda: (m.mountpoint / "small.txt").unlink(),
            lambda: (m.mountpoint / "newdir").mkdir(),
        ):
            with pytest.raises(OSError) as info:
                action()
            assert info.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def test_random_reads_across_chunk_boundaries(sample_image, mount_image) -> None:
    src, store, result = sample_image
    data = (src / "multi.bin").read_bytes()
    with mount_image(result.index_path, [str(store)]) as m:
        fd = os.open(m.mountpoint / "multi.bin", os.O_RDONLY | os.O_DIRECT)
        try:
            for off in (0, 65536 - 7, 3 * 65536, len(data) - 10):
                pad = off - off % 4096  # O_DIRECT needs aligned offsets; read around off
                got = os.pread(fd, 8192, pad)
                assert got == data[pad : pad + 8192]
        finally:
            os.close(fd)
        assert (m.mountpoint / "multi.bin").read_bytes() == data


def test_missing_chunk_is_eio_with_a_log_line(tmp_path, sample_image, mount_image) -> None:
    src, store, result = sample_image
    # An origin that lacks one chunk of multi.bin: the read fails fast with EIO, the log names the chunk.
    partial = tmp_path / "partial-store"
    index = ImageIndex.open(result.index_path)
    inode = index.lookup(1, b"multi.bin")
    assert inode is not None
    lost = index.chunk_digest(inode, 2).hex()
    for digest in index.all_digests():
        if digest.hex() != lost:
            ChunkStore(partial).write(digest.hex(), ChunkStore(store).read(digest.hex()) or b"")
    with mount_image(result.index_path, [str(partial)]) as m:
        head = (m.mountpoint / "small.txt").read_text()
        assert head == "hello image\n"
        started = time.monotonic()
        with pytest.raises(OSError) as info:
            (m.mountpoint / "multi.bin").read_bytes()
        assert info.value.errno == errno.EIO
        assert time.monotonic() - started < 30  # a failure, not a hang
    assert lost in m.log_path.read_text()


def test_corrupt_local_cache_chunk_is_refetched(tmp_path, sample_image, mount_image) -> None:
    src, store, result = sample_image
    cache = tmp_path / "shared-cache"
    with mount_image(result.index_path, [str(store)], cache=cache) as m:
        assert (m.mountpoint / "multi.bin").read_bytes() == (src / "multi.bin").read_bytes()
    cached = sorted((cache / "chunks").rglob("*"))
    victim = next(p for p in cached if p.is_file() and p.stat().st_size == 65536)
    victim.write_bytes(b"\0" * 65536)
    with mount_image(result.index_path, [str(store)], cache=cache) as m:
        for name in ("multi.bin", "exact.bin", "dup1.bin"):
            assert (m.mountpoint / name).read_bytes() == (src / name).read_bytes()
    assert m.stats["tiers"]["disk"]["corrupt"] == 1
    assert ChunkStore(cache).read(victim.name) == ChunkStore(store).read(victim.name)


def test_profile_is_recorded_then_prefetched(tmp_path, sample_image, mount_image) -> None:
    src, store, result = sample_image
    profile = tmp_path / "boot.profile"
    with mount_image(result.index_path, [str(store)], profile_path=profile) as m:
        (m.mountpoint / "exact.bin").read_bytes()
        (m.mountpoint / "small.txt").read_bytes()
        m.save_profile()
        deadline = time.monotonic() + 10
        while not profile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (m.mountpoint / "multi.bin").read_bytes()  # after the boot: not in the profile
    index = ImageIndex.open(result.index_path)
    exact = index.lookup(1, b"exact.bin")
    small = index.lookup(1, b"small.txt")
    assert exact is not None and small is not None
    want = [d.hex() for d in index.file_chunks(exact) + index.file_chunks(small)]
    assert read_profile(profile, index.digest) == want
    with mount_image(result.index_path, [str(store)], profile_path=profile) as m:
        deadline = time.monotonic() + 10
        while len(list((Path(m.config.cache_dir) / "chunks").rglob("*/*"))) < 3:
            assert time.monotonic() < deadline, "prefetch did not fill the cache"
            time.sleep(0.05)
        assert (m.mountpoint / "small.txt").read_text() == "hello image\n"
    assert m.stats["profile_chunks"] == 3
    assert m.stats["prefetched"] == 3


def test_boot_stats_say_what_the_boot_fetched(tmp_path, sample_image, mount_image) -> None:
    src, store, result = sample_image
    profile = tmp_path / "boot.profile"
    with mount_image(result.index_path, [str(store)], profile_path=profile) as m:
        (m.mountpoint / "exact.bin").read_bytes()
        stats = m.boot_stats()
        assert stats["remote_bytes"] == (src / "exact.bin").stat().st_size  # its two chunks, once
        assert stats["image_bytes"] == ImageIndex.open(result.index_path).total_bytes
        assert read_profile(profile, ImageIndex.open(result.index_path).digest)  # saved with them
        (m.mountpoint / "multi.bin").read_bytes()  # after the boot
        assert m.boot_stats()["remote_bytes"] > stats["remote_bytes"]  # the stats so far, asked again


def test_the_kernel_keeps_what_it_was_told_once(sample_image, mount_image) -> None:
    """The image never changes: a name looked up, a missing name probed again (as an interpreter's import
    path search does), a page read twice reach the daemon once each."""
    _, store, result = sample_image
    with mount_image(result.index_path, [str(store)]) as m:
        seen = []
        for _ in range(3):
            assert not (m.mountpoint / "no-such-module.py").exists()
            assert (m.mountpoint / "exact.bin").stat().st_size > 0
            (m.mountpoint / "exact.bin").read_bytes()
            seen.append(m.boot_stats()["requests"])
        assert seen[-1]["lookup_missing"] == 1
        assert seen[-1]["lookup"] == 2  # exact.bin, and no-such-module.py once
        assert seen[-1]["read"] == seen[0]["read"] >= 1  # later reads come from the page cache
        assert seen[-1]["open"] == 3  # opens are not cached: pyfuse3's read needs the handle open gives


def test_a_save_signal_during_the_stop_does_not_kill_the_daemon(tmp_path, sample_image, mount_image) -> None:
    """The launcher saves the profile (SIGUSR1) as it stops the mount (SIGTERM): a SIGUSR1 that arrives once
    trio has taken the SIGTERM (re-raised by trio, or after its receiver closed) must not kill the daemon by
    its default action before the exit writes the profile and unmounts."""
    src, store, result = sample_image
    profile = tmp_path / "boot.profile"
    with mount_image(result.index_path, [str(store)], profile_path=profile) as m:
        (m.mountpoint / "small.txt").read_bytes()
        daemon = m._proc
        assert daemon is not None
        log = Path(m.config.cache_dir) / "daemon.log"
        daemon.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "signal 15: unmounting" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        daemon.send_signal(signal.SIGUSR1)
        assert daemon.wait(timeout=10) == 0
    assert read_profile(profile, ImageIndex.open(result.index_path).digest)
    assert not is_mountpoint(m.mountpoint)


def test_mounted_refuses_bad_arguments(tmp_path, sample_image) -> None:
    from coldstart.imagefs.mount import mounted

    _, store, result = sample_image
    with (
        pytest.raises(UsageError),
        mounted(result.index_path, tmp_path / "nope", tmp_path / "c", [str(store)]),
    ):
        pass
    (tmp_path / "mnt").mkdir()
    with pytest.raises(UsageError), mounted(result.index_path, tmp_path / "mnt", tmp_path / "c", []):
        pass
    bad = tmp_path / "bad.cidx"
    bad.write_bytes(result.index_path.read_bytes()[:100])
    with pytest.raises(IndexTruncated), mounted(bad, tmp_path / "mnt", tmp_path / "c", [str(store)]):
        pass
    assert not is_mountpoint(tmp_path / "mnt")
    with (
        pytest.raises(MountError, match="already a mount point"),
        mounted(result.index_path, "/proc", tmp_path / "c", [str(store)]),
    ):
        pass


def test_exception_inside_block_unmounts(sample_image, mount_image) -> None:
    _, store, result = sample_image
    with pytest.raises(RuntimeError), mount_image(result.index_path, [str(store)]) as m:
        assert is_mountpoint(m.mountpoint)
        raise RuntimeError("boom")
    assert not is_mountpoint(m.mountpoint)
    assert m.state.name == "UNMOUNTED"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_mount_unmounts_cleanly_on_signal(tmp_path, sample_image, signum) -> None:
    _, store, result = sample_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = [sys.executable, "-m", "coldstart.imagefs.cli", "mount", str(result.index_path), str(mnt)]
    args += ["--cache", str(tmp_path / "cache")]  # origin: the store the index lives in
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not is_mountpoint(mnt):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.05)
        assert (mnt / "small.txt").read_text() == "hello image\n"
        proc.send_signal(signum)
        assert proc.wait(20) == 0
        assert not is_mountpoint(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if is_mountpoint(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_killed_daemon_leaves_no_stale_mount(sample_image, mount_image) -> None:
    _, store, result = sample_image
    with mount_image(result.index_path, [str(store)]) as m:
        assert m.pid is not None
        os.kill(m.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # a mount whose daemon died answers ECONNABORTED (or ENOTCONN)
            try:
                os.stat(m.mountpoint / "small.txt")
            except OSError as exc:
                assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert not is_mountpoint(m.mountpoint)
    with pytest.raises(MountError, match="UNMOUNTED"):
        m.save_profile()
