"""``LocalHost``: replicas on this host -- a unit from the host's pool (a GPU via NVML, or a CPU slot) and
the engine restored or cold-booted in a local sandbox (``lifecycle.py``). One pool for the whole host,
shared by every deployment: two deployments never put two replicas on one unit.

CPU slots are bounded by memory too: ``memory_budget`` bytes for all replicas together (placement checks
each replica's measured memory against it before starting one).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from coldstart.launcher.lifecycle import bring_up, with_env
from coldstart.launcher.replica import Replica, StartKind
from coldstart.pool import Pool, Unit, unit_env

if TYPE_CHECKING:
    from coldstart.launcher.deployment import Deployment

log = logging.getLogger("coldstart.lifecycle")


class LocalHost:
    name = "local"

    def __init__(
        self, pool: Pool, http: httpx.AsyncClient, work_dir: Path, memory_budget: int | None = None
    ) -> None:
        self.pool = pool
        self.http = http
        self.work_dir = work_dir
        self._memory_budget = memory_budget
        self._units: dict[str, str] = {}  # unit id -> replica id
        self._on_failure: list[Callable[[str, str], None]] = []
        pool.on_failure.append(self._unit_failed)

    def capacity(self) -> int | None:
        return self.pool.provider.capacity()

    def memory_budget(self) -> int | None:
        return self._memory_budget if self.pool.kind == "cpu" else None

    def on_failure(self, callback: Callable[[str, str], None]) -> None:
        """``callback(replica_id, reason)`` when the unit under a replica fails (a GPU's critical XID)."""
        self._on_failure.append(callback)

    def set_buffer(self, units: int) -> None:
        """Keep this many idle, health-checked units (the LP's plan)."""
        self.pool.set_target(units)

    async def start(self, deployment: Deployment, replica: Replica) -> StartKind:
        replica.unit = await self.pool.acquire(timeout=deployment.policy.boot_timeout)
        self._units[replica.unit.id] = replica.id
        config = with_env(deployment.engine_config, unit_env(replica.unit))
        return await bring_up(deployment, replica, self.http, self.work_dir / replica.id, config)

    async def stop(self, replica: Replica, grace: float) -> None:
        if replica.sandbox is not None:
            await replica.sandbox.stop(grace)
        if replica.unit is not None:
            unit, replica.unit = replica.unit, None
            self._units.pop(unit.id, None)
            with contextlib.suppress(Exception):  # a closed pool on shutdown: nothing to hand back
                await self.pool.release(unit, failed=replica.unit_failure)

    async def close(self) -> None:
        await self.pool.close()

    def _unit_failed(self, unit: Unit, reason: str) -> None:
        replica_id = self._units.get(unit.id)
        if replica_id is None:
            return
        for callback in self._on_failure:
            callback(replica_id, reason)
