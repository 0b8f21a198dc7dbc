"""Snapshot orchestration: take a snapshot of a warmed-up replica, and restore replicas from it.

Take (``snapshot``, after the lifecycle's cold boot + warm-up; ``boot_and_snapshot`` does both):
    model file digests -> canary (greedy completion, recorded) -> adapter.before_checkpoint
    -> [CRIU, adapters with ``file_back``: weights moved into content-addressed files under
    ``<store>/weights``, KV cache dropped; the files are pinned by digest in the manifest]
    -> [control connections closed: our client keeps none alive] -> checkpoint (leave running)
    -> manifest + atomic rename -> adapter.after_restore on the original, which keeps serving.
    A failed snapshot is logged and the original keeps serving if it is still healthy.

Restore (``restore``), every failure a ``RestoreFailed(reason)`` after the sandbox is stopped:
    lookup ("missing", "digest" for an unreadable manifest) -> gate: checkpointer version and host
    fingerprint ("gate"), mapped model files ("model_files") -> verify sizes + digests, weight files
    included ("digest"; the bad snapshot is moved aside) -> checkpointer restore into fresh namespaces
    ("checkpointer") -> health
    ("checkpointer" if it died, "timeout") -> adapter.after_restore ("hook") -> canary must match ("canary":
    token ids, logprobs and text; see ``canary.py``).

The lifecycle (``lifecycle.py``) counts restores and restore failures and cold-boots on failure; this
module records phase durations (``snapshot_checkpoint``, ``snapshot_save``, ``snapshot_file_back``,
``snapshot_restore``, ``snapshot_canary``, and a restore's steps ``pull``, ``verify``,
``checkpointer_restore``, ``wake``, ``canary``), snapshots taken and snapshot bytes (the image; weight files
are in the manifest's ``weights``).

Weights in files (CRIU; measured with vLLM and the Qwen3-0.6B shape, see README): the dump went from 3,688 MB
to 1,388 MB of image + 1,838 MB of content-addressed weight files that every replica restored on the host maps
and shares, restore -> first token 3.14 s -> 1.31 s. Rejected: moving *every* large anonymous mapping
(the interpreter's own heap included): the interpreter writes there while the mapping is being moved, and a
write between the copy and the remap is lost (vLLM's engine core died of a segfault in pymalloc that way;
hence ``PYTHONMALLOC=malloc`` and a fixed mmap threshold for vLLM, ``engine_adapters/vllm.py``).

Uniqueness after restore: every restored replica gets its own PID and network namespace (CRIU) or its own
container and network namespace (runsc), so ports, PIDs and addresses never collide. Random state is the
engine's: ``transformers serve`` samples with torch's global RNG, which is part of the image, so replicas
restored from one snapshot draw the same random numbers for the same sequence of requests (temperature > 0
answers repeat across replicas) until something reseeds them; it has no reseed route, and engines built
on ``coldstart.snapshot_hooks`` reseed by themselves after every restore (``process_state``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig, local_model_path
from coldstart.engine_adapters.errors import AdapterError
from coldstart.launcher.boot import cold_boot, wait_healthy
from coldstart.launcher.checkpointers.base import Checkpointer
from coldstart.launcher.config import Canary
from coldstart.launcher.control import control_client
from coldstart.launcher.errors import (
    BootTimeout,
    ColdstartError,
    EngineExited,
    RemoteSnapshotError,
    RestoreFailed,
    RestoreReason,
    SnapshotCorrupt,
    SnapshotError,
)
from coldstart.launcher.image import engine_mounts, holds_rootfs
from coldstart.launcher.metrics import Metrics, ModelMetrics
from coldstart.launcher.process import host_lock, resident_bytes
from coldstart.launcher.sandboxes.base import Sandbox
from coldstart.launcher.snapshots.canary import DEFAULT_CANARY, CanaryAnswer, canary_request
from coldstart.launcher.snapshots.file_digests import DigestCache
from coldstart.launcher.snapshots.identity import SnapshotIdentity, snapshot_identity
from coldstart.launcher.snapshots.store import WEIGHTS_DIR, Snapshot, SnapshotStore

if TYPE_CHECKING:
    from coldstart.launcher.settings import SnapshotSettings
    from coldstart.launcher.snapshots.remote import PullReport, SnapshotTiers

log = logging.getLogger("coldstart.snapshots")

RESTORE_POLL_S = 0.01  # a restored engine answers within ~0.3 s: poll finer than a cold boot does
# restore_timings key -> phase_seconds label of each step of a restore
_PHASES = {
    "pull": "pull",
    "verify": "verify",
    "restore": "checkpointer_restore",
    "wake": "wake",
    "canary": "canary",
}


@runtime_checkable
class FileBacking(Protocol):
    """An adapter that can move a paused engine's weights into files before a CPU checkpoint (vLLM:
    ``engine_adapters/vllm.py``; custom engines: ``snapshot_hooks.torch_helpers.file_back_module``)."""

    async def file_back(
        self, client: httpx.AsyncClient, base_url: str, directory: Path
    ) -> dict[str, Any]: ...


def model_files(adapter: EngineAdapter, config: EngineConfig) -> list[Path]:
    """The files of a local model directory (what the engine maps); [] for a hub name."""
    try:
        path = Path(local_model_path(config.model))
    except AdapterError:
        return []
    if not path.is_absolute() or not path.is_dir():
        return []
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


class SnapshotManager:
    """One serving identity's snapshots: what the gateway calls (see ``deployment.Snapshots``)."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        store: SnapshotStore,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        metrics: ModelMetrics | None = None,
        *,
        image_digest: str | None = None,
        image_mount: Path | None = None,
        canary: Canary = DEFAULT_CANARY,
        restore_timeout_s: float = 120.0,
        remote: SnapshotTiers | None = None,
    ) -> None:
        self.checkpointer = checkpointer
        self.store = store
        self.metrics = metrics or Metrics().for_model("")
        self.info = checkpointer.probe()
        self.canary = canary_request(adapter, engine_config, canary)
        self.identity: SnapshotIdentity = snapshot_identity(
            adapter, engine_config, self.info, self.canary.to_json(), image_digest=image_digest
        )
        # Model files inside the mounted image are pinned by the image digest (in the identity): hashing
        # them again would read the whole model through FUSE, and on a new host pull it before a restore.
        self.image_mount = image_mount
        self.restore_timeout_s = restore_timeout_s
        # Phase durations of each finished restore, by replica id: restores run concurrently, so one
        # shared "last" dict would mix them.
        self.restore_timings: dict[str, dict[str, float]] = {}
        # Snapshots across hosts (remote.py): pulled through these tiers when this host has none,
        # published after every snapshot taken here.
        self.remote = remote
        self.last_pull: PullReport | None = None
        self._remote_missing = threading.Event()  # set by prefetch() when no tier has this identity
        self._publishing: set[asyncio.Task[None]] = set()  # awaited by close(): a publish is not lost
        self._prefetching: threading.Thread | None = None

    # -- what the lifecycle calls ------------------------------------------------------------------
    def has_snapshot(self) -> bool:
        # With tiers, try: the lookup is a network call, made in restore() (a miss cold-boots, "missing"),
        # unless the pull at launch already found that no tier has it (then a cold boot is no failed restore).
        if self.store.has(self.identity.key):
            return True
        return bool(self.remote and self.remote.tiers) and not self._remote_missing.is_set()

    def resident_hint(self) -> int:
        """Resident bytes of the engine when this host's snapshot of it was taken (0: no snapshot here, or
        one from before it was recorded): the memory a replica restored from it will need."""
        try:
            snapshot = self.store.lookup(self.identity.key)
        except SnapshotCorrupt:
            return 0
        return int((snapshot.manifest.get("resident_bytes") or 0) if snapshot else 0)

    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox:
        return self.checkpointer.new_sandbox(workdir, replica_id)

    async def boot_and_snapshot(
        self,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        http: httpx.AsyncClient,
        workdir: Path,
        replica_id: str,
        *,
        boot_timeout_s: float = 900.0,
    ) -> Sandbox:
        """Cold boot in this checkpointer's sandbox, snapshot, and return the original, serving."""
        sandbox = self.new_sandbox(workdir, replica_id)
        async with contextlib.AsyncExitStack() as undo:
            undo.push_async_callback(sandbox.stop, 2.0)
            started = time.monotonic()
            # Boot traffic on a client that keeps no connection alive: nothing left open to drain.
            async with control_client() as boot_client:
                await cold_boot(sandbox, adapter, engine_config, boot_client, timeout_s=boot_timeout_s)
            self.metrics.cold_boots.inc()
            self.metrics.phase_seconds.labels("boot").observe(time.monotonic() - started)
            await self.snapshot(sandbox, adapter, engine_config, http)
            undo.pop_all()  # booted and serving: the caller owns it
        return sandbox

    async def snapshot(
        self, sandbox: Sandbox, adapter: EngineAdapter, engine_config: EngineConfig, http: httpx.AsyncClient
    ) -> None:
        """Snapshot a healthy, warmed-up replica and leave it serving. Never takes the replica down for a
        failed snapshot: logs why, and raises only when the engine no longer answers."""
        timings: dict[str, float] = {}
        try:
            # One dump of an identity at a time on this store, across launchers: a second one waits for
            # the first and uses its snapshot instead of failing half-way through its own dump.
            async with host_lock(self.store.state_dir / f"dump-{self.identity.key}.lock"):
                if self._usable_snapshot_exists():  # another replica (or launcher) got there first
                    log.info("snapshot %s already taken; not taking another", self.identity.key)
                    return
                await self._take(sandbox, adapter, engine_config, http, timings)
        except (ColdstartError, AdapterError, OSError, httpx.HTTPError) as exc:
            log.warning(
                "snapshot of %s failed: %s", self.identity.key, exc, extra={"event": "snapshot_failed"}
            )
            if sandbox.exit_code() is not None or not await adapter.is_healthy(http, sandbox.base_url):
                raise SnapshotError(f"snapshot failed and the engine no longer answers: {exc}") from exc
            with contextlib.suppress(AdapterError):
                await adapter.after_restore(http, sandbox.base_url)

    async def _take(
        self,
        sandbox: Sandbox,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        http: httpx.AsyncClient,
        timings: dict[str, float],
    ) -> None:
        key = self.identity.key
        t = time.monotonic()
        files = await asyncio.to_thread(self._model_digests, adapter, engine_config, True)
        timings["model_digests"] = time.monotonic() - t
        # The weight files the engine writes below are linked by no snapshot until they are linked into the
        # pending one: the store collects none meanwhile (``weights_in_use``; it never waits for us).
        weights_held = contextlib.ExitStack()
        with weights_held:
            weights_held.enter_context(self.store.weights_in_use())
            # Control traffic on a client that keeps no connection alive: nothing of ours is left open in
            # the engine when it is checkpointed (gVisor refuses open and TIME_WAIT sockets).
            async with control_client() as control:
                t = time.monotonic()
                answer = await self._run_canary(control, sandbox.base_url)
                answer.require_meaningful(adapter.name)
                timings["canary"] = time.monotonic() - t
                # What the warmed-up engine holds (before its KV cache is dropped): a restarted launcher
                # sizes its first replica of this model by it (``resident_hint``).
                resident = await asyncio.to_thread(resident_bytes, sandbox.host_pids())
                await adapter.before_checkpoint(control, sandbox.base_url)
                weights: dict[str, Any] = {}
                # CRIU only: the restored engine maps the files again at their host path (runsc's sandbox
                # has another root, where they are not).
                if isinstance(adapter, FileBacking) and self.info.name == "criu":
                    t = time.monotonic()
                    weights = await adapter.file_back(control, sandbox.base_url, self.weights_dir)
                    self._remember_weights(weights)
                    timings["file_back"] = time.monotonic() - t
            with self.store.begin(key) as pending:
                await asyncio.to_thread(self._link_weights_into, pending.image_dir, weights)
                weights_held.close()  # linked into the pending snapshot: a collection keeps them now
                t = time.monotonic()
                await self.checkpointer.checkpoint(sandbox, pending.image_dir, leave_running=True)
                timings["checkpoint"] = time.monotonic() - t
                t = time.monotonic()
                manifest = {
                    "identity": self.identity.to_json(),
                    "checkpointer": {
                        "name": self.info.name,
                        "version": self.info.version,
                        "capabilities": sorted(self.info.capabilities),
                    },
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "model_files": files,
                    "canary": {**self.canary.to_json(), **answer.to_json()},
                    "timings": {k: round(v, 4) for k, v in timings.items()},
                    "weights": weights,
                    "resident_bytes": resident,
                }
                snapshot = await asyncio.to_thread(self.store.commit, pending, manifest)
                # commit chmods the snapshot's files, hard links to the weight files included (a new
                # ctime): remembered again, or the first restore re-hashes them all (1.1 s for 1.8 GB).
                await asyncio.to_thread(self._remember_weights, weights)
                timings["save"] = time.monotonic() - t
        await adapter.after_restore(http, sandbox.base_url)
        if self.remote is not None and self.remote.publish_to is not None:  # off the replica's path
            task = asyncio.create_task(self._publish(snapshot))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)
        self.metrics.snapshots_taken.inc()
        self.metrics.snapshot_bytes.set(snapshot.total_bytes)
        for phase in ("checkpoint", "save", "file_back"):
            if phase in timings:
                self.metrics.phase_seconds.labels(f"snapshot_{phase}").observe(timings[phase])
        log.info(
            "snapshot %s taken: %.1f MB image + %.1f MB weight files, checkpoint %.2fs, save %.2fs",
            key, (snapshot.total_bytes - weights.get("bytes", 0)) / 1e6, weights.get("bytes", 0) / 1e6,
            timings["checkpoint"],
            timings["save"],
            extra={"event": "snapshot_taken", "key": key, "bytes": snapshot.total_bytes},
        )  # fmt: skip

    async def restore(
        self,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        http: httpx.AsyncClient,
        workdir: Path,
        replica_id: str,
    ) -> Sandbox:
        """A serving replica restored from this identity's snapshot, or ``RestoreFailed(reason)``."""
        timings: dict[str, float] = {}
        started = time.monotonic()
        key = self.identity.key
        try:
            snapshot = self.store.lookup(key)
        except SnapshotCorrupt as exc:
            raise RestoreFailed(RestoreReason.DIGEST, str(exc)) from exc
        if snapshot is None and self.remote is not None and self.remote.tiers:
            t = time.monotonic()
            snapshot = await self._pull(adapter, engine_config)  # taken on another host
            timings["pull"] = time.monotonic() - t
        if snapshot is None:
            raise RestoreFailed(RestoreReason.MISSING, f"no snapshot {key} in {self.store.root}")
        problems = self.identity.gate(snapshot.identity)
        if problems:
            raise RestoreFailed(
                RestoreReason.GATE, f"snapshot {key} does not fit this host: " + "; ".join(problems)
            )
        t = time.monotonic()
        changed = await asyncio.to_thread(self._model_changes, adapter, engine_config, snapshot.manifest)
        if changed:
            raise RestoreFailed(
                RestoreReason.MODEL_FILES,
                f"snapshot {key}: model files changed since the snapshot: {changed}",
            )
        try:
            await asyncio.to_thread(self.store.verify, snapshot)
            await asyncio.to_thread(self._verify_weights, snapshot)
        except SnapshotCorrupt as exc:
            moved = self.store.quarantine(snapshot)
            raise RestoreFailed(RestoreReason.DIGEST, f"{exc} (moved to {moved.name})") from exc
        timings["verify"] = time.monotonic() - t

        async with contextlib.AsyncExitStack() as undo:
            t = time.monotonic()
            sandbox = await self._restored_and_healthy(
                snapshot.image_dir, adapter, engine_config, http, workdir, replica_id
            )
            undo.push_async_callback(sandbox.stop, 2.0)  # until it has passed every check below
            timings["restore"] = time.monotonic() - t
            timings["healthy"] = time.monotonic() - started  # lookup + gate + verify + restore
            t = time.monotonic()
            try:
                await adapter.after_restore(http, sandbox.base_url)
            except (AdapterError, httpx.HTTPError) as exc:
                raise RestoreFailed(
                    RestoreReason.HOOK, f"after-restore hook of replica {replica_id} failed: {exc}"
                ) from exc
            timings["wake"] = time.monotonic() - t
            t = time.monotonic()
            try:
                answer = await self._run_canary(http, sandbox.base_url)
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                raise RestoreFailed(
                    RestoreReason.CANARY, f"canary request to restored replica {replica_id} failed: {exc!r}"
                ) from exc
            timings["canary"] = time.monotonic() - t
            differs = answer.mismatch(CanaryAnswer.from_json(snapshot.manifest["canary"]))
            if differs:
                raise RestoreFailed(
                    RestoreReason.CANARY, f"restored replica {replica_id} answered the canary with {differs}"
                )
            undo.pop_all()
        self.store.touch_used(snapshot)
        timings["total"] = time.monotonic() - started
        self.restore_timings[replica_id] = timings
        self.metrics.snapshot_bytes.set(snapshot.total_bytes)
        for phase in ("restore", "canary"):  # labelled snapshot_*: "restore" is the whole bring-up
            self.metrics.phase_seconds.labels(f"snapshot_{phase}").observe(timings[phase])
        # The end-to-end clock of a restore, phase by phase (bench/startup.py prints the same split):
        # pull (another host's snapshot through the tiers), verify (gate, model files, image and weight
        # digests), checkpointer_restore (restore to healthy; "restore" is the gateway's whole bring-up),
        # wake (after-restore hook), canary.
        for phase, name in _PHASES.items():
            if phase in timings:
                self.metrics.phase_seconds.labels(name).observe(timings[phase])
        log.info(
            "replica %s restored from %s in %.2fs (verify %.3fs, restore %.2fs, canary %.2fs)",
            replica_id, key, timings["total"], timings["verify"], timings["restore"], timings["canary"],
            extra={"event": "restored", "replica": replica_id, "key": key},
        )  # fmt: skip
        return sandbox

    # -- snapshots across hosts (remote.py) -------------------------------------------------------
    def _gate(
        self, adapter: EngineAdapter, engine_config: EngineConfig
    ) -> Callable[[dict[str, Any]], list[str]]:
        def gate(manifest: dict[str, Any]) -> list[str]:
            try:
                problems = self.identity.gate(SnapshotIdentity.from_json(manifest["identity"]))
            except (KeyError, TypeError, ValueError) as exc:
                return [f"its manifest has no readable identity ({exc!r})"]
            changed = self._model_changes(adapter, engine_config, manifest)
            return problems + ([f"model files differ: {changed}"] if changed else [])

        return gate

    def prefetch(self, adapter: EngineAdapter, engine_config: EngineConfig) -> threading.Thread | None:
        """Pull this identity's snapshot now, in a background thread, when this host has none: a launcher
        on a buffer host is up long before its first request, which then restores from a local copy.
        A restore that comes meanwhile waits for this pull (one puller per key) and finds the copy; a
        failure here is logged, and met again, with its reason, by that restore."""
        if self.remote is None or not self.remote.tiers or self.store.has(self.identity.key):
            return None
        remote, key, gate = self.remote, self.identity.key, self._gate(adapter, engine_config)

        def run() -> None:
            try:
                remote.pull(key, self.store, gate)
            except RemoteSnapshotError as exc:
                if exc.reason is RestoreReason.MISSING:
                    self._remote_missing.set()
                log.info("snapshot %s not pulled ahead: %s", key, exc)
            except (SnapshotError, OSError) as exc:
                log.info("snapshot %s not pulled ahead: %s", key, exc)

        thread = threading.Thread(target=run, name=f"prefetch-{key}", daemon=True)
        thread.start()
        self._prefetching = thread
        return thread

    async def close(self, timeout_s: float = 60.0) -> None:
        """Finish what runs in the background before the launcher exits: publishes of snapshots taken here
        (up to ``timeout_s``, then cancelled and said), the pull ahead (its own deadline bounds it) and the
        store's fsync threads."""
        if self._publishing:
            done, pending = await asyncio.wait(self._publishing, timeout=timeout_s)
            for task in pending:
                log.warning("publish of snapshot %s cancelled at shutdown", self.identity.key)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.remote is not None:
            self.remote.close()  # pulls under way fail now instead of running to their deadline
        if self._prefetching is not None:
            await asyncio.to_thread(self._prefetching.join, timeout_s)
        await asyncio.to_thread(self.store.join_background, timeout_s)

    async def _pull(self, adapter: EngineAdapter, engine_config: EngineConfig) -> Snapshot:
        """This identity's snapshot through the tiers into the local store; the gate (checkpointer,
        host, model files) runs on the manifest before a byte of the image is fetched."""
        if self.remote is None:
            raise RestoreFailed(
                RestoreReason.MISSING, f"no snapshot {self.identity.key} in {self.store.root}"
            )
        gate = self._gate(adapter, engine_config)
        try:
            snapshot, self.last_pull = await asyncio.to_thread(
                self.remote.pull, self.identity.key, self.store, gate
            )
        except RemoteSnapshotError as exc:
            raise RestoreFailed(RestoreReason(exc.reason), str(exc)) from exc
        return snapshot

    async def _publish(self, snapshot: Snapshot) -> None:
        if self.remote is None:
            return
        try:
            await asyncio.to_thread(self.remote.publish, snapshot)
        except (SnapshotError, OSError) as exc:  # this host keeps serving from its local snapshot
            log.warning("snapshot %s not published: %s", snapshot.key, exc, extra={"event": "publish_failed"})

    # -- helpers ----------------------------------------------------------------------------------
    def _usable_snapshot_exists(self) -> bool:
        try:
            existing = self.store.lookup(self.identity.key)
        except SnapshotCorrupt:
            return False
        return existing is not None and not self.identity.gate(existing.identity)

    async def _restored_and_healthy(
        self,
        image_dir: Path,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        http: httpx.AsyncClient,
        workdir: Path,
        replica_id: str,
    ) -> Sandbox:
        """The checkpointer's restore, then health, within ``restore_timeout_s``; every failure is a
        ``RestoreFailed`` with the sandbox stopped."""
        key, started = self.identity.key, time.monotonic()
        async with contextlib.AsyncExitStack() as undo:
            try:
                sandbox = await asyncio.wait_for(
                    self._restore_sandbox(image_dir, workdir, replica_id, engine_config),
                    self.restore_timeout_s,
                )
                undo.push_async_callback(sandbox.stop, 2.0)
                remaining = max(1.0, self.restore_timeout_s - (time.monotonic() - started))
                await wait_healthy(
                    sandbox, adapter, http, timeout_s=remaining, poll_s=RESTORE_POLL_S, while_="restoring"
                )
            except TimeoutError as exc:
                raise RestoreFailed(
                    RestoreReason.TIMEOUT,
                    f"restore of {key} did not finish in {self.restore_timeout_s:.0f} s",
                ) from exc
            except BootTimeout as exc:
                raise RestoreFailed(
                    RestoreReason.TIMEOUT, f"restored replica {replica_id} never became healthy: {exc}"
                ) from exc
            except EngineExited as exc:
                raise RestoreFailed(
                    RestoreReason.CHECKPOINTER, f"restored replica {replica_id} exited: {exc}"
                ) from exc
            except RestoreFailed:
                raise
            except (ColdstartError, OSError) as exc:
                raise RestoreFailed(
                    RestoreReason.CHECKPOINTER, f"{self.info.name} restore of {key} failed: {exc}"
                ) from exc
            undo.pop_all()
        return sandbox

    async def _restore_sandbox(
        self, image_dir: Path, workdir: Path, replica_id: str, engine_config: EngineConfig
    ) -> Sandbox:
        """CPU restore, or with the CUDA checkpointer a restore onto the GPU the pool gave this replica
        (``CUDA_VISIBLE_DEVICES`` = its UUID, set by ``LocalHost`` from the pool unit)."""
        target_gpu = engine_config.env.get("CUDA_VISIBLE_DEVICES") or None
        return await self.checkpointer.restore_onto(image_dir, workdir, replica_id, target_gpu)

    async def _run_canary(self, client: httpx.AsyncClient, base_url: str) -> CanaryAnswer:
        response = await client.post(f"{base_url}{self.canary.path}", json=self.canary.body, timeout=300.0)
        response.raise_for_status()
        return CanaryAnswer.from_response(response.json())

    @property
    def weights_dir(self) -> Path:
        return self.store.weights_dir

    def _remember_weights(self, weights: dict[str, Any]) -> None:
        """The files are named by their SHA-256: remember it against their stat (no second read)."""
        cache = self._digest_cache()
        for name in weights.get("files", {}):
            cache.remember(self.weights_dir / name, name)
        cache.save()

    def _link_weights_into(self, image_dir: Path, weights: dict[str, Any]) -> None:
        """Hard links to the weight files inside the snapshot (``image/weights/``; no second copy on disk):
        digested with the image, published and pulled with it to other hosts."""
        if not weights.get("files"):
            return
        (image_dir / WEIGHTS_DIR).mkdir()
        for name in weights["files"]:
            os.link(self.weights_dir / name, image_dir / WEIGHTS_DIR / name)

    def _verify_weights(self, snapshot: Snapshot) -> None:
        """Every weight file the snapshot maps is at the path the restored engine maps (``<store>/weights``),
        of its size and digest (its name). A snapshot pulled from another host brings them inside it
        (verified with its image): linked into place here. Digests from the stat cache unless the file
        changed since it was written."""
        cache = self._digest_cache()
        try:
            for name, size in (snapshot.manifest.get("weights") or {}).get("files", {}).items():
                path = self.weights_dir / name
                carried = snapshot.image_dir / WEIGHTS_DIR / name
                if not path.exists() and carried.is_file():
                    self.weights_dir.mkdir(parents=True, exist_ok=True)
                    os.link(carried, path)  # verified with the image just before (store.verify)
                    cache.remember(path, name)
                if not path.is_file() or path.stat().st_size != size:
                    raise SnapshotCorrupt(f"weight file {path} is missing or not {size} bytes")
                if cache.digest(path) != name:
                    raise SnapshotCorrupt(f"weight file {path} does not hash to its name")
        finally:
            cache.save()

    def _digest_cache(self) -> DigestCache:
        return DigestCache(self.store.state_dir / "model-digests.json")

    def _model_digests(self, adapter: EngineAdapter, config: EngineConfig, fresh: bool) -> dict[str, Any]:
        cache = self._digest_cache()
        out = {}
        for file in model_files(adapter, config):
            if self.image_mount is not None and file.is_relative_to(self.image_mount):
                continue
            out[str(file)] = {
                "size": file.stat().st_size,
                "sha256": cache.digest(file, trust_cache=not fresh),
            }
        cache.save()
        return out

    def _model_changes(self, adapter: EngineAdapter, config: EngineConfig, manifest: dict[str, Any]) -> str:
        """'' when every recorded model file is unchanged, else what changed (first few files)."""
        recorded: dict[str, Any] = manifest.get("model_files") or {}
        cache = self._digest_cache()
        problems = []
        for name, meta in recorded.items():
            path = Path(name)
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != meta["size"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, snapshot {meta['size']}")
            elif cache.digest(path) != meta["sha256"]:
                problems.append(f"{name} sha256 differs")
            if len(problems) >= 3:
                break
        cache.save()
        return "; ".join(problems)


def image_digest_of(path: Path | None) -> str | None:
    """Digest of an imagefs index file (the rootfs the engine runs from), part of the identity."""
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshots_for(
    settings: SnapshotSettings, adapter: EngineAdapter, engine_config: EngineConfig, metrics: ModelMetrics
) -> SnapshotManager:
    """The ``SnapshotManager`` for ``--snapshot``, ``--snapshot-dir``, ``--image`` and a recipe's canary.
    The picked checkpointer (``auto`` included) refuses engine arguments it cannot snapshot."""
    from coldstart.launcher.checkpointers.registry import get_checkpointer
    from coldstart.launcher.snapshots.remote import remote_for

    checkpointer = get_checkpointer(settings.checkpointer)
    if checkpointer.name == "runsc" and holds_rootfs(settings.image_mount):
        from coldstart.launcher.checkpointers.runsc import RunscCheckpointer

        # The mounted root-filesystem image is the container's root, handed over here (not a global).
        checkpointer = RunscCheckpointer(root=settings.image_mount)
    elif checkpointer.name == "criu" and settings.image_mount is not None:
        from coldstart.launcher.checkpointers.criu import CriuCheckpointer

        # The engine's files under the imagefs mount stay visible to it; CRIU treats the mount as external.
        checkpointer = CriuCheckpointer(external_mounts=engine_mounts(settings.image_mount))
    checkpointer.check_engine_args(engine_config.engine_args)
    manager = SnapshotManager(
        checkpointer,
        SnapshotStore(settings.store_dir),
        adapter,
        engine_config,
        metrics,
        image_digest=image_digest_of(settings.image),
        image_mount=settings.image_mount,
        canary=settings.canary,
        remote=remote_for(settings.tiers, settings.chunk_cache, settings.publish_to, settings.trust_key),
    )
    manager.prefetch(adapter, engine_config)  # with --snapshot-tiers and no local snapshot
    return manager
