"""The replica manager: starts, routes to, scales, watches and stops replicas.

Owns every replica and every task it starts (no fire-and-forget): ``close()`` cancels the bring-ups and
probes and waits for every stop. Requests call ``acquire()``, which returns a READY replica with room or
waits for one (bounded queue, timeout); demand beyond ``target_concurrency`` per replica starts another (up
to ``max_replicas``, counting replicas still draining or being stopped); replicas idle for
``idle_timeout`` are drained and stopped, down to ``min_replicas`` (zero: scale to zero), never while
requests wait.

Routing while capacity is coming: a replica at ``target_concurrency`` takes no more requests while another
replica is starting; the waiters stay queued here and spread over every replica as it becomes ready (a
burst from zero would otherwise bind every waiter to the first ready replica, leave the second idle and
the idle timer would stop it). With nothing starting, the least-busy replica takes the request.

Who decides a replica is dead (``suspect()``): never one failed connection. A connection error can be a
keep-alive connection the engine closed after an error answer; a bad request must not take a healthy
replica (and its other requests) down. A replica fails when its engine process exited, or when its
liveness probe (the adapter's health probe, ``health_timeout`` each) fails ``HEALTH_FAILURES`` times in a
row; probes run every ``health_interval`` and at once after a connection error. A hung engine (SIGSTOP, a
deadlock) is thus detected within interval + 2 x timeout + interval (10 s by default), its engine killed
(which ends its in-flight requests with an error), and demand starts a replacement.

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
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.launcher.boot import cold_boot
from coldstart.launcher.errors import QueueFull, QueueTimeout, RestoreFailed
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.replica import Replica, ReplicaState, StartKind
from coldstart.launcher.sandboxes.base import Sandbox
from coldstart.launcher.sandboxes.plain import PlainSandbox
from coldstart.pool import Pool, UnitState, unit_env

log = logging.getLogger("coldstart.lifecycle")

TICK_S = 0.25  # scaling loop period
HEALTH_FAILURES = 2  # consecutive failed liveness probes that fail a replica
FAILED_STOP_GRACE_S = 2.0  # a failed (exited or hung) engine gets little time to stop politely
_HELD_UNIT_STATES = tuple(s for s in UnitState if s is not UnitState.RELEASED)
_STARTING = (ReplicaState.NEW, ReplicaState.BOOTING, ReplicaState.RESTORING, ReplicaState.SNAPSHOTTING)
_SERVING = (ReplicaState.READY, ReplicaState.DRAINING)


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
    # Liveness of READY replicas: worst-case detection of a hung engine is
    # health_interval + HEALTH_FAILURES * (health_timeout + health_interval) - health_interval = 10 s.
    health_interval: float = 2.0
    health_timeout: float = 3.0


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
        # Set (and replaced) whenever a waiter may now find a replica: one ready, one with room, one gone.
        self._changed = asyncio.Event()
        self._waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()  # bring-ups and probes: cancelled by close()
        self._stops: dict[str, asyncio.Task[None]] = {}  # one stop per replica; awaited, never cancelled
        self._probe_now: dict[str, asyncio.Event] = {}
        self._halting: set[str] = set()  # replicas whose engine is being stopped on purpose
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_boot_exception: BaseException | None = None  # why the latest bring-up failed
        self._retry_at = 0.0  # no new replica before this (back-off after failed boots)
        self._failed_boots = 0
        self.peak_live = 0  # most replicas holding an engine at once (never above max_replicas)
        # GPU-seconds totals behind the utilization gauges (prometheus counters are write-only here).
        self._held_since = time.monotonic()
        self._held_s = self._running_s = self._serving_s = 0.0
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
        """Cancel bring-ups and probes, stop every replica and wait for every stop (also those already
        running: a second stop never returns while the first is still tearing the sandbox down)."""
        self._closing = True
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        for task in tasks:
            # Cancelled until done: Python 3.11's wait_for swallows a cancellation that arrives as its
            # inner future completes (gh-86296), and a task that goes on must not hang the shutdown.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()
        for replica in list(self.replicas.values()):
            self._request_stop(replica, drain=False)
        while self._stops:
            await asyncio.gather(*self._stops.values(), return_exceptions=True)
        self._wake()
        await self.http.aclose()

    # ---------------------------------------------------------------- routing
    def _pick(self, avoid: Replica | None = None) -> Replica | None:
        ready = [r for r in self.replicas.values() if r.state is ReplicaState.READY]
        if avoid is not None and len(ready) > 1:
            ready = [r for r in ready if r is not avoid]
        if not ready:
            return None
        best = min(ready, key=lambda r: r.in_flight)
        if best.in_flight < self.policy.target_concurrency:
            return best
        # Every ready replica is at its target: wait for one that is coming, else take the least busy.
        return None if any(r.state in _STARTING for r in self.replicas.values()) else best

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

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

    async def acquire(self, avoid: Replica | None = None) -> Replica:
        """A READY replica with room (or the least busy), other than ``avoid`` where there is one; waits
        (bounded) while none. Call ``release`` after."""
        replica = self._pick(avoid)
        if replica is not None and replica.in_flight >= self.policy.target_concurrency:
            # Every ready replica is at its target: this request is demand for another one, and it
            # waits for that one rather than queue inside a busy engine (while max_replicas allows).
            self._ensure_capacity(extra=1)
            replica = self._pick(avoid)
        if replica is None:
            if self._waiting >= self.policy.max_queue:
                raise QueueFull(f"{self._waiting} requests already waiting for a replica; retry later")
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
            deadline = time.monotonic() + self.policy.queue_timeout
            try:
                while (replica := self._pick(avoid)) is None:
                    self._ensure_capacity()
                    changed = self._changed
                    left = deadline - time.monotonic()
                    if left <= 0:
                        why = f" (last boot failed: {self.last_boot_error})" if self.last_boot_error else ""
                        raise QueueTimeout(
                            f"no replica became ready within {self.policy.queue_timeout:.0f} s{why}"
                        )
                    # Bounded by TICK_S too: a back-off after failed boots ends without an event.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), min(left, 1.0))
            finally:
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)
        replica.begin_request()
        self.metrics.in_flight.inc()
        return replica

    def release(self, replica: Replica) -> None:
        served = replica.end_request()
        self.metrics.in_flight.dec()
        if served:
            self.metrics.gpu_seconds_serving.inc(served)
            self._serving_s += served
        self._wake()  # room on this replica for a waiter

    def suspect(self, replica: Replica, why: str) -> None:
        """A request saw trouble reaching the replica (connection error, read timeout): probe it now.
        The replica is failed only if its engine exited or its health probe fails, never on this alone."""
        log.info(
            "replica %s: %s; probing its health",
            replica.id,
            why,
            extra={"event": "suspect", "replica": replica.id},
        )
        if (event := self._probe_now.get(replica.id)) is not None:
            event.set()

    def fail(self, replica: Replica, why: str, *, kind: str = "other") -> None:
        """Take the replica out of service: its engine is stopped (ending its in-flight requests).
        ``kind`` labels the failure metric: ``exited``, ``unresponsive`` or ``other``."""
        if replica.state in _SERVING:
            self.metrics.replica_failures.labels(kind).inc()
            replica.transition(ReplicaState.FAILED, reason=why)
            self._request_stop(replica, drain=False)
            self._wake()  # waiters re-evaluate (and demand may start a replacement)

    # ---------------------------------------------------------------- liveness
    async def _watch(self, replica: Replica) -> None:
        """Probe a serving replica every ``health_interval`` (or at once when suspected)."""
        poke = self._probe_now.setdefault(replica.id, asyncio.Event())
        failures = 0
        try:
            while self._watched(replica):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(poke.wait(), self.policy.health_interval)
                poke.clear()
                if not self._watched(replica):
                    return
                why = await self._probe(replica)
                if why is None:
                    failures = 0
                    continue
                failures += 1
                exited = replica.sandbox is not None and replica.sandbox.exit_code() is not None
                if not self._watched(replica):
                    return  # its stop began while the probe ran
                if exited or failures >= HEALTH_FAILURES:
                    log.warning(
                        "replica %s is not alive: %s",
                        replica.id,
                        why,
                        extra={"event": "replica_dead", "replica": replica.id},
                    )
                    self.fail(replica, why, kind="exited" if exited else "unresponsive")
                    return
        finally:
            self._probe_now.pop(replica.id, None)

    def _watched(self, replica: Replica) -> bool:
        """Serving and not being stopped on purpose (an engine told to exit fails its probe: no news)."""
        return (
            not self._closing
            and replica.state in _SERVING
            and replica.sandbox is not None
            and replica.id not in self._halting
        )

    async def _probe(self, replica: Replica) -> str | None:
        """None when alive, else why not."""
        sandbox = replica.sandbox
        if sandbox is None:
            return "no sandbox"
        if (code := sandbox.exit_code()) is not None:
            return f"engine exited with status {code}"
        timeout = self.policy.health_timeout
        try:
            healthy = await asyncio.wait_for(self.adapter.is_healthy(self.http, sandbox.base_url), timeout)
        except TimeoutError:
            return f"health probe got no answer within {timeout:.0f} s (engine hung?)"
        except Exception as exc:  # an adapter's probe that raises says why it is not alive
            return f"health probe failed: {exc}"
        if (code := sandbox.exit_code()) is not None:
            return f"engine exited with status {code}"
        return None if healthy else "health probe failed"

    # ---------------------------------------------------------------- scaling
    def _active(self) -> list[Replica]:
        """Replicas starting or serving new requests (the capacity demand is measured against)."""
        return [r for r in self.replicas.values() if r.state in (*_STARTING, ReplicaState.READY)]

    def _live(self) -> list[Replica]:
        """Replicas that hold an engine or a unit: everything not yet stopped (draining and failed ones
        still being stopped included). ``max_replicas`` bounds this."""
        return [r for r in self.replicas.values() if r.state is not ReplicaState.STOPPED]

    def _ensure_capacity(self, extra: int = 0) -> None:
        """Start replicas until there are enough for the demand (in flight + waiting + ``extra`` about to
        arrive), within bounds."""
        if self._closing or time.monotonic() < self._retry_at:
            return
        active = self._active()
        demand = self._waiting + extra + sum(r.in_flight for r in active)
        want = -(-demand // max(1, self.policy.target_concurrency))  # ceil
        want = min(max(want, self.policy.min_replicas), self.policy.max_replicas)
        room = self.policy.max_replicas - len(self._live())
        for _ in range(min(want - len(active), room)):
            self._launch()

    async def _scaling_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for replica in list(self.replicas.values()):  # an exited engine is seen within a tick
                sandbox = replica.sandbox
                if self._watched(replica) and sandbox and (code := sandbox.exit_code()) is not None:
                    self.fail(replica, f"engine exited with status {code}", kind="exited")
            self._ensure_capacity()
            self._scale_down(time.monotonic())
            self.update_gauges()

    def _scale_down(self, now: float) -> None:
        idle = self.policy.idle_timeout
        if not idle or self._waiting:  # never while requests wait for a replica
            return
        ready = [r for r in self.replicas.values() if r.state is ReplicaState.READY]
        surplus = len(self._active()) - self.policy.min_replicas
        for replica in sorted(ready, key=lambda r: r.last_used):
            if surplus <= 0:
                break
            if replica.in_flight == 0 and now - replica.last_used >= idle:
                log.info(
                    "replica %s idle for %.0fs: scaling down",
                    replica.id,
                    now - replica.last_used,
                    extra={"event": "scale_down", "replica": replica.id},
                )
                replica.transition(ReplicaState.DRAINING, reason="idle")
                self._request_stop(replica, drain=True)
                surplus -= 1

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
        self._held_s += held * elapsed
        self._running_s += running * elapsed
        if self._held_s > 0:
            self.metrics.gpu_allocation_utilization.set(self._running_s / self._held_s)
            self.metrics.gpu_busy_utilization.set(self._serving_s / self._held_s)

    # ---------------------------------------------------------------- one replica
    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _launch(self) -> asyncio.Task[None]:
        replica = Replica(f"r{next(self._ids)}")
        self.replicas[replica.id] = replica
        self.peak_live = max(self.peak_live, len(self._live()))
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
                    await self._cold_boot(replica, snapshot=exc.reason.replace_snapshot)
                else:
                    self.metrics.restores.inc()
                    replica.how = StartKind.RESTORE
            else:
                replica.transition(ReplicaState.BOOTING)
                await self._cold_boot(replica, snapshot=self.snapshots is not None)
        except asyncio.CancelledError:
            self._request_stop(replica, drain=False)  # close() waits for it
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
            self._request_stop(replica, drain=False)
            self._wake()
            return
        elapsed = time.monotonic() - started
        self.metrics.phase_seconds.labels(str(replica.how)).observe(elapsed)
        self.last_boot_exception = None
        self._failed_boots = 0
        replica.transition(ReplicaState.READY, how=replica.how, ready_after_s=round(elapsed, 3))
        self._probe_now[replica.id] = asyncio.Event()
        self._spawn(self._watch(replica), f"watch {replica.id}")
        self._wake()

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
        replica.how = StartKind.COLD_BOOT
        if snapshot and self.snapshots is not None:
            replica.transition(ReplicaState.SNAPSHOTTING)
            await self.snapshots.snapshot(replica.sandbox, self.adapter, self.engine_config, self.http)

    def _config_for(self, replica: Replica) -> EngineConfig:
        """The engine config pinned to the replica's unit (``CUDA_VISIBLE_DEVICES`` for a GPU)."""
        if replica.unit is None:
            return self.engine_config
        env = {**self.engine_config.env, **unit_env(replica.unit)}
        return dataclasses.replace(self.engine_config, env=env)

    def _request_stop(self, replica: Replica, *, drain: bool) -> asyncio.Task[None]:
        """The replica's one stop task (started now, or the one already running). Not in ``_tasks``:
        ``close()`` waits for stops instead of cancelling them half-way (a half-stopped sandbox leaks)."""
        task = self._stops.get(replica.id)
        if task is None:
            task = asyncio.create_task(self._stop(replica, drain=drain), name=f"stop {replica.id}")
            self._stops[replica.id] = task
            task.add_done_callback(lambda _t: self._stops.pop(replica.id, None))
        return task

    async def _stop(self, replica: Replica, *, drain: bool) -> None:
        if replica.state is ReplicaState.READY:
            replica.transition(ReplicaState.DRAINING, reason="shutdown")
        if drain:
            deadline = time.monotonic() + self.policy.drain_timeout
            while (
                replica.in_flight and replica.state is ReplicaState.DRAINING and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
        self._halting.add(replica.id)
        if replica.sandbox is not None:
            grace = FAILED_STOP_GRACE_S if replica.state is ReplicaState.FAILED else 10.0
            await replica.sandbox.stop(grace)
        if replica.state is not ReplicaState.STOPPED:
            if replica.state not in (ReplicaState.DRAINING, ReplicaState.FAILED):
                replica.transition(ReplicaState.FAILED, reason="cancelled")
            replica.transition(ReplicaState.STOPPED)
        self.replicas.pop(replica.id, None)
        self._halting.discard(replica.id)
        if replica.unit is not None and self.pool is not None:
            unit, replica.unit = replica.unit, None
            with contextlib.suppress(Exception):  # a closed pool on shutdown: nothing to hand back
                await self.pool.release(unit)
        self._wake()
