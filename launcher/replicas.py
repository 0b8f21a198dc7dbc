"""The replica manager: starts, routes to, scales and stops replicas.

Owns every replica and every task it starts (no fire-and-forget): ``close()`` cancels them and stops all
sandboxes. Requests call ``acquire()``, which returns the least-busy READY replica or waits for one
(bounded queue, timeout); demand beyond ``target_concurrency`` per replica starts another (up to
``max_replicas``); replicas idle for ``idle_timeout`` are drained and stopped, down to ``min_replicas``
(zero: scale to zero), and the next request starts one again.

How a replica comes up (``_bring_up``): with snapshots on, restore when the store has this identity's
snapshot, else cold boot and take the snapshot; a failed restore is logged with its reason, counted, and
followed by a cold boot -- never a half-restored replica in service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.launcher.boot import cold_boot
from coldstart.launcher.errors import ColdstartError, RestoreFailed
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.sandboxes.plain import PlainSandbox
from coldstart.launcher.replica import Replica, ReplicaState
from coldstart.launcher.sandboxes.base import Sandbox
from coldstart.pool import Pool, UnitState, unit_env

log = logging.getLogger("coldstart.lifecycle")

TICK_S = 0.25  # scaling loop period
RESNAPSHOT_REASONS = frozenset({"digest", "gate", "model_files", "missing"})
_HELD_UNIT_STATES = tuple(s for s in UnitState if s is not UnitState.RELEASED)


class QueueFull(ColdstartError):
    pass


class QueueTimeout(ColdstartError):
    pass


class Snapshots(Protocol):
    """What the manager needs from ``coldstart.launcher.snapshots.manager.SnapshotManager``."""

    def has_snapshot(self) -> bool: ...

    def new_sandbox(self, workdir: Path, replica_id: str) -> Sandbox: ...

    async def restore(
        self,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        http: httpx.AsyncClient,
        workdir: Path,
        replica_id: str,
    ) -> Sandbox: ...

    async def snapshot(
        self, sandbox: Sandbox, adapter: EngineAdapter, engine_config: EngineConfig, http: httpx.AsyncClient
    ) -> None: ...


@dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int = 0
    max_replicas: int = 1
    initial_replicas: int = 1
    target_concurrency: int = 4
    idle_timeout: float = 300.0
    max_queue: int = 256
    queue_timeout: float = 600.0
    boot_timeout: float = 900.0
    drain_timeout: float = 30.0


class ReplicaManager:
    def __init__(
        self,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        policy: ScalingPolicy,
        metrics: Metrics,
        work_dir: Path,
        snapshots: Snapshots | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.adapter = adapter
        self.engine_config = engine_config
        self.policy = policy
        self.metrics = metrics
        self.work_dir = work_dir
        self.snapshots = snapshots
        # Where replicas run: a GPU (or CPU slot) from the buffer pool, handed back when they stop.
        self.pool = pool
        self.replicas: dict[str, Replica] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_boot_exception: BaseException | None = None  # why the latest bring-up failed
        self._retry_at = 0.0  # no new replica before this (back-off after failed boots)
        self._failed_boots = 0
        self._held_since = time.monotonic()
        # Control-plane client: health, warm-up, hooks. trust_env=False: never via an HTTP proxy.
        # No keep-alive: each call's connection is closed by us when it ends, so the engine holds no
        # established or TIME_WAIT socket when it is checkpointed (gVisor refuses to save them).
        self.http = httpx.AsyncClient(
            trust_env=False,
            timeout=httpx.Timeout(300.0, connect=5.0),
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    # ---------------------------------------------------------------- lifecycle of the manager
    async def start(self) -> list[asyncio.Task[None]]:
        """Start the scaling loop and the initial replicas; returns their bring-up tasks."""
        self._loop_task = asyncio.create_task(self._scaling_loop(), name="scaling loop")
        return [self._launch() for _ in range(self.policy.initial_replicas)]

    async def close(self) -> None:
        self._closing = True
        if self._loop_task:
            self._loop_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in [*self._tasks, *([self._loop_task] if self._loop_task else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(self._stop(r, drain=False) for r in list(self.replicas.values())))
        await self.http.aclose()

    # ---------------------------------------------------------------- routing
    def _pick(self) -> Replica | None:
        ready = [r for r in self.replicas.values() if r.state is ReplicaState.READY]
        return min(ready, key=lambda r: r.in_flight) if ready else None

    @property
    def last_boot_error(self) -> str | None:
        """The first line of the latest failed bring-up's error (None once a replica came up)."""
        exc = self.last_boot_exception
        if exc is None:
            return None
        return str(exc).splitlines()[0] if str(exc) else repr(exc)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    async def acquire(self) -> Replica:
        """The least-busy READY replica; waits (bounded) while none is ready. Call ``release`` after."""
        replica = self._pick()
        if replica is None:
            if self._waiting >= self.policy.max_queue:
                raise QueueFull(f"{self._waiting} requests already waiting for a replica; retry later")
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
            self._ensure_capacity()
            try:
                async with self._changed:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self._pick() is not None), self.policy.queue_timeout
                    )
            except TimeoutError:
                why = f" (last boot failed: {self.last_boot_error})" if self.last_boot_error else ""
                raise QueueTimeout(
                    f"no replica became ready within {self.policy.queue_timeout:.0f} s{why}"
                ) from None
            finally:
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)
            replica = self._pick()
            assert replica is not None  # wait_for's predicate held under the condition's lock
        replica.begin_request()
        self.metrics.in_flight.inc()
        return replica

    def release(self, replica: Replica) -> None:
        served = replica.end_request()
        self.metrics.in_flight.dec()
        if served:
            self.metrics.gpu_seconds_serving.inc(served)

    async def replica_failed(self, replica: Replica, why: str) -> None:
        """A request saw the replica's engine gone: take it out of service at once."""
        if replica.state in (ReplicaState.READY, ReplicaState.DRAINING):
            replica.transition(ReplicaState.FAILED, reason=why)
            self._spawn(self._stop(replica, drain=False), f"stop {replica.id}")

    # ---------------------------------------------------------------- scaling
    def _active(self) -> list[Replica]:
        live = (
            ReplicaState.NEW,
            ReplicaState.BOOTING,
            ReplicaState.RESTORING,
            ReplicaState.SNAPSHOTTING,
            ReplicaState.READY,
        )
        return [r for r in self.replicas.values() if r.state in live]

    def _ensure_capacity(self) -> None:
        """Start replicas until there are enough for the demand (in flight + waiting), within bounds."""
        if self._closing or time.monotonic() < self._retry_at:
            return
        active = self._active()
        demand = self._waiting + sum(r.in_flight for r in active)
        want = -(-demand // max(1, self.policy.target_concurrency))  # ceil
        want = min(max(want, self.policy.min_replicas), self.policy.max_replicas)
        for _ in range(want - len(active)):
            self._launch()

    async def _scaling_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for replica in list(self.replicas.values()):
                sandbox = replica.sandbox
                if replica.state is ReplicaState.READY and sandbox and sandbox.exit_code() is not None:
                    await self.replica_failed(replica, f"engine exited with status {sandbox.exit_code()}")
            self._ensure_capacity()
            idle = self.policy.idle_timeout
            ready = [r for r in self.replicas.values() if r.state is ReplicaState.READY]
            surplus = len(self._active()) - self.policy.min_replicas
            for replica in sorted(ready, key=lambda r: r.last_used):
                if surplus <= 0 or not idle or self._waiting:
                    break
                if replica.in_flight == 0 and now - replica.last_used >= idle:
                    log.info(
                        "replica %s idle for %.0fs: scaling down",
                        replica.id,
                        now - replica.last_used,
                        extra={"event": "scale_down", "replica": replica.id},
                    )
                    replica.transition(ReplicaState.DRAINING, reason="idle")
                    self._spawn(self._stop(replica, drain=True), f"stop {replica.id}")
                    surplus -= 1
            self.update_gauges()

    def update_gauges(self) -> None:
        counts = {state: 0 for state in ReplicaState}
        for replica in self.replicas.values():
            counts[replica.state] += 1
        for state, n in counts.items():
            self.metrics.replicas.labels(state.value).set(n)
        # GPU allocation utilization (the seed's definition): GPU-seconds with a replica of the app up
        # (ready or draining) / GPU-seconds held (every unit of the pool not yet released: idle buffer
        # units and units under booting replicas are paid but do not run the app). Busy utilization,
        # stricter: GPU-seconds with a request in flight / GPU-seconds held.
        now = time.monotonic()
        elapsed, self._held_since = now - self._held_since, now
        running = counts[ReplicaState.READY] + counts[ReplicaState.DRAINING]
        if self.pool is not None:
            held = len(self.pool.inventory.in_state(*_HELD_UNIT_STATES))
        else:
            held = len(self._active()) + counts[ReplicaState.DRAINING]
        self.metrics.gpu_seconds_held.inc(held * elapsed)
        self.metrics.gpu_seconds_running.inc(running * elapsed)
        held_total = _counter_value(self.metrics.gpu_seconds_held)
        if held_total > 0:
            running_total = _counter_value(self.metrics.gpu_seconds_running)
            self.metrics.gpu_allocation_utilization.set(running_total / held_total)
            self.metrics.gpu_busy_utilization.set(
                _counter_value(self.metrics.gpu_seconds_serving) / held_total
            )

    # ---------------------------------------------------------------- one replica
    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _launch(self) -> asyncio.Task[None]:
        replica = Replica(f"r{next(self._ids)}")
        self.replicas[replica.id] = replica
        return self._spawn(self._bring_up(replica), f"bring up {replica.id}")

    def _new_sandbox(self, replica: Replica) -> Sandbox:
        if self.snapshots is not None:
            return self.snapshots.new_sandbox(self.work_dir / replica.id, replica.id)
        return PlainSandbox(f"{self.adapter.name}:{replica.id}")

    async def _bring_up(self, replica: Replica) -> None:
        started = time.monotonic()
        try:
            if self.pool is not None:
                replica.unit = await self.pool.acquire(timeout=self.policy.boot_timeout)
            if self.snapshots is not None and self.snapshots.has_snapshot():
                replica.transition(ReplicaState.RESTORING)
                try:
                    replica.sandbox = await self.snapshots.restore(
                        self.adapter,
                        self._config_for(replica),
                        self.http,
                        self.work_dir / replica.id,
                        replica.id,
                    )
                except RestoreFailed as exc:
                    self.metrics.restore_failures.labels(exc.reason).inc()
                    log.warning(
                        "replica %s restore failed (%s): %s; cold booting instead",
                        replica.id,
                        exc.reason,
                        exc,
                        extra={"event": "restore_failed", "replica": replica.id, "reason": exc.reason},
                    )
                    replica.transition(ReplicaState.BOOTING, reason=f"restore-failed:{exc.reason}")
                    # A snapshot that is unusable here (damaged, foreign, stale weights) is replaced by
                    # a fresh one; after other failures (canary, checkpointer) a new one would fail alike.
                    await self._cold_boot(replica, snapshot=exc.reason in RESNAPSHOT_REASONS)
                else:
                    self.metrics.restores.inc()
                    replica.how = "restore"
            else:
                replica.transition(ReplicaState.BOOTING)
                await self._cold_boot(replica, snapshot=self.snapshots is not None)
        except asyncio.CancelledError:
            await self._stop(replica, drain=False)
            raise
        except Exception as exc:  # any failure: the replica never serves; callers read last_boot_exception
            self.last_boot_exception = exc
            self._failed_boots += 1
            self._retry_at = time.monotonic() + min(30.0, 2.0 ** (self._failed_boots - 1))
            log.error(
                "replica %s failed to start: %s",
                replica.id,
                exc,
                extra={"event": "boot_failed", "replica": replica.id},
            )
            if replica.state is not ReplicaState.FAILED:
                replica.transition(ReplicaState.FAILED, reason="boot")
            await self._stop(replica, drain=False)
            return
        elapsed = time.monotonic() - started
        self.metrics.phase_seconds.labels(replica.how).observe(elapsed)
        self.last_boot_exception = None
        self._failed_boots = 0
        replica.transition(ReplicaState.READY, how=replica.how, ready_after_s=round(elapsed, 3))
        async with self._changed:
            self._changed.notify_all()

    async def _cold_boot(self, replica: Replica, *, snapshot: bool) -> None:
        replica.sandbox = self._new_sandbox(replica)
        started = time.monotonic()
        await cold_boot(
            replica.sandbox,
            self.adapter,
            self._config_for(replica),
            self.http,
            timeout_s=self.policy.boot_timeout,
        )
        self.metrics.cold_boots.inc()
        self.metrics.phase_seconds.labels("boot").observe(time.monotonic() - started)
        replica.how = "cold boot"
        if snapshot and self.snapshots is not None:
            replica.transition(ReplicaState.SNAPSHOTTING)
            await self.snapshots.snapshot(replica.sandbox, self.adapter, self.engine_config, self.http)

    def _config_for(self, replica: Replica) -> EngineConfig:
        """The engine config pinned to the replica's unit (``CUDA_VISIBLE_DEVICES`` for a GPU)."""
        if replica.unit is None:
            return self.engine_config
        env = {**self.engine_config.env, **unit_env(replica.unit)}
        return dataclasses.replace(self.engine_config, env=env)

    async def _stop(self, replica: Replica, *, drain: bool) -> None:
        if replica.state is ReplicaState.READY:
            replica.transition(ReplicaState.DRAINING, reason="shutdown")
        if drain:
            deadline = time.monotonic() + self.policy.drain_timeout
            while replica.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if replica.sandbox is not None:
            await replica.sandbox.stop()
        if replica.state is not ReplicaState.STOPPED:
            if replica.state not in (ReplicaState.DRAINING, ReplicaState.FAILED):
                replica.transition(ReplicaState.FAILED, reason="cancelled")
            replica.transition(ReplicaState.STOPPED)
        self.replicas.pop(replica.id, None)
        if replica.unit is not None and self.pool is not None:
            unit, replica.unit = replica.unit, None
            with contextlib.suppress(Exception):  # a closed pool on shutdown: nothing to hand back
                await self.pool.release(unit)


def _counter_value(counter: object) -> float:
    # prometheus_client keeps the value in ``_value``; reading it avoids a full registry collect.
    return float(counter._value.get())  # type: ignore[attr-defined]
