"""One deployment: a model the gateway serves, with its router, replicas, snapshots and back-off.

The proxy talks to a deployment (``acquire`` / ``release`` / ``suspect``); the gateway owns the tasks that
start, watch and stop its replicas and decides where they run (``gateway.py``, ``placement.py``). A
deployment holds what is its own: the engine adapter and config, the snapshot manager for its identity,
the policy, its replicas, the bounded queue of its router, the arrival rate the LP is fed with, and the
memory a replica of it needs (``memory_estimate``).

Back-off after failed boots: each failure pushes the next attempt back (1, 2, 4 ... 30 s). When a boot
fails twice in a row *the same way* (same one-line root cause), the requests waiting for the deployment
get an OpenAI-shaped 503 carrying that reason (and ``Retry-After``) instead of waiting out
``--queue-timeout``, and new ones get it at once until the back-off ends; the next request after that
tries again. Other deployments are unaffected.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from coldstart.engine_adapters.base import EngineAdapter, EngineConfig
from coldstart.launcher.autoscaler import Demand, ScalingPolicy
from coldstart.launcher.errors import BootFailing, QueueTimeout
from coldstart.launcher.metrics import ModelMetrics
from coldstart.launcher.replica import Replica, ReplicaState
from coldstart.launcher.router import STARTING, Router, pick
from coldstart.launcher.sandboxes.base import Sandbox

if TYPE_CHECKING:
    from coldstart.launcher.config import ServeConfig

log = logging.getLogger("coldstart.lifecycle")

MAX_BACKOFF_S = 30.0
RATE_WINDOW_S = 60.0  # arrival rates for the LP: a sliding window this long


class Snapshots(Protocol):
    """What the gateway needs from ``coldstart.launcher.snapshots.manager.SnapshotManager``."""

    def has_snapshot(self) -> bool: ...

    def resident_hint(self) -> int: ...

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

    async def close(self) -> None: ...


def one_line(exc: BaseException) -> str:
    """The reason a boot failed, in one line: the engine's root cause when the error carries one."""
    root = getattr(exc, "root_cause", None)
    if isinstance(root, str) and root.strip():
        return root.strip().splitlines()[0]
    text = str(exc)
    return text.splitlines()[0] if text else repr(exc)


