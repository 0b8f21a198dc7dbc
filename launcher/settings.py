"""``ServeConfig`` -> what each part of the launcher takes: the one typed translation.

    engine_config(config)     -> EngineConfig      (adapter: model, engine args, env, warm-ups)
    scaling_policy(config)    -> ScalingPolicy     (autoscaler, queue, timeouts)
    snapshot_settings(config) -> SnapshotSettings  (checkpointer, store, image, canary) or None when off

Every recipe key reaches its consumer through here (a recipe's ``[env]`` and ``[[warmup]]`` used to be
printed by ``coldstart recipes show`` and then dropped on the way to the engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coldstart.engine_adapters.base import EngineConfig
from coldstart.launcher.autoscaler import ScalingPolicy
from coldstart.launcher.config import Canary, ServeConfig
from coldstart.launcher.errors import UsageError
from coldstart.launcher.snapshots.canary import DEFAULT_CANARY


@dataclass(frozen=True)
class SnapshotSettings:
    checkpointer: str  # auto, criu, runsc, cuda
    store_dir: Path
    image: Path | None  # the imagefs index the engine runs from (its digest is part of the identity)
    canary: Canary
    image_mount: Path | None = None  # where that image is mounted: files under it are pinned by its digest
    # Snapshots across hosts (snapshots/remote.py): where to find them, cache their chunks, publish them.
    tiers: tuple[str, ...] = ()
    chunk_cache: Path | None = None
    publish_to: Path | None = None
    trust_key: Path | None = None  # signs published refs, checks pulled ones (remote.py)


def engine_config(config: ServeConfig) -> EngineConfig:
    return EngineConfig(
        model=config.model,
        engine_args=tuple(config.engine_args),
        served_model_name=config.served_model_name,
        env=dict(config.engine_env),
        warmup=tuple((w.path, dict(w.body)) for w in config.warmup),
    )


def scaling_policy(config: ServeConfig) -> ScalingPolicy:
    if config.max_replicas < max(1, config.min_replicas, config.initial_replicas):
        raise UsageError("--max-replicas must be >= 1, --min-replicas and --initial-replicas")
    return ScalingPolicy(
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        initial_replicas=config.initial_replicas,
        target_concurrency=config.target_concurrency,
        idle_timeout=config.idle_timeout,
        max_queue=config.max_queue,
        queue_timeout=config.queue_timeout,
        boot_timeout=config.boot_timeout,
        drain_timeout=config.drain_timeout,
        health_interval=config.health_interval,
        health_timeout=config.health_timeout,
    )


def snapshot_settings(config: ServeConfig) -> SnapshotSettings | None:
    if config.snapshot == "off":
        return None
    return SnapshotSettings(
        checkpointer=config.snapshot,
        store_dir=Path(config.snapshot_dir),
        image=Path(config.image) if config.image is not None else None,
        canary=config.canary or DEFAULT_CANARY,
        image_mount=Path(config.image_mount) if config.image is not None and config.image_mount else None,
        tiers=tuple(t.strip() for t in (config.snapshot_tiers or "").split(",") if t.strip()),
        chunk_cache=config.snapshot_cache,
        publish_to=config.snapshot_publish,
        trust_key=config.snapshot_trust_key,
    )
