"""The snapshot store: one folder per identity key, written atomically, verified before use.

    <root>/<key>/manifest.json     identity (with gate fields), sizes + SHA-256 of every image file, model
                                   file digests, phase timings, canary; written last
    <root>/<key>/image/...         the checkpointer's files (CRIU or runsc), nothing else
    <root>/.tmp-<key>-<pid>-<rand> a snapshot being written (renamed to <key> when complete)
    <root>/.bad-<key>-<time>       a snapshot that failed verification (kept for inspection; gc removes)
    <root>/.state/                 digest caches (see file_digests.py), last-use stamps, pull locks
    <root>/weights/<sha256>        weight files (CRIU with file-backed weights, see manager.py): shared by
                                   every snapshot whose engine maps them, each hard-linked into those
                                   snapshots' ``image/weights/``

A snapshot pulled from another host (``remote.py``) lands here too, through ``commit_verified``: same
folder, same manifest, so restoring it is a local restore.

Weight files are collected with the snapshots that use them (``gc_weights``, run by ``rm``, ``gc`` and a
replacing ``commit``): a file is kept while a snapshot links it (its link count is above one: complete,
quarantined and half-written snapshots alike), a snapshot's manifest names it, or a live process maps it (a
replica restored from a snapshot removed since: a later dump of that process would record the file by its
path). A snapshot being taken holds ``weights_in_use`` from the moment its engine writes the files until they
are linked into it; a collection that finds it held removes nothing and leaves them to the next one.

A folder named by a key is always complete: it is renamed into place only after every file and the
manifest are written and fsynced. Replacing a snapshot (the host changed, or the old one was refused) moves
the old folder aside first, so readers see either the old or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coldstart.launcher.atomic import write_text_atomic
from coldstart.launcher.errors import SnapshotCorrupt, SnapshotError
from coldstart.launcher.snapshots.file_digests import DigestCache, sha256_file
from coldstart.launcher.snapshots.identity import SnapshotIdentity

MANIFEST = "manifest.json"
# A pulled snapshot is fsynced this long after its rename: the restore that pulled it reads it from the page
# cache meanwhile, and writeback started at once competed with that restore (restore + canary 0.70 s on the
# host that pulled vs 0.54 s on the one that took it, tiny model, bench/snapshot_hosts.py).
PULLED_SYNC_DELAY_S = 10.0
IMAGE = "image"
WEIGHTS_DIR = "weights"  # under the store root: content-addressed weight files, shared by snapshots
FORMAT = 1


@dataclass
class Snapshot:
    path: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def image_dir(self) -> Path:
        return self.path / IMAGE

    @property
    def identity(self) -> SnapshotIdentity:
        return SnapshotIdentity.from_json(self.manifest["identity"])

    @property
    def total_bytes(self) -> int:
        return int(self.manifest.get("bytes", 0))


@dataclass
class PendingSnapshot:
    key: str
    path: Path

    @property
    def image_dir(self) -> Path:
        return self.path / IMAGE


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _sync_then_unstamp(snapshot: Snapshot, stamp: Path) -> None:
    time.sleep(PULLED_SYNC_DELAY_S)
    try:
        for rel in snapshot.manifest["files"]:
            with open(snapshot.path / rel, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(snapshot.image_dir)
    except OSError:
        return  # removed meanwhile, or the disk failed: the stamp stays, the next boot re-hashes
    stamp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) as a folder only its owner can enter (0700), also when it existed:
    a snapshot's page images hold the engine's memory, its environment (``HF_TOKEN=...``) included."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)
    return path


def _private_files(root: Path, rels: Iterable[str]) -> None:
    for rel in rels:
        os.chmod(root / rel, 0o600)


class SnapshotStore:
    """Snapshots on local disk. The store's folder, every snapshot folder and ``.state`` are 0700 and the
    files of a snapshot 0600: CRIU and runsc write page images readable by all (0644 in 0755 folders), and
    they hold the engine's memory and environment."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.state_dir = self.root / ".state"
        self.weights_dir = self.root / WEIGHTS_DIR
        self._background: list[threading.Thread] = []  # fsyncs of pulled snapshots: join_background()

    # -- reading ----------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return (self.root / key / MANIFEST).is_file()

    def lookup(self, key: str) -> Snapshot | None:
        """The complete snapshot under ``key``, or None. A broken manifest raises ``SnapshotCorrupt``."""
        path = self.root / key
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SnapshotCorrupt(f"snapshot {key}: unreadable {MANIFEST}: {exc}") from exc
        if manifest.get("format") != FORMAT or manifest.get("key") != key:
            raise SnapshotCorrupt(
                f"snapshot {key}: manifest has format {manifest.get('format')} / key {manifest.get('key')}"
            )
        return Snapshot(path, manifest)

    def ls(self) -> list[Snapshot]:
        out: list[Snapshot] = []
        if not self.root.is_dir():
            return out
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            with contextlib.suppress(SnapshotError):
                snap = self.lookup(entry.name)
                if snap is not None:
                    out.append(snap)
        return out

    def find(self, prefix: str) -> Snapshot:
        """The one snapshot whose key starts with ``prefix`` (as git abbreviates commits)."""
        matches = [s for s in self.ls() if s.key.startswith(prefix)]
        if not matches:
            raise SnapshotError(f"no snapshot {prefix!r} in {self.root} (see 'coldstart snapshot ls')")
        if len(matches) > 1:
            raise SnapshotError(f"{prefix!r} matches {len(matches)} snapshots: give more of the key")
        return matches[0]

    # -- writing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def begin(self, key: str) -> Iterator[PendingSnapshot]:
        """A temporary folder to write a snapshot into; removed unless ``commit`` moved it into place."""
        private_dir(self.root)
        pending = PendingSnapshot(key, self.root / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(3)}")
        private_dir(pending.path)
        pending.image_dir.mkdir(parents=True)
        try:
            yield pending
        finally:
            if pending.path.exists():
                shutil.rmtree(pending.path, ignore_errors=True)

    def commit(self, pending: PendingSnapshot, manifest: dict[str, Any]) -> Snapshot:
        """Digest the image files, write the manifest, and rename the folder into place (atomically)."""
        cache = self._verified_cache(pending.key)
        files: dict[str, dict[str, Any]] = {}
        for file in sorted(p for p in pending.image_dir.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = file.relative_to(pending.path).as_posix()
            os.chmod(file, 0o600)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            files[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
        manifest = {
            **manifest,
            "format": FORMAT,
            "key": pending.key,
            "files": files,
            "bytes": sum(f["size"] for f in files.values()),
        }
        write_text_atomic(pending.path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        return self._install(pending, manifest, cache)

    def commit_verified(self, pending: PendingSnapshot, manifest: dict[str, Any]) -> Snapshot:
        """Install a snapshot pulled from another host (``remote.py``) whose files were already checked
        against ``manifest`` (sizes and SHA-256, hashed as they were written), keeping the manifest as
        published.

        Its image files are fsynced after the rename, by a background thread, not before: fsync of a
        337 MB image took 0.26 s of a 1.2 s pull, on the restore's path (``PULLED_SYNC_DELAY_S``). Until
        they are synced, a stamp holds this boot's id; a snapshot whose stamp names another boot (the
        machine crashed in between) is re-hashed in full by ``verify`` before it is trusted. The rename
        itself is as atomic as ever."""
        if manifest.get("format") != FORMAT or manifest.get("key") != pending.key:
            raise SnapshotCorrupt(f"snapshot {pending.key}: pulled manifest has another format or key")
        _private_files(pending.path, manifest["files"])
        write_text_atomic(pending.path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        private_dir(self.state_dir)
        stamp = self.state_dir / f"{pending.key}.unsynced"
        write_text_atomic(stamp, _boot_id())
        snapshot = self._install(pending, manifest, self._verified_cache(pending.key))
        thread = threading.Thread(
            target=_sync_then_unstamp, args=(snapshot, stamp), name=f"fsync-{pending.key}", daemon=True
        )
        thread.start()
        self._background.append(thread)
        return snapshot

    def join_background(self, timeout_s: float) -> None:
        """Wait for the fsync threads of pulled snapshots (called when the launcher stops)."""
        for thread in self._background:
            thread.join(timeout_s)
        self._background = [t for t in self._background if t.is_alive()]

    def _install(self, pending: PendingSnapshot, manifest: dict[str, Any], cache: DigestCache) -> Snapshot:
        files: dict[str, dict[str, Any]] = manifest["files"]
        _fsync_dir(pending.path)
        dest = self.root / pending.key
        trash = None
        if dest.exists():
            trash = self.root / f".trash-{pending.key}-{secrets.token_hex(3)}"
            os.rename(dest, trash)
        os.rename(pending.path, dest)
        _fsync_dir(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        snapshot = Snapshot(dest, manifest)
        for rel, meta in files.items():  # just hashed: the first restore need not hash again
            cache.remember(dest / rel, meta["sha256"])
        cache.save()
        if trash is not None:  # the replaced snapshot's weight files, unless the new one links them
            self.gc_weights()
        return snapshot

    # -- verifying --------------------------------------------------------------------------------
    def _verified_cache(self, key: str) -> DigestCache:
        return DigestCache(self.state_dir / f"{key}.digests.json")

    def verify(self, snapshot: Snapshot, *, full: bool = False) -> None:
        """Raise ``SnapshotCorrupt`` naming the first file that is missing, truncated or altered.

        Sizes always; digests through the stat-keyed cache unless ``full`` (see file_digests.py).
        """
        cache = self._verified_cache(snapshot.key)
        files = snapshot.manifest.get("files") or {}
        if not files:
            raise SnapshotCorrupt(f"snapshot {snapshot.key}: manifest lists no files")
        stamp = self.state_dir / f"{snapshot.key}.unsynced"
        crashed = False
        with contextlib.suppress(FileNotFoundError):
            crashed = stamp.read_text() != _boot_id()  # pulled, then a reboot before its fsync
        full = full or crashed
        for rel, meta in files.items():
            path = snapshot.path / rel
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise SnapshotCorrupt(f"snapshot {snapshot.key}: {rel} is missing ({exc.strerror})") from exc
            if size != meta["size"]:
                raise SnapshotCorrupt(
                    f"snapshot {snapshot.key}: {rel} has {size} bytes, manifest says {meta['size']}"
                )
            digest = cache.digest(path, trust_cache=not full)
            if digest != meta["sha256"]:
                raise SnapshotCorrupt(
                    f"snapshot {snapshot.key}: {rel} sha256 {digest[:12]}... "
                    f"!= manifest {meta['sha256'][:12]}..."
                )
        if crashed:  # every byte read back and matching: what is on disk now is the snapshot
            stamp.unlink(missing_ok=True)
        cache.save()

    # -- housekeeping -----------------------------------------------------------------------------
    def touch_used(self, snapshot: Snapshot) -> None:
        private_dir(self.state_dir)
        (self.state_dir / f"{snapshot.key}.used").touch()

    def last_used(self, snapshot: Snapshot) -> float:
        stamp = self.state_dir / f"{snapshot.key}.used"
        return stamp.stat().st_mtime if stamp.exists() else (snapshot.path / MANIFEST).stat().st_mtime

    def quarantine(self, snapshot: Snapshot) -> Path:
        """Move a snapshot that failed verification aside (the next cold boot writes a fresh one)."""
        dest = self.root / f".bad-{snapshot.key}-{int(time.time())}-{secrets.token_hex(2)}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(snapshot.path, dest)
        (self.state_dir / f"{snapshot.key}.digests.json").unlink(missing_ok=True)
        return dest

    def rm(self, key: str) -> None:
        path = self.root / key
        if not path.is_dir():
            raise SnapshotError(f"no snapshot {key} in {self.root}")
        trash = self.root / f".trash-{key}-{secrets.token_hex(3)}"
        os.rename(path, trash)  # atomic disappearance, then the slow delete
        shutil.rmtree(trash, ignore_errors=True)
        for suffix in (".digests.json", ".used", ".unsynced"):
            (self.state_dir / f"{key}{suffix}").unlink(missing_ok=True)
        self.gc_weights()

    def gc(self, *, older_than_s: float | None = None, now: float | None = None) -> list[str]:
        """Remove leftovers (unfinished writes of dead processes, trash, quarantined snapshots) and, with
        ``older_than_s``, snapshots unused for that long, then the weight files no snapshot uses any more
        (``weights/<sha256>``). Returns the names removed."""
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        now = time.time() if now is None else now
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if name.startswith(".tmp-"):
                pid = name.split("-")[2] if name.count("-") >= 3 else ""
                if pid.isdigit() and Path(f"/proc/{pid}").exists():
                    continue  # still being written
            elif not name.startswith((".trash-", ".bad-")):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(name)
        if older_than_s is not None:
            for snap in self.ls():
                if now - self.last_used(snap) > older_than_s:
                    self.rm(snap.key)
                    removed.append(snap.key)
        removed += self.gc_weights()
        return removed

    # -- weight files -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def weights_in_use(self) -> Iterator[None]:
        """Held (shared) by a snapshot being taken, from before its engine writes weight files until they
        are linked into the snapshot: ``gc_weights`` removes nothing meanwhile. Waits only while a
        collection runs (it stats the weight files; it never waits for a dump)."""
        fd = self._weights_lock_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def gc_weights(self) -> list[str]:
        """Remove the weight files that no snapshot links or names and no live process maps; returns them
        as ``weights/<name>``. Does nothing while a snapshot is being taken (``weights_in_use``)."""
        if not self.weights_dir.is_dir():
            return []
        fd = self._weights_lock_fd()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []  # a dump is writing or linking weight files: the next collection gets them
            named = {name for snap in self.ls() for name in _weight_names(snap.manifest)}
            mapped = _mapped_names(self.weights_dir)
            removed = []
            for file in sorted(self.weights_dir.iterdir()):
                try:
                    st = file.lstat()
                except FileNotFoundError:
                    continue
                if st.st_nlink > 1 or file.name in named or file.name in mapped:
                    continue
                file.unlink(missing_ok=True)
                removed.append(f"{WEIGHTS_DIR}/{file.name}")
            return removed
        finally:
            os.close(fd)

    def _weights_lock_fd(self) -> int:
        private_dir(self.state_dir)
        return os.open(self.state_dir / "weights.lock", os.O_RDWR | os.O_CREAT, 0o600)


def _weight_names(manifest: dict[str, Any]) -> list[str]:
    return list((manifest.get("weights") or {}).get("files") or {})


def _mapped_names(folder: Path) -> set[str]:
    """Names of the files in ``folder`` that a live process maps (every readable ``/proc/PID/maps``)."""
    prefix = f"{folder.resolve()}/"
    out: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            maps = (proc / "maps").read_text()
        except OSError:  # gone, or not ours to read
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix):
                out.add(fields[5][len(prefix) :].removesuffix(" (deleted)"))
    return out