class ArrivalRate:
    """Requests per second over the last ``RATE_WINDOW_S`` (a sliding window of arrival times)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()
        self._started = time.monotonic()

    def note(self, now: float | None = None) -> None:
        self._times.append(time.monotonic() if now is None else now)

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        span = min(self.window_s, max(1.0, now - self._started))
        return len(self._times) / span


class Deployment:
    def __init__(
        self,
        name: str,
        adapter: EngineAdapter,
        engine_config: EngineConfig,
        policy: ScalingPolicy,
        metrics: ModelMetrics,
        *,
        upstream_model: str,
        snapshots: Snapshots | None = None,
        config: ServeConfig | None = None,
        weight: float = 1.0,
        priority: int = 0,
        aliases: tuple[str, ...] = (),
    ) -> None:
        self.name = name  # the public model name clients send
        self.aliases = aliases  # other names accepted for it (the engine's own model name)
        self.adapter = adapter
        self.engine_config = engine_config
        self.policy = policy
        self.metrics = metrics
        self.upstream_model = upstream_model
        self.snapshots = snapshots
        self.config = config  # the whole ServeConfig of this deployment (cluster hosts rebuild from it)
        self.weight = weight
        self.priority = priority
        self.router = Router(name, policy)
        self.replicas: dict[str, Replica] = {}
        self.arrivals = ArrivalRate()
        # Set by the gateway: demand changed (with n requests about to queue); others wait for a unit.
        self.on_demand: Callable[[Deployment, int], None] = lambda _d, _n: None
        self.contended: Callable[[Deployment], bool] = lambda _d: False
        # Back-off after failed boots.
        self.retry_at = 0.0
        self.failed_boots = 0
        self.last_boot_error: str | None = None
        self.last_boot_exception: BaseException | None = None
        self.failing: str | None = None  # set after two identical failures in a row: 503 with this reason
        self.first_ready = asyncio.Event()  # set when a replica is first ready (the boot is over)
        # Memory one replica needs on a CPU unit: measured on the last one that ran (bytes, 0: unknown).
        self.memory_estimate = 0
        self.peak_live = 0
        # GPU-seconds totals behind the utilization gauges.
        self.held_s = self.running_s = self.serving_s = 0.0

    # ---------------------------------------------------------------- views
    def active(self) -> list[Replica]:
        """Replicas starting or serving new requests (the capacity demand is measured against)."""
        return [r for r in self.replicas.values() if r.state in (*STARTING, ReplicaState.READY)]

    def live(self) -> list[Replica]:
        """Replicas that hold an engine or a unit: everything not yet stopped."""
        return [r for r in self.replicas.values() if r.state is not ReplicaState.STOPPED]

    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas.values())

    def demand(self, arriving: int = 0) -> Demand:
        return Demand(
            in_flight=sum(r.in_flight for r in self.active()), waiting=self.router.waiting, arriving=arriving
        )

    @property
    def state(self) -> str:
        """ready / starting / failing / at_zero: the extra field of ``/v1/models``."""
        states = [r.state for r in self.replicas.values()]
        if ReplicaState.READY in states:
            return "ready"
        if self.failing is not None:
            return "failing"
        if any(s in STARTING for s in states):
            return "starting"
        return "at_zero"

    def backing_off(self, now: float) -> bool:
        return now < self.retry_at

    # ---------------------------------------------------------------- what the proxy calls
    async def acquire(self, avoid: Replica | None = None) -> Replica:
        """A READY replica with room (or the least busy), other than ``avoid`` where there is one; waits
        (bounded) while none. Call ``release`` after."""
        started = time.monotonic()
        if avoid is None:
            self.arrivals.note(started)
        replica = self._pick(avoid)
        if replica is not None and replica.in_flight >= self.policy.target_concurrency:
            # Every ready replica is at its target: this request is demand for another one, and it waits
            # for that one rather than queue inside a busy engine (while max_replicas allows).
            self.on_demand(self, 1)
            replica = self._pick(avoid)
        if replica is None:
            self._refuse_if_failing()
            with self.router.queued():
                self._gauge_queue()
                try:
                    replica = await self._wait_for_replica(avoid, started)
                finally:
                    self._gauge_queue(after=True)
        self.metrics.queue_wait_seconds.observe(time.monotonic() - started)
        replica.begin_request()
        self.metrics.in_flight.inc()
        return replica

    async def _wait_for_replica(self, avoid: Replica | None, started: float) -> Replica:
        deadline = started + self.policy.queue_timeout
        while (replica := self._pick(avoid)) is None:
            self.on_demand(self, 0)
            self._refuse_if_failing()
            left = deadline - time.monotonic()
            if left <= 0:
                why = f" (last boot failed: {self.last_boot_error})" if self.last_boot_error else ""
                raise QueueTimeout(
                    f"no replica of {self.name!r} became ready within {self.policy.queue_timeout:.0f} s{why}"
                )
            await self.router.changed(min(left, 1.0))
        return replica

    def _pick(self, avoid: Replica | None) -> Replica | None:
        return pick(self.replicas.values(), self.policy, avoid, overcommit=not self.contended(self))

    def _refuse_if_failing(self) -> None:
        now = time.monotonic()
        if self.failing is not None and self.backing_off(now):
            raise BootFailing(
                f"{self.name!r} cannot start: {self.failing}", retry_after_s=max(1.0, self.retry_at - now)
            )

    def _gauge_queue(self, after: bool = False) -> None:
        self.metrics.queue_depth.set(self.router.waiting - (1 if after else 0))

    def release(self, replica: Replica) -> None:
        served = replica.end_request()
        self.metrics.in_flight.dec()
        if served:
            self.metrics.gpu_seconds_serving.inc(served)
            self.serving_s += served
        self.router.wake()  # room on this replica for a waiter
        if replica.in_flight == 0:
            self.on_demand(self, 0)  # an idle replica: a deployment waiting for a unit may take it

    # ---------------------------------------------------------------- boots
    def boot_failed(self, exc: BaseException) -> None:
        reason = one_line(exc)
        same = reason == self.last_boot_error
        self.last_boot_exception = exc
        self.last_boot_error = reason
        self.failed_boots += 1
        self.retry_at = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (self.failed_boots - 1))
        if same and self.failed_boots >= 2:
            self.failing = reason
        self.router.wake()

    def boot_succeeded(self) -> None:
        self.first_ready.set()
        self.failed_boots = 0
        self.retry_at = 0.0
        self.failing = None
        self.last_boot_error = None
        self.last_boot_exception = None
