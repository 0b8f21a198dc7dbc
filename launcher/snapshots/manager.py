"""Snapshot orchestration: take a snapshot of a warmed-up replica, and restore replicas from it.

Take (``snapshot``, after the replica manager's cold boot + warm-up; ``boot_and_snapshot`` does both):
    model file digests -> canary (greedy completion, recorded) -> adapter.before_checkpoint
    -> [control connections closed: our client keeps none alive] -> checkpoint (leave running)
    -> manifest + atomic rename -> adapter.after_restore on the original, which keeps serving.
    A failed snapshot is logged and the original keeps serving if it is still healthy.

Restore (``restore``), every failure a ``RestoreFailed(reason)`` after the sandbox is stopped:
    lookup ("missing", "digest" for an unreadable manifest) -> gate: checkpointer version and host
    fingerprint ("gate"), mapped model files ("model_files") -> verify sizes + digests ("digest"; the bad
    snapshot is moved aside) -> checkpointer restore into fresh namespaces ("checkpointer") -> health
    ("checkpointer" if it died, "timeout") -> adapter.after_restore ("hook") -> canary must match ("canary").

The replica manager (``replicas.py``) counts restores and restore failures and cold-boots on failure; this
module records phase durations (``checkpoint``, ``save``, ``restore``, ``canary``), snapshots taken and
snapshot bytes.

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
import time
from pathlib import Path
from typing import Any

import httpx

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig, local_model_path
from coldstart.engine_adapters.errors import AdapterError
from coldstart.launcher.boot import cold_boot, wait_healthy
from coldstart.launcher.checkpointers.base import Checkpointer
from coldstart.launcher.errors import BootTimeout, ColdstartError, EngineExited, RestoreFailed, SnapshotError
from coldstart.launcher.snapshots.file_digests import DigestCache
from coldstart.launcher.snapshots.identity import SnapshotIdentity, snapshot_identity
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.sandboxes.base import Sandbox
from coldstart.launcher.snapshots.store import SnapshotCorrupt, SnapshotStore

log = logging.getLogger("coldstart.snapshots")

RESTORE_POLL_S = 0.01  # a restored engine answers within ~0.3 s: poll finer than a cold boot does
DEFAULT_CANARY_PROMPT = "coldstart canary: repeat after me, the quick brown fox"
# One greedy token: a full forward pass (weights, KV cache, sampling, detokenizer) checked against the
# recording. Every further token costs a decode step before the replica may serve (0.25-0.7 s each for
# Qwen3-0.6B on this CPU, measured by bench/coldstart.py); pass canary_max_tokens for a stricter check.
CANARY_MAX_TOKENS = 1


def canary_request(
    adapter: EngineAdapter, config: EngineConfig, prompt: str, max_tokens: int, chat: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": adapter.upstream_model_name(config),
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if chat:
        return {
            "path": "/v1/chat/completions",
            "body": {**body, "messages": [{"role": "user", "content": prompt}]},
        }
    return {"path": "/v1/completions", "body": {**body, "prompt": prompt}}


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
    """One serving identity's snapshots: what ``ReplicaManager`` calls (see ``replicas.Snapshots``)."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        store: SnapshotStore,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        metrics: Metrics | None = None,
        *,
        image_digest: str | None = None,
        canary_prompt: str = DEFAULT_CANARY_PROMPT,
        canary_max_tokens: int = CANARY_MAX_TOKENS,
        canary_chat: bool = True,
        restore_timeout_s: float = 120.0,
    ) -> None:
        self.checkpointer = checkpointer
        self.store = store
        self.metrics = metrics or Metrics()
        self.info = checkpointer.probe()
        self.canary = canary_request(adapter, engine_config, canary_prompt, canary_max_tokens, canary_chat)
        self.identity: SnapshotIdentity = snapshot_identity(
            adapter, engine_config, self.info, self.canary, image_digest=image_digest
        )
        self.restore_timeout_s = restore_timeout_s
        self.last_timings: dict[str, float] = {}

    # -- what the replica manager calls ------------------------------------------------------------
    def has_snapshot(self) -> bool:
        return self.store.has(self.identity.key)

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
        try:
            started = time.monotonic()
            # Boot traffic on a client that keeps no connection alive: nothing left open to drain.
            async with httpx.AsyncClient(
                trust_env=False, timeout=300.0, limits=httpx.Limits(max_keepalive_connections=0)
            ) as boot_client:
                await cold_boot(sandbox, adapter, engine_config, boot_client, timeout_s=boot_timeout_s)
            self.metrics.cold_boots.inc()
            self.metrics.phase_seconds.labels("boot").observe(time.monotonic() - started)
            await self.snapshot(sandbox, adapter, engine_config, http)
        except BaseException:
            await sandbox.stop(2.0)
            raise
        return sandbox

    async def snapshot(
        self, sandbox: Sandbox, adapter: EngineAdapter, engine_config: EngineConfig, http: httpx.AsyncClient
    ) -> None:
        """Snapshot a healthy, warmed-up replica and leave it serving. Never takes the replica down for a
        failed snapshot: logs why, and raises only when the engine no longer answers."""
        timings: dict[str, float] = {}
        self.last_timings = timings
        if self._usable_snapshot_exists():  # another replica booted at the same time got there first
            log.info("snapshot %s already taken; not taking another", self.identity.key)
            return
        try:
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
        # Control traffic on a client that keeps no connection alive: nothing of ours is left open in the
        # engine when it is checkpointed (gVisor refuses open and TIME_WAIT sockets).
        async with httpx.AsyncClient(
            trust_env=False, timeout=300.0, limits=httpx.Limits(max_keepalive_connections=0)
        ) as control:
            t = time.monotonic()
            canary_text = await self._run_canary(control, sandbox.base_url)
            timings["canary"] = time.monotonic() - t
            await adapter.before_checkpoint(control, sandbox.base_url)
        with self.store.begin(key) as pending:
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
                "canary": {**self.canary, "text": canary_text},
                "timings": {k: round(v, 4) for k, v in timings.items()},
            }
            snapshot = await asyncio.to_thread(self.store.commit, pending, manifest)
            timings["save"] = time.monotonic() - t
        await adapter.after_restore(http, sandbox.base_url)
        self.metrics.snapshots_taken.inc()
        self.metrics.snapshot_bytes.set(snapshot.total_bytes)
        for phase in ("checkpoint", "save"):
            self.metrics.phase_seconds.labels(f"snapshot_{phase}").observe(timings[phase])
        log.info(
            "snapshot %s taken: %.1f MB, checkpoint %.2fs, save %.2fs",
            key, snapshot.total_bytes / 1e6, timings["checkpoint"], timings["save"],
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
        self.last_timings = timings
        started = time.monotonic()
        key = self.identity.key
        try:
            snapshot = self.store.lookup(key)
        except SnapshotCorrupt as exc:
            raise RestoreFailed("digest", str(exc)) from exc
        if snapshot is None:
            raise RestoreFailed("missing", f"no snapshot {key} in {self.store.root}")
        problems = self.identity.gate(snapshot.identity)
        if problems:
            raise RestoreFailed("gate", f"snapshot {key} does not fit this host: " + "; ".join(problems))
        t = time.monotonic()
        changed = await asyncio.to_thread(self._model_changes, adapter, engine_config, snapshot.manifest)
        if changed:
            raise RestoreFailed(
                "model_files", f"snapshot {key}: model files changed since the snapshot: {changed}"
            )
        try:
            await asyncio.to_thread(self.store.verify, snapshot)
        except SnapshotCorrupt as exc:
            moved = self.store.quarantine(snapshot)
            raise RestoreFailed("digest", f"{exc} (moved to {moved.name})") from exc
        timings["verify"] = time.monotonic() - t

        sandbox: Sandbox | None = None
        try:
            t = time.monotonic()
            try:
                sandbox = await asyncio.wait_for(
                    self._restore_sandbox(snapshot.image_dir, workdir, replica_id, engine_config),
                    self.restore_timeout_s,
                )
                remaining = max(1.0, self.restore_timeout_s - (time.monotonic() - t))
                await wait_healthy(
                    sandbox, adapter, http, timeout_s=remaining, poll_s=RESTORE_POLL_S, while_="restoring"
                )
            except TimeoutError as exc:
                raise RestoreFailed(
                    "timeout", f"restore of {key} did not finish in {self.restore_timeout_s:.0f} s"
                ) from exc
            except BootTimeout as exc:
                raise RestoreFailed(
                    "timeout", f"restored replica {replica_id} never became healthy: {exc}"
                ) from exc
            except EngineExited as exc:
                raise RestoreFailed("checkpointer", f"restored replica {replica_id} exited: {exc}") from exc
            except RestoreFailed:
                raise
            except (ColdstartError, OSError) as exc:
                raise RestoreFailed(
                    "checkpointer", f"{self.info.name} restore of {key} failed: {exc}"
                ) from exc
            timings["restore"] = time.monotonic() - t
            timings["healthy"] = time.monotonic() - started  # lookup + gate + verify + restore
            try:
                await adapter.after_restore(http, sandbox.base_url)
            except (AdapterError, httpx.HTTPError) as exc:
                raise RestoreFailed(
                    "hook", f"after-restore hook of replica {replica_id} failed: {exc}"
                ) from exc
            t = time.monotonic()
            try:
                text = await self._run_canary(http, sandbox.base_url)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                raise RestoreFailed(
                    "canary", f"canary request to restored replica {replica_id} failed: {exc!r}"
                ) from exc
            timings["canary"] = time.monotonic() - t
            want = snapshot.manifest["canary"]["text"]
            if text != want:
                raise RestoreFailed(
                    "canary", f"restored replica {replica_id} answered the canary {text!r}, expected {want!r}"
                )
        except BaseException:
            if sandbox is not None:
                await sandbox.stop(2.0)
            raise
        self.store.touch_used(snapshot)
        timings["total"] = time.monotonic() - started
        self.metrics.snapshot_bytes.set(snapshot.total_bytes)
        for phase in ("restore", "canary"):  # labelled snapshot_*: "restore" is the whole bring-up
            self.metrics.phase_seconds.labels(f"snapshot_{phase}").observe(timings[phase])
        log.info(
            "replica %s restored from %s in %.2fs (verify %.3fs, restore %.2fs, canary %.2fs)",
            replica_id, key, timings["total"], timings["verify"], timings["restore"], timings["canary"],
            extra={"event": "restored", "replica": replica_id, "key": key},
        )  # fmt: skip
        return sandbox

    # -- helpers ----------------------------------------------------------------------------------
    def _usable_snapshot_exists(self) -> bool:
        try:
            existing = self.store.lookup(self.identity.key)
        except SnapshotCorrupt:
            return False
        return existing is not None and not self.identity.gate(existing.identity)

    async def _restore_sandbox(
        self, image_dir: Path, workdir: Path, replica_id: str, engine_config: EngineConfig
    ) -> Sandbox:
        """CPU restore, or with the CUDA checkpointer a restore onto the GPU the pool gave this replica
        (``CUDA_VISIBLE_DEVICES`` = its UUID, set by the replica manager from the pool unit)."""
        restore_onto = getattr(self.checkpointer, "restore_onto", None)
        target_gpu = engine_config.env.get("CUDA_VISIBLE_DEVICES")
        if restore_onto is not None and target_gpu:
            return await restore_onto(image_dir, workdir, replica_id, target_gpu)  # type: ignore[no-any-return]
        return await self.checkpointer.restore(image_dir, workdir, replica_id)

    async def _run_canary(self, client: httpx.AsyncClient, base_url: str) -> str:
        response = await client.post(
            f"{base_url}{self.canary['path']}", json=self.canary["body"], timeout=300.0
        )
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return str(choice["message"]["content"] if "message" in choice else choice["text"])

    def _digest_cache(self) -> DigestCache:
        return DigestCache(self.store.state_dir / "model-digests.json")

    def _model_digests(self, adapter: EngineAdapter, config: EngineConfig, fresh: bool) -> dict[str, Any]:
        cache = self._digest_cache()
        out = {}
        for file in model_files(adapter, config):
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
    config: Any, adapter: EngineAdapter, engine_config: EngineConfig, metrics: Metrics
) -> SnapshotManager:
    """The ``SnapshotManager`` for a ``ServeConfig`` (``--snapshot``, ``--snapshot-dir``, ``--image``)."""
    from coldstart.launcher.checkpointers.registry import get_checkpointer

    checkpointer = get_checkpointer(config.snapshot)
    canary = getattr(config, "canary", None)  # a recipe's [canary]: prompt, max_tokens, chat
    return SnapshotManager(
        checkpointer,
        SnapshotStore(Path(config.snapshot_dir)),
        adapter,
        engine_config,
        metrics,
        image_digest=image_digest_of(getattr(config, "image", None)),
        canary_prompt=canary.prompt if canary else DEFAULT_CANARY_PROMPT,
        canary_max_tokens=canary.max_tokens if canary else CANARY_MAX_TOKENS,
        canary_chat=canary.chat if canary else True,
    )
