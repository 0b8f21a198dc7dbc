"""The gateway: many deployments behind one endpoint, sharing one set of units.

Rooms (each its own module):

    proxy.py        the OpenAI door: routes a request by its ``model`` to that deployment
    deployment.py   one model: its router (queue + pick), replicas, snapshots, back-off
    autoscaler.py   pure: demand + policy -> replicas wanted, and which idle ones to stop
    placement.py    pure: whom to evict or which busy deployment yields when no unit is free;
                    the ReplicaHost seam (where replicas run: ``local_host.py`` or ``cluster/``)
    liveness.py     probes serving replicas, fails dead ones
    lifecycle.py    how one replica comes up on this host (restore, or cold boot + snapshot)
    buffer_plan.py  the LP in the loop: idle units to hold from the observed arrival rates
    gateway.py      this: owns every task, runs the scaling loop, applies placement decisions

A swap: a request for B waits, no unit is free; an idle READY replica of another deployment (no request in
flight, past ``min_residency``; lowest priority, then least recently used) is drained and stopped, its unit
is reserved for B, and B is restored onto it (one log line and ``coldstart_swap_seconds``: eviction start to
B ready). Under contention (nothing idle), a deployment holding more units per weight than B yields one
replica: it takes no new requests, finishes those in flight (never cut), then stops. On one unit two
deployments of equal weight thus take turns of at least ``min_residency``, and a flood of requests for A
cannot starve B's queue. With nothing to evict, requests wait in their bounded queue (503 past
``--queue-timeout``).

Every task (bring-ups, probes, the scaling loop) belongs to ``self.tasks`` and is cancelled by ``close()``;
stops are not cancelled but awaited (a half-stopped sandbox leaks).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import Any

import httpx

from coldstart.launcher.autoscaler import IdleReplica, desired_replicas, replicas_to_stop
from coldstart.launcher.buffer_plan import BufferPlan, Observed, plan_buffer
from coldstart.launcher.deployment import Deployment
from coldstart.launcher.liveness import Liveness
from coldstart.launcher.metrics import Metrics
from coldstart.launcher.placement import Holder, ReplicaHost, choose_victim, over_share
from coldstart.launcher.process import resident_bytes
from coldstart.launcher.replica import FailureKind, Replica, ReplicaState, Swap
from coldstart.launcher.tasks import TaskOwner

log = logging.getLogger("coldstart.lifecycle")

TICK_S = 0.25  # scaling loop period
PLAN_EVERY_S = 5.0  # the LP buffer plan is recomputed this often
FAILED_STOP_GRACE_S = 2.0  # a failed (exited or hung) engine gets little time to stop politely
STOP_GRACE_S = 10.0
# An evicted replica is idle (or drained) and its state is in its snapshot: killed at once, since its
# stop is on the swap's path (a graceful uvicorn shutdown cost ~1 s of a 1.5 s swap here).
EVICT_GRACE_S = 0.0
_SERVING = (ReplicaState.READY, ReplicaState.DRAINING)


class Gateway:
    def __init__(
        self,
        deployments: list[Deployment],
        host: ReplicaHost,
        metrics: Metrics,
        http: httpx.AsyncClient,
        *,
        min_residency: float = 2.0,
        unit_lead_time_s: float = 0.0,
    ) -> None:
        self.deployments: dict[str, Deployment] = {}
        self._names: dict[str, Deployment] = {}  # public names and aliases
        for d in deployments:
            self.deployments[d.name] = d
            for name in (d.name, *d.aliases):
                self._names.setdefault(name, d)
            d.on_demand = self._on_demand
            d.contended = self._contended
        self.host = host
        self.metrics = metrics
        self.http = http
        self.min_residency = min_residency
        self.unit_lead_time_s = unit_lead_time_s
        self.tasks = TaskOwner()
        self.liveness = Liveness(http, self.fail)
        self._ids = itertools.count(1)
        self._stops: dict[str, asyncio.Task[None]] = {}  # one stop per replica; awaited, never cancelled
        self._halting: set[str] = set()  # replicas whose engine is being stopped on purpose
        self._promised: collections.Counter[str] = collections.Counter()  # evictions under way, per taker
        self._reserved: collections.Counter[str] = collections.Counter()  # freed units held for a taker
        self._swaps: dict[str, list[Swap]] = collections.defaultdict(list)
        self.plan = BufferPlan()
        self.peak_held = 0  # most units held at once (never above the capacity)
        self._planned_at = 0.0
        self._accounted_at = time.monotonic()
        on_failure = getattr(host, "on_failure", None)
        if on_failure is not None:
            on_failure(self._unit_failed)

    # ---------------------------------------------------------------- lifecycle of the gateway
    async def start(self) -> list[asyncio.Task[Any]]:
        """Start the scaling loop and the initial replicas (where units are free; no eviction at start);
        returns their bring-up tasks."""
        self.tasks.spawn(self._loop(), "scaling loop")
        started: list[asyncio.Task[Any]] = []
        for d in self.deployments.values():
            for _ in range(d.policy.initial_replicas):
                if not self._fits(d):
                    log.info(
                        "%s: no free unit for its initial replica; it starts on its first request",
                        d.name,
                        extra={"event": "initial_deferred", "model": d.name},
                    )
                    break
                started.append(self._launch(d))
        return started

    async def close(self) -> None:
        """Cancel bring-ups and probes, stop every replica and wait for every stop (also those already
        running: a second stop never returns while the first is still tearing the sandbox down)."""
        await self.tasks.close()
        for d in self.deployments.values():
            for replica in list(d.replicas.values()):
                self._request_stop(d, replica, drain=False)
        while self._stops:
            await asyncio.gather(*self._stops.values(), return_exceptions=True)
        for d in self.deployments.values():
            d.router.wake()
            if d.snapshots is not None:  # publishes and pulls under way finish, or are cancelled and said
                await d.snapshots.close()

    # ---------------------------------------------------------------- what the proxy calls
    def lookup(self, model: object) -> Deployment | None:
        return self._names.get(model) if isinstance(model, str) else None

    @property
    def served_names(self) -> list[str]:
        return list(self.deployments)

    def suspect(self, replica: Replica, why: str) -> None:
        """A request saw trouble reaching the replica: probe it now (it fails only if the probe does)."""
        self.liveness.suspect(replica, why)

    def fail(self, deployment: Deployment, replica: Replica, why: str, kind: FailureKind) -> None:
        """Take a serving replica out of service: its engine is stopped (ending its in-flight requests)."""
        if replica.state in _SERVING:
            deployment.metrics.replica_failures.labels(kind).inc()
            replica.transition(ReplicaState.FAILED, reason=why)
            self._request_stop(deployment, replica, drain=False)
            deployment.router.wake()  # waiters re-evaluate (and demand may start a replacement)

    def ready(self) -> bool:
        return any(d.state == "ready" for d in self.deployments.values())

    # ---------------------------------------------------------------- placement
    def _held(self) -> int:
        return sum(len(d.live()) for d in self.deployments.values())

    def _memory_used(self) -> int:
        return sum(r.memory or d.memory_estimate for d in self.deployments.values() for r in d.live())

    def _fits(self, d: Deployment) -> bool:
        """A unit is free for ``d`` (not reserved for another deployment) and its memory fits."""
        capacity = self.host.capacity()
        reserved_elsewhere = sum(n for name, n in self._reserved.items() if name != d.name)
        if capacity is not None and self._held() + reserved_elsewhere >= capacity:
            return False
        budget = self.host.memory_budget()
        if budget is None or not d.memory_estimate:
            return True
        return self._memory_used() + d.memory_estimate <= budget

    def _holders(self) -> list[Holder]:
        return [
            Holder(
                replica_id=r.id,
                deployment=d.name,
                priority=d.priority,
                weight=d.weight,
                in_flight=r.in_flight,
                ready=r.state is ReplicaState.READY,
                last_used=r.last_used,
                placed_at=r.ready_at or r.created_at,
                memory=r.memory,
            )
            for d in self.deployments.values()
            for r in d.live()
            if r.state is not ReplicaState.DRAINING and r.state is not ReplicaState.FAILED
        ]

    def _contended(self, deployment: Deployment) -> bool:
        """Deployments share too few units for all of them at once: then no replica takes more than its
        ``target_concurrency`` (the rest wait in the router), so a replica that must yield its unit
        finishes a handful of requests, not a flood queued inside its engine."""
        capacity = self.host.capacity()
        if len(self.deployments) < 2 or capacity is None:
            return False
        return capacity < sum(d.policy.max_replicas for d in self.deployments.values())

    def _on_demand(self, deployment: Deployment, arriving: int) -> None:
        self.schedule(deployment, arriving)

    def schedule(self, arriving_for: Deployment | None = None, arriving: int = 0) -> None:
        """Start the replicas demand wants where units allow; free units by eviction where they do not.
        Deployments are served fewest units per weight first, then the longest-waiting request first."""
        if self.tasks.closed:
            return
        now = time.monotonic()
        wants: list[tuple[Deployment, int]] = []
        for d in self.deployments.values():
            if d.backing_off(now):
                continue
            extra = arriving if d is arriving_for else 0
            coming = self._promised[d.name]
            missing = desired_replicas(d.demand(extra), d.policy) - len(d.active()) - coming
            room = d.policy.max_replicas - len(d.live()) - coming
            if min(missing, room) > 0:
                wants.append((d, min(missing, room)))
            elif self._reserved[d.name]:
                self._reserved[d.name] = 0  # its demand went away: the freed unit is anyone's
        wants.sort(key=lambda w: (len(w[0].live()) / w[0].weight, -w[0].router.oldest_wait(now)))
        for d, n in wants:
            for _ in range(n):
                if self._too_big(d):
                    break
                if self._fits(d):
                    self._launch(d)
                elif not d.router.waiting or not self._make_room(d, now):
                    break  # evictions only for requests that wait, never for min_replicas alone

    def _too_big(self, d: Deployment) -> bool:
        budget = self.host.memory_budget()
        if budget is None or d.memory_estimate <= budget:
            return False
        gib = 1 << 30
        d.failing = (
            f"one replica needs {d.memory_estimate / gib:.1f} GiB, more than the memory budget of "
            f"{budget / gib:.1f} GiB for all replicas (raise --memory-budget)"
        )
        d.retry_at = time.monotonic() + 30.0
        d.router.wake()
        return True

    def _make_room(self, d: Deployment, now: float) -> bool:
        """Evict one replica of another deployment for ``d``; False when nothing may be evicted."""
        holders = self._holders()
        victim = choose_victim(holders, wanted_by=d.name, now=now, min_residency=self.min_residency)
        busy = False
        if victim is None and d.router.waiting:
            weights = {name: dep.weight for name, dep in self.deployments.items()}
            victim = over_share(
                holders, wanted_by=d.name, weights=weights, now=now, min_residency=self.min_residency
            )
            busy = victim is not None
        if victim is None:
            return False
        owner = self.deployments[victim.deployment]
        replica = owner.replicas[victim.replica_id]
        log.info(
            "evicting replica %s of %s for %s (%s)",
            replica.id,
            owner.name,
            d.name,
            f"yields: {replica.in_flight} in flight finish first" if busy and replica.in_flight else "idle",
            extra={"event": "evict", "replica": replica.id, "model": owner.name, "for": d.name},
        )
        owner.metrics.evictions.inc()
        replica.transition(ReplicaState.DRAINING, reason=f"evicted for {d.name}")
        self._promised[d.name] += 1
        self._swaps[d.name].append(Swap(owner.name, replica.id, now))
        self._request_stop(owner, replica, drain=True, drain_timeout=None, freed_for=d)
        return True

    def _unit_failed(self, replica_id: str, reason: str) -> None:
        for d in self.deployments.values():
            if (replica := d.replicas.get(replica_id)) is not None:
                replica.unit_failure = reason
                log.warning(
                    "replica %s of %s: its unit failed (%s)",
                    replica.id,
                    d.name,
                    reason,
                    extra={"event": "unit_failed", "replica": replica.id, "model": d.name},
                )
                if replica.state in _SERVING:
                    self.fail(d, replica, f"unit failed: {reason}", FailureKind.UNIT)
                elif replica.state is not ReplicaState.STOPPED:
                    self._request_stop(d, replica, drain=False)

    # ---------------------------------------------------------------- one replica
    def _launch(self, d: Deployment) -> asyncio.Task[Any]:
        replica = Replica(f"r{next(self._ids)}", d.name)
        if self._reserved[d.name]:
            self._reserved[d.name] -= 1
            if self._swaps[d.name]:
                replica.swap = self._swaps[d.name].pop(0)
        d.replicas[replica.id] = replica
        d.peak_live = max(d.peak_live, len(d.live()))
        self.peak_held = max(self.peak_held, self._held())
        return self.tasks.spawn(self._bring_up(d, replica), f"bring up {replica.id} ({d.name})")

    async def _bring_up(self, d: Deployment, replica: Replica) -> None:
        started = time.monotonic()
        try:
            how = await self.host.start(d, replica)
        except asyncio.CancelledError:
            self._request_stop(d, replica, drain=False)  # close() waits for it
            raise
        except Exception as exc:  # any failure: the replica never serves; the deployment backs off
            d.boot_failed(exc)
            d.metrics.replica_failures.labels(FailureKind.BOOT).inc()
            log.error(
                "replica %s of %s failed to start: %s",
                replica.id,
                d.name,
                exc,
                extra={"event": "boot_failed", "replica": replica.id, "model": d.name},
            )
            if replica.state is not ReplicaState.FAILED:
                replica.transition(ReplicaState.FAILED, reason="boot")
            self._request_stop(d, replica, drain=False)
            return
        elapsed = time.monotonic() - started
        replica.how = how
        d.metrics.phase_seconds.labels(str(how)).observe(elapsed)
        d.boot_succeeded()
        sandbox = replica.sandbox
        pids = getattr(sandbox, "host_pids", None)
        if pids is not None:
            replica.memory = await asyncio.to_thread(resident_bytes, pids())
            if replica.memory:
                d.memory_estimate = replica.memory
        replica.transition(ReplicaState.READY, how=how, ready_after_s=round(elapsed, 3))
        if replica.swap is not None:
            took = time.monotonic() - replica.swap.started
            d.metrics.swaps.inc()
            d.metrics.swap_seconds.observe(took)
            log.info(
                "swap: %s (%s) evicted, %s (%s) placed by %s in %.2fs",
                replica.swap.evicted_model,
                replica.swap.evicted_replica,
                d.name,
                replica.id,
                how,
                took,
                extra={
                    "event": "swap",
                    "evicted": replica.swap.evicted_model,
                    "model": d.name,
                    "how": str(how),
                    "duration_s": round(took, 3),
                },
            )
        self.tasks.spawn(
            self.liveness.watch(d, replica, lambda: self._watched(replica)), f"watch {replica.id}"
        )
        d.router.wake()

    def _watched(self, replica: Replica) -> bool:
        """Serving and not being stopped on purpose (an engine told to exit fails its probe: no news)."""
        return (
            not self.tasks.closed
            and replica.state in _SERVING
            and replica.sandbox is not None
            and replica.id not in self._halting
        )

    def _request_stop(
        self,
        d: Deployment,
        replica: Replica,
        *,
        drain: bool,
        drain_timeout: float | None = -1.0,
        freed_for: Deployment | None = None,
    ) -> asyncio.Task[None]:
        """The replica's one stop task (started now, or the one already running). Not owned by
        ``self.tasks``: ``close()`` waits for stops instead of cancelling them half-way.
        ``drain_timeout``: -1 = the policy's, None = until every request in flight has finished.
        ``freed_for``: the deployment its unit is reserved for once it is free (an eviction)."""
        task = self._stops.get(replica.id)
        if task is None:
            timeout = d.policy.drain_timeout if drain_timeout == -1.0 else drain_timeout
            stop = self._stop(d, replica, drain, timeout, freed_for)
            task = asyncio.create_task(stop, name=f"stop {replica.id}")
            self._stops[replica.id] = task
            task.add_done_callback(lambda _t: self._stops.pop(replica.id, None))
        return task

    async def _stop(
        self,
        d: Deployment,
        replica: Replica,
        drain: bool,
        drain_timeout: float | None,
        freed_for: Deployment | None,
    ) -> None:
        if replica.state is ReplicaState.READY:
            replica.transition(ReplicaState.DRAINING, reason="shutdown")
        if drain:
            deadline = None if drain_timeout is None else time.monotonic() + drain_timeout
            while replica.in_flight and replica.state is ReplicaState.DRAINING and not self.tasks.closed:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
        self._halting.add(replica.id)
        try:
            if replica.state is ReplicaState.FAILED:
                grace = FAILED_STOP_GRACE_S
            else:
                grace = EVICT_GRACE_S if freed_for is not None else STOP_GRACE_S
            await self.host.stop(replica, grace)
        finally:
            if replica.state is not ReplicaState.STOPPED:
                if replica.state not in (ReplicaState.DRAINING, ReplicaState.FAILED):
                    replica.transition(ReplicaState.FAILED, reason="cancelled")
                replica.transition(ReplicaState.STOPPED)
            d.replicas.pop(replica.id, None)
            self._halting.discard(replica.id)
            if freed_for is not None:  # the unit is held for the deployment it was freed for
                self._promised[freed_for.name] -= 1
                self._reserved[freed_for.name] += 1
            d.router.wake()
        self.schedule()

    # ---------------------------------------------------------------- the loop
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for d in self.deployments.values():
                for replica in list(d.replicas.values()):  # an exited engine is seen within a tick
                    sandbox = replica.sandbox
                    if self._watched(replica) and sandbox and (code := sandbox.exit_code()) is not None:
                        self.fail(d, replica, f"engine exited with status {code}", FailureKind.EXITED)
            self.schedule()
            for d in self.deployments.values():
                self._scale_down(d, now)
            self.update_gauges()
            if now - self._planned_at >= PLAN_EVERY_S:
                self._planned_at = now
                await self._replan()

    def _scale_down(self, d: Deployment, now: float) -> None:
        ready = [r for r in d.replicas.values() if r.state is ReplicaState.READY]
        stop = replicas_to_stop(
            [IdleReplica(r.id, r.in_flight, r.last_used) for r in ready],
            active=len(d.active()),
            waiting=d.router.waiting,
            policy=d.policy,
            now=now,
        )
        for replica_id in stop:
            replica = d.replicas[replica_id]
            log.info(
                "replica %s of %s idle for %.0fs: scaling down",
                replica.id,
                d.name,
                now - replica.last_used,
                extra={"event": "scale_down", "replica": replica.id, "model": d.name},
            )
            replica.transition(ReplicaState.DRAINING, reason="idle")
            self._request_stop(d, replica, drain=True)

    async def _replan(self) -> None:
        capacity = self.host.capacity()
        free = (capacity - self._held()) if capacity is not None else 1_000_000
        observed = [
            Observed(d.name, d.arrivals.per_second(), d.in_flight(), bool(d.active()))
            for d in self.deployments.values()
        ]
        kind = getattr(getattr(self.host, "pool", None), "kind", self.host.name)
        try:
            plan = await asyncio.to_thread(
                plan_buffer, observed, free_units=free, lead_time_s=self.unit_lead_time_s, kind=kind
            )
        except Exception as exc:  # the LP must never take serving down
            log.warning("buffer plan failed: %s", exc, extra={"event": "buffer_plan_failed"})
            return
        changed = plan.target != self.plan.target
        self.plan = plan
        self.metrics.buffer_target.set(plan.target)
        set_buffer = getattr(self.host, "set_buffer", None)
        if changed and set_buffer is not None:
            set_buffer(plan.target)
            log.info("buffer: %s", plan.explanation, extra={"event": "buffer_plan", "target": plan.target})

    def update_gauges(self) -> None:
        now = time.monotonic()
        elapsed, self._accounted_at = now - self._accounted_at, now
        for d in self.deployments.values():
            counts = {state: 0 for state in ReplicaState}
            for replica in d.replicas.values():
                counts[replica.state] += 1
            for state, n in counts.items():
                d.metrics.replicas.labels(state.value).set(n)
            # GPU allocation utilization (the seed's definition): unit-seconds with a replica of the model
            # up (ready or draining) / unit-seconds its replicas held (starting ones are paid but do not
            # run the app). Busy utilization, stricter: unit-seconds with a request in flight / held.
            held = len(d.live())
            running = counts[ReplicaState.READY] + counts[ReplicaState.DRAINING]
            d.metrics.gpu_seconds_held.inc(held * elapsed)
            d.metrics.gpu_seconds_running.inc(running * elapsed)
            d.held_s += held * elapsed
            d.running_s += running * elapsed
            if d.held_s > 0:
                d.metrics.gpu_allocation_utilization.set(d.running_s / d.held_s)
                d.metrics.gpu_busy_utilization.set(d.serving_s / d.held_s)

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """The ``/health`` body: deployments, their replicas and queues, the units and the buffer plan."""
        capacity = self.host.capacity()
        return {
            "deployments": {
                d.name: {
                    "state": d.state,
                    "queue_depth": d.router.waiting,
                    "replicas": [
                        {
                            "id": r.id,
                            "state": r.state.value,
                            "in_flight": r.in_flight,
                            "how": str(r.how) if r.how else None,
                            "memory_bytes": r.memory,
                        }
                        for r in d.replicas.values()
                    ],
                    **({"last_boot_error": d.last_boot_error} if d.last_boot_error else {}),
                }
                for d in self.deployments.values()
            },
            "units": {
                "host": self.host.name,
                "capacity": capacity,
                "held": self._held(),
                "peak_held": self.peak_held,
                # A cluster: units last asked of its autoscaler (replicas + the plan's buffer)
                **(
                    {"requested": r} if (r := getattr(self.host, "requested_units", None)) is not None else {}
                ),
            },
            "buffer": self.plan.as_json(),
        }

    @property
    def queue_depth(self) -> int:
        return sum(d.router.waiting for d in self.deployments.values())

    def replicas(self) -> list[Replica]:
        return [r for d in self.deployments.values() for r in d.replicas.values()]


__all__ = ["Gateway"]
