"""How one replica comes up on this host: restore from the deployment's snapshot when there is one, else
cold boot (and take the snapshot); a failed restore is logged with its reason, counted, and followed by a
cold boot -- never a half-restored replica in service.

    has snapshot ─▶ RESTORING ─▶ restored            (StartKind.RESTORE)
        │               └─(RestoreFailed)─▶ BOOTING ─▶ cold boot [─▶ SNAPSHOTTING when the snapshot is bad]
        └─(none)──────▶ BOOTING ─▶ cold boot ─▶ SNAPSHOTTING ─▶ snapshot taken   (StartKind.COLD_BOOT)

The replica's state moves only after each step succeeded; the caller (the gateway, through a
``ReplicaHost``) moves it to READY and owns its stop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from coldstart.engine_adapters.base import EngineConfig
from coldstart.launcher.boot import cold_boot
from coldstart.launcher.errors import RestoreFailed
from coldstart.launcher.replica import Replica, ReplicaState, StartKind
from coldstart.launcher.sandboxes.plain import PlainSandbox

if TYPE_CHECKING:
    from coldstart.launcher.deployment import Deployment

log = logging.getLogger("coldstart.lifecycle")


async def bring_up(
    deployment: Deployment,
    replica: Replica,
    http: httpx.AsyncClient,
    workdir: Path,
    engine_config: EngineConfig,
) -> StartKind:
    """Restore or cold-boot ``replica`` in a sandbox under ``workdir``; ``replica.sandbox`` is set as soon as
    there is one (the caller stops it on failure)."""
    snapshots = deployment.snapshots
    metrics = deployment.metrics
    if snapshots is not None and snapshots.has_snapshot():
        replica.transition(ReplicaState.RESTORING)
        try:
            replica.sandbox = await snapshots.restore(
                deployment.adapter, engine_config, http, workdir, replica.id
            )
        except RestoreFailed as exc:
            metrics.restore_failures.labels(exc.reason).inc()
            log.warning(
                "replica %s of %s: restore failed (%s): %s; cold booting instead",
                replica.id,
                deployment.name,
                exc.reason,
                exc,
                extra={
                    "event": "restore_failed",
                    "replica": replica.id,
                    "model": deployment.name,
                    "reason": exc.reason,
                },
            )
            replica.transition(ReplicaState.BOOTING, reason=f"restore-failed:{exc.reason}")
            # A snapshot that is unusable here (damaged, foreign, stale weights) is replaced by a fresh one;
            # after other failures (canary, checkpointer) a new one would fail alike.
            await _cold_boot(deployment, replica, http, workdir, engine_config, exc.reason.replace_snapshot)
            return StartKind.COLD_BOOT
        metrics.restores.inc()
        return StartKind.RESTORE
    replica.transition(ReplicaState.BOOTING)
    await _cold_boot(deployment, replica, http, workdir, engine_config, snapshots is not None)
    return StartKind.COLD_BOOT


async def _cold_boot(
    deployment: Deployment,
    replica: Replica,
    http: httpx.AsyncClient,
    workdir: Path,
    engine_config: EngineConfig,
    snapshot: bool,
) -> None:
    snapshots = deployment.snapshots
    if snapshots is not None:
        replica.sandbox = snapshots.new_sandbox(workdir, replica.id)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        replica.sandbox = PlainSandbox(
            f"{deployment.adapter.name}:{replica.id}", log_path=workdir / "engine.log"
        )
    started = time.monotonic()
    await cold_boot(
        replica.sandbox, deployment.adapter, engine_config, http, timeout_s=deployment.policy.boot_timeout
    )
    deployment.metrics.cold_boots.inc()
    deployment.metrics.phase_seconds.labels("boot").observe(time.monotonic() - started)
    if snapshot and snapshots is not None:
        replica.transition(ReplicaState.SNAPSHOTTING)
        # The snapshot identity is the deployment's config, not this replica's unit pin.
        await snapshots.snapshot(replica.sandbox, deployment.adapter, deployment.engine_config, http)


def with_env(engine_config: EngineConfig, env: dict[str, str]) -> EngineConfig:
    """The engine config with ``env`` added (a unit's pin, ``CUDA_VISIBLE_DEVICES``)."""
    if not env:
        return engine_config
    return dataclasses.replace(engine_config, env={**engine_config.env, **env})
